//! The `wadi` binary: parse the configuration, set up logging, bind, and hand over to
//! [`wadi_server::run`].

use anyhow::Context;
use wadi_server::config::{Cli, Command, Config, ConfigCommand, LogFormat};

fn main() -> anyhow::Result<()> {
    let loaded = Cli::load_or_exit();
    let config = loaded.cli.config.clone();
    match loaded.cli.command.clone() {
        None | Some(Command::Serve) => runtime()?.block_on(async {
            let exporter = init_tracing(
                config.log_format,
                "info,tower_http=warn,sqlx=warn",
                config
                    .otlp_endpoint
                    .as_deref()
                    .map(|endpoint| (endpoint, config.otlp_service_name.as_str())),
            );
            let served = serve(config).await;
            if let Some(exporter) = exporter {
                exporter.flush(std::time::Duration::from_secs(5)).await;
            }
            served
        }),
        Some(Command::Config(ConfigCommand::Print)) => {
            print!("{}", loaded.print());
            Ok(())
        }
        Some(Command::Config(ConfigCommand::Table)) => {
            print!("{}", wadi_server::config::settings_table());
            Ok(())
        }
        Some(Command::Admin(command)) => {
            init_tracing(config.log_format, "warn,sqlx=error", None);
            runtime()?.block_on(async {
                let stdin = std::io::stdin();
                let mut input = stdin.lock();
                let mut out = std::io::stdout();
                let read_only = command.is_read_only();
                let done = wadi_server::admin::run(command, &config, &mut input, &mut out).await;
                // A listing piped into a reader that stopped (`| head`): the reader has what it
                // wanted.
                match done {
                    Err(error)
                        if read_only
                            && error.chain().any(|cause| {
                                cause
                                    .downcast_ref::<std::io::Error>()
                                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
                            }) =>
                    {
                        Ok(())
                    }
                    done => done,
                }
            })
        }
        Some(Command::Healthcheck) => wadi_server::admin::healthcheck(config.addr),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.addr))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    wadi_server::run_notifying(config, listener, shutdown_signal(), move || {
        // Printed plainly as well as logged, once it serves, so `cargo xtask run` users (and the
        // harnesses that start it) see where to go.
        println!("WADI is running at http://{addr}/");
    })
    .await
}

/// Logs to standard error (standard output carries what commands print), filtered by
/// `RUST_LOG` or `default_filter`; with an OTLP endpoint (and service name), spans are exported
/// there too (call inside the runtime).
fn init_tracing(
    format: LogFormat,
    default_filter: &str,
    otlp: Option<(&str, &str)>,
) -> Option<wadi_server::telemetry::Exporter> {
    use tracing_subscriber::{EnvFilter, fmt, layer::SubscriberExt, util::SubscriberInitExt};
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let (otlp, exporter) = match otlp {
        Some((endpoint, service)) => {
            let (layer, exporter) = wadi_server::telemetry::otlp(endpoint, service);
            (Some(layer), Some(exporter))
        }
        None => (None, None),
    };
    let registry = tracing_subscriber::registry().with(filter).with(otlp);
    let logs = fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => registry.with(logs).init(),
        LogFormat::Json => registry.with(logs.json()).init(),
    }
    exporter
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}
