//! Supabase Auth (GoTrue) wire shapes: the error envelope, the user object and the session
//! object, as `@supabase/supabase-js` expects them (`docs/auth.md`).

use axum::{
    Json,
    http::{HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::store::UserRecord;

/// The API version whose error shape we speak; echoed in the `X-Supabase-Api-Version` header.
pub const API_VERSION: &str = "2024-01-01";
pub const API_VERSION_HEADER: &str = "x-supabase-api-version";

/// An error as GoTrue sends it: `{code, message}` (the 2024-01-01 shape) plus the legacy
/// `error_code`/`msg` fields, so clients parse it whichever shape they expect.
#[derive(Debug)]
pub struct AuthApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// For `weak_password`: which rules failed (`length`, `characters`, `pwned`).
    pub weak_reasons: Option<Vec<&'static str>>,
}

impl AuthApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            weak_reasons: None,
        }
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "validation_failed", message)
    }

    pub fn invalid_credentials() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_credentials",
            "Invalid login credentials",
        )
    }

    pub fn rate_limited() -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "over_request_rate_limit",
            "Request rate limit reached",
        )
    }

    pub fn unexpected(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "auth request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unexpected_failure",
            "Unexpected failure, please check server logs for more information",
        )
    }
}

impl IntoResponse for AuthApiError {
    fn into_response(self) -> Response {
        let mut body = json!({
            "code": self.code,
            "message": self.message,
            "error_code": self.code,
            "msg": self.message,
        });
        if let Some(reasons) = self.weak_reasons {
            body["weak_password"] = json!({ "reasons": reasons });
        }
        if let Some(id) = crate::http::request_log::request_id() {
            body["request_id"] = json!(id);
        }
        let mut response = (self.status, Json(body)).into_response();
        response
            .headers_mut()
            .insert(API_VERSION_HEADER, HeaderValue::from_static(API_VERSION));
        response
    }
}

/// RFC 3339 text of a Unix-millisecond timestamp, as GoTrue writes times.
pub fn rfc3339(millis: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .ok()
        .and_then(|time| time.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// The user object (`GET /user`, and `user` in a session).
pub fn user_json(user: &UserRecord) -> Value {
    let id = user.id.to_string();
    let created = rfc3339(user.created_at);
    let updated = rfc3339(user.updated_at);
    let metadata: Value = serde_json::from_str(&user.user_metadata).unwrap_or_else(|_| json!({}));
    let mut value = json!({
        "id": id,
        "aud": "authenticated",
        "role": "authenticated",
        "email": user.email,
        "email_confirmed_at": created,
        "phone": "",
        "confirmed_at": created,
        "app_metadata": { "provider": "email", "providers": ["email"] },
        "user_metadata": metadata,
        "identities": [{
            "identity_id": id,
            "id": id,
            "user_id": id,
            "identity_data": {
                "email": user.email,
                "email_verified": false,
                "phone_verified": false,
                "sub": id,
            },
            "provider": "email",
            "created_at": created,
            "updated_at": updated,
            "email": user.email,
        }],
        "created_at": created,
        "updated_at": updated,
        "is_anonymous": false,
    });
    if let Some(at) = user.last_sign_in_at {
        value["last_sign_in_at"] = json!(rfc3339(at));
        value["identities"][0]["last_sign_in_at"] = json!(rfc3339(at));
    }
    value
}

/// The session object (`AccessTokenResponse`).
pub fn session_json(
    access_token: &str,
    expires_at: i64,
    now_secs: i64,
    refresh_token: &str,
    user: &UserRecord,
) -> Value {
    json!({
        "access_token": access_token,
        "token_type": "bearer",
        "expires_in": expires_at - now_secs,
        "expires_at": expires_at,
        "refresh_token": refresh_token,
        "user": user_json(user),
    })
}
