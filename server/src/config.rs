//! Server configuration. Every setting is written once, as a clap argument in the settings struct
//! of the subsystem that uses it ([`AuthSettings`], [`RunSettings`], …, flattened into
//! [`Config`]); from that one definition come the flag, its environment variable, its default,
//! its key in a `--config` file, its line in `wadi config print`, the redacting `Debug`, and the
//! defaults tests start from ([`Config::for_tests`]).
//!
//! Precedence: flags, then environment variables, then the `--config` file, then the defaults.
//! The defaults work on a fresh machine with nothing else running.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use clap::{Arg, ArgAction, ArgMatches, Args, CommandFactory, FromArgMatches, Parser, ValueEnum};

use crate::util::redact_url;
pub use crate::{
    auth::AuthSettings, model::ProviderSettings, net::ProxySettings, runs::RunSettings,
    ws::SocketSettings,
};

/// The `wadi` command line: the server's settings, and what to do (serve, by default).
#[derive(Clone, Debug, Parser)]
#[command(
    name = "wadi",
    version,
    about = "WADI: a self-hosted real-time AI chat server",
    after_help = "Every setting can also come from its environment variable or a --config file \
                  (flags win over the environment, which wins over the file)."
)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum Command {
    /// Serve (what `wadi` alone does).
    Serve,
    /// The effective configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Operator tasks on the database this configuration points at.
    #[command(subcommand)]
    Admin(crate::admin::AdminCommand),
    /// Exit 0 if the server at `--addr` answers `/healthz` (for container health checks).
    Healthcheck,
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Print every setting's effective value and where it came from, secrets redacted, as a
    /// TOML file `--config` accepts.
    Print,
    /// Print every setting as the README's Markdown tables.
    Table,
}

#[derive(Clone, Debug, Args)]
pub struct Config {
    /// A TOML file of settings: the flags' names as keys (`max-connections = 19000` or
    /// `max_connections = 19000`). Flags and environment variables override it.
    #[arg(long, env = "WADI_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address to listen on.
    #[arg(long, env = "WADI_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    /// Directory for the SQLite database and the embedded auth signing key. Created if missing.
    #[arg(long, env = "WADI_DATA_DIR", default_value = "wadi-data")]
    pub data_dir: PathBuf,

    /// Directory holding the built web app (`dist/`, made by `cargo xtask web`). When unset, the
    /// assets embedded in the binary are served, or a page explaining how to build them.
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
    pub database_url: Option<SecretUrl>,

    /// `redis://…`: cluster mode. Several instances on one Postgres share each run's live log,
    /// "run started" and stop through this Redis, so any instance can follow, resume or stop
    /// any run. Requires a Postgres `DATABASE_URL`.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<SecretUrl>,

    /// The URL users reach this server at (e.g. `https://chat.example.com`). Used as the
    /// embedded auth service's token issuer (`{public_url}/auth/v1`), and turns on HSTS when it
    /// is `https://`.
    #[arg(long, env = "WADI_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// Serve `/metrics` on this address only (e.g. `127.0.0.1:9090`), off the public port.
    #[arg(long, env = "WADI_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Require `Authorization: Bearer <this>` for `/metrics`.
    #[arg(long, env = "WADI_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<Secret>,

    /// Export traces (HTTP requests, sockets, runs, and what they log) to this OpenTelemetry
    /// endpoint over OTLP/HTTP with JSON, e.g. `http://otel-collector:4318` (spans go to
    /// `/v1/traces`).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// The `service.name` of exported traces.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "wadi")]
    pub otlp_service_name: String,

    #[command(flatten, next_help_heading = "Auth")]
    pub auth: AuthSettings,

    #[command(flatten, next_help_heading = "Reverse proxies")]
    pub proxies: ProxySettings,

    #[command(flatten, next_help_heading = "Model")]
    pub provider: ProviderSettings,

    #[command(flatten, next_help_heading = "Runs and messages")]
    pub runs: RunSettings,

    #[command(flatten, next_help_heading = "Sockets")]
    pub sockets: SocketSettings,
}

/// A secret setting (an API key, a token): shown as `<redacted>` by `Debug` and `config print`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self(text.to_owned()))
    }
}

impl From<&str> for Secret {
    fn from(text: &str) -> Self {
        Self(text.to_owned())
    }
}

impl From<String> for Secret {
    fn from(text: String) -> Self {
        Self(text)
    }
}

/// A URL that may carry credentials (`postgres://user:password@…`, `?api-key=…`): shown with
/// them redacted by `Debug`, `Display` and `config print`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// The URL with its credentials, for the one place that connects with it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

impl std::fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl FromStr for SecretUrl {
    type Err = std::convert::Infallible;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self(text.to_owned()))
    }
}

impl From<&str> for SecretUrl {
    fn from(text: &str) -> Self {
        Self(text.to_owned())
    }
}

impl From<String> for SecretUrl {
    fn from(text: String) -> Self {
        Self(text)
    }
}

/// The command line resolved against the environment and the `--config` file.
pub struct Loaded {
    pub cli: Cli,
    matches: ArgMatches,
    command: clap::Command,
    /// The settings the file gave (their ids).
    from_file: BTreeSet<String>,
}

impl Cli {
    /// Parses the process's arguments, environment and `--config` file; exits with a message
    /// (or the help) when they are wrong.
    pub fn load_or_exit() -> Loaded {
        Self::load(std::env::args_os(), true).unwrap_or_else(|error| error.exit())
    }

    /// Parses `args` (the program name first), with the process environment when `env` is true,
    /// and the `--config` file they (or `WADI_CONFIG`) name.
    pub fn load(
        args: impl IntoIterator<Item = impl Into<OsString>>,
        env: bool,
    ) -> Result<Loaded, clap::Error> {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let mut command = Self::command();
        if !env {
            command = command.mut_args(|arg| arg.env(None));
        }
        // First pass: only to find the file (errors are reported by the second pass).
        let file = command
            .clone()
            .ignore_errors(true)
            .try_get_matches_from(&args)
            .ok()
            .and_then(|matches| matches.get_one::<PathBuf>("config").cloned());
        let mut from_file = BTreeSet::new();
        if let Some(path) = file {
            let values = read_file(&command, &path)?;
            for (id, values) in values {
                command = command.mut_arg(&id, |arg| arg.default_values(values));
                from_file.insert(id);
            }
        }
        let matches = command.clone().try_get_matches_from(&args)?;
        refuse_redacted(&command, &matches)?;
        let cli = Self::from_arg_matches(&matches).map_err(|error| error.format(&mut command))?;
        if let Err(message) = cli.config.check() {
            return Err(command.error(clap::error::ErrorKind::ValueValidation, message));
        }
        Ok(Loaded {
            cli,
            matches,
            command,
            from_file,
        })
    }
}

impl Config {
    /// What no single setting's parser can see: settings that only make sense together.
    fn check(&self) -> Result<(), String> {
        let runs = &self.runs;
        if runs.instance_heartbeat.is_zero() {
            return Err("--instance-heartbeat must be more than 0".into());
        }
        if Some(runs.instance_timeout) < runs.instance_heartbeat.checked_mul(2) {
            return Err(format!(
                "--instance-timeout ({:?}) must be at least twice --instance-heartbeat ({:?}): \
                 an instance that heartbeats on time would be declared dead",
                runs.instance_timeout, runs.instance_heartbeat
            ));
        }
        if runs.model_idle_timeout.is_zero() {
            return Err("--model-idle-timeout must be more than 0".into());
        }
        if runs.max_content_bytes == 0 {
            return Err("--max-content-bytes must be at least 1".into());
        }
        if runs.max_answer_bytes == 0 {
            return Err("--max-answer-bytes must be at least 1".into());
        }
        Ok(())
    }
}

/// Whether `config print` shows `value` of setting `id` through [`redact_url`]: URLs, and the
/// database's connection string in any form (free text such as a system prompt is shown as it
/// is).
fn shown_redacted(id: &str, value: &str) -> bool {
    value.contains("://") || id == "database_url"
}

/// A value `config print` redacted (`<redacted>`, a URL's `:***@`) is refused: fed back from
/// a printed file, it would be used as the secret itself (an API key `<redacted>`, a database
/// password `***`).
fn refuse_redacted(command: &clap::Command, matches: &ArgMatches) -> Result<(), clap::Error> {
    for arg in settings(command) {
        let id = arg.get_id().as_str();
        let Some(mut values) = matches.get_raw(id) else {
            continue;
        };
        let secret = arg.is_hide_env_values_set();
        if values.any(|value| {
            let value = value.to_string_lossy();
            (secret && value.contains("<redacted>"))
                || (shown_redacted(id, &value) && crate::util::holds_redaction(&value))
        }) {
            let key = arg.get_long().unwrap_or(id);
            let env = arg
                .get_env()
                .map(|env| format!(" or ${}", env.to_string_lossy()))
                .unwrap_or_default();
            return Err(command.clone().error(
                clap::error::ErrorKind::InvalidValue,
                format!(
                    "{key} holds what `wadi config print` shows in place of a secret (`<redacted>` \
                     or `***`), not the secret: give the real value (--{key}{env})"
                ),
            ));
        }
    }
    Ok(())
}

/// The settings of a `--config` file as clap default values, by argument id. Unknown keys,
/// tables and unreadable files are errors (a typo must not be ignored silently).
fn read_file(
    command: &clap::Command,
    path: &Path,
) -> Result<BTreeMap<String, Vec<String>>, clap::Error> {
    let fail = |message: String| {
        command
            .clone()
            .error(clap::error::ErrorKind::InvalidValue, message)
    };
    let text = std::fs::read_to_string(path).map_err(|error| {
        fail(format!(
            "cannot read the config file {}: {error}",
            path.display()
        ))
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|error| fail(format!("{} is not valid TOML: {error}", path.display())))?;
    let settings: BTreeMap<&str, &Arg> = settings(command)
        .map(|arg| (arg.get_id().as_str(), arg))
        .collect();
    let mut values = BTreeMap::new();
    for (key, value) in table {
        let id = key.replace('-', "_");
        if id == "config" || !settings.contains_key(id.as_str()) {
            return Err(fail(format!(
                "{}: unknown setting {key:?} (the keys are the flags of `wadi --help`)",
                path.display()
            )));
        }
        let strings = match value {
            toml::Value::Array(items) => items
                .into_iter()
                .map(|item| scalar(&key, item))
                .collect::<Result<Vec<_>, _>>(),
            other => scalar(&key, other).map(|one| vec![one]),
        }
        .map_err(|message| fail(format!("{}: {message}", path.display())))?;
        if values.insert(id.clone(), strings).is_some() {
            return Err(fail(format!(
                "{}: {key:?} is given twice (as {} and {})",
                path.display(),
                id,
                id.replace('_', "-")
            )));
        }
    }
    Ok(values)
}

fn scalar(key: &str, value: toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(text) => Ok(text),
        toml::Value::Integer(number) => Ok(number.to_string()),
        toml::Value::Float(number) => Ok(number.to_string()),
        toml::Value::Boolean(flag) => Ok(flag.to_string()),
        other => Err(format!(
            "{key:?} must be a string, number, boolean or a list of them, not {}",
            other.type_str()
        )),
    }
}

/// The server's settings among a command's arguments (not `--help`, `--version`).
fn settings(command: &clap::Command) -> impl Iterator<Item = &Arg> {
    command.get_arguments().filter(|arg| {
        arg.get_long().is_some()
            && !matches!(arg.get_action(), ArgAction::Help | ArgAction::Version)
    })
}

impl Loaded {
    /// `wadi config print`: every setting as a TOML line `--config` accepts, with where its
    /// value came from; secrets redacted.
    pub fn print(&self) -> String {
        let mut out = String::from(
            "# The effective configuration of wadi (secrets redacted). Each line says where its\n\
             # value came from: flag, env (its variable), file, or default.\n",
        );
        if let Some(path) = &self.cli.config.config {
            out.push_str(&format!("# file: {}\n", path.display()));
        }
        for arg in settings(&self.command) {
            let id = arg.get_id().as_str();
            let Some(key) = arg.get_long() else { continue };
            if id == "config" {
                continue;
            }
            let source = match self.matches.value_source(id) {
                Some(clap::parser::ValueSource::CommandLine) => "flag".to_owned(),
                Some(clap::parser::ValueSource::EnvVariable) => format!(
                    "env {}",
                    arg.get_env()
                        .map(|e| e.to_string_lossy())
                        .unwrap_or_default()
                ),
                _ if self.from_file.contains(id) => "file".to_owned(),
                _ => "default".to_owned(),
            };
            let raw: Vec<String> = self
                .matches
                .get_raw(id)
                .map(|values| values.map(|v| v.to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            let secret = arg.is_hide_env_values_set();
            let flag = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
            let shown = |value: &str| -> String {
                if secret {
                    return "\"<redacted>\"".to_owned();
                }
                let number = !value.is_empty()
                    && value.chars().all(|c| c.is_ascii_digit() || c == '.')
                    && value.parse::<f64>().is_ok();
                if flag || number {
                    return value.to_owned();
                }
                if !shown_redacted(id, value) {
                    return toml::Value::String(value.to_owned()).to_string();
                }
                toml::Value::String(redact_url(value)).to_string()
            };
            let line = match raw.as_slice() {
                [] => {
                    out.push_str(&format!("# {key} is unset\n"));
                    continue;
                }
                [one] if arg.get_value_delimiter().is_none() => {
                    format!("{key} = {}", shown(one))
                }
                many => format!(
                    "{key} = [{}]",
                    many.iter().map(|v| shown(v)).collect::<Vec<_>>().join(", ")
                ),
            };
            out.push_str(&format!("{line:<60} # {source}\n"));
        }
        out
    }
}

/// Every setting as Markdown tables (one per help heading): flag, environment variable,
/// default, meaning. The README holds exactly this (a test checks it).
pub fn settings_table() -> String {
    let command = Cli::command();
    let mut out = String::new();
    let mut heading = None;
    for arg in settings(&command) {
        let Some(long) = arg.get_long() else { continue };
        if arg.get_help_heading() != heading || out.is_empty() {
            heading = arg.get_help_heading();
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(&format!(
                "**{}**\n\n| Flag | Environment | Default | Meaning |\n|---|---|---|---|\n",
                heading.unwrap_or("Server")
            ));
        }
        let env = arg
            .get_env()
            .map_or_else(String::new, |env| format!("`{}`", env.to_string_lossy()));
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|value| value.to_string_lossy().into_owned())
            .collect();
        let default = if defaults.is_empty() {
            "unset".to_owned()
        } else {
            format!("`{}`", defaults.join(","))
        };
        let help = arg
            .get_long_help()
            .or_else(|| arg.get_help())
            .map(|help| help.to_string())
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .replace('|', "\\|");
        out.push_str(&format!("| `--{long}` | {env} | {default} | {help} |\n"));
    }
    out
}

impl Config {
    /// The defaults, as `wadi` alone would start with no environment and no file.
    pub fn defaults() -> Self {
        match Cli::load(["wadi"], false) {
            Ok(loaded) => loaded.cli.config,
            Err(error) => unreachable!("the defaults must parse: {error}"),
        }
    }

    /// A configuration for tests: the defaults, data in `data_dir`, a free port, and what tests
    /// need quicker (instance liveness, the demo model) or off (the event-loop lag guard, which
    /// a loaded test machine would trip).
    pub fn for_tests(data_dir: PathBuf) -> Self {
        let mut config = Self::defaults();
        config.addr = SocketAddr::from(([127, 0, 0, 1], 0));
        config.data_dir = data_dir;
        config.shutdown_grace = Duration::from_secs(5);
        config.runs.instance_heartbeat = Duration::from_millis(200);
        config.runs.instance_timeout = Duration::from_secs(2);
        config.runs.max_loop_lag = Duration::ZERO;
        config.provider.demo_pace = Duration::from_millis(1);
        config
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
/// A sampling temperature: a number from 0 to 2, as OpenAI's API takes.
pub fn parse_temperature(text: &str) -> Result<f32, String> {
    let value: f32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if !(0.0..=2.0).contains(&value) {
        return Err(format!("{text:?} is not a temperature from 0 to 2"));
    }
    Ok(value)
}

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

    fn load(args: &[&str]) -> Loaded {
        let args = std::iter::once("wadi").chain(args.iter().copied());
        Cli::load(args, false).unwrap()
    }

    /// Why `args` are refused, or `None` if they load.
    fn refused(args: &[&str]) -> Option<String> {
        let args = std::iter::once("wadi").chain(args.iter().copied());
        Cli::load(args, false).err().map(|error| error.to_string())
    }

    /// Why the file `text` is refused as `--config`.
    fn refused_file(text: &str) -> String {
        let file = toml_file(text);
        refused(&["--config", file.path().to_str().unwrap()]).expect(text)
    }

    fn database_url(loaded: &Loaded) -> Option<&str> {
        loaded
            .cli
            .config
            .database_url
            .as_ref()
            .map(SecretUrl::expose)
    }

    fn toml_file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
        file
    }

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
        config.auth.supabase_jwt_secret = Some("super-secret-value".into());
        config.provider.openai_api_key = Some("sk-secret-key".into());
        config.database_url = Some("postgres://wadi:hunter2@db:5432/wadi".into());
        config.redis_url = Some("redis://:redis-secret@cache:6379/0".into());
        config.provider.openai_base_url =
            Some("https://llm.example.com/v1?api-key=azure-secret".into());
        config.metrics_token = Some("metrics-secret".into());
        let text = format!("{config:?}");
        for secret in [
            "super-secret-value",
            "sk-secret-key",
            "hunter2",
            "redis-secret",
            "azure-secret",
            "metrics-secret",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains("postgres://wadi:***@db:5432/wadi"), "{text}");
    }

    #[test]
    fn defaults_need_no_configuration() {
        let config = Config::defaults();
        assert_eq!(config.addr.port(), 8080);
        assert_eq!(config.shutdown_grace, Duration::from_secs(10));
        assert_eq!(config.sockets.max_connections, 19_000);
        assert!(config.database_url.is_none());
    }

    #[test]
    fn a_config_file_sets_defaults_that_flags_override() {
        let file = toml_file(
            "addr = \"0.0.0.0:9000\"\n\
             max-connections = 500\n\
             flush_interval = \"250ms\"\n\
             temperature = 0.5\n\
             trust-forwarded-for = true\n\
             allowed-origins = [\"https://a.example\", \"https://b.example\"]\n\
             openai-api-key = \"sk-from-file\"\n",
        );
        let path = file.path().to_str().unwrap();
        let loaded = load(&["--config", path, "--max-connections", "700"]);
        let config = &loaded.cli.config;
        assert_eq!(config.addr, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(config.sockets.max_connections, 700, "the flag wins");
        assert_eq!(config.runs.flush_interval, Duration::from_millis(250));
        assert_eq!(config.provider.temperature, Some(0.5));
        assert!(config.proxies.trust_forwarded_for);
        assert_eq!(
            config.sockets.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
        assert_eq!(
            config.provider.openai_api_key.as_ref().map(Secret::expose),
            Some("sk-from-file")
        );
        assert_eq!(
            config.sockets.send_queue, 256,
            "untouched settings keep their defaults"
        );
    }

    #[test]
    fn the_environment_overrides_the_file() {
        // Through clap's own precedence: an argument's environment variable beats its default
        // value, which is where the file's values go. Checked without touching the process
        // environment (tests run in parallel): the file must land as a default value.
        let file = toml_file("max-connections = 500\n");
        let path = file.path().to_str().unwrap();
        let loaded = load(&["--config", path]);
        assert_eq!(loaded.cli.config.sockets.max_connections, 500);
        assert_eq!(
            loaded.matches.value_source("max_connections"),
            Some(clap::parser::ValueSource::DefaultValue)
        );
        let env = Cli::command()
            .get_arguments()
            .find(|arg| arg.get_id() == "max_connections")
            .and_then(|arg| arg.get_env().map(|e| e.to_os_string()));
        assert_eq!(
            env.as_deref(),
            Some(std::ffi::OsStr::new("WADI_MAX_CONNECTIONS"))
        );
    }

    #[test]
    fn a_config_file_with_an_unknown_key_or_bad_value_is_refused() {
        let error = refused_file("max-conections = 5\n");
        assert!(
            error.contains("unknown setting \"max-conections\""),
            "{error}"
        );

        let error = refused_file("max-connections = \"many\"\n");
        assert!(error.contains("many"), "{error}");

        refused_file("[auth]\nx = 1\n");

        let missing = refused(&["--config", "/nonexistent/wadi.toml"]).unwrap();
        assert!(missing.contains("cannot read the config file"), "{missing}");

        let error = refused_file("max_connections = 5\nmax-connections = 6\n");
        assert!(error.contains("is given twice"), "{error}");
    }

    #[test]
    fn settings_that_cannot_work_are_refused() {
        for temperature in ["9", "-1", "nan", "inf", "1e400", "warm"] {
            let error = refused(&["--temperature", temperature]).expect(temperature);
            assert!(error.contains(temperature), "{error}");
        }
        assert!(refused(&["--temperature", "2"]).is_none());
        assert!(refused(&["--temperature", "0"]).is_none());
        // Free text may hold what redaction writes: only secrets and URLs are checked.
        let prompt = "Replace personal data with <redacted>; write password=*** as it is.";
        assert!(refused(&["--system-prompt", prompt]).is_none());
        let printed = load(&["--system-prompt", prompt]).print();
        assert!(printed.contains(prompt), "{printed}");
        let error = refused(&["--instance-timeout", "1s", "--instance-heartbeat", "5s"]).unwrap();
        assert!(
            error.contains("at least twice --instance-heartbeat"),
            "{error}"
        );
        assert!(refused(&["--instance-timeout", "4s", "--instance-heartbeat", "2s"]).is_none());
        for (flag, value) in [
            ("--instance-heartbeat", "0s"),
            ("--model-idle-timeout", "0"),
            ("--max-content-bytes", "0"),
        ] {
            let error = refused(&[flag, value]).expect(flag);
            assert!(error.contains(flag), "{error}");
        }
    }

    #[test]
    fn config_print_redacts_secrets_says_where_values_came_from_and_reads_back() {
        let file = toml_file(
            "max-connections = 500\n\
             database-url = \"postgres://wadi:hunter2@db/wadi\"\n\
             allowed-origins = [\"https://a.example\"]\n",
        );
        let path = file.path().to_str().unwrap();
        let loaded = load(&[
            "--config",
            path,
            "--openai-api-key",
            "sk-secret",
            "--flush-interval",
            "2s",
        ]);
        let printed = loaded.print();
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("sk-secret"), "{printed}");
        let line = |key: &str| {
            printed
                .lines()
                .find(|line| line.starts_with(&format!("{key} ")))
                .unwrap_or_else(|| panic!("no {key} in {printed}"))
                .to_owned()
        };
        assert!(line("max-connections").contains("= 500"), "{printed}");
        assert!(line("max-connections").ends_with("# file"), "{printed}");
        assert!(line("flush-interval").contains("\"2s\""), "{printed}");
        assert!(line("flush-interval").ends_with("# flag"), "{printed}");
        assert!(line("send-queue").ends_with("# default"), "{printed}");
        assert!(line("openai-api-key").contains("<redacted>"), "{printed}");
        assert!(printed.contains("# web-dir is unset"), "{printed}");

        // Printed, it is a file `--config` reads to the same configuration once the secrets it
        // redacted are given again (a flag here; their environment variables do as well).
        // Without them it is refused: the placeholders are not the secrets.
        let plain = load(&["--config", path, "--flush-interval", "2s"]);
        assert!(!plain.print().contains("hunter2"));
        let again = toml_file(&plain.print());
        let again = again.path().to_str().unwrap();
        let error = refused(&["--config", again]).unwrap();
        assert!(
            error.contains("database-url holds what `wadi config print` shows"),
            "{error}"
        );
        let reread = load(&[
            "--config",
            again,
            "--database-url",
            "postgres://wadi:hunter2@db/wadi",
        ]);
        let mut expected = plain.cli.config.clone();
        expected.config = reread.cli.config.config.clone();
        assert_eq!(format!("{:?}", reread.cli.config), format!("{expected:?}"));
        assert_eq!(
            database_url(&reread),
            Some("postgres://wadi:hunter2@db/wadi")
        );
        // An API key printed as `<redacted>` is refused alike.
        let error = refused_file("openai-api-key = \"<redacted>\"\n");
        assert!(error.contains("openai-api-key holds"), "{error}");

        // A URL without a secret (trust or certificate auth) reads back as it is: its query's
        // modes and paths are shown, not hidden.
        let url = "postgres://wadi@db/wadi?sslmode=verify-full&sslrootcert=/etc/ca.pem";
        let printed = load(&["--database-url", url]).print();
        assert!(printed.contains(url), "{printed}");
        let again = toml_file(&printed);
        let reread = load(&["--config", again.path().to_str().unwrap()]);
        assert_eq!(database_url(&reread), Some(url));
    }

    #[test]
    fn the_readme_lists_every_setting_as_defined() {
        let readme = include_str!("../../README.md");
        let table = settings_table();
        assert!(table.contains("| `--max-connections` | `WADI_MAX_CONNECTIONS` | `19000` |"));
        assert!(
            readme.contains(&table),
            "README's configuration tables differ from the settings: paste the output of \
             `cargo run -p wadi-server -- config table` into README.md"
        );
    }
}
