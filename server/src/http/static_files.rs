//! Serves the built web app: real files by path, `index.html` for every other path so that
//! client-side routes survive a reload. A release binary carries the app inside it (built by
//! `cargo xtask dist`); `--web-dir` serves a directory instead (for front-end work).
//!
//! Hashed assets (the build names them `name-<hash>.ext`) are cached for a year; `index.html` is
//! always revalidated. Compression (gzip, brotli) is negotiated by the router's layer.

use std::path::{Path, PathBuf};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    response::{Html, IntoResponse, Response},
};
use tower::ServiceExt;
use tower_http::services::{ServeDir, ServeFile};

use crate::{error::AppError, state::AppState};

/// The web app built into the binary: `dist/` at compile time (empty if it was not built
/// first; `cargo xtask dist` builds it first).
#[derive(rust_embed::Embed)]
#[folder = "../dist"]
#[allow_missing = true]
struct Embedded;

/// Where the web app's files come from.
#[derive(Debug, Clone)]
pub enum WebAssets {
    /// A directory on disk, e.g. `dist/`.
    Dir(PathBuf),
    /// The files built into this binary.
    Embedded,
    /// Nothing was built: serve a page that says how to build it.
    Missing,
}

impl WebAssets {
    /// `configured` if given, else the embedded app if there is one.
    pub fn locate(configured: Option<&Path>) -> Self {
        match configured {
            Some(dir) if dir.join("index.html").is_file() => Self::Dir(dir.to_path_buf()),
            Some(dir) => {
                tracing::warn!(dir = %dir.display(), "web directory has no index.html");
                Self::Missing
            }
            None if Embedded::get("index.html").is_some() => Self::Embedded,
            None => match build_time_dist() {
                Some(dir) => Self::Dir(dir),
                None => Self::Missing,
            },
        }
    }
}

/// In a build with debug assertions rust-embed reads `dist/` at run time, but when `dist/` did
/// not exist yet at compile time (a fresh clone whose server compiled before the web app was
/// built) it refuses every file: it compares each file's canonical path with the folder's path
/// as written, `server/../dist`. Such a binary serves the same folder directly instead.
fn build_time_dist() -> Option<PathBuf> {
    if !cfg!(debug_assertions) {
        return None;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dist")
        .canonicalize()
        .ok()?;
    dir.join("index.html").is_file().then_some(dir)
}

const IMMUTABLE: &str = "public, max-age=31536000, immutable";
const REVALIDATE: &str = "no-cache";

/// True for content-hashed file names (`app-1a2b3c4d5e6f7a8b.js`).
fn is_hashed(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    let stem = name.split('.').next().unwrap_or(name);
    // The wasm file is `name-<hash>_bg.wasm`.
    let stem = stem.trim_end_matches("_bg");
    stem.rsplit_once('-')
        .is_some_and(|(_, hash)| hash.len() >= 8 && hash.chars().all(|c| c.is_ascii_hexdigit()))
}

pub async fn serve(State(state): State<AppState>, request: Request) -> Response {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return AppError::NotFound.into_response();
    }
    let path = request.uri().path().trim_start_matches('/').to_owned();
    let mut response = match state.assets.as_ref() {
        WebAssets::Dir(dir) => {
            let index = ServeFile::new(dir.join("index.html"));
            // No redirect of a directory to its path with a slash: `//name` would be sent to
            // `//name/`, which a browser reads as another host.
            let service = ServeDir::new(dir)
                .append_index_html_on_directories(false)
                .fallback(index);
            match service.oneshot(request).await {
                Ok(response) => response.map(Body::new),
                Err(error) => match error {},
            }
        }
        WebAssets::Embedded => serve_embedded(&path),
        WebAssets::Missing => {
            return (
                StatusCode::OK,
                [(header::CACHE_CONTROL, REVALIDATE)],
                Html(NOT_BUILT_PAGE),
            )
                .into_response();
        }
    };
    let served_index = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"text/html"));
    // The app's routes (`/`, `/c/{id}`) have no dots; a missing file (an asset of an older
    // build, a typo) is a 404, not the app's page with 200.
    let names_a_file = path
        .rsplit('/')
        .next()
        .is_some_and(|name| name.contains('.'));
    if served_index && names_a_file && path != "index.html" {
        return AppError::NotFound.into_response();
    }
    let cache = if is_hashed(&path) && !served_index {
        IMMUTABLE
    } else {
        REVALIDATE
    };
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    response
}

fn serve_embedded(path: &str) -> Response {
    let (file, name) = match Embedded::get(path).filter(|_| !path.is_empty()) {
        Some(file) => (file, path),
        // Client-side routes get the app's page.
        None => match Embedded::get("index.html") {
            Some(file) => (file, "index.html"),
            None => return AppError::NotFound.into_response(),
        },
    };
    let mime = file.metadata.mimetype().to_owned();
    let mime = if name.ends_with(".js") {
        "text/javascript; charset=utf-8".to_owned()
    } else {
        mime
    };
    (
        [(header::CONTENT_TYPE, mime)],
        Body::from(file.data.into_owned()),
    )
        .into_response()
}

const NOT_BUILT_PAGE: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<title>WADI</title></head><body><h1>WADI is running</h1>\
<p>The web app has not been built. Run <code>cargo xtask run</code> from the repository, \
or point <code>WADI_WEB_DIR</code> at a built <code>dist/</code> directory.</p></body></html>";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_hashed_names_are_recognised() {
        assert!(is_hashed("wadi-web-b5516eb625f0c04c_bg.wasm"));
        assert!(is_hashed("wadi-web-b5516eb625f0c04c.js"));
        assert!(is_hashed("style-8d79e167be55f883.css"));
        assert!(is_hashed("start-b5516eb625f0c04c.js"));
        assert!(is_hashed("favicon-2b3596f32f96c75c.svg"));
        assert!(!is_hashed("index.html"));
        assert!(!is_hashed("c/0193-abc"));
        assert!(!is_hashed("favicon.svg"));
    }
}
