//! A fake OpenAI-compatible provider: a real HTTP server streaming SSE chat completion chunks,
//! at a pace the test controls, recording every request and whether it was cancelled.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use super::TIMEOUT;

/// While waiting for the next step the fake writes SSE comments this often, so that a client
/// that went away is noticed (hyper only sees a closed connection when a write fails).
const KEEPALIVE: Duration = Duration::from_millis(20);

/// What the fake does with the next requests.
#[derive(Clone)]
pub enum Script {
    /// Stream these deltas, one every `pace`, then usage and `[DONE]`.
    Tokens { tokens: Vec<String>, pace: Duration },
    /// Wait for the test to drive each step through the request's [`Upstream`] handle.
    Manual,
    /// Answer with this HTTP status and an OpenAI-style error body.
    Status(u16),
    /// Answer with this HTTP status and an error body of this `type` (`insufficient_quota`).
    Error { status: u16, kind: &'static str },
}

/// A step the test makes a manual stream take.
pub enum Step {
    Token(String),
    /// Usage and `[DONE]`: a normal end.
    Finish,
    /// Break the connection mid-stream.
    Fail,
    /// Send these bytes as they are (garbage, half an event).
    Raw(String),
    /// End the body cleanly where it is, without usage or `[DONE]`.
    End,
}

/// One request the fake received.
pub struct Request {
    pub body: Value,
    /// The request's headers (authorization, organization, project).
    pub headers: axum::http::HeaderMap,
    steps: Option<mpsc::UnboundedSender<Step>>,
    cancelled: Arc<AtomicBool>,
    cancel_seen: Arc<Notify>,
}

impl Request {
    pub fn send(&self, step: Step) {
        if let Some(steps) = &self.steps {
            let _ = steps.send(step);
        }
    }

    pub fn token(&self, text: &str) {
        self.send(Step::Token(text.to_owned()));
    }

    /// True once the client dropped the stream before its end.
    pub fn was_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Waits until the client drops the stream (fails the test after the timeout).
    pub async fn cancelled(&self) {
        let wait = async {
            loop {
                let notified = self.cancel_seen.notified();
                if self.was_cancelled() {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(TIMEOUT, wait)
            .await
            .expect("the upstream request was never cancelled");
    }

    /// The messages the server sent, as (role, content).
    pub fn messages(&self) -> Vec<(String, String)> {
        self.body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["role"].as_str().unwrap().to_owned(),
                    m["content"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }
}

struct Shared {
    script: Mutex<Script>,
    arrived: mpsc::UnboundedSender<Arc<Request>>,
    statuses_served: Mutex<Vec<u16>>,
    /// What `GET /v1/models` lists, and how often it was asked.
    models: Mutex<Vec<String>>,
    model_lists: std::sync::atomic::AtomicUsize,
    /// `GET /v1/models` never answers.
    models_hang: AtomicBool,
}

async fn models(State(shared): State<Arc<Shared>>) -> Json<Value> {
    shared.model_lists.fetch_add(1, Ordering::SeqCst);
    if shared.models_hang.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    let data: Vec<Value> = shared
        .models
        .lock()
        .unwrap()
        .iter()
        .map(
            |id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "test"}),
        )
        .collect();
    Json(serde_json::json!({"object": "list", "data": data}))
}

pub struct FakeUpstream {
    /// `http://127.0.0.1:port/v1`: what `OPENAI_BASE_URL` is set to.
    pub base_url: String,
    shared: Arc<Shared>,
    arrivals: tokio::sync::Mutex<mpsc::UnboundedReceiver<Arc<Request>>>,
}

impl FakeUpstream {
    pub async fn start(script: Script) -> Self {
        let (arrived, arrivals) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            script: Mutex::new(script),
            arrived,
            statuses_served: Mutex::new(Vec::new()),
            models: Mutex::new(vec!["fake-model".to_owned()]),
            model_lists: std::sync::atomic::AtomicUsize::new(0),
            models_hang: AtomicBool::new(false),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(completions))
            .route("/v1/models", axum::routing::get(models))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            base_url,
            shared,
            arrivals: tokio::sync::Mutex::new(arrivals),
        }
    }

    pub fn set_script(&self, script: Script) {
        *self.shared.script.lock().unwrap() = script;
    }

    /// The next request the fake receives (waits for it under the test timeout).
    pub async fn next_request(&self) -> Arc<Request> {
        let mut arrivals = self.arrivals.lock().await;
        tokio::time::timeout(TIMEOUT, arrivals.recv())
            .await
            .expect("no request reached the upstream")
            .unwrap()
    }

    /// Sets what `GET /v1/models` lists.
    pub fn set_models(&self, models: &[&str]) {
        *self.shared.models.lock().unwrap() = models.iter().map(|m| (*m).to_owned()).collect();
    }

    /// Makes `GET /v1/models` never answer.
    pub fn hang_model_lists(&self) {
        self.shared.models_hang.store(true, Ordering::SeqCst);
    }

    /// How many times `GET /v1/models` was asked.
    pub fn model_lists(&self) -> usize {
        self.shared.model_lists.load(Ordering::SeqCst)
    }

    /// HTTP statuses answered to requests in `Script::Status` mode.
    pub fn statuses_served(&self) -> Vec<u16> {
        self.shared.statuses_served.lock().unwrap().clone()
    }

    /// Configures a server to use this fake.
    pub fn configure(&self, config: &mut wadi_server::Config) {
        config.provider.openai_base_url = Some(self.base_url.clone().into());
        config.provider.openai_api_key = Some("sk-test".into());
        config.provider.model = "fake-model".into();
    }
}

fn sse(data: &Value) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

fn delta(text: &str) -> Value {
    json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": "fake-model",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}],
    })
}

fn usage(completion_tokens: u32) -> Value {
    json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": "fake-model",
        "choices": [],
        "usage": {"prompt_tokens": 7, "completion_tokens": completion_tokens,
                  "total_tokens": 7 + completion_tokens},
    })
}

/// Marks the request cancelled if the stream is dropped before it ended normally.
struct CancelGuard {
    finished: bool,
    cancelled: Arc<AtomicBool>,
    seen: Arc<Notify>,
}

impl CancelGuard {
    /// The stream ended as the script said: not a cancellation.
    fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.cancelled.store(true, Ordering::SeqCst);
            self.seen.notify_waiters();
        }
    }
}

async fn completions(
    State(shared): State<Arc<Shared>>,
    headers: axum::http::HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let script = shared.script.lock().unwrap().clone();
    let cancelled = Arc::new(AtomicBool::new(false));
    let cancel_seen = Arc::new(Notify::new());
    let refusal = match script {
        Script::Status(status) => Some((status, "server_error")),
        Script::Error { status, kind } => Some((status, kind)),
        Script::Tokens { .. } | Script::Manual => None,
    };
    if let Some((status, kind)) = refusal {
        shared.statuses_served.lock().unwrap().push(status);
        let _ = shared.arrived.send(Arc::new(Request {
            body,
            headers: headers.clone(),
            steps: None,
            cancelled,
            cancel_seen,
        }));
        let status = StatusCode::from_u16(status).unwrap();
        let error = json!({"error": {"message": "fake upstream error", "type": kind,
                                     "param": null, "code": null}});
        return (status, Json(error)).into_response();
    }
    let (steps_tx, steps) = mpsc::unbounded_channel::<Step>();
    if let Script::Tokens { tokens, pace } = &script {
        let tokens = tokens.clone();
        let pace = *pace;
        let tx = steps_tx.clone();
        tokio::spawn(async move {
            for token in tokens {
                // `sleep(0)` still waits for the next timer tick (1 ms): skip it entirely.
                if !pace.is_zero() {
                    tokio::time::sleep(pace).await;
                }
                if tx.send(Step::Token(token)).is_err() {
                    return;
                }
            }
            let _ = tx.send(Step::Finish);
        });
    }
    let _ = shared.arrived.send(Arc::new(Request {
        body,
        headers,
        steps: Some(steps_tx),
        cancelled: cancelled.clone(),
        cancel_seen: cancel_seen.clone(),
    }));
    let guard = CancelGuard {
        finished: false,
        cancelled,
        seen: cancel_seen,
    };
    let stream = futures_util::stream::unfold(
        (guard, steps, 0u32, false),
        |(mut guard, mut steps, sent, done)| async move {
            if done {
                return None;
            }
            // `recv` is cancel-safe: a keepalive tick never loses a step.
            let step = tokio::select! {
                step = steps.recv() => Some(step),
                () = tokio::time::sleep(KEEPALIVE) => None,
            };
            let (item, sent, done) = match step {
                None => (Ok(Bytes::from_static(b": keepalive\n\n")), sent, false),
                Some(Some(Step::Token(text))) => (Ok(sse(&delta(&text))), sent + 1, false),
                Some(Some(Step::Raw(bytes))) => (Ok(Bytes::from(bytes)), sent, false),
                Some(Some(Step::Finish) | None) => {
                    guard.finished = true;
                    let mut bytes = sse(&usage(sent)).to_vec();
                    bytes.extend_from_slice(b"data: [DONE]\n\n");
                    (Ok(Bytes::from(bytes)), sent, true)
                }
                Some(Some(Step::End)) => {
                    guard.finish();
                    return None;
                }
                Some(Some(Step::Fail)) => {
                    guard.finished = true;
                    (Err(std::io::Error::other("upstream broke")), sent, true)
                }
            };
            Some((item, (guard, steps, sent, done)))
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}
