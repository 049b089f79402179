//! How busy this instance is: the event loop's lag, measured by a task that asks to wake every
//! [`PROBE`] and records how late it woke. A loop that lags delays every chunk of every run;
//! past the configured lag, new runs are refused so the running ones stay smooth.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

/// How often the lag is probed.
const PROBE: Duration = Duration::from_millis(100);
/// What a refused client is told to wait.
pub const RETRY_AFTER: Duration = Duration::from_secs(2);

#[derive(Default)]
pub(super) struct Load {
    /// The last probe's lag, in microseconds.
    lag_micros: Arc<AtomicU64>,
}

impl Load {
    /// Starts probing (unless `threshold` is zero: nobody reads the lag then).
    pub(super) fn watch_lag(&self, threshold: Duration) {
        if threshold.is_zero() {
            return;
        }
        let lag = Arc::downgrade(&self.lag_micros);
        tokio::spawn(async move {
            loop {
                let asked = Instant::now() + PROBE;
                tokio::time::sleep_until(asked).await;
                let late = Instant::now().saturating_duration_since(asked);
                let Some(lag) = lag.upgrade() else {
                    return;
                };
                lag.store(
                    u64::try_from(late.as_micros()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
            }
        });
    }

    pub(super) fn lag(&self) -> Duration {
        Duration::from_micros(self.lag_micros.load(Ordering::Relaxed))
    }
}
