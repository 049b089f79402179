//! Token buckets: one for a single connection, and a keyed set (per client address).

use std::{collections::HashMap, hash::Hash, sync::Mutex, time::Instant};

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
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// True once the bucket has refilled completely (it can be forgotten).
    fn is_full_at(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens + elapsed * self.per_second >= self.capacity
    }
}

/// One bucket per key (a client address), forgetting buckets that have refilled.
pub struct KeyedLimiter<K> {
    burst: u32,
    per_second: f64,
    buckets: Mutex<HashMap<K, TokenBucket>>,
}

/// Above this many tracked keys, refilled buckets are swept before adding another.
const SWEEP_ABOVE: usize = 10_000;

impl<K: Eq + Hash + Clone> KeyedLimiter<K> {
    pub fn new(burst: u32, per_second: f64) -> Self {
        Self {
            burst,
            per_second,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Per minute, for configuration that is easier to read that way.
    pub fn per_minute(burst: u32, per_minute: f64) -> Self {
        Self::new(burst, per_minute / 60.0)
    }

    /// Takes one token from `key`'s bucket if there is one.
    pub fn check(&self, key: &K) -> bool {
        let now = Instant::now();
        let mut buckets = match self.buckets.lock() {
            Ok(buckets) => buckets,
            Err(poisoned) => poisoned.into_inner(),
        };
        if buckets.len() > SWEEP_ABOVE {
            buckets.retain(|_, bucket| !bucket.is_full_at(now));
        }
        buckets
            .entry(key.clone())
            .or_insert_with(|| TokenBucket::new_at(self.burst, self.per_second, now))
            .try_take_at(now)
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
    fn keyed_limiter_keeps_keys_apart() {
        let limiter = KeyedLimiter::new(1, 0.0);
        assert!(limiter.check(&"a"));
        assert!(!limiter.check(&"a"));
        assert!(limiter.check(&"b"));
    }
}
