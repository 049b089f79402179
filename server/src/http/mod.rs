//! The HTTP surface: one router per resource, merged here, with the web app as the fallback.

pub mod conversations;
pub mod dto;
pub mod extract;
pub mod static_files;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::{
    Json, Router,
    extract::{ConnectInfo, FromRequestParts},
    http::request::Parts,
    routing::get,
};
use wadi_protocol::api::Me;

use crate::{auth::AuthUser, error::AppError, state::AppState};

pub fn router(state: AppState) -> Router {
    let mut router = Router::new()
        .route("/healthz", get(healthz))
        .route("/api/me", get(me))
        .merge(conversations::router())
        // Unknown API, auth and socket paths answer JSON 404s, not the web app's index page.
        .route("/api/{*rest}", axum::routing::any(api_not_found))
        .route("/auth/{*rest}", axum::routing::any(api_not_found))
        .route("/ws/{*rest}", axum::routing::any(api_not_found));
    if let Some(embedded) = state.auth.embedded.clone() {
        router = router.nest("/auth/v1", crate::auth::embedded::router(embedded));
    }
    let trust = TrustForwardedFor(state.config.trust_forwarded_for);
    // Room for the largest content even if every character is JSON-escaped, plus the envelope.
    let body_limit = state.config.max_content_bytes.saturating_mul(6) + 16 * 1024;
    router
        .fallback(static_files::serve)
        .layer(axum::Extension(trust))
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// Liveness: the process is up and serving HTTP.
async fn healthz() -> &'static str {
    "ok"
}

async fn api_not_found() -> AppError {
    AppError::NotFound
}

/// `GET /api/me`: the verified caller.
async fn me(user: AuthUser) -> Json<Me> {
    Json(Me {
        id: user.id,
        email: user.email,
        role: user.role,
        expires_at: user.expires_at,
    })
}

/// The client's address, for per-address limits: the peer address, or the first
/// `X-Forwarded-For` entry when the server is configured to trust its proxy.
pub struct ClientAddr(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let trust_forwarded = parts
            .extensions
            .get::<TrustForwardedFor>()
            .is_some_and(|trust| trust.0);
        if trust_forwarded
            && let Some(addr) = parts
                .headers
                .get("x-forwarded-for")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.split(',').next())
                .and_then(|first| first.trim().parse::<IpAddr>().ok())
        {
            return Ok(Self(addr));
        }
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |info| info.0.ip());
        Ok(Self(peer))
    }
}

/// Request extension carrying the `--trust-forwarded-for` setting to [`ClientAddr`].
#[derive(Clone, Copy)]
pub struct TrustForwardedFor(pub bool);
