//! The server under test: a `wadi` this harness starts (with the fake upstream as its model and
//! the limits a benchmark needs raised), or any protocol v1 server already running at a URL.

use std::{
    ffi::OsString,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStdout, Command},
};

use crate::{stamp::now_micros, upstream::Shape};

/// How long a started process may take to print its address (the server runs migrations and
/// creates its signing key first).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the server may take to shut down gracefully before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Server settings for benchmarks: many users are signed up from one address, each user holds
/// many sockets, creates many conversations and starts many runs at once, and the total cap
/// sits just under the process's 20 000 open files. The log level is the server's default, as
/// its users run it (an `info` span kept open per socket once cost 1 KiB per idle socket that
/// a `warn` level hid).
const SERVER_ENV: [(&str, &str); 12] = [
    ("WADI_ADDR", "127.0.0.1:0"),
    ("WADI_MAX_CONNECTIONS_PER_ADDRESS", "1000000"),
    ("WADI_MAX_PENDING_CONNECTIONS", "1000000"),
    ("WADI_MAX_PENDING_PER_ADDRESS", "1000000"),
    ("WADI_AUTH_RATE_BURST", "1000000"),
    ("WADI_LOGIN_RATE_BURST", "1000000"),
    ("WADI_CONVERSATION_RATE_BURST", "1000000"),
    ("WADI_MESSAGE_RATE_BURST", "1000000"),
    ("WADI_MAX_CONNECTIONS_PER_USER", "1000000"),
    ("WADI_MAX_CONNECTIONS", "19900"),
    ("OPENAI_API_KEY", "bench"),
    ("WADI_MODEL", "bench"),
];

/// Where the server under test comes from.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Started instances: 1, or 2 sharing a Postgres database and a Redis (cluster mode).
    pub instances: usize,
    /// Cluster mode: the Postgres to create the shared database on (an admin URL).
    pub postgres: Option<String>,
    /// A running server (`http://host:port`); when unset, one is started.
    pub url: Option<String>,
    /// Its process id, for memory and CPU figures.
    pub server_pid: Option<u32>,
    /// The `wadi` binary to start (default: next to this program).
    pub server_bin: Option<PathBuf>,
    /// Extra `KEY=VALUE` settings for a started server.
    pub server_env: Vec<String>,
    /// Start the reference server (`node <this script>`, `bench/reference/`) instead of `wadi`.
    pub reference: Option<PathBuf>,
    /// A command the server runs under (`valgrind --tool=callgrind ...`), its arguments first.
    pub wrapper: Vec<String>,
}

/// A started server and its upstream, stopped by [`Target::stop`] (or killed on drop).
struct Owned {
    server: Child,
    upstream: Child,
    data_dir: PathBuf,
    /// Cluster mode: the second instance, the Redis, and the database (admin URL, name).
    second: Option<Child>,
    redis: Option<Child>,
    database: Option<(String, String)>,
}

/// How the server under test starts: `wadi`, or the reference server under `node`.
struct Launcher {
    /// The binary, or the reference's script.
    path: PathBuf,
    reference: bool,
    /// What it prints, followed by its URL, once it listens.
    ready_line: &'static str,
    /// What it runs under, if anything.
    wrapper: Vec<String>,
}

impl Launcher {
    fn of(options: &Options) -> Result<Self> {
        let (path, reference, ready_line) = match (&options.reference, &options.server_bin) {
            (Some(script), _) => (script.clone(), true, "reference is running at "),
            (None, bin) => (
                match bin {
                    Some(bin) => bin.clone(),
                    None => std::env::current_exe()?
                        .parent()
                        .context("this program has no directory")?
                        .join("wadi"),
                },
                false,
                "WADI is running at ",
            ),
        };
        let launcher = Self {
            path,
            reference,
            ready_line,
            wrapper: options.wrapper.clone(),
        };
        if !launcher.path.exists() {
            bail!(
                "no server binary at {} (build it with `cargo build --release -p wadi-server`, \
                 or pass --server-bin or --url)",
                launcher.path.display()
            );
        }
        Ok(launcher)
    }

    fn command(&self) -> Command {
        // What runs, in order: the wrapper, `node` for the reference, the binary or script.
        let mut argv: Vec<OsString> = self.wrapper.iter().map(OsString::from).collect();
        if self.reference {
            argv.push("node".into());
        }
        argv.push(self.path.clone().into());
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]);
        if self.reference {
            command.env("PORT", "0");
        }
        command
    }
}

/// Another instance of the server under test (cluster mode).
#[derive(Debug, Clone)]
pub struct Instance {
    pub http_base: String,
    pub ws_base: String,
    pub addr: SocketAddr,
    pub pid: Option<u32>,
}

pub struct Target {
    /// `http://host:port`
    pub http_base: String,
    /// `ws://host:port`
    pub ws_base: String,
    pub addr: SocketAddr,
    pub server_pid: Option<u32>,
    pub upstream_pid: Option<u32>,
    /// Cluster mode: the second instance (watchers connect here, runs are driven by the first).
    pub second: Option<Instance>,
    /// Cluster mode: the Redis both instances share.
    pub redis_pid: Option<u32>,
    /// What is being measured, for reports: the binary or the URL.
    pub description: String,
    owned: Option<Owned>,
}

impl Target {
    pub async fn start(options: &Options, out_dir: &Path) -> Result<Self> {
        match &options.url {
            Some(url) => Self::attach(url, options.server_pid).await,
            None => Self::launch(options, out_dir).await,
        }
    }

    async fn attach(url: &str, server_pid: Option<u32>) -> Result<Self> {
        let url = url.trim_end_matches('/');
        let Some(host) = url.strip_prefix("http://") else {
            bail!("--url must be http://host:port (the generator speaks plain ws://)");
        };
        let addr = tokio::net::lookup_host(host)
            .await
            .with_context(|| format!("cannot resolve {host}"))?
            .find(SocketAddr::is_ipv4)
            .with_context(|| format!("{host} has no IPv4 address"))?;
        Ok(Self {
            http_base: url.to_owned(),
            ws_base: format!("ws://{host}"),
            addr,
            server_pid,
            upstream_pid: None,
            second: None,
            redis_pid: None,
            description: url.to_owned(),
            owned: None,
        })
    }

    /// Every server process's pid (one, or both instances).
    pub fn server_pids(&self) -> Vec<u32> {
        self.server_pid
            .into_iter()
            .chain(self.second.as_ref().and_then(|second| second.pid))
            .collect()
    }

    async fn launch(options: &Options, out_dir: &Path) -> Result<Self> {
        if options.reference.is_some() && options.instances > 1 {
            bail!("the reference server runs as one instance");
        }
        let launcher = Launcher::of(options)?;
        let run_dir = out_dir.join("runs").join(now_micros().to_string());
        let data_dir = run_dir.join("data");
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("cannot create {}", data_dir.display()))?;

        let mut upstream = Command::new(std::env::current_exe()?);
        let defaults = Shape {
            tokens: 20,
            rate: 20.0,
        };
        upstream
            .args(["upstream", "--addr", "127.0.0.1:0"])
            .args(["--tokens", &defaults.tokens.to_string()])
            .args(["--rate", &defaults.rate.to_string()]);
        let (upstream, upstream_line) = spawn_until(
            upstream,
            &run_dir.join("upstream.log"),
            "upstream listening on ",
        )
        .await?;
        let upstream_url = upstream_line.trim().to_owned();

        let cluster = if options.instances > 1 {
            Some(start_cluster(options, &run_dir).await?)
        } else {
            None
        };
        let mut shared_env: Vec<(String, String)> = Vec::new();
        if let Some(cluster) = &cluster {
            shared_env.push(("DATABASE_URL".into(), cluster.database_url.clone()));
            shared_env.push(("REDIS_URL".into(), cluster.redis_url.clone()));
        }
        for setting in &options.server_env {
            let Some((key, value)) = setting.split_once('=') else {
                bail!("--server-env takes KEY=VALUE, not {setting:?}");
            };
            shared_env.push((key.to_owned(), value.to_owned()));
        }
        let server_command = |name: &str| {
            let mut server = launcher.command();
            server
                .envs(SERVER_ENV)
                .env("WADI_DATA_DIR", data_dir.join(name))
                .env("OPENAI_BASE_URL", &upstream_url)
                .envs(shared_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            server
        };
        let (server, line) = spawn_until(
            server_command("a"),
            &run_dir.join("server.log"),
            launcher.ready_line,
        )
        .await?;
        let http_base = line.trim().trim_end_matches('/').to_owned();
        let mut target = Self::attach(&http_base, server.id()).await?;
        target.ready().await?;
        let mut second = None;
        if cluster.is_some() {
            let (child, line) = spawn_until(
                server_command("b"),
                &run_dir.join("server-b.log"),
                "WADI is running at ",
            )
            .await?;
            let base = line.trim().trim_end_matches('/').to_owned();
            let other = Self::attach(&base, child.id()).await?;
            other.ready().await?;
            target.second = Some(Instance {
                http_base: other.http_base,
                ws_base: other.ws_base,
                addr: other.addr,
                pid: child.id(),
            });
            second = Some(child);
        }
        target.upstream_pid = upstream.id();
        target.description = launcher.path.display().to_string();
        let (redis, database) = match cluster {
            Some(cluster) => {
                target.redis_pid = cluster.redis.id();
                (Some(cluster.redis), Some(cluster.database))
            }
            None => (None, None),
        };
        target.owned = Some(Owned {
            server,
            upstream,
            data_dir,
            second,
            redis,
            database,
        });
        Ok(target)
    }

    /// Waits until the server answers `/readyz` (its listener is bound before its state is
    /// ready; the request simply waits in the accept queue).
    async fn ready(&self) -> Result<()> {
        let response = reqwest::Client::new()
            .get(format!("{}/readyz", self.http_base))
            .timeout(START_TIMEOUT)
            .send()
            .await
            .context("the server did not answer /readyz")?;
        if !response.status().is_success() {
            bail!("the server is not ready: {}", response.status());
        }
        Ok(())
    }

    /// The number of open sockets the server reports in `/metrics`, if it has that metric.
    pub async fn open_sockets(&self) -> Option<u64> {
        let text = reqwest::get(format!("{}/metrics", self.http_base))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let counts: Vec<u64> = text
            .lines()
            .filter(|line| line.starts_with("wadi_ws_connections{"))
            .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
            .collect();
        (!counts.is_empty()).then(|| counts.iter().sum())
    }

    /// Stops a started server gracefully (SIGTERM) and its upstream, and removes its data.
    pub async fn stop(self) -> Result<()> {
        let Some(mut owned) = self.owned else {
            return Ok(());
        };
        stop_gracefully(&mut owned.server).await?;
        if let Some(second) = &mut owned.second {
            stop_gracefully(second).await?;
        }
        owned.upstream.kill().await?;
        if let Some(redis) = &mut owned.redis {
            redis.kill().await?;
        }
        if let Some((admin, name)) = &owned.database {
            psql(
                admin,
                &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
            )
            .await?;
        }
        std::fs::remove_dir_all(&owned.data_dir)
            .with_context(|| format!("cannot remove {}", owned.data_dir.display()))?;
        Ok(())
    }
}

/// SIGTERM, then SIGKILL if it takes longer than the stop timeout.
async fn stop_gracefully(child: &mut Child) -> Result<()> {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    if tokio::time::timeout(STOP_TIMEOUT, child.wait())
        .await
        .is_err()
    {
        child.kill().await?;
    }
    Ok(())
}

/// What two instances share.
struct Cluster {
    database_url: String,
    database: (String, String),
    redis_url: String,
    redis: Child,
}

/// A fresh database on the Postgres at `--postgres`, and a `redis-server` of our own (so its
/// CPU can be measured), on a free port, keeping nothing on disk.
async fn start_cluster(options: &Options, run_dir: &Path) -> Result<Cluster> {
    let admin = options
        .postgres
        .clone()
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let name = format!("wadi_bench_{}", now_micros());
    psql(&admin, &format!("CREATE DATABASE \"{name}\"")).await?;
    let (base, query) = admin.split_once('?').unwrap_or((&admin, ""));
    let authority = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority..].find('/') {
        Some(slash) => &base[..authority + slash],
        None => base,
    };
    let database_url = if query.is_empty() {
        format!("{base}/{name}")
    } else {
        format!("{base}/{name}?{query}")
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut redis = Command::new("redis-server");
    redis
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(run_dir);
    let (redis, _) = spawn_until_contains(
        redis,
        &run_dir.join("redis.log"),
        "Ready to accept connections",
    )
    .await
    .context("cannot start redis-server (Debian's redis-server package)")?;
    Ok(Cluster {
        database_url,
        database: (admin, name),
        redis_url: format!("redis://127.0.0.1:{port}"),
        redis,
    })
}

async fn psql(url: &str, sql: &str) -> Result<()> {
    let status = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .status()
        .await
        .context("cannot run psql (Debian's postgresql-client)")?;
    if !status.success() {
        bail!("psql failed: {sql}");
    }
    Ok(())
}

/// Like [`spawn_until`], for a process whose ready line has `marker` anywhere in it.
async fn spawn_until_contains(
    command: Command,
    log: &Path,
    marker: &str,
) -> Result<(Child, String)> {
    spawn_matching(command, log, |line| {
        line.contains(marker).then(|| line.to_owned())
    })
    .await
}

/// Starts `command` with its output going to `log`, and returns once it prints a line starting
/// with `prefix` (with the rest of that line). The rest of its output keeps going to the log.
async fn spawn_until(command: Command, log: &Path, prefix: &str) -> Result<(Child, String)> {
    spawn_matching(command, log, |line| {
        line.strip_prefix(prefix).map(str::to_owned)
    })
    .await
}

async fn spawn_matching(
    mut command: Command,
    log: &Path,
    matches: impl Fn(&str) -> Option<String>,
) -> Result<(Child, String)> {
    let stderr =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(stderr)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {:?}", command.as_std().get_program()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let wait = async {
        while let Some(line) = lines.next_line().await? {
            if let Some(found) = matches(&line) {
                return anyhow::Ok(found);
            }
        }
        bail!(
            "{:?} exited before it was ready (see {})",
            command.as_std().get_program(),
            log.display()
        )
    };
    let found = tokio::time::timeout(START_TIMEOUT, wait)
        .await
        .context("timed out waiting for a started process")??;
    tokio::spawn(drain(lines, log.to_owned()));
    Ok((child, found))
}

/// Appends a child's remaining stdout to its log; a full pipe would stall the child.
async fn drain(mut lines: tokio::io::Lines<BufReader<ChildStdout>>, log: PathBuf) {
    let Ok(mut file) = tokio::fs::OpenOptions::new().append(true).open(&log).await else {
        while let Ok(Some(_)) = lines.next_line().await {}
        return;
    };
    while let Ok(Some(line)) = lines.next_line().await {
        let _ = file.write_all(line.as_bytes()).await;
        let _ = file.write_all(b"\n").await;
    }
}
