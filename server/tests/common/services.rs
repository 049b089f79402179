//! Services the tests start for themselves: a `redis-server` (Debian's package, installed by
//! `cargo xtask test`) on a free port in a temporary directory, restartable on the same port.

use std::{path::Path, process::Stdio};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use super::{TIMEOUT, net::free_port};

pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = spawn(port, dir.path()).await;
        Self {
            port,
            dir,
            child: Some(child),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (its data is gone: it keeps nothing on disk).
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }

    /// Starts an empty server on the same port.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        self.child = Some(spawn(self.port, self.dir.path()).await);
    }

    /// `SIGSTOP`: the server keeps its connections but answers nothing, as a stalled or
    /// overloaded Redis does.
    pub async fn pause(&self) {
        self.signal("-STOP").await;
    }

    /// `SIGCONT`: it answers again, everything it was sent meanwhile included.
    pub async fn resume(&self) {
        self.signal("-CONT").await;
    }

    async fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .expect("not running");
        super::signal(pid, signal).await;
    }

    /// A command through `redis-cli`, for inspecting what the servers wrote.
    pub async fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .arg("-p")
            .arg(self.port.to_string())
            .args(args)
            .output()
            .await
            .expect("redis-cli is missing (cargo xtask test installs redis-tools)");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

/// Starts `redis-server` and waits for it to say it is ready.
async fn spawn(port: u16, dir: &Path) -> Child {
    let mut child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--loglevel",
            "notice",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect(
            "redis-server is missing: run the tests with `cargo xtask test`, which installs \
             Debian's redis-server",
        );
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    tokio::time::timeout(TIMEOUT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("Ready to accept connections") {
                return;
            }
        }
        panic!("redis-server exited before it was ready");
    })
    .await
    .expect("redis-server did not start");
    // Keep reading, or its log would fill the pipe and stall it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}
