//! `idle`: N authenticated chat sockets held open. Measures the server's RSS before and at N,
//! the growth per connection, and how fast sockets connect and authenticate. The sockets are
//! held by worker processes (see [`super::worker`]), each under the per-process file limit.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin, ChildStdout, Command},
};

use super::{
    Bench, Outcome, verdict,
    worker::{Done, Plan, Ready},
};
use crate::{procfs, report::mib, setup::Setup, stats::Errors};

/// Issue 15's target: at most this much server RSS per idle connection (round 1's was 8 KiB).
const TARGET_KIB_PER_CONNECTION: f64 = 5.0;
/// How long a worker may take to open all its sockets.
const OPEN_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the server may take to notice that the workers' sockets are gone.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Connections to hold.
    #[arg(long, default_value_t = 19_000)]
    pub connections: usize,
    /// Connections per generator process (each process may open at most 20 000 files).
    #[arg(long, default_value_t = 5_000)]
    pub per_process: usize,
    /// Connects in flight per generator process.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Users to sign up; the connections are spread over their conversations.
    #[arg(long, default_value_t = 4)]
    pub users: usize,
    #[arg(long, default_value_t = 100)]
    pub conversations: usize,
    /// How long to hold the connections before measuring again (memory settles).
    #[arg(long, value_parser = parse_seconds, default_value = "5")]
    pub hold: Duration,
}

pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if seconds.is_finite() && seconds >= 0.0 {
        Ok(Duration::from_secs_f64(seconds))
    } else {
        Err(format!("{text:?} is not a number of seconds"))
    }
}

struct Worker {
    child: Child,
    /// Closing it tells the worker to let go of its sockets.
    stdin: Option<ChildStdin>,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl Worker {
    async fn spawn(plan: &Plan) -> Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("idle-worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a worker process")?;
        let mut stdin = child.stdin.take().context("no worker stdin")?;
        let stdout = child.stdout.take().context("no worker stdout")?;
        let mut line = serde_json::to_string(plan)?;
        line.push('\n');
        stdin.write_all(line.as_bytes()).await?;
        Ok(Self {
            child,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout).lines(),
        })
    }

    async fn line<T: serde::de::DeserializeOwned>(&mut self) -> Result<T> {
        let line = self
            .stdout
            .next_line()
            .await?
            .context("a worker exited early")?;
        serde_json::from_str(&line).with_context(|| format!("bad worker line {line:?}"))
    }

    /// Closes its stdin: the worker reports and exits, dropping its sockets.
    async fn finish(mut self) -> Result<Done> {
        drop(self.stdin.take());
        let done = self.line().await?;
        self.child.wait().await?;
        Ok(done)
    }
}

pub async fn run(bench: &Bench, args: &Args) -> Result<Outcome> {
    let target = &bench.target;
    let setup = Setup::new(&target.http_base)?;
    let tokens = setup.tokens(bench.token.as_deref(), args.users).await?;
    let seats = setup.seats(&tokens, args.conversations).await?;
    let seats: Vec<(String, String)> = seats
        .into_iter()
        .map(|seat| (seat.token, seat.conversation))
        .collect();
    let before = procfs::usage_of(target.server_pid)?;

    let processes = args.connections.div_ceil(args.per_process.max(1)).max(1);
    let started = Instant::now();
    let mut workers = Vec::with_capacity(processes);
    for part in 0..processes {
        let offset = part * args.per_process;
        let count = args.per_process.min(args.connections - offset);
        let sources = bench.sources.split(processes as u32, part as u32);
        let plan = Plan {
            server: target.addr,
            ws_base: target.ws_base.clone(),
            seats: seats.clone(),
            offset,
            count,
            concurrency: args.concurrency,
            sources_first: sources.first,
            sources_count: sources.count,
        };
        workers.push(Worker::spawn(&plan).await?);
    }
    let mut connected = 0;
    let mut errors = Errors::default();
    for worker in &mut workers {
        let ready: Ready = tokio::time::timeout(OPEN_TIMEOUT, worker.line())
            .await
            .context("a worker took too long to connect")??;
        connected += ready.connected;
        errors.merge(ready.errors);
    }
    let opening = started.elapsed().as_secs_f64();
    let at_n = procfs::usage_of(target.server_pid)?;
    let server_count = target.open_sockets().await;
    // Pacing, not synchronisation: memory is read again once the server has been idle a while.
    tokio::time::sleep(args.hold).await;
    let held = procfs::usage_of(target.server_pid)?;

    let mut dropped = 0;
    for worker in workers {
        dropped += worker.finish().await?.dropped;
    }
    let closed_at = Instant::now();
    while target.open_sockets().await.unwrap_or(0) > 0 && closed_at.elapsed() < CLOSE_TIMEOUT {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = procfs::usage_of(target.server_pid)?;

    if connected == 0 {
        bail!("no connection was opened: {errors:?}");
    }
    let rate = connected as f64 / opening;
    let per_connection = match (before, held) {
        (Some(before), Some(held)) => {
            Some((held.rss_kib as f64 - before.rss_kib as f64) / connected as f64)
        }
        _ => None,
    };
    let target_met = errors.total == 0
        && connected as usize == args.connections
        && per_connection.is_some_and(|kib| kib <= TARGET_KIB_PER_CONNECTION);
    let correct = errors.total == 0 && dropped == 0;
    let memory = match (before, held, per_connection) {
        (Some(before), Some(held), Some(kib)) => format!(
            "server RSS {} -> {} ({kib:.2} KiB/conn, target <= {TARGET_KIB_PER_CONNECTION} KiB: {})",
            mib(before.rss_kib),
            mib(held.rss_kib),
            verdict(target_met)
        ),
        _ => "server RSS unknown (no --server-pid)".to_owned(),
    };
    let summary = format!(
        "idle: {connected}/{} connections held by {processes} processes, {memory}, \
         connect+auth {rate:.0}/s, errors {}, dropped {dropped}",
        args.connections, errors.total
    );
    let result = json!({
        "args": {
            "connections": args.connections,
            "per_process": args.per_process,
            "concurrency": args.concurrency,
            "users": args.users,
            "conversations": args.conversations,
            "hold_seconds": args.hold.as_secs_f64(),
        },
        "processes": processes,
        "connected": connected,
        "server_reported_sockets": server_count,
        "connect_auth_seconds": opening,
        "connect_auth_per_second": rate,
        "server_before": before,
        "server_at_n": at_n,
        "server_after_hold": held,
        "server_after_close": after,
        "rss_growth_kib_per_connection": per_connection,
        "target_kib_per_connection": TARGET_KIB_PER_CONNECTION,
        "errors": errors,
        "dropped_while_held": dropped,
        "target_met": target_met,
    });
    Ok(Outcome {
        summary,
        result,
        correct,
        target_met,
    })
}
