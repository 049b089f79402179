//! JSON reports under the output directory, one file per scenario run, with what was measured
//! and where: the commit, the machine, the server.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::{stamp::now_micros, target::Target};

/// Writes `<out_dir>/<name>.json` (the latest run) and a timestamped copy, and returns the
/// path of the latter.
pub fn write(out_dir: &Path, name: &str, target: &Target, result: Value) -> Result<PathBuf> {
    let report = json!({
        "scenario": name,
        "unix_time": now_micros() / 1_000_000,
        "commit": commit(),
        "machine": {
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        },
        "server": {
            "under_test": target.description,
            "url": target.http_base,
            "pid": target.server_pid,
            "second_instance": target.second.as_ref().map(|second| json!({
                "url": second.http_base,
                "pid": second.pid,
            })),
            "redis_pid": target.redis_pid,
        },
        "result": result,
    });
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let text = serde_json::to_string_pretty(&report)?;
    let latest = out_dir.join(format!("{name}.json"));
    let dated = out_dir.join(format!("{name}-{}.json", now_micros() / 1_000_000));
    for path in [&latest, &dated] {
        std::fs::write(path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(dated)
}

/// The short hash of the checked-out commit, if this runs inside a git work tree.
pub fn commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// KiB as MiB with one decimal, for summary lines.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
