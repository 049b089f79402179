//! Any OpenAI-compatible chat completions endpoint, through async-openai.
//!
//! async-openai retries 429 and 5xx answers with exponential backoff (100 ms doubling, at most
//! 3 retries, honouring `Retry-After`) before the response starts, i.e. before the first token.
//! After that a failure ends the run. Dropping the stream drops the HTTP response, which closes
//! the connection: the provider stops generating.

use async_openai::{
    Client,
    config::OpenAIConfig,
    types::chat::{
        ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
        ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
        ChatCompletionStreamOptions, CreateChatCompletionRequest,
        CreateChatCompletionStreamResponse,
    },
};
use async_trait::async_trait;
use futures_util::StreamExt;
use wadi_protocol::{Usage, api::Role};

use super::{ChatMessage, ChatModel, ModelError, ModelEvent, ModelStream, ProviderSettings};
use crate::config::SecretUrl;

pub struct OpenAiModel {
    client: Client<OpenAIConfig>,
    model: String,
    temperature: Option<f32>,
}

impl OpenAiModel {
    pub fn new(settings: &ProviderSettings) -> Result<Self, ModelError> {
        let http = reqwest::Client::builder()
            .connect_timeout(settings.model_connect_timeout)
            .user_agent(concat!("wadi/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ModelError::Unreachable {
                detail: e.to_string(),
            })?;
        let base_url = settings
            .openai_base_url
            .as_ref()
            .map_or(super::OPENAI_BASE_URL, SecretUrl::expose);
        let mut config = OpenAIConfig::new().with_api_base(base_url.trim_end_matches('/'));
        if let Some(key) = &settings.openai_api_key {
            config = config.with_api_key(key.expose());
        }
        Ok(Self {
            client: Client::with_config(config).with_http_client(http),
            model: settings.model.clone(),
            temperature: settings.temperature,
        })
    }
}

fn request_message(message: &ChatMessage) -> ChatCompletionRequestMessage {
    let content = message.content.clone();
    match message.role {
        Role::System => {
            ChatCompletionRequestMessage::System(ChatCompletionRequestSystemMessage::from(content))
        }
        Role::User => {
            ChatCompletionRequestMessage::User(ChatCompletionRequestUserMessage::from(content))
        }
        Role::Assistant => ChatCompletionRequestMessage::Assistant(
            ChatCompletionRequestAssistantMessage::from(content),
        ),
    }
}

#[async_trait]
impl ChatModel for OpenAiModel {
    fn name(&self) -> &str {
        &self.model
    }

    async fn list(&self) -> Result<Vec<String>, ModelError> {
        let listed = self
            .client
            .models()
            .list()
            .await
            .map_err(|e| classify(&e))?;
        let mut names: Vec<String> = listed.data.into_iter().map(|model| model.id).collect();
        names.sort();
        Ok(names)
    }

    async fn stream(
        &self,
        model: &str,
        history: &[ChatMessage],
    ) -> Result<ModelStream, ModelError> {
        let request = CreateChatCompletionRequest {
            model: model.to_owned(),
            messages: history.iter().map(request_message).collect(),
            temperature: self.temperature,
            stream: Some(true),
            stream_options: Some(ChatCompletionStreamOptions {
                include_usage: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        };
        let stream = self
            .client
            .chat()
            .create_stream(request)
            .await
            .map_err(|e| classify(&e))?;
        let events = stream.flat_map(|item| {
            let events: Vec<Result<ModelEvent, ModelError>> = match item {
                Err(error) => vec![Err(classify(&error))],
                Ok(chunk) => events_of(chunk).into_iter().map(Ok).collect(),
            };
            futures_util::stream::iter(events)
        });
        Ok(Box::pin(events))
    }
}

/// What one streamed chunk says: the first choice's text, and the usage when it is reported.
pub fn events_of(chunk: CreateChatCompletionStreamResponse) -> Vec<ModelEvent> {
    let mut events: Vec<_> = chunk
        .choices
        .into_iter()
        .filter(|choice| choice.index == 0)
        .filter_map(|choice| choice.delta.content)
        .filter(|content| !content.is_empty())
        .map(ModelEvent::Delta)
        .collect();
    if let Some(usage) = chunk.usage {
        events.push(ModelEvent::Usage(Usage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.total_tokens,
            estimated: false,
        }));
    }
    events
}

/// The public kind of an async-openai error, keeping its text as the detail.
fn classify(error: &async_openai::error::OpenAIError) -> ModelError {
    use async_openai::error::OpenAIError;
    let detail = error.to_string();
    match error {
        OpenAIError::Reqwest(inner) if inner.is_connect() || inner.is_timeout() => {
            ModelError::Unreachable { detail }
        }
        OpenAIError::Reqwest(inner) => match inner.status() {
            Some(status) if status.as_u16() == 429 || status.is_server_error() => {
                ModelError::Unavailable { detail }
            }
            Some(status) if status.is_client_error() => ModelError::Refused { detail },
            _ => ModelError::Broken { detail },
        },
        OpenAIError::ApiError(response) => {
            let status = response.status_code;
            if status.as_u16() == 429 || status.is_server_error() {
                ModelError::Unavailable { detail }
            } else {
                ModelError::Refused { detail }
            }
        }
        _ => ModelError::Broken { detail },
    }
}
