//! Send-time stamps carried inside the token text. The fake upstream writes the time it sends
//! each token; the generator reads it back when the chunk arrives. Both read the same realtime
//! clock of this machine, so the difference is the time the token spent in the server (plus the
//! kernel and both ends' scheduling), on one clock.

use std::time::{SystemTime, UNIX_EPOCH};

const OPEN: &str = "[t=";

/// Microseconds since the Unix epoch.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
        })
}

/// The text of one token sent at `micros`: `[t=1764100000000000] `.
pub fn token(micros: u64) -> String {
    format!("{OPEN}{micros}] ")
}

/// Every stamp in a chunk's content, in order. The server may merge several waiting tokens
/// into one chunk, so a chunk can hold many.
pub fn stamps(content: &str) -> impl Iterator<Item = u64> + '_ {
    content.split(OPEN).skip(1).filter_map(|rest| {
        rest.split_once(']')
            .and_then(|(digits, _)| digits.parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_merged_chunk_yields_every_stamp() {
        let content = format!("{}{}", token(17), token(42));
        assert_eq!(stamps(&content).collect::<Vec<_>>(), vec![17, 42]);
        assert_eq!(stamps("plain text").count(), 0);
    }

    #[test]
    fn the_clock_is_after_2020() {
        assert!(now_micros() > 1_577_836_800_000_000);
    }
}
