//! Runs: a user message starts one; it streams the model's answer to every watcher, survives
//! its client going away, can be stopped from any instance, and is saved however it ends.
//!
//! [`Runs`] is the service. It owns what runs need (store, model, the in-memory [`Hub`], the
//! [`Cluster`] that reaches other instances, the limits and settings) and knows nothing of
//! sockets or HTTP: it tells local sockets about new runs through [`Announce`], which the socket
//! layer implements.
//!
//! One instance drives each run (the one that received the message): it alone assigns seqs,
//! checkpoints the output to the store and saves the outcome, each write fenced by its instance
//! id. Any instance can follow a run: its own runs through their handles, others' through
//! mirrors fed from the shared log (`cluster`) and the store (`mirror`). Instances heartbeat into
//! the store, and any of them reaps the runs of one that stopped (`liveness`).

mod checkpoints;
pub mod cluster;
pub mod handle;
pub mod hub;
mod liveness;
mod load;
mod mirror;
pub mod redis;
pub mod task;

use std::{sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use wadi_protocol::{ErrorCode, RunStatus, api::Role, api::SentMessage};

pub use cluster::{BusHealth, Cluster, ClusterEvent, Lease, Local, RunStarted};
pub use handle::{Ending, Frame, FrameKind, Origin, RunHandle, RunKey};
pub use hub::Hub;

use crate::{
    content::derive_title,
    dto,
    error::AppError,
    ids::{ConversationId, InstanceId, MessageId, RunId, UserId},
    limits::{Rate, SharedLimit, SharedRates, Taken},
    metrics::Metrics,
    model::ChatModel,
    store::{Constraint, MessageRecord, MessageRow, RunRecord, Store, StoreError},
    util::now_millis,
};

/// Sends a user may attempt per message they may send: retries while an answer streams are
/// free of the message rate, not unbounded.
const ATTEMPTS_PER_MESSAGE: u32 = 5;

/// How messages are accepted and runs behave. Part of [`crate::Config`].
#[derive(Clone, Debug, clap::Args)]
pub struct RunSettings {
    /// A system prompt sent before the conversation.
    #[arg(long, env = "WADI_SYSTEM_PROMPT")]
    pub system_prompt: Option<String>,

    /// How many of the conversation's latest messages are sent to the model.
    #[arg(long, env = "WADI_HISTORY_MESSAGES", default_value_t = 20)]
    pub history_messages: u32,

    /// A run fails if the provider sends nothing for this long (including before the first token).
    #[arg(long, env = "WADI_MODEL_IDLE_TIMEOUT", value_parser = crate::config::parse_duration, default_value = "60s")]
    pub model_idle_timeout: Duration,

    /// Extra time to gather deltas into one chunk for very fast models (0: only deltas already
    /// waiting are merged, adding no delay).
    #[arg(long, env = "WADI_COALESCE_WINDOW", value_parser = crate::config::parse_duration, default_value = "0s")]
    pub coalesce_window: Duration,

    /// How often a streaming run's output is saved (it is always saved when the run ends).
    #[arg(long, env = "WADI_FLUSH_INTERVAL", value_parser = crate::config::parse_duration, default_value = "1s")]
    pub flush_interval: Duration,

    /// How long a run's final save is retried in its task before the outcome is kept for the
    /// heartbeat to save (not a flag: tests shorten it).
    #[arg(skip = task::SAVE_PATIENCE)]
    pub save_patience: Duration,

    /// How long a finished run's chunks stay in memory for exact replay (`afterSeq`).
    #[arg(long, env = "WADI_RUN_RETENTION", value_parser = crate::config::parse_duration, default_value = "10m")]
    pub run_retention: Duration,

    /// How often this instance heartbeats into the database, checks its runs for stop requests,
    /// and reaps the runs of instances that stopped heartbeating.
    #[arg(long, env = "WADI_INSTANCE_HEARTBEAT", value_parser = crate::config::parse_duration, default_value = "2s")]
    pub instance_heartbeat: Duration,

    /// An instance that has not heartbeated for this long is dead: another instance saves its
    /// runs as `interrupted` with what they had produced, and it may never write them again.
    #[arg(long, env = "WADI_INSTANCE_TIMEOUT", value_parser = crate::config::parse_duration, default_value = "15s")]
    pub instance_timeout: Duration,

    /// Messages a user may send per minute, sustained (REST and WebSocket together)…
    #[arg(long, env = "WADI_MESSAGE_RATE_PER_MINUTE", default_value_t = 20.0)]
    pub message_rate_per_minute: f64,

    /// …and in a burst.
    #[arg(long, env = "WADI_MESSAGE_RATE_BURST", default_value_t = 10)]
    pub message_rate_burst: u32,

    /// Past this many runs driven by this instance at once, new messages are refused with
    /// `overloaded` (and a retry hint) while the running answers go on (0: no cap).
    #[arg(long, env = "WADI_MAX_ACTIVE_RUNS", default_value_t = 0)]
    pub max_active_runs: usize,

    /// Past this much event-loop lag, new messages are refused with `overloaded` (0: not
    /// checked). The running answers' chunks are delayed by that much already.
    #[arg(long, env = "WADI_MAX_LOOP_LAG", value_parser = crate::config::parse_duration, default_value = "100ms")]
    pub max_loop_lag: Duration,

    /// Largest message content accepted, in bytes (REST and WebSocket).
    #[arg(long, env = "WADI_MAX_CONTENT_BYTES", default_value_t = 32 * 1024)]
    pub max_content_bytes: usize,

    /// Longest answer kept from the model, in bytes: past it the run ends `failed` with the
    /// answer up to there (a provider that never stops must not fill the disk).
    #[arg(long, env = "WADI_MAX_ANSWER_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub max_answer_bytes: usize,

    /// Conversations a user may create in a burst…
    #[arg(long, env = "WADI_CONVERSATION_RATE_BURST", default_value_t = 30)]
    pub conversation_rate_burst: u32,

    /// …and per minute after it.
    #[arg(
        long,
        env = "WADI_CONVERSATION_RATE_PER_MINUTE",
        default_value_t = 30.0
    )]
    pub conversation_rate_per_minute: f64,
}

impl RunSettings {
    /// How long a live owner takes, at most, to act on a stop recorded in the store: the stop
    /// message may be lost, and the owner reads the store at its next heartbeat (two, with a
    /// second to save).
    pub fn stop_landing(&self) -> Duration {
        self.instance_heartbeat * 2 + Duration::from_secs(1)
    }
}

/// The local sockets, as runs see them.
pub trait Announce: Send + Sync + 'static {
    /// A run started: the chat sockets here showing its conversation follow it.
    fn run_started(&self, handle: &Arc<RunHandle>);
    /// True if a chat socket here shows the conversation.
    fn shows(&self, conversation: ConversationId) -> bool;
    /// Every conversation a chat socket here shows.
    fn shown(&self) -> Vec<ConversationId>;
    /// Tells every authenticated chat and user socket here that events may have been lost.
    fn events_may_be_lost(&self);
    /// Tells the user's sockets here that one of their conversations changed.
    fn conversation_changed(&self, changed: &cluster::Changed);
}

/// Where a new user message goes in its conversation's tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// After the conversation's newest message (what clients did before branches).
    Latest,
    /// After this answer (continuing the branch the user is looking at).
    After(MessageId),
    /// As a new version of this user message: same parent.
    EditOf(MessageId),
}

impl Placement {
    /// From a request's `parentId` and `editOf` (at most one of them).
    pub fn from_request(
        parent_id: Option<uuid::Uuid>,
        edit_of: Option<uuid::Uuid>,
    ) -> Result<Self, AppError> {
        match (parent_id, edit_of) {
            (None, None) => Ok(Self::Latest),
            (Some(parent), None) => Ok(Self::After(parent.into())),
            (None, Some(original)) => Ok(Self::EditOf(original.into())),
            (Some(_), Some(_)) => Err(AppError::invalid(
                ErrorCode::InvalidRequest,
                "give parentId or editOf, not both",
            )),
        }
    }
}

/// What a run is started for.
enum Request {
    Send {
        content: String,
        client_message_id: Option<String>,
        placement: Placement,
    },
    Regenerate(MessageId),
}

/// The result of a send.
pub struct Sent {
    /// The committed user message (the earlier one, for a repeated `clientMessageId`).
    pub message: MessageRecord,
    /// The run that message started.
    pub run: Option<RunRecord>,
    /// The run to follow (driven here or mirrored).
    pub handle: Option<Arc<RunHandle>>,
    /// False when a repeated `clientMessageId` made this a replay that wrote nothing.
    pub created: bool,
}

impl Sent {
    pub fn response(&self) -> SentMessage {
        SentMessage {
            message: dto::message(&MessageRow {
                message: self.message.clone(),
                run_status: None,
                model: None,
                prompt_tokens: None,
                completion_tokens: None,
                usage_estimated: false,
                siblings: Vec::new(),
            }),
            run: self.run.as_ref().map(dto::run),
        }
    }
}

/// What the runs service is built from.
pub struct Parts {
    pub instance: InstanceId,
    pub store: Arc<dyn Store>,
    pub model: Arc<dyn ChatModel>,
    pub metrics: Arc<Metrics>,
    pub settings: RunSettings,
    pub cluster: Arc<dyn Cluster>,
    /// Where the message rates are counted across instances.
    pub rates: Arc<dyn SharedRates>,
    pub sockets: Arc<dyn Announce>,
}

pub struct Runs {
    /// This process, as the owner of the runs it drives.
    pub instance: InstanceId,
    pub store: Arc<dyn Store>,
    pub model: Arc<dyn ChatModel>,
    pub metrics: Arc<Metrics>,
    pub settings: RunSettings,
    pub hub: Arc<Hub>,
    pub cluster: Arc<dyn Cluster>,
    sockets: Arc<dyn Announce>,
    /// Messages per user (REST and WebSocket sends alike, on every instance).
    limiter: SharedLimit<UserId>,
    /// Attempts per user, refused ones included: a refused send gives its message back, but
    /// each attempt still costs the store some work.
    attempts: SharedLimit<UserId>,
    /// Copies of runs' logs to the shared log, so shutdown can let them finish.
    replicators: TaskTracker,
    liveness: liveness::Liveness,
    load: load::Load,
    /// Streaming runs' progress, written in batches.
    checkpoints: checkpoints::Checkpointer,
}

impl Runs {
    /// The service; `events` is what the cluster tells this instance (handled from here on).
    pub fn new(parts: Parts, events: Option<mpsc::UnboundedReceiver<ClusterEvent>>) -> Arc<Self> {
        let Parts {
            instance,
            store,
            model,
            metrics,
            settings,
            cluster,
            rates,
            sockets,
        } = parts;
        let limiter = SharedLimit::new(
            "messages",
            Rate::per_minute(
                settings.message_rate_burst,
                settings.message_rate_per_minute,
            ),
            rates.clone(),
        );
        let attempts = SharedLimit::new(
            "attempts",
            Rate::per_minute(
                settings
                    .message_rate_burst
                    .saturating_mul(ATTEMPTS_PER_MESSAGE),
                settings.message_rate_per_minute * f64::from(ATTEMPTS_PER_MESSAGE),
            ),
            rates,
        );
        let checkpoints = checkpoints::Checkpointer::start(store.clone());
        let runs = Arc::new(Self {
            instance,
            store,
            model,
            metrics,
            settings,
            hub: Arc::new(Hub::default()),
            cluster,
            sockets,
            limiter,
            attempts,
            replicators: TaskTracker::new(),
            liveness: liveness::Liveness::default(),
            load: load::Load::default(),
            checkpoints,
        });
        runs.load.watch_lag(runs.settings.max_loop_lag);
        if let Some(events) = events {
            tokio::spawn(Self::handle_events(Arc::downgrade(&runs), events));
        }
        runs
    }

    /// Commits a user message to a conversation the caller owns (the caller has checked), at
    /// `placement` in its tree, and starts the run answering it. A repeated `client_message_id`
    /// writes nothing and returns the message and run from the first send. A conversation with
    /// a run already streaming (on any instance) is refused with `run_in_progress` and nothing
    /// is written.
    pub async fn send(
        self: &Arc<Self>,
        user: UserId,
        conversation_id: ConversationId,
        content: String,
        client_message_id: Option<String>,
        placement: Placement,
    ) -> Result<Sent, AppError> {
        let request = Request::Send {
            content,
            client_message_id,
            placement,
        };
        self.admit_and_commit(user, conversation_id, request).await
    }

    /// Admits `request` (the cap on runs, the message rate), commits it and starts its run, and
    /// settles the message rate by what happened. The commit runs in a task of its own: if the
    /// caller goes away (an HTTP client disconnecting), the commit and the start of the run
    /// still happen together, never one without the other. It stays in the caller's span (the
    /// request or socket), and so does the run.
    async fn admit_and_commit(
        self: &Arc<Self>,
        user: UserId,
        conversation_id: ConversationId,
        request: Request,
    ) -> Result<Sent, AppError> {
        let resend = match &request {
            Request::Send {
                client_message_id: Some(id),
                ..
            } => Some(id.as_str()),
            _ => None,
        };
        let message = self.admit(user, conversation_id, resend).await?;
        let runs = self.clone();
        let sent = tokio::spawn(
            async move { runs.commit_and_start(user, conversation_id, request).await }
                .instrument(tracing::Span::current()),
        )
        .await
        .map_err(AppError::internal)?;
        if let Some(message) = message {
            self.settle(message, &sent).await;
        }
        sent
    }

    /// The message rate counts messages sent: a resend of one already committed, a send refused
    /// because an answer is being written, or one the server could not take now (overloaded,
    /// shutting down, storage away) gives its allowance back: a client retrying meanwhile must
    /// not lock itself out. Bad input keeps it spent.
    async fn settle(&self, message: Taken<UserId>, sent: &Result<Sent, AppError>) {
        let nothing_new = match sent {
            Ok(sent) => !sent.created,
            Err(AppError::Conflict { code, .. }) => *code == ErrorCode::RunInProgress,
            Err(
                AppError::Overloaded { .. } | AppError::ShuttingDown | AppError::Unavailable(_),
            ) => true,
            Err(_) => false,
        };
        if nothing_new {
            self.limiter.give_back(message).await;
        }
    }

    /// Starts another answer to the user message `message_id` of a conversation the caller
    /// owns; the earlier answers stay (siblings in the tree). Refused like a send when a run is
    /// streaming.
    pub async fn regenerate(
        self: &Arc<Self>,
        user: UserId,
        conversation_id: ConversationId,
        message_id: MessageId,
    ) -> Result<Sent, AppError> {
        self.admit_and_commit(user, conversation_id, Request::Regenerate(message_id))
            .await
    }

    /// The checks before any work: the cap on runs here, and the user's message rate. Returns
    /// the message counted, to give back if none is sent after all; none for a `resend` (its
    /// `clientMessageId`) of a message already committed once the messages are spent: its
    /// first answer was lost, and it sends nothing new. Once the messages are spent, a send
    /// into a conversation whose answer is streaming is refused with `run_in_progress`, as it
    /// would be with messages left: waiting for the answer is what helps.
    async fn admit(
        &self,
        user: UserId,
        conversation_id: ConversationId,
        resend: Option<&str>,
    ) -> Result<Option<Taken<UserId>>, AppError> {
        // Refused at once when full, before any work, even counting (the exact check is at the
        // reservation).
        let max = self.settings.max_active_runs;
        if max > 0 && self.hub.live() >= max {
            self.metrics.overload_refusals.inc();
            return Err(AppError::Overloaded {
                retry_after: load::RETRY_AFTER,
            });
        }
        // Per user, whichever socket, request or instance it comes from: opening more sockets
        // does not buy more messages.
        // Resends count as attempts: they cost the store work.
        if !self.attempts.allows(user).await {
            return Err(AppError::RateLimited);
        }
        if let Some(message) = self.limiter.take(user).await {
            return Ok(Some(message));
        }
        if let Some(id) = resend
            && self.store.has_client_message(conversation_id, id).await?
        {
            return Ok(None);
        }
        if self.store.active_run(conversation_id).await?.is_some() {
            return Err(run_in_progress());
        }
        Err(AppError::RateLimited)
    }

    /// Where a new user message goes: its parent.
    async fn parent_for(
        &self,
        conversation_id: ConversationId,
        placement: Placement,
    ) -> Result<Option<MessageId>, AppError> {
        let not_here = |what: &str| {
            AppError::invalid(
                ErrorCode::InvalidRequest,
                format!("{what} is not a message of this conversation"),
            )
        };
        match placement {
            Placement::Latest => Ok(self.store.newest_leaf(conversation_id, None).await?),
            Placement::After(parent) => {
                let message = self
                    .store
                    .message(conversation_id, parent)
                    .await?
                    .ok_or_else(|| not_here("parentId"))?;
                if message.role != Role::Assistant {
                    return Err(AppError::invalid(
                        ErrorCode::InvalidRequest,
                        "parentId must be an answer: a message follows an answer",
                    ));
                }
                Ok(Some(parent))
            }
            Placement::EditOf(original) => {
                let message = self
                    .store
                    .message(conversation_id, original)
                    .await?
                    .ok_or_else(|| not_here("editOf"))?;
                if message.role != Role::User {
                    return Err(AppError::invalid(
                        ErrorCode::InvalidRequest,
                        "editOf must be a user message",
                    ));
                }
                Ok(message.parent_id)
            }
        }
    }

    async fn commit_and_start(
        self: &Arc<Self>,
        user: UserId,
        conversation_id: ConversationId,
        request: Request,
    ) -> Result<Sent, AppError> {
        if self.hub.is_stopping() {
            return Err(AppError::ShuttingDown);
        }
        if let Some(retry_after) = self.lagging() {
            self.metrics.overload_refusals.inc();
            return Err(AppError::Overloaded { retry_after });
        }
        let now = now_millis();
        let run_id = RunId::new();
        let (message, existing) = match request {
            Request::Send {
                content,
                client_message_id,
                placement,
            } => {
                let parent_id = self.parent_for(conversation_id, placement).await?;
                let message = MessageRecord {
                    id: MessageId::new(),
                    conversation_id,
                    role: Role::User,
                    content,
                    run_id: Some(run_id),
                    client_message_id,
                    created_at: now,
                    parent_id,
                };
                (message, false)
            }
            Request::Regenerate(message_id) => {
                let message = self
                    .store
                    .message(conversation_id, message_id)
                    .await?
                    .ok_or(AppError::NotFound)?;
                if message.role != Role::User {
                    return Err(AppError::invalid(
                        ErrorCode::InvalidRequest,
                        "only a user message can be answered again",
                    ));
                }
                (message, true)
            }
        };
        // The conversation's model, or the server's default.
        let model = self
            .store
            .conversation(conversation_id, user)
            .await?
            .ok_or(AppError::NotFound)?
            .model
            .unwrap_or_else(|| self.model.name().to_owned());
        let run = RunRecord::running(
            run_id,
            conversation_id,
            user,
            message.id,
            model,
            now,
            self.instance,
        );
        let handle = RunHandle::new(
            RunKey {
                id: run_id,
                conversation_id,
                owner_id: user,
                message_id: message.id,
                client_message_id: message.client_message_id.clone(),
            },
            Origin::Owned,
        );
        // Counted as ours before it is committed: a concurrent send that meets it in the store
        // must never take it for an orphan. Past the cap on runs here, refused.
        if !self
            .hub
            .reserve(handle.clone(), self.settings.max_active_runs)
        {
            self.metrics.overload_refusals.inc();
            return Err(AppError::Overloaded {
                retry_after: load::RETRY_AFTER,
            });
        }
        let inserted = if existing {
            self.insert_run(&run).await.map(|()| (message, true))
        } else {
            self.insert(&message, &run).await
        };
        let (message, created) = match inserted {
            Ok(inserted) => inserted,
            Err(error) => {
                self.hub.release(run_id);
                return Err(error);
            }
        };
        if !created {
            // A resend: answer with what the first send started.
            self.hub.release(run_id);
            let run = self.store.run_for_message(message.id).await?;
            let handle = run.clone().map(|run| self.handle_for(run));
            return Ok(Sent {
                message,
                run,
                handle,
                created: false,
            });
        }

        self.hub.activate(&handle);
        self.start(handle.clone());
        self.sockets.run_started(&handle);
        let event = RunStarted {
            instance: self.instance,
            user,
            conversation: conversation_id,
            run: run_id,
            message: message.id,
            client_message_id: message.client_message_id.clone(),
        };
        let cluster = self.cluster.clone();
        tokio::spawn(async move { cluster.announce(&event).await });
        self.conversation_changed(
            user,
            conversation_id,
            wadi_protocol::ConversationChange::Message,
            None,
        );
        tracing::info!(%run_id, %conversation_id, user_id = %user, "run started");
        Ok(Sent {
            message,
            run: Some(run),
            handle: Some(handle),
            created: true,
        })
    }

    /// Inserts a regenerated answer's run, clearing once an orphan that holds the conversation.
    async fn insert_run(self: &Arc<Self>, run: &RunRecord) -> Result<(), AppError> {
        let mut cleared = false;
        loop {
            match self.store.insert_run(run).await {
                Ok(()) => return Ok(()),
                Err(StoreError::Conflict(Constraint::OneActiveRun))
                    if !cleared && self.clear_orphan(run.conversation_id).await? =>
                {
                    cleared = true;
                }
                Err(StoreError::Conflict(Constraint::OneActiveRun)) => {
                    return Err(run_in_progress());
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Inserts the message and its run, clearing once an orphan that holds the conversation.
    async fn insert(
        self: &Arc<Self>,
        message: &MessageRecord,
        run: &RunRecord,
    ) -> Result<(MessageRecord, bool), AppError> {
        let title = derive_title(&message.content);
        let mut cleared = false;
        loop {
            match self
                .store
                .insert_user_message(message, &title, Some(run))
                .await
            {
                Ok(inserted) => return Ok(inserted),
                Err(StoreError::Conflict(Constraint::OneActiveRun))
                    if !cleared && self.clear_orphan(message.conversation_id).await? =>
                {
                    cleared = true;
                }
                Err(StoreError::Conflict(Constraint::OneActiveRun)) => {
                    return Err(run_in_progress());
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Spawns the task that drives a committed run, and its copy to the shared log.
    fn start(self: &Arc<Self>, handle: Arc<RunHandle>) {
        self.hub
            .tasks
            .spawn(task::drive(self.clone(), handle.clone()));
        let cluster = self.cluster.clone();
        self.replicators
            .spawn(async move { cluster.replicate(handle).await });
    }

    /// `Some(retry after)` if the event loop lags past its limit: a new run now would make the
    /// running ones suffer. (The cap on runs is checked as a run is reserved.)
    fn lagging(&self) -> Option<Duration> {
        let lag_cap = self.settings.max_loop_lag;
        (!lag_cap.is_zero() && self.load.lag() > lag_cap).then_some(load::RETRY_AFTER)
    }

    /// The caller's run, driven here or mirrored; `None` if there is no such run of theirs.
    pub async fn find(
        self: &Arc<Self>,
        run_id: RunId,
        user: UserId,
    ) -> Result<Option<Arc<RunHandle>>, StoreError> {
        if let Some(handle) = self.hub.get(run_id) {
            if handle.owner_id != user {
                return Ok(None);
            }
            // Kept here for replay after it ended (or streaming): its conversation, and with it
            // the run, may have been deleted since, through any instance. Only if the store
            // cannot say is the handle trusted as it is, so a replay survives a database blip.
            return match self.store.run_exists(run_id, user).await {
                Ok(stored) => Ok(stored.then_some(handle)),
                Err(error) => {
                    tracing::warn!(%error, %run_id, "cannot check that a run still exists; replaying it from memory");
                    Ok(Some(handle))
                }
            };
        }
        Ok(self
            .store
            .run(run_id, user)
            .await?
            .map(|record| self.handle_for(record)))
    }

    /// The conversation's run that is streaming, on whichever instance drives it.
    pub async fn active_for(
        self: &Arc<Self>,
        conversation_id: ConversationId,
    ) -> Result<Option<Arc<RunHandle>>, StoreError> {
        if let Some(handle) = self.hub.active_for(conversation_id) {
            return Ok(Some(handle));
        }
        let Some(record) = self.store.active_run(conversation_id).await? else {
            return Ok(None);
        };
        if record.owner_instance == Some(self.instance) && !self.drives(record.id) {
            // Ours in the store but driven by nothing here: an orphan the heartbeat ends.
            return Ok(None);
        }
        Ok(Some(self.handle_for(record)))
    }

    /// True if a task here is streaming the run.
    fn drives(&self, run_id: RunId) -> bool {
        self.hub
            .owned(run_id)
            .is_some_and(|handle| !handle.is_finished())
    }

    /// A handle on a stored run: the one driving it here, or a mirror fed from the shared log
    /// and the store.
    fn handle_for(self: &Arc<Self>, record: RunRecord) -> Arc<RunHandle> {
        let key = RunKey {
            id: record.id,
            conversation_id: record.conversation_id,
            owner_id: record.owner_id,
            message_id: record.message_id,
            client_message_id: None,
        };
        let owner = record.owner_instance;
        match self
            .hub
            .mirror(record.id, || RunHandle::new(key, Origin::Mirror { owner }))
        {
            hub::Mirror::Existing(handle) => handle,
            hub::Mirror::New(handle) => {
                tokio::spawn(mirror::feed(
                    self.clone(),
                    Arc::downgrade(&handle),
                    Some(record),
                ));
                handle
            }
        }
    }

    /// A mirror of a run another instance announced.
    fn handle_for_started(self: &Arc<Self>, started: &RunStarted) -> Arc<RunHandle> {
        let key = RunKey {
            id: started.run,
            conversation_id: started.conversation,
            owner_id: started.user,
            message_id: started.message,
            client_message_id: started.client_message_id.clone(),
        };
        let owner = Some(started.instance);
        match self.hub.mirror(started.run, || {
            RunHandle::new(key, Origin::Mirror { owner })
        }) {
            hub::Mirror::Existing(handle) => handle,
            hub::Mirror::New(handle) => {
                tokio::spawn(mirror::feed(self.clone(), Arc::downgrade(&handle), None));
                handle
            }
        }
    }

    /// Stops the caller's run wherever it is driven: at once here, or through the store (which
    /// its owner polls) and the cluster (which tells it now). Also before its first token.
    pub async fn stop(&self, handle: &RunHandle, user: UserId) -> Result<(), AppError> {
        if handle.owner_id != user || handle.is_finished() {
            return Err(no_active_run());
        }
        if let Origin::Owned = handle.origin {
            tracing::info!(run_id = %handle.id, "stop requested");
            handle.stop(RunStatus::Stopped);
            return Ok(());
        }
        let Some(owner) = self
            .store
            .request_stop(handle.id, user, now_millis())
            .await?
        else {
            return Err(no_active_run());
        };
        tracing::info!(run_id = %handle.id, owner = ?owner, "stop requested for a run driven elsewhere");
        // The mirror reads the store soon and often from now on, until it sees the run end:
        // its end may not come through Redis.
        handle.stop(RunStatus::Stopped);
        self.tell_owner_to_stop(owner, handle.id);
        Ok(())
    }

    /// Tells `owner` to stop `run` now: at once if it is this instance, else through the
    /// cluster, in the background (the stop is in the store already, which the owner reads at
    /// its next heartbeat: a Redis that does not answer must not hold up whoever asked).
    fn tell_owner_to_stop(&self, owner: Option<InstanceId>, run: RunId) {
        match owner {
            Some(owner) if owner == self.instance => {
                if let Some(owned) = self.hub.owned(run) {
                    owned.stop(RunStatus::Stopped);
                }
            }
            Some(owner) => {
                let cluster = self.cluster.clone();
                tokio::spawn(async move { cluster.send_stop(owner, run).await });
            }
            None => {}
        }
    }

    /// The run's conversation was deleted while it streamed: it is stopped at once wherever it
    /// is driven, so the provider is not asked for more of an answer nobody can keep (nothing of
    /// it is saved: its rows went with the conversation). Without this, its owner would notice
    /// only at its next checkpoint or heartbeat.
    pub fn cancel_deleted(&self, run: &RunRecord) {
        tracing::info!(run_id = %run.id, owner = ?run.owner_instance, "conversation deleted while its answer streamed; stopping it");
        self.tell_owner_to_stop(run.owner_instance, run.id);
    }

    /// This instance's sockets of `user` want to learn of runs started elsewhere; resolves once
    /// that is in place (so a run started after it is announced, and one started before it is
    /// in the store).
    pub async fn watch_user(&self, user: UserId) -> Lease {
        self.cluster.watch_user(user).await
    }

    /// One of `user`'s conversations changed: their sockets here are told at once, those on
    /// other instances through the cluster (in the background).
    pub fn conversation_changed(
        &self,
        user: UserId,
        conversation: ConversationId,
        change: wadi_protocol::ConversationChange,
        title: Option<String>,
    ) {
        let changed = cluster::Changed {
            user,
            conversation,
            change,
            title,
        };
        self.sockets.conversation_changed(&changed);
        let cluster = self.cluster.clone();
        tokio::spawn(async move { cluster.announce_change(&changed).await });
    }

    async fn handle_events(
        runs: std::sync::Weak<Self>,
        mut events: mpsc::UnboundedReceiver<ClusterEvent>,
    ) {
        while let Some(event) = events.recv().await {
            let Some(runs) = runs.upgrade() else {
                return;
            };
            match event {
                ClusterEvent::Stop(run_id) => {
                    if let Some(handle) = runs.hub.owned(run_id) {
                        tracing::info!(%run_id, "stop requested from another instance");
                        handle.stop(RunStatus::Stopped);
                    }
                }
                ClusterEvent::RunStarted(started) => {
                    if started.instance != runs.instance && runs.sockets.shows(started.conversation)
                    {
                        let handle = runs.handle_for_started(&started);
                        runs.sockets.run_started(&handle);
                    }
                }
                ClusterEvent::Changed(changed) => runs.sockets.conversation_changed(&changed),
                ClusterEvent::Resync => {
                    runs.sockets.events_may_be_lost();
                    tokio::spawn(async move { runs.announce_missed_runs().await });
                }
            }
        }
    }

    /// After a gap in the cluster's events: the runs streaming elsewhere in conversations shown
    /// here are announced to their sockets, as their lost `RunStarted` would have done (a
    /// socket already following one is left as it is).
    async fn announce_missed_runs(self: &Arc<Self>) {
        let shown: std::collections::HashSet<ConversationId> =
            self.sockets.shown().into_iter().collect();
        if shown.is_empty() {
            return;
        }
        // One query for all of them, retried a few times: a Redis gap often comes with a
        // database that is briefly unreachable too.
        let mut delay = Duration::from_millis(250);
        let mut attempt = 1;
        let running = loop {
            match self.store.running_runs().await {
                Ok(running) => break running,
                Err(error) if attempt < 4 => {
                    tracing::warn!(%error, attempt, "cannot look for runs announced while Redis was away; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot look for runs announced while Redis was away");
                    return;
                }
            }
        };
        let mut announced = 0;
        for run in running {
            if shown.contains(&run.conversation_id) && run.owner_instance != Some(self.instance) {
                let handle = self.handle_for(run);
                self.sockets.run_started(&handle);
                self.metrics.runs_announced_again.inc();
                announced += 1;
            }
        }
        tracing::info!(
            runs = announced,
            "runs started elsewhere announced again after a gap"
        );
    }

    /// Shutdown: stops every run driven here as `interrupted` and waits up to `grace` for them
    /// to save and reach the shared log; then this instance leaves the store's list. Returns
    /// false if something did not finish in time.
    pub async fn shut_down(&self, grace: Duration) -> bool {
        let started = tokio::time::Instant::now();
        let saved = self.hub.interrupt_all(grace).await;
        // A last try for outcomes the store would not take (they are lost with the process).
        let left = grace.saturating_sub(started.elapsed());
        let _ = tokio::time::timeout(left, self.save_unsaved(None)).await;
        self.replicators.close();
        let left = grace.saturating_sub(started.elapsed());
        let replicated = tokio::time::timeout(left, self.replicators.wait())
            .await
            .is_ok();
        if let Err(error) = self.store.deregister_instance(self.instance).await {
            tracing::warn!(%error, "cannot remove this instance from the store");
        }
        saved && replicated
    }
}

pub fn run_in_progress() -> AppError {
    AppError::Conflict {
        code: ErrorCode::RunInProgress,
        message: "a run is already streaming in this conversation; stop it or wait for it".into(),
    }
}

fn no_active_run() -> AppError {
    AppError::Conflict {
        code: ErrorCode::NoActiveRun,
        message: "no run is streaming".into(),
    }
}
