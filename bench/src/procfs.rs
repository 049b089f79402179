//! What a process costs, from `/proc`: resident memory and CPU time.

use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use serde::Serialize;

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    /// `VmRSS` in KiB.
    pub rss_kib: u64,
    /// User plus system CPU time of all its threads, in seconds.
    pub cpu_seconds: f64,
}

pub fn usage(pid: u32) -> Result<Usage> {
    Ok(Usage {
        rss_kib: rss_kib(pid)?,
        cpu_seconds: cpu_seconds(pid)?,
    })
}

/// Reads a process if there is one to read (`None` when benchmarking a server we did not start
/// and were not given the pid of).
pub fn usage_of(pid: Option<u32>) -> Result<Option<Usage>> {
    pid.map(usage).transpose()
}

fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .with_context(|| format!("no VmRSS in {path}"))?;
    let kib = line.trim().trim_end_matches("kB").trim();
    kib.parse()
        .with_context(|| format!("bad VmRSS {line:?} in {path}"))
}

fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    // Then field 3 (state) is index 0, utime (field 14) index 11, stime (field 15) index 12.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        bail!("unexpected format of {path}");
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| -> Result<u64> {
        fields
            .get(index)
            .and_then(|field| field.parse().ok())
            .with_context(|| format!("no field {} in {path}", index + 3))
    };
    Ok((ticks(11)? + ticks(12)?) as f64 / clock_ticks_per_second())
}

/// `sysconf(_SC_CLK_TCK)` without unsafe code: `getconf CLK_TCK`, else Linux's usual 100.
fn clock_ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let usage = usage(std::process::id()).unwrap();
        assert!(usage.rss_kib > 0);
        assert!(usage.cpu_seconds >= 0.0);
    }
}
