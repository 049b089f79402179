//! WADI's server. [`run`] is the whole server; `main.rs` only parses configuration and binds.

pub mod auth;
pub mod config;
pub mod error;
pub mod http;
pub mod limits;
pub mod runs;
pub mod state;
pub mod store;
pub mod util;

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
    let state = AppState::new(config).await?;
    let app =
        http::router(state.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>();
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
