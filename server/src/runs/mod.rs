//! Runs: a user message starts one; it streams the model's answer to every watcher, survives
//! its client going away, can be stopped, and is saved however it ends.
//!
//! Sending (REST or WebSocket) goes through [`send`]: commit the user message and the run in one
//! transaction, then spawn the run task and announce the run to every chat socket of the
//! conversation.

pub mod handle;
pub mod hub;
pub mod task;

use std::sync::Arc;

use uuid::Uuid;
use wadi_protocol::{ErrorCode, RunStatus, api::SentMessage};

pub use handle::RunHandle;
pub use hub::Hub;

use crate::{
    auth::AuthUser,
    error::AppError,
    http::{conversations::derive_title, dto},
    state::AppState,
    store::{MessageRecord, MessageRow, RunOutcome, RunRecord, StoreError},
    util::now_millis,
};

/// The result of a send.
pub struct Sent {
    /// The committed user message (the earlier one, for a repeated `clientMessageId`).
    pub message: MessageRecord,
    /// The run that message started.
    pub run: Option<RunRecord>,
    /// The run in memory, while it streams or is retained.
    pub handle: Option<Arc<RunHandle>>,
    /// False when a repeated `clientMessageId` made this a replay that wrote nothing.
    pub created: bool,
}

impl Sent {
    pub fn response(&self) -> Result<SentMessage, AppError> {
        let message = dto::message(&MessageRow {
            message: self.message.clone(),
            run_status: None,
        })?;
        let run = self.run.as_ref().map(dto::run).transpose()?;
        Ok(SentMessage { message, run })
    }
}

/// Commits a user message to a conversation the caller owns (the caller has checked) and starts
/// the run answering it. A repeated `client_message_id` writes nothing and returns the message
/// and run from the first send. A conversation with a run already streaming is refused with
/// `run_in_progress` and nothing is written.
pub async fn send(
    state: &AppState,
    user: &AuthUser,
    conversation_id: Uuid,
    content: String,
    client_message_id: Option<String>,
) -> Result<Sent, AppError> {
    // Per user, whichever socket or request it comes from: opening more sockets does not buy
    // more messages.
    if !state.message_limiter.check(&user.id) {
        return Err(AppError::RateLimited);
    }
    // In a task of its own: if the caller goes away (an HTTP client disconnecting), the commit
    // and the start of the run still happen together, never one without the other.
    let state = state.clone();
    let user = user.clone();
    tokio::spawn(async move {
        commit_and_start(&state, &user, conversation_id, content, client_message_id).await
    })
    .await
    .map_err(AppError::internal)?
}

async fn commit_and_start(
    state: &AppState,
    user: &AuthUser,
    conversation_id: Uuid,
    content: String,
    client_message_id: Option<String>,
) -> Result<Sent, AppError> {
    if state.hub.is_stopping() {
        return Err(AppError::ShuttingDown);
    }
    let now = now_millis();
    let run_id = Uuid::now_v7();
    let message = MessageRecord {
        id: Uuid::now_v7(),
        conversation_id,
        role: "user".to_owned(),
        content,
        run_id: Some(run_id),
        client_message_id,
        created_at: now,
    };
    let run = RunRecord {
        id: run_id,
        conversation_id,
        owner_id: user.id,
        message_id: message.id,
        status: RunStatus::Running.as_str().to_owned(),
        model: state.model.name().to_owned(),
        output: String::new(),
        error: None,
        prompt_tokens: None,
        completion_tokens: None,
        last_seq: 0,
        started_at: now,
        finished_at: None,
    };
    let title = derive_title(&message.content);
    let mut orphan_cleared = false;
    let (message, created) = loop {
        match state
            .store
            .insert_user_message(&message, &title, Some(&run))
            .await
        {
            Ok(result) => break result,
            Err(StoreError::Conflict)
                if !orphan_cleared && clear_orphan(state, conversation_id).await? =>
            {
                orphan_cleared = true;
            }
            Err(StoreError::Conflict) => return Err(run_in_progress()),
            Err(error) => return Err(error.into()),
        }
    };
    if !created {
        // A resend: answer with what the first send started.
        let run = state.store.run_for_message(message.id).await?;
        let handle = run.as_ref().and_then(|run| state.hub.get(run.id));
        return Ok(Sent {
            message,
            run,
            handle,
            created: false,
        });
    }

    let handle = RunHandle::new(
        run.id,
        conversation_id,
        user.id,
        message.id,
        message.client_message_id.clone(),
    );
    state.hub.insert(handle.clone());
    let context = state.run_context();
    state.hub.tasks.spawn(task::drive(context, handle.clone()));
    state.clients.announce_run(&handle);
    tracing::info!(run_id = %run.id, %conversation_id, user_id = %user.id, "run started");
    Ok(Sent {
        message,
        run: Some(run),
        handle: Some(handle),
        created: true,
    })
}

/// A run the store says is `running` although no task drives it here (its outcome could not be
/// saved, say) would block the conversation until the next restart: end it as `interrupted`.
/// Returns true if there was one.
async fn clear_orphan(state: &AppState, conversation_id: Uuid) -> Result<bool, AppError> {
    if state.hub.active_for(conversation_id).is_some() {
        return Ok(false);
    }
    let Some(orphan) = state.store.active_run(conversation_id).await? else {
        return Ok(false);
    };
    tracing::warn!(run_id = %orphan.id, "ending a run no task was driving");
    state
        .store
        .finish_run(orphan.id, &interrupted(&orphan))
        .await?;
    Ok(true)
}

/// How a run cut off by a stop of the server (or lost by its task) is saved.
fn interrupted(run: &RunRecord) -> RunOutcome {
    RunOutcome {
        status: RunStatus::Interrupted.as_str().to_owned(),
        output: run.output.clone(),
        error: Some("the server stopped while this answer was streaming".into()),
        prompt_tokens: None,
        completion_tokens: None,
        last_seq: run.last_seq,
        finished_at: now_millis(),
        message_id: Uuid::now_v7(),
    }
}

pub fn run_in_progress() -> AppError {
    AppError::Conflict {
        code: ErrorCode::RunInProgress,
        message: "a run is already streaming in this conversation; stop it or wait for it".into(),
    }
}

/// Marks runs a previous process left `running` (it crashed or was killed) as `interrupted`,
/// keeping the output it had flushed. Called at startup, before serving.
pub async fn recover_interrupted(state: &AppState) -> Result<usize, StoreError> {
    let runs = state.store.running_runs().await?;
    let count = runs.len();
    for run in runs {
        state.store.finish_run(run.id, &interrupted(&run)).await?;
        tracing::warn!(run_id = %run.id, seq = run.last_seq, "run interrupted by a restart");
    }
    Ok(count)
}
