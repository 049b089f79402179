//! The HTTP surface: one router per resource, merged here, with the web app as the fallback.

pub mod conversations;
pub mod extract;
pub mod request_log;
pub mod runs;
pub mod search;
pub mod security;
pub mod static_files;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use axum::{
    Json, Router,
    extract::{ConnectInfo, FromRequestParts, State},
    http::{StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
    routing::get,
};
use wadi_protocol::api::{ClientConfig, Me};

use crate::{auth::AuthUser, error::AppError, net::ProxyTrust, state::AppState};

pub fn router(state: AppState) -> Router {
    // Room for the largest content even if every character is JSON-escaped, plus the envelope.
    let body_limit = state.config.runs.max_content_bytes.saturating_mul(6) + 16 * 1024;
    let api = Router::new()
        .route("/api/me", get(me))
        .route("/api/config", get(client_config))
        .route(security::REPORT_PATH, axum::routing::post(security::report))
        .merge(conversations::router())
        .merge(search::router())
        .merge(runs::router())
        // Unknown API paths answer JSON 404s, not the web app's index page.
        .route("/api", axum::routing::any(api_not_found))
        .route("/api/", axum::routing::any(api_not_found))
        .route("/api/{*rest}", axum::routing::any(api_not_found))
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            body_limit,
            extract::reject_declared_oversized,
        ));
    // On a listener of its own when `--metrics-addr` is set; never served from the web app.
    let metrics_here = if state.config.metrics_addr.is_none() {
        get(metrics)
    } else {
        get(api_not_found)
    };
    let mut router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", metrics_here)
        .merge(api)
        .merge(crate::ws::router())
        .route("/auth/{*rest}", axum::routing::any(api_not_found))
        .route("/ws/{*rest}", axum::routing::any(api_not_found));
    if let Some(embedded) = state.auth.embedded.clone() {
        router = router.nest("/auth/v1", crate::auth::embedded::router(embedded));
    }
    let trust = Arc::new(state.config.proxies.trust());
    // The app's files are compressed (once per request; browsers cache the hashed ones for a
    // year). Brotli and gzip at a moderate level: their highest levels take seconds on the wasm.
    let compression = tower_http::compression::CompressionLayer::new()
        .quality(tower_http::CompressionLevel::Precise(5));
    let web_app = axum::routing::any(static_files::serve)
        .layer(compression)
        .with_state(state.clone());
    let security = Arc::new(security::SecurityHeaders::new(&state.config));
    router
        .fallback_service(web_app)
        .layer(axum::middleware::map_response(method_not_allowed_as_json))
        .layer(axum::middleware::from_fn_with_state(
            security,
            security::layer,
        ))
        .layer(axum::middleware::from_fn(request_log::layer))
        .layer(axum::Extension(trust))
        .with_state(state)
}

/// What the listener serves: the app once it has started, and until then `/healthz`, a
/// `/readyz` that says it is starting, and `503 unavailable` for the rest.
pub fn front(app: Arc<std::sync::OnceLock<Router>>) -> Router {
    use tower::ServiceExt;
    let dispatch = tower::service_fn(move |request: axum::extract::Request| {
        let app = app.clone();
        async move {
            match app.get() {
                Some(router) => router.clone().oneshot(request).await,
                None => Ok(starting(request.uri().path())),
            }
        }
    });
    Router::new().fallback_service(dispatch)
}

/// The answer while the server cannot reach its database yet.
fn starting(path: &str) -> Response {
    match path {
        "/healthz" => "ok".into_response(),
        "/readyz" => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "starting", "store": "down"})),
        )
            .into_response(),
        _ => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            Json(wadi_protocol::api::ApiError {
                code: wadi_protocol::ErrorCode::Unavailable,
                message: "the server is starting and cannot reach its database yet; try again \
                          shortly"
                    .into(),
                request_id: None,
            }),
        )
            .into_response(),
    }
}

/// Liveness: the process is up and serving HTTP.
async fn healthz() -> &'static str {
    "ok"
}

/// How long readiness waits for the store.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Readiness, as JSON: this instance's id and cluster mode, and whether the store and (in
/// cluster mode) Redis answer. 503 while either is down or the server is shutting down, so a
/// load balancer sends its traffic elsewhere.
async fn readyz(State(state): State<AppState>) -> Response {
    let store = match tokio::time::timeout(READY_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => "up",
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness: the store does not answer");
            "down"
        }
        Err(_) => {
            tracing::warn!("readiness: the store did not answer in time");
            "down"
        }
    };
    let bus = match state.runs.cluster.health().await {
        crate::runs::BusHealth::Off => "off",
        crate::runs::BusHealth::Up => "up",
        crate::runs::BusHealth::Down => "down",
    };
    let shutting_down = state.shutdown.is_cancelled();
    let ready = store == "up" && bus != "down" && !shutting_down;
    let body = serde_json::json!({
        "status": if ready { "ready" } else if shutting_down { "shutting_down" } else { "unavailable" },
        "instance": state.runs.instance,
        "cluster": state.runs.cluster.mode(),
        "store": store,
        "redis": bus,
    });
    let status = if ready {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Prometheus metrics in the text exposition format; behind `--metrics-token` when set.
async fn metrics(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<Response, AppError> {
    if let Some(expected) = &state.config.metrics_token {
        let given = crate::auth::embedded::bearer_token(&headers).unwrap_or_default();
        if !constant_time_eq(given.as_bytes(), expected.expose().as_bytes()) {
            return Err(AppError::Unauthorized {
                code: wadi_protocol::ErrorCode::InvalidToken,
                message: "metrics need the Authorization: Bearer token the server was given".into(),
            });
        }
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response())
}

/// Compares secrets without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The router of `--metrics-addr`: `/metrics` only.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// `GET /api/config`: what the browser needs before sign-in (public, no secrets).
async fn client_config(State(state): State<AppState>) -> Json<ClientConfig> {
    let config = &state.config;
    let (auth_url, anon_key) = match &config.auth.supabase_url {
        Some(url) => (
            format!("{}/auth/v1", url.trim_end_matches('/')),
            config
                .auth
                .supabase_anon_key
                .as_ref()
                .map(|key| key.expose().to_owned())
                .unwrap_or_default(),
        ),
        None => ("/auth/v1".to_owned(), String::new()),
    };
    Json(ClientConfig {
        auth_url,
        auth_mode: state.auth.mode.as_str().to_owned(),
        anon_key,
        model: state.runs.model.name().to_owned(),
        demo_model: state.runs.model.is_demo(),
        max_content_bytes: config.runs.max_content_bytes,
        max_frame_bytes: config.sockets.max_frame_bytes,
        protocol_version: wadi_protocol::PROTOCOL_VERSION,
    })
}

async fn api_not_found() -> AppError {
    AppError::NotFound
}

/// axum answers a known path asked with another method `405` with an empty body: given the
/// JSON error every other refusal has (its `Allow` header kept).
async fn method_not_allowed_as_json(response: Response) -> Response {
    if response.status() != StatusCode::METHOD_NOT_ALLOWED
        || response.headers().contains_key(header::CONTENT_TYPE)
    {
        return response;
    }
    let (parts, _) = response.into_parts();
    let mut answer = crate::error::error_body(
        wadi_protocol::ErrorCode::InvalidRequest,
        "this method is not allowed on this path (the Allow header lists those that are)",
    )
    .into_response();
    *answer.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    for (name, value) in &parts.headers {
        if name != header::CONTENT_LENGTH {
            answer.headers_mut().insert(name.clone(), value.clone());
        }
    }
    answer
}

/// `GET /api/me`: the verified caller.
async fn me(user: AuthUser) -> Json<Me> {
    Json(Me {
        id: user.id.into(),
        email: user.email,
        role: user.role,
        expires_at: user.expires_at,
    })
}

/// The client's address, for per-address limits (see `crate::net`): the peer, or behind
/// trusted proxies the right-most hop they vouch for.
pub struct ClientAddr(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(crate::net::UNKNOWN, |info| info.0.ip());
        let forwarded_for = parts
            .headers
            .get("x-forwarded-for")
            .and_then(|value| value.to_str().ok());
        let addr = match parts.extensions.get::<Arc<ProxyTrust>>() {
            Some(trust) => trust.client_addr(peer, forwarded_for),
            None => peer,
        };
        Ok(Self(addr))
    }
}
