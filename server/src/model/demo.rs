//! The model used when none is configured: it streams a reply that says plainly what it is and
//! how to configure a real one, at a readable pace.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use wadi_protocol::Usage;

use super::{ChatMessage, ChatModel, ModelError, ModelEvent, ModelStream};

pub const DEMO_MODEL_NAME: &str = "demo";

pub struct DemoModel {
    /// Pause between words.
    pace: Duration,
}

impl DemoModel {
    pub fn new(pace: Duration) -> Self {
        Self { pace }
    }
}

/// The demo's answer to `prompt`, split into the words it streams.
pub fn reply(prompt: &str) -> Vec<String> {
    let quoted: String = prompt.chars().take(80).collect();
    let ellipsis = if prompt.chars().count() > 80 {
        "…"
    } else {
        ""
    };
    let text = format!(
        "This is WADI's **demo model**: no AI model is configured, so I can only echo you. \
         You wrote: \"{quoted}{ellipsis}\"\n\n\
         To chat with a real model, restart the server with `OPENAI_API_KEY` set (OpenAI), or \
         `OPENAI_BASE_URL` pointing at any OpenAI-compatible server such as Ollama \
         (`http://localhost:11434/v1`), vLLM or llama.cpp, and `WADI_MODEL` naming the model."
    );
    text.split_inclusive(' ').map(str::to_owned).collect()
}

#[async_trait]
impl ChatModel for DemoModel {
    fn name(&self) -> &str {
        DEMO_MODEL_NAME
    }

    fn is_demo(&self) -> bool {
        true
    }

    async fn stream(
        &self,
        _model: &str,
        history: &[ChatMessage],
    ) -> Result<ModelStream, ModelError> {
        let prompt = history
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default();
        let words = reply(&prompt);
        let prompt_tokens = u32::try_from(prompt.split_whitespace().count()).unwrap_or(u32::MAX);
        let completion_tokens = u32::try_from(words.len()).unwrap_or(u32::MAX);
        let pace = self.pace;
        let deltas = futures_util::stream::iter(words).then(move |word| async move {
            tokio::time::sleep(pace).await;
            Ok(ModelEvent::Delta(word))
        });
        let usage = futures_util::stream::once(async move {
            Ok(ModelEvent::Usage(Usage {
                prompt_tokens,
                completion_tokens,
                total_tokens: prompt_tokens + completion_tokens,
                estimated: false,
            }))
        });
        Ok(Box::pin(deltas.chain(usage)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_demo_says_what_it_is_and_how_to_configure_a_model() {
        let model = DemoModel::new(Duration::from_millis(30));
        let history = vec![ChatMessage {
            role: wadi_protocol::api::Role::User,
            content: "hello".into(),
        }];
        let mut stream = model.stream(DEMO_MODEL_NAME, &history).await.unwrap();
        let mut text = String::new();
        let mut usage = None;
        while let Some(event) = stream.next().await {
            match event.unwrap() {
                ModelEvent::Delta(delta) => text.push_str(&delta),
                ModelEvent::Usage(u) => usage = Some(u),
                ModelEvent::Cut(_) => {}
            }
        }
        assert!(text.contains("demo model"));
        assert!(text.contains("OPENAI_API_KEY"));
        assert!(text.contains("\"hello\""));
        assert!(usage.is_some_and(|u| u.completion_tokens > 10));
    }
}
