//! Feeds a mirror: a copy, on this instance, of a run driven elsewhere (or already saved), so
//! that local sockets follow it exactly as they follow a run driven here.
//!
//! The feeder subscribes to the run's live events first (when there is a shared log), then
//! reads the log and the store, so nothing appended in between is missed; it applies chunks in
//! seq order only, and fills any gap from the log or, failing that, from the store's checkpoint
//! (live delivery is at most once). When the run ends it takes the outcome from the store, which
//! is authoritative. Without live events (a single instance, or the log unreachable) it reads the
//! store every flush interval. It stops once nobody follows the mirror.
//!
//! Once a stop is asked of the run on this instance, the feeder reads the store soon and often
//! until the run ends there: the end's event may never come (Redis away), and the stop's asker
//! should not wait for the watchdog to learn what its stop did.

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use tokio::time::Instant;

use wadi_protocol::RunStatus;

use super::{
    Runs,
    cluster::LiveEvent,
    handle::{Ending, RunHandle},
};
use crate::{
    dto,
    store::{ChunkEnds, RunRecord},
};

/// With live events, the store is checked after this long without one (a lost end, an owner
/// that died between saving and announcing the end).
const WATCHDOG: Duration = Duration::from_secs(5);
/// A log says a run ended but the store does not show it yet: asked again this often, this many
/// times, before the watchdog takes over.
const END_RETRY: Duration = Duration::from_millis(100);
const END_RETRIES: u32 = 20;
/// After a stop was asked here, the store is read this long after it, then twice as long after
/// each read, up to `STOP_POLL_MAX`, until the run has ended (see `StopPolls`).
const STOP_POLL_FIRST: Duration = Duration::from_millis(100);
const STOP_POLL_MAX: Duration = Duration::from_millis(500);

/// The store reads after a stop was asked here: soon and often, for as long as a live owner
/// takes to see the stop in the store (`RunSettings::stop_landing`, as long as a REST stop
/// waits). Past that the owner does not answer; its run ends when it is reaped, which the end's
/// event or the watchdog brings.
struct StopPolls {
    next: Duration,
    until: Option<Instant>,
}

impl StopPolls {
    fn new() -> Self {
        Self {
            next: STOP_POLL_FIRST,
            until: None,
        }
    }

    /// True while the store is read soon and often: a stop was `asked`, not longer than
    /// `patience` ago.
    fn active(&mut self, asked: bool, patience: Duration) -> bool {
        if !asked {
            return false;
        }
        let until = *self.until.get_or_insert_with(|| Instant::now() + patience);
        Instant::now() < until
    }

    /// How long until the next read.
    fn wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(STOP_POLL_MAX);
        wait
    }
}

pub(super) async fn feed(runs: Arc<Runs>, mirror: Weak<RunHandle>, record: Option<RunRecord>) {
    let Some(handle) = mirror.upgrade() else {
        return;
    };
    let id = handle.id;
    // Cancelled by `RunHandle::stop` when a stop of the run is asked here.
    let stop_asked = handle.cancelled().clone();
    let finished_already = record
        .as_ref()
        .is_some_and(|record| record.status.is_final());
    drop(handle);
    // Subscribe before reading, so that what is appended meanwhile arrives as an event.
    let mut watch = if finished_already {
        None
    } else {
        runs.cluster.watch_run(id).await
    };
    runs.metrics.remote_watchers.inc();
    let mut record = record;
    let mut end_retries = 0;
    let mut stop_polls = StopPolls::new();
    let patience = runs.settings.stop_landing();
    'catch_up: loop {
        let Some(handle) = mirror.upgrade() else {
            break;
        };
        // While stopping, the store alone: it says when the run has ended, with all of it, and
        // a stalled Redis would cost each read its response timeout.
        let from_log = !stop_polls.active(stop_asked.is_cancelled(), patience);
        match catch_up(&runs, &handle, record.take(), from_log).await {
            CatchUp::Finished => break,
            CatchUp::EndNotSaved if end_retries < END_RETRIES => {
                end_retries += 1;
                drop(handle);
                tokio::time::sleep(END_RETRY).await;
                continue;
            }
            CatchUp::EndNotSaved | CatchUp::Running => {}
        }
        drop(handle);
        loop {
            let stopping = stop_asked.is_cancelled();
            let quiet = if stop_polls.active(stopping, patience) {
                stop_polls.wait()
            } else if watch.as_ref().is_some_and(|live| live.confirmed) {
                WATCHDOG
            } else {
                // Not subscribed yet (Redis away): the store is read as often as without Redis.
                runs.settings.flush_interval
            };
            let next = tokio::select! {
                next = async {
                    match watch.as_mut() {
                        Some(live) => match tokio::time::timeout(quiet, live.events.recv()).await {
                            Ok(Some(event)) => Next::Event(event),
                            Ok(None) => Next::Closed,
                            Err(_) => Next::Idle,
                        },
                        None => {
                            tokio::time::sleep(runs.settings.flush_interval.min(quiet)).await;
                            Next::Idle
                        }
                    }
                } => next,
                () = stop_asked.cancelled(), if !stopping => Next::Idle,
            };
            let Some(handle) = mirror.upgrade() else {
                break 'catch_up;
            };
            if let (Next::Event(_), Some(live)) = (&next, watch.as_mut()) {
                // Events come: the subscription is in place.
                live.confirmed = true;
            }
            match next {
                Next::Event(LiveEvent::Chunks { first, texts }) => {
                    for (seq, text) in (first..).zip(&texts) {
                        if handle.push_at(seq, text).is_err() {
                            // A lost event: read the log from the gap.
                            continue 'catch_up;
                        }
                    }
                }
                Next::Event(LiveEvent::End { .. } | LiveEvent::Resync) | Next::Idle => {
                    continue 'catch_up;
                }
                Next::Closed => {
                    watch = None;
                    continue 'catch_up;
                }
            }
        }
    }
    runs.metrics.remote_watchers.dec();
}

enum Next {
    Event(LiveEvent),
    /// Nothing came for the poll interval.
    Idle,
    /// The live channel is gone (the store is polled from now on).
    Closed,
}

enum CatchUp {
    /// The mirror has the whole run and its ending.
    Finished,
    /// The run is still going; the mirror has what the log and the store hold.
    Running,
    /// The log holds the run's end but the store does not show it yet.
    EndNotSaved,
}

/// Brings the mirror up to what the shared log (if `from_log`) and the store hold, and
/// finishes it if the run has ended.
async fn catch_up(
    runs: &Runs,
    handle: &RunHandle,
    record: Option<RunRecord>,
    from_log: bool,
) -> CatchUp {
    let log = if from_log {
        runs.cluster.read_log(handle.id, handle.last_seq()).await
    } else {
        None
    };
    if let Some(log) = &log {
        apply(handle, &log.chunks);
    }
    let ended_in_log = log.as_ref().is_some_and(|log| log.ended);
    // The store too (catching up is rare: at the start, after a gap, an end, a resync or a
    // quiet while): it may hold what the log lost, and it alone says how the run ended.
    let record = match record {
        Some(record) => Some(record),
        None => match runs.store.run_by_id(handle.id).await {
            Ok(record) => record,
            Err(error) => {
                tracing::warn!(run_id = %handle.id, %error, "mirror cannot read the run");
                return CatchUp::Running;
            }
        },
    };
    let Some(record) = record else {
        // Deleted (its conversation went, which stops an answer still streaming): nothing more
        // will come, whatever the log still holds. A mirror is only made of a stored run.
        handle.finish(Ending::new(RunStatus::Stopped, None, None));
        return CatchUp::Finished;
    };
    if let Some(ends) = ChunkEnds::parse(&record.chunk_ends)
        && let Some(chunks) = ends.chunks_after(&record.output, handle.last_seq())
    {
        for (seq, text) in chunks {
            if handle.push_at(seq, text).is_err() {
                break;
            }
        }
    }
    if let Some(log) = &log {
        // The store may have closed a hole the log had: the rest of the log fits now.
        apply(handle, &log.chunks);
    }
    if record.status.is_final() {
        handle.finish(Ending {
            status: record.status,
            usage: dto::run_usage(&record),
            error: record.error.clone(),
            saved_output: Some(record.output),
        });
        return CatchUp::Finished;
    }
    if ended_in_log {
        return CatchUp::EndNotSaved;
    }
    CatchUp::Running
}

/// Applies chunks in seq order; false if one did not follow (a hole before it).
fn apply(handle: &RunHandle, chunks: &[(u64, String)]) -> bool {
    chunks
        .iter()
        .all(|(seq, text)| handle.push_at(*seq, text).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stop_makes_the_store_read_soon_and_often_for_a_while_only() {
        let patience = Duration::from_secs(5);
        let mut polls = StopPolls::new();
        assert!(!polls.active(false, patience), "no stop asked");
        assert!(polls.active(true, patience));
        let waits: Vec<u128> = (0..5).map(|_| polls.wait().as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 500, 500]);
        tokio::time::advance(Duration::from_millis(4_900)).await;
        assert!(polls.active(true, patience));
        // Past it (an owner that does not answer): back to the watchdog.
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(!polls.active(true, patience));
    }
}
