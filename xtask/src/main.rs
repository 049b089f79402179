//! `cargo xtask <command>`: everything a developer or CI runs, with every install step in code so
//! a fresh machine needs nothing but Rust.
//!
//! - `setup`: installs the wasm32 target, wasm-opt (npm's `binaryen`) and cargo-nextest.
//! - `run`:   installs what it needs, builds the server and the web app side by side (quick
//!   profiles), starts the server on embedded defaults.
//! - `test`:  setup, then fmt, clippy (native and wasm32, while the tests and the release web
//!   build compile), all tests, the web bundle's size budget, the browser tests against the
//!   server's debug binary, a benchmark smoke.
//! - `web`:   the web app alone into `dist/`.
//! - `dist`:  a release build of web and server into `target/dist/`.
//! - `bench`: the benchmark scenarios (`docs/performance.md`).

mod bench;
mod fuzz;
mod run;
mod services;
mod tools;
mod web;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use tools::{Output, Step, cmd, workspace_root};

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
        "web" => build_web(rest),
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
  web         build the web app into dist/ (quickly, as `run` does; --release as CI does)
  setup       install the wasm target, wasm-opt and cargo-nextest";

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

    let clippy = TestCargo::clippy_driver()?;
    // Debian's packages (Chromium, Redis, and Postgres when the machine has none) download and
    // unpack beside the Rust steps.
    let postgres_package = services::postgres_package_needed();
    let debian = tools::Background::debian_packages(postgres_package);
    step("setup", &mut tools::setup)?;
    step("fmt", &mut || {
        tools::status(cmd("cargo", &["fmt", "--all", "--", "--check"]).current_dir(&root))
    })?;
    step("protocol crate stays wasm-clean", &mut check_protocol_tree)?;
    let mut postgres = None;
    step("Postgres for the tests", &mut || {
        if postgres_package {
            debian.wait()?;
        }
        postgres = services::postgres_for_tests()?;
        Ok(())
    })?;
    let cargo = TestCargo::new(
        clippy,
        postgres.as_ref().map(|postgres| postgres.url.as_str()),
    );
    step("clippy and build (native)", &mut || {
        tools::status(&mut cargo.command(&tools::TEST_BUILD))
    })?;
    step("Redis for the tests", &mut || {
        debian.wait()?;
        tools::redis()
    })?;
    step("tests", &mut || {
        tools::status(&mut cargo.command(&[
            "nextest",
            "run",
            "--workspace",
            "--no-fail-fast",
            "-E",
            "not binary(browser)",
        ]))
    })?;
    step("web release build (and clippy, wasm32)", &mut || {
        let mut compile = web::compile_command(web::RELEASE);
        cargo.configure(&mut compile);
        tools::status(&mut compile)?;
        // The workspace's wasm-bindgen, which the build step compiled.
        web::package(
            web::RELEASE,
            &web::bindgen_binary("debug"),
            &Output::Terminal,
        )
    })?;
    step("web bundle size", &mut check_bundle_size)?;
    step("browser install", &mut || {
        debian.wait()?;
        tools::browser()
    })?;
    step("browser tests", &mut || {
        // The debug binary the build step made: it serves `dist/` through the same embedded-
        // files interface the release binary compiles in (read from disk in this profile), and
        // a release build of the server here cost six of a cold run's minutes.
        let binary = root.join("target").join("debug").join("wadi");
        if !binary.exists() {
            return Err(format!(
                "{} was not built by the build step",
                binary.display()
            ));
        }
        let mut nextest = cargo.command(&[
            "nextest",
            "run",
            "--workspace",
            "--no-fail-fast",
            "--test-threads",
            "2",
            "-E",
            "binary(browser)",
        ]);
        nextest.env("WADI_BROWSER_BINARY", binary);
        tools::status(&mut nextest)
    })?;
    step("benchmark smoke", &mut || {
        bench::smoke(&mut cargo.command(&tools::TEST_BUILD))
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

/// The environment of every cargo command `cargo xtask test` runs, the same for all so that each
/// reuses what the one before built:
/// - clippy as the workspace's compiler wrapper, with warnings denied (what `cargo clippy` sets
///   up for its `cargo check`): its lints run while the workspace's crates compile for the tests
///   and the web build, instead of in separate checks that each compiled every dependency again
///   (about a fifth of a cold run);
/// - the tests' Postgres, which the server's build script reads.
struct TestCargo {
    env: Vec<(&'static str, OsString)>,
}

impl TestCargo {
    /// The toolchain's clippy driver, which `cargo clippy` would use.
    fn clippy_driver() -> Result<PathBuf, String> {
        let sysroot = tools::output(&mut cmd("rustc", &["--print", "sysroot"]))?;
        let driver = Path::new(sysroot.trim()).join("bin").join("clippy-driver");
        if driver.exists() {
            Ok(driver)
        } else {
            Err(format!(
                "{} is missing: `rustup component add clippy`",
                driver.display()
            ))
        }
    }

    fn new(clippy_driver: PathBuf, postgres_url: Option<&str>) -> Self {
        let mut env = vec![
            ("RUSTC_WORKSPACE_WRAPPER", clippy_driver.into_os_string()),
            // cargo-clippy's encoding of the arguments after its `--`.
            (
                "CLIPPY_ARGS",
                "-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__".into(),
            ),
        ];
        if let Some(url) = postgres_url {
            env.push(("WADI_TEST_POSTGRES_URL", url.into()));
        }
        Self { env }
    }

    /// `cargo <args>` in the workspace, in this environment.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = cmd("cargo", args);
        command.current_dir(workspace_root());
        self.configure(&mut command);
        command
    }

    fn configure(&self, command: &mut Command) {
        command.envs(self.env.iter().map(|(name, value)| (name, value)));
    }
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

/// `cargo xtask web [--release]`: `dist/` alone, for front-end work against a running debug
/// server (which reads `dist/` on every request).
fn build_web(args: &[String]) -> Result<(), String> {
    let profile = match args {
        [] => web::LOCAL,
        [flag] if flag == "--release" => web::RELEASE,
        _ => return Err(format!("usage: cargo xtask web [--release]\n\n{HELP}")),
    };
    tools::web_tools(profile.optimises())?;
    web::build(profile, &Output::Terminal)
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
    tools::web_tools(true)?;
    web::build(web::RELEASE, &Output::Terminal)?;
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
