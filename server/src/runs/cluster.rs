//! What a run needs from the other instances: its chunks copied to a log any instance can read,
//! "run started" told to the user's sockets elsewhere, stop carried to the instance that drives
//! the run, and the reaper's fence. [`Local`] is the single-instance implementation (nothing
//! leaves the process); `redis::RedisCluster` is the shared one.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use wadi_protocol::RunStatus;

use super::handle::RunHandle;
use crate::{
    ids::{ConversationId, InstanceId, MessageId, RunId, UserId},
    store::RunRecord,
};

/// A run started: what other instances need to show it to their sockets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStarted {
    /// The instance that drives it.
    pub instance: InstanceId,
    pub user: UserId,
    pub conversation: ConversationId,
    pub run: RunId,
    pub message: MessageId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_message_id: Option<String>,
}

/// One of a user's conversations changed: for that user's sockets on every instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changed {
    pub user: UserId,
    pub conversation: ConversationId,
    pub change: wadi_protocol::ConversationChange,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

/// What travels on a user's channel: a run started, or a conversation changed. (Untagged: an
/// instance that knows only `RunStarted` reads those and ignores the rest.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum UserNews {
    Changed { changed: Changed },
    RunStarted(RunStarted),
}

/// What the other instances tell this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// Stop this run (driven here).
    Stop(RunId),
    /// A run started somewhere, for a user with sockets here.
    RunStarted(RunStarted),
    /// A conversation of a user with sockets here changed somewhere.
    Changed(Changed),
    /// Events may have been lost (the subscription connection was down and is back): what
    /// they would have announced is read from the store instead.
    Resync,
}

/// A live event of one run, from its log's channel. Delivery is at most once: a consumer checks
/// seqs and reads the log to fill any gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveEvent {
    /// Chunks `first`, `first + 1`, … were appended.
    Chunks { first: u64, texts: Vec<String> },
    /// The run ended after chunk `last_seq`; its outcome is in the store.
    End { status: RunStatus, last_seq: u64 },
    /// The channel may have lost events (the connection was re-established).
    Resync,
}

/// What a log read found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogRead {
    /// Chunks with seq above the one asked for, in order, as `(seq, text)`.
    pub chunks: Vec<(u64, String)>,
    /// The run ended (after the chunks read).
    pub ended: bool,
}

/// Keeps a subscription while held; dropping it lets the subscription go.
pub struct Lease(Option<Box<dyn FnOnce() + Send + Sync>>);

impl Lease {
    pub fn none() -> Self {
        Self(None)
    }

    pub fn new(release: impl FnOnce() + Send + Sync + 'static) -> Self {
        Self(Some(Box::new(release)))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(release) = self.0.take() {
            release();
        }
    }
}

/// A run's live events, while the lease is held.
pub struct Watch {
    pub events: mpsc::UnboundedReceiver<LiveEvent>,
    pub lease: Lease,
    /// Redis confirmed the subscription. If not, events come only once Redis answers again
    /// (announced by a `Resync`).
    pub confirmed: bool,
}

/// The health of the shared bus, for `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusHealth {
    /// Single instance: there is none.
    Off,
    Up,
    Down,
}

#[async_trait]
pub trait Cluster: Send + Sync + 'static {
    /// `local` or `redis`, for logs and `/readyz`.
    fn mode(&self) -> &'static str;

    /// Owner: copies the run's chunks to the shared log as they come (never making the run
    /// wait), then its end once it is saved. Returns when that is done or impossible.
    async fn replicate(&self, handle: Arc<RunHandle>);

    /// Tells the user's sockets on other instances that a run started.
    async fn announce(&self, event: &RunStarted);

    /// Tells the user's sockets on other instances that a conversation changed.
    async fn announce_change(&self, event: &Changed);

    /// Asks `owner` to stop `run` now (the request is already in the store, which the owner
    /// also polls).
    async fn send_stop(&self, owner: InstanceId, run: RunId);

    /// Subscribes to the run's live events; resolves once the subscription is confirmed, so that
    /// nothing appended after a following read is missed. `None` without a shared log.
    async fn watch_run(&self, run: RunId) -> Option<Watch>;

    /// Reads the run's log after `after_seq`. `None` without a shared log, or if it cannot be
    /// read now (the store is the fallback).
    async fn read_log(&self, run: RunId, after_seq: u64) -> Option<LogRead>;

    /// This instance's sockets of `user` want its events (runs started elsewhere); resolves
    /// once subscribed.
    async fn watch_user(&self, user: UserId) -> Lease;

    /// Reaper, before saving a dead owner's run: refuses any further write of the owner to the
    /// shared log, and returns the chunks it holds beyond the stored checkpoint (`run.last_seq`).
    async fn fence(&self, run: &RunRecord) -> Vec<String>;

    /// Reaper, after saving: the run's end, for its followers everywhere.
    async fn end(&self, run: RunId, status: RunStatus, last_seq: u64);

    async fn health(&self) -> BusHealth;
}

/// One instance: everything stays in the process (the hub's handles are the log).
pub struct Local;

#[async_trait]
impl Cluster for Local {
    fn mode(&self) -> &'static str {
        "local"
    }

    async fn replicate(&self, _handle: Arc<RunHandle>) {}

    async fn announce(&self, _event: &RunStarted) {}

    async fn announce_change(&self, _event: &Changed) {}

    async fn send_stop(&self, _owner: InstanceId, _run: RunId) {}

    async fn watch_run(&self, _run: RunId) -> Option<Watch> {
        None
    }

    async fn read_log(&self, _run: RunId, _after_seq: u64) -> Option<LogRead> {
        None
    }

    async fn watch_user(&self, _user: UserId) -> Lease {
        Lease::none()
    }

    async fn fence(&self, _run: &RunRecord) -> Vec<String> {
        Vec::new()
    }

    async fn end(&self, _run: RunId, _status: RunStatus, _last_seq: u64) {}

    async fn health(&self) -> BusHealth {
        BusHealth::Off
    }
}
