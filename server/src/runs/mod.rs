//! Sending a message: commit it (idempotently), then start the run that answers it.

use uuid::Uuid;
use wadi_protocol::api::{Message, SentMessage};

use crate::{
    auth::AuthUser,
    error::AppError,
    http::{conversations::derive_title, dto},
    state::AppState,
    store::{MessageRecord, MessageRow},
    util::now_millis,
};

/// The result of a send: what to answer, and whether anything new was written.
pub struct Sent {
    pub response: SentMessage,
    pub created: bool,
}

/// Commits a user message to a conversation the caller owns (checked by the caller). A repeated
/// `client_message_id` returns the message already committed and writes nothing.
pub async fn send(
    state: &AppState,
    _user: &AuthUser,
    conversation_id: Uuid,
    content: String,
    client_message_id: Option<String>,
) -> Result<Sent, AppError> {
    let record = MessageRecord {
        id: Uuid::now_v7(),
        conversation_id,
        role: "user".to_owned(),
        content,
        run_id: None,
        client_message_id,
        created_at: now_millis(),
    };
    let title = derive_title(&record.content);
    let (message, created) = state
        .store
        .insert_user_message(&record, &title, None)
        .await?;
    Ok(Sent {
        response: SentMessage {
            message: user_message(message)?,
            run: None,
        },
        created,
    })
}

fn user_message(record: MessageRecord) -> Result<Message, AppError> {
    dto::message(&MessageRow {
        message: record,
        run_status: None,
    })
}
