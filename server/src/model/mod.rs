//! The model behind runs: a [`ChatModel`] streams an answer as deltas. The OpenAI-compatible
//! implementation talks to OpenAI, Ollama, vLLM, llama.cpp or anything speaking the same API; the
//! demo model answers when none is configured.

pub mod demo;
pub mod openai;

use std::pin::Pin;

use async_trait::async_trait;
use futures_util::Stream;
use wadi_protocol::{Usage, api::Role};

/// One message of the history sent to the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

/// What a model stream yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelEvent {
    /// A piece of the answer.
    Delta(String),
    /// Token usage, reported once near the end.
    Usage(Usage),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    /// The provider answered with an error or broke the stream.
    #[error("model provider error: {0}")]
    Provider(String),
    /// Nothing arrived for longer than the idle timeout.
    #[error("the model provider stopped responding")]
    Timeout,
}

pub type ModelStream = Pin<Box<dyn Stream<Item = Result<ModelEvent, ModelError>> + Send>>;

#[async_trait]
pub trait ChatModel: Send + Sync + 'static {
    /// The model's name, stored with every run.
    fn name(&self) -> &str;

    /// True for the built-in demo model.
    fn is_demo(&self) -> bool {
        false
    }

    /// Starts an answer to `history` (oldest first, the new user message last). Dropping the
    /// returned future or stream cancels the request upstream: nothing more is produced or billed.
    async fn stream(&self, history: Vec<ChatMessage>) -> Result<ModelStream, ModelError>;
}
