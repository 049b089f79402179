//! Server configuration: CLI flags, each with an environment variable, and defaults that work on
//! a fresh machine with nothing else running.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

use crate::util::redact_url;

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

    /// `redis://…`: cluster mode. Several instances on one Postgres share each run's live log,
    /// "run started" and stop through this Redis, so any instance can follow, resume or stop
    /// any run. Requires a Postgres `DATABASE_URL`.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,

    /// How often this instance heartbeats into the database, checks its runs for stop requests,
    /// and reaps the runs of instances that stopped heartbeating.
    #[arg(long, env = "WADI_INSTANCE_HEARTBEAT", value_parser = parse_duration, default_value = "2s")]
    pub instance_heartbeat: Duration,

    /// An instance that has not heartbeated for this long is dead: another instance saves its
    /// runs as `interrupted` with what they had produced, and it may never write them again.
    #[arg(long, env = "WADI_INSTANCE_TIMEOUT", value_parser = parse_duration, default_value = "15s")]
    pub instance_timeout: Duration,

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

    /// How many reverse proxies in front of the server append the address they see to
    /// `X-Forwarded-For` (nginx alone: 1; a cloud load balancer then nginx: 2). The client is the
    /// entry that many hops from the right; entries further left are whatever the client sent.
    /// 0: the TCP peer is the client.
    #[arg(long, env = "WADI_TRUSTED_PROXIES", default_value_t = 0)]
    pub trusted_proxies: usize,

    /// Or: the networks of the trusted proxies, comma-separated (`10.0.0.0/8,fd00::/8`); the
    /// client is the right-most `X-Forwarded-For` hop outside them.
    #[arg(long, env = "WADI_TRUSTED_PROXY_CIDRS", value_delimiter = ',')]
    pub trusted_proxy_cidrs: Vec<crate::net::Cidr>,

    /// Deprecated: the same as `--trusted-proxies 1`.
    #[arg(long, env = "WADI_TRUST_FORWARDED_FOR")]
    pub trust_forwarded_for: bool,

    /// Password logins one account may attempt in a burst (whatever addresses they come from)…
    #[arg(long, env = "WADI_LOGIN_RATE_BURST", default_value_t = 10)]
    pub login_rate_burst: u32,

    /// …and per minute after it.
    #[arg(long, env = "WADI_LOGIN_RATE_PER_MINUTE", default_value_t = 10.0)]
    pub login_rate_per_minute: f64,

    /// Refresh-token grants a client address may make in a burst…
    #[arg(long, env = "WADI_REFRESH_RATE_BURST", default_value_t = 60)]
    pub refresh_rate_burst: u32,

    /// …and per minute after it.
    #[arg(long, env = "WADI_REFRESH_RATE_PER_MINUTE", default_value_t = 30.0)]
    pub refresh_rate_per_minute: f64,

    /// Conversations a user may create in a burst…
    #[arg(long, env = "WADI_CONVERSATION_RATE_BURST", default_value_t = 30)]
    pub conversation_rate_burst: u32,

    /// …and per minute after it.
    #[arg(
        long,
        env = "WADI_CONVERSATION_RATE_PER_MINUTE",
        default_value_t = 30.0
    )]
    pub conversation_rate_per_minute: f64,

    /// Largest message content accepted, in bytes (REST and WebSocket).
    #[arg(long, env = "WADI_MAX_CONTENT_BYTES", default_value_t = 32 * 1024)]
    pub max_content_bytes: usize,

    // ---- Model ----
    /// API key of an OpenAI-compatible provider. With neither this nor a base URL, the demo
    /// model answers.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<String>,

    /// Base URL of an OpenAI-compatible API (e.g. `http://localhost:11434/v1` for Ollama).
    #[arg(long, env = "OPENAI_BASE_URL")]
    pub openai_base_url: Option<String>,

    /// The model to ask.
    #[arg(long, env = "WADI_MODEL", default_value = "gpt-4o-mini")]
    pub model: String,

    /// A system prompt sent before the conversation.
    #[arg(long, env = "WADI_SYSTEM_PROMPT")]
    pub system_prompt: Option<String>,

    /// Sampling temperature (0–2); the provider's default when unset.
    #[arg(long, env = "WADI_TEMPERATURE")]
    pub temperature: Option<f32>,

    /// How many of the conversation's latest messages are sent to the model.
    #[arg(long, env = "WADI_HISTORY_MESSAGES", default_value_t = 20)]
    pub history_messages: u32,

    /// Time allowed to connect to the model provider.
    #[arg(long, env = "WADI_MODEL_CONNECT_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub model_connect_timeout: Duration,

    /// A run fails if the provider sends nothing for this long (including before the first token).
    #[arg(long, env = "WADI_MODEL_IDLE_TIMEOUT", value_parser = parse_duration, default_value = "60s")]
    pub model_idle_timeout: Duration,

    /// Pause between the demo model's words.
    #[arg(long, env = "WADI_DEMO_PACE", value_parser = parse_duration, default_value = "40ms")]
    pub demo_pace: Duration,

    // ---- Streaming ----
    /// Extra time to gather deltas into one chunk for very fast models (0: only deltas already
    /// waiting are merged, adding no delay).
    #[arg(long, env = "WADI_COALESCE_WINDOW", value_parser = parse_duration, default_value = "0s")]
    pub coalesce_window: Duration,

    /// How often a streaming run's output is saved (it is always saved when the run ends).
    #[arg(long, env = "WADI_FLUSH_INTERVAL", value_parser = parse_duration, default_value = "1s")]
    pub flush_interval: Duration,

    /// How long a finished run's chunks stay in memory for exact replay (`afterSeq`).
    #[arg(long, env = "WADI_RUN_RETENTION", value_parser = parse_duration, default_value = "10m")]
    pub run_retention: Duration,

    // ---- WebSocket limits ----
    /// A socket must authenticate within this time.
    #[arg(long, env = "WADI_AUTH_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub auth_timeout: Duration,

    /// Largest WebSocket frame accepted, in bytes.
    #[arg(long, env = "WADI_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    pub max_frame_bytes: usize,

    /// Frames a socket may send per second, sustained…
    #[arg(long, env = "WADI_WS_RATE_PER_SECOND", default_value_t = 10.0)]
    pub ws_rate_per_second: f64,

    /// …and in a burst.
    #[arg(long, env = "WADI_WS_RATE_BURST", default_value_t = 20)]
    pub ws_rate_burst: u32,

    /// Messages a user may send per minute, sustained (REST and WebSocket together)…
    #[arg(long, env = "WADI_MESSAGE_RATE_PER_MINUTE", default_value_t = 20.0)]
    pub message_rate_per_minute: f64,

    /// …and in a burst.
    #[arg(long, env = "WADI_MESSAGE_RATE_BURST", default_value_t = 10)]
    pub message_rate_burst: u32,

    /// Open sockets allowed per user.
    #[arg(long, env = "WADI_MAX_CONNECTIONS_PER_USER", default_value_t = 100)]
    pub max_connections_per_user: usize,

    /// Open sockets allowed in total.
    #[arg(long, env = "WADI_MAX_CONNECTIONS", default_value_t = 19_000)]
    pub max_connections: usize,

    /// Open sockets allowed per client address (IPv6: per /64; behind trusted proxies, the
    /// address they saw). Raise it for many users behind one NAT.
    #[arg(long, env = "WADI_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = 1000)]
    pub max_connections_per_address: usize,

    /// Sockets that have not authenticated yet, in total: a flood of them cannot take the
    /// places of authenticated users.
    #[arg(long, env = "WADI_MAX_PENDING_CONNECTIONS", default_value_t = 2000)]
    pub max_pending_connections: usize,

    /// …and per client address.
    #[arg(long, env = "WADI_MAX_PENDING_PER_ADDRESS", default_value_t = 100)]
    pub max_pending_per_address: usize,

    /// Server-Sent Events streams (`/api/runs/{id}/events`) open at once per user.
    #[arg(long, env = "WADI_MAX_SSE_PER_USER", default_value_t = 16)]
    pub max_sse_per_user: usize,

    /// Frames queued per socket before the client counts as slow.
    #[arg(long, env = "WADI_SEND_QUEUE", default_value_t = 256)]
    pub send_queue: usize,

    /// Bytes queued per socket before the client counts as slow (one frame larger than this,
    /// such as a long answer's `complete`, is still sent alone).
    #[arg(long, env = "WADI_SEND_QUEUE_BYTES", default_value_t = 1024 * 1024)]
    pub send_queue_bytes: usize,

    /// A socket whose queue stays full, or whose writes stall, this long is closed.
    #[arg(long, env = "WADI_SLOW_CLIENT_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub slow_client_timeout: Duration,

    /// Interval of server pings; a socket silent for two intervals is closed.
    #[arg(long, env = "WADI_HEARTBEAT_INTERVAL", value_parser = parse_duration, default_value = "30s")]
    pub heartbeat_interval: Duration,

    /// Past this many runs driven by this instance at once, new messages are refused with
    /// `overloaded` (and a retry hint) while the running answers go on (0: no cap).
    #[arg(long, env = "WADI_MAX_ACTIVE_RUNS", default_value_t = 0)]
    pub max_active_runs: usize,

    /// Past this much event-loop lag, new messages are refused with `overloaded` (0: not
    /// checked). The running answers' chunks are delayed by that much already.
    #[arg(long, env = "WADI_MAX_LOOP_LAG", value_parser = parse_duration, default_value = "100ms")]
    pub max_loop_lag: Duration,

    /// Serve `/metrics` on this address only (e.g. `127.0.0.1:9090`), off the public port.
    #[arg(long, env = "WADI_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Require `Authorization: Bearer <this>` for `/metrics`.
    #[arg(long, env = "WADI_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,

    /// Browser origins allowed to open sockets, comma-separated (`*` for any). The server's own
    /// origin is always allowed; clients that send no `Origin` (non-browsers) are too.
    #[arg(long, env = "WADI_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
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
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("instance_heartbeat", &self.instance_heartbeat)
            .field("instance_timeout", &self.instance_timeout)
            .field("public_url", &self.public_url)
            .field(
                "supabase_url",
                &self.supabase_url.as_deref().map(redact_url),
            )
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
            .field("trusted_proxies", &self.trusted_proxies)
            .field("trusted_proxy_cidrs", &self.trusted_proxy_cidrs)
            .field("trust_forwarded_for", &self.trust_forwarded_for)
            .field("login_rate_burst", &self.login_rate_burst)
            .field("login_rate_per_minute", &self.login_rate_per_minute)
            .field("refresh_rate_burst", &self.refresh_rate_burst)
            .field("refresh_rate_per_minute", &self.refresh_rate_per_minute)
            .field("conversation_rate_burst", &self.conversation_rate_burst)
            .field(
                "conversation_rate_per_minute",
                &self.conversation_rate_per_minute,
            )
            .field("max_content_bytes", &self.max_content_bytes)
            .field(
                "openai_api_key",
                &self.openai_api_key.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "openai_base_url",
                &self.openai_base_url.as_deref().map(redact_url),
            )
            .field("model", &self.model)
            .field("system_prompt", &self.system_prompt)
            .field("temperature", &self.temperature)
            .field("history_messages", &self.history_messages)
            .field("model_connect_timeout", &self.model_connect_timeout)
            .field("model_idle_timeout", &self.model_idle_timeout)
            .field("demo_pace", &self.demo_pace)
            .field("coalesce_window", &self.coalesce_window)
            .field("flush_interval", &self.flush_interval)
            .field("run_retention", &self.run_retention)
            .field("auth_timeout", &self.auth_timeout)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("ws_rate_per_second", &self.ws_rate_per_second)
            .field("ws_rate_burst", &self.ws_rate_burst)
            .field("message_rate_per_minute", &self.message_rate_per_minute)
            .field("message_rate_burst", &self.message_rate_burst)
            .field("max_connections_per_user", &self.max_connections_per_user)
            .field("max_connections", &self.max_connections)
            .field(
                "max_connections_per_address",
                &self.max_connections_per_address,
            )
            .field("max_pending_connections", &self.max_pending_connections)
            .field("max_pending_per_address", &self.max_pending_per_address)
            .field("max_sse_per_user", &self.max_sse_per_user)
            .field("send_queue", &self.send_queue)
            .field("send_queue_bytes", &self.send_queue_bytes)
            .field("slow_client_timeout", &self.slow_client_timeout)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("max_active_runs", &self.max_active_runs)
            .field("max_loop_lag", &self.max_loop_lag)
            .field("metrics_addr", &self.metrics_addr)
            .field(
                "metrics_token",
                &self.metrics_token.as_ref().map(|_| "<redacted>"),
            )
            .field("allowed_origins", &self.allowed_origins)
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
            redis_url: None,
            instance_heartbeat: Duration::from_millis(200),
            instance_timeout: Duration::from_secs(2),
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
            trusted_proxies: 0,
            trusted_proxy_cidrs: Vec::new(),
            trust_forwarded_for: false,
            login_rate_burst: 10,
            login_rate_per_minute: 10.0,
            refresh_rate_burst: 60,
            refresh_rate_per_minute: 30.0,
            conversation_rate_burst: 30,
            conversation_rate_per_minute: 30.0,
            max_content_bytes: 32 * 1024,
            openai_api_key: None,
            openai_base_url: None,
            model: "gpt-4o-mini".to_owned(),
            system_prompt: None,
            temperature: None,
            history_messages: 20,
            model_connect_timeout: Duration::from_secs(10),
            model_idle_timeout: Duration::from_secs(60),
            demo_pace: Duration::from_millis(1),
            coalesce_window: Duration::ZERO,
            flush_interval: Duration::from_secs(1),
            run_retention: Duration::from_secs(600),
            auth_timeout: Duration::from_secs(10),
            max_frame_bytes: 64 * 1024,
            ws_rate_per_second: 10.0,
            ws_rate_burst: 20,
            message_rate_per_minute: 20.0,
            message_rate_burst: 10,
            max_connections_per_user: 100,
            max_connections: 19_000,
            max_connections_per_address: 1000,
            max_pending_connections: 2000,
            max_pending_per_address: 100,
            max_sse_per_user: 16,
            send_queue: 256,
            send_queue_bytes: 1024 * 1024,
            slow_client_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(30),
            max_active_runs: 0,
            max_loop_lag: Duration::ZERO,
            metrics_addr: None,
            metrics_token: None,
            allowed_origins: Vec::new(),
        }
    }

    /// Which proxies' `X-Forwarded-For` entries are believed.
    pub fn proxy_trust(&self) -> crate::net::ProxyTrust {
        let hops = if self.trusted_proxies == 0 && self.trust_forwarded_for {
            1
        } else {
            self.trusted_proxies
        };
        crate::net::ProxyTrust {
            hops,
            networks: self.trusted_proxy_cidrs.clone(),
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
        config.openai_api_key = Some("sk-secret-key".into());
        config.database_url = Some("postgres://wadi:hunter2@db:5432/wadi".into());
        config.redis_url = Some("redis://:redis-secret@cache:6379/0".into());
        config.openai_base_url = Some("https://llm.example.com/v1?api-key=azure-secret".into());
        let text = format!("{config:?}");
        assert!(!text.contains("super-secret-value"), "{text}");
        assert!(!text.contains("sk-secret-key"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("redis-secret"), "{text}");
        assert!(!text.contains("azure-secret"), "{text}");
        assert!(text.contains("postgres://wadi:***@db:5432/wadi"), "{text}");
    }

    #[test]
    fn defaults_need_no_configuration() {
        let config = Config::try_parse_from(["wadi"]).unwrap();
        assert_eq!(config.addr.port(), 8080);
        assert_eq!(config.shutdown_grace, Duration::from_secs(10));
    }
}
