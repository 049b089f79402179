//! When to refresh an access token: about a minute before it expires, as Supabase's clients do,
//! so that a slow refresh still lands in time. Short-lived tokens refresh at three quarters of
//! their life instead, so a 20-second token is not refreshed in a loop.

use std::time::Duration;

/// How long before expiry a normal (hour-long) token is refreshed.
pub const REFRESH_MARGIN_SECS: i64 = 60;

/// How long a refresh that failed for now (network, 5xx, 429) waits before the next attempt.
pub const REFRESH_RETRY: Duration = Duration::from_secs(5);

/// The margin for a token valid from `issued_at` to `expires_at` (Unix seconds): a minute, or a
/// quarter of its lifetime when that is shorter (at least one second).
pub fn margin(issued_at: i64, expires_at: i64) -> i64 {
    let lifetime = (expires_at - issued_at).max(0);
    (lifetime / 4).clamp(1, REFRESH_MARGIN_SECS)
}

/// How long to wait from `now` before refreshing. Zero when the token is inside its margin or
/// already expired.
pub fn refresh_delay(issued_at: i64, expires_at: i64, now: i64) -> Duration {
    let secs = expires_at - margin(issued_at, expires_at) - now;
    Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// True when the token should be refreshed before it is used.
pub fn needs_refresh(issued_at: i64, expires_at: i64, now: i64) -> bool {
    refresh_delay(issued_at, expires_at, now).is_zero()
}

/// When to reload after a `resync` whose window is `within_ms`, given a uniform random number
/// in `[0, 1)`: every socket on the server's instance was told at once, so each picks its own
/// moment in the window.
pub fn resync_delay(within_ms: u64, random: f64) -> Duration {
    let share = if random.is_nan() {
        0.0
    } else {
        random.clamp(0.0, 1.0)
    };
    Duration::from_millis(within_ms).mul_f64(share)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resync_reloads_land_anywhere_in_the_window_and_never_past_it() {
        assert_eq!(resync_delay(0, 0.7), Duration::ZERO);
        assert_eq!(resync_delay(2_000, 0.0), Duration::ZERO);
        assert_eq!(resync_delay(2_000, 0.25), Duration::from_millis(500));
        assert_eq!(resync_delay(2_000, 7.0), Duration::from_secs(2));
        assert_eq!(resync_delay(2_000, -1.0), Duration::ZERO);
        assert_eq!(resync_delay(2_000, f64::NAN), Duration::ZERO);
    }

    #[test]
    fn hour_long_tokens_refresh_a_minute_early() {
        let issued = 6_400;
        let expires = issued + 3_600;
        assert_eq!(
            refresh_delay(issued, expires, issued),
            Duration::from_secs(3_540)
        );
        assert_eq!(refresh_delay(issued, expires, expires - 60), Duration::ZERO);
        assert_eq!(
            refresh_delay(issued, expires, expires - 61),
            Duration::from_secs(1)
        );
        assert_eq!(
            refresh_delay(issued, expires, expires + 100),
            Duration::ZERO
        );
        assert!(needs_refresh(issued, expires, expires - 10));
        assert!(!needs_refresh(issued, expires, issued + 100));
    }

    #[test]
    fn short_lived_tokens_refresh_at_three_quarters_of_their_life() {
        // A 20 s token (as the end-to-end tests configure) refreshes after 15 s, not at once.
        assert_eq!(refresh_delay(1_000, 1_020, 1_000), Duration::from_secs(15));
        assert_eq!(margin(1_000, 1_002), 1);
        assert_eq!(margin(1_000, 1_000), 1);
    }
}
