//! Stored rows → the protocol crate's REST bodies and frames. Shared by the HTTP handlers, the
//! sockets and the runs service.

use wadi_protocol::{RunStatus, ServerMessage, Usage, api};

use crate::{
    store::{ConversationRecord, MessageRow, RunRecord},
    util::datetime,
};

/// What an untitled conversation is called until its first message names it.
pub const UNTITLED: &str = "New conversation";

pub fn conversation(record: &ConversationRecord) -> api::Conversation {
    api::Conversation {
        id: record.id.into(),
        title: record.title.clone().unwrap_or_else(|| UNTITLED.to_owned()),
        created_at: datetime(record.created_at),
        updated_at: datetime(record.updated_at),
        model: record.model.clone(),
        system_prompt: record.system_prompt.clone(),
    }
}

pub fn message(row: &MessageRow) -> api::Message {
    let record = &row.message;
    api::Message {
        id: record.id.into(),
        conversation_id: record.conversation_id.into(),
        role: record.role,
        content: record.content.clone(),
        run_id: record.run_id.map(Into::into),
        run_status: row.run_status,
        client_message_id: record.client_message_id.clone(),
        created_at: datetime(record.created_at),
        parent_id: record.parent_id.map(Into::into),
        siblings: row.siblings.iter().map(|id| (*id).into()).collect(),
        model: row.model.clone(),
        usage: usage(
            row.prompt_tokens,
            row.completion_tokens,
            row.usage_estimated,
        ),
    }
}

pub fn run(record: &RunRecord) -> api::Run {
    api::Run {
        id: record.id.into(),
        conversation_id: record.conversation_id.into(),
        message_id: record.message_id.into(),
        status: record.status,
        model: record.model.clone(),
        output: record.output.clone(),
        error: record.error.clone(),
        usage: run_usage(record),
        last_seq: u64::try_from(record.last_seq).unwrap_or_default(),
        started_at: datetime(record.started_at),
        finished_at: record.finished_at.map(datetime),
    }
}

/// Token usage, when the model reported it or the server counted it (`estimated`).
pub fn usage(prompt: Option<i64>, completion: Option<i64>, estimated: bool) -> Option<Usage> {
    let prompt = u32::try_from(prompt?).ok()?;
    let completion = u32::try_from(completion?).ok()?;
    Some(Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt.saturating_add(completion),
        estimated,
    })
}

/// A saved run's token usage.
pub fn run_usage(run: &RunRecord) -> Option<Usage> {
    usage(
        run.prompt_tokens,
        run.completion_tokens,
        run.usage_estimated,
    )
}

/// The `complete` frame of a run as saved.
pub fn complete_frame(run: &RunRecord) -> ServerMessage {
    ServerMessage::Complete {
        run_id: run.id.into(),
        full_output: run.output.clone(),
        status: match run.status {
            // Only a run that has ended has a `complete`; one still marked running here was
            // cut off.
            RunStatus::Running => RunStatus::Interrupted,
            status => status,
        },
        usage: run_usage(run),
    }
}
