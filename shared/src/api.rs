//! REST bodies (`/api/...`), shared by the server's handlers and the browser's `api` module.
//! `docs/api.md` documents every route that uses them.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{ErrorCode, RunStatus, Usage};

/// The body of every REST error: a machine-readable code, a sentence for people, and the
/// request's id (also in the `X-Request-Id` header) to quote to whoever runs the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// One page of a cursor-paginated list. Pass `nextCursor` back as `?cursor=` for the next page;
/// it is absent on the last page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Page<T> {
    pub items: Vec<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Conversation {
    pub id: Uuid,
    pub title: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// The model its answers come from; absent: the server's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Sent to the model before the conversation; absent: the server's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
}

/// `POST /api/conversations`. Without a title, the conversation is titled after its first
/// message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateConversation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// One of `GET /api/models`; absent: the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
}

/// `PATCH /api/conversations/{id}`: what changes (at least one). An empty `model` or
/// `systemPrompt` goes back to the server's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateConversation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
}

/// `GET /api/models`: the models a conversation may use, the default first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelList {
    pub models: Vec<String>,
    pub default: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Assistant,
    System,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::System => "system",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [Self::User, Self::Assistant, Self::System]
            .into_iter()
            .find(|role| role.as_str() == name)
    }
}

/// A stored name that is not a role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a message role")]
pub struct UnknownRole(pub String);

impl TryFrom<String> for Role {
    type Error = UnknownRole;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        Self::parse(&name).ok_or(UnknownRole(name))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    pub id: Uuid,
    pub conversation_id: Uuid,
    pub role: Role,
    pub content: String,
    /// The run that produced this answer (assistant) or that this message started (user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<Uuid>,
    /// For assistant messages: how the run that produced it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_status: Option<RunStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_message_id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The message this one follows; absent for a conversation's first message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<Uuid>,
    /// When this place in the conversation has several versions (regenerated answers, edited
    /// messages): all of them, this one included, oldest first. Absent when there is one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub siblings: Vec<Uuid>,
    /// Assistant messages: the model that wrote the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Assistant messages: the tokens the answer took, when the model reported them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// `POST /api/conversations/{id}/messages`. Where the message goes in the conversation's tree:
/// after `parentId`, as a new version of `editOf` (a sibling: same parent), or, with neither,
/// after the conversation's newest message (the only choice before branches existed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SendMessage {
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edit_of: Option<Uuid>,
}

/// `GET /api/conversations/{id}/path`: one page of the path through the conversation's tree
/// that the app shows, oldest message first. `olderCursor` (absent at the first message)
/// fetches the page before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathPage {
    pub items: Vec<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub older_cursor: Option<String>,
}

/// The answer to a send: the committed user message and the run it started, if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SentMessage {
    pub message: Message,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<Run>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    pub id: Uuid,
    pub conversation_id: Uuid,
    /// The user message that started the run.
    pub message_id: Uuid,
    pub status: RunStatus,
    pub model: String,
    /// The answer so far (final once `status` is not `running`).
    pub output: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// The highest chunk seq produced so far.
    pub last_seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
}

/// `GET /api/conversations/{id}/export?format=json`: the whole conversation, every branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConversationExport {
    pub conversation: Conversation,
    /// Every message, oldest first; `parentId` links them into the tree.
    pub messages: Vec<Message>,
    #[serde(with = "time::serde::rfc3339")]
    pub exported_at: OffsetDateTime,
}

/// `GET /api/search?q=`: the caller's conversations whose title matches (first page only) and
/// messages whose text matches, best first. `nextCursor` fetches more messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SearchResults {
    pub conversations: Vec<ConversationHit>,
    pub messages: Vec<MessageHit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConversationHit {
    pub conversation_id: Uuid,
    /// The title, its matching words marked.
    pub title: Vec<Highlight>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageHit {
    pub conversation_id: Uuid,
    pub conversation_title: String,
    /// Open the conversation through this message (`/path?through=`) to show it.
    pub message_id: Uuid,
    pub role: Role,
    /// The text around the matches, the matching words marked.
    pub snippet: Vec<Highlight>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// A piece of a title or snippet: a match (`hit`) or the text between matches. Plain text,
/// never HTML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Highlight {
    pub text: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hit: bool,
}

/// `GET /api/config`: what the browser needs to know before the user signs in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientConfig {
    /// Base URL of the Supabase-compatible auth service (`…/auth/v1`). Relative (`/auth/v1`) for
    /// the embedded service.
    pub auth_url: String,
    /// `embedded` or `supabase`.
    pub auth_mode: String,
    /// The `apikey` header value for a real Supabase project; empty for embedded auth.
    pub anon_key: String,
    /// The model answering, and whether it is the built-in demo.
    pub model: String,
    pub demo_model: bool,
    /// Largest message content accepted, in bytes.
    pub max_content_bytes: usize,
    /// Largest WebSocket frame accepted, in bytes: a message whose frame would be larger (its
    /// content heavily escaped) goes over REST. 0 when the server did not say.
    #[serde(default)]
    pub max_frame_bytes: usize,
    pub protocol_version: u32,
}

/// `GET /api/me`: who the access token says the caller is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Me {
    pub id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    pub role: String,
    /// The token's `exp`, Unix seconds.
    pub expires_at: i64,
}
