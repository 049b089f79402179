//! `churn`: connections open, authenticate, send a frame (`ping`, answered by `pong`) and close,
//! continuously at a set rate for a set time. Measures the server's RSS along the way (flat
//! means nothing leaks per connection) and counts every failure.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Result, anyhow};
use serde::Serialize;
use serde_json::json;
use tokio::{sync::Semaphore, time::Instant};

use super::{Bench, Outcome, idle::parse_seconds, verdict};
use crate::{
    client::{self, Sources},
    procfs,
    report::mib,
    setup::{Seat, Setup},
    stats::{Errors, Latencies},
};

/// The target: RSS at the end within this fraction of RSS once warmed up.
const TARGET_FLAT: f64 = 0.05;
/// Cycles in flight at most; past it the pacer waits (and the achieved rate shows it).
const MAX_IN_FLIGHT: usize = 4_000;
/// The warm-up: RSS is compared from this fraction of the run on (allocator pools and caches
/// grow first), and from at least one sample in.
const WARM_FRACTION: f64 = 0.1;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// New connections per second.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// How long to churn, in seconds.
    #[arg(long, value_parser = parse_seconds, default_value = "600")]
    pub duration: Duration,
    /// How often the server's memory is sampled, in seconds.
    #[arg(long, value_parser = parse_seconds, default_value = "10")]
    pub sample: Duration,
    #[arg(long, default_value_t = 4)]
    pub users: usize,
    #[arg(long, default_value_t = 100)]
    pub conversations: usize,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Sample {
    seconds: f64,
    completed: u64,
    server: Option<procfs::Usage>,
}

/// One connection's life: open, authenticate, ping, close.
async fn cycle(
    bench_addr: (std::net::SocketAddr, String),
    seat: Seat,
    sources: Sources,
    index: u64,
) -> Result<()> {
    let (server, ws_base) = bench_addr;
    let mut socket = client::open_chat(
        server,
        &ws_base,
        &seat.conversation,
        &seat.token,
        sources.addr(index),
    )
    .await?;
    client::send(&mut socket, &json!({"type": "ping"})).await?;
    client::expect(&mut socket, "pong").await?;
    client::close(socket).await;
    Ok(())
}

pub async fn run(bench: &Bench, args: &Args) -> Result<Outcome> {
    let target = &bench.target;
    let setup = Setup::new(&target.http_base)?;
    let tokens = setup.tokens(bench.token.as_deref(), args.users).await?;
    let seats = setup.seats(&tokens, args.conversations).await?;
    let before = procfs::usage_of(target.server_pid)?;

    let errors = Arc::new(Mutex::new(Errors::default()));
    let latencies = Arc::new(Mutex::new(Latencies::default()));
    let completed = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let started = Instant::now();
    let end = started + args.duration;
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    // Catch up after a stall so that the average rate is the one asked for.
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sampling = tokio::time::interval(args.sample);
    let mut samples = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut attempted = 0u64;
    let sample = |completed: &AtomicU64| Sample {
        seconds: started.elapsed().as_secs_f64(),
        completed: completed.load(Ordering::Relaxed),
        server: procfs::usage_of(target.server_pid).ok().flatten(),
    };
    loop {
        tokio::select! {
            _ = sampling.tick() => {
                let now = sample(&completed);
                if let Some(server) = now.server {
                    eprintln!(
                        "churn: {:>5.0} s, {} connections, server RSS {}",
                        now.seconds,
                        now.completed,
                        mib(server.rss_kib)
                    );
                }
                samples.push(now);
            }
            _ = pace.tick() => {
                if Instant::now() >= end {
                    break;
                }
                let permit = in_flight.clone().acquire_owned().await?;
                let seat = seats[attempted as usize % seats.len()].clone();
                let index = attempted;
                attempted += 1;
                let (errors, latencies, completed) = (errors.clone(), latencies.clone(), completed.clone());
                let addr = (target.addr, target.ws_base.clone());
                let sources = bench.sources;
                tasks.spawn(async move {
                    let began = Instant::now();
                    match cycle(addr, seat, sources, index).await {
                        Ok(()) => {
                            completed.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut latencies) = latencies.lock() {
                                latencies.record(began.elapsed().as_micros() as u64);
                            }
                        }
                        Err(error) => {
                            if let Ok(mut errors) = errors.lock() {
                                errors.add(format!("{error:#}"));
                            }
                        }
                    }
                    drop(permit);
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    let churned = sample(&completed);
    samples.push(churned);
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();
    let after = procfs::usage_of(target.server_pid)?;

    let warm_from = (args.duration.as_secs_f64() * WARM_FRACTION).max(args.sample.as_secs_f64());
    let warm = samples
        .iter()
        .find(|s| s.seconds >= warm_from && s.server.is_some())
        .or_else(|| samples.first())
        .copied();
    let errors = Arc::try_unwrap(errors)
        .map_err(|_| anyhow!("cycles still running"))?
        .into_inner()
        .map_err(|_| anyhow!("a cycle panicked"))?;
    let mut latencies = Arc::try_unwrap(latencies)
        .map_err(|_| anyhow!("cycles still running"))?
        .into_inner()
        .map_err(|_| anyhow!("a cycle panicked"))?;
    let completed = completed.load(Ordering::Relaxed);
    let growth = match (warm.and_then(|w| w.server), churned.server) {
        (Some(warm), Some(end)) => {
            Some((end.rss_kib as f64 - warm.rss_kib as f64) / warm.rss_kib as f64)
        }
        _ => None,
    };
    let rate = completed as f64 / elapsed;
    let target_met = errors.total == 0
        && rate >= args.rate * 0.98
        && growth.is_some_and(|g| g.abs() <= TARGET_FLAT);
    let memory = match (warm.and_then(|w| w.server), churned.server, growth) {
        (Some(warm_usage), Some(end), Some(growth)) => format!(
            "server RSS {} warm (at {:.0} s) -> {} at end ({:+.1} %, target within {:.0} %: {})",
            mib(warm_usage.rss_kib),
            warm.map_or(0.0, |w| w.seconds),
            mib(end.rss_kib),
            growth * 100.0,
            TARGET_FLAT * 100.0,
            verdict(target_met)
        ),
        _ => "server RSS unknown (no --server-pid)".to_owned(),
    };
    let cycle_latency = latencies.summary();
    let summary = format!(
        "churn: {completed} connections in {elapsed:.0} s ({rate:.0}/s of {} asked), {memory}, \
         errors {}, cycle p99 {:.1} ms",
        args.rate, errors.total, cycle_latency.p99_ms
    );
    let result = json!({
        "args": {
            "rate": args.rate,
            "duration_seconds": args.duration.as_secs_f64(),
            "sample_seconds": args.sample.as_secs_f64(),
            "users": args.users,
            "conversations": args.conversations,
        },
        "attempted": attempted,
        "completed": completed,
        "seconds": elapsed,
        "achieved_per_second": rate,
        "server_before": before,
        "server_warm": warm,
        "server_at_end": churned,
        "server_after": after,
        "rss_growth_fraction": growth,
        "target_flat_fraction": TARGET_FLAT,
        "cycle_latency": cycle_latency,
        "errors": errors,
        "samples": samples,
        "target_met": target_met,
    });
    Ok(Outcome {
        summary,
        result,
        correct: errors.total == 0 && completed == attempted,
        target_met,
    })
}
