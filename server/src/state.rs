//! The state every handler shares: one cheap-to-clone struct of `Arc`s, with substates
//! (`State<Arc<Runs>>`, …) for handlers that need only one part.

use std::sync::Arc;

use axum::extract::FromRef;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::AuthService,
    config::{Config, SecretUrl},
    http::static_files::WebAssets,
    ids::InstanceId,
    limits::{Rate, SharedLimit, SharedRates, Unshared},
    metrics::Metrics,
    model::{ChatModel, demo::DemoModel, openai::OpenAiModel},
    runs::{Cluster, Local, Runs, redis::RedisCluster},
    store::Store,
    ws::Registry,
};

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub assets: Arc<WebAssets>,
    pub store: Arc<dyn Store>,
    pub auth: Arc<AuthService>,
    pub runs: Arc<Runs>,
    /// The models conversations may pick.
    pub models: Arc<crate::model::catalog::Catalog>,
    pub clients: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// Conversations created per user, on every instance.
    pub conversation_limiter: Arc<SharedLimit<crate::ids::UserId>>,
    /// CSP reports logged (the route is public; past the budget they are only counted).
    pub csp_log_budget: Arc<std::sync::Mutex<crate::limits::TokenBucket>>,
    /// Cancelled when the server starts shutting down. Open sockets are then told through
    /// their inbox (`Registry::shut_down`); a socket checks it once when it starts.
    pub shutdown: CancellationToken,
    /// Every socket's task, so shutdown can wait for their close frames to go out (hyper stops
    /// tracking a connection once it is upgraded).
    pub sockets: tokio_util::task::TaskTracker,
}

impl FromRef<AppState> for Arc<Runs> {
    fn from_ref(state: &AppState) -> Self {
        state.runs.clone()
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A service it needs (the database, Redis) does not answer yet: worth retrying.
    #[error("{0:#}")]
    Unreachable(anyhow::Error),
    /// The configuration cannot work: retrying would not help.
    #[error("{0:#}")]
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for StartError {
    fn from(error: anyhow::Error) -> Self {
        Self::Fatal(error)
    }
}

impl From<crate::store::StoreError> for StartError {
    fn from(error: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match error {
            // A DATABASE_URL that does not parse is not a database that does not answer: no
            // retry will mend it.
            StoreError::Database(sqlx::Error::Configuration(_)) => Self::Fatal(error.into()),
            StoreError::Database(_) | StoreError::Full => Self::Unreachable(error.into()),
            other => Self::Fatal(other.into()),
        }
    }
}

impl AppState {
    /// Opens the store (applying migrations), joins the cluster when `REDIS_URL` is set, and
    /// sets up auth and the model.
    pub async fn new(config: Config) -> Result<Self, StartError> {
        let store = crate::store::connect(
            config.database_url.as_ref().map(SecretUrl::expose),
            &config.data_dir,
        )
        .await
        .map_err(|error| match (&error, &config.database_url) {
            // A local file that cannot be opened will not fix itself.
            (_, None) => StartError::Fatal(error.into()),
            _ => error.into(),
        })?;
        tracing::info!(engine = store.engine(), "store ready");
        if config.redis_url.is_some() && store.engine() != "postgres" {
            return Err(StartError::Fatal(anyhow::anyhow!(
                "REDIS_URL turns on cluster mode, which needs a Postgres DATABASE_URL that every \
                 instance shares; SQLite is one process's file (unset REDIS_URL, or set \
                 DATABASE_URL=postgres://…)"
            )));
        }
        let instance = InstanceId::new();
        let mode = if config.redis_url.is_some() {
            "redis"
        } else {
            "local"
        };
        let mut metrics = Metrics::new();
        metrics.set_instance(&instance.to_string(), mode);
        let metrics = Arc::new(metrics);
        let (cluster, rates, events): (Arc<dyn Cluster>, Arc<dyn SharedRates>, _) =
            match &config.redis_url {
                Some(url) => {
                    let (cluster, events) =
                        RedisCluster::connect(url.expose(), instance, metrics.clone())
                            .await
                            .map_err(|error| {
                                StartError::Unreachable(anyhow::anyhow!(
                                    "cannot use Redis at REDIS_URL: {error}"
                                ))
                            })?;
                    tracing::info!("cluster mode: runs and rate limits are shared through Redis");
                    (cluster.clone(), cluster, Some(events))
                }
                None => (Arc::new(Local), Arc::new(Unshared), None),
            };
        let http = reqwest::Client::builder()
            .user_agent(concat!("wadi/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| StartError::Fatal(error.into()))?;
        let clock = crate::util::Clock::system();
        let auth =
            crate::auth::AuthService::new(&config, store.clone(), http, clock, rates.clone())
                .await?;
        let model = model_from(&config).map_err(StartError::Fatal)?;
        let models = Arc::new(crate::model::catalog::Catalog::new(
            model.clone(),
            &config.provider,
        ));
        let assets = WebAssets::locate(config.web_dir.as_deref());
        let settings = config.runs.clone();
        let clients = Arc::new(Registry::default());
        let runs = Runs::new(
            crate::runs::Parts {
                instance,
                store: store.clone(),
                model,
                metrics: metrics.clone(),
                settings,
                cluster,
                rates: rates.clone(),
                sockets: clients.clone(),
            },
            events,
        );
        let conversation_limiter = Arc::new(SharedLimit::new(
            "conversations",
            Rate::per_minute(
                config.runs.conversation_rate_burst,
                config.runs.conversation_rate_per_minute,
            ),
            rates,
        ));
        Ok(Self {
            conversation_limiter,
            csp_log_budget: Arc::new(std::sync::Mutex::new(
                crate::http::security::report_log_budget(),
            )),
            config: Arc::new(config),
            assets: Arc::new(assets),
            store,
            auth: Arc::new(auth),
            runs,
            models,
            clients,
            metrics,
            shutdown: CancellationToken::new(),
            sockets: tokio_util::task::TaskTracker::new(),
        })
    }
}

/// The OpenAI-compatible model when a key or base URL is configured, else the demo model.
fn model_from(config: &Config) -> anyhow::Result<Arc<dyn ChatModel>> {
    let provider = &config.provider;
    if provider.openai_api_key.is_none() && provider.openai_base_url.is_none() {
        tracing::warn!(
            "no model configured (OPENAI_API_KEY / OPENAI_BASE_URL): using the demo model"
        );
        return Ok(Arc::new(DemoModel::new(provider.demo_pace)));
    }
    tracing::info!(
        base_url = %provider.base_url(),
        model = %provider.model,
        "using an OpenAI-compatible model"
    );
    Ok(Arc::new(OpenAiModel::new(provider)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_database_url_that_does_not_parse_is_fatal_not_retried() {
        // An unencoded `?` in the password makes the rest a query and the port invalid.
        let error = crate::store::connect(
            Some("postgres://u:p?x@127.0.0.1:1/db"),
            std::path::Path::new("."),
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(StartError::from(error), StartError::Fatal(_)));
    }
}
