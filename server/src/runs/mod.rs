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
    let (message, created) = match state
        .store
        .insert_user_message(&message, &title, Some(&run))
        .await
    {
        Ok(result) => result,
        Err(StoreError::Conflict) => return Err(run_in_progress()),
        Err(error) => return Err(error.into()),
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

    let handle = RunHandle::new(run.id, conversation_id, user.id, message.id);
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
        let outcome = RunOutcome {
            status: RunStatus::Interrupted.as_str().to_owned(),
            output: run.output.clone(),
            error: Some("the server stopped while this answer was streaming".into()),
            prompt_tokens: None,
            completion_tokens: None,
            last_seq: run.last_seq,
            finished_at: now_millis(),
            message_id: Uuid::now_v7(),
        };
        state.store.finish_run(run.id, &outcome).await?;
        tracing::warn!(run_id = %run.id, seq = run.last_seq, "run interrupted by a restart");
    }
    Ok(count)
}
