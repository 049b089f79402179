//! WebSocket close codes the server uses. `docs/protocol.md` says when each is sent and what a
//! client should do about it.

/// The run socket's run finished and everything was sent, or the client closed normally.
pub const NORMAL: u16 = 1000;
/// The server is shutting down. Reconnect after a short delay; runs are saved.
pub const GOING_AWAY: u16 = 1001;
/// A text frame was not valid UTF-8 (RFC 6455 requires closing).
pub const INVALID_PAYLOAD: u16 = 1007;
/// Authentication failed, timed out, or the conversation or run is not the caller's. As in the
/// original system. Do not retry with the same token.
pub const POLICY_VIOLATION: u16 = 1008;
/// A frame was larger than the server's frame limit.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// An unexpected server failure.
pub const INTERNAL_ERROR: u16 = 1011;
/// Too many connections, or the client read too slowly. Reconnect with backoff and resume.
pub const TRY_AGAIN_LATER: u16 = 1013;
/// The access token expired without an in-band refresh. Refresh the session, reconnect, resume.
pub const TOKEN_EXPIRED: u16 = 4001;
/// The client stopped answering pings.
pub const HEARTBEAT_TIMEOUT: u16 = 4002;
/// The chat socket's conversation was deleted (on any device, through any instance). Do not
/// reconnect.
pub const CONVERSATION_DELETED: u16 = 4004;

/// Every code above with its name, for documentation checks.
pub const ALL: [(u16, &str); 10] = [
    (NORMAL, "NORMAL"),
    (GOING_AWAY, "GOING_AWAY"),
    (INVALID_PAYLOAD, "INVALID_PAYLOAD"),
    (POLICY_VIOLATION, "POLICY_VIOLATION"),
    (MESSAGE_TOO_BIG, "MESSAGE_TOO_BIG"),
    (INTERNAL_ERROR, "INTERNAL_ERROR"),
    (TRY_AGAIN_LATER, "TRY_AGAIN_LATER"),
    (TOKEN_EXPIRED, "TOKEN_EXPIRED"),
    (HEARTBEAT_TIMEOUT, "HEARTBEAT_TIMEOUT"),
    (CONVERSATION_DELETED, "CONVERSATION_DELETED"),
];
