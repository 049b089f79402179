//! Serves the built web app: real files by path, `index.html` for every other path so that
//! client-side routes survive a reload.

use std::path::{Path, PathBuf};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{Method, StatusCode, header},
    response::{Html, IntoResponse, Response},
};
use tower::ServiceExt;
use tower_http::services::{ServeDir, ServeFile};

use crate::{error::AppError, state::AppState};

/// Where the web app's files come from.
#[derive(Debug, Clone)]
pub enum WebAssets {
    /// A directory on disk, e.g. trunk's `dist/`.
    Dir(PathBuf),
    /// Nothing was built: serve a page that says how to build it.
    Missing,
}

impl WebAssets {
    /// Uses `configured` if given, else `./dist` when it holds a built app.
    pub fn locate(configured: Option<&Path>) -> Self {
        let dir = match configured {
            Some(dir) => dir.to_path_buf(),
            None => PathBuf::from("dist"),
        };
        if dir.join("index.html").is_file() {
            Self::Dir(dir)
        } else {
            if configured.is_some() {
                tracing::warn!(dir = %dir.display(), "web directory has no index.html");
            }
            Self::Missing
        }
    }
}

pub async fn serve(State(state): State<AppState>, request: Request) -> Response {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return AppError::NotFound.into_response();
    }
    match state.assets.as_ref() {
        WebAssets::Dir(dir) => {
            let index = ServeFile::new(dir.join("index.html"));
            let service = ServeDir::new(dir).fallback(index);
            match service.oneshot(request).await {
                Ok(response) => response.map(Body::new),
                Err(error) => match error {},
            }
        }
        WebAssets::Missing => (
            StatusCode::OK,
            [(header::CACHE_CONTROL, "no-store")],
            Html(NOT_BUILT_PAGE),
        )
            .into_response(),
    }
}

const NOT_BUILT_PAGE: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<title>WADI</title></head><body><h1>WADI is running</h1>\
<p>The web app has not been built. Run <code>cargo xtask run</code> from the repository, \
or point <code>WADI_WEB_DIR</code> at a built <code>dist/</code> directory.</p></body></html>";
