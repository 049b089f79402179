//! The embedded auth service's logic, without HTTP: accounts, passwords, sessions, access
//! tokens and rotating refresh tokens with reuse detection.

use std::{sync::Arc, time::Duration};

use axum::http::StatusCode;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, Header};
use rand_core::RngCore;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{
    hashing::{HashError, Hasher},
    keys::KeyRing,
    wire::{AuthApiError, session_json},
};
use crate::{
    auth::AuthSettings,
    ids::UserId,
    store::{Constraint, RefreshTokenRecord, SessionRecord, Store, StoreError, UserRecord},
};

/// Passwords longer than this are refused, as Supabase does (bcrypt's limit, kept for
/// compatibility even though we hash with argon2id).
pub const MAX_PASSWORD_BYTES: usize = 72;
const MAX_EMAIL_BYTES: usize = 255;

pub struct EmbeddedAuth {
    store: Arc<dyn Store>,
    keys: Arc<KeyRing>,
    issuer: String,
    access_ttl: Duration,
    reuse_interval: Duration,
    /// How long a rotated token is kept (at least `reuse_interval`).
    retention: Duration,
    password_min_length: usize,
    /// Wrong passwords an account takes within `failure_window`, counted in the store across
    /// instances (each instance's own limiter counts only what reaches it).
    max_failures: i64,
    failure_window: Duration,
    clock: crate::util::Clock,
    /// Verified against when an email is unknown, so that a wrong email costs the same time as
    /// a wrong password.
    dummy_hash: String,
    hasher: Hasher,
}

/// What a successful signup, login or refresh returns.
pub struct IssuedSession {
    pub json: Value,
}

/// How long a retired signing key keeps verifying: the tokens it signed live for the access
/// token lifetime (plus leeway), and an instance may sign with it until it re-reads the keys.
pub fn keep_retired_keys(settings: &AuthSettings) -> Duration {
    settings.access_token_ttl + settings.jwt_leeway + super::keys::RELOAD_EVERY
}

/// The window wrong passwords are counted over: as long as the per-account rate takes to
/// regain its burst (a minute at the defaults, 10 at 10 a minute), at least a minute.
fn failure_window(settings: &AuthSettings) -> Duration {
    let minutes = f64::from(settings.login_rate_burst.max(1)) / settings.login_rate_per_minute;
    if minutes.is_finite() && minutes > 0.0 {
        Duration::from_secs_f64((minutes * 60.0).min(24.0 * 3600.0)).max(Duration::from_secs(60))
    } else {
        Duration::from_secs(24 * 3600)
    }
}

fn store_error(error: StoreError) -> AuthApiError {
    if error.is_unavailable() {
        tracing::warn!(%error, "the auth service cannot reach its storage");
        return AuthApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "unexpected_failure",
            "The service cannot reach its storage right now; try again in a moment",
        );
    }
    AuthApiError::unexpected(error)
}

impl EmbeddedAuth {
    /// The service for `settings`, issuing tokens as `issuer`, timed by `clock` (the
    /// verifier's).
    pub async fn new(
        store: Arc<dyn Store>,
        settings: &AuthSettings,
        issuer: String,
        clock: crate::util::Clock,
    ) -> Result<Self, StoreError> {
        let keys = KeyRing::open(store.clone(), keep_retired_keys(settings)).await?;
        let hasher = Hasher::start()
            .map_err(|e| StoreError::Corrupt(format!("cannot start hashing threads: {e}")))?;
        let dummy_hash = hash_password(&hasher, "wadi-dummy-password".to_owned())
            .await
            .map_err(|e| StoreError::Corrupt(format!("cannot hash: {}", e.message)))?;
        Ok(Self {
            store,
            keys,
            issuer,
            access_ttl: settings.access_token_ttl,
            reuse_interval: settings.refresh_reuse_interval,
            retention: settings
                .refresh_token_retention
                .max(settings.refresh_reuse_interval),
            password_min_length: settings.password_min_length,
            max_failures: i64::from(settings.login_rate_burst.max(1)),
            failure_window: failure_window(settings),
            clock,
            dummy_hash,
            hasher,
        })
    }

    pub fn keys(&self) -> &Arc<KeyRing> {
        &self.keys
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// `POST /signup`: creates a confirmed user and signs them in.
    pub async fn sign_up(
        &self,
        email: &str,
        password: &str,
        metadata: Value,
    ) -> Result<IssuedSession, AuthApiError> {
        let email = normalize_email(email)?;
        self.check_password(password)?;
        let now = self.clock.now_millis();
        let user = UserRecord {
            // Random, as Supabase's are (a time-ordered id would tell when someone signed up).
            id: UserId::from(Uuid::new_v4()),
            email,
            password_hash: hash_password(&self.hasher, password.to_owned()).await?,
            user_metadata: metadata.to_string(),
            created_at: now,
            updated_at: now,
            last_sign_in_at: Some(now),
        };
        match self.store.create_user(&user).await {
            Ok(()) => {}
            Err(StoreError::Conflict(Constraint::UserEmail)) => {
                return Err(AuthApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "user_already_exists",
                    "User already registered",
                ));
            }
            Err(error) => return Err(store_error(error)),
        }
        tracing::info!(user_id = %user.id, "user signed up");
        self.start_session(&user, now).await
    }

    /// `POST /token?grant_type=password`. Unknown email and wrong password are answered
    /// identically, after the same amount of work.
    pub async fn sign_in(
        &self,
        email: &str,
        password: &str,
    ) -> Result<IssuedSession, AuthApiError> {
        // Checked before any hashing: a megabyte of "password" costs nothing to refuse.
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(AuthApiError::validation(format!(
                "Password cannot be longer than {MAX_PASSWORD_BYTES} characters"
            )));
        }
        let email = email.trim().to_lowercase();
        let now = self.clock.now_millis();
        let window = i64::try_from(self.failure_window.as_millis()).unwrap_or(i64::MAX);
        let failures = self
            .store
            .login_failures_since(&email, now.saturating_sub(window))
            .await
            .map_err(store_error)?;
        if failures >= self.max_failures {
            return Err(AuthApiError::rate_limited());
        }
        let user = self
            .store
            .user_by_email(&email)
            .await
            .map_err(store_error)?;
        let hash = user.as_ref().map_or_else(
            || self.dummy_hash.clone(),
            |user| user.password_hash.clone(),
        );
        let matches = verify_password(&self.hasher, password.to_owned(), hash).await?;
        let Some(mut user) = user.filter(|_| matches) else {
            self.store
                .record_login_failure(&email, now, now.saturating_sub(window))
                .await
                .map_err(store_error)?;
            return Err(AuthApiError::invalid_credentials());
        };
        self.store
            .record_sign_in(user.id, now)
            .await
            .map_err(store_error)?;
        self.store
            .clear_login_failures(&email)
            .await
            .map_err(store_error)?;
        user.last_sign_in_at = Some(now);
        user.updated_at = now;
        self.start_session(&user, now).await
    }

    async fn start_session(
        &self,
        user: &UserRecord,
        now: i64,
    ) -> Result<IssuedSession, AuthApiError> {
        let session = SessionRecord {
            id: Uuid::new_v4(),
            user_id: user.id,
            amr_method: "password".to_owned(),
            amr_at: now,
            created_at: now,
            updated_at: now,
        };
        let (refresh_token, record) = new_refresh_token(session.id, None, now);
        self.store
            .create_session(&session, &record)
            .await
            .map_err(store_error)?;
        self.issue(user, &session, &refresh_token, now)
    }

    /// `POST /token?grant_type=refresh_token`: rotates the refresh token, following GoTrue's
    /// rules without ever forking a session:
    ///
    /// - an active token is revoked and replaced by a child (one transaction; of two concurrent
    ///   refreshes with one token, the second gets the child the first created);
    /// - a revoked token that is the parent of the session's active token gets that active token
    ///   back, with no new one (a client that never saw the last answer);
    /// - a revoked token used again within the reuse interval of its revocation gets the
    ///   session's active token too (tabs racing on one token);
    /// - any other reuse means the token leaked: the whole session is revoked.
    ///
    /// A rotation also deletes the session's tokens rotated more than the retention ago (but
    /// never the one it rotates): presented again, they are "not found", as GoTrue's cleanup
    /// of revoked tokens makes them.
    ///
    /// The active token is found by following the chain of sealed successors from the token
    /// presented (see [`seal`]), so only a holder of a token in the chain can learn it.
    pub async fn refresh(&self, token: &str) -> Result<IssuedSession, AuthApiError> {
        if token.is_empty() {
            return Err(AuthApiError::validation("Refresh token is not valid"));
        }
        let mut record = self.token_record(token).await?.ok_or_else(|| {
            AuthApiError::new(
                StatusCode::BAD_REQUEST,
                "refresh_token_not_found",
                "Invalid Refresh Token: Refresh Token Not Found",
            )
        })?;
        let session = self
            .store
            .session_by_id(record.session_id)
            .await
            .map_err(store_error)?
            .ok_or_else(session_not_found)?;
        let user = self
            .store
            .user_by_id(session.user_id)
            .await
            .map_err(store_error)?
            .ok_or_else(session_not_found)?;
        let now = self.clock.now_millis();

        if !record.revoked {
            let (child_token, child) = new_refresh_token(session.id, Some(record.id), now);
            let retention = i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX);
            let rotated = self
                .store
                .rotate_refresh_token(
                    record.id,
                    &seal(token, &child_token),
                    &child,
                    now.saturating_sub(retention),
                )
                .await
                .map_err(|error| match error {
                    // The session was deleted between our read and this write (a logout).
                    StoreError::MissingParent => session_not_found(),
                    other => store_error(other),
                })?;
            if rotated {
                return self.issue(&user, &session, &child_token, now);
            }
            // A concurrent refresh rotated it first: it is revoked now, with its successor.
            record = self
                .token_record(token)
                .await?
                .ok_or_else(session_not_found)?;
        }

        let reuse_window = i64::try_from(self.reuse_interval.as_millis()).unwrap_or(i64::MAX);
        let within_window = now.saturating_sub(record.updated_at) < reuse_window;
        let (active, steps) = self.active_successor(token, &record).await?;
        let parent_of_active = active.is_some() && steps == 1;
        if !within_window && !parent_of_active {
            self.store
                .delete_session(session.id)
                .await
                .map_err(store_error)?;
            tracing::warn!(
                session_id = %session.id,
                user_id = %user.id,
                "refresh token reused outside the reuse window: session revoked"
            );
            return Err(AuthApiError::new(
                StatusCode::BAD_REQUEST,
                "refresh_token_already_used",
                "Invalid Refresh Token: Already Used",
            ));
        }
        match active {
            Some(active) => self.issue(&user, &session, &active, now),
            None => {
                // A token rotated before successors were kept: as before, a new child.
                let (child_token, child) = new_refresh_token(session.id, Some(record.id), now);
                self.store
                    .insert_refresh_token(&child)
                    .await
                    .map_err(|error| match error {
                        StoreError::MissingParent => session_not_found(),
                        other => store_error(other),
                    })?;
                self.issue(&user, &session, &child_token, now)
            }
        }
    }

    async fn token_record(&self, token: &str) -> Result<Option<RefreshTokenRecord>, AuthApiError> {
        self.store
            .refresh_token_by_hash(&hash_token(token))
            .await
            .map_err(store_error)
    }

    /// The session's active token, reached from the revoked `token` through the sealed
    /// successors, and how many steps that took (1: `token` is its parent). `None` if the
    /// chain breaks (tokens rotated before successors were kept).
    async fn active_successor(
        &self,
        token: &str,
        record: &RefreshTokenRecord,
    ) -> Result<(Option<String>, usize), AuthApiError> {
        let mut current = token.to_owned();
        let mut sealed = record.next_token.clone();
        for step in 1..=MAX_CHAIN_STEPS {
            let Some(next) = sealed.as_deref().and_then(|next| unseal(&current, next)) else {
                return Ok((None, step));
            };
            let Some(successor) = self.token_record(&next).await? else {
                return Ok((None, step));
            };
            if !successor.revoked {
                return Ok((Some(next), step));
            }
            current = next;
            sealed = successor.next_token;
        }
        Ok((None, MAX_CHAIN_STEPS))
    }

    fn issue(
        &self,
        user: &UserRecord,
        session: &SessionRecord,
        refresh_token: &str,
        now_ms: i64,
    ) -> Result<IssuedSession, AuthApiError> {
        let now = now_ms / 1000;
        let ttl = i64::try_from(self.access_ttl.as_secs()).unwrap_or(3600);
        let expires_at = now + ttl;
        let metadata: Value =
            serde_json::from_str(&user.user_metadata).unwrap_or_else(|_| json!({}));
        let claims = json!({
            "iss": self.issuer,
            "sub": user.id.to_string(),
            "aud": "authenticated",
            "exp": expires_at,
            "iat": now,
            "email": user.email,
            "phone": "",
            "app_metadata": { "provider": "email", "providers": ["email"] },
            "user_metadata": metadata,
            "role": "authenticated",
            "aal": "aal1",
            "amr": [{ "method": session.amr_method, "timestamp": session.amr_at / 1000 }],
            "session_id": session.id.to_string(),
            "is_anonymous": false,
        });
        let mut header = Header::new(Algorithm::ES256);
        let keys = self.keys.current();
        header.kid = Some(keys.kid.clone());
        let access_token = jsonwebtoken::encode(&header, &claims, &keys.encoding)
            .map_err(AuthApiError::unexpected)?;
        Ok(IssuedSession {
            json: session_json(&access_token, expires_at, now, refresh_token, user),
        })
    }

    fn check_password(&self, password: &str) -> Result<(), AuthApiError> {
        if password.is_empty() {
            return Err(AuthApiError::validation("Signup requires a valid password"));
        }
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(AuthApiError::validation(format!(
                "Password cannot be longer than {MAX_PASSWORD_BYTES} characters"
            )));
        }
        if password.chars().count() < self.password_min_length {
            let mut error = AuthApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "weak_password",
                format!(
                    "Password should be at least {} characters.",
                    self.password_min_length
                ),
            );
            error.weak_reasons = Some(vec!["length"]);
            return Err(error);
        }
        Ok(())
    }

    pub async fn user(&self, id: UserId) -> Result<Option<UserRecord>, AuthApiError> {
        self.store.user_by_id(id).await.map_err(store_error)
    }

    pub async fn session_exists(&self, id: Uuid) -> Result<bool, AuthApiError> {
        Ok(self
            .store
            .session_by_id(id)
            .await
            .map_err(store_error)?
            .is_some())
    }

    /// `POST /logout`: `global` ends every session of the user, `local` this one, `others` all
    /// but this one.
    pub async fn log_out(
        &self,
        user_id: UserId,
        session_id: Uuid,
        scope: &str,
    ) -> Result<(), AuthApiError> {
        match scope {
            "global" => self.store.delete_user_sessions(user_id, None).await,
            "local" => self.store.delete_session(session_id).await.map(u64::from),
            "others" => {
                self.store
                    .delete_user_sessions(user_id, Some(session_id))
                    .await
            }
            other => {
                return Err(AuthApiError::validation(format!(
                    "Unsupported logout scope {other:?}"
                )));
            }
        }
        .map_err(store_error)?;
        Ok(())
    }
}

fn session_not_found() -> AuthApiError {
    AuthApiError::new(
        StatusCode::BAD_REQUEST,
        "session_not_found",
        "Invalid Refresh Token: No Valid Session Found",
    )
}

/// Lowercases and checks an email address.
fn normalize_email(email: &str) -> Result<String, AuthApiError> {
    let email = email.trim().to_lowercase();
    if email.is_empty() {
        return Err(AuthApiError::validation("An email address is required"));
    }
    // The HTML form's rule (what GoTrue checks too), with a dot in the domain: no spaces,
    // control characters, `<`, quotes, or empty domain labels.
    let local_char = |c: char| c.is_ascii_alphanumeric() || ".!#$%&'*+/=?^_`{|}~-".contains(c);
    let label = |label: &str| {
        (1..=63).contains(&label.len())
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    let valid = email.len() <= MAX_EMAIL_BYTES
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && local.chars().all(local_char)
                && domain.contains('.')
                && domain.split('.').all(label)
        });
    if valid {
        Ok(email)
    } else {
        Err(AuthApiError::validation(
            "Unable to validate email address: invalid format",
        ))
    }
}

/// How many successors a reused token's chain is followed (a chain is as long as the rotations
/// since that token; beyond the reuse window only one step is ever allowed).
const MAX_CHAIN_STEPS: usize = 64;

/// Seals `next` (a refresh token) with a key derived from `token`: the pad is
/// `SHA-256("wadi refresh successor" || token)`, used once, since a token is rotated once. Only
/// someone holding `token` can open it; the database holds neither token.
fn seal(token: &str, next: &str) -> String {
    let pad = successor_pad(token);
    let Ok(next) = URL_SAFE_NO_PAD.decode(next) else {
        return String::new();
    };
    let sealed: Vec<u8> = next.iter().zip(pad.iter()).map(|(a, b)| a ^ b).collect();
    URL_SAFE_NO_PAD.encode(sealed)
}

/// The successor sealed by [`seal`], or `None` if `sealed` is not one.
fn unseal(token: &str, sealed: &str) -> Option<String> {
    let pad = successor_pad(token);
    let sealed = URL_SAFE_NO_PAD.decode(sealed).ok()?;
    if sealed.is_empty() || sealed.len() > pad.len() {
        return None;
    }
    let next: Vec<u8> = sealed.iter().zip(pad.iter()).map(|(a, b)| a ^ b).collect();
    Some(URL_SAFE_NO_PAD.encode(next))
}

fn successor_pad(token: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"wadi refresh successor");
    hasher.update(token.as_bytes());
    hasher.finalize().into()
}

/// A fresh opaque refresh token (128 random bits) and the record that stores its hash.
fn new_refresh_token(
    session_id: Uuid,
    parent_id: Option<Uuid>,
    now: i64,
) -> (String, RefreshTokenRecord) {
    let mut bytes = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut bytes);
    let token = URL_SAFE_NO_PAD.encode(bytes);
    let record = RefreshTokenRecord {
        id: Uuid::now_v7(),
        token_hash: hash_token(&token),
        session_id,
        parent_id,
        revoked: false,
        created_at: now,
        updated_at: now,
        next_token: None,
    };
    (token, record)
}

fn hash_token(token: &str) -> String {
    crate::util::hex(&Sha256::digest(token.as_bytes()))
}

/// argon2id with the crate's default (OWASP) parameters, on a hashing thread.
async fn hash_password(hasher: &Hasher, password: String) -> Result<String, AuthApiError> {
    hasher
        .run(move || {
            let mut salt = [0u8; 16];
            rand_core::OsRng.fill_bytes(&mut salt);
            super::hashing::hash(password.as_bytes(), &salt)
        })
        .await
        .map_err(hash_error)?
        .map_err(AuthApiError::unexpected)
}

async fn verify_password(
    hasher: &Hasher,
    password: String,
    hash: String,
) -> Result<bool, AuthApiError> {
    hasher
        .run(move || super::hashing::verify(password.as_bytes(), &hash))
        .await
        .map_err(hash_error)?
        .map_err(AuthApiError::unexpected)
}

/// A full hashing queue is a rate limit (429, at once); stopped threads are a server failure.
fn hash_error(error: HashError) -> AuthApiError {
    match error {
        HashError::Busy => AuthApiError::rate_limited(),
        HashError::Stopped => AuthApiError::unexpected(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_checked_and_lowercased() {
        assert_eq!(
            normalize_email(" Alice@Example.COM ").unwrap(),
            "alice@example.com"
        );
        for good in [
            "first.last+tag@mail.example.co.uk",
            "o'brien@example.com",
            "x_y-z@sub-domain.example.org",
        ] {
            assert_eq!(normalize_email(good).unwrap(), good);
        }
        for bad in [
            "",
            "alice",
            "alice@",
            "@example.com",
            "a b@example.com",
            "a@b",
            "a@b@c.d",
            "a\u{0}x@example.com",
            "<script>x@example.com",
            "\"quoted\"@example.com",
            "ab@example..com",
            "ab@-example.com",
            "ab@example.com-",
            "ab@exa_mple.com",
            "tab\t@example.com",
            "zoë@example.com",
        ] {
            assert!(normalize_email(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_successor_opens_only_with_the_token_that_sealed_it() {
        let session = Uuid::new_v4();
        let (old, _) = new_refresh_token(session, None, 1);
        let (next, _) = new_refresh_token(session, None, 1);
        let (other, _) = new_refresh_token(session, None, 1);
        let sealed = seal(&old, &next);
        assert_ne!(sealed, next, "never stored in the clear");
        assert_eq!(unseal(&old, &sealed).as_deref(), Some(next.as_str()));
        assert_ne!(unseal(&other, &sealed).as_deref(), Some(next.as_str()));
        assert_eq!(unseal(&old, "!!not base64"), None);
    }

    #[test]
    fn refresh_tokens_are_random_and_stored_hashed() {
        let session = Uuid::new_v4();
        let (a, record_a) = new_refresh_token(session, None, 1);
        let (b, _) = new_refresh_token(session, None, 1);
        assert_ne!(a, b);
        assert!(a.len() >= 22, "at least 128 bits");
        assert_ne!(record_a.token_hash, a);
        assert_eq!(record_a.token_hash, hash_token(&a));
    }
}
