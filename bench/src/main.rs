//! `wadi-bench`: WADI's benchmark harness. A load generator speaking protocol v1 to any server
//! URL, a fake OpenAI-compatible upstream that stamps each token with its send time, and the
//! scenarios of `docs/performance.md`: `idle`, `stream`, `churn`, and `smoke` (all three, for
//! seconds, so the harness keeps working). Usually run through `cargo xtask bench`.

mod client;
mod plot;
mod procfs;
mod report;
mod scenario;
mod setup;
mod stamp;
mod stats;
mod target;
mod upstream;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::{
    client::Sources,
    scenario::{Bench, Outcome, churn, compare, idle, instructions, stream},
    target::Target,
};

#[derive(Parser)]
#[command(
    name = "wadi-bench",
    about = "WADI's load generator and benchmark scenarios"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,

    /// Benchmark a server already running at this URL (`http://host:port`) instead of starting
    /// one. Point it at a fake upstream (`wadi-bench upstream`) for the stream scenario.
    #[arg(long, global = true)]
    url: Option<String>,

    /// The process id of the server at --url, for its memory and CPU figures.
    #[arg(long, global = true)]
    server_pid: Option<u32>,

    /// Start two instances sharing a Postgres database and a Redis (cluster mode): runs are
    /// driven by the first, and the stream scenario's watchers connect to the second.
    #[arg(long, global = true, default_value_t = 1)]
    instances: usize,

    /// Cluster mode: the Postgres (admin URL) to create the shared database on.
    #[arg(long, global = true)]
    postgres: Option<String>,

    /// The `wadi` binary to start (default: the one next to this program).
    #[arg(long, global = true)]
    server_bin: Option<PathBuf>,

    /// Extra KEY=VALUE settings for a started server (repeatable), e.g.
    /// `--server-env WADI_COALESCE_WINDOW=5ms`.
    #[arg(long = "server-env", global = true)]
    server_env: Vec<String>,

    /// Use this access token instead of signing up users (a server with other auth).
    #[arg(long, global = true)]
    token: Option<String>,

    /// Loopback source addresses to spread client sockets over.
    #[arg(long, global = true, default_value_t = 64)]
    sources: u32,

    /// Also fail (exit code 1) when a scenario misses the target.
    #[arg(long, global = true)]
    check_targets: bool,

    /// Where JSON reports (and the logs of started processes) go.
    #[arg(long, global = true, default_value = "target/bench")]
    out_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Hold N authenticated idle connections; server RSS per connection, connect+auth rate.
    Idle(idle::Args),
    /// R concurrent runs with W watchers each; delivered chunks/s, CPU per chunk, latency.
    Stream(stream::Args),
    /// Open, authenticate, ping and close connections continuously; RSS drift and errors.
    Churn(churn::Args),
    /// Seconds-long versions of all three scenarios: checks the harness, not the targets.
    Smoke,
    /// Stream and idle against WADI and against the reference server (`bench/reference/`),
    /// one after the other, and the ratios.
    Compare(compare::Args),
    /// The server's user-space instructions per delivered chunk, counted by callgrind (short
    /// against long answers at low load): repeatable, where CPU time is not.
    Instructions(instructions::Args),
    /// Serve the fake OpenAI-compatible upstream (prints its base URL).
    Upstream {
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: SocketAddr,
        /// Tokens per answer, unless the prompt says `bench tokens=N`.
        #[arg(long, default_value_t = 20)]
        tokens: u32,
        /// Tokens per second, unless the prompt says `bench rate=R`.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
    },
    /// Internal: a generator process holding idle connections for `idle`.
    #[command(hide = true)]
    IdleWorker,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("wadi-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command; `Ok(false)` when the harness saw something wrong (failed connections,
/// missing chunks). A missed performance target is reported, not an error.
async fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Upstream { addr, tokens, rate } => {
            upstream::serve(addr, upstream::Shape { tokens, rate }).await?;
            return Ok(true);
        }
        Command::IdleWorker => {
            scenario::worker::run().await?;
            return Ok(true);
        }
        _ => {}
    }
    let options = target::Options {
        instances: cli.instances,
        postgres: cli.postgres.clone(),
        url: cli.url.clone(),
        server_pid: cli.server_pid,
        server_bin: cli.server_bin.clone(),
        server_env: cli.server_env.clone(),
        reference: None,
        wrapper: Vec::new(),
    };
    // A different first address each run: sockets closed by the previous run still hold their
    // ports for a minute.
    let sources = Sources {
        first: (stamp::now_micros() / 1000 % 10_000_000) as u32,
        count: cli.sources.max(1),
    };
    // The scenarios that start their own servers, each reporting in a folder of its own.
    if let Command::Compare(args) = &cli.command {
        let out_dir = cli.out_dir.join("compare");
        let outcome = compare::run(&options, &out_dir, sources, args).await?;
        return own_report(&out_dir, "compare", &outcome);
    }
    if let Command::Instructions(args) = &cli.command {
        let out_dir = cli.out_dir.join("instructions");
        let outcome = instructions::run(&options, &out_dir, sources, args).await?;
        return own_report(&out_dir, "instructions", &outcome);
    }
    let target = Target::start(&options, &cli.out_dir).await?;
    let bench = Bench {
        target,
        out_dir: cli.out_dir.clone(),
        token: cli.token.clone(),
        sources,
    };
    let result = scenarios(&bench, cli.command, cli.check_targets).await;
    bench.target.stop().await?;
    result
}

async fn scenarios(bench: &Bench, command: Command, check_targets: bool) -> Result<bool> {
    let mut correct = true;
    match command {
        Command::Idle(args) => {
            correct &= finish(bench, "idle", idle::run(bench, &args).await?, check_targets)?
        }
        Command::Stream(args) => {
            correct &= finish(
                bench,
                "stream",
                stream::run(bench, &args).await?,
                check_targets,
            )?;
        }
        Command::Churn(args) => {
            correct &= finish(
                bench,
                "churn",
                churn::run(bench, &args).await?,
                check_targets,
            )?
        }
        Command::Smoke => {
            let idle = idle::run(bench, &smoke_idle()).await?;
            correct &= finish(bench, "smoke-idle", idle, false)?;
            let stream = stream::run(bench, &smoke_stream()).await?;
            correct &= finish(bench, "smoke-stream", stream, false)?;
            let churn = churn::run(bench, &smoke_churn()).await?;
            correct &= finish(bench, "smoke-churn", churn, false)?;
        }
        Command::Upstream { .. }
        | Command::IdleWorker
        | Command::Compare(_)
        | Command::Instructions(_) => {}
    }
    Ok(correct)
}

/// Prints the summary line and writes the report; false if the harness saw failures (or, with
/// `check_targets`, the target was missed).
/// Prints a scenario's summary and writes its report to `<out_dir>/<name>.json`; whether the
/// harness saw nothing wrong.
fn own_report(out_dir: &std::path::Path, name: &str, outcome: &Outcome) -> Result<bool> {
    println!("{}", outcome.summary);
    let path = out_dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&outcome.result)?)?;
    println!("  report: {}", path.display());
    Ok(outcome.correct)
}

fn finish(bench: &Bench, name: &str, outcome: Outcome, check_targets: bool) -> Result<bool> {
    println!("{}", outcome.summary);
    let path = report::write(&bench.out_dir, name, &bench.target, outcome.result)?;
    println!("  report: {}", path.display());
    if !outcome.correct {
        eprintln!("wadi-bench: {name}: the harness saw failures (see the report)");
    }
    Ok(outcome.correct && (outcome.target_met || !check_targets))
}

/// Two worker processes, so the multi-process path is exercised too.
fn smoke_idle() -> idle::Args {
    idle::Args {
        connections: 200,
        per_process: 100,
        concurrency: 32,
        users: 2,
        conversations: 10,
        hold: Duration::from_millis(200),
    }
}

fn smoke_stream() -> stream::Args {
    stream::Args {
        runs: vec![10],
        tokens: 20,
        rate: 50.0,
        watchers: 2,
        ramp: None,
        users: 2,
        concurrency: 32,
        all_steps: true,
    }
}

fn smoke_churn() -> churn::Args {
    churn::Args {
        rate: 50.0,
        duration: Duration::from_secs(3),
        sample: Duration::from_secs(1),
        users: 2,
        conversations: 10,
    }
}
