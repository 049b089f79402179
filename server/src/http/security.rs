//! Security headers on every response, and the Content-Security-Policy of the web app.
//!
//! The app renders model output as HTML (sanitised Markdown), so the page runs under a strict
//! policy: scripts and WebAssembly only from this origin (the app's page has no inline script;
//! a page built otherwise may, each allowed by its hash, computed from the served `index.html`
//! at start); no inline styles;
//! connections only to this origin and the configured Supabase project; never framed. A
//! violation is reported to `/api/csp-report`, logged and counted
//! (`wadi_csp_violations_total`).

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{Request, State},
    http::{HeaderName, HeaderValue, StatusCode, header},
    middleware::Next,
    response::Response,
};
use base64::{Engine, engine::general_purpose::STANDARD};
use sha2::{Digest, Sha256};

use crate::{config::Config, state::AppState};

/// Where browsers report violations.
pub const REPORT_PATH: &str = "/api/csp-report";

/// The headers every response gets.
#[derive(Clone)]
pub struct SecurityHeaders {
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl SecurityHeaders {
    /// The policy for this configuration, allowing the inline scripts of `index_html`.
    pub fn new(config: &Config, index_html: Option<&str>) -> Self {
        let mut scripts = String::from("'self' 'wasm-unsafe-eval'");
        for hash in index_html.map(inline_script_hashes).unwrap_or_default() {
            scripts.push_str(&format!(" 'sha256-{hash}'"));
        }
        let mut connect = String::from("'self'");
        if let Some(origin) = config.auth.supabase_url.as_deref().and_then(origin_of) {
            connect.push(' ');
            connect.push_str(&origin);
        }
        let policy = format!(
            "default-src 'none'; script-src {scripts}; style-src 'self'; img-src 'self' data:; \
             font-src 'self'; manifest-src 'self'; connect-src {connect}; \
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

/// `POST /api/csp-report`: a browser reporting a violation of the policy.
pub async fn report(State(state): State<AppState>, body: Bytes) -> StatusCode {
    state.metrics.csp_violations.inc();
    let text = String::from_utf8_lossy(&body);
    let text: String = text.chars().take(2048).collect();
    tracing::warn!(report = %text, "Content-Security-Policy violation reported");
    StatusCode::NO_CONTENT
}

/// The base64 SHA-256 of the content of every `<script>` in `html` without a `src`.
fn inline_script_hashes(html: &str) -> Vec<String> {
    let mut hashes = Vec::new();
    let mut rest = html;
    while let Some(open) = rest.find("<script") {
        let after = &rest[open..];
        let Some(tag_end) = after.find('>') else {
            break;
        };
        let tag = &after[..tag_end];
        let body_start = &after[tag_end + 1..];
        let Some(close) = body_start.find("</script>") else {
            break;
        };
        if !tag.contains("src=") {
            let digest = Sha256::digest(&body_start.as_bytes()[..close]);
            hashes.push(STANDARD.encode(digest));
        }
        rest = &body_start[close..];
    }
    hashes
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
    fn inline_scripts_are_hashed_and_external_ones_are_not() {
        let html = "<head><script type=\"module\" src=\"/a.js\"></script>\
                    <script type=\"module\">init();</script></head>";
        let expected = STANDARD.encode(Sha256::digest(b"init();"));
        assert_eq!(inline_script_hashes(html), vec![expected]);
        assert!(inline_script_hashes("<p>no scripts</p>").is_empty());
    }

    #[test]
    fn the_policy_allows_supabase_and_https_gets_hsts() {
        let mut config = Config::for_tests("data".into());
        config.auth.supabase_url = Some("https://abc.supabase.co/".into());
        config.public_url = Some("https://chat.example.com".into());
        let security = SecurityHeaders::new(&config, Some("<script>x()</script>"));
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
        assert!(csp.contains("'sha256-"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert!(
            security
                .headers
                .iter()
                .any(|(name, _)| name == header::STRICT_TRANSPORT_SECURITY)
        );
    }
}
