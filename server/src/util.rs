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
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut out = match (base.find("://"), base.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &base[scheme_end + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &base[..scheme_end + 3],
                    &credentials[..colon],
                    &base[at..]
                ),
                None => base.to_owned(),
            }
        }
        _ => base.to_owned(),
    };
    if let Some(query) = query {
        let hidden: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) => format!("{name}=***"),
                None => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&hidden.join("&"));
    }
    out
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
    }
}
