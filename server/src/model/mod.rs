//! The model behind runs: a [`ChatModel`] streams an answer as deltas. The OpenAI-compatible
//! implementation talks to OpenAI, Ollama, vLLM, llama.cpp or anything speaking the same API; the
//! demo model answers when none is configured.

pub mod catalog;
pub mod demo;
pub mod openai;
pub mod sse;
pub mod tokens;

use std::{pin::Pin, time::Duration};

use crate::config::{Secret, SecretUrl};

use async_trait::async_trait;
use futures_util::Stream;
use wadi_protocol::{Usage, api::Role};

/// OpenAI's API, the provider when only a key is configured.
pub const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";

/// The model provider. Part of [`crate::Config`].
#[derive(Clone, Debug, clap::Args)]
pub struct ProviderSettings {
    /// API key of an OpenAI-compatible provider. With neither this nor a base URL, the demo
    /// model answers.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<Secret>,

    /// Base URL of an OpenAI-compatible API (e.g. `http://localhost:11434/v1` for Ollama).
    #[arg(long, env = "OPENAI_BASE_URL")]
    pub openai_base_url: Option<SecretUrl>,

    /// The OpenAI organization requests are made for (the `OpenAI-Organization` header).
    #[arg(long, env = "OPENAI_ORG_ID")]
    pub openai_organization: Option<String>,

    /// The OpenAI project requests are made for (the `OpenAI-Project` header).
    #[arg(long, env = "OPENAI_PROJECT_ID")]
    pub openai_project: Option<String>,

    /// The model to ask.
    #[arg(long, env = "WADI_MODEL", default_value = "gpt-4o-mini")]
    pub model: String,

    /// The models users may pick per conversation, comma-separated (`--model`, the default, is
    /// always allowed); `*` for whatever the provider's `/v1/models` lists (cached 10 minutes).
    #[arg(long, env = "WADI_MODELS", value_delimiter = ',')]
    pub models: Vec<String>,

    /// Sampling temperature (0–2); the provider's default when unset.
    #[arg(long, env = "WADI_TEMPERATURE", value_parser = crate::config::parse_temperature)]
    pub temperature: Option<f32>,

    /// The most tokens an answer may take, sent to the provider as `max_tokens` (an answer it
    /// cuts there ends `failed`, with what came before); the provider's own limit when unset.
    /// OpenAI's reasoning models refuse `max_tokens`: leave it unset for them.
    #[arg(long, env = "WADI_MAX_OUTPUT_TOKENS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_output_tokens: Option<u32>,

    /// Time allowed to connect to the model provider.
    #[arg(long, env = "WADI_MODEL_CONNECT_TIMEOUT", value_parser = crate::config::parse_duration, default_value = "10s")]
    pub model_connect_timeout: Duration,

    /// Time allowed for the provider to list its models (`--models '*'`); past it, only the
    /// default model is offered until the next try, 30 s later.
    #[arg(long, env = "WADI_MODEL_LIST_TIMEOUT", value_parser = crate::config::parse_duration, default_value = "10s")]
    pub model_list_timeout: Duration,

    /// Pause between the demo model's words.
    #[arg(long, env = "WADI_DEMO_PACE", value_parser = crate::config::parse_duration, default_value = "40ms")]
    pub demo_pace: Duration,
}

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
    /// The provider ended the answer before it was complete (its `finish_reason`); the stream
    /// may still carry the usage after it.
    Cut(Cut),
}

/// Why a provider ended an answer before it was complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// `length`: the answer reached the token limit (`--max-output-tokens`, or the model's).
    Length,
    /// `content_filter`: the provider's content filter stopped it.
    ContentFilter,
}

/// Why a model failed: a kind users may see (the `Display` text, sent in `error` frames and
/// saved with the run), and a detail for operators (logged, never sent: it can name the
/// provider's URL, its request ids, or echo the prompt).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The provider could not be reached (connection refused, DNS, TLS, connect timeout).
    #[error("the model provider could not be reached")]
    Unreachable { detail: String },
    /// The provider refused the request (bad key, unknown model, context too long, quota).
    #[error("the model provider refused the request")]
    Refused { detail: String },
    /// The provider is overloaded or failing (429 or 5xx after the retries).
    #[error("the model provider is unavailable; try again in a moment")]
    Unavailable { detail: String },
    /// The stream broke or carried something that is not an answer.
    #[error("the model provider's answer was cut off")]
    Broken { detail: String },
    /// Nothing arrived for longer than the idle timeout.
    #[error("the model provider stopped responding")]
    Timeout,
    /// The answer grew past `--max-answer-bytes`; what came before is kept.
    #[error("the answer was longer than this server keeps ({limit} bytes)")]
    TooLong { limit: usize },
    /// The provider cut the answer at its token limit; what came before is kept.
    #[error("the answer reached its length limit")]
    LengthLimit,
    /// The provider's content filter stopped the answer; what came before is kept.
    #[error("the model provider's content filter stopped the answer")]
    Filtered,
}

impl ModelError {
    /// What operators see: the underlying error, for the log.
    pub fn detail(&self) -> &str {
        match self {
            Self::Unreachable { detail }
            | Self::Refused { detail }
            | Self::Unavailable { detail }
            | Self::Broken { detail } => detail,
            Self::Timeout => "no data within the idle timeout",
            Self::TooLong { .. } => "the answer passed --max-answer-bytes",
            Self::LengthLimit => "the provider's finish_reason was length",
            Self::Filtered => "the provider's finish_reason was content_filter",
        }
    }
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
    /// Streams `model`'s answer to `history` (the demo ignores the name).
    async fn stream(&self, model: &str, history: &[ChatMessage])
    -> Result<ModelStream, ModelError>;

    /// The models the provider serves (`GET /v1/models`); just the default one when it cannot
    /// say.
    async fn list(&self) -> Result<Vec<String>, ModelError> {
        Ok(vec![self.name().to_owned()])
    }
}

impl ProviderSettings {
    /// The provider's base URL, credentials redacted (for logs).
    pub fn base_url(&self) -> String {
        self.openai_base_url
            .as_ref()
            .map_or_else(|| OPENAI_BASE_URL.to_owned(), ToString::to_string)
    }
}
