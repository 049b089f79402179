//! Authentication: one [`Verifier`] for every route and socket, and (unless `SUPABASE_URL` is
//! set) the embedded Supabase-compatible auth service.

pub mod embedded;
pub mod verify;

use std::{sync::Arc, time::Duration};

use axum::{extract::FromRequestParts, http::request::Parts};
use wadi_protocol::ErrorCode;

pub use verify::{AuthUser, Verifier, VerifyError};

use crate::{
    config::{Config, Secret},
    error::AppError,
    limits::{Rate, SharedLimit, SharedRates},
    state::AppState,
    store::{Store, StoreError},
};

/// A session lookup slower than this is not waited for (the database is away): the token's
/// signature decides, and requests that need no database still get through quickly.
const SESSION_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// How users are authenticated: a Supabase project, or the embedded service and its limits.
/// Part of [`crate::Config`].
#[derive(Clone, Debug, clap::Args)]
pub struct AuthSettings {
    /// A Supabase project URL. When set, WADI accepts that project's users (verifying their
    /// tokens with the project's JWKS) instead of running its embedded auth service.
    #[arg(long, env = "SUPABASE_URL")]
    pub supabase_url: Option<String>,

    /// The project's legacy JWT secret, to accept HS256 access tokens.
    #[arg(long, env = "SUPABASE_JWT_SECRET", hide_env_values = true)]
    pub supabase_jwt_secret: Option<Secret>,

    /// The project's anon (publishable) key, handed to the browser for its auth calls.
    #[arg(long, env = "SUPABASE_ANON_KEY", hide_env_values = true)]
    pub supabase_anon_key: Option<Secret>,

    /// Required `iss` of access tokens. Default: `{SUPABASE_URL}/auth/v1` with Supabase, the
    /// embedded service's own issuer otherwise.
    #[arg(long, env = "WADI_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Clock skew tolerated when checking a token's `exp`.
    #[arg(long, env = "WADI_JWT_LEEWAY", value_parser = crate::config::parse_duration, default_value = "10s")]
    pub jwt_leeway: Duration,

    /// Shortest time between two JWKS fetches triggered by an unknown `kid`.
    #[arg(long, env = "WADI_JWKS_REFETCH_INTERVAL", value_parser = crate::config::parse_duration, default_value = "60s")]
    pub jwks_refetch_interval: Duration,

    /// Lifetime of access tokens issued by the embedded auth service.
    #[arg(long, env = "WADI_ACCESS_TOKEN_TTL", value_parser = crate::config::parse_duration, default_value = "3600s")]
    pub access_token_ttl: Duration,

    /// How long after a refresh the previous refresh token may still be used (concurrent tabs).
    #[arg(long, env = "WADI_REFRESH_REUSE_INTERVAL", value_parser = crate::config::parse_duration, default_value = "10s")]
    pub refresh_reuse_interval: Duration,

    /// How long a rotated refresh token is kept (never less than the reuse interval); older ones
    /// are deleted at the session's next refresh.
    #[arg(long, env = "WADI_REFRESH_TOKEN_RETENTION", value_parser = crate::config::parse_duration, default_value = "168h")]
    pub refresh_token_retention: Duration,

    /// Shortest password the embedded auth service accepts (Supabase's default is 6).
    #[arg(long, env = "WADI_PASSWORD_MIN_LENGTH", default_value_t = 6)]
    pub password_min_length: usize,

    /// Signups and password logins a client address may make in a burst.
    #[arg(long, env = "WADI_AUTH_RATE_BURST", default_value_t = 30)]
    pub auth_rate_burst: u32,

    /// Signups and password logins a client address regains per minute after a burst.
    #[arg(long, env = "WADI_AUTH_RATE_PER_MINUTE", default_value_t = 6.0)]
    pub auth_rate_per_minute: f64,

    /// Password logins one account may attempt in a burst (whatever addresses they come from)…
    #[arg(long, env = "WADI_LOGIN_RATE_BURST", default_value_t = 10)]
    pub login_rate_burst: u32,

    /// …and per minute after it.
    #[arg(long, env = "WADI_LOGIN_RATE_PER_MINUTE", default_value_t = 10.0)]
    pub login_rate_per_minute: f64,

    /// Refresh-token grants a client address may make in a burst…
    #[arg(long, env = "WADI_REFRESH_RATE_BURST", default_value_t = 60)]
    pub refresh_rate_burst: u32,

    /// …and per minute after it.
    #[arg(long, env = "WADI_REFRESH_RATE_PER_MINUTE", default_value_t = 30.0)]
    pub refresh_rate_per_minute: f64,
}

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
    /// Verifies an access token and, for one the embedded service issued, that its session
    /// still exists: a token of a session that ended (signed out, revoked, its account deleted)
    /// is refused at once, not only once it expires. If the store cannot answer, the signature
    /// decides: a database blip must not sign everyone out.
    pub async fn verify(&self, token: &str) -> Result<AuthUser, VerifyError> {
        let user = self.verifier.verify(token).await?;
        if let (Some(embedded), Some(session), false) =
            (&self.embedded, user.session_id, user.shared_secret)
        {
            let lookup = embedded.auth.session_exists(session);
            match tokio::time::timeout(SESSION_CHECK_TIMEOUT, lookup).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => return Err(VerifyError::SessionEnded),
                Ok(Err(_)) | Err(_) => {
                    tracing::debug!("the session could not be checked: the signature decides");
                }
            }
        }
        Ok(user)
    }

    pub async fn new(
        config: &Config,
        store: Arc<dyn Store>,
        http: reqwest::Client,
        clock: crate::util::Clock,
        rates: Arc<dyn SharedRates>,
    ) -> Result<Self, StoreError> {
        let secret = config.auth.supabase_jwt_secret.as_ref().map(Secret::expose);
        if let Some(url) = &config.auth.supabase_url {
            let url = url.trim_end_matches('/');
            let jwks = verify::JwksCache::new(
                format!("{url}/auth/v1/.well-known/jwks.json"),
                http,
                config.auth.jwks_refetch_interval,
            );
            let issuer = config
                .auth
                .jwt_issuer
                .clone()
                .unwrap_or_else(|| format!("{url}/auth/v1"));
            let verifier = Verifier::new(
                secret,
                verify::KeySource::Remote(jwks),
                Some(issuer),
                config.auth.jwt_leeway,
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
        let service =
            embedded::EmbeddedAuth::new(store, &config.auth, issuer.clone(), clock).await?;
        let verifier = Arc::new(Verifier::new(
            secret,
            verify::KeySource::Local(service.keys().clone()),
            Some(config.auth.jwt_issuer.clone().unwrap_or(issuer)),
            config.auth.jwt_leeway,
            clock,
        ));
        let limits = embedded::Limits {
            per_address: SharedLimit::new(
                "auth-address",
                Rate::per_minute(
                    config.auth.auth_rate_burst,
                    config.auth.auth_rate_per_minute,
                ),
                rates.clone(),
            ),
            per_account: SharedLimit::new(
                "auth-account",
                Rate::per_minute(
                    config.auth.login_rate_burst,
                    config.auth.login_rate_per_minute,
                ),
                rates.clone(),
            ),
            refresh: SharedLimit::new(
                "auth-refresh",
                Rate::per_minute(
                    config.auth.refresh_rate_burst,
                    config.auth.refresh_rate_per_minute,
                ),
                rates,
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
        let verified = state.auth.verify(token).await;
        if let Ok(user) = &verified {
            crate::http::request_log::set_user(user.id);
        }
        verified.map_err(|error| {
            tracing::info!(reason = error.reason(), "request with a bad token");
            state.metrics.auth_failure(error.reason());
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
