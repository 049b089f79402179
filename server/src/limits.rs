//! Rate limits: a token bucket for a single connection, and keyed limits (per client address,
//! account or user), counted across instances in a cluster.

use std::{
    collections::HashMap,
    fmt::Display,
    hash::Hash,
    sync::{Arc, Mutex},
    time::Instant,
};

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
    pub fn new(rate: Rate) -> Self {
        Self {
            buckets: Mutex::new(Buckets {
                by_key: HashMap::new(),
                sweep_at: MIN_SWEEP,
            }),
            burst: rate.burst,
            per_second: rate.per_second,
        }
    }

    pub fn per_minute(burst: u32, per_minute: f64) -> Self {
        Self::new(Rate::per_minute(burst, per_minute))
    }

    fn buckets(&self) -> std::sync::MutexGuard<'_, Buckets<K>> {
        crate::util::lock(&self.buckets)
    }

    /// Takes one event from `key`'s allowance if there is one.
    pub fn take(&self, key: K) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets();
        // Keys back at a full allowance are forgotten whenever the map has doubled since the
        // last sweep: amortised O(1) per take.
        if buckets.by_key.len() >= buckets.sweep_at {
            buckets.sweep(now);
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

impl<K: Hash + Eq> Buckets<K> {
    /// Forgets the keys back at a full allowance.
    fn sweep(&mut self, now: Instant) {
        self.by_key.retain(|_, bucket| !bucket.is_full_at(now));
        // Memory follows the keys: a spike of keys is not held at its peak.
        if self.by_key.capacity() > 4 * self.by_key.len().max(MIN_SWEEP) {
            self.by_key.shrink_to_fit();
        }
        self.sweep_at = (self.by_key.len() * 2).max(MIN_SWEEP);
    }
}

/// Below this many keys a `RefundableLimiter` never sweeps.
const MIN_SWEEP: usize = 1_024;

/// A rate per key, as configured: `burst` events at once and `per_second` sustained.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub burst: u32,
    pub per_second: f64,
}

impl Rate {
    pub fn per_minute(burst: u32, per_minute: f64) -> Self {
        Self {
            burst,
            per_second: per_minute / 60.0,
        }
    }
}

/// Where rates are counted across instances: nowhere for one instance, Redis for a cluster.
#[async_trait::async_trait]
pub trait SharedRates: Send + Sync + 'static {
    /// Takes one event from `key`'s allowance across instances: `Some(true)` taken,
    /// `Some(false)` refused, `None` not counted (nothing shared, or it could not answer now).
    async fn take(&self, key: &str, rate: Rate) -> Option<bool>;
    /// Gives back an event `take` took for something that did not happen.
    async fn give_back(&self, key: &str, rate: Rate);
}

/// One instance: nothing is shared, each instance's own count is the whole count.
pub struct Unshared;

#[async_trait::async_trait]
impl SharedRates for Unshared {
    async fn take(&self, _key: &str, _rate: Rate) -> Option<bool> {
        None
    }

    async fn give_back(&self, _key: &str, _rate: Rate) {}
}

/// A rate per key (a user, a client address, an account) that holds across instances: this
/// instance's own bucket first, then the shared count. A take the shared count refuses keeps
/// this instance's token spent, so a client that keeps asking one instance is refused there,
/// without a round trip, once that instance's own allowance is spent too (each instance sends
/// Redis at most its own burst and rate per key). If the shared count cannot answer, the
/// instance's own count decides: a Redis outage loosens a limit to one allowance per instance,
/// it does not refuse everyone.
pub struct SharedLimit<K: Hash + Eq> {
    /// Names the shared keys: `wadi:rate:{name}:{key}`.
    name: &'static str,
    rate: Rate,
    local: RefundableLimiter<K>,
    shared: Arc<dyn SharedRates>,
}

/// An event [`SharedLimit::take`] counted, to give back if it did not happen after all.
#[must_use = "dropped, the event stays counted; give it back if it did not happen"]
pub struct Taken<K> {
    key: K,
    /// Whether the shared count counted it too (only then is it given back there).
    shared: bool,
}

impl<K: Hash + Eq + Clone + Display> SharedLimit<K> {
    pub fn new(name: &'static str, rate: Rate, shared: Arc<dyn SharedRates>) -> Self {
        Self {
            name,
            rate,
            local: RefundableLimiter::new(rate),
            shared,
        }
    }

    /// Takes one event from `key`'s allowance if there is one, here and across instances.
    pub async fn take(&self, key: K) -> Option<Taken<K>> {
        if !self.local.take(key.clone()) {
            return None;
        }
        let shared = match self.shared.take(&self.shared_key(&key), self.rate).await {
            Some(false) => return None,
            Some(true) => true,
            None => false,
        };
        Some(Taken { key, shared })
    }

    /// Takes one event, for a limit whose events are never given back.
    pub async fn allows(&self, key: K) -> bool {
        self.take(key).await.is_some()
    }

    /// Gives back an event that did not happen, where it was counted.
    pub async fn give_back(&self, taken: Taken<K>) {
        self.local.give_back(&taken.key);
        if taken.shared {
            self.shared
                .give_back(&self.shared_key(&taken.key), self.rate)
                .await;
        }
    }

    fn shared_key(&self, key: &K) -> String {
        format!("wadi:rate:{}:{key}", self.name)
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
    fn a_million_keys_cost_a_take_each_and_sweeps_only_at_doublings() {
        let limiter = RefundableLimiter::per_minute(2, 0.0);
        for key in 0..1_000_000u32 {
            assert!(limiter.take(key));
        }
        assert_eq!(limiter.len(), 1_000_000);
        // Nothing could be freed: the next sweep waits until the map has doubled again.
        assert!(limiter.buckets().sweep_at >= 1_000_000);
        assert!(limiter.take(7), "a second event within the burst");
        assert!(!limiter.take(7), "a third is over it");
    }

    #[test]
    fn a_spike_of_keys_gives_its_memory_back_once_they_are_forgotten() {
        let limiter = RefundableLimiter::per_minute(1, 60.0);
        for key in 0..100_000u32 {
            assert!(limiter.take(key));
        }
        let mut buckets = limiter.buckets();
        let peak = buckets.by_key.capacity();
        assert!(peak >= 100_000);
        // A second later every bucket is whole again (one event a second).
        buckets.sweep(Instant::now() + Duration::from_secs(2));
        assert!(buckets.by_key.is_empty());
        assert!(
            buckets.by_key.capacity() < peak / 4,
            "{}",
            buckets.by_key.capacity()
        );
    }
}
