//! WADI's server. [`run`] is the whole server; `main.rs` only parses configuration and binds.

pub mod auth;
pub mod config;
pub mod content;
pub mod dto;
pub mod error;
pub mod fuzzing;
pub mod http;
pub mod ids;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod net;
pub mod runs;
pub mod state;
pub mod store;
pub mod util;
pub mod ws;

use std::{future::Future, net::SocketAddr};

use axum::serve::ListenerExt;
use tokio::net::TcpListener;

pub use config::Config;
pub use state::AppState;

/// Kernel send buffer per socket. Linux autotunes it up to 4 MiB, which a client that stopped
/// reading can pin in kernel memory; 256 KiB is plenty for streaming text.
const SOCKET_SEND_BUFFER: usize = 256 * 1024;

/// Serves WADI on `listener` until `shutdown` resolves. Then: active runs are stopped and saved
/// as `interrupted` (up to the shutdown grace period), sockets are closed with 1001, in-flight
/// requests finish, and it returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = AppState::new(config).await?;
    let recovered = state.runs.recover().await?;
    if recovered > 0 {
        tracing::warn!(
            runs = recovered,
            "saved runs a stopped process left streaming as interrupted"
        );
    }
    state.runs.keep_alive(state.shutdown.clone());
    tracing::info!(
        instance = %state.runs.instance,
        cluster = state.runs.cluster.mode(),
        "instance ready"
    );
    if let Some(addr) = state.config.metrics_addr {
        let metrics = TcpListener::bind(addr)
            .await
            .map_err(|error| anyhow::anyhow!("cannot listen for metrics on {addr}: {error}"))?;
        tracing::info!(addr = %metrics.local_addr()?, "metrics on their own listener");
        let router = http::metrics_router(state.clone());
        let stop = state.shutdown.clone();
        tokio::spawn(async move {
            let serving = axum::serve(metrics, router)
                .with_graceful_shutdown(async move { stop.cancelled().await });
            if let Err(error) = serving.await {
                tracing::error!(%error, "the metrics listener failed");
            }
        });
    }
    let app = http::router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let listener = listener.tap_io(|tcp| {
        // Tokens are small and latency matters more than packet count.
        let _ = tcp.set_nodelay(true);
        let _ = socket2::SockRef::from(&*tcp).set_send_buffer_size(SOCKET_SEND_BUFFER);
    });
    let stopping = state.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: stopping active runs");
            let grace = stopping.config.shutdown_grace;
            if !stopping.runs.shut_down(grace).await {
                tracing::warn!("some runs did not save within the grace period");
            }
            stopping.shutdown.cancel();
        })
        .await?;
    // Sockets were told (1001) when the token was cancelled; let their last frames go out.
    state.sockets.close();
    if tokio::time::timeout(state.config.shutdown_grace, state.sockets.wait())
        .await
        .is_err()
    {
        tracing::warn!("some sockets did not close within the grace period");
    }
    tracing::info!("server stopped");
    Ok(())
}
