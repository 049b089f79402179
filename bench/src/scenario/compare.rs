//! `compare`: the stream and idle scenarios against WADI and against the reference server
//! (`bench/reference/`: the original system's stack, Node `ws` + Express + the `openai` SDK),
//! one server after the other in one sitting, each scenario on a freshly started server with
//! the same fake upstream, and the ratios: chunks per server CPU-second and p99 at each offered load, KiB per idle
//! socket.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::{Bench, Outcome, idle, stream};
use crate::{
    client::Sources,
    report,
    target::{Options, Target},
};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The reference server's script (run with `node`; its packages installed by npm).
    #[arg(long, default_value = "bench/reference/server.js")]
    pub reference: PathBuf,
    /// Concurrent runs, one step per value; every step runs on both servers.
    #[arg(long, value_delimiter = ',', default_value = "200,400,800")]
    pub runs: Vec<usize>,
    /// Tokens per run.
    #[arg(long, default_value_t = 600)]
    pub tokens: u32,
    /// Tokens per second per run.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Chat sockets watching each run.
    #[arg(long, default_value_t = 2)]
    pub watchers: usize,
    /// Idle authenticated sockets held on each server.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
}

impl Args {
    fn stream(&self) -> stream::Args {
        stream::Args {
            runs: self.runs.clone(),
            tokens: self.tokens,
            rate: self.rate,
            watchers: self.watchers,
            ramp: None,
            users: 8,
            concurrency: 64,
            all_steps: true,
        }
    }

    fn idle(&self) -> idle::Args {
        idle::Args {
            connections: self.connections,
            per_process: 5_000,
            concurrency: 64,
            users: 4,
            conversations: 100,
            hold: std::time::Duration::from_secs(5),
        }
    }
}

/// One server's figures.
struct Measured {
    stream: Value,
    idle: Value,
    correct: bool,
}

/// Both servers, then the table. `options` says how to start WADI (its binary, settings).
pub async fn run(
    options: &Options,
    out_dir: &Path,
    sources: Sources,
    args: &Args,
) -> Result<Outcome> {
    let script = args
        .reference
        .canonicalize()
        .with_context(|| format!("no reference server at {}", args.reference.display()))?;
    let wadi = measure(options.clone(), &out_dir.join("wadi"), sources, args).await?;
    let reference = Options {
        reference: Some(script),
        ..options.clone()
    };
    let node = measure(reference, &out_dir.join("reference"), sources, args).await?;
    let table = ratios(&wadi, &node);
    let summary = render(args, &table);
    let result = json!({
        "args": {
            "runs": args.runs,
            "tokens": args.tokens,
            "rate": args.rate,
            "watchers": args.watchers,
            "connections": args.connections,
        },
        "commit": report::commit(),
        "table": table,
        "wadi": { "stream": wadi.stream, "idle": wadi.idle },
        "reference": { "stream": node.stream, "idle": node.idle },
    });
    Ok(Outcome {
        summary,
        result,
        correct: wadi.correct && node.correct,
        // No target of its own: the figures are the point.
        target_met: true,
    })
}

/// One server's figures: the stream scenario on a freshly started server, then the idle one on
/// another (after a stream, freed buffers would be reused by the idle sockets and hide their
/// cost).
async fn measure(
    options: Options,
    out_dir: &Path,
    sources: Sources,
    args: &Args,
) -> Result<Measured> {
    let bench = start(&options, out_dir, sources, "stream").await?;
    let stream = stream::run(&bench, &args.stream()).await;
    let stream = finish(bench, out_dir, "stream", stream).await?;
    let bench = start(&options, out_dir, sources, "idle").await?;
    let idle = idle::run(&bench, &args.idle()).await;
    let idle = finish(bench, out_dir, "idle", idle).await?;
    Ok(Measured {
        correct: stream.correct && idle.correct,
        stream: stream.result,
        idle: idle.result,
    })
}

/// A freshly started server for the scenario `name`.
async fn start(options: &Options, out_dir: &Path, sources: Sources, name: &str) -> Result<Bench> {
    let target = Target::start(options, out_dir).await?;
    println!("compare: {name} on {}", target.description);
    Ok(Bench {
        target,
        out_dir: out_dir.to_owned(),
        token: None,
        sources,
    })
}

/// Writes the scenario's report and stops its server.
async fn finish(
    bench: Bench,
    out_dir: &Path,
    name: &str,
    outcome: Result<Outcome>,
) -> Result<Outcome> {
    if let Ok(outcome) = &outcome {
        println!("{}", outcome.summary);
        report::write(out_dir, name, &bench.target, outcome.result.clone())?;
    }
    bench.target.stop().await?;
    outcome
}

/// One row per offered load, and the idle figures, with WADI / reference ratios.
fn ratios(wadi: &Measured, node: &Measured) -> Value {
    let steps = |measured: &Measured| -> Vec<Value> {
        measured.stream["steps"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let (wadi_steps, node_steps) = (steps(wadi), steps(node));
    let rows: Vec<Value> = wadi_steps
        .iter()
        .zip(&node_steps)
        .map(|(w, n)| {
            let per_cpu_second = |step: &Value| {
                step["steady"]["server_cpu_seconds_per_1000_chunks"]
                    .as_f64()
                    .filter(|per| *per > 0.0)
                    .map(|per| 1000.0 / per)
            };
            let p99 = |step: &Value| step["latency"]["p99_ms"].as_f64();
            let (w_rate, n_rate) = (per_cpu_second(w), per_cpu_second(n));
            json!({
                "offered_chunks_per_second": w["offered_chunks_per_second"],
                "wadi_chunks_per_cpu_second": w_rate,
                "reference_chunks_per_cpu_second": n_rate,
                "chunks_per_cpu_second_ratio": ratio(w_rate, n_rate),
                "wadi_p99_ms": p99(w),
                "reference_p99_ms": p99(n),
                "wadi_every_seq_once": w["every_seq_exactly_once"],
                "reference_every_seq_once": n["every_seq_exactly_once"],
            })
        })
        .collect();
    let kib = |measured: &Measured| measured.idle["rss_growth_kib_per_connection"].as_f64();
    let (w_kib, n_kib) = (kib(wadi), kib(node));
    json!({
        "stream": rows,
        "idle": {
            "wadi_kib_per_socket": w_kib,
            "reference_kib_per_socket": n_kib,
            // How many times more memory the reference needs per idle socket.
            "reference_over_wadi": ratio(n_kib, w_kib),
        },
    })
}

fn ratio(numerator: Option<f64>, denominator: Option<f64>) -> Option<f64> {
    match (numerator, denominator) {
        (Some(n), Some(d)) if d > 0.0 => Some(n / d),
        _ => None,
    }
}

fn render(args: &Args, table: &Value) -> String {
    let number = |value: &Value, decimals: usize| match value.as_f64() {
        Some(x) => format!("{x:.decimals$}"),
        None => "-".to_owned(),
    };
    let yes_no = |value: &Value| match value.as_bool() {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    };
    let mut text = format!(
        "compare: WADI vs the reference (Node ws + Express + openai), W={} watchers, {}/s tokens \
         per run, T={}, commit {}\n\
         {:>10} | {:>12} {:>12} {:>6} | {:>9} {:>9} | every seq once\n",
        args.watchers,
        args.rate,
        args.tokens,
        report::commit().unwrap_or_else(|| "?".to_owned()),
        "offered/s",
        "WADI chunks",
        "ref chunks",
        "ratio",
        "WADI p99",
        "ref p99",
    );
    text.push_str(&format!(
        "{:>10} | {:>12} {:>12} {:>6} | {:>9} {:>9} |\n",
        "", "per CPU-s", "per CPU-s", "", "ms", "ms"
    ));
    for row in table["stream"].as_array().into_iter().flatten() {
        text.push_str(&format!(
            "{:>10} | {:>12} {:>12} {:>6} | {:>9} {:>9} | WADI {}, ref {}\n",
            number(&row["offered_chunks_per_second"], 0),
            number(&row["wadi_chunks_per_cpu_second"], 0),
            number(&row["reference_chunks_per_cpu_second"], 0),
            number(&row["chunks_per_cpu_second_ratio"], 2),
            number(&row["wadi_p99_ms"], 2),
            number(&row["reference_p99_ms"], 2),
            yes_no(&row["wadi_every_seq_once"]),
            yes_no(&row["reference_every_seq_once"]),
        ));
    }
    let idle = &table["idle"];
    text.push_str(&format!(
        "idle ({} sockets): WADI {} KiB per socket, reference {} KiB per socket (reference / \
         WADI = {})",
        args.connections,
        number(&idle["wadi_kib_per_socket"], 2),
        number(&idle["reference_kib_per_socket"], 2),
        number(&idle["reference_over_wadi"], 2),
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(cpu_per_1000: f64, p99: f64, kib: f64) -> Measured {
        Measured {
            stream: json!({"steps": [{
                "offered_chunks_per_second": 8000.0,
                "steady": {"server_cpu_seconds_per_1000_chunks": cpu_per_1000},
                "latency": {"p99_ms": p99},
                "every_seq_exactly_once": true,
            }]}),
            idle: json!({"rss_growth_kib_per_connection": kib}),
            correct: true,
        }
    }

    #[test]
    fn ratios_compare_like_with_like() {
        let table = ratios(&measured(0.025, 3.0, 7.5), &measured(0.1, 9.0, 30.0));
        let row = &table["stream"][0];
        assert_eq!(row["wadi_chunks_per_cpu_second"], 40_000.0);
        assert_eq!(row["reference_chunks_per_cpu_second"], 10_000.0);
        assert_eq!(row["chunks_per_cpu_second_ratio"], 4.0);
        assert_eq!(row["reference_p99_ms"], 9.0);
        assert_eq!(table["idle"]["reference_over_wadi"], 4.0);
        let text = render(
            &Args {
                reference: PathBuf::new(),
                runs: vec![200],
                tokens: 600,
                rate: 20.0,
                watchers: 2,
                connections: 10,
            },
            &table,
        );
        assert!(text.contains("40000"), "{text}");
        assert!(text.contains("4.00"), "{text}");
    }

    #[test]
    fn a_missing_figure_is_a_dash_not_a_zero() {
        let mut wadi = measured(0.025, 3.0, 7.5);
        wadi.stream["steps"][0]["steady"]["server_cpu_seconds_per_1000_chunks"] = Value::Null;
        let table = ratios(&wadi, &measured(0.1, 9.0, 30.0));
        assert!(table["stream"][0]["chunks_per_cpu_second_ratio"].is_null());
    }
}
