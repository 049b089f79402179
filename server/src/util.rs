//! Small helpers shared across the server.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use time::OffsetDateTime;

/// Locks `mutex`, poisoned or not. The server's locks are held for short steps that do not
/// panic; should one panic anyway, later holders go on with the state it left rather than every
/// one of them panicking in turn (a socket, a run or the whole registry taken down by one bug).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads `lock`, poisoned or not (see `lock`).
pub fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Writes `lock`, poisoned or not (see `lock`).
pub fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// The time tokens are checked and timed against: the system's time when the clock was made,
/// advanced by tokio's clock since. In production the two move together; under a paused tokio
/// clock (tests), advancing tokio's time advances this too, so token expiry is tested without
/// waiting.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_ms: i64,
    base: tokio::time::Instant,
}

impl Clock {
    pub fn system() -> Self {
        Self {
            base_ms: now_millis(),
            base: tokio::time::Instant::now(),
        }
    }

    /// Now, in Unix milliseconds.
    pub fn now_millis(&self) -> i64 {
        let elapsed = i64::try_from(self.base.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.base_ms.saturating_add(elapsed)
    }

    /// Now, in Unix seconds.
    pub fn now_secs(&self) -> i64 {
        self.now_millis().div_euclid(1000)
    }
}

/// Now, in Unix milliseconds (how every timestamp is stored).
pub fn now_millis() -> i64 {
    let now = OffsetDateTime::now_utc();
    i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// A stored Unix-millisecond timestamp as a date-time (the epoch if out of range).
pub fn datetime(millis: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Bytes as lowercase hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A URL fit for logs: the password in its userinfo and the query's values hidden, except
/// those of parameters known to hold no secret (`postgres://user:***@host/db?sslmode=require&
/// sslpassword=***`); a libpq connection string (`host=db password=secret`) with its password
/// hidden. Anything else is returned unchanged.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|at| at + 3) else {
        return redact_conninfo(url);
    };
    let after_scheme = &url[scheme_end..];
    // The userinfo ends at the last `@` of the authority, which ends at the first `/`, `?` or
    // `#`. A password holding one of those unencoded (an invalid URL, shown all the same) moves
    // the userinfo's end to a later `@`: one followed by a plausible host, with no query (`=`)
    // before it.
    let authority_end = after_scheme
        .find(['/', '?', '#'])
        .unwrap_or(after_scheme.len());
    let userinfo_end = after_scheme[..authority_end].rfind('@').or_else(|| {
        after_scheme
            .rmatch_indices('@')
            .map(|(at, _)| at)
            .find(|&at| {
                let before = &after_scheme[..at];
                let host = &after_scheme[at + 1..];
                let host = &host[..host.find(['/', '?', '#']).unwrap_or(host.len())];
                before.contains(':')
                    && !before.contains('=')
                    && !host.is_empty()
                    && host.chars().all(|c| {
                        c.is_ascii_alphanumeric()
                            || matches!(c, '.' | '-' | '_' | ':' | '%' | '[' | ']')
                    })
            })
    });
    let mut out = url[..scheme_end].to_owned();
    let rest = match userinfo_end {
        Some(at) => {
            match after_scheme[..at].split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push_str(":***@");
                }
                None => out.push_str(&after_scheme[..=at]),
            }
            &after_scheme[at + 1..]
        }
        None => after_scheme,
    };
    match rest.split_once('?') {
        Some((path, query)) => {
            let hidden: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if !SHOWN_QUERY_PARAMETERS.contains(&name) => {
                        format!("{name}=***")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            out.push_str(path);
            out.push('?');
            out.push_str(&hidden.join("&"));
        }
        None => out.push_str(rest),
    }
    out
}

/// Query parameters of database and Redis URLs (libpq's, sqlx's, SQLite's, redis-rs's) whose
/// values are modes, names, numbers or file paths, never a secret: `redact_url` shows them, so
/// that a printed configuration says how it connects (and can be fed back as it is). Any other
/// parameter's value is hidden.
const SHOWN_QUERY_PARAMETERS: &[&str] = &[
    "application_name",
    "cache",
    "channel_binding",
    "connect_timeout",
    "db",
    "dbname",
    "gssencmode",
    "host",
    "hostaddr",
    "immutable",
    "keepalives",
    "keepalives_count",
    "keepalives_idle",
    "keepalives_interval",
    "load_balance_hosts",
    "mode",
    "port",
    "protocol",
    "sslcert",
    "sslcompression",
    "sslcrl",
    "sslkey",
    "sslmode",
    "sslnegotiation",
    "sslrootcert",
    "statement_cache_capacity",
    "target_session_attrs",
    "tcp_user_timeout",
    "user",
];

/// A libpq connection string (`host=db password=secret`, spaces allowed around `=`): the
/// values of its password keys hidden (a value may be quoted, with `\'` and `\\` inside:
/// `password='a \' b'`).
fn redact_conninfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('=') {
        let key = rest[..at]
            .trim_end()
            .rsplit(char::is_whitespace)
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        out.push_str(&rest[..=at]);
        rest = &rest[at + 1..];
        let spaces = rest.len() - rest.trim_start().len();
        out.push_str(&rest[..spaces]);
        rest = &rest[spaces..];
        let value_len = if let Some(quoted) = rest.strip_prefix('\'') {
            let mut escaped = false;
            quoted
                .char_indices()
                .find(|&(_, c)| {
                    let closes = c == '\'' && !escaped;
                    escaped = c == '\\' && !escaped;
                    closes
                })
                .map_or(rest.len(), |(end, _)| end + 2)
        } else {
            rest.find(char::is_whitespace).unwrap_or(rest.len())
        };
        if matches!(key.as_str(), "password" | "sslpassword") {
            out.push_str("***");
        } else {
            out.push_str(&rest[..value_len]);
        }
        rest = &rest[value_len..];
    }
    out.push_str(rest);
    out
}

/// True when a URL or connection string holds what [`redact_url`] put in place of a secret:
/// such a value is never the real one.
pub fn holds_redaction(value: &str) -> bool {
    value.contains(":***@") || value.contains("=***")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_urls_are_hidden_wherever_they_are() {
        assert_eq!(
            redact_url("postgres://wadi:hunter2@db:5432/wadi"),
            "postgres://wadi:***@db:5432/wadi"
        );
        assert_eq!(
            redact_url("redis://:pw@cache:6379"),
            "redis://:***@cache:6379"
        );
        assert_eq!(
            redact_url("postgres://db/wadi?user=wadi&password=hunter2"),
            "postgres://db/wadi?user=wadi&password=***"
        );
        assert_eq!(
            redact_url("https://llm.example.com/v1"),
            "https://llm.example.com/v1"
        );
        assert_eq!(redact_url("not a url"), "not a url");
        // Unencoded `?`, `/`, `#` and `@` in a password, and a password-only userinfo.
        assert_eq!(redact_url("postgres://u:p?x@h/db"), "postgres://u:***@h/db");
        assert_eq!(
            redact_url("postgres://u:a/b#c@d@h:5432/db?sslmode=require"),
            "postgres://u:***@h:5432/db?sslmode=require"
        );
        assert_eq!(redact_url("redis://:p@ss@cache"), "redis://:***@cache");
        // libpq's key=value form.
        assert_eq!(
            redact_url("host=db user=wadi password=kvSECRET dbname=wadi"),
            "host=db user=wadi password=*** dbname=wadi"
        );
        assert_eq!(
            redact_url("password='a secret' host=db"),
            "password=*** host=db"
        );
        assert_eq!(
            redact_url("info,wadi_server=debug"),
            "info,wadi_server=debug"
        );
        assert_eq!(
            redact_url("host=db password = s3cret user=w"),
            "host=db password = *** user=w"
        );
        assert_eq!(
            redact_url(r"password='a \' b' host=db"),
            "password=*** host=db"
        );
        // An `@` in the query is no userinfo.
        assert_eq!(
            redact_url("postgres://u:pw@db/wadi?options=a@b&sslpassword=SECRET"),
            "postgres://u:***@db/wadi?options=***&sslpassword=***"
        );
        assert_eq!(
            redact_url("https://h/v1?user=a@b&key=SECRET"),
            "https://h/v1?user=a@b&key=***"
        );
        assert_eq!(
            redact_url("https://h/v1?key=SECRET&user=a@b"),
            "https://h/v1?key=***&user=a@b"
        );
        assert_eq!(redact_url("https://h/v1/@cf"), "https://h/v1/@cf");
        // Modes, names and paths are shown; anything not known to be harmless is not.
        assert_eq!(
            redact_url("postgres://db/w?sslmode=verify-full&sslrootcert=/ca.pem&token=T&Mode=x"),
            "postgres://db/w?sslmode=verify-full&sslrootcert=/ca.pem&token=***&Mode=***"
        );
        assert_eq!(
            redact_url("sqlite://w.db?mode=rwc"),
            "sqlite://w.db?mode=rwc"
        );
        for redacted in [
            redact_url("postgres://u:p@h/db"),
            redact_url("host=db password=x"),
        ] {
            assert!(holds_redaction(&redacted), "{redacted}");
        }
        assert!(!holds_redaction("postgres://u:p@h/db"));
        assert!(!holds_redaction("replace personal data with <redacted>"));
    }
}
