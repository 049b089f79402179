//! Several real `wadi` processes (the binary cargo builds for these tests) on one Postgres and one
//! Redis, each killable (`kill -9`), pausable (`SIGSTOP`) and restartable like a real instance,
//! and a round-robin balancer in front of them.

use std::{net::SocketAddr, process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use super::{
    Engine, TIMEOUT, TestDb, TestServer,
    net::{Balancer, Proxy},
    services::RedisServer,
    signal,
};

/// Heartbeat and timeout of test instances: a dead instance's runs are reaped within about
/// `INSTANCE_TIMEOUT` plus a beat.
pub const INSTANCE_HEARTBEAT: Duration = Duration::from_millis(200);
pub const INSTANCE_TIMEOUT: Duration = Duration::from_secs(2);

/// One `wadi` process.
pub struct Instance {
    pub name: String,
    pub server: TestServer,
    env: Vec<(String, String)>,
    child: Child,
}

impl Instance {
    /// Starts `wadi` with `env` on a free port and waits until it serves.
    pub async fn start(name: &str, env: &[(String, String)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wadi"));
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("WADI_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn,wadi_server=info")
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(TIMEOUT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                eprintln!("[{name}] {line}");
                if let Some(url) = line.strip_prefix("WADI is running at http://") {
                    return url.trim_end_matches('/').parse::<SocketAddr>().unwrap();
                }
            }
            panic!("{name} exited before printing its address");
        })
        .await
        .unwrap_or_else(|_| panic!("{name} did not start"));
        // Its log goes to the test's output (shown when a test fails), and never fills the pipe.
        let prefix = name.to_owned();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[{prefix}] {line}");
            }
        });
        let server = TestServer::external(addr);
        // The listener is bound before the state is ready; this waits until it serves.
        let health = tokio::time::timeout(TIMEOUT, server.http.get(server.url("/healthz")).send())
            .await
            .expect("the instance did not serve in time")
            .expect("the instance did not serve");
        assert_eq!(health.status(), 200);
        Self {
            name: name.to_owned(),
            server,
            env: env.to_vec(),
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }

    /// `kill -9`: a crash.
    pub async fn kill(&mut self) {
        self.child.kill().await.unwrap();
    }

    /// `SIGSTOP` / `SIGCONT`: a process that stalls and wakes up.
    pub async fn pause(&self) {
        signal(self.pid(), "-STOP").await;
    }

    pub async fn resume(&self) {
        signal(self.pid(), "-CONT").await;
    }

    /// `SIGTERM` and wait for the graceful shutdown to finish.
    pub async fn stop(&mut self) {
        signal(self.pid(), "-TERM").await;
        let status = tokio::time::timeout(TIMEOUT * 2, self.child.wait())
            .await
            .expect("the instance did not stop in time")
            .unwrap();
        assert!(status.success(), "{} exited with {status}", self.name);
    }

    /// A new process with the same configuration (and a new port).
    pub async fn restart(&mut self) {
        let _ = self.child.kill().await;
        *self = Self::start(&self.name.clone(), &self.env).await;
    }

    /// `/readyz`'s JSON.
    pub async fn ready(&self) -> serde_json::Value {
        self.server.get_json("/readyz").await
    }
}

/// Instances on one fresh Postgres database and one Redis of their own, behind a balancer.
pub struct Cluster {
    pub db: TestDb,
    pub redis: Option<RedisServer>,
    /// Between the first instance and Redis, when asked for.
    pub redis_proxy: Option<Proxy>,
    pub instances: Vec<Instance>,
    pub balancer: Balancer,
}

/// How a test cluster is made.
pub struct Options<'a> {
    pub count: usize,
    pub redis: bool,
    /// Put the first instance's Redis connection through a proxy the test can cut.
    pub proxy_first_to_redis: bool,
    pub model_url: &'a str,
    pub env: &'a [(&'a str, &'a str)],
}

impl Cluster {
    /// Instances named A, B, C… on a fresh database on the Postgres at `admin_url`.
    pub async fn start(admin_url: String, options: Options<'_>) -> Self {
        let Options {
            count,
            redis: with_redis,
            proxy_first_to_redis,
            model_url,
            env,
        } = options;
        let db = TestDb::create(Engine::Postgres(admin_url)).await;
        let redis = if with_redis {
            Some(RedisServer::start().await)
        } else {
            None
        };
        let redis_proxy = match (&redis, proxy_first_to_redis) {
            (Some(redis), true) => {
                Some(Proxy::start(SocketAddr::from(([127, 0, 0, 1], redis.port))).await)
            }
            _ => None,
        };
        let mut settings: Vec<(String, String)> = vec![
            (
                "DATABASE_URL".into(),
                db.config().database_url.unwrap().expose().to_owned(),
            ),
            ("OPENAI_BASE_URL".into(), model_url.into()),
            ("OPENAI_API_KEY".into(), "sk-test".into()),
            ("WADI_MODEL".into(), "fake-model".into()),
            (
                "WADI_INSTANCE_HEARTBEAT".into(),
                format!("{}ms", INSTANCE_HEARTBEAT.as_millis()),
            ),
            (
                "WADI_INSTANCE_TIMEOUT".into(),
                format!("{}ms", INSTANCE_TIMEOUT.as_millis()),
            ),
            ("WADI_FLUSH_INTERVAL".into(), "100ms".into()),
            ("WADI_MESSAGE_RATE_BURST".into(), "1000".into()),
        ];
        if let Some(redis) = &redis {
            settings.push(("REDIS_URL".into(), redis.url()));
        }
        for (key, value) in env {
            settings.retain(|(k, _)| k != key);
            settings.push(((*key).into(), (*value).into()));
        }
        let mut instances = Vec::with_capacity(count);
        for index in 0..count {
            let name = char::from(b'A' + index as u8).to_string();
            let dir = db.data_dir.path().join(&name);
            let mut own = settings.clone();
            own.push(("WADI_DATA_DIR".into(), dir.display().to_string()));
            if let (0, Some(proxy)) = (index, &redis_proxy) {
                own.retain(|(key, _)| key != "REDIS_URL");
                own.push(("REDIS_URL".into(), format!("redis://{}", proxy.addr)));
            }
            // One after the other: the first creates the schema and the signing key.
            instances.push(Instance::start(&name, &own).await);
        }
        let balancer = Balancer::start(instances.iter().map(|i| i.server.addr).collect()).await;
        Self {
            db,
            redis,
            redis_proxy,
            instances,
            balancer,
        }
    }

    /// The `index`th instance's server.
    pub fn at(&self, index: usize) -> &TestServer {
        &self.instances[index].server
    }

    pub async fn stop(mut self) {
        for instance in &mut self.instances {
            let _ = instance.child.kill().await;
        }
        self.db.drop_database().await;
    }
}
