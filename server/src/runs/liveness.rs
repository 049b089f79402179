//! Which instance drives which run, and what happens when an instance goes away.
//!
//! Every instance registers at start and heartbeats into the store on the store's clock. On
//! each beat it also checks its own runs there: a stop requested through another instance stops
//! the run (the backstop when the cluster's message was lost, or before the first token); a run
//! the store no longer counts as its own was reaped while this process was paused, so it is
//! cut off (fenced) and never written again; a run the store counts as its own but nothing here
//! drives is ended as `interrupted`. Then it reaps: any run whose instance has not heartbeated
//! within the timeout is saved as `interrupted` (or `stopped`, if a stop was asked for) with the
//! output flushed so far, by whichever instance locks it first.
//!
//! A reaper reaps only after its own heartbeats have gone through for a whole timeout: after a
//! store outage every neighbour looks silent, and they need that long to beat again.
//!
//! A run whose final save failed for longer than its task waits (the store was away) keeps its
//! outcome here: every beat tries to save it, before any orphan is ended, so the store ends up
//! with what the run's followers were told, not with its last checkpoint.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use wadi_protocol::{RunStatus, Usage};

use super::{Runs, task};
use crate::{
    error::AppError,
    ids::{ConversationId, MessageId, RunId},
    store::{ChunkEnds, Finalize, RunOutcome, RunRecord, StoreError},
    util::now_millis,
};

/// How long one reap may spend counting the tokens of the runs it saves, in all (their
/// provider's reports died with their owner). Past it, runs are saved without usage: a mass
/// failover must not hold up the heartbeat that follows it (the reap runs inside it).
const COUNT_BUDGET: Duration = Duration::from_secs(3);
/// Runs reaped per statement (the rest go on the next beat).
const REAP_BATCH: u32 = 50;
/// An instance row silent this many timeouts is deleted (its runs were reaped long before).
const FORGET_AFTER_TIMEOUTS: u32 = 20;
/// A timeout no heartbeat can miss: reaping with it touches only runs with no instance row.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// How long an outcome the store would not take is kept for another try; then the run is left
/// to end as an orphan with its last checkpoint.
const KEEP_UNSAVED_FOR: Duration = Duration::from_secs(3600);

#[derive(Default)]
pub(super) struct Liveness {
    /// Since when this instance's heartbeats have been going through (reaping waits for a
    /// whole timeout of them).
    healthy_since: Mutex<Option<Instant>>,
    /// Outcomes of runs driven here whose final save failed, and since when.
    unsaved: Mutex<HashMap<RunId, (RunOutcome, Instant)>>,
}

impl Liveness {
    fn unsaved(&self) -> std::sync::MutexGuard<'_, HashMap<RunId, (RunOutcome, Instant)>> {
        crate::util::lock(&self.unsaved)
    }

    fn beat(&self, ok: bool) {
        let mut since = crate::util::lock(&self.healthy_since);
        match (ok, *since) {
            (true, None) => *since = Some(Instant::now()),
            (false, _) => *since = None,
            (true, Some(_)) => {}
        }
    }

    fn healthy_for(&self) -> Duration {
        let since = *crate::util::lock(&self.healthy_since);
        since.map_or(Duration::ZERO, |since| since.elapsed())
    }
}

/// How the reaper saves a dead owner's run: fenced off in the shared log first, with whatever
/// that log holds beyond the stored checkpoint.
struct Reaped<'a> {
    runs: &'a Runs,
    /// Tokens are counted until then (see [`COUNT_BUDGET`]).
    count_until: Instant,
}

#[async_trait]
impl Finalize for Reaped<'_> {
    async fn finalize(&self, run: &RunRecord) -> RunOutcome {
        self.runs.reaped_outcome(run, self.count_until).await
    }
}

impl Runs {
    /// At start, before serving: registers this instance, then saves the runs of previous
    /// processes on this host that are certainly gone (their process no longer exists), and of
    /// rows no instance owns. Runs of other instances are left to the reaper's timeout.
    pub async fn recover(&self) -> Result<usize, StoreError> {
        let host = host_name();
        let pid = i64::from(std::process::id());
        let mut gone = 0;
        for instance in self.store.instances().await? {
            if instance.host == host && !process_alive(instance.pid, pid) {
                self.store.deregister_instance(instance.id).await?;
                gone += 1;
            }
        }
        self.store
            .register_instance(self.instance, &host, pid)
            .await?;
        self.liveness.beat(true);
        tracing::info!(instance = %self.instance, %host, pid, gone, "instance registered");
        let reaped = self.reap_with(NEVER).await?;
        Ok(reaped)
    }

    /// Keeps the outcome of a run driven here that the store would not take, for the heartbeat
    /// to save.
    pub(super) fn keep_unsaved(&self, run: RunId, outcome: RunOutcome) {
        self.liveness
            .unsaved()
            .insert(run, (outcome, Instant::now()));
    }

    /// True if an outcome is kept for the run: it is no orphan.
    fn keeps_unsaved(&self, run: RunId) -> bool {
        self.liveness.unsaved().contains_key(&run)
    }

    /// Tries to save every kept outcome (`only`: just that run's). Returns the runs tried: saved,
    /// ended elsewhere meanwhile, or still kept.
    pub(super) async fn save_unsaved(&self, only: Option<RunId>) -> Vec<RunId> {
        let kept: Vec<(RunId, RunOutcome)> = {
            let mut unsaved = self.liveness.unsaved();
            unsaved.retain(|run, (_, since)| {
                let keep = since.elapsed() < KEEP_UNSAVED_FOR;
                if !keep {
                    tracing::error!(run_id = %run, "never managed to save the run's outcome; left to end as an orphan");
                }
                keep
            });
            unsaved
                .iter()
                .filter(|(run, _)| only.is_none_or(|only| only == **run))
                .map(|(run, (outcome, _))| (*run, outcome.clone()))
                .collect()
        };
        let mut tried = Vec::with_capacity(kept.len());
        for (run, outcome) in kept {
            match self
                .store
                .finish_run(run, Some(self.instance), &outcome)
                .await
            {
                Ok(saved) => {
                    if saved {
                        tracing::info!(run_id = %run, status = outcome.status.as_str(), "saved a run's outcome after the store came back");
                    } else {
                        tracing::warn!(run_id = %run, "a run whose save failed was ended elsewhere meanwhile");
                    }
                    self.liveness.unsaved().remove(&run);
                }
                Err(error) if error.is_unavailable() => {
                    tracing::warn!(%error, run_id = %run, "still cannot save the run's outcome");
                }
                Err(error) => {
                    // It would fail the same way again: left to end as an orphan.
                    tracing::error!(%error, run_id = %run, "cannot save the run's outcome; giving up");
                    self.liveness.unsaved().remove(&run);
                }
            }
            tried.push(run);
        }
        tried
    }

    /// Heartbeats, checks this instance's runs and reaps, every heartbeat interval, until
    /// `shutdown`.
    pub fn keep_alive(self: &Arc<Self>, shutdown: CancellationToken) {
        let runs = Arc::downgrade(self);
        let every = self.settings.instance_heartbeat;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(runs) = runs.upgrade() else {
                    return;
                };
                runs.beat().await;
            }
        });
    }

    async fn beat(&self) {
        // What drives runs here now, taken before asking the store: each of these was committed
        // before the question, so the store's answer must include it unless it was reaped.
        let active = self.hub.active();
        let alive = match self.store.heartbeat(self.instance).await {
            Ok(true) => true,
            Ok(false) => {
                // Declared dead (paused past the timeout, or cut off): our runs were reaped.
                tracing::warn!(instance = %self.instance, "this instance was declared dead; registering again");
                self.store
                    .register_instance(self.instance, &host_name(), i64::from(std::process::id()))
                    .await
                    .is_ok()
            }
            Err(error) => {
                tracing::warn!(%error, "heartbeat failed");
                false
            }
        };
        self.liveness.beat(alive);
        if !alive {
            return;
        }
        if let Err(error) = self.check_own_runs(&active).await {
            tracing::warn!(%error, "cannot check this instance's runs");
        }
        if self.liveness.healthy_for() >= self.settings.instance_timeout
            && let Err(error) = self.reap_with(self.settings.instance_timeout).await
        {
            tracing::warn!(%error, "reaping failed");
        }
    }

    /// Stop requests from elsewhere, fenced runs, outcomes kept unsaved, and orphans (see the
    /// module doc).
    async fn check_own_runs(&self, active: &[Arc<super::RunHandle>]) -> Result<(), StoreError> {
        // Within one beat: saving many outcomes against a slow store must not delay the
        // heartbeat until other instances take this one for dead.
        let _ =
            tokio::time::timeout(self.settings.instance_heartbeat, self.save_unsaved(None)).await;
        let stored: HashMap<_, _> = self
            .store
            .owned_running_runs(self.instance)
            .await?
            .into_iter()
            .map(|run| (run.id, run.stop_requested))
            .collect();
        for handle in active {
            match stored.get(&handle.id) {
                Some(true) if !handle.is_finished() => {
                    tracing::info!(run_id = %handle.id, "stop requested through the store");
                    handle.stop(RunStatus::Stopped);
                }
                None if !handle.is_finished() => {
                    tracing::warn!(run_id = %handle.id, "run was reaped while this instance was away; cutting it off");
                    self.metrics.fenced_runs.inc();
                    handle.stop(RunStatus::Interrupted);
                }
                _ => {}
            }
        }
        for &id in stored.keys() {
            // Asked now, in this order: a task keeps its outcome before it stops driving.
            if self.drives(id) || self.keeps_unsaved(id) {
                continue;
            }
            let Some(run) = self.store.run_by_id(id).await? else {
                continue;
            };
            tracing::warn!(run_id = %id, "ending a run no task here drives");
            self.end_orphan(&run).await?;
        }
        Ok(())
    }

    /// Reaps runs whose owner has been silent for `timeout` (or has no row).
    async fn reap_with(&self, timeout: Duration) -> Result<usize, StoreError> {
        let forget_after = self.settings.instance_timeout * FORGET_AFTER_TIMEOUTS;
        let reaped = self
            .store
            .reap_runs(
                timeout,
                forget_after.max(timeout),
                REAP_BATCH,
                &Reaped {
                    runs: self,
                    count_until: Instant::now() + COUNT_BUDGET,
                },
            )
            .await?;
        for (run, outcome) in &reaped {
            self.metrics.reaped_runs.inc();
            tracing::warn!(
                run_id = %run.id,
                owner = ?run.owner_instance,
                status = outcome.status.as_str(),
                seq = outcome.last_seq,
                "reaped a run whose instance is gone"
            );
            let last = u64::try_from(outcome.last_seq).unwrap_or_default();
            self.cluster.end(run.id, outcome.status, last).await;
        }
        Ok(reaped.len())
    }

    /// A dead owner's run as it is saved: what the store and the shared log hold.
    async fn reaped_outcome(&self, run: &RunRecord, count_until: Instant) -> RunOutcome {
        let tail = self.cluster.fence(run).await;
        let mut output = run.output.clone();
        let mut ends = ChunkEnds::parse(&run.chunk_ends)
            .filter(|ends| ends.0.len() as i64 == run.last_seq)
            .map(|ends| ends.0)
            .unwrap_or_default();
        let mut last_seq = run.last_seq;
        if ends.len() as i64 == last_seq {
            for text in tail {
                output.push_str(&text);
                ends.push(output.len());
                last_seq += 1;
            }
        }
        let status = if run.stop_requested_at.is_some() {
            RunStatus::Stopped
        } else {
            RunStatus::Interrupted
        };
        let usage = self.count_reaped(run, &output, count_until).await;
        RunOutcome {
            status,
            output,
            chunk_ends: ChunkEnds::encode(&ends),
            error: (status == RunStatus::Interrupted)
                .then(|| "the server streaming this answer stopped".to_owned()),
            prompt_tokens: usage.map(|u| i64::from(u.prompt_tokens)),
            completion_tokens: usage.map(|u| i64::from(u.completion_tokens)),
            usage_estimated: usage.is_some(),
            last_seq,
            finished_at: now_millis(),
            message_id: MessageId::new(),
        }
    }

    /// The server's count of a reaped run's prompt (the conversation as stored) and output, as
    /// for any run the provider did not report on: whatever it reported died with the instance
    /// that drove the run. `None` if it cannot be counted before `until`.
    async fn count_reaped(&self, run: &RunRecord, output: &str, until: Instant) -> Option<Usage> {
        let count = async {
            let request = task::history(
                self,
                run.id,
                run.conversation_id,
                run.owner_id,
                run.message_id,
            )
            .await
            .ok()?;
            task::estimate_usage(request, output.to_owned()).await
        };
        let counted = tokio::time::timeout_at(until, count).await;
        if counted.is_err() {
            tracing::warn!(run_id = %run.id, "no time left to count a reaped run's tokens");
        }
        counted.ok().flatten()
    }

    /// Ends a run whose driver is gone (dead instance, or a task here that lost it).
    async fn end_orphan(&self, run: &RunRecord) -> Result<bool, StoreError> {
        let outcome = self
            .reaped_outcome(run, Instant::now() + COUNT_BUDGET)
            .await;
        let ended = self
            .store
            .finish_run(run.id, run.owner_instance, &outcome)
            .await?;
        if ended {
            self.metrics.reaped_runs.inc();
            let last = u64::try_from(outcome.last_seq).unwrap_or_default();
            self.cluster.end(run.id, outcome.status, last).await;
        }
        Ok(ended)
    }

    /// A send met a `running` run in the conversation. If nothing alive drives it (its instance
    /// is gone, or it is ours but no task here drives it), it is ended and the send may retry:
    /// returns true. A run a live instance drives is never touched.
    pub(super) async fn clear_orphan(
        &self,
        conversation_id: ConversationId,
    ) -> Result<bool, AppError> {
        let Some(active) = self.store.active_run(conversation_id).await? else {
            // It ended meanwhile.
            return Ok(true);
        };
        if active.owner_instance == Some(self.instance)
            && !self.save_unsaved(Some(active.id)).await.is_empty()
        {
            // Its kept outcome: saved now (the send may go ahead), or still not.
            return Ok(!self.keeps_unsaved(active.id));
        }
        let driven = match active.owner_instance {
            Some(owner) if owner == self.instance => self.hub.owned(active.id).is_some(),
            Some(owner) => {
                self.store
                    .instance_alive(owner, self.settings.instance_timeout)
                    .await?
            }
            None => false,
        };
        if driven {
            return Ok(false);
        }
        tracing::warn!(run_id = %active.id, "ending a run nothing drives");
        self.end_orphan(&active).await?;
        Ok(true)
    }
}

/// This machine's name, as instances on one host recognise each other.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|name| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Whether process `pid` on this host may still be running. Our own pid belongs to an earlier
/// incarnation of this process (a restarted container keeps its pid), so that one is gone.
/// Without `/proc`, every other process counts as alive (the timeout decides).
fn process_alive(pid: i64, own_pid: i64) -> bool {
    if pid == own_pid {
        return false;
    }
    let proc = std::path::Path::new("/proc");
    if !proc.join("self").exists() {
        return true;
    }
    proc.join(pid.to_string()).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_alive_while_proc_lists_it_and_never_when_it_is_us() {
        let own = i64::from(std::process::id());
        assert!(
            !process_alive(own, own),
            "our pid is an earlier incarnation"
        );
        assert!(process_alive(1, own), "init is running");
        assert!(!process_alive(i64::from(i32::MAX), own));
    }
}
