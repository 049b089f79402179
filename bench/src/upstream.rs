//! A fake OpenAI-compatible provider for benchmarks: `POST /v1/chat/completions` streams SSE
//! chunks at a set rate, each token stamped with the time it is written (see [`crate::stamp`]).
//!
//! The last user message may override the defaults with `bench tokens=N rate=R` (tokens per
//! second), so the generator sets each run's shape without restarting the upstream.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::State,
    http::header,
    response::Response,
    routing::post,
    serve::ListenerExt,
};
use serde_json::Value;

use crate::stamp;

/// The shape of one streamed answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub tokens: u32,
    /// Tokens per second.
    pub rate: f64,
}

impl Shape {
    /// The message a generator sends to ask for this shape.
    pub fn prompt(self) -> String {
        format!("bench tokens={} rate={}", self.tokens, self.rate)
    }

    /// `bench tokens=N rate=R` with either part optional; anything else keeps `self`.
    fn overridden_by(self, prompt: &str) -> Self {
        let mut shape = self;
        let Some(rest) = prompt.trim().strip_prefix("bench") else {
            return shape;
        };
        for word in rest.split_whitespace() {
            match word.split_once('=') {
                Some(("tokens", n)) => shape.tokens = n.parse().unwrap_or(shape.tokens),
                Some(("rate", r)) => {
                    shape.rate = r
                        .parse()
                        .ok()
                        .filter(|r: &f64| *r > 0.0)
                        .unwrap_or(shape.rate);
                }
                _ => {}
            }
        }
        shape
    }
}

/// Serves the fake upstream on `addr` until the process ends, printing its base URL first.
pub async fn serve(addr: SocketAddr, defaults: Shape) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let bound = listener.local_addr()?;
    // The parent process reads this line to learn the port.
    println!("upstream listening on http://{bound}/v1");
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .with_state(defaults);
    // Small SSE writes must leave at once: Nagle plus delayed ACKs would add up to 40 ms.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}

fn last_user_message(body: &Value) -> &str {
    body["messages"]
        .as_array()
        .and_then(|messages| messages.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
}

async fn completions(State(defaults): State<Shape>, Json(body): Json<Value>) -> Response {
    let shape = defaults.overridden_by(last_user_message(&body));
    let interval = Duration::from_secs_f64(1.0 / shape.rate);
    let start = tokio::time::Instant::now();
    // Token `i` is due at `start + (i + 1) * interval` (the first after one interval, like a
    // model's time to first token); a late token is sent at once and stamped when it is.
    let stream = futures_util::stream::unfold(0u32, move |sent| async move {
        if sent > shape.tokens {
            return None;
        }
        if sent == shape.tokens {
            return Some((Ok::<_, Infallible>(end(shape.tokens)), sent + 1));
        }
        tokio::time::sleep_until(start + interval * (sent + 1)).await;
        Some((Ok(delta(&stamp::token(stamp::now_micros()))), sent + 1))
    });
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    response
}

/// One `chat.completion.chunk` event. Written by hand: the token is plain ASCII without quotes,
/// and this runs tens of thousands of times a second next to the server being measured.
fn delta(text: &str) -> Bytes {
    Bytes::from(format!(
        "data: {{\"id\":\"bench\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"bench\",\
         \"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}},\"finish_reason\":null}}]}}\n\n"
    ))
}

/// The closing events: a finish reason, usage, and `[DONE]`.
fn end(tokens: u32) -> Bytes {
    Bytes::from(format!(
        "data: {{\"id\":\"bench\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"bench\",\
         \"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\n\
         data: {{\"id\":\"bench\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"bench\",\
         \"choices\":[],\"usage\":{{\"prompt_tokens\":4,\"completion_tokens\":{tokens},\"total_tokens\":{}}}}}\n\n\
         data: [DONE]\n\n",
        tokens + 4
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: Shape = Shape {
        tokens: 10,
        rate: 5.0,
    };

    #[test]
    fn a_bench_prompt_sets_the_shape() {
        let asked = Shape {
            tokens: 600,
            rate: 20.0,
        };
        assert_eq!(DEFAULTS.overridden_by(&asked.prompt()), asked);
        assert_eq!(DEFAULTS.overridden_by("hello"), DEFAULTS);
        assert_eq!(
            DEFAULTS.overridden_by("bench rate=0 tokens=x"),
            DEFAULTS,
            "bad values keep the defaults"
        );
    }

    #[test]
    fn events_are_valid_json_lines() {
        let event = delta(&stamp::token(5));
        let text = std::str::from_utf8(&event).unwrap();
        let json: Value =
            serde_json::from_str(text.strip_prefix("data: ").unwrap().trim()).unwrap();
        assert_eq!(json["choices"][0]["delta"]["content"], "[t=5] ");
        let end = end(3);
        let text = std::str::from_utf8(&end).unwrap();
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 3);
        for event in &events[..2] {
            let _: Value = serde_json::from_str(event.strip_prefix("data: ").unwrap()).unwrap();
        }
        assert_eq!(events[2], "data: [DONE]");
    }
}
