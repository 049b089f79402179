//! Users and conversations for a benchmark, through the REST API (`/auth/v1/signup`,
//! `/api/conversations`), or a token given on the command line for servers with other auth.

use anyhow::{Context, Result, bail};
use futures_util::{StreamExt, TryStreamExt};
use serde::Deserialize;
use serde_json::json;

use crate::stamp::now_micros;

/// Requests in flight while setting up.
const SETUP_CONCURRENCY: usize = 16;

/// A conversation and the access token of its owner: what a chat socket needs.
#[derive(Debug, Clone)]
pub struct Seat {
    pub token: String,
    pub conversation: String,
}

#[derive(Deserialize)]
struct Session {
    access_token: String,
}

#[derive(Deserialize)]
struct Created {
    id: String,
}

pub struct Setup {
    http: reqwest::Client,
    base: String,
}

impl Setup {
    /// `base` is the server's HTTP URL without a trailing slash.
    pub fn new(base: &str) -> Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder().build()?,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    /// Signs up a fresh user and returns its access token.
    pub async fn signup(&self) -> Result<String> {
        let email = format!(
            "bench-{}-{}@bench.invalid",
            std::process::id(),
            now_micros()
        );
        let response = self
            .http
            .post(format!("{}/auth/v1/signup", self.base))
            .json(&json!({"email": email, "password": "bench-password"}))
            .send()
            .await
            .context("signup request failed")?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!(
                "signup answered {status}: {body:.300} (start the server with \
                 WADI_AUTH_RATE_BURST=1000000 for benchmarks)"
            );
        }
        Ok(response.json::<Session>().await?.access_token)
    }

    async fn conversation(&self, token: &str) -> Result<String> {
        let response = self
            .http
            .post(format!("{}/api/conversations", self.base))
            .bearer_auth(token)
            .json(&json!({}))
            .send()
            .await
            .context("conversation request failed")?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("creating a conversation answered {status}: {body:.300}");
        }
        Ok(response.json::<Created>().await?.id)
    }

    /// Access tokens of `users` fresh users, or just `token` when one is given. Sign up once
    /// per scenario: each signup hashes a password (argon2, ~19 MiB), which the server's
    /// allocator keeps afterwards and would show as RSS growth.
    pub async fn tokens(&self, token: Option<&str>, users: usize) -> Result<Vec<String>> {
        if let Some(token) = token {
            return Ok(vec![token.to_owned()]);
        }
        let mut tokens = Vec::new();
        for _ in 0..users.max(1) {
            tokens.push(self.signup().await?);
        }
        Ok(tokens)
    }

    /// `conversations` new conversations spread over the users of `tokens`.
    pub async fn seats(&self, tokens: &[String], conversations: usize) -> Result<Vec<Seat>> {
        if tokens.is_empty() {
            bail!("no user to create conversations for");
        }
        futures_util::stream::iter(0..conversations)
            .map(|index| {
                let token = tokens[index % tokens.len()].clone();
                async move {
                    let conversation = self.conversation(&token).await?;
                    anyhow::Ok(Seat {
                        token,
                        conversation,
                    })
                }
            })
            .buffered(SETUP_CONCURRENCY)
            .try_collect()
            .await
    }
}
