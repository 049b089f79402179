//! The runs this process knows in memory: those it drives (and those it drove recently, kept for
//! exact replay), and mirrors of runs driven elsewhere that local sockets follow.
//!
//! Mirrors are held weakly: a mirror lives as long as some socket or stream follows it (its feeder
//! stops when the last one goes), so an idle instance holds no copy of anyone else's runs.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};

use tokio_util::task::TaskTracker;
use wadi_protocol::RunStatus;

use super::handle::RunHandle;
use crate::ids::{ConversationId, RunId};

#[derive(Default)]
struct Index {
    /// Runs driven here: starting, active and recently ended.
    owned: HashMap<RunId, Arc<RunHandle>>,
    /// The active run of each conversation, among those driven here (committed ones only).
    active: HashMap<ConversationId, Arc<RunHandle>>,
    /// Copies of runs driven elsewhere (or finished before this process knew them).
    mirrors: HashMap<RunId, Weak<RunHandle>>,
    /// Runs reserved and not ended yet (starting or streaming).
    live: usize,
}

#[derive(Default)]
pub struct Hub {
    index: Mutex<Index>,
    /// Set at shutdown: no new run may start.
    stopping: std::sync::atomic::AtomicBool,
    /// Every run task, so shutdown can wait for them to save.
    pub tasks: TaskTracker,
}

/// A mirror found, or the one just made for a run (its feeder must be started).
pub enum Mirror {
    Existing(Arc<RunHandle>),
    New(Arc<RunHandle>),
}

impl Hub {
    fn index(&self) -> MutexGuard<'_, Index> {
        crate::util::lock(&self.index)
    }

    /// Registers a run about to be committed: from here on this process counts it as its own
    /// (so a concurrent send never mistakes it for an orphan), though it is not yet the
    /// conversation's active run. Refused (false) if `max` runs (0: no cap) are starting or
    /// streaming already: the count and the check are one step, so concurrent sends never
    /// overshoot it.
    pub fn reserve(&self, handle: Arc<RunHandle>, max: usize) -> bool {
        let mut index = self.index();
        if max > 0 && index.live >= max {
            return false;
        }
        index.live += 1;
        index.owned.insert(handle.id, handle);
        true
    }

    /// Runs starting or streaming here.
    pub fn live(&self) -> usize {
        self.index().live
    }

    /// A reserved run was not committed after all.
    pub fn release(&self, id: RunId) {
        let mut index = self.index();
        if index.owned.remove(&id).is_some() {
            index.live = index.live.saturating_sub(1);
        }
    }

    /// The run was committed: it is the conversation's active run. At shutdown it is stopped
    /// at once (as `interrupted`), so that a run that slipped in while the others were being
    /// stopped cannot outlive them.
    pub fn activate(&self, handle: &Arc<RunHandle>) {
        let mut index = self.index();
        if self.is_stopping() {
            handle.stop(RunStatus::Interrupted);
        }
        index.active.insert(handle.conversation_id, handle.clone());
    }

    /// True once shutdown began: sends are refused.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A run driven here (or recently ended here).
    pub fn owned(&self, run_id: RunId) -> Option<Arc<RunHandle>> {
        self.index().owned.get(&run_id).cloned()
    }

    /// A run driven here, or a live mirror of one driven elsewhere.
    pub fn get(&self, run_id: RunId) -> Option<Arc<RunHandle>> {
        let index = self.index();
        index
            .owned
            .get(&run_id)
            .cloned()
            .or_else(|| index.mirrors.get(&run_id).and_then(Weak::upgrade))
    }

    /// The live mirror of `run`, or a new one made by `make` (registered before the lock is
    /// released, so two callers never make two mirrors of one run).
    pub fn mirror(&self, run_id: RunId, make: impl FnOnce() -> Arc<RunHandle>) -> Mirror {
        let mut index = self.index();
        if let Some(owned) = index.owned.get(&run_id) {
            return Mirror::Existing(owned.clone());
        }
        if let Some(mirror) = index.mirrors.get(&run_id).and_then(Weak::upgrade) {
            return Mirror::Existing(mirror);
        }
        let mirror = make();
        index.mirrors.insert(run_id, Arc::downgrade(&mirror));
        // Forget mirrors nobody follows any more, so the map does not grow with every run ever
        // watched here.
        if index.mirrors.len() > 64 && index.mirrors.len().is_power_of_two() {
            index.mirrors.retain(|_, mirror| mirror.strong_count() > 0);
        }
        Mirror::New(mirror)
    }

    /// Mirrors followed right now.
    pub fn mirror_count(&self) -> usize {
        self.index()
            .mirrors
            .values()
            .filter(|mirror| mirror.strong_count() > 0)
            .count()
    }

    /// The conversation's run that is streaming here.
    pub fn active_for(&self, conversation_id: ConversationId) -> Option<Arc<RunHandle>> {
        self.index().active.get(&conversation_id).cloned()
    }

    /// The runs driven here that are streaming (committed and not ended).
    pub fn active(&self) -> Vec<Arc<RunHandle>> {
        self.index().active.values().cloned().collect()
    }

    pub fn active_count(&self) -> usize {
        self.index().active.len()
    }

    /// The run ended: it is no longer the conversation's active run, and it is forgotten after
    /// `retention` (replays after that are served from the store).
    pub fn retire(self: &Arc<Self>, handle: &Arc<RunHandle>, retention: Duration) {
        {
            let mut index = self.index();
            index.live = index.live.saturating_sub(1);
            if index
                .active
                .get(&handle.conversation_id)
                .is_some_and(|active| Arc::ptr_eq(active, handle))
            {
                index.active.remove(&handle.conversation_id);
            }
        }
        let hub = Arc::downgrade(self);
        let id = handle.id;
        tokio::spawn(async move {
            tokio::time::sleep(retention).await;
            if let Some(hub) = hub.upgrade() {
                hub.index().owned.remove(&id);
            }
        });
    }

    /// Stops every active run as `interrupted` (shutdown) and waits up to `grace` for them to
    /// save. Returns false if some did not finish in time.
    pub async fn interrupt_all(&self, grace: Duration) -> bool {
        let active: Vec<Arc<RunHandle>> = {
            let index = self.index();
            // Under the lock: any activation after this sees the flag and stops its run itself.
            self.stopping
                .store(true, std::sync::atomic::Ordering::SeqCst);
            index.owned.values().cloned().collect()
        };
        for handle in &active {
            handle.stop(RunStatus::Interrupted);
        }
        self.tasks.close();
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
    }
}
