//! Running commands and installing the tools the build needs. Every install is idempotent: a tool
//! already present at the right version is left alone.

use std::{
    ffi::OsString,
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

/// wasm-opt from npm's `binaryen` (Debian's is too old), for release web builds.
const BINARYEN_VERSION: &str = "132.0.0";

pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// A command with arguments; run it with [`status`] or [`output`].
pub fn cmd(program: &str, args: &[&str]) -> Command {
    let mut command = Command::new(program);
    command.args(args);
    command
}

fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs a command with inherited output; an error if it cannot start or exits non-zero.
pub fn status(command: &mut Command) -> Result<(), String> {
    let text = describe(command);
    println!("$ {text}");
    let status = command
        .status()
        .map_err(|e| format!("cannot run `{text}`: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{text}` failed ({status})"))
    }
}

/// Runs a command and returns its stdout; an error if it fails.
pub fn output(command: &mut Command) -> Result<String, String> {
    let text = describe(command);
    let output = command
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run `{text}`: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!("`{text}` failed ({})", output.status))
    }
}

/// Runs a command showing its output as it goes, and returns its standard error too (libFuzzer
/// prints its statistics there); an error if it fails.
pub fn output_and_stderr(command: &mut Command) -> Result<String, String> {
    let text = describe(command);
    println!("$ {text}");
    let output = command
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run `{text}`: {e}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    eprint!("{stderr}");
    if output.status.success() {
        Ok(stderr)
    } else {
        Err(format!("`{text}` failed ({})", output.status))
    }
}

/// The first line a tool prints for `--version`, or `None` if it is not installed.
fn version_of(program: &str) -> Option<String> {
    let output = Command::new(program)
        .arg("--version")
        .env("PATH", path_with_tools())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines().next().map(|line| line.trim().to_owned())
}

/// `PATH` with cargo's bin directory first, so tools installed by `cargo install` are found even
/// in a shell that has not sourced cargo's env.
pub fn path_with_tools() -> OsString {
    let mut dirs = vec![
        cargo_bin_dir(),
        node_tools_dir().join("node_modules").join(".bin"),
    ];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

/// What `cargo xtask test` builds for its tests, the browser tests and the benchmark smoke.
pub const TEST_BUILD: [&str; 4] = ["build", "--workspace", "--bins", "--tests"];

/// Where npm-installed build tools live: inside `target/`, so `cargo clean` removes them too.
fn node_tools_dir() -> PathBuf {
    workspace_root().join("target").join("tools")
}

fn cargo_bin_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return PathBuf::from(home).join("bin");
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    PathBuf::from(home).join(".cargo").join("bin")
}

/// Where a step's commands write: the terminal, or a log file (for steps that run side by side).
#[derive(Clone, Debug)]
pub enum Output {
    Terminal,
    Log(PathBuf),
}

impl Output {
    /// Runs `command` with its output here; an error if it cannot start or exits non-zero.
    pub fn run(&self, command: &mut Command) -> Result<(), String> {
        match self {
            Self::Terminal => status(command),
            Self::Log(path) => {
                let text = describe(command);
                let open = || {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .map_err(|e| format!("cannot open {}: {e}", path.display()))
                };
                let mut log = open()?;
                let _ = writeln!(log, "$ {text}");
                let status = command
                    .stdout(open()?)
                    .stderr(log)
                    .status()
                    .map_err(|e| format!("cannot run `{text}`: {e}"))?;
                if status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "`{text}` failed ({status}); its output: {}",
                        path.display()
                    ))
                }
            }
        }
    }
}

/// Installs everything `cargo xtask test` needs besides Debian's packages, skipping what is
/// already there at the right version.
pub fn setup() -> Result<(), String> {
    web_tools(true)?;
    nextest(&Output::Terminal)
}

/// What the web build needs besides the workspace's own wasm-bindgen: the wasm32 target, and
/// wasm-opt for a release build.
pub fn web_tools(release: bool) -> Result<(), String> {
    let out = Output::Terminal;
    lockfile(&out)?;
    wasm_target(&out)?;
    if release { wasm_opt(&out) } else { Ok(()) }
}

/// The end of a failed step's log, so the cause shows without opening it.
pub fn show_tail(log: &std::path::Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(40);
    eprintln!("--- last lines of {} ---", log.display());
    for line in &lines[start..] {
        eprintln!("{line}");
    }
}

/// Work started now on another thread, whose result is awaited (once) where it is needed.
pub struct Background {
    name: &'static str,
    handle: std::sync::Mutex<Option<std::thread::JoinHandle<Result<(), String>>>>,
    result: std::sync::OnceLock<Result<(), String>>,
}

impl Background {
    /// Debian's packages the tests need (Chromium and ChromeDriver for the browser tests,
    /// `redis-server` for the cluster tests, `postgresql` when asked), installed in one `apt-get`
    /// run when any is missing, with its output in `target/xtask/apt.log`.
    pub fn debian_packages(postgres: bool) -> Self {
        let mut missing = Vec::new();
        if !chromium_present() {
            missing.extend(["chromium", "chromium-driver"]);
        }
        if !redis_present() {
            missing.push("redis-server");
        }
        if postgres {
            missing.push("postgresql");
        }
        let handle = std::thread::spawn(move || {
            if missing.is_empty() {
                return Ok(());
            }
            let log = workspace_root()
                .join("target")
                .join("xtask")
                .join("apt.log");
            if let Some(dir) = log.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
            let installed = apt_install(&missing, &Output::Log(log.clone()));
            if installed.is_err() {
                show_tail(&log);
            }
            installed
        });
        Self {
            name: "installing Debian's packages",
            handle: std::sync::Mutex::new(Some(handle)),
            result: std::sync::OnceLock::new(),
        }
    }

    /// Waits for the work (the first call) and returns its result (every call).
    pub fn wait(&self) -> Result<(), String> {
        self.result
            .get_or_init(|| {
                let handle = self
                    .handle
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
                match handle {
                    Some(handle) => handle
                        .join()
                        .unwrap_or_else(|_| Err(format!("{} panicked", self.name))),
                    None => Err(format!("{} was never started", self.name)),
                }
            })
            .clone()
    }
}

pub fn lockfile(out: &Output) -> Result<(), String> {
    let root = workspace_root();
    if root.join("Cargo.lock").exists() {
        return Ok(());
    }
    out.run(cmd("cargo", &["generate-lockfile"]).current_dir(&root))
}

pub fn wasm_target(out: &Output) -> Result<(), String> {
    let targets = output(&mut cmd("rustup", &["target", "list", "--installed"]))?;
    if targets
        .lines()
        .any(|t| t.trim() == "wasm32-unknown-unknown")
    {
        return Ok(());
    }
    out.run(&mut cmd(
        "rustup",
        &["target", "add", "wasm32-unknown-unknown"],
    ))
}

/// wasm-opt from npm's `binaryen` (Debian's is too old), for release web builds.
pub fn wasm_opt(out: &Output) -> Result<(), String> {
    let binaryen_major = BINARYEN_VERSION.split('.').next().unwrap_or_default();
    let wasm_opt_ok =
        version_of("wasm-opt").is_some_and(|v| v.contains(&format!("version {binaryen_major}")));
    if wasm_opt_ok {
        return Ok(());
    }
    let dir = node_tools_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {dir:?}: {e}"))?;
    let package = format!("binaryen@{BINARYEN_VERSION}");
    let prefix = dir.to_string_lossy().into_owned();
    out.run(&mut cmd(
        "npm",
        &[
            "install",
            "--prefix",
            &prefix,
            "--no-audit",
            "--no-fund",
            &package,
        ],
    ))
}

pub fn nextest(out: &Output) -> Result<(), String> {
    if version_of("cargo-nextest").is_some()
        || output(&mut cmd("cargo", &["nextest", "--version"])).is_ok()
    {
        return Ok(());
    }
    out.run(&mut cmd("cargo", &["install", "cargo-nextest", "--locked"]))
}

/// A timed step of `cargo xtask test`.
pub struct Step {
    name: String,
    started: Instant,
}

impl Step {
    pub fn start(name: &str) -> Self {
        println!("\n==> {name}");
        Self {
            name: name.to_owned(),
            started: Instant::now(),
        }
    }

    /// One summary line: the step, its outcome and how long it took.
    pub fn finish(self, ok: bool) -> String {
        let line = format!(
            "{:<40} {} {:>7.1}s",
            self.name,
            if ok { "ok  " } else { "FAIL" },
            self.started.elapsed().as_secs_f64()
        );
        println!("<== {line}");
        line
    }
}

/// The size of `path` after `gzip -9`.
pub fn gzip_size(path: &std::path::Path) -> Result<u64, String> {
    let output = Command::new("gzip")
        .args(["-9", "-c"])
        .arg(path)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run gzip: {e}"))?;
    if !output.status.success() {
        return Err(format!("gzip failed on {}", path.display()));
    }
    Ok(output.stdout.len() as u64)
}

/// Debian's Chromium and ChromeDriver for the browser tests, installed when missing (the tests
/// never download a browser).
pub fn browser() -> Result<(), String> {
    if chromium_present() {
        return Ok(());
    }
    apt_install(&["chromium", "chromium-driver"], &Output::Terminal)?;
    if chromium_present() {
        Ok(())
    } else {
        Err("chromium and chromium-driver are not installed".to_owned())
    }
}

fn chromium_present() -> bool {
    let present = |path: &str| std::path::Path::new(path).exists();
    present("/usr/bin/chromium") && present("/usr/bin/chromedriver")
}

/// Debian's `redis-server` (and `redis-cli`): the cluster tests start their own servers.
pub fn redis() -> Result<(), String> {
    if redis_present() {
        return Ok(());
    }
    apt_install(&["redis-server"], &Output::Terminal)?;
    if on_path("redis-server") {
        Ok(())
    } else {
        Err("redis-server is not installed".to_owned())
    }
}

fn redis_present() -> bool {
    on_path("redis-server") && on_path("redis-cli")
}

/// True if `program` runs (`--version`).
pub fn on_path(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// `apt-get install` of Debian packages (through sudo unless root).
pub fn apt_install(packages: &[&str], out: &Output) -> Result<(), String> {
    println!("xtask: installing {} from Debian", packages.join(", "));
    let apt = |args: &[&str]| {
        let mut command = if running_as_root() {
            cmd("apt-get", args)
        } else {
            let mut sudo = cmd("sudo", &["apt-get"]);
            sudo.args(args);
            sudo
        };
        command.env("DEBIAN_FRONTEND", "noninteractive");
        out.run(&mut command)
    };
    apt(&["update"])?;
    let mut install = vec!["install", "-y"];
    install.extend_from_slice(packages);
    apt(&install)
}

pub fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
