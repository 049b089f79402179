//! Reconnect delays: exponential backoff with full jitter, capped (the AWS architecture blog's
//! "full jitter": a uniformly random delay in `[0, min(cap, base · 2^attempt)]`), so that many
//! clients dropped at once do not reconnect in lockstep.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Default for Backoff {
    /// 500 ms doubling, capped at 30 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(500), Duration::from_secs(30))
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The ceiling of the next delay (before jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(20));
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay, given a uniform random number in `[0, 1)`; counts an attempt.
    pub fn next_delay(&mut self, random: f64) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(random.clamp(0.0, 1.0))
    }

    /// Failed attempts since the last success.
    #[cfg(test)]
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// A connection succeeded: start over from the base delay.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let ceilings: Vec<u128> = (0..9)
            .map(|_| {
                let ceiling = backoff.ceiling().as_millis();
                backoff.next_delay(0.5);
                ceiling
            })
            .collect();
        assert_eq!(
            ceilings,
            vec![500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
    }

    #[test]
    fn delays_are_jittered_within_the_ceiling() {
        let mut backoff = Backoff::default();
        assert_eq!(backoff.next_delay(0.0), Duration::ZERO);
        assert_eq!(backoff.next_delay(0.5), Duration::from_millis(500));
        assert_eq!(backoff.next_delay(0.999_999).as_millis(), 1999);
        // Out-of-range randomness is clamped, never above the ceiling.
        assert_eq!(backoff.next_delay(7.0), Duration::from_secs(4));
    }

    #[test]
    fn success_resets_the_schedule() {
        let mut backoff = Backoff::default();
        for _ in 0..5 {
            backoff.next_delay(1.0);
        }
        assert_eq!(backoff.attempts(), 5);
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(500));
    }
}
