//! Latency samples and their percentiles.

use serde::Serialize;

/// Latencies in microseconds. Kept whole (4 bytes each) rather than bucketed: a full stream
/// run records a few million, and exact percentiles are worth that much memory.
#[derive(Default)]
pub struct Latencies {
    micros: Vec<u32>,
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latencies {
    pub fn record(&mut self, micros: u64) {
        self.micros.push(u32::try_from(micros).unwrap_or(u32::MAX));
    }

    pub fn merge(&mut self, other: Latencies) {
        if self.micros.is_empty() {
            self.micros = other.micros;
        } else {
            self.micros.extend(other.micros);
        }
    }

    pub fn summary(&mut self) -> Summary {
        if self.micros.is_empty() {
            return Summary::default();
        }
        self.micros.sort_unstable();
        let at = |quantile: f64| {
            let last = self.micros.len() - 1;
            // Nearest rank: the smallest sample with at least `quantile` of samples at or below.
            let rank = (quantile * self.micros.len() as f64).ceil() as usize;
            f64::from(self.micros[rank.saturating_sub(1).min(last)]) / 1000.0
        };
        Summary {
            count: self.micros.len(),
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            max_ms: at(1.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut latencies = Latencies::default();
        for micros in 1..=1000 {
            latencies.record(micros * 1000);
        }
        let summary = latencies.summary();
        assert_eq!(summary.count, 1000);
        assert_eq!(summary.p50_ms, 500.0);
        assert_eq!(summary.p99_ms, 990.0);
        assert_eq!(summary.max_ms, 1000.0);
    }

    #[test]
    fn merging_keeps_every_sample() {
        let mut a = Latencies::default();
        a.record(1);
        let mut b = Latencies::default();
        b.record(2);
        b.record(3);
        a.merge(b);
        assert_eq!(a.summary().count, 3);
    }
}

/// Failures counted by message. Only the first few distinct messages are kept, so a failure
/// that names an address cannot grow the report without bound.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Errors {
    pub total: u64,
    pub by_message: std::collections::BTreeMap<String, u64>,
}

const DISTINCT_ERRORS: usize = 10;

impl Errors {
    pub fn add(&mut self, message: String) {
        self.total += 1;
        let key = self.key(message);
        *self.by_message.entry(key).or_default() += 1;
    }

    pub fn merge(&mut self, other: Errors) {
        self.total += other.total;
        for (message, count) in other.by_message {
            let key = self.key(message);
            *self.by_message.entry(key).or_default() += count;
        }
    }

    fn key(&self, message: String) -> String {
        if self.by_message.len() < DISTINCT_ERRORS || self.by_message.contains_key(&message) {
            message
        } else {
            "(other)".to_owned()
        }
    }
}
