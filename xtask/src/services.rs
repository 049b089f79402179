//! The services the tests need besides Rust: Redis (the cluster tests start their own
//! `redis-server`s; this installs Debian's package when missing) and a Postgres for the store
//! and cluster tests (the machine's own on 127.0.0.1:5432 when it answers, else a private one
//! started here from Debian's package, for the length of the run).

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    time::Duration,
};

use crate::tools::{Output, apt_install, cmd, running_as_root, status};

/// A Postgres the tests use; a private one is stopped when this is dropped.
pub struct Postgres {
    pub url: String,
    private: Option<Private>,
}

struct Private {
    pg_ctl: PathBuf,
    dir: PathBuf,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(private) = &self.private {
            let dir = private.dir.display().to_string();
            let pg_ctl = private.pg_ctl.display().to_string();
            let _ = status(&mut as_postgres(
                &pg_ctl,
                &["-D", &dir, "-m", "fast", "stop"],
            ));
            let _ = std::fs::remove_dir_all(&private.dir);
        }
    }
}

/// `WADI_TEST_POSTGRES_URL` if set; else the Postgres on 127.0.0.1:5432 if one answers; else a
/// private one started now. Outside CI a Postgres that cannot be had is not an error: the
/// Postgres tests then show as skipped.
pub fn postgres_for_tests() -> Result<Option<Postgres>, String> {
    if let Ok(url) = std::env::var("WADI_TEST_POSTGRES_URL") {
        return Ok(Some(Postgres { url, private: None }));
    }
    if local_answers() {
        println!("xtask: Postgres tests use the server on 127.0.0.1:5432");
        return Ok(Some(Postgres {
            url: "postgres://postgres@127.0.0.1:5432/postgres".to_owned(),
            private: None,
        }));
    }
    match start_private() {
        Ok(postgres) => Ok(Some(postgres)),
        Err(error) if !in_ci() => {
            println!("xtask: no Postgres ({error}); the Postgres tests will show as skipped");
            Ok(None)
        }
        Err(error) => Err(format!("CI=true but no Postgres could be started: {error}")),
    }
}

/// True when the tests will need Debian's `postgresql`: none is configured, none answers and none
/// is installed. `cargo xtask test` then adds it to its one background `apt-get`.
pub fn postgres_package_needed() -> bool {
    std::env::var_os("WADI_TEST_POSTGRES_URL").is_none()
        && !local_answers()
        && postgres_bin().is_none()
}

fn local_answers() -> bool {
    let local = SocketAddr::from(([127, 0, 0, 1], 5432));
    TcpStream::connect_timeout(&local, Duration::from_secs(2)).is_ok()
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true" || value == "1")
}

/// initdb + pg_ctl from Debian's `postgresql` package (installed when missing), in a temporary
/// directory, on a free port, trusting local connections, without fsync (test data only).
fn start_private() -> Result<Postgres, String> {
    let bin = match postgres_bin() {
        Some(bin) => bin,
        None => {
            apt_install(&["postgresql"], &Output::Terminal)?;
            postgres_bin().ok_or("the postgresql package has no initdb")?
        }
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let dir = std::env::temp_dir().join(format!("wadi-test-postgres-{port}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {dir:?}: {e}"))?;
    if running_as_root() {
        // Postgres refuses to run as root: its files belong to Debian's `postgres` user.
        status(&mut cmd(
            "chown",
            &["postgres:postgres", &dir.display().to_string()],
        ))?;
    }
    let data = dir.join("data");
    let initdb = bin.join("initdb").display().to_string();
    status(&mut as_postgres(
        &initdb,
        &[
            "-D",
            &data.display().to_string(),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
        ],
    ))?;
    let pg_ctl = bin.join("pg_ctl");
    let options = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300",
        dir.display()
    );
    status(&mut as_postgres(
        &pg_ctl.display().to_string(),
        &[
            "-D",
            &data.display().to_string(),
            "-o",
            &options,
            "-l",
            &dir.join("log").display().to_string(),
            "-w",
            "start",
        ],
    ))?;
    println!("xtask: Postgres tests use a private server on 127.0.0.1:{port}");
    Ok(Postgres {
        url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        private: Some(Private { pg_ctl, dir: data }),
    })
}

/// The newest `/usr/lib/postgresql/<version>/bin` with an initdb.
fn postgres_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// A Postgres tool, run as the `postgres` user when we are root.
fn as_postgres(program: &str, args: &[&str]) -> std::process::Command {
    if running_as_root() {
        let mut command = cmd("runuser", &["-u", "postgres", "--", program]);
        command.args(args);
        command
    } else {
        cmd(program, args)
    }
}
