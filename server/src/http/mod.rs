//! The HTTP surface: one router per resource, merged here, with the web app as the fallback.

pub mod static_files;

use axum::{Router, routing::get};

use crate::{error::AppError, state::AppState};

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        // Unknown API paths answer JSON 404s, not the web app's index page.
        .route("/api/{*rest}", axum::routing::any(api_not_found))
        .fallback(static_files::serve)
        .with_state(state)
}

/// Liveness: the process is up and serving HTTP.
async fn healthz() -> &'static str {
    "ok"
}

async fn api_not_found() -> AppError {
    AppError::NotFound
}
