//! The chat store's logic, free of the browser so it can be unit-tested natively: applying frames
//! by `seq`, deciding what to resume after a reconnect, the reconnect backoff schedule and the
//! token refresh timing. `crate::socket` drives it with a real WebSocket.

pub mod backoff;
pub mod chat;
pub mod timing;

pub use backoff::Backoff;
pub use chat::{ChatState, Command, MessageView, PendingState};
