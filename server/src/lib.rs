//! WADI's server. [`run`] is the whole server; `main.rs` only parses configuration and binds.

pub mod config;
pub mod error;
pub mod http;
pub mod state;

use std::future::Future;

use tokio::net::TcpListener;

pub use config::Config;
pub use state::AppState;

/// Serves WADI on `listener` until `shutdown` resolves, then stops accepting, lets in-flight
/// requests finish and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = AppState::new(config)?;
    let app = http::router(state.clone());
    let stopping = state.shutdown.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            stopping.cancel();
        })
        .await?;
    tracing::info!("server stopped");
    Ok(())
}
