//! The UI, one component per part of the screen.

pub mod chat;
pub mod message;
pub mod search;
pub mod sidebar;
pub mod sign_in;
