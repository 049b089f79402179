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

    /// `postgres://…` to store everything in Postgres (several instances can share it), or
    /// `sqlite:…`. Default: `wadi.db` in the data directory.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,

    /// The URL users reach this server at (e.g. `https://chat.example.com`). Used as the
    /// embedded auth service's token issuer (`{public_url}/auth/v1`).
    #[arg(long, env = "WADI_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// A Supabase project URL. When set, WADI accepts that project's users (verifying their
    /// tokens with the project's JWKS) instead of running its embedded auth service.
    #[arg(long, env = "SUPABASE_URL")]
    pub supabase_url: Option<String>,

    /// The project's legacy JWT secret, to accept HS256 access tokens.
    #[arg(long, env = "SUPABASE_JWT_SECRET", hide_env_values = true)]
    pub supabase_jwt_secret: Option<String>,

    /// The project's anon (publishable) key, handed to the browser for its auth calls.
    #[arg(long, env = "SUPABASE_ANON_KEY", hide_env_values = true)]
    pub supabase_anon_key: Option<String>,

    /// Required `iss` of access tokens. Default: `{SUPABASE_URL}/auth/v1` with Supabase, the
    /// embedded service's own issuer otherwise.
    #[arg(long, env = "WADI_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Clock skew tolerated when checking a token's `exp`.
    #[arg(long, env = "WADI_JWT_LEEWAY", value_parser = parse_duration, default_value = "10s")]
    pub jwt_leeway: Duration,

    /// Shortest time between two JWKS fetches triggered by an unknown `kid`.
    #[arg(long, env = "WADI_JWKS_REFETCH_INTERVAL", value_parser = parse_duration, default_value = "60s")]
    pub jwks_refetch_interval: Duration,

    /// Lifetime of access tokens issued by the embedded auth service.
    #[arg(long, env = "WADI_ACCESS_TOKEN_TTL", value_parser = parse_duration, default_value = "3600s")]
    pub access_token_ttl: Duration,

    /// How long after a refresh the previous refresh token may still be used (concurrent tabs).
    #[arg(long, env = "WADI_REFRESH_REUSE_INTERVAL", value_parser = parse_duration, default_value = "10s")]
    pub refresh_reuse_interval: Duration,

    /// Shortest password the embedded auth service accepts (Supabase's default is 6).
    #[arg(long, env = "WADI_PASSWORD_MIN_LENGTH", default_value_t = 6)]
    pub password_min_length: usize,

    /// Signups and password logins a client address may make in a burst.
    #[arg(long, env = "WADI_AUTH_RATE_BURST", default_value_t = 30)]
    pub auth_rate_burst: u32,

    /// Signups and password logins a client address regains per minute after a burst.
    #[arg(long, env = "WADI_AUTH_RATE_PER_MINUTE", default_value_t = 6.0)]
    pub auth_rate_per_minute: f64,

    /// Take the client address from the first `X-Forwarded-For` entry (only behind a proxy you
    /// trust to set it).
    #[arg(long, env = "WADI_TRUST_FORWARDED_FOR")]
    pub trust_forwarded_for: bool,

    /// Largest message content accepted, in bytes (REST and WebSocket).
    #[arg(long, env = "WADI_MAX_CONTENT_BYTES", default_value_t = 32 * 1024)]
    pub max_content_bytes: usize,
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
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_url),
            )
            .field("public_url", &self.public_url)
            .field("supabase_url", &self.supabase_url)
            .field(
                "supabase_jwt_secret",
                &self.supabase_jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "supabase_anon_key",
                &self.supabase_anon_key.as_ref().map(|_| "<redacted>"),
            )
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_leeway", &self.jwt_leeway)
            .field("jwks_refetch_interval", &self.jwks_refetch_interval)
            .field("access_token_ttl", &self.access_token_ttl)
            .field("refresh_reuse_interval", &self.refresh_reuse_interval)
            .field("password_min_length", &self.password_min_length)
            .field("auth_rate_burst", &self.auth_rate_burst)
            .field("auth_rate_per_minute", &self.auth_rate_per_minute)
            .field("trust_forwarded_for", &self.trust_forwarded_for)
            .field("max_content_bytes", &self.max_content_bytes)
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
            database_url: None,
            public_url: None,
            supabase_url: None,
            supabase_jwt_secret: None,
            supabase_anon_key: None,
            jwt_issuer: None,
            jwt_leeway: Duration::from_secs(10),
            jwks_refetch_interval: Duration::from_secs(60),
            access_token_ttl: Duration::from_secs(3600),
            refresh_reuse_interval: Duration::from_secs(10),
            password_min_length: 6,
            auth_rate_burst: 30,
            auth_rate_per_minute: 6.0,
            trust_forwarded_for: false,
            max_content_bytes: 32 * 1024,
        }
    }

    /// The issuer the embedded auth service writes into its tokens.
    pub fn embedded_issuer(&self) -> String {
        match &self.public_url {
            Some(url) => format!("{}/auth/v1", url.trim_end_matches('/')),
            None => "wadi".to_owned(),
        }
    }
}

/// Hides the password in a database URL: `postgres://user:secret@host` → `postgres://user:***@host`.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
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
    fn debug_output_redacts_secrets() {
        let mut config = Config::for_tests("data".into());
        config.supabase_jwt_secret = Some("super-secret-value".into());
        config.database_url = Some("postgres://wadi:hunter2@db:5432/wadi".into());
        let text = format!("{config:?}");
        assert!(!text.contains("super-secret-value"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("postgres://wadi:***@db:5432/wadi"), "{text}");
    }

    #[test]
    fn defaults_need_no_configuration() {
        let config = Config::try_parse_from(["wadi"]).unwrap();
        assert_eq!(config.addr.port(), 8080);
        assert_eq!(config.shutdown_grace, Duration::from_secs(10));
    }
}
