//! Server configuration: CLI flags, each with an environment variable, and defaults that work on
//! a fresh machine with nothing else running.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

#[derive(Clone, Parser)]
#[command(
    name = "wadi",
    version,
    about = "WADI: a self-hosted real-time AI chat server"
)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "WADI_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    /// Directory for the SQLite database and the embedded auth signing key. Created if missing.
    #[arg(long, env = "WADI_DATA_DIR", default_value = "wadi-data")]
    pub data_dir: PathBuf,

    /// Directory holding the built web app (trunk's `dist/`). When unset, the assets embedded in
    /// the binary are served, or a page explaining how to build them.
    #[arg(long, env = "WADI_WEB_DIR")]
    pub web_dir: Option<PathBuf>,

    /// Log output format.
    #[arg(long, env = "WADI_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// How long shutdown waits for active runs to save before exiting anyway.
    #[arg(long, env = "WADI_SHUTDOWN_GRACE", value_parser = parse_duration, default_value = "10s")]
    pub shutdown_grace: Duration,
}

impl std::fmt::Debug for Config {
    // Written out by hand so that secrets added to the config are redacted, never logged.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("addr", &self.addr)
            .field("data_dir", &self.data_dir)
            .field("web_dir", &self.web_dir)
            .field("log_format", &self.log_format)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish()
    }
}

impl Config {
    /// A configuration for tests: every default, data in `data_dir`.
    pub fn for_tests(data_dir: PathBuf) -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir,
            web_dir: None,
            log_format: LogFormat::Text,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Parses `250ms`, `10s`, `5m`, `1h` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 250ms, 10s, 5m or 1h"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} (use ms, s, m or h)"
            ));
        }
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("{text:?} is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn defaults_need_no_configuration() {
        let config = Config::try_parse_from(["wadi"]).unwrap();
        assert_eq!(config.addr.port(), 8080);
        assert_eq!(config.shutdown_grace, Duration::from_secs(10));
    }
}
