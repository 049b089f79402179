//! The session: sign up, sign in, sign out and token refresh against the Supabase-compatible auth
//! service the server announces (its own, or a Supabase project). The session lives in
//! `localStorage`, so a reload keeps you signed in, and other tabs pick up refreshed tokens.

use std::sync::Arc;

use futures::lock::Mutex;
use gloo_net::http::Request;
use leptos::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use wadi_protocol::api::ClientConfig;

use crate::store::timing;

const STORAGE_KEY: &str = "wadi.session";

/// What we keep of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub access_token: String,
    pub refresh_token: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// When we received it (Unix seconds), to know the token's lifetime.
    pub issued_at: i64,
    pub user_id: String,
    pub email: String,
}

/// The session ended (refresh refused, or signed out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedOut;

/// The auth service's answer shapes we read.
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    refresh_token: String,
    #[serde(default)]
    expires_in: i64,
    #[serde(default)]
    expires_at: Option<i64>,
    user: UserResponse,
}

#[derive(Deserialize)]
struct UserResponse {
    id: String,
    #[serde(default)]
    email: String,
}

#[derive(Deserialize)]
struct ErrorResponse {
    #[serde(default)]
    code: Option<serde_json::Value>,
    #[serde(default)]
    error_code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    msg: Option<String>,
}

pub fn now() -> i64 {
    (js_sys::Date::now() / 1000.0) as i64
}

#[derive(Clone)]
pub struct Auth {
    pub config: Arc<ClientConfig>,
    pub session: RwSignal<Option<Session>>,
    /// One refresh at a time: concurrent callers wait and reuse its result.
    refreshing: Arc<Mutex<()>>,
}

fn storage() -> Option<web_sys::Storage> {
    web_sys::window()?.local_storage().ok()?
}

fn load() -> Option<Session> {
    let text = storage()?.get_item(STORAGE_KEY).ok()??;
    serde_json::from_str(&text).ok()
}

fn save(session: Option<&Session>) {
    let Some(storage) = storage() else { return };
    let _ = match session {
        Some(session) => match serde_json::to_string(session) {
            Ok(text) => storage.set_item(STORAGE_KEY, &text),
            Err(_) => Ok(()),
        },
        None => storage.remove_item(STORAGE_KEY),
    };
}

impl Auth {
    pub fn new(config: ClientConfig) -> Self {
        let auth = Self {
            config: Arc::new(config),
            session: RwSignal::new(load()),
            refreshing: Arc::new(Mutex::new(())),
        };
        // Another tab refreshed or signed out: follow it.
        let session = auth.session;
        let handle = window_event_listener(leptos::ev::storage, move |event| {
            if event.key().as_deref() == Some(STORAGE_KEY) {
                session.set(load());
            }
        });
        on_cleanup(move || handle.remove());
        auth
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.config.auth_url.trim_end_matches('/'))
    }

    fn request(&self, builder: gloo_net::http::RequestBuilder) -> gloo_net::http::RequestBuilder {
        let builder = builder.header("X-Supabase-Api-Version", "2024-01-01");
        if self.config.anon_key.is_empty() {
            builder
        } else {
            builder.header("apikey", &self.config.anon_key)
        }
    }

    fn store(&self, session: Option<Session>) {
        save(session.as_ref());
        self.session.set(session);
    }

    /// The session ended server-side (a 401 with a token we believed valid).
    pub fn expire(&self) {
        self.store(None);
    }

    pub fn current(&self) -> Option<Session> {
        self.session.get_untracked()
    }

    /// An access token good for at least the refresh margin, refreshing first if needed.
    pub async fn valid_token(&self) -> Result<String, SignedOut> {
        let session = self.current().ok_or(SignedOut)?;
        if timing::needs_refresh(session.issued_at, session.expires_at, now()) {
            self.refresh().await?;
        }
        self.current().map(|s| s.access_token).ok_or(SignedOut)
    }

    /// Refreshes the session. A refusal (the refresh token is dead) signs out; a network
    /// failure keeps the session so a later attempt can succeed.
    pub async fn refresh(&self) -> Result<(), SignedOut> {
        let before = self.current().ok_or(SignedOut)?;
        let _guard = self.refreshing.lock().await;
        // Someone refreshed while we waited: nothing to do.
        match self.current() {
            Some(current) if current.access_token != before.access_token => return Ok(()),
            None => return Err(SignedOut),
            _ => {}
        }
        let request = self
            .request(Request::post(&self.url("/token?grant_type=refresh_token")))
            .json(&json!({ "refresh_token": before.refresh_token }));
        let Ok(request) = request else {
            return Err(SignedOut);
        };
        match request.send().await {
            Ok(response) if response.ok() => match response.json::<TokenResponse>().await {
                Ok(token) => {
                    self.store(Some(session_of(token)));
                    Ok(())
                }
                Err(_) => Ok(()),
            },
            // 4xx: the refresh token was refused; the session is over. (Not 408 or 429: those
            // say "later", not "no".)
            Ok(response)
                if (400..500).contains(&response.status())
                    && !matches!(response.status(), 408 | 429) =>
            {
                self.store(None);
                Err(SignedOut)
            }
            // 5xx, 408, 429 or network: keep the session, try again later.
            _ => Ok(()),
        }
    }

    pub async fn sign_in(&self, email: &str, password: &str) -> Result<(), String> {
        self.token_request(
            "/token?grant_type=password",
            json!({ "email": email, "password": password }),
        )
        .await
    }

    pub async fn sign_up(&self, email: &str, password: &str) -> Result<(), String> {
        self.token_request("/signup", json!({ "email": email, "password": password }))
            .await
    }

    async fn token_request(&self, path: &str, body: serde_json::Value) -> Result<(), String> {
        let request = self
            .request(Request::post(&self.url(path)))
            .json(&body)
            .map_err(|e| e.to_string())?;
        let response = request
            .send()
            .await
            .map_err(|_| "Cannot reach the server. Check your connection.".to_owned())?;
        if response.ok() {
            let token: TokenResponse = response
                .json()
                .await
                .map_err(|_| "Check your inbox to confirm your email, then sign in.".to_owned())?;
            self.store(Some(session_of(token)));
            return Ok(());
        }
        let error: Option<ErrorResponse> = response.json().await.ok();
        Err(describe_auth_error(error))
    }

    /// Ends this session on the server (best effort) and here.
    pub async fn sign_out(&self) {
        if let Some(session) = self.current() {
            let request = self
                .request(Request::post(&self.url("/logout?scope=local")))
                .header("Authorization", &format!("Bearer {}", session.access_token));
            let _ = request.send().await;
        }
        self.store(None);
    }
}

fn session_of(token: TokenResponse) -> Session {
    let issued_at = now();
    Session {
        expires_at: token
            .expires_at
            .unwrap_or(issued_at + token.expires_in.max(0)),
        issued_at,
        access_token: token.access_token,
        refresh_token: token.refresh_token,
        user_id: token.user.id,
        email: token.user.email,
    }
}

/// The auth service's error, in words a person understands.
fn describe_auth_error(error: Option<ErrorResponse>) -> String {
    let Some(error) = error else {
        return "Something went wrong. Try again.".into();
    };
    let code = error
        .code
        .as_ref()
        .and_then(|c| c.as_str().map(str::to_owned))
        .or(error.error_code)
        .unwrap_or_default();
    let message = error.message.or(error.msg).unwrap_or_default();
    match code.as_str() {
        "invalid_credentials" => "Wrong email or password.".into(),
        "user_already_exists" => {
            "An account with this email exists already. Sign in instead.".into()
        }
        "weak_password" => format!("Choose a stronger password. {message}"),
        "over_request_rate_limit" => "Too many attempts. Wait a minute and try again.".into(),
        "email_not_confirmed" => "Confirm your email first (check your inbox).".into(),
        "validation_failed" if message.contains("email") => "Enter a valid email address.".into(),
        _ if !message.is_empty() => message,
        _ => "Something went wrong. Try again.".into(),
    }
}
