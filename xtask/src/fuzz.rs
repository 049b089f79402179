//! `cargo xtask fuzz [--time SECONDS] [TARGET…]`: runs the coverage-guided fuzz targets of
//! `fuzz/` (cargo fuzz and libFuzzer, without a sanitizer so that it runs on the stable
//! toolchain; safe Rust needs none) for `--time` seconds each (default 60), growing the corpus
//! in `fuzz/corpus/<target>/`, then minimises that corpus. Crashes land in
//! `fuzz/artifacts/<target>/`. The corpus is committed; `server/tests/fuzz_corpus.rs` replays it
//! on every CI run.

use std::time::Instant;

use crate::tools::{self, cmd, workspace_root};

const TARGETS: [&str; 5] = ["client_frame", "jwt", "cursor", "upstream_sse", "rest_body"];
/// Inputs longer than this are not tried (every body the server reads is small, or bounded).
const MAX_LEN: &str = "-max_len=8192";

pub fn run(args: &[String]) -> Result<(), String> {
    let mut seconds = 60u64;
    let mut targets = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--time" => {
                seconds = args
                    .next()
                    .and_then(|value| value.parse().ok())
                    .ok_or("--time takes a number of seconds")?;
            }
            name if TARGETS.contains(&name) => targets.push(name),
            other => {
                return Err(format!(
                    "unknown fuzz argument {other:?} (targets: {})",
                    TARGETS.join(", ")
                ));
            }
        }
    }
    if targets.is_empty() {
        targets = TARGETS.to_vec();
    }
    install()?;
    let root = workspace_root();
    let mut report = Vec::new();
    for target in targets {
        let corpus = format!("fuzz/corpus/{target}");
        let started = Instant::now();
        let output = tools::output_and_stderr(
            cmd(
                "cargo",
                &[
                    "fuzz",
                    "run",
                    "--sanitizer",
                    "none",
                    "--release",
                    target,
                    &corpus,
                    "--",
                    &format!("-max_total_time={seconds}"),
                    MAX_LEN,
                    "-print_final_stats=1",
                ],
            )
            .current_dir(&root),
        )?;
        let runs = stat(&output, "stat::number_of_executed_units:");
        let per_second = stat(&output, "stat::average_exec_per_sec:");
        status_line(&mut report, target, runs, per_second, started);
        tools::status(
            cmd(
                "cargo",
                &[
                    "fuzz",
                    "cmin",
                    "--sanitizer",
                    "none",
                    "--release",
                    target,
                    &corpus,
                ],
            )
            .current_dir(&root),
        )?;
    }
    println!("\nxtask fuzz: no target failed");
    for line in report {
        println!("  {line}");
    }
    Ok(())
}

fn status_line(
    report: &mut Vec<String>,
    target: &str,
    runs: Option<String>,
    per_second: Option<String>,
    started: Instant,
) {
    report.push(format!(
        "{target:<14} {} executions ({} per second) in {:.0?}, no crash",
        runs.unwrap_or_else(|| "?".into()),
        per_second.unwrap_or_else(|| "?".into()),
        started.elapsed()
    ));
}

/// libFuzzer's final statistic `name` (`-print_final_stats=1`).
fn stat(output: &str, name: &str) -> Option<String> {
    output
        .lines()
        .find_map(|line| line.trim().strip_prefix(name))
        .map(|value| value.trim().to_owned())
}

/// cargo-fuzz, from crates.io, when missing.
fn install() -> Result<(), String> {
    if tools::output(&mut cmd("cargo", &["fuzz", "--version"])).is_ok() {
        return Ok(());
    }
    tools::status(&mut cmd("cargo", &["install", "cargo-fuzz", "--locked"]))
}
