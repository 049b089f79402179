//! `cargo xtask <command>`: everything a developer or CI runs, with every install step in code so
//! a fresh machine needs nothing but Rust.
//!
//! - `setup`: installs the wasm32 target, trunk 0.21 and the wasm-bindgen-cli matching Cargo.lock.
//! - `run`:   installs what it needs, builds the server and the web app side by side (quick
//!   profiles), starts the server on embedded defaults.
//! - `test`:  setup, then fmt, clippy (native and wasm32), all tests, the release web build and
//!   its size budget, the browser tests against the server's debug binary, a benchmark smoke.
//! - `dist`:  a release build of web and server into `target/dist/`.
//! - `bench`: the benchmark scenarios (`docs/performance.md`).

mod bench;
mod fuzz;
mod run;
mod services;
mod tools;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Instant,
};

use tools::{Step, cmd, workspace_root};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = match args.split_first() {
        Some((command, rest)) => (command.as_str(), rest),
        None => ("help", &[][..]),
    };
    let result = match command {
        "setup" => tools::setup(),
        "run" => run::run(rest),
        "test" => test(),
        "bench" => bench::run(rest),
        "fuzz" => fuzz::run(rest),
        "dist" => dist().map(|path| println!("built {}", path.display())),
        "help" | "--help" | "-h" => {
            println!("{}", HELP);
            Ok(())
        }
        other => Err(format!("unknown command {other:?}\n\n{HELP}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error}");
            ExitCode::FAILURE
        }
    }
}

const HELP: &str = "usage: cargo xtask <command>

  run [ARGS]  build the web app and start the server (ARGS go to `wadi`)
  test        everything CI checks: fmt, clippy, tests, wasm build, browser tests, bench smoke
  dist        the one binary (web app embedded) into target/dist/
  bench ...   benchmarks: idle, stream, churn, smoke (see docs/performance.md)
  fuzz [--time S] [TARGET...]  the fuzz targets (fuzz/), S seconds each; the corpus grows
  setup       install the wasm target, trunk and wasm-bindgen-cli";

/// Everything CI runs. Each step is timed; the first failure stops the run.
fn test() -> Result<(), String> {
    let started = Instant::now();
    let mut steps = Vec::new();
    let root = workspace_root();
    let mut step = |name: &str, run: &mut dyn FnMut() -> Result<(), String>| {
        let step = Step::start(name);
        let result = run();
        steps.push(step.finish(result.is_ok()));
        result
    };

    // Debian's packages (Chromium, Redis) download and unpack while the Rust steps compile.
    let debian = tools::Background::debian_packages();
    step("setup", &mut tools::setup)?;
    step("fmt", &mut || {
        tools::status(cmd("cargo", &["fmt", "--all", "--", "--check"]).current_dir(&root))
    })?;
    step("clippy", &mut || {
        tools::status(
            cmd(
                "cargo",
                &[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ],
            )
            .current_dir(&root),
        )
    })?;
    step("clippy wasm32", &mut || {
        tools::status(
            cmd(
                "cargo",
                &[
                    "clippy",
                    "-p",
                    "wadi-protocol",
                    "-p",
                    "wadi-web",
                    "--target",
                    "wasm32-unknown-unknown",
                    "--",
                    "-D",
                    "warnings",
                ],
            )
            .current_dir(&root),
        )
    })?;
    step("protocol crate stays wasm-clean", &mut check_protocol_tree)?;
    step("test services (Redis, Postgres)", &mut || {
        debian.wait()?;
        tools::redis()
    })?;
    let postgres = services::postgres_for_tests()?;
    let postgres_url = postgres.as_ref().map(|postgres| postgres.url.clone());
    step("tests", &mut || {
        let mut nextest = cmd(
            "cargo",
            &[
                "nextest",
                "run",
                "--workspace",
                "--no-fail-fast",
                "-E",
                "not binary(browser)",
            ],
        );
        nextest.current_dir(&root);
        if let Some(url) = &postgres_url {
            nextest.env("WADI_TEST_POSTGRES_URL", url);
        }
        tools::status(&mut nextest)
    })?;
    step("web release build", &mut build_web)?;
    step("web bundle size", &mut check_bundle_size)?;
    step("browser install", &mut || {
        debian.wait()?;
        tools::browser()
    })?;
    step("browser tests", &mut || {
        // The debug binary the tests step built: it serves `dist/` through the same embedded-
        // files interface the release binary compiles in (read from disk in this profile), and
        // a release build of the server here cost six of a cold run's minutes.
        let binary = root.join("target").join("debug").join("wadi");
        if !binary.exists() {
            return Err(format!(
                "{} was not built by the tests step",
                binary.display()
            ));
        }
        let mut nextest = cmd(
            "cargo",
            &[
                "nextest",
                "run",
                // The whole workspace, as in the tests step: the same features, so nothing is
                // rebuilt.
                "--workspace",
                "--no-fail-fast",
                "--test-threads",
                "2",
                "-E",
                "binary(browser)",
            ],
        );
        nextest
            .current_dir(&root)
            .env("WADI_BROWSER_BINARY", binary);
        // The same as the tests step, or the server crate would be rebuilt for another cfg.
        if let Some(url) = &postgres_url {
            nextest.env("WADI_TEST_POSTGRES_URL", url);
        }
        tools::status(&mut nextest)
    })?;
    step("benchmark smoke", &mut || {
        bench::smoke(postgres_url.as_deref())
    })?;

    println!(
        "\nxtask test: all steps passed in {:.0?}",
        started.elapsed()
    );
    for line in steps {
        println!("  {line}");
    }
    Ok(())
}

/// The protocol crate is compiled into the browser: its wasm32 dependency tree must not pull in
/// server-side crates.
fn check_protocol_tree() -> Result<(), String> {
    let tree = tools::output(
        cmd(
            "cargo",
            &[
                "tree",
                "-p",
                "wadi-protocol",
                "--target",
                "wasm32-unknown-unknown",
                "-e",
                "normal",
                "--prefix",
                "none",
            ],
        )
        .current_dir(workspace_root()),
    )?;
    let forbidden = ["tokio ", "axum ", "sqlx ", "reqwest ", "hyper ", "mio "];
    let found: Vec<&str> = tree
        .lines()
        .filter(|line| forbidden.iter().any(|name| line.starts_with(name)))
        .collect();
    if found.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "wadi-protocol pulls server crates into wasm32: {}",
            found.join(", ")
        ))
    }
}

/// `trunk build --release --offline` into `dist/`.
fn build_web() -> Result<(), String> {
    let root = workspace_root();
    tools::status(
        cmd(
            "trunk",
            &[
                "build",
                "--release",
                "--offline",
                "--cargo-profile",
                "wasm-release",
            ],
        )
        .current_dir(&root)
        .env("PATH", tools::path_with_tools()),
    )
}

/// The gzipped size of the web app (wasm + JS) must stay within this budget.
const BUNDLE_BUDGET_BYTES: u64 = 400 * 1024;

/// Reports the gzipped size of `dist/`'s wasm and JS and fails above the budget.
fn check_bundle_size() -> Result<(), String> {
    let dist = workspace_root().join("dist");
    let entries = std::fs::read_dir(&dist).map_err(|e| format!("cannot read {dist:?}: {e}"))?;
    let mut total = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let counted = path
            .extension()
            .is_some_and(|ext| ext == "wasm" || ext == "js");
        if !counted {
            continue;
        }
        let gzipped = tools::gzip_size(&path)?;
        println!(
            "  {:<48} {:>8} bytes gzipped",
            path.file_name().unwrap_or_default().to_string_lossy(),
            gzipped
        );
        total += gzipped;
    }
    println!(
        "  web bundle: {:.1} KiB gzipped (budget {} KiB)",
        total as f64 / 1024.0,
        BUNDLE_BUDGET_BYTES / 1024
    );
    if total > BUNDLE_BUDGET_BYTES {
        return Err(format!(
            "the web bundle is {total} bytes gzipped, over the {BUNDLE_BUDGET_BYTES}-byte budget"
        ));
    }
    Ok(())
}

/// `cargo build --release` of the server, which embeds `dist/`; returns the binary's path.
fn build_release_server() -> Result<PathBuf, String> {
    let root = workspace_root();
    tools::status(
        cmd(
            "cargo",
            &["build", "--release", "-p", "wadi-server", "--bin", "wadi"],
        )
        .current_dir(&root),
    )?;
    Ok(root.join("target").join("release").join("wadi"))
}

/// A release build of the web app and the server; returns the binary's path.
fn dist() -> Result<PathBuf, String> {
    tools::setup()?;
    build_web()?;
    let root = workspace_root();
    build_release_server()?;
    let out_dir = root.join("target").join("dist");
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("cannot create {out_dir:?}: {e}"))?;
    let built = root.join("target").join("release").join("wadi");
    let target = out_dir.join("wadi");
    copy(&built, &target)?;
    Ok(target)
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), to.display()))
}
