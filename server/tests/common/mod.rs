//! A real server on 127.0.0.1:0 for integration tests, and helpers to talk to it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{net::SocketAddr, time::Duration};

use tokio::{sync::oneshot, task::JoinHandle};
use wadi_server::Config;

/// How long any single awaited event may take before a test fails.
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _data: Option<tempfile::TempDir>,
}

impl TestServer {
    /// Starts a server with every default and a fresh data directory.
    pub async fn start() -> Self {
        let data = tempfile::tempdir().unwrap();
        let config = Config::for_tests(data.path().to_path_buf());
        let mut server = Self::start_with(config).await;
        server._data = Some(data);
        server
    }

    /// Starts a server with the given configuration; its `addr` is ignored in favour of port 0.
    pub async fn start_with(config: Config) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(wadi_server::run(config, listener, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            http: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
            _data: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().unwrap();
        tokio::time::timeout(TIMEOUT, task)
            .await
            .expect("server did not stop in time")
            .unwrap()
    }
}
