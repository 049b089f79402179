//! Small helpers shared across the server.

use time::OffsetDateTime;

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

/// A URL fit for logs: the password in its userinfo and every query value hidden
/// (`postgres://user:***@host/db?sslpassword=***`). Anything that is not a URL is returned
/// unchanged.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|at| at + 3) else {
        return redact_conninfo(url);
    };
    // The credentials end at the last `@`: a password may hold `?`, `/`, `#` or `@` unencoded.
    let (mut out, rest) = match url[scheme_end..].rfind('@').map(|at| scheme_end + at) {
        Some(at) => {
            let credentials = &url[scheme_end..at];
            let shown = match credentials.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => credentials.to_owned(),
            };
            (format!("{}{shown}@", &url[..scheme_end]), &url[at + 1..])
        }
        None => (url[..scheme_end].to_owned(), &url[scheme_end..]),
    };
    match rest.split_once('?') {
        Some((path, query)) => {
            let hidden: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) => format!("{name}=***"),
                    None => pair.to_owned(),
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

/// A libpq connection string (`host=db password=secret`): the values of its password keys
/// hidden (a value may be quoted: `password='a b'`).
fn redact_conninfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('=') {
        let key = rest[..at]
            .rsplit(char::is_whitespace)
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        out.push_str(&rest[..=at]);
        rest = &rest[at + 1..];
        let value_len = if let Some(quoted) = rest.strip_prefix('\'') {
            quoted.find('\'').map_or(rest.len(), |end| end + 2)
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

/// True when `value` holds what [`redact_url`] or `config print` put in place of a secret: such
/// a value is never the real one.
pub fn holds_redaction(value: &str) -> bool {
    value.contains("<redacted>") || value.contains(":***@") || value.contains("=***")
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
            "postgres://db/wadi?user=***&password=***"
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
            "postgres://u:***@h:5432/db?sslmode=***"
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
        for redacted in [
            redact_url("postgres://u:p@h/db"),
            redact_url("host=db password=x"),
            "<redacted>".to_owned(),
        ] {
            assert!(holds_redaction(&redacted), "{redacted}");
        }
        assert!(!holds_redaction("postgres://u:p@h/db"));
    }
}
