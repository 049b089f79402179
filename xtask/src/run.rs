//! `cargo xtask run`: from a fresh clone to a serving app as fast as this machine allows.
//!
//! Two lines of work run side by side, each logging to a file under `target/xtask/`:
//! - the server and the workspace's wasm-bindgen, built with the `local` profile (the dev profile
//!   without debug info: quick to build, fast enough to chat with; `dist` keeps the full release
//!   profile). In this profile the server reads the web app from `dist/` at run time, so it does
//!   not wait for the web build;
//! - the web app: the wasm32 target, then the app's wasm (`web-local` profile, in its own target
//!   directory so it does not wait for the server build's lock).
//!
//! Then wasm-bindgen and `dist/` (without `wasm-opt`: a few hundred KiB bigger, minutes
//! quicker), and the server starts. Nothing is installed with `cargo install`.
//!
//! A progress line every few seconds says which steps are running and for how long.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{
    tools::{self, Output, cmd, workspace_root},
    web,
};

/// Steps running now, with when each started.
#[derive(Clone)]
struct Progress {
    started: Instant,
    running: Arc<Mutex<Vec<(String, Instant)>>>,
}

impl Progress {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            running: Arc::default(),
        }
    }

    fn say(&self, text: &str) {
        println!("[xtask run {}] {text}", minutes(self.started.elapsed()));
    }

    /// Runs `work` as the step `name`, announcing its start and end.
    fn step<T>(&self, name: &str, work: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
        let began = Instant::now();
        self.say(&format!("{name}…"));
        self.lock().push((name.to_owned(), began));
        let result = work();
        self.lock().retain(|(step, _)| step != name);
        match &result {
            Ok(_) => self.say(&format!("{name}: done in {}", minutes(began.elapsed()))),
            Err(_) => self.say(&format!(
                "{name}: FAILED after {}",
                minutes(began.elapsed())
            )),
        }
        result
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Instant)>> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Prints what is still running every `every`, until `done` is set.
    fn ticker(&self, every: Duration, done: Arc<std::sync::atomic::AtomicBool>) {
        let progress = self.clone();
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                let due = progress.started.elapsed().as_millis() % every.as_millis() < 250;
                if !due {
                    continue;
                }
                let running: Vec<String> = progress
                    .lock()
                    .iter()
                    .map(|(name, since)| format!("{name} ({})", minutes(since.elapsed())))
                    .collect();
                if !running.is_empty() {
                    progress.say(&format!("still working: {}", running.join(", ")));
                }
            }
        });
    }
}

fn minutes(elapsed: Duration) -> String {
    let seconds = elapsed.as_secs();
    format!("{}m{:02}s", seconds / 60, seconds % 60)
}

/// Builds what is missing, then runs the server in the foreground (Ctrl-C stops it).
pub fn run(server_args: &[String]) -> Result<(), String> {
    let root = workspace_root();
    let logs = root.join("target").join("xtask");
    std::fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    let progress = Progress::new();
    progress.say(&format!(
        "building the server and the web app side by side (logs in {})",
        logs.display()
    ));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    progress.ticker(Duration::from_secs(15), done.clone());

    let server_log = fresh_log(&logs, "server.log");
    let web_log = fresh_log(&logs, "web.log");
    tools::lockfile(&Output::Log(web_log.clone()))?;
    let server = {
        let progress = progress.clone();
        let out = Output::Log(server_log.clone());
        std::thread::spawn(move || {
            progress.step("server build (and wasm-bindgen's)", || {
                out.run(
                    cmd(
                        "cargo",
                        &[
                            "build",
                            "--profile",
                            "local",
                            "-p",
                            "wadi-server",
                            "--bin",
                            "wadi",
                            "-p",
                            web::BINDGEN,
                            "--bin",
                            web::BINDGEN,
                        ],
                    )
                    .current_dir(workspace_root()),
                )
            })
        })
    };
    let out = Output::Log(web_log.clone());
    let web = progress
        .step("wasm32 target", || tools::wasm_target(&out))
        .and_then(|()| {
            progress.step("web app compile", || {
                out.run(&mut web::compile_command(web::LOCAL))
            })
        });
    let server = server
        .join()
        .unwrap_or_else(|_| Err("the server build panicked".to_owned()));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Err(error) = &server {
        tools::show_tail(&server_log);
        return Err(error.clone());
    }
    let web = web.and_then(|()| {
        progress.step("web app files", || {
            web::package(web::LOCAL, &web::bindgen_binary("local"), &out)
        })
    });
    if let Err(error) = &web {
        tools::show_tail(&web_log);
        return Err(error.clone());
    }

    let binary = root.join("target").join("local").join("wadi");
    // `cargo xtask run -- --addr …` and `cargo xtask run --addr …` both work.
    let server_args = match server_args.split_first() {
        Some((first, rest)) if first == "--" => rest,
        _ => server_args,
    };
    progress.say("starting the server; it prints its URL when it is ready (Ctrl-C stops it)");
    let mut server = std::process::Command::new(&binary);
    server.args(server_args).current_dir(&root);
    tools::status(&mut server)
}

fn fresh_log(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}
