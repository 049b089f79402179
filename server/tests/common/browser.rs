//! End-to-end harness: the `wadi` binary (serving the built web app) started alone in an empty
//! directory, a fake model upstream, an optional TCP proxy the test can cut, and headless
//! Chromium driven over WebDriver (Debian's chromium and chromium-driver).

use std::{net::SocketAddr, path::PathBuf, process::Stdio, sync::Arc, time::Duration};

use fantoccini::{Client, ClientBuilder, Locator, elements::Element};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use super::TIMEOUT;
#[allow(unused_imports)]
pub use super::net::Proxy;

/// The binary under test (set by `cargo xtask test`).
fn binary() -> PathBuf {
    let path = std::env::var_os("WADI_BROWSER_BINARY").expect(
        "WADI_BROWSER_BINARY is not set: run the browser tests with `cargo xtask test` \
         (it builds the web app and the binary)",
    );
    PathBuf::from(path)
}

fn chromedriver() -> PathBuf {
    std::env::var_os("CHROMEDRIVER")
        .map_or_else(|| PathBuf::from("/usr/bin/chromedriver"), PathBuf::from)
}

fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned())
}

/// The app: the binary copied alone into an empty directory and started with no configuration
/// but the model's URL (and whatever `env` adds).
pub struct App {
    pub addr: SocketAddr,
    child: Child,
    pub dir: tempfile::TempDir,
}

impl App {
    pub async fn start(model_url: &str, env: &[(&str, &str)]) -> Self {
        let mut all = vec![
            ("OPENAI_BASE_URL", model_url),
            ("OPENAI_API_KEY", "sk-test"),
        ];
        all.extend_from_slice(env);
        Self::start_bare(&all).await
    }

    /// The binary with nothing set but `env` (and a free port).
    pub async fn start_bare(env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("wadi");
        std::fs::copy(binary(), &exe).unwrap();
        let mut command = Command::new(&exe);
        command
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("WADI_ADDR", "127.0.0.1:0")
            // The socket's debug lines (when a conversation frame was posted and queued) are
            // printed with a failing test's output, to tell a server delay from a client one.
            .env("RUST_LOG", "warn,wadi_server::ws=debug")
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let addr = tokio::time::timeout(TIMEOUT, async {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(url) = line.strip_prefix("WADI is running at http://") {
                    return url.trim_end_matches('/').parse::<SocketAddr>().unwrap();
                }
            }
            panic!("wadi exited before printing its address");
        })
        .await
        .expect("wadi did not start");
        Self { addr, child, dir }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Headless Chromium through its own chromedriver. Cheap to clone (a WebDriver session handle).
#[derive(Clone)]
pub struct Browser {
    pub client: Client,
}

/// What keeps a browser alive: its chromedriver process and profile directory.
struct Held {
    name: String,
    client: Client,
    _driver: Child,
    _profile: tempfile::TempDir,
}

/// A test's browsers, kept until the end so that a failure can be photographed.
#[derive(Clone, Default)]
pub struct Scenario {
    held: Arc<tokio::sync::Mutex<Vec<Held>>>,
}

impl Scenario {
    /// A browser window of `width`×`height` in the light scheme; `name` names its screenshots.
    pub async fn browser(&self, name: &str, width: u32, height: u32) -> Browser {
        self.browser_in(name, width, height, false).await
    }

    /// Like [`Scenario::browser`], preferring the dark colour scheme when `dark`.
    pub async fn browser_in(&self, name: &str, width: u32, height: u32, dark: bool) -> Browser {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let mut driver = Command::new(chromedriver())
            .arg(format!("--port={port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("cannot start chromedriver (cargo xtask test installs chromium-driver)");
        let stdout = driver.stdout.take().unwrap();
        tokio::time::timeout(TIMEOUT, async {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains("started successfully") {
                    // Keep draining so chromedriver never blocks on a full pipe.
                    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                    return;
                }
            }
            panic!("chromedriver exited");
        })
        .await
        .expect("chromedriver did not start");
        let profile = tempfile::tempdir().unwrap();
        let args = vec![
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-quic".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
            format!("--window-size={width},{height}"),
            // Blink's preferred colour scheme: 0 is dark, 1 is light.
            format!(
                "--blink-settings=preferredColorScheme={}",
                if dark { 0 } else { 1 }
            ),
        ];
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            json!({"binary": chromium(), "args": args}),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("cannot start a browser session");
        client.set_window_size(width, height).await.unwrap();
        self.held.lock().await.push(Held {
            name: name.to_owned(),
            client: client.clone(),
            _driver: driver,
            _profile: profile,
        });
        Browser { client }
    }

    /// Runs the scenario; on failure saves a screenshot of every browser under
    /// `target/browser-screenshots/` before failing the test.
    pub async fn run<F, Fut>(body: F)
    where
        F: FnOnce(Scenario) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let scenario = Scenario::default();
        let result = tokio::spawn(body(scenario.clone())).await;
        let held = std::mem::take(&mut *scenario.held.lock().await);
        if result.is_err() {
            let dir = screenshot_dir();
            for browser in &held {
                if let Ok(png) = browser.client.screenshot().await {
                    let path = dir.join(format!("{}-failure.png", browser.name));
                    let _ = std::fs::write(&path, png);
                    eprintln!("screenshot of the failure: {}", path.display());
                }
            }
        }
        // Passed or failed, the sessions are closed: killing chromedriver alone would leave
        // Chromium running.
        for browser in held {
            let _ = browser.client.close().await;
        }
        if let Err(error) = result {
            std::panic::resume_unwind(error.into_panic());
        }
    }
}

fn screenshot_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/browser-screenshots");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

impl Browser {
    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    pub async fn find(&self, css: &str) -> Element {
        self.client
            .wait()
            .at_most(TIMEOUT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css} never appeared: {e}"))
    }

    pub async fn click(&self, css: &str) {
        self.find(css).await.click().await.unwrap();
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        self.find(css).await.send_keys(text).await.unwrap();
    }

    pub async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    /// Waits until the JS expression `script` is truthy and returns its value.
    pub async fn until(&self, what: &str, script: &str) -> Value {
        self.until_within(what, script, TIMEOUT * 3).await
    }

    /// [`Browser::until`] with a limit of its own, for what takes longer by design.
    pub async fn until_within(&self, what: &str, script: &str, limit: Duration) -> Value {
        let body = format!("return ({script});");
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let value = self.js(&body).await;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return value;
            }
            if tokio::time::Instant::now() >= deadline {
                // What the page held at that moment (the failure screenshot comes later, after
                // the server is gone).
                let page = self
                    .client
                    .execute(
                        "return [location.href, document.body.innerText.slice(0, 3000), \
                         document.querySelector('.sidebar')?.outerHTML.slice(0, 4000)];",
                        vec![],
                    )
                    .await
                    .ok();
                panic!("timed out waiting for {what}; the page then: {page:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Saves a screenshot named `name` under `target/browser-screenshots/`.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let path = screenshot_dir().join(format!("{name}.png"));
        if let Ok(png) = self.client.screenshot().await {
            let _ = std::fs::write(&path, png);
        }
        path
    }
}
