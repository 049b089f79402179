//! Machine-readable error codes, shared by WebSocket `error` frames and REST `{code, message}`
//! bodies.

use serde::{Deserialize, Serialize};

/// Every error code a client can receive. New codes may be added; clients should treat an unknown
/// code like `internal_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    // Frames the server could not read.
    /// The frame is not valid JSON.
    InvalidJson,
    /// The JSON is valid but not an object with a string `type`.
    InvalidFrame,
    /// The `type` is not one this protocol version knows.
    UnknownType,
    /// A required field is missing or a field has the wrong type.
    InvalidMessage,
    /// Binary frames are not part of the protocol.
    BinaryNotSupported,
    /// A text frame was not valid UTF-8.
    InvalidUtf8,
    /// The frame or the message content is larger than the server accepts.
    TooLarge,
    /// The message content is empty or only whitespace.
    EmptyContent,

    // Authentication and access.
    /// A frame other than `auth` arrived before authentication.
    NotAuthenticated,
    /// The token is missing, malformed, or its signature or claims do not verify.
    InvalidToken,
    /// The token's `exp` has passed without a refresh.
    TokenExpired,
    /// The refreshed token belongs to a different user than the connection.
    UserMismatch,
    /// The conversation or run does not exist or is not the caller's (the two are
    /// indistinguishable on purpose).
    NotFound,
    /// The client did not authenticate before the deadline.
    AuthTimeout,

    // Runs.
    /// The conversation already has a run streaming; stop it or wait for `complete`.
    RunInProgress,
    /// `stop` arrived but nothing is running.
    NoActiveRun,
    /// The model provider failed; the partial output is kept.
    ModelError,
    /// The frame is valid but not allowed on this kind of socket or in this state.
    InvalidRequest,

    // Limits.
    /// Too many frames or requests; slow down.
    RateLimited,
    /// The server or this user has too many open connections.
    TooManyConnections,
    /// The client did not read its frames fast enough and is being disconnected.
    SlowConsumer,
    /// The server is too busy to start another answer now; the running ones go on. Retry after
    /// `retryAfterMs`.
    Overloaded,

    // Everything else.
    /// The server cannot reach its database right now; nothing was written. Retry shortly.
    Unavailable,
    /// The server is shutting down; reconnect shortly.
    ShuttingDown,
    /// An unexpected server failure; details are in the server log, never on the wire.
    InternalError,
}

impl ErrorCode {
    /// Every code, for documentation checks and exhaustive tests.
    pub const ALL: [ErrorCode; 25] = [
        Self::InvalidJson,
        Self::InvalidFrame,
        Self::UnknownType,
        Self::InvalidMessage,
        Self::BinaryNotSupported,
        Self::InvalidUtf8,
        Self::TooLarge,
        Self::EmptyContent,
        Self::NotAuthenticated,
        Self::InvalidToken,
        Self::TokenExpired,
        Self::UserMismatch,
        Self::NotFound,
        Self::AuthTimeout,
        Self::RunInProgress,
        Self::NoActiveRun,
        Self::ModelError,
        Self::InvalidRequest,
        Self::RateLimited,
        Self::TooManyConnections,
        Self::SlowConsumer,
        Self::Overloaded,
        Self::Unavailable,
        Self::ShuttingDown,
        Self::InternalError,
    ];

    /// The snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidFrame => "invalid_frame",
            Self::UnknownType => "unknown_type",
            Self::InvalidMessage => "invalid_message",
            Self::BinaryNotSupported => "binary_not_supported",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::TooLarge => "too_large",
            Self::EmptyContent => "empty_content",
            Self::NotAuthenticated => "not_authenticated",
            Self::InvalidToken => "invalid_token",
            Self::TokenExpired => "token_expired",
            Self::UserMismatch => "user_mismatch",
            Self::NotFound => "not_found",
            Self::AuthTimeout => "auth_timeout",
            Self::RunInProgress => "run_in_progress",
            Self::NoActiveRun => "no_active_run",
            Self::ModelError => "model_error",
            Self::InvalidRequest => "invalid_request",
            Self::RateLimited => "rate_limited",
            Self::TooManyConnections => "too_many_connections",
            Self::SlowConsumer => "slow_consumer",
            Self::Overloaded => "overloaded",
            Self::Unavailable => "unavailable",
            Self::ShuttingDown => "shutting_down",
            Self::InternalError => "internal_error",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a client frame could not be decoded. Each variant is a distinct failure so the server can
/// tell the client exactly what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame is not valid JSON: {0}")]
    Malformed(String),
    #[error("frame must be a JSON object")]
    NotAnObject,
    #[error("frame has no \"type\" field")]
    MissingType,
    #[error("frame's \"type\" must be a string")]
    InvalidType,
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    #[error("{kind:?} frame is missing the field {field:?}")]
    MissingField { kind: String, field: String },
    #[error("{kind:?} frame has an invalid field: {detail}")]
    InvalidField { kind: String, detail: String },
}

impl DecodeError {
    /// The error code the server reports for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Malformed(_) => ErrorCode::InvalidJson,
            Self::NotAnObject | Self::MissingType | Self::InvalidType => ErrorCode::InvalidFrame,
            Self::UnknownType(_) => ErrorCode::UnknownType,
            Self::MissingField { .. } | Self::InvalidField { .. } => ErrorCode::InvalidMessage,
        }
    }
}
