//! Any OpenAI-compatible chat completions endpoint, over reqwest.
//!
//! A provider that answers 429 or 5xx, or cannot be connected to, is asked again with
//! exponential backoff ([`FIRST_BACKOFF`] doubling, at most [`RETRIES`] times, honouring
//! `Retry-After` up to [`MAX_BACKOFF`]) before the response starts, i.e. before the first token.
//! After that a failure ends the run. The body is decoded in the caller's task as it arrives
//! ([`super::sse`]). Dropping the stream drops the HTTP response, which closes the connection:
//! the provider stops generating.

use std::{
    collections::VecDeque,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use async_trait::async_trait;
use axum::body::Bytes;
use futures_util::Stream;
use reqwest::{
    Response, StatusCode,
    header::{ACCEPT, CONTENT_TYPE, HeaderMap, RETRY_AFTER},
};
use serde::{Deserialize, Serialize};

use super::{
    ChatMessage, ChatModel, ModelError, ModelEvent, ModelStream, ProviderSettings,
    sse::{Decoder, Fed},
};
use crate::config::{Secret, SecretUrl};

/// A provider's model list larger than this is refused (it goes to every client).
const MAX_LIST_BYTES: usize = 4 << 20;
/// Model names longer than this many characters are left out of the list.
const MAX_MODEL_NAME: usize = 200;
/// At most this many of the provider's models are offered (the first, sorted by name).
const MAX_LISTED_MODELS: usize = 1_000;

/// Times a request is sent again after a 429, a 5xx or a failed connection.
pub const RETRIES: u32 = 3;
/// The wait before the first retry; it doubles with each one.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between tries, whatever `Retry-After` asks.
pub const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// How much of an error answer is read, for the log.
const MAX_ERROR_BODY: usize = 16 * 1024;

pub struct OpenAiModel {
    http: reqwest::Client,
    base_url: String,
    api_key: Option<Secret>,
    model: String,
    temperature: Option<f32>,
    max_tokens: Option<u32>,
    list_timeout: Duration,
}

impl OpenAiModel {
    pub fn new(settings: &ProviderSettings) -> Result<Self, ModelError> {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("openai-organization", &settings.openai_organization),
            ("openai-project", &settings.openai_project),
        ] {
            if let Some(value) = value.as_deref().filter(|value| !value.is_empty()) {
                let value = value.parse().map_err(|_| ModelError::Refused {
                    detail: format!("{name} is not a valid header value"),
                })?;
                headers.insert(name, value);
            }
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(settings.model_connect_timeout)
            .user_agent(concat!("wadi/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ModelError::Unreachable {
                detail: error_chain(&e),
            })?;
        let base_url = settings
            .openai_base_url
            .as_ref()
            .map_or(super::OPENAI_BASE_URL, SecretUrl::expose);
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key: settings.openai_api_key.clone(),
            model: settings.model.clone(),
            temperature: settings.temperature,
            max_tokens: settings.max_output_tokens,
            list_timeout: settings.model_list_timeout,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self
            .http
            .request(method, format!("{}{path}", self.base_url));
        match &self.api_key {
            Some(key) => request.bearer_auth(key.expose()),
            None => request,
        }
    }

    /// Sends what `build` makes until it is answered with a success, or with something not worth
    /// asking again, or the retries are spent.
    async fn send(
        &self,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<Response, ModelError> {
        let mut retries = 0;
        loop {
            let refused = match build().send().await {
                Ok(response) if response.status().is_success() => return Ok(response),
                Ok(response) => Refusal::read(response).await,
                Err(error) => Refusal::of_send(&error),
            };
            if !refused.retry || retries == RETRIES {
                return Err(refused.error);
            }
            retries += 1;
            let delay = retry_delay(retries, refused.retry_after);
            tracing::warn!(
                detail = refused.error.detail(),
                retry = retries,
                "the model provider failed; asking again in {delay:?}"
            );
            tokio::time::sleep(delay).await;
        }
    }
}

#[derive(Serialize)]
struct CompletionRequest<'a> {
    model: &'a str,
    messages: Vec<RequestMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    stream: bool,
    stream_options: StreamOptions,
}

#[derive(Serialize)]
struct RequestMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

fn request_message(message: &ChatMessage) -> RequestMessage<'_> {
    RequestMessage {
        role: message.role.as_str(),
        content: &message.content,
    }
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ListedModel>,
}

#[derive(Deserialize)]
struct ListedModel {
    id: String,
}

#[async_trait]
impl ChatModel for OpenAiModel {
    fn name(&self) -> &str {
        &self.model
    }

    async fn list(&self) -> Result<Vec<String>, ModelError> {
        let response = self
            .send(|| {
                // A provider that never answers must not hold the model list (a timeout is not
                // retried).
                self.request(reqwest::Method::GET, "/models")
                    .timeout(self.list_timeout)
            })
            .await?;
        let mut response = response;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| ModelError::Broken {
            detail: error_chain(&e),
        })? {
            if body.len() + chunk.len() > MAX_LIST_BYTES {
                return Err(ModelError::Broken {
                    detail: format!("a model list over {MAX_LIST_BYTES} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        let listed: ModelList = serde_json::from_slice(&body).map_err(|e| ModelError::Broken {
            detail: format!("a model list that is not one: {e}"),
        })?;
        // Every client gets this list: names no one could pick from a menu are left out.
        let mut names: Vec<String> = listed
            .data
            .into_iter()
            .map(|model| model.id)
            .filter(|id| {
                !id.is_empty()
                    && id.chars().count() <= MAX_MODEL_NAME
                    && !id
                        .chars()
                        .any(|c| c.is_control() || crate::content::is_bidi_control(c))
            })
            .collect();
        names.sort();
        names.dedup();
        names.truncate(MAX_LISTED_MODELS);
        Ok(names)
    }

    async fn stream(
        &self,
        model: &str,
        history: &[ChatMessage],
    ) -> Result<ModelStream, ModelError> {
        let request = CompletionRequest {
            model,
            messages: history.iter().map(request_message).collect(),
            temperature: self.temperature,
            max_tokens: self.max_tokens,
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
        };
        let body = Bytes::from(
            serde_json::to_vec(&request).map_err(|e| ModelError::Broken {
                detail: e.to_string(),
            })?,
        );
        let response = self
            .send(|| {
                self.request(reqwest::Method::POST, "/chat/completions")
                    .header(CONTENT_TYPE, "application/json")
                    .header(ACCEPT, "text/event-stream")
                    .body(body.clone())
            })
            .await?;
        Ok(Box::pin(Answer {
            body: Box::pin(response.bytes_stream()),
            decoder: Decoder::default(),
            ready: VecDeque::new(),
            end: None,
        }))
    }
}

/// A streaming answer: the response body, decoded as it is polled.
struct Answer {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    decoder: Decoder,
    /// Decoded events not yet taken.
    ready: VecDeque<ModelEvent>,
    /// Set when nothing more is read: how the stream ends once `ready` is drained.
    end: Option<Option<ModelError>>,
}

impl Stream for Answer {
    type Item = Result<ModelEvent, ModelError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(event) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(event)));
            }
            if let Some(end) = &mut this.end {
                return Poll::Ready(end.take().map(Err));
            }
            this.end = match ready!(this.body.as_mut().poll_next(cx)) {
                Some(Ok(bytes)) => match this.decoder.feed(&bytes, &mut this.ready) {
                    Fed::Open => None,
                    Fed::Done => Some(None),
                    Fed::Failed(error) => Some(Some(error)),
                },
                Some(Err(error)) => Some(Some(ModelError::Broken {
                    detail: error_chain(&error),
                })),
                // The connection closed cleanly without `[DONE]`: some servers end that way,
                // but not inside an event.
                None => Some(this.decoder.finish()),
            };
        }
    }
}

/// An answer other than a success, or a request that was never answered.
struct Refusal {
    error: ModelError,
    /// Worth asking again.
    retry: bool,
    /// How long the provider asked to wait.
    retry_after: Option<Duration>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    message: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<serde_json::Value>,
}

impl Refusal {
    fn of_send(failure: &reqwest::Error) -> Self {
        let detail = error_chain(failure);
        let error = if failure.is_connect() || failure.is_timeout() {
            ModelError::Unreachable { detail }
        } else {
            ModelError::Broken { detail }
        };
        // A connection that failed is tried again; a request that timed out is not (it would
        // only wait as long again).
        Self {
            error,
            retry: failure.is_connect(),
            retry_after: None,
        }
    }

    async fn read(mut response: Response) -> Self {
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let mut body = Vec::new();
        while body.len() < MAX_ERROR_BODY {
            match response.chunk().await {
                Ok(Some(piece)) => body.extend_from_slice(&piece),
                Ok(None) | Err(_) => break,
            }
        }
        body.truncate(MAX_ERROR_BODY);
        Self::classify(status, retry_after, &body)
    }

    fn classify(status: StatusCode, retry_after: Option<Duration>, body: &[u8]) -> Self {
        let said = serde_json::from_slice::<ErrorBody>(body)
            .ok()
            .map(|b| b.error);
        let message = said
            .as_ref()
            .and_then(|error| error.message.clone())
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
        let detail = format!("HTTP {status}: {message}");
        // A spent quota is a 429 that no wait will cure.
        let out_of_quota = said.as_ref().is_some_and(|error| {
            error.kind.as_deref() == Some("insufficient_quota")
                || error.code.as_ref().and_then(|code| code.as_str()) == Some("insufficient_quota")
        });
        let (error, retry) = if status == StatusCode::TOO_MANY_REQUESTS && !out_of_quota
            || status.is_server_error()
        {
            (ModelError::Unavailable { detail }, true)
        } else if status.is_client_error() {
            (ModelError::Refused { detail }, false)
        } else {
            (ModelError::Broken { detail }, false)
        };
        Self {
            error,
            retry,
            retry_after,
        }
    }
}

/// The wait before retry number `retry` (from 1): what the provider asked, or the backoff,
/// never more than [`MAX_BACKOFF`].
fn retry_delay(retry: u32, asked: Option<Duration>) -> Duration {
    let backoff = FIRST_BACKOFF.saturating_mul(1_u32 << retry.clamp(1, 16).saturating_sub(1));
    asked.unwrap_or(backoff).min(MAX_BACKOFF)
}

/// `Retry-After` in seconds (the form providers use; an HTTP date is ignored).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// An error and its causes, for the log: reqwest's own text alone rarely says what happened.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use wadi_protocol::api::Role;

    use super::*;

    fn classify(status: u16, body: &str) -> Refusal {
        Refusal::classify(StatusCode::from_u16(status).unwrap(), None, body.as_bytes())
    }

    #[test]
    fn refusals_are_classified_by_status_and_quota() {
        let rate = classify(
            429,
            r#"{"error":{"message":"slow down","type":"requests"}}"#,
        );
        assert!(rate.retry);
        assert_eq!(
            rate.error,
            ModelError::Unavailable {
                detail: "HTTP 429 Too Many Requests: slow down".into()
            }
        );
        for quota in [
            r#"{"error":{"message":"no money","type":"insufficient_quota"}}"#,
            r#"{"error":{"message":"no money","code":"insufficient_quota"}}"#,
        ] {
            let spent = classify(429, quota);
            assert!(!spent.retry, "{quota}");
            assert!(matches!(spent.error, ModelError::Refused { .. }), "{quota}");
        }
        let down = classify(503, "<html>gateway</html>");
        assert!(down.retry);
        assert_eq!(
            down.error.detail(),
            "HTTP 503 Service Unavailable: <html>gateway</html>"
        );
        let key = classify(401, r#"{"error":{"message":"bad key","code":null}}"#);
        assert!(!key.retry);
        assert!(matches!(key.error, ModelError::Refused { .. }));
        let odd = classify(304, "");
        assert!(!odd.retry);
        assert!(matches!(odd.error, ModelError::Broken { .. }));
    }

    #[test]
    fn retries_back_off_or_wait_as_asked_within_the_cap() {
        let ms = Duration::from_millis;
        let backoff: Vec<_> = (1..=RETRIES)
            .map(|retry| retry_delay(retry, None))
            .collect();
        assert_eq!(backoff, [ms(100), ms(200), ms(400)]);
        assert_eq!(retry_delay(7, None), ms(6400));
        assert_eq!(retry_delay(8, None), MAX_BACKOFF);
        assert_eq!(retry_delay(99, None), MAX_BACKOFF);
        assert_eq!(
            retry_delay(1, Some(ms(2000))),
            ms(2000),
            "Retry-After honoured"
        );
        assert_eq!(retry_delay(3, Some(ms(0))), ms(0));
        assert_eq!(
            retry_delay(1, Some(Duration::from_secs(3600))),
            MAX_BACKOFF,
            "but not an hour"
        );
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, " 2 ".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn the_request_is_what_openai_expects() {
        let history = [
            ChatMessage {
                role: Role::System,
                content: "be brief".into(),
            },
            ChatMessage {
                role: Role::User,
                content: "hi \"there\"".into(),
            },
        ];
        let request = CompletionRequest {
            model: "m",
            messages: history.iter().map(request_message).collect(),
            temperature: None,
            max_tokens: None,
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
        };
        assert_eq!(
            serde_json::to_value(&request).unwrap(),
            serde_json::json!({
                "model": "m",
                "messages": [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": "hi \"there\""}],
                "stream": true,
                "stream_options": {"include_usage": true},
            })
        );
        let limited = CompletionRequest {
            max_tokens: Some(500),
            temperature: Some(0.5),
            ..request
        };
        let limited = serde_json::to_value(&limited).unwrap();
        assert_eq!(limited["max_tokens"], 500);
        assert_eq!(limited["temperature"], 0.5);
    }
}
