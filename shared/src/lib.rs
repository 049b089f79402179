//! WADI protocol v1, compiled into both the server and the browser app.
//!
//! Every WebSocket frame is a variant of [`ClientMessage`] or [`ServerMessage`]; every error a
//! client can see is an [`ErrorCode`]; every close code is a named constant in [`close`]. The REST
//! bodies live in [`api`]. This crate holds types only: it must stay buildable for
//! `wasm32-unknown-unknown` without tokio, axum, sqlx or reqwest.
//!
//! The wire format is JSON text frames with a `type` discriminator and camelCase fields. The
//! original system's frames (`{"type":"auth","token":"t"}`, `{"type":"chunk","content":"…"}`) are a
//! subset of ours: we only ever add fields.

pub mod api;
pub mod close;
mod error;
mod ws;

pub use error::{DecodeError, ErrorCode};
pub use ws::{
    ActiveRun, ClientMessage, ConversationChange, RunStatus, ServerMessage, UnknownStatus, Usage,
};

/// The protocol version announced in `connected.protocolVersion`.
pub const PROTOCOL_VERSION: u32 = 1;
