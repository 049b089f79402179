//! Every streaming run's progress checkpoints, written together. A run queues its checkpoint and
//! reads the answer at a later tick; one task writes whatever queued within [`GATHER`] of the
//! first, in one transaction. A task and a transaction per run per tick cost about 4–5.5 µs of
//! the ~29 of server CPU per delivered chunk at 800 runs, and half the p99
//! (`docs/performance.md`).

use std::{sync::Arc, time::Duration};

use tokio::sync::{mpsc, oneshot};

use crate::{
    ids::{InstanceId, RunId},
    store::{Checkpoint, CheckpointResult, Store},
};

/// How long the writer waits after a batch's first checkpoint for others to join it.
const GATHER: Duration = Duration::from_millis(20);

/// The answer to a queued checkpoint: `None` if its batch could not be written (logged once).
pub type Answer = oneshot::Receiver<Option<CheckpointResult>>;

struct Queued {
    id: RunId,
    owner: InstanceId,
    checkpoint: Checkpoint,
    answer: oneshot::Sender<Option<CheckpointResult>>,
}

/// The queue of checkpoints; its writer task ends when this is dropped.
pub struct Checkpointer {
    queue: mpsc::UnboundedSender<Queued>,
}

impl Checkpointer {
    /// Starts the writer on the current runtime.
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (queue, queued) = mpsc::unbounded_channel();
        tokio::spawn(write(store, queued));
        Self { queue }
    }

    /// Queues `owner`'s checkpoint of run `id`.
    pub fn queue(&self, id: RunId, owner: InstanceId, checkpoint: Checkpoint) -> Answer {
        let (answer, answered) = oneshot::channel();
        // If the writer is gone (shutting down), `answer` is dropped with the message: the run
        // sees no result, and its outcome saves the whole output anyway.
        let _ = self.queue.send(Queued {
            id,
            owner,
            checkpoint,
            answer,
        });
        answered
    }
}

async fn write(store: Arc<dyn Store>, mut queued: mpsc::UnboundedReceiver<Queued>) {
    while let Some(first) = queued.recv().await {
        tokio::time::sleep(GATHER).await;
        let mut batch = vec![first];
        while let Ok(next) = queued.try_recv() {
            batch.push(next);
        }
        let (rows, answers): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|queued| ((queued.id, queued.owner, queued.checkpoint), queued.answer))
            .unzip();
        match store.checkpoint_runs(&rows).await {
            Ok(results) => {
                for (answer, result) in answers.into_iter().zip(results) {
                    let _ = answer.send(Some(result));
                }
            }
            Err(error) => {
                tracing::warn!(%error, runs = rows.len(), "cannot save the runs' progress");
                for answer in answers {
                    let _ = answer.send(None);
                }
            }
        }
    }
}
