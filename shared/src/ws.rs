//! WebSocket frames of protocol v1. `docs/protocol.md` is the prose reference for these types.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{DecodeError, ErrorCode};

/// A frame the browser (or any client) sends to the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum ClientMessage {
    /// First frame after `connected`. Sent again on the open socket with a refreshed token for the
    /// same user to extend the connection's lifetime without reconnecting.
    Auth { token: String },
    /// A user message on a chat socket; starts a run. A `clientMessageId` makes a resend after a
    /// reconnect idempotent: the server answers with the run it already started.
    ///
    /// Where it goes in the conversation's tree: after `parentId`, as a new version of `editOf`
    /// (same parent), or, with neither, after the conversation's newest message.
    Message {
        content: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_message_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent_id: Option<Uuid>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        edit_of: Option<Uuid>,
    },
    /// Chat socket: a new answer to the user message `messageId`, kept beside the earlier ones
    /// (they stay stored and browsable). Starts a run like `message` does.
    Regenerate { message_id: Uuid },
    /// Stops the conversation's active run (chat socket) or this socket's run (run socket).
    Stop {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run_id: Option<Uuid>,
    },
    /// Chat socket only: replay the run's chunks after `afterSeq`, then follow it live. Sent after
    /// a reconnect when `authenticated.activeRun` names a run the client was watching.
    Resume {
        run_id: Uuid,
        #[serde(default)]
        after_seq: u64,
    },
    /// Application-level liveness check; answered by `pong`.
    Ping,
}

impl ClientMessage {
    /// Every `type` a client may send, in the order of the enum.
    pub const TYPES: [&'static str; 6] =
        ["auth", "message", "regenerate", "stop", "resume", "ping"];

    /// Decodes one text frame. Each way a frame can be wrong maps to its own [`DecodeError`], so
    /// the server can answer with a precise `error` frame instead of closing the socket.
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        let object = value.as_object().ok_or(DecodeError::NotAnObject)?;
        let kind = match object.get("type") {
            None => return Err(DecodeError::MissingType),
            Some(serde_json::Value::String(kind)) => kind.clone(),
            Some(_) => return Err(DecodeError::InvalidType),
        };
        if !Self::TYPES.contains(&kind.as_str()) {
            return Err(DecodeError::UnknownType(kind));
        }
        serde_json::from_value(value).map_err(|e| {
            let detail = e.to_string();
            match missing_field_name(&detail) {
                Some(field) => DecodeError::MissingField { kind, field },
                None => DecodeError::InvalidField { kind, detail },
            }
        })
    }

    /// The JSON text of this frame.
    pub fn encode(&self) -> String {
        encode(self)
    }
}

/// serde reports a missing field as "missing field `name`"; anything else is a type error.
fn missing_field_name(detail: &str) -> Option<String> {
    let rest = detail.strip_prefix("missing field `")?;
    let end = rest.find('`')?;
    Some(rest[..end].to_owned())
}

/// A frame the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum ServerMessage {
    /// First frame on every socket. The client must answer with `auth` before the auth deadline.
    Connected {
        client_id: Uuid,
        protocol_version: u32,
    },
    /// The token was accepted (first `auth`, or an in-band refresh). `expiresAt` is the token's
    /// `exp` in Unix seconds: the server closes the socket then unless a fresher token arrives.
    Authenticated {
        user_id: Uuid,
        expires_at: i64,
        /// Chat socket: the conversation's run that is still streaming, if any, so a client that
        /// reconnects can `resume` it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        active_run: Option<ActiveRun>,
    },
    /// A run began; sent to every socket watching the conversation.
    Start {
        run_id: Uuid,
        conversation_id: Uuid,
        /// The user message that started the run.
        message_id: Uuid,
        /// That message's `clientMessageId`, if it was sent with one: lets the sender match the
        /// run to its message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_message_id: Option<String>,
    },
    /// A delta of the answer. `seq` is 1-based and contiguous per run; the same seq carries the
    /// same text for every watcher.
    Chunk {
        run_id: Uuid,
        seq: u64,
        content: String,
    },
    /// The run ended. `fullOutput` is exactly the concatenation of every chunk's `content`.
    Complete {
        run_id: Uuid,
        full_output: String,
        status: RunStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<Usage>,
    },
    /// Something went wrong; `code` is machine-readable, `message` is for people.
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run_id: Option<Uuid>,
        /// With `overloaded` (and other refusals worth retrying): when to try again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// Answer to `ping`.
    Pong,
    /// User socket (`/ws/user`): one of the user's conversations changed, in any tab, on any
    /// device, through any instance. The sidebar updates itself from these.
    Conversation {
        conversation_id: Uuid,
        change: ConversationChange,
        /// Its title now (absent for `deleted`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        title: Option<String>,
    },
    /// Chat and user sockets: events may have been lost (the server's instance could not hear
    /// the others for a while). Reload what is shown, as after a reconnect, at a uniformly
    /// random moment within `within_ms`: every socket on the instance is told at once, and the
    /// server sizes the window so that their reloads do not all land together.
    Resync {
        #[serde(default)]
        within_ms: u64,
    },
}

/// What happened to a conversation (the `conversation` frame's `change`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversationChange {
    Created,
    /// Its title, model or system prompt changed.
    Updated,
    Deleted,
    /// A user message was sent in it (an answer is being written).
    Message,
    /// An answer was finished (completed, stopped, failed or interrupted).
    Answered,
}

impl ServerMessage {
    /// Shorthand for an `error` frame.
    pub fn error(code: ErrorCode, message: impl Into<String>, run_id: Option<Uuid>) -> Self {
        Self::Error {
            code,
            message: message.into(),
            run_id,
            retry_after_ms: None,
        }
    }

    /// The JSON text of this frame.
    pub fn encode(&self) -> String {
        encode(self)
    }

    /// The JSON text of a `chunk` frame, the same as [`ServerMessage::encode`] gives for
    /// `ServerMessage::Chunk { run_id, seq, content }`, written directly: this runs for every
    /// chunk of every run, and building the frame and serializing it field by field (every key
    /// escaped) took half of the instructions of encoding it (`docs/performance.md`).
    pub fn encode_chunk(run_id: Uuid, seq: u64, content: &str) -> String {
        use std::io::Write;
        let mut out = Vec::with_capacity(content.len() + 96);
        out.extend_from_slice(br#"{"type":"chunk","runId":""#);
        out.extend_from_slice(
            run_id
                .hyphenated()
                .encode_lower(&mut Uuid::encode_buffer())
                .as_bytes(),
        );
        out.extend_from_slice(br#"","seq":"#);
        let written = write!(out, "{seq}").is_ok()
            && out.write_all(br#","content":"#).is_ok()
            && serde_json::to_writer(&mut out, content).is_ok();
        out.push(b'}');
        match String::from_utf8(out) {
            Ok(text) if written => text,
            // Neither can happen (writing to a Vec does not fail; every piece is UTF-8), but the
            // frame built the slow way is right whatever happened.
            _ => Self::Chunk {
                run_id,
                seq,
                content: content.to_owned(),
            }
            .encode(),
        }
    }

    /// Parses a frame received from the server.
    pub fn decode(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

fn encode<T: Serialize>(frame: &T) -> String {
    // Serializing these types cannot fail: every field is a string, number, bool, UUID or enum,
    // and no map has non-string keys. An empty object is a safe fallback all the same.
    serde_json::to_string(frame).unwrap_or_else(|_| String::from("{}"))
}

/// The run a chat socket can resume after reconnecting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActiveRun {
    pub run_id: Uuid,
    pub message_id: Uuid,
    /// The highest seq the run had produced when the socket authenticated.
    pub last_seq: u64,
}

/// The lifecycle of a run. `running` is the only non-final state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Completed,
    Stopped,
    Failed,
    /// The server stopped (crash or restart) while the run was streaming; the output flushed
    /// before that is kept.
    Interrupted,
}

impl RunStatus {
    /// The lowercase name used on the wire and in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
        }
    }

    /// Parses the stored name back.
    pub fn parse(name: &str) -> Option<Self> {
        [
            Self::Running,
            Self::Completed,
            Self::Stopped,
            Self::Failed,
            Self::Interrupted,
        ]
        .into_iter()
        .find(|status| status.as_str() == name)
    }

    /// True once the run can no longer change.
    pub fn is_final(self) -> bool {
        self != Self::Running
    }
}

/// A stored name that is not a run status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a run status")]
pub struct UnknownStatus(pub String);

impl TryFrom<String> for RunStatus {
    type Error = UnknownStatus;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        Self::parse(&name).ok_or(UnknownStatus(name))
    }
}

/// Token usage of one run: as the model reported it, or, for an answer that ended before the
/// model's report (stopped, failed, interrupted), counted by the server with the model's
/// tokenizer and marked `estimated`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    /// Counted by the server, not reported by the provider. Absent when false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub estimated: bool,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's `skip_serializing_if` passes a reference
fn is_false(value: &bool) -> bool {
    !*value
}

impl From<DecodeError> for ServerMessage {
    fn from(error: DecodeError) -> Self {
        Self::error(error.code(), error.to_string(), None)
    }
}

impl ErrorCode {
    /// An `error` frame with this code.
    pub fn frame(self, message: impl Into<String>) -> ServerMessage {
        ServerMessage::error(self, message, None)
    }
}
