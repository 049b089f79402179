//! The runs this process is streaming, and those that ended recently (kept for exact replay).
//!
//! Single node: fan-out is in-process, through each run's [`RunHandle`]. Running several
//! instances adds a shared log (Redis Streams) behind the same lookups.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio_util::task::TaskTracker;
use uuid::Uuid;
use wadi_protocol::RunStatus;

use super::handle::RunHandle;

#[derive(Default)]
struct Runs {
    /// Active and recently ended runs, by run id.
    by_id: HashMap<Uuid, Arc<RunHandle>>,
    /// The active run of each conversation.
    active: HashMap<Uuid, Arc<RunHandle>>,
}

#[derive(Default)]
pub struct Hub {
    runs: Mutex<Runs>,
    /// Set at shutdown: no new run may start.
    stopping: std::sync::atomic::AtomicBool,
    /// Every run task, so shutdown can wait for them to save.
    pub tasks: TaskTracker,
}

impl Hub {
    fn runs(&self) -> MutexGuard<'_, Runs> {
        match self.runs.lock() {
            Ok(runs) => runs,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Registers a started run. At shutdown the run is stopped at once (as `interrupted`), so
    /// that a run that slipped in while the others were being stopped cannot outlive them.
    pub fn insert(&self, handle: Arc<RunHandle>) {
        let mut runs = self.runs();
        if self.is_stopping() {
            handle.stop(RunStatus::Interrupted);
        }
        runs.active.insert(handle.conversation_id, handle.clone());
        runs.by_id.insert(handle.id, handle);
    }

    /// True once shutdown began: sends are refused.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn get(&self, run_id: Uuid) -> Option<Arc<RunHandle>> {
        self.runs().by_id.get(&run_id).cloned()
    }

    /// The conversation's run that is still streaming.
    pub fn active_for(&self, conversation_id: Uuid) -> Option<Arc<RunHandle>> {
        self.runs().active.get(&conversation_id).cloned()
    }

    pub fn active_count(&self) -> usize {
        self.runs().active.len()
    }

    /// The run ended: it is no longer the conversation's active run, and it is forgotten after
    /// `retention` (replays after that are served from the store).
    pub fn retire(self: &Arc<Self>, handle: &Arc<RunHandle>, retention: Duration) {
        {
            let mut runs = self.runs();
            if runs
                .active
                .get(&handle.conversation_id)
                .is_some_and(|active| Arc::ptr_eq(active, handle))
            {
                runs.active.remove(&handle.conversation_id);
            }
        }
        let hub = Arc::downgrade(self);
        let id = handle.id;
        tokio::spawn(async move {
            tokio::time::sleep(retention).await;
            if let Some(hub) = hub.upgrade() {
                hub.runs().by_id.remove(&id);
            }
        });
    }

    /// Stops every active run as `interrupted` (shutdown) and waits up to `grace` for them to
    /// save. Returns false if some did not finish in time.
    pub async fn interrupt_all(&self, grace: Duration) -> bool {
        let active: Vec<Arc<RunHandle>> = {
            let runs = self.runs();
            // Under the lock: any insert after this sees the flag and stops its run itself.
            self.stopping
                .store(true, std::sync::atomic::Ordering::SeqCst);
            runs.active.values().cloned().collect()
        };
        for handle in &active {
            handle.stop(RunStatus::Interrupted);
        }
        self.tasks.close();
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
    }
}
