//! `cargo xtask bench <scenario> [ARGS]`: builds the server and the load generator
//! (`bench/`, binary `wadi-bench`) and runs a benchmark scenario against a freshly started
//! server. `docs/performance.md` says what each scenario measures and what was measured.
//!
//! - `idle`, `stream`, `churn`: release builds, full-size defaults (the targets);
//!   arguments go to `wadi-bench <scenario>` (`cargo xtask bench stream --help`).
//! - `smoke`: every scenario for a few seconds on debug builds, checking that the harness works
//!   (what `cargo xtask test` runs), not the targets.
//! - `compare`: stream and idle against WADI and against the reference server
//!   (`bench/reference/`, the original's Node stack, its packages installed by `npm ci`), and
//!   the ratios.
//! - `instructions`: the server's user-space instructions per delivered chunk, counted by
//!   callgrind (valgrind, installed from Debian's packages when missing): short against long
//!   answers at low load, so setup cancels out. Repeatable on a busy machine, unlike CPU time.
//! - `upstream`: only the fake OpenAI-compatible upstream, to benchmark another server.
//!
//! Reports go to `target/bench/`.

use std::path::PathBuf;

use crate::tools::{self, cmd, workspace_root};

const SCENARIOS: [&str; 6] = [
    "idle",
    "stream",
    "churn",
    "compare",
    "instructions",
    "upstream",
];

const HELP: &str = "usage: cargo xtask bench <scenario> [ARGS]

  idle    [ARGS]  hold N authenticated idle sockets: server RSS per connection
  stream  [ARGS]  R runs x W watchers: chunks/s, CPU per 1000 chunks, latency p50/p99/max
  churn   [ARGS]  open/auth/ping/close continuously: RSS drift and errors
  smoke           all three, and compare, for a few seconds (debug builds), as `cargo xtask
                  test` does
  compare [ARGS]  stream and idle against WADI and against the reference server
                  (bench/reference/: Node ws + Express + openai), and the ratios
  instructions [ARGS]
                  the server's instructions per delivered chunk, counted by callgrind
                  (valgrind): repeatable where CPU time is not, for comparing builds
  upstream [ARGS] only the fake OpenAI-compatible upstream

`cargo xtask bench <scenario> --help` lists a scenario's arguments. Reports: target/bench/.";

pub fn run(args: &[String]) -> Result<(), String> {
    let Some((scenario, rest)) = args.split_first() else {
        println!("{HELP}");
        return Ok(());
    };
    match scenario.as_str() {
        "smoke" => smoke(cmd("cargo", &tools::TEST_BUILD).current_dir(workspace_root())),
        "help" | "--help" | "-h" => {
            println!("{HELP}");
            Ok(())
        }
        name if SCENARIOS.contains(&name) => {
            if name == "compare" {
                reference_packages()?;
            }
            if name == "instructions" && !tools::on_path("valgrind") {
                tools::apt_install(&["valgrind"], &tools::Output::Terminal)?;
            }
            let bench = build_release()?;
            let mut command = cmd(&bench.to_string_lossy(), &[name]);
            command.args(rest).arg("--out-dir").arg(out_dir());
            tools::status(command.current_dir(workspace_root()))
        }
        other => Err(format!("unknown benchmark {other:?}\n\n{HELP}")),
    }
}

/// A few seconds of every scenario against a debug build of the server, then a small compare
/// against the reference server, so the harness and the reference keep working. Fails if the
/// harness sees a failed connection or a missing chunk; the performance targets are not checked
/// (debug builds on a shared CI machine say nothing about them).
///
/// `build` is the build step of `cargo xtask test`, run again: the same targets and environment,
/// so the debug binaries that step compiled are reused, not compiled again.
pub fn smoke(build: &mut std::process::Command) -> Result<(), String> {
    tools::status(build)?;
    let bench = workspace_root()
        .join("target")
        .join("debug")
        .join("wadi-bench");
    let mut command = cmd(&bench.to_string_lossy(), &["smoke"]);
    command.arg("--out-dir").arg(out_dir());
    tools::status(command.current_dir(workspace_root()))?;
    reference_packages()?;
    let mut compare = cmd(
        &bench.to_string_lossy(),
        &[
            "compare",
            "--runs",
            "10",
            "--tokens",
            "20",
            "--rate",
            "50",
            "--connections",
            "200",
        ],
    );
    compare.arg("--out-dir").arg(out_dir().join("smoke"));
    tools::status(compare.current_dir(workspace_root()))
}

/// The reference server's npm packages, exactly as `bench/reference/package-lock.json` pins
/// them (installed once; `npm ci` again after changing the lock).
fn reference_packages() -> Result<(), String> {
    let dir = workspace_root().join("bench").join("reference");
    if dir.join("node_modules").join(".package-lock.json").exists() {
        return Ok(());
    }
    tools::status(cmd("npm", &["ci", "--no-audit", "--no-fund"]).current_dir(&dir))
}

/// Release builds of `wadi` and `wadi-bench` side by side (the generator starts the server next
/// to it); returns the generator's path.
fn build_release() -> Result<PathBuf, String> {
    let root = workspace_root();
    tools::status(
        cmd(
            "cargo",
            &[
                "build",
                "--release",
                "-p",
                "wadi-server",
                "-p",
                "wadi-bench",
            ],
        )
        .current_dir(&root),
    )?;
    Ok(root.join("target").join("release").join("wadi-bench"))
}

fn out_dir() -> PathBuf {
    workspace_root().join("target").join("bench")
}
