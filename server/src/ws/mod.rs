//! The WebSocket endpoints: `/ws/chat/{conversationId}` and `/ws/runs/{runId}/stream`.
//! `docs/protocol.md` is the reference for everything said on them.

mod handlers;
mod outbox;
pub mod registry;
mod socket;
mod wire;

use std::time::Duration;

use axum::{
    Router,
    extract::{FromRequestParts, Path, State, WebSocketUpgrade},
    http::{HeaderMap, StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;
use wadi_protocol::ErrorCode;

pub use registry::{Caps, Control, Endpoint, Inbox, Refusal, Registry};

use crate::{
    error::{AppError, error_body},
    http::{ClientAddr, extract::ApiQuery},
    ids::{ConversationId, RunId},
    state::AppState,
};

/// WebSocket and SSE limits. Part of [`crate::Config`].
#[derive(Clone, Debug, clap::Args)]
pub struct SocketSettings {
    /// A socket must authenticate within this time.
    #[arg(long, env = "WADI_AUTH_TIMEOUT", value_parser = crate::config::parse_duration, default_value = "10s")]
    pub auth_timeout: Duration,

    /// Largest WebSocket frame accepted, in bytes.
    #[arg(long, env = "WADI_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    pub max_frame_bytes: usize,

    /// Frames a socket may send per second, sustained…
    #[arg(long, env = "WADI_WS_RATE_PER_SECOND", default_value_t = 10.0)]
    pub ws_rate_per_second: f64,

    /// …and in a burst.
    #[arg(long, env = "WADI_WS_RATE_BURST", default_value_t = 20)]
    pub ws_rate_burst: u32,

    /// Open sockets allowed per user.
    #[arg(long, env = "WADI_MAX_CONNECTIONS_PER_USER", default_value_t = 100)]
    pub max_connections_per_user: usize,

    /// Open sockets allowed in total.
    #[arg(long, env = "WADI_MAX_CONNECTIONS", default_value_t = 19_000)]
    pub max_connections: usize,

    /// Open sockets allowed per client address (IPv6: per /64; behind trusted proxies, the
    /// address they saw). Raise it for many users behind one NAT.
    #[arg(long, env = "WADI_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = 1000)]
    pub max_connections_per_address: usize,

    /// Sockets that have not authenticated yet, in total: a flood of them cannot take the
    /// places of authenticated users.
    #[arg(long, env = "WADI_MAX_PENDING_CONNECTIONS", default_value_t = 2000)]
    pub max_pending_connections: usize,

    /// …and per client address.
    #[arg(long, env = "WADI_MAX_PENDING_PER_ADDRESS", default_value_t = 100)]
    pub max_pending_per_address: usize,

    /// Server-Sent Events streams (`/api/runs/{id}/events`) open at once per user.
    #[arg(long, env = "WADI_MAX_SSE_PER_USER", default_value_t = 16)]
    pub max_sse_per_user: usize,

    /// Frames queued per socket before the client counts as slow.
    #[arg(long, env = "WADI_SEND_QUEUE", default_value_t = 256)]
    pub send_queue: usize,

    /// Bytes queued per socket before the client counts as slow (one frame larger than this,
    /// such as a long answer's `complete`, is still sent alone).
    #[arg(long, env = "WADI_SEND_QUEUE_BYTES", default_value_t = 1024 * 1024)]
    pub send_queue_bytes: usize,

    /// A socket whose queue stays full, or whose writes stall, this long is closed.
    #[arg(long, env = "WADI_SLOW_CLIENT_TIMEOUT", value_parser = crate::config::parse_duration, default_value = "10s")]
    pub slow_client_timeout: Duration,

    /// Interval of server pings; a socket silent for two intervals is closed.
    #[arg(long, env = "WADI_HEARTBEAT_INTERVAL", value_parser = crate::config::parse_duration, default_value = "30s")]
    pub heartbeat_interval: Duration,

    /// Browser origins allowed to open sockets, comma-separated (`*` for any). The server's own
    /// origin is always allowed; clients that send no `Origin` (non-browsers) are too.
    #[arg(long, env = "WADI_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
}

/// tungstenite's 128 KiB default read buffer would make an idle socket cost ~136 KB. Browsers
/// send small frames (the largest usual one, `auth`, is about 1 KiB); larger ones are assembled
/// across reads of this size, and the buffer grows to the largest frame read (it keeps that
/// size). An idle socket then holds about its `auth` frame. Measured at 19 000 idle sockets:
/// 2 KiB → 256 B saves 1.0 KiB per socket (docs/performance.md).
const READ_BUFFER: usize = 256;
/// Frames are written out once this much is buffered (a flush writes everything anyway).
const WRITE_BUFFER: usize = 8 * 1024;
/// Past this much unwritable data the write fails instead of buffering without bound. It must
/// hold the largest frame we send: a `complete` carries the whole answer.
const MAX_WRITE_BUFFER: usize = 16 * 1024 * 1024;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ws/chat/{conversation_id}", get(chat))
        .route("/ws/runs/{run_id}/stream", get(run_stream))
        .route("/ws/user", get(user_socket))
}

#[derive(Deserialize)]
struct StreamQuery {
    #[serde(default, rename = "afterSeq")]
    after_seq: Option<String>,
}

async fn chat(
    State(state): State<AppState>,
    Path(conversation_id): Path<String>,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
    Upgrade(upgrade): Upgrade,
) -> Response {
    let Ok(conversation_id) = conversation_id.parse::<ConversationId>() else {
        return AppError::invalid(ErrorCode::InvalidRequest, "not a conversation id")
            .into_response();
    };
    accept(
        state,
        &headers,
        addr,
        upgrade,
        Endpoint::Chat { conversation_id },
    )
}

async fn run_stream(
    State(state): State<AppState>,
    Path(run_id): Path<String>,
    ApiQuery(query): ApiQuery<StreamQuery>,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
    Upgrade(upgrade): Upgrade,
) -> Response {
    let Ok(run_id) = run_id.parse::<RunId>() else {
        return AppError::invalid(ErrorCode::InvalidRequest, "not a run id").into_response();
    };
    let after_seq = match query.after_seq.as_deref().map(str::parse::<u64>) {
        None => 0,
        Some(Ok(seq)) => seq,
        Some(Err(_)) => {
            return AppError::invalid(ErrorCode::InvalidRequest, "afterSeq must be a number")
                .into_response();
        }
    };
    accept(
        state,
        &headers,
        addr,
        upgrade,
        Endpoint::Run { run_id, after_seq },
    )
}

/// `/ws/user`: the user's conversations as they change (created, renamed, deleted, a message
/// sent, an answer finished), for the sidebar of every tab and device.
async fn user_socket(
    State(state): State<AppState>,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
    Upgrade(upgrade): Upgrade,
) -> Response {
    accept(state, &headers, addr, upgrade, Endpoint::User)
}

/// The handshake, or for a request that is not one a JSON `invalid_request` with axum's
/// status (`400` for missing or wrong handshake headers, `426` when the connection cannot be
/// upgraded, e.g. HTTP/1.0; axum's own body is plain text).
struct Upgrade(WebSocketUpgrade);

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        WebSocketUpgrade::from_request_parts(parts, state)
            .await
            .map(Self)
            .map_err(|rejection| {
                let message = format!("not a WebSocket handshake: {}", rejection.body_text());
                (
                    rejection.status(),
                    error_body(ErrorCode::InvalidRequest, message),
                )
                    .into_response()
            })
    }
}

/// Checks the origin and the connection caps, then upgrades with lean buffers.
fn accept(
    state: AppState,
    headers: &HeaderMap,
    addr: std::net::IpAddr,
    upgrade: WebSocketUpgrade,
    endpoint: Endpoint,
) -> Response {
    if !origin_allowed(headers, &state.config.sockets.allowed_origins) {
        tracing::info!(origin = ?headers.get(header::ORIGIN), "socket refused: origin not allowed");
        return (
            StatusCode::FORBIDDEN,
            error_body(
                ErrorCode::InvalidRequest,
                "this origin may not open sockets here",
            ),
        )
            .into_response();
    }
    let addr = crate::net::limit_key(addr);
    let caps = Caps {
        total: state.config.sockets.max_connections,
        per_address: state.config.sockets.max_connections_per_address,
        pending: state.config.sockets.max_pending_connections,
        pending_per_address: state.config.sockets.max_pending_per_address,
    };
    if let Err(refusal) = state.clients.admit(addr, &caps) {
        let (status, reason, message) = match refusal {
            Refusal::Total => (
                StatusCode::SERVICE_UNAVAILABLE,
                "total",
                "the server has too many open connections; try again shortly",
            ),
            Refusal::Address => (
                StatusCode::TOO_MANY_REQUESTS,
                "address",
                "too many open connections from your address",
            ),
            Refusal::Pending => (
                StatusCode::TOO_MANY_REQUESTS,
                "unauthenticated",
                "too many connections waiting to authenticate; try again shortly",
            ),
        };
        state.metrics.close(wadi_protocol::close::TRY_AGAIN_LATER);
        state.metrics.refused_connection(reason);
        tracing::info!(%addr, reason, "socket refused: over a connection cap");
        return (
            status,
            [(header::RETRY_AFTER, "5")],
            error_body(ErrorCode::TooManyConnections, message),
        )
            .into_response();
    }
    let max_frame = state.config.sockets.max_frame_bytes;
    let request_id = crate::http::request_log::request_id();
    upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_frame_size(max_frame)
        .max_message_size(max_frame)
        .on_upgrade(move |socket| {
            let sockets = state.sockets.clone();
            sockets.track_future(socket::serve(socket, state, endpoint, addr, request_id))
        })
}

/// Cross-site WebSocket hijacking defence: a browser always sends `Origin`; it must be this
/// server's own origin (same host as `Host`) or on the allow-list. Non-browser clients send no
/// `Origin` and are allowed (they authenticate like everyone else).
fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return headers.get(header::ORIGIN).is_none();
    };
    if allowed
        .iter()
        .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let origin_host = origin
        .split_once("://")
        .map_or(origin, |(_, rest)| rest)
        .trim_end_matches('/');
    headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .is_some_and(|host| host.eq_ignore_ascii_case(origin_host))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(origin) = origin {
            headers.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        }
        headers
    }

    #[test]
    fn origins_are_checked_against_the_host_and_the_allow_list() {
        let none: Vec<String> = Vec::new();
        assert!(origin_allowed(&headers(None, "chat.example.com"), &none));
        assert!(origin_allowed(
            &headers(Some("https://chat.example.com"), "chat.example.com"),
            &none
        ));
        assert!(origin_allowed(
            &headers(Some("http://127.0.0.1:8080"), "127.0.0.1:8080"),
            &none
        ));
        assert!(!origin_allowed(
            &headers(Some("https://evil.example"), "chat.example.com"),
            &none
        ));
        let list = vec!["http://localhost:8081".to_owned()];
        assert!(origin_allowed(
            &headers(Some("http://localhost:8081"), "127.0.0.1:8080"),
            &list
        ));
        assert!(origin_allowed(
            &headers(Some("https://any.where"), "x"),
            &["*".to_owned()]
        ));
    }
}
