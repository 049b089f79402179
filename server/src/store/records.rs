//! Rows as stored. Timestamps are Unix milliseconds; handlers map rows to protocol DTOs.

use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UserRecord {
    pub id: Uuid,
    /// Lowercased.
    pub email: String,
    /// A PHC string (argon2id).
    pub password_hash: String,
    /// JSON object given at signup as `data`.
    pub user_metadata: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub last_sign_in_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SessionRecord {
    pub id: Uuid,
    pub user_id: Uuid,
    /// How the session was established (`password`), for the `amr` claim.
    pub amr_method: String,
    /// When it was established, in Unix milliseconds (the `amr` timestamp).
    pub amr_at: i64,
    pub created_at: i64,
    /// Last refresh.
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RefreshTokenRecord {
    pub id: Uuid,
    /// SHA-256 of the token, hex. The token itself is never stored.
    pub token_hash: String,
    pub session_id: Uuid,
    pub parent_id: Option<Uuid>,
    pub revoked: bool,
    pub created_at: i64,
    /// When it was revoked (or created, while active): the start of the reuse window.
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SigningKeyRecord {
    pub kid: String,
    /// PKCS#8 PEM of the P-256 private key.
    pub private_key_pem: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ConversationRecord {
    pub id: Uuid,
    pub owner_id: Uuid,
    /// `None` until set, or until the first message names the conversation.
    pub title: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct MessageRecord {
    pub id: Uuid,
    pub conversation_id: Uuid,
    /// `user`, `assistant` or `system`.
    pub role: String,
    pub content: String,
    pub run_id: Option<Uuid>,
    pub client_message_id: Option<String>,
    pub created_at: i64,
}

/// A message as listed: with the status of the run that produced it (assistant messages).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct MessageRow {
    #[sqlx(flatten)]
    pub message: MessageRecord,
    pub run_status: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RunRecord {
    pub id: Uuid,
    pub conversation_id: Uuid,
    pub owner_id: Uuid,
    /// The user message that started the run.
    pub message_id: Uuid,
    /// `running`, `completed`, `stopped`, `failed` or `interrupted`.
    pub status: String,
    pub model: String,
    pub output: String,
    pub error: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub last_seq: i64,
    pub started_at: i64,
    pub finished_at: Option<i64>,
}

/// How a run ended, written in one transaction with the assistant message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    pub status: String,
    pub output: String,
    pub error: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub last_seq: i64,
    pub finished_at: i64,
    /// The id of the assistant message holding the output.
    pub message_id: Uuid,
}

/// Where a page of conversations continues: after this `(updated_at, id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversationCursor {
    pub updated_at: i64,
    pub id: Uuid,
}
