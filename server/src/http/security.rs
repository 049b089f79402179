//! Security headers on every response, and the Content-Security-Policy of the web app.
//!
//! The app renders model output as HTML (sanitised Markdown), so the page runs under a strict
//! policy: scripts and WebAssembly only from this origin, no inline scripts (the app's page
//! starts it from a file), no inline styles; connections only to this origin and the configured
//! Supabase project; never framed. A violation is reported to `/api/csp-report`, logged and
//! counted (`wadi_csp_violations_total`).

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{Request, State, rejection::BytesRejection},
    http::{HeaderName, HeaderValue, StatusCode, header},
    middleware::Next,
    response::Response,
};

use wadi_protocol::ErrorCode;

use crate::{config::Config, error::AppError, limits::TokenBucket, state::AppState};

/// Where browsers report violations.
pub const REPORT_PATH: &str = "/api/csp-report";

/// The headers every response gets.
#[derive(Clone)]
pub struct SecurityHeaders {
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl SecurityHeaders {
    /// The policy for this configuration.
    pub fn new(config: &Config) -> Self {
        let mut connect = String::from("'self'");
        if let Some(origin) = config.auth.supabase_url.as_deref().and_then(origin_of) {
            connect.push(' ');
            connect.push_str(&origin);
        }
        let policy = format!(
            "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; \
             img-src 'self' data:; font-src 'self'; manifest-src 'self'; connect-src {connect}; \
             frame-ancestors 'none'; base-uri 'none'; form-action 'self'; \
             report-uri {REPORT_PATH}"
        );
        let mut headers = vec![
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        ];
        if let Ok(policy) = HeaderValue::from_str(&policy) {
            headers.push((header::CONTENT_SECURITY_POLICY, policy));
        }
        let https = config
            .public_url
            .as_deref()
            .is_some_and(|url| url.starts_with("https://"));
        if https {
            headers.push((
                header::STRICT_TRANSPORT_SECURITY,
                HeaderValue::from_static("max-age=31536000"),
            ));
        }
        Self { headers }
    }
}

/// Adds the headers to every response (a handler's own, if it set one, wins).
pub async fn layer(
    State(security): State<Arc<SecurityHeaders>>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in &security.headers {
        if !headers.contains_key(name) {
            headers.insert(name.clone(), value.clone());
        }
    }
    response
}

/// Reports logged at most, in a burst and then per minute, whoever sends them: the route is
/// public and each report is a log line of up to 2 KiB, so without a budget anyone could fill
/// the log. Every report is counted all the same.
const LOGGED_BURST: u32 = 20;
const LOGGED_PER_MINUTE: f64 = 20.0;

pub fn report_log_budget() -> TokenBucket {
    TokenBucket::new(LOGGED_BURST, LOGGED_PER_MINUTE / 60.0)
}

/// `POST /api/csp-report`: a browser reporting a violation of the policy (a JSON document;
/// anything else is `invalid_json` and not counted).
pub async fn report(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, AppError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            AppError::TooLarge("the report is too large".into())
        } else {
            AppError::invalid(ErrorCode::InvalidJson, rejection.body_text())
        }
    })?;
    serde_json::from_slice::<serde::de::IgnoredAny>(&body).map_err(|error| {
        AppError::invalid(ErrorCode::InvalidJson, format!("not a report: {error}"))
    })?;
    state.metrics.csp_violations.inc();
    let logged = crate::util::lock(&state.csp_log_budget).try_take();
    if logged {
        let text = String::from_utf8_lossy(&body);
        let text: String = text.chars().take(2048).collect();
        tracing::warn!(report = %text, "Content-Security-Policy violation reported");
    } else {
        state.metrics.csp_reports_unlogged.inc();
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `https://x.supabase.co/any/path` → `https://x.supabase.co`.
fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.split(['/', '?', '#']).next()?;
    (!host.is_empty()).then(|| format!("{scheme}://{host}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_allows_supabase_and_https_gets_hsts() {
        let mut config = Config::for_tests("data".into());
        config.auth.supabase_url = Some("https://abc.supabase.co/".into());
        config.public_url = Some("https://chat.example.com".into());
        let security = SecurityHeaders::new(&config);
        let csp = security
            .headers
            .iter()
            .find(|(name, _)| name == header::CONTENT_SECURITY_POLICY)
            .map(|(_, value)| value.to_str().unwrap().to_owned())
            .unwrap();
        assert!(
            csp.contains("connect-src 'self' https://abc.supabase.co;"),
            "{csp}"
        );
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        // No inline script at all: the web app's page starts it from a file.
        assert!(
            csp.contains("script-src 'self' 'wasm-unsafe-eval';"),
            "{csp}"
        );
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert!(
            security
                .headers
                .iter()
                .any(|(name, _)| name == header::STRICT_TRANSPORT_SECURITY)
        );
    }
}
