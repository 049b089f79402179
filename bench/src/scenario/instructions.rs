//! `instructions`: the server's user-space instructions per delivered chunk, counted by
//! callgrind. CPU time per chunk moves by a third between runs of one binary on a shared
//! machine; instruction counts spread by up to 5 %, so two builds can be compared in minutes
//! (`docs/performance.md`, "Counting instructions").
//!
//! The stream scenario runs twice at low load on a server started under
//! `valgrind --tool=callgrind`: once with short answers, once with long ones. The difference
//! of the two totals, over the difference of the chunks delivered, is the cost of a chunk with
//! startup and setup (signing keys, password hashes, migrations) cancelled out. What the
//! kernel does (the sends, the loopback) is not counted: callgrind sees user space only.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::{Bench, Outcome, stream};
use crate::{
    client::Sources,
    target::{Options, Target},
};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Concurrent runs (the server runs some 20 times slower under callgrind).
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Tokens per run in the short sitting.
    #[arg(long, default_value_t = 100)]
    pub short: u32,
    /// Tokens per run in the long sitting.
    #[arg(long, default_value_t = 500)]
    pub long: u32,
    /// Tokens per second per run.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Chat sockets watching each run.
    #[arg(long, default_value_t = 2)]
    pub watchers: usize,
    /// Functions listed in the summary, by instructions per chunk.
    #[arg(long, default_value_t = 15)]
    pub top: usize,
}

/// One sitting under callgrind.
struct Sitting {
    chunks: u64,
    /// Instructions in all, less one-off initialisers (see [`counted`]).
    instructions: u64,
    /// Instructions by function (their own, not their callees').
    functions: HashMap<String, u64>,
    correct: bool,
}

pub async fn run(
    options: &Options,
    out_dir: &Path,
    sources: Sources,
    args: &Args,
) -> Result<Outcome> {
    if args.long <= args.short {
        bail!("--long must be more tokens than --short");
    }
    for tool in ["valgrind", "callgrind_annotate"] {
        if which(tool).is_none() {
            bail!("{tool} is not installed (Debian: apt-get install valgrind)");
        }
    }
    std::fs::create_dir_all(out_dir)?;
    let short = sitting(options, out_dir, sources, args, args.short).await?;
    let long = sitting(options, out_dir, sources, args, args.long).await?;
    let chunks = long.chunks.saturating_sub(short.chunks);
    if chunks == 0 {
        bail!("the long sitting delivered no more chunks than the short one");
    }
    let per_chunk = (long.instructions as f64 - short.instructions as f64) / chunks as f64;
    let mut by_function: Vec<(String, f64)> = long
        .functions
        .iter()
        .map(|(name, count)| {
            let before = short.functions.get(name).copied().unwrap_or(0);
            (
                name.clone(),
                (*count as f64 - before as f64) / chunks as f64,
            )
        })
        .collect();
    by_function.sort_by(|a, b| b.1.total_cmp(&a.1));
    by_function.truncate(args.top);
    let mut summary = format!(
        "instructions: {per_chunk:.0} server instructions (user space) per delivered chunk \
         (R={} W={}, {} vs {} tokens per run: {} more chunks)",
        args.runs, args.watchers, args.long, args.short, chunks
    );
    for (name, count) in &by_function {
        summary.push_str(&format!(
            "\n  {count:>7.0}  {:>5.1} %  {name}",
            100.0 * count / per_chunk
        ));
    }
    Ok(Outcome {
        summary,
        result: json!({
            "args": {
                "runs": args.runs,
                "short": args.short,
                "long": args.long,
                "rate": args.rate,
                "watchers": args.watchers,
            },
            "instructions_per_chunk": per_chunk,
            "chunks": {"short": short.chunks, "long": long.chunks},
            "instructions": {"short": short.instructions, "long": long.instructions},
            "top_functions_per_chunk": by_function
                .iter()
                .map(|(name, count)| json!({"function": name, "instructions": count}))
                .collect::<Vec<_>>(),
        }),
        correct: short.correct && long.correct,
        // No target is set in instructions: they compare builds.
        target_met: true,
    })
}

async fn sitting(
    options: &Options,
    out_dir: &Path,
    sources: Sources,
    args: &Args,
    tokens: u32,
) -> Result<Sitting> {
    let file = out_dir.join(format!("callgrind-{tokens}.out"));
    let _ = std::fs::remove_file(&file);
    let mut options = options.clone();
    options.wrapper = vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        format!("--callgrind-out-file={}", file.display()),
    ];
    let bench = Bench {
        target: Target::start(&options, out_dir).await?,
        out_dir: out_dir.to_owned(),
        token: None,
        sources,
    };
    let streamed = stream::run(
        &bench,
        &stream::Args {
            runs: vec![args.runs],
            tokens,
            rate: args.rate,
            watchers: args.watchers,
            ramp: None,
            users: 1,
            concurrency: 16,
            all_steps: true,
        },
    )
    .await;
    // Stopped gracefully either way: callgrind writes its counts when the server exits.
    bench.target.stop().await?;
    let streamed = streamed?;
    let chunks = streamed.result["steps"][0]["chunk_frames_received"]
        .as_u64()
        .context("the stream step reported no chunk count")?;
    let (instructions, functions) = counted(&file)?;
    Ok(Sitting {
        chunks,
        instructions,
        functions,
        correct: streamed.correct,
    })
}

/// The instructions in a callgrind file, less those of one-off initialisers (`OnceCell`s: a
/// clock calibration in one spins for a fixed time, so its count varies from run to run), and
/// each function's own count.
fn counted(file: &PathBuf) -> Result<(u64, HashMap<String, u64>)> {
    let annotate = |inclusive: bool| -> Result<HashMap<String, u64>> {
        let output = std::process::Command::new("callgrind_annotate")
            .arg(format!(
                "--inclusive={}",
                if inclusive { "yes" } else { "no" }
            ))
            .arg("--threshold=100")
            .arg(file)
            .output()
            .context("cannot run callgrind_annotate")?;
        if !output.status.success() {
            bail!(
                "callgrind_annotate {}: {}",
                file.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(parse_annotate(&String::from_utf8_lossy(&output.stdout)))
    };
    let inclusive = annotate(true)?;
    let total = *inclusive
        .get(TOTAL)
        .context("callgrind_annotate printed no total")?;
    let once = inclusive
        .iter()
        .filter(|(name, _)| name.contains("OnceCell<T>::initialize"))
        .map(|(_, count)| *count)
        .max()
        .unwrap_or(0);
    let mut functions = annotate(false)?;
    functions.remove(TOTAL);
    Ok((total.saturating_sub(once), functions))
}

/// What `callgrind_annotate` calls the whole program's count.
const TOTAL: &str = "PROGRAM TOTALS";

/// `callgrind_annotate`'s lines `  1,234 (12.34%)  file:function [object]`, as (function,
/// count); the same function from several objects or files is summed.
fn parse_annotate(text: &str) -> HashMap<String, u64> {
    let mut counts = HashMap::new();
    for line in text.lines() {
        let line = line.trim_start();
        let Some((number, rest)) = line.split_once(' ') else {
            continue;
        };
        let Ok(count) = number.replace(',', "").parse::<u64>() else {
            continue;
        };
        let Some((_, name)) = rest.split_once(')') else {
            continue;
        };
        let mut name = name.trim();
        if let Some(object) = name.rfind(" [") {
            name = &name[..object];
        }
        // `???:function` or `path/file.c:function`; the total has neither.
        if let Some((_, function)) = name
            .split_once(':')
            .filter(|(file, _)| *file == "???" || file.contains('/') || file.contains('.'))
        {
            name = function;
        }
        *counts.entry(name.to_owned()).or_default() += count;
    }
    counts
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotate_lines_are_read_and_summed_by_function() {
        let text = "\
--------------------------------------------------------------------------------
Ir
--------------------------------------------------------------------------------
585,331,448 (100.0%)  PROGRAM TOTALS

--------------------------------------------------------------------------------
Ir                    file:function
--------------------------------------------------------------------------------
198,513,084 (33.91%)  ???:argon2::Argon2::compress::compress_avx2 [/tmp/b/wadi]
 19,429,579 ( 3.32%)  ./string/../sysdeps/x86_64/multiarch/memmove-vec-unaligned-erms.S:__memcpy_avx_unaligned_erms [/usr/lib/x86_64-linux-gnu/libc.so.6]
  5,433,640 ( 0.93%)  ???:<wadi_server::model::openai::Answer as futures_core::stream::Stream>::poll_next [/tmp/b/wadi]
         10 ( 0.00%)  ???:<wadi_server::model::openai::Answer as futures_core::stream::Stream>::poll_next [/tmp/b/other]
";
        assert_eq!(
            parse_annotate(text),
            HashMap::from([
                ("PROGRAM TOTALS".to_owned(), 585_331_448),
                (
                    "argon2::Argon2::compress::compress_avx2".to_owned(),
                    198_513_084
                ),
                ("__memcpy_avx_unaligned_erms".to_owned(), 19_429_579),
                (
                    "<wadi_server::model::openai::Answer as futures_core::stream::Stream>::poll_next"
                        .to_owned(),
                    5_433_650
                ),
            ])
        );
    }
}
