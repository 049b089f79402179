//! Authentication: one [`Verifier`] for every route and socket, and (unless `SUPABASE_URL` is
//! set) the embedded Supabase-compatible auth service.

pub mod embedded;
pub mod verify;

use std::sync::Arc;

use axum::{extract::FromRequestParts, http::request::Parts};
use wadi_protocol::ErrorCode;

pub use verify::{AuthUser, Verifier, VerifyError};

use crate::{
    config::Config,
    error::AppError,
    limits::KeyedLimiter,
    state::AppState,
    store::{Store, StoreError},
};

/// Which users the server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// The server's own auth service at `/auth/v1`.
    Embedded,
    /// A Supabase project's users.
    Supabase,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::Supabase => "supabase",
        }
    }
}

pub struct AuthService {
    pub mode: AuthMode,
    pub verifier: Arc<Verifier>,
    /// Present in embedded mode.
    pub embedded: Option<embedded::EmbeddedState>,
}

impl AuthService {
    pub async fn new(
        config: &Config,
        store: Arc<dyn Store>,
        http: reqwest::Client,
        clock: crate::util::Clock,
    ) -> Result<Self, StoreError> {
        let secret = config.supabase_jwt_secret.as_deref();
        if let Some(url) = &config.supabase_url {
            let url = url.trim_end_matches('/');
            let jwks = verify::JwksCache::new(
                format!("{url}/auth/v1/.well-known/jwks.json"),
                http,
                config.jwks_refetch_interval,
            );
            let issuer = config
                .jwt_issuer
                .clone()
                .unwrap_or_else(|| format!("{url}/auth/v1"));
            let verifier = Verifier::new(
                secret,
                verify::KeySource::Remote(jwks),
                Some(issuer),
                config.jwt_leeway,
                clock,
            );
            tracing::info!(supabase = %url, "accepting Supabase users");
            return Ok(Self {
                mode: AuthMode::Supabase,
                verifier: Arc::new(verifier),
                embedded: None,
            });
        }
        let issuer = config.embedded_issuer();
        let service = embedded::EmbeddedAuth::new(
            store,
            embedded::Settings {
                issuer: issuer.clone(),
                access_ttl: config.access_token_ttl,
                reuse_interval: config.refresh_reuse_interval,
                password_min_length: config.password_min_length,
                clock,
            },
        )
        .await?;
        let verifier = Arc::new(Verifier::new(
            secret,
            verify::KeySource::Static(service.keys().verify_keys()),
            Some(config.jwt_issuer.clone().unwrap_or(issuer)),
            config.jwt_leeway,
            clock,
        ));
        let limits = embedded::Limits {
            per_address: KeyedLimiter::per_minute(
                config.auth_rate_burst,
                config.auth_rate_per_minute,
            ),
            per_account: KeyedLimiter::per_minute(
                config.login_rate_burst,
                config.login_rate_per_minute,
            ),
            refresh: KeyedLimiter::per_minute(
                config.refresh_rate_burst,
                config.refresh_rate_per_minute,
            ),
        };
        Ok(Self {
            mode: AuthMode::Embedded,
            verifier: verifier.clone(),
            embedded: Some(embedded::EmbeddedState {
                auth: Arc::new(service),
                verifier,
                limits: Arc::new(limits),
            }),
        })
    }
}

/// Extracts the caller from `Authorization: Bearer <access token>`, or answers 401 with a JSON
/// `{code, message}` (`token_expired` or `invalid_token`).
impl FromRequestParts<AppState> for AuthUser {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let Some(token) = embedded::bearer_token(&parts.headers) else {
            return Err(AppError::Unauthorized {
                code: ErrorCode::InvalidToken,
                message: "this endpoint requires an Authorization: Bearer token".into(),
            });
        };
        let verified = state.auth.verifier.verify(token).await;
        if let Ok(user) = &verified {
            crate::http::request_log::set_user(user.id);
        }
        verified.map_err(|error| {
            tracing::info!(reason = error.reason(), "request with a bad token");
            let code = match error {
                VerifyError::Expired => ErrorCode::TokenExpired,
                _ => ErrorCode::InvalidToken,
            };
            AppError::Unauthorized {
                code,
                message: error.to_string(),
            }
        })
    }
}
