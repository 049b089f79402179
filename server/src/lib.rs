//! WADI's server. [`run`] is the whole server; `main.rs` only parses configuration and binds.

pub mod admin;
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
pub mod telemetry;
pub mod util;
pub mod ws;

use std::{
    future::{Future, IntoFuture},
    net::SocketAddr,
    sync::{Arc, OnceLock},
};

use axum::serve::ListenerExt;
use state::StartError;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use state::AppState;

/// Kernel send buffer per socket. Linux autotunes it up to 4 MiB, which a client that stopped
/// reading can pin in kernel memory; 256 KiB is plenty for streaming text.
const SOCKET_SEND_BUFFER: usize = 256 * 1024;

/// How long to wait before trying again to reach the database (or Redis) at startup, at most.
const START_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves WADI on `listener` until `shutdown` resolves. Until its database (and Redis) answer,
/// it serves `/healthz`, a `/readyz` that says why it is not ready, and `503 unavailable` for
/// everything else, and keeps trying: an outage at startup needs no restart. Once started:
/// when `shutdown` resolves, active runs are stopped and saved as `interrupted` (up to the
/// shutdown grace period), sockets are closed with 1001, in-flight requests finish, and it
/// returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_notifying(config, listener, shutdown, || {}).await
}

/// [`run`], calling `started` once the server serves its app (its database answered).
pub async fn run_notifying(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    started: impl FnOnce() + Send,
) -> anyhow::Result<()> {
    let app: Arc<OnceLock<axum::Router>> = Arc::default();
    let ready: Arc<OnceLock<AppState>> = Arc::default();
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.cancel();
        }
    });
    let listener = listener.tap_io(|tcp| {
        // Tokens are small and latency matters more than packet count.
        let _ = tcp.set_nodelay(true);
        let _ = socket2::SockRef::from(&*tcp).set_send_buffer_size(SOCKET_SEND_BUFFER);
    });
    let front = http::front(app.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let serving = tokio::spawn({
        let stop = stop.clone();
        let ready = ready.clone();
        axum::serve(listener, front)
            .with_graceful_shutdown(async move {
                stop.cancelled().await;
                let Some(state) = ready.get() else {
                    return;
                };
                tracing::info!("shutting down: stopping active runs");
                let grace = state.config.shutdown_grace;
                if !state.runs.shut_down(grace).await {
                    tracing::warn!("some runs did not save within the grace period");
                }
                state.shutdown.cancel();
                state.clients.shut_down();
            })
            .into_future()
    });

    let mut delay = std::time::Duration::from_millis(200);
    let state = loop {
        match start(config.clone()).await {
            Ok(state) => break state,
            Err(StartError::Fatal(error)) => {
                stop.cancel();
                let _ = serving.await;
                return Err(error);
            }
            Err(StartError::Unreachable(error)) => {
                tracing::error!(
                    error = %format!("{error:#}"),
                    retry_in = ?delay,
                    "cannot start yet: a service WADI needs does not answer; retrying"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => {
                        let _ = serving.await;
                        return Ok(());
                    }
                }
                delay = (delay * 2).min(START_RETRY_MAX);
            }
        }
    };
    if let Some(addr) = state.config.metrics_addr {
        let metrics = TcpListener::bind(addr)
            .await
            .map_err(|error| anyhow::anyhow!("cannot listen for metrics on {addr}: {error}"))?;
        tracing::info!(addr = %metrics.local_addr()?, "metrics on their own listener");
        let router = http::metrics_router(state.clone());
        let stopped = state.shutdown.clone();
        tokio::spawn(async move {
            let serving = axum::serve(metrics, router)
                .with_graceful_shutdown(async move { stopped.cancelled().await });
            if let Err(error) = serving.await {
                tracing::error!(%error, "the metrics listener failed");
            }
        });
    }
    let _ = ready.set(state.clone());
    let _ = app.set(http::router(state.clone()));
    started();
    serving.await??;
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

/// Builds the state and recovers what earlier processes left.
async fn start(config: Config) -> Result<AppState, StartError> {
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
    Ok(state)
}
