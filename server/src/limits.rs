//! Rate limits: a token bucket for a single connection, and keyed limits (per client address,
//! account or user).

use std::{
    collections::HashMap,
    hash::Hash,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Allows `burst` events at once and `per_second` sustained.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    pub fn new(burst: u32, per_second: f64) -> Self {
        Self::new_at(burst, per_second, Instant::now())
    }

    fn new_at(burst: u32, per_second: f64, now: Instant) -> Self {
        let capacity = f64::from(burst.max(1));
        Self {
            capacity,
            per_second: per_second.max(0.0),
            tokens: capacity,
            updated: now,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self) -> bool {
        self.try_take_at(Instant::now())
    }

    fn try_take_at(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.updated = now;
    }

    /// Returns a token taken for an event that did not happen after all.
    fn give_back(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.capacity);
    }

    fn is_full_at(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.capacity
    }
}

/// A token bucket per key whose tokens can be given back: for a limit on what was done (a
/// message sent), checked before knowing whether it will be done (the conversation may be busy
/// answering). One lock over all keys: for events counted in tens a second, not per chunk.
pub struct RefundableLimiter<K: Hash + Eq> {
    buckets: Mutex<Buckets<K>>,
    burst: u32,
    per_second: f64,
}

struct Buckets<K> {
    by_key: HashMap<K, TokenBucket>,
    /// The next sweep is when this many keys are tracked (twice what the last one kept).
    sweep_at: usize,
}

impl<K: Hash + Eq> RefundableLimiter<K> {
    pub fn per_minute(burst: u32, per_minute: f64) -> Self {
        Self {
            buckets: Mutex::new(Buckets {
                by_key: HashMap::new(),
                sweep_at: MIN_SWEEP,
            }),
            burst,
            per_second: per_minute / 60.0,
        }
    }

    fn buckets(&self) -> std::sync::MutexGuard<'_, Buckets<K>> {
        match self.buckets.lock() {
            Ok(buckets) => buckets,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Takes one event from `key`'s allowance if there is one.
    pub fn take(&self, key: K) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets();
        // Keys back at a full allowance are forgotten whenever the map has doubled since the
        // last sweep: amortised O(1) per take.
        if buckets.by_key.len() >= buckets.sweep_at {
            buckets.by_key.retain(|_, bucket| !bucket.is_full_at(now));
            buckets.sweep_at = (buckets.by_key.len() * 2).max(MIN_SWEEP);
        }
        buckets
            .by_key
            .entry(key)
            .or_insert_with(|| TokenBucket::new_at(self.burst, self.per_second, now))
            .try_take_at(now)
    }

    /// Gives back the token `take` took for an event that did not happen.
    pub fn give_back(&self, key: &K) {
        if let Some(bucket) = self.buckets().by_key.get_mut(key) {
            bucket.give_back();
        }
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.buckets().by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets().by_key.is_empty()
    }
}

/// Below this many keys a `RefundableLimiter` never sweeps.
const MIN_SWEEP: usize = 1_024;

/// A rate limit per key (a client address, an account, a user): `governor`'s GCRA, one small
/// state per key in a sharded map, so a check is O(1) whatever the number of keys. Keys back
/// at a full allowance are forgotten by a janitor every minute, never during a check.
pub struct KeyedLimiter<K: Hash + Eq + Clone + Send + Sync + 'static> {
    limiter: Arc<DefaultKeyedRateLimiter<K>>,
}

/// How often forgotten keys are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

impl<K: Hash + Eq + Clone + Send + Sync + 'static> KeyedLimiter<K> {
    /// `burst` events at once, and `per_second` sustained (0: never more than the burst).
    pub fn new(burst: u32, per_second: f64) -> Self {
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let period = if per_second > 0.0 && per_second.is_finite() {
            Duration::from_secs_f64(1.0 / per_second).max(Duration::from_nanos(1))
        } else {
            // No refill to speak of: a century per token.
            Duration::from_secs(100 * 365 * 24 * 3600)
        };
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        let limiter = Arc::new(RateLimiter::keyed(quota));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&limiter);
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(SWEEP_EVERY);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let Some(limiter) = weak.upgrade() else {
                        return;
                    };
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
            });
        }
        Self { limiter }
    }

    /// Per minute, for configuration that is easier to read that way.
    pub fn per_minute(burst: u32, per_minute: f64) -> Self {
        Self::new(burst, per_minute / 60.0)
    }

    /// Takes one event from `key`'s allowance if there is one.
    pub fn check(&self, key: &K) -> bool {
        self.limiter.check_key(key).is_ok()
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn bucket_allows_a_burst_then_the_sustained_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new_at(3, 2.0, start);
        assert!(bucket.try_take_at(start));
        assert!(bucket.try_take_at(start));
        assert!(bucket.try_take_at(start));
        assert!(!bucket.try_take_at(start));
        // Half a second at 2/s buys exactly one more.
        let later = start + Duration::from_millis(500);
        assert!(bucket.try_take_at(later));
        assert!(!bucket.try_take_at(later));
        // Never more than the burst, however long it waits.
        let much_later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(bucket.try_take_at(much_later));
        }
        assert!(!bucket.try_take_at(much_later));
    }

    #[test]
    fn a_token_given_back_can_be_taken_again_but_never_beyond_the_burst() {
        let limiter = RefundableLimiter::per_minute(2, 0.0);
        assert!(limiter.take("a"));
        assert!(limiter.take("a"));
        assert!(!limiter.take("a"));
        limiter.give_back(&"a");
        assert!(limiter.take("a"), "given back");
        assert!(!limiter.take("a"));
        assert!(limiter.take("b"), "keys apart");
        for _ in 0..5 {
            limiter.give_back(&"b");
        }
        assert!(limiter.take("b"));
        assert!(limiter.take("b"));
        assert!(!limiter.take("b"), "never more than the burst");
        limiter.give_back(&"unknown");
        assert_eq!(limiter.len(), 2);
    }

    #[test]
    fn keys_back_at_a_full_allowance_are_forgotten() {
        // Refilled at once (a token a nanosecond or so): every key is full again by the sweep.
        let limiter = RefundableLimiter::per_minute(1, 60e9);
        for key in 0..100_000u32 {
            assert!(limiter.take(key));
        }
        assert!(limiter.len() < 100_000, "swept: {}", limiter.len());
        let limiter = RefundableLimiter::per_minute(1, 0.0);
        for key in 0..5_000u32 {
            assert!(limiter.take(key));
        }
        assert_eq!(limiter.len(), 5_000, "empty buckets are remembered");
        assert!(!limiter.take(7));
        // A sweep that frees nothing is not repeated on the next take.
        assert!(limiter.buckets().sweep_at > 5_000);
    }

    #[test]
    fn keyed_limiter_keeps_keys_apart() {
        let limiter = KeyedLimiter::new(1, 0.0);
        assert!(limiter.check(&"a"));
        assert!(!limiter.check(&"a"));
        assert!(limiter.check(&"b"));
    }

    #[test]
    fn a_million_keys_cost_a_check_each_and_no_sweep() {
        let limiter = KeyedLimiter::new(2, 0.0);
        for key in 0..1_000_000u32 {
            assert!(limiter.check(&key));
        }
        assert_eq!(limiter.len(), 1_000_000);
        assert!(limiter.check(&7), "a second event within the burst");
        assert!(!limiter.check(&7), "a third is over it");
    }
}
