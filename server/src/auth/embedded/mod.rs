//! The embedded auth service at `/auth/v1`: the subset of Supabase Auth (GoTrue) a browser
//! client needs, wire-compatible so `@supabase/supabase-js` works against it unchanged.
//! Served when `SUPABASE_URL` is not set. `docs/auth.md` lists what is and is not implemented.

pub mod hashing;
pub mod keys;
mod service;
mod wire;

use std::{net::IpAddr, sync::Arc};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{
        DefaultBodyLimit, Query, State,
        rejection::{BytesRejection, QueryRejection},
    },
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::Value;
use tower_http::{
    cors::{AllowOrigin, CorsLayer},
    set_header::SetResponseHeaderLayer,
};

pub use keys::KeyRing;
pub use service::{EmbeddedAuth, MAX_PASSWORD_BYTES, keep_retired_keys};
use wire::{API_VERSION, API_VERSION_HEADER, AuthApiError, user_json};

use crate::{
    auth::verify::{AuthUser, Verifier, VerifyError},
    http::ClientAddr,
    limits::SharedLimit,
    net::limit_key,
};

/// GoTrue caps request bodies at 1 MB.
const MAX_BODY_BYTES: usize = 1 << 20;

#[derive(Clone)]
pub struct EmbeddedState {
    pub auth: Arc<EmbeddedAuth>,
    pub verifier: Arc<Verifier>,
    pub limits: Arc<Limits>,
}

/// The auth service's rate limits, counted across instances in a cluster. Addresses are keys
/// as `net::limit_key` makes them (IPv6 by /64), behind trusted proxies the right-most untrusted
/// hop.
pub struct Limits {
    /// Signups and password logins per client address.
    pub per_address: SharedLimit<IpAddr>,
    /// Password logins per account (keyed by [`account_key`]), from anywhere: guessing one
    /// account's password from many addresses is slow too.
    pub per_account: SharedLimit<String>,
    /// Refresh-token grants per client address.
    pub refresh: SharedLimit<IpAddr>,
}

/// The per-account limit's key for a login's email: a digest of it as the account's email is
/// stored (trimmed, lowercased), so that an email of any length (the body may hold a megabyte)
/// costs a fixed-size key here and in Redis, and Redis holds no email.
fn account_key(email: &str) -> String {
    use sha2::{Digest, Sha256};
    crate::util::hex(&Sha256::digest(email.trim().to_lowercase().as_bytes())[..16])
}

pub fn router<S: Clone + Send + Sync + 'static>(state: EmbeddedState) -> Router<S> {
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::mirror_request())
        .allow_credentials(true)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::OPTIONS])
        .allow_headers([
            header::ACCEPT,
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("apikey"),
            HeaderName::from_static("x-client-info"),
            HeaderName::from_static("x-client-ip"),
            HeaderName::from_static("x-jwt-aud"),
            HeaderName::from_static("x-use-cookie"),
            HeaderName::from_static(API_VERSION_HEADER),
        ])
        .expose_headers([
            HeaderName::from_static("x-total-count"),
            header::LINK,
            HeaderName::from_static(API_VERSION_HEADER),
        ]);
    Router::new()
        .route("/signup", post(signup))
        .route("/token", post(token))
        .route("/user", get(user))
        .route("/logout", post(logout))
        .route("/.well-known/jwks.json", get(jwks))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(reject_declared_oversized))
        .layer(SetResponseHeaderLayer::overriding(
            HeaderName::from_static(API_VERSION_HEADER),
            HeaderValue::from_static(API_VERSION),
        ))
        .layer(cors)
        .with_state(state)
}

/// Answers `413 request_entity_too_large` from the declared length, before reading the body.
async fn reject_declared_oversized(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if crate::http::extract::declared_length(&request).is_some_and(|n| n > MAX_BODY_BYTES) {
        return too_large().into_response();
    }
    next.run(request).await
}

fn too_large() -> AuthApiError {
    AuthApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_entity_too_large",
        "Request body too large",
    )
}

/// Parses a JSON body the way GoTrue does: unknown fields and `null`s are ignored.
/// A query string, or `validation_failed` (a repeated key, a mistyped value) in Supabase's
/// error shape instead of axum's plain text.
fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, AuthApiError> {
    query
        .map(|Query(query)| query)
        .map_err(|rejection| AuthApiError::validation(rejection.body_text()))
}

pub fn json_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, AuthApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            AuthApiError::new(StatusCode::BAD_REQUEST, "bad_json", rejection.body_text())
        }
    })?;
    if bytes.is_empty() {
        return serde_json::from_str("{}").map_err(|e| AuthApiError::validation(e.to_string()));
    }
    // Checked as a whole: serde checks only the strings it keeps.
    if std::str::from_utf8(&bytes).is_err() {
        return Err(AuthApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            "Could not parse request body as JSON: it is not UTF-8",
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        AuthApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("Could not parse request body as JSON: {e}"),
        )
    })
}

/// Fields are all optional here so that a missing one gets GoTrue's message, not serde's.
#[derive(Default, Deserialize)]
#[serde(default)]
pub struct Credentials {
    email: Option<String>,
    phone: Option<String>,
    password: Option<String>,
    data: Option<Value>,
    refresh_token: Option<String>,
}

/// Largest `data` (user metadata) accepted at signup, as JSON text.
const MAX_USER_METADATA_BYTES: usize = 16 * 1024;

async fn signup(
    State(state): State<EmbeddedState>,
    ClientAddr(addr): ClientAddr,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AuthApiError> {
    let body: Credentials = json_body(body)?;
    let email = body.email.unwrap_or_default();
    let phone = body.phone.unwrap_or_default();
    if !email.is_empty() && !phone.is_empty() {
        return Err(AuthApiError::validation(
            "Only an email address or phone number should be provided on signup.",
        ));
    }
    if email.is_empty() && phone.is_empty() {
        return Err(AuthApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "anonymous_provider_disabled",
            "Anonymous sign-ins are disabled",
        ));
    }
    if !phone.is_empty() {
        return Err(AuthApiError::new(
            StatusCode::BAD_REQUEST,
            "phone_provider_disabled",
            "Phone signups are disabled",
        ));
    }
    if !state.limits.per_address.allows(limit_key(addr)).await {
        return Err(AuthApiError::rate_limited());
    }
    let metadata = match body.data {
        Some(Value::Object(map)) => Value::Object(map),
        _ => Value::Object(serde_json::Map::new()),
    };
    // It is copied into every access token of the user: keep tokens (and headers) small.
    if metadata.to_string().len() > MAX_USER_METADATA_BYTES {
        return Err(AuthApiError::validation(format!(
            "User metadata (data) must be at most {} KiB of JSON",
            MAX_USER_METADATA_BYTES / 1024
        )));
    }
    let password = body.password.unwrap_or_default();
    let session = state.auth.sign_up(&email, &password, metadata).await?;
    Ok(Json(session.json).into_response())
}

#[derive(Deserialize)]
struct GrantQuery {
    #[serde(default)]
    grant_type: String,
}

async fn token(
    State(state): State<EmbeddedState>,
    ClientAddr(addr): ClientAddr,
    grant: Result<Query<GrantQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AuthApiError> {
    let query = query(grant)?;
    let body: Credentials = json_body(body)?;
    let session = match query.grant_type.as_str() {
        "password" => {
            let email = body.email.unwrap_or_default();
            let phone = body.phone.unwrap_or_default();
            if !email.is_empty() && !phone.is_empty() {
                return Err(AuthApiError::validation(
                    "Only an email address or phone number should be provided on login.",
                ));
            }
            if email.is_empty() {
                return Err(AuthApiError::validation("missing email or phone"));
            }
            if !state.limits.per_address.allows(limit_key(addr)).await
                || !state.limits.per_account.allows(account_key(&email)).await
            {
                return Err(AuthApiError::rate_limited());
            }
            let password = body.password.unwrap_or_default();
            state.auth.sign_in(&email, &password).await?
        }
        "refresh_token" => {
            if !state.limits.refresh.allows(limit_key(addr)).await {
                return Err(AuthApiError::rate_limited());
            }
            let token = body.refresh_token.unwrap_or_default();
            state.auth.refresh(&token).await?
        }
        _ => {
            return Err(AuthApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_credentials",
                "unsupported_grant_type",
            ));
        }
    };
    Ok(Json(session.json).into_response())
}

/// The caller of `/user` and `/logout`: a verified token whose session still exists.
async fn authenticate(
    state: &EmbeddedState,
    headers: &HeaderMap,
) -> Result<AuthUser, AuthApiError> {
    let token = bearer_token(headers).ok_or_else(|| {
        AuthApiError::new(
            StatusCode::UNAUTHORIZED,
            "no_authorization",
            "This endpoint requires a valid Bearer token",
        )
    })?;
    let user = state.verifier.verify(token).await.map_err(|error| {
        tracing::info!(reason = error.reason(), "auth request with a bad token");
        let detail = match error {
            VerifyError::Expired => "token has invalid claims: token is expired".to_owned(),
            other => other.to_string(),
        };
        AuthApiError::new(
            StatusCode::FORBIDDEN,
            "bad_jwt",
            format!("invalid JWT: unable to parse or verify signature, {detail}"),
        )
    })?;
    let session_id = user.session_id.ok_or_else(|| {
        AuthApiError::new(
            StatusCode::FORBIDDEN,
            "bad_jwt",
            "invalid JWT: missing session_id",
        )
    })?;
    if !state.auth.session_exists(session_id).await? {
        return Err(AuthApiError::new(
            StatusCode::FORBIDDEN,
            "session_not_found",
            "Session from session_id claim in JWT does not exist",
        ));
    }
    Ok(user)
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains(' '))
        .then_some(token)
}

async fn user(
    State(state): State<EmbeddedState>,
    headers: HeaderMap,
) -> Result<Response, AuthApiError> {
    let caller = authenticate(&state, &headers).await?;
    let record = state.auth.user(caller.id).await?.ok_or_else(|| {
        AuthApiError::new(
            StatusCode::FORBIDDEN,
            "user_not_found",
            "User from sub claim in JWT does not exist",
        )
    })?;
    Ok(Json(user_json(&record)).into_response())
}

#[derive(Deserialize)]
struct LogoutQuery {
    #[serde(default = "global_scope")]
    scope: String,
}

fn global_scope() -> String {
    "global".to_owned()
}

async fn logout(
    State(state): State<EmbeddedState>,
    scope: Result<Query<LogoutQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, AuthApiError> {
    let query = query(scope)?;
    let caller = authenticate(&state, &headers).await?;
    let session_id = caller.session_id.unwrap_or_default();
    state
        .auth
        .log_out(caller.id, session_id, &query.scope)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn jwks(State(state): State<EmbeddedState>) -> Response {
    (
        [(header::CACHE_CONTROL, "public, max-age=600")],
        Json(state.auth.keys().current().jwks()),
    )
        .into_response()
}
