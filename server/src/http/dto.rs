//! Stored rows → the protocol crate's REST bodies.

use wadi_protocol::{
    RunStatus, ServerMessage, Usage,
    api::{self, Role},
};

use crate::{
    error::AppError,
    store::{ConversationRecord, MessageRow, RunRecord},
    util::datetime,
};

/// What an untitled conversation is called until its first message names it.
pub const UNTITLED: &str = "New conversation";

pub fn conversation(record: &ConversationRecord) -> api::Conversation {
    api::Conversation {
        id: record.id,
        title: record.title.clone().unwrap_or_else(|| UNTITLED.to_owned()),
        created_at: datetime(record.created_at),
        updated_at: datetime(record.updated_at),
    }
}

pub fn message(row: &MessageRow) -> Result<api::Message, AppError> {
    let record = &row.message;
    let role = Role::parse(&record.role).ok_or_else(|| {
        AppError::internal(format!("message {} has role {:?}", record.id, record.role))
    })?;
    let run_status = row.run_status.as_deref().and_then(RunStatus::parse);
    Ok(api::Message {
        id: record.id,
        conversation_id: record.conversation_id,
        role,
        content: record.content.clone(),
        run_id: record.run_id,
        run_status,
        client_message_id: record.client_message_id.clone(),
        created_at: datetime(record.created_at),
    })
}

pub fn run(record: &RunRecord) -> Result<api::Run, AppError> {
    let status = RunStatus::parse(&record.status).ok_or_else(|| {
        AppError::internal(format!("run {} has status {:?}", record.id, record.status))
    })?;
    Ok(api::Run {
        id: record.id,
        conversation_id: record.conversation_id,
        message_id: record.message_id,
        status,
        model: record.model.clone(),
        output: record.output.clone(),
        error: record.error.clone(),
        usage: usage(record.prompt_tokens, record.completion_tokens),
        last_seq: u64::try_from(record.last_seq).unwrap_or_default(),
        started_at: datetime(record.started_at),
        finished_at: record.finished_at.map(datetime),
    })
}

/// Token usage, when the model reported it.
pub fn usage(prompt: Option<i64>, completion: Option<i64>) -> Option<Usage> {
    let prompt = u32::try_from(prompt?).ok()?;
    let completion = u32::try_from(completion?).ok()?;
    Some(Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt.saturating_add(completion),
    })
}

/// The `complete` frame of a run as saved (a run no longer in memory).
pub fn complete_frame(run: &RunRecord) -> ServerMessage {
    ServerMessage::Complete {
        run_id: run.id,
        full_output: run.output.clone(),
        status: RunStatus::parse(&run.status).unwrap_or(RunStatus::Interrupted),
        usage: usage(run.prompt_tokens, run.completion_tokens),
    }
}
