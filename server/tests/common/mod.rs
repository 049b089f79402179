//! A real server on 127.0.0.1:0 for integration tests, on SQLite or Postgres, and helpers to
//! talk to it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod browser;
pub mod cluster;
pub mod db;
pub mod net;
pub mod services;
pub mod upstream;
pub mod ws;

use std::{net::SocketAddr, time::Duration};

pub use db::{Engine, TestDb};
use serde_json::{Value, json};
use tokio::{sync::oneshot, task::JoinHandle};
use wadi_server::Config;

/// How long any single awaited event may take before a test fails.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a test body once on SQLite and once on Postgres. Without `WADI_TEST_POSTGRES_URL` (which
/// `cargo xtask test` sets) the Postgres variant is ignored, so it shows as skipped. Usage:
/// `on_both_engines!(name);` next to `async fn name(engine: Engine)`.
#[macro_export]
macro_rules! on_both_engines {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::common::Engine::Sqlite).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[cfg_attr(
                    not(wadi_postgres),
                    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
                )]
                async fn postgres() {
                    super::$name($crate::common::Engine::postgres()).await;
                }
            }
        )+
    };
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    db: Option<TestDb>,
}

impl TestServer {
    /// Starts a server with every default on SQLite.
    pub async fn start() -> Self {
        Self::on(Engine::Sqlite).await
    }

    /// Starts a server with every default on `engine`, with a fresh database.
    pub async fn on(engine: Engine) -> Self {
        Self::configured(engine, |_| {}).await
    }

    /// A fresh database on `engine`, a configuration adjusted by `adjust`, and a server.
    pub async fn configured(engine: Engine, adjust: impl FnOnce(&mut Config)) -> Self {
        let db = TestDb::create(engine).await;
        let mut config = db.config();
        adjust(&mut config);
        let mut server = Self::start_with(config).await;
        server.db = Some(db);
        server
    }

    /// Starts a server with the given configuration; its `addr` is ignored in favour of port 0.
    /// Returns once it serves its app.
    pub async fn start_with(config: Config) -> Self {
        let (started, ready) = oneshot::channel::<()>();
        let server = Self::spawn(config, move || {
            let _ = started.send(());
        })
        .await;
        tokio::time::timeout(TIMEOUT, ready)
            .await
            .expect("the server did not start in time")
            .expect("the server stopped before it started");
        server
    }

    /// Starts a server that may not be able to start yet (its database down): returns once it
    /// listens.
    pub async fn start_unready(config: Config) -> Self {
        Self::spawn(config, || {}).await
    }

    async fn spawn(config: Config, started: impl FnOnce() + Send + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(wadi_server::run_notifying(
            config,
            listener,
            async move {
                let _ = stopped.await;
            },
            started,
        ));
        let server = Self {
            addr,
            http: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
            db: None,
        };
        // The listener is bound already: this answers as soon as it serves.
        let health = tokio::time::timeout(TIMEOUT, server.http.get(server.url("/healthz")).send())
            .await
            .expect("the server did not start in time")
            .expect("the server did not start");
        assert_eq!(health.status(), 200);
        server
    }

    /// A handle on a server running elsewhere (another process) at `addr`.
    pub fn external(addr: SocketAddr) -> Self {
        Self {
            addr,
            http: reqwest::Client::new(),
            stop: None,
            task: None,
            db: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The JSON a plain `GET path` answers.
    pub async fn get_json(&self, path: &str) -> Value {
        self.http
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The signing keys the embedded auth service publishes.
    pub async fn jwks(&self) -> Value {
        self.get_json("/auth/v1/.well-known/jwks.json").await
    }

    /// The Prometheus exposition at `/metrics`.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of the Prometheus sample whose line starts with `series` (0 if absent).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .find(|line| line.starts_with(series))
            .and_then(|line| line.split_whitespace().last())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits (polling `/metrics`) until the sample reaches `at_least`.
    pub async fn await_metric(&self, series: &str, at_least: f64) {
        tokio::time::timeout(TIMEOUT, async {
            while self.metric(series).await < at_least {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{series} never reached {at_least}"));
    }

    /// Signals shutdown and waits for `run` to return; keeps the database.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().unwrap();
        tokio::time::timeout(TIMEOUT, task)
            .await
            .expect("server did not stop in time")
            .unwrap()
    }

    /// Stops the server and drops its database.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let result = self.stop().await;
        if let Some(db) = self.db.take() {
            db.drop_database().await;
        }
        result
    }

    /// The test's database (to inspect what was written).
    pub fn db(&self) -> &TestDb {
        self.db.as_ref().unwrap()
    }

    /// Takes the database out, to start another server on it after this one stops.
    pub fn take_db(&mut self) -> TestDb {
        self.db.take().unwrap()
    }

    /// Signs up a fresh user; returns the session JSON.
    pub async fn sign_up(&self) -> Session {
        let email = format!("user-{}@example.com", uuid::Uuid::new_v4());
        self.sign_up_as(&email, "correct horse battery").await
    }

    pub async fn sign_up_as(&self, email: &str, password: &str) -> Session {
        let response = self
            .http
            .post(self.url("/auth/v1/signup"))
            .json(&json!({"email": email, "password": password}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "signup failed");
        Session(response.json().await.unwrap())
    }
}

/// A REST client for one signed-in user.
pub struct Api<'a> {
    pub server: &'a TestServer,
    pub token: Option<String>,
}

impl TestServer {
    /// Signs up a fresh user and returns a client acting as them.
    pub async fn user(&self) -> Api<'_> {
        let session = self.sign_up().await;
        Api {
            server: self,
            token: Some(session.access_token().to_owned()),
        }
    }

    /// A client without a token.
    pub fn anonymous(&self) -> Api<'_> {
        Api {
            server: self,
            token: None,
        }
    }
}

impl Api<'_> {
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.server.http.request(method, self.server.url(path));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends and returns the status and the JSON body (`Null` when there is none).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (reqwest::StatusCode, Value) {
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        let json = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, json)
    }

    pub async fn get(&self, path: &str) -> (reqwest::StatusCode, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (reqwest::StatusCode, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// Deletes a conversation; the answer's status.
    pub async fn delete_conversation(&self, id: &str) -> reqwest::StatusCode {
        self.call(
            reqwest::Method::DELETE,
            &format!("/api/conversations/{id}"),
            None,
        )
        .await
        .0
    }

    /// Sends a message over REST; the answer (`201`: the message and its run).
    pub async fn send(&self, conversation: &str, content: &str) -> Value {
        let (status, sent) = self
            .post(
                &format!("/api/conversations/{conversation}/messages"),
                json!({"content": content}),
            )
            .await;
        assert_eq!(status, 201, "{sent}");
        sent
    }

    /// A run's SSE stream (`/api/runs/{run}/events`), read to its end.
    pub async fn events(&self, run: &str) -> String {
        tokio::time::timeout(
            TIMEOUT,
            self.request(reqwest::Method::GET, &format!("/api/runs/{run}/events"))
                .send()
                .await
                .unwrap()
                .text(),
        )
        .await
        .expect("run did not finish in time")
        .unwrap()
    }

    /// Sends a message over REST and waits (through the run's SSE stream) until its run has
    /// ended and been saved. Returns the send's answer.
    pub async fn send_and_finish(&self, conversation: &str, content: &str) -> Value {
        let sent = self.send(conversation, content).await;
        let events = self.events(sent["run"]["id"].as_str().unwrap()).await;
        assert!(events.contains("event: complete"), "{events}");
        sent
    }

    /// Creates a conversation and returns its id.
    pub async fn new_conversation(&self) -> String {
        let (status, body) = self.post("/api/conversations", json!({})).await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }
}

/// A session as the embedded auth service returns it.
#[derive(Debug, Clone)]
pub struct Session(pub Value);

impl Session {
    pub fn access_token(&self) -> &str {
        self.0["access_token"].as_str().unwrap()
    }

    pub fn refresh_token(&self) -> &str {
        self.0["refresh_token"].as_str().unwrap()
    }

    pub fn user_id(&self) -> uuid::Uuid {
        self.0["user"]["id"].as_str().unwrap().parse().unwrap()
    }
}

/// POSTs headers announcing a 1 MB JSON body, without sending it, and reads the answer.
pub async fn declared_oversized_post(
    server: &TestServer,
    token: Option<&str>,
    path: &str,
) -> (reqwest::StatusCode, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: 2000000\r\nConnection: close\r\n\r\n",
        server.addr
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, tcp.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    let status: u16 = text.split(' ').nth(1).unwrap().parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let body = body
        .rsplit('\n')
        .find(|line| line.starts_with('{'))
        .unwrap_or(body);
    (
        reqwest::StatusCode::from_u16(status).unwrap(),
        serde_json::from_str(body.trim()).unwrap_or(Value::Null),
    )
}

/// Sends `signal` (`-STOP`, `-CONT`, `-TERM`) to process `pid`: a process that stalls, wakes up
/// or is asked to stop.
pub async fn signal(pid: u32, signal: &str) {
    let status = tokio::process::Command::new("kill")
        .arg(signal)
        .arg(pid.to_string())
        .status()
        .await
        .unwrap();
    assert!(status.success());
}
