//! Small helpers shared across the server.

use time::OffsetDateTime;

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
