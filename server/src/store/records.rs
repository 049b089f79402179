//! Rows as stored. Timestamps are Unix milliseconds; handlers map rows to protocol DTOs.

use uuid::Uuid;
use wadi_protocol::{RunStatus, api::Role};

use crate::ids::{ConversationId, InstanceId, MessageId, RunId, UserId};

#[derive(Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UserRecord {
    pub id: UserId,
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
    pub user_id: UserId,
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
    /// Once rotated: the successor token, sealed with a key derived from this token (see
    /// `auth::embedded::service`).
    pub next_token: Option<String>,
}

#[derive(Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SigningKeyRecord {
    pub kid: String,
    /// PKCS#8 PEM of the P-256 private key.
    pub private_key_pem: String,
    pub created_at: i64,
    /// When `wadi admin rotate-signing-key` retired it: it signs nothing more and verifies
    /// until the tokens it signed have expired.
    pub retired_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ConversationRecord {
    pub id: ConversationId,
    pub owner_id: UserId,
    /// `None` until set, or until the first message names the conversation.
    pub title: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    /// The model its runs use (`None`: the server's default).
    pub model: Option<String>,
    /// Sent before its messages (`None`: the server's `--system-prompt`).
    pub system_prompt: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct MessageRecord {
    pub id: MessageId,
    pub conversation_id: ConversationId,
    #[sqlx(try_from = "String")]
    pub role: Role,
    pub content: String,
    pub run_id: Option<RunId>,
    pub client_message_id: Option<String>,
    pub created_at: i64,
    /// The message this one follows (`None` for a conversation's first).
    pub parent_id: Option<MessageId>,
}

impl std::fmt::Debug for UserRecord {
    // By hand: the password hash never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRecord")
            .field("id", &self.id)
            .field("email", &self.email)
            .field("password_hash", &"<redacted>")
            .field("user_metadata", &self.user_metadata)
            .field("created_at", &self.created_at)
            .field("updated_at", &self.updated_at)
            .field("last_sign_in_at", &self.last_sign_in_at)
            .finish()
    }
}

impl std::fmt::Debug for SigningKeyRecord {
    // By hand: the private key never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeyRecord")
            .field("kid", &self.kid)
            .field("private_key_pem", &"<redacted>")
            .field("created_at", &self.created_at)
            .field("retired_at", &self.retired_at)
            .finish()
    }
}

/// An account as `wadi admin users` lists it (no password hash).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserSummary {
    pub id: UserId,
    pub email: String,
    pub created_at: i64,
    pub last_sign_in_at: Option<i64>,
    pub sessions: i64,
    pub conversations: i64,
}

/// A message found by a search: where it is, and its text around the matches, the matched words
/// between [`HIT_START`] and [`HIT_END`].
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct MessageHitRow {
    pub conversation_id: ConversationId,
    pub title: Option<String>,
    pub message_id: MessageId,
    #[sqlx(try_from = "String")]
    pub role: Role,
    pub created_at: i64,
    pub snippet: String,
}

/// A conversation whose title matched a search (marked like [`MessageHitRow::snippet`]).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TitleHitRow {
    pub conversation_id: ConversationId,
    pub snippet: String,
    pub updated_at: i64,
}

/// Where a search's match starts and ends in a snippet (private-use characters no text has).
pub const HIT_START: char = '\u{E000}';
pub const HIT_END: char = '\u{E001}';

/// A message as listed: with the status of the run that produced it (assistant messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRow {
    pub message: MessageRecord,
    pub run_status: Option<RunStatus>,
    /// Assistant messages: the model that wrote it, and the tokens it took.
    pub model: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    /// The tokens were counted by the server, not reported by the provider.
    pub usage_estimated: bool,
    /// Every version at this place in the tree (this message and its siblings, oldest first),
    /// when there is more than one.
    pub siblings: Vec<MessageId>,
}

impl<'r, R: sqlx::Row> sqlx::FromRow<'r, R> for MessageRow
where
    MessageRecord: sqlx::FromRow<'r, R>,
    &'r str: sqlx::ColumnIndex<R>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<bool>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn from_row(row: &'r R) -> Result<Self, sqlx::Error> {
        let message = MessageRecord::from_row(row)?;
        let run_status: Option<String> = row.try_get("run_status")?;
        let run_status = run_status
            .map(RunStatus::try_from)
            .transpose()
            .map_err(|error| sqlx::Error::ColumnDecode {
                index: "run_status".into(),
                source: Box::new(error),
            })?;
        Ok(Self {
            message,
            run_status,
            model: row.try_get("run_model")?,
            prompt_tokens: row.try_get("prompt_tokens")?,
            completion_tokens: row.try_get("completion_tokens")?,
            usage_estimated: row
                .try_get::<Option<bool>, _>("usage_estimated")?
                .unwrap_or(false),
            siblings: Vec::new(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RunRecord {
    pub id: RunId,
    pub conversation_id: ConversationId,
    pub owner_id: UserId,
    /// The user message that started the run.
    pub message_id: MessageId,
    #[sqlx(try_from = "String")]
    pub status: RunStatus,
    pub model: String,
    /// While `running`: the output saved at the last checkpoint. Then: the whole answer.
    pub output: String,
    /// Where each chunk ends in `output` (see [`ChunkEnds`]).
    pub chunk_ends: String,
    pub error: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    /// The tokens were counted by the server, not reported by the provider.
    pub usage_estimated: bool,
    pub last_seq: i64,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    /// The instance driving the run (`None` on rows from before instances were recorded).
    pub owner_instance: Option<InstanceId>,
    /// When someone asked to stop it (the owner may be another instance).
    pub stop_requested_at: Option<i64>,
}

impl RunRecord {
    /// A run starting now on `owner_instance`: `running`, with nothing streamed yet.
    pub fn running(
        id: RunId,
        conversation_id: ConversationId,
        owner_id: UserId,
        message_id: MessageId,
        model: String,
        started_at: i64,
        owner_instance: InstanceId,
    ) -> Self {
        Self {
            id,
            conversation_id,
            owner_id,
            message_id,
            status: RunStatus::Running,
            model,
            output: String::new(),
            chunk_ends: String::new(),
            error: None,
            prompt_tokens: None,
            completion_tokens: None,
            usage_estimated: false,
            last_seq: 0,
            started_at,
            finished_at: None,
            owner_instance: Some(owner_instance),
            stop_requested_at: None,
        }
    }
}

/// How a run ended, written in one transaction with the assistant message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    pub status: RunStatus,
    pub output: String,
    /// Where each chunk ends in `output` (see [`ChunkEnds`]).
    pub chunk_ends: String,
    pub error: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    /// The tokens were counted by the server, not reported by the provider.
    pub usage_estimated: bool,
    pub last_seq: i64,
    pub finished_at: i64,
    /// The id of the assistant message holding the output.
    pub message_id: MessageId,
}

/// New output of a running run since its last checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The seq the stored output reaches now (this is appended after it).
    pub from_seq: i64,
    /// The text of chunks `from_seq + 1 ..= to_seq`.
    pub delta: String,
    /// Their ends, as appended to `chunk_ends`.
    pub ends: String,
    pub to_seq: i64,
}

/// What a checkpoint found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointResult {
    Saved,
    /// The stored run reaches another seq (an earlier write whose answer was lost did land):
    /// continue from there.
    Behind {
        stored_seq: i64,
    },
    /// The run is no longer `running` with this owner: it was reaped or its conversation
    /// deleted. The owner must stop writing it.
    Fenced,
}

/// A running run as its owner's heartbeat sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct OwnedRun {
    pub id: RunId,
    pub stop_requested: bool,
}

/// A registered server process.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct InstanceRecord {
    pub id: InstanceId,
    pub host: String,
    pub pid: i64,
    pub started_at: i64,
    pub heartbeat_at: i64,
}

/// Where a page of conversations continues: after this `(updated_at, id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversationCursor {
    pub updated_at: i64,
    pub id: ConversationId,
}

/// The chunk boundaries of a run's output, stored as comma-terminated byte offsets (`"5,12,"`):
/// chunk `seq` is `output[ends[seq - 2]..ends[seq - 1]]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkEnds(pub Vec<usize>);

impl ChunkEnds {
    /// Parses the stored form; `None` if it is not one (a row from before chunk ends were kept).
    pub fn parse(text: &str) -> Option<Self> {
        text.split_terminator(',')
            .map(|end| end.parse().ok())
            .collect::<Option<Vec<usize>>>()
            .map(Self)
    }

    /// The stored form of `ends`.
    pub fn encode(ends: &[usize]) -> String {
        let mut text = String::with_capacity(ends.len() * 6);
        for end in ends {
            text.push_str(&end.to_string());
            text.push(',');
        }
        text
    }

    /// The chunks of `output` with `seq > after`, as `(seq, text)`; `None` if these ends do not
    /// fit `output`.
    pub fn chunks_after<'a>(&self, output: &'a str, after: u64) -> Option<Vec<(u64, &'a str)>> {
        let mut chunks = Vec::new();
        let mut start = 0;
        for (index, &end) in self.0.iter().enumerate() {
            let seq = index as u64 + 1;
            let text = output.get(start..end)?;
            if seq > after {
                chunks.push((seq, text));
            }
            start = end;
        }
        (start == output.len()).then_some(chunks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_in_records_never_reach_debug_output() {
        let user = UserRecord {
            id: UserId::new(),
            email: "a@example.com".into(),
            password_hash: "$argon2id$v=19$secret-hash".into(),
            user_metadata: "{}".into(),
            created_at: 1,
            updated_at: 1,
            last_sign_in_at: None,
        };
        let key = SigningKeyRecord {
            kid: "k".into(),
            private_key_pem: "-----BEGIN PRIVATE KEY-----secret".into(),
            created_at: 1,
            retired_at: None,
        };
        let text = format!("{user:?} {key:?}");
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("a@example.com"));
    }

    #[test]
    fn chunk_ends_slice_the_output_into_its_chunks() {
        let ends = ChunkEnds::parse("3,5,9,").unwrap();
        assert_eq!(ChunkEnds::encode(&ends.0), "3,5,9,");
        assert_eq!(
            ends.chunks_after("Hello, wo", 1),
            Some(vec![(2, "lo"), (3, ", wo")])
        );
        assert_eq!(ends.chunks_after("short!", 0), None, "ends past the text");
        assert_eq!(
            ends.chunks_after("longer than that", 0),
            None,
            "text past the ends"
        );
        assert_eq!(ChunkEnds::parse("3,x,"), None);
        assert_eq!(ChunkEnds::parse("").map(|ends| ends.0), Some(vec![]));
    }
}
