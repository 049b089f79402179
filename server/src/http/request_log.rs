//! One log line per HTTP request and WebSocket upgrade (method, route template, status,
//! duration, the user when known, the request id), and a request id for each: taken from a
//! well-formed `X-Request-Id` (a proxy's) or made here, returned in the `X-Request-Id` header
//! and in error bodies, and carried (as the `request` span) into what the request starts: the
//! socket it upgrades to, the run it sends.

use std::{
    sync::{Arc, OnceLock},
    time::Instant,
};

use axum::{
    extract::{MatchedPath, Request},
    http::HeaderValue,
    middleware::Next,
    response::Response,
};
use tracing::Instrument;

use crate::ids::UserId;

tokio::task_local! {
    static CONTEXT: Arc<RequestContext>;
}

struct RequestContext {
    id: String,
    user: OnceLock<UserId>,
}

/// The id of the request being handled, if any.
pub fn request_id() -> Option<String> {
    CONTEXT.try_with(|context| context.id.clone()).ok()
}

/// Records who the request is from (the auth extractor calls this), for the log line.
pub fn set_user(user: UserId) {
    let _ = CONTEXT.try_with(|context| context.user.set(user));
}

/// The longest `X-Request-Id` taken from a client or proxy.
const MAX_ID_LEN: usize = 64;

fn usable(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

pub async fn layer(request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .filter(|id| usable(id))
        .map_or_else(|| uuid::Uuid::now_v7().simple().to_string(), str::to_owned);
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "(web app)".to_owned(), |path| path.as_str().to_owned());
    let context = Arc::new(RequestContext {
        id: id.clone(),
        user: OnceLock::new(),
    });
    // A W3C `traceparent` from the client or a proxy continues its trace (OTLP export).
    let traceparent = request
        .headers()
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .filter(|text| crate::telemetry::parse_traceparent(text).is_some())
        .map(str::to_owned);
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %method,
        route = %route,
        status = tracing::field::Empty,
        traceparent = traceparent.as_deref(),
        "otel.name" = %format!("{method} {route}"),
        "otel.kind" = "server",
    );
    let started = Instant::now();
    let mut response = CONTEXT
        .scope(context.clone(), next.run(request).instrument(span.clone()))
        .await;
    let status = response.status().as_u16();
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    let user_id = context.user.get().map(ToString::to_string);
    span.record("status", status);
    let _entered = span.enter();
    // Probes come every few seconds: kept out of the default log.
    if matches!(route.as_str(), "/healthz" | "/readyz" | "/metrics") {
        tracing::debug!(%method, route, status, duration_ms, "request");
    } else {
        tracing::info!(%method, route, status, duration_ms, user_id, "request");
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_short_ids_are_taken_from_outside() {
        assert!(usable("3f2c-11aa_9.b"));
        assert!(!usable(""));
        assert!(!usable("has space"));
        assert!(!usable("line\\nbreak"));
        assert!(!usable(&"x".repeat(65)));
    }
}
