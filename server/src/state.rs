//! The state every handler shares: one cheap-to-clone struct of `Arc`s.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::{
    auth::AuthService,
    config::Config,
    http::static_files::WebAssets,
    metrics::Metrics,
    model::{
        ChatModel,
        demo::DemoModel,
        openai::{OpenAiModel, OpenAiSettings},
    },
    runs::{
        Hub,
        task::{RunContext, RunSettings},
    },
    store::Store,
    ws::Registry,
};

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub assets: Arc<WebAssets>,
    pub store: Arc<dyn Store>,
    pub auth: Arc<AuthService>,
    pub model: Arc<dyn ChatModel>,
    pub hub: Arc<Hub>,
    pub clients: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// Messages per user (REST and WebSocket sends alike).
    pub message_limiter: Arc<crate::limits::KeyedLimiter<uuid::Uuid>>,
    run_settings: Arc<RunSettings>,
    /// Cancelled when the server starts shutting down; sockets watch it.
    pub shutdown: CancellationToken,
    /// Every socket's task, so shutdown can wait for their close frames to go out (hyper stops
    /// tracking a connection once it is upgraded).
    pub sockets: tokio_util::task::TaskTracker,
}

impl AppState {
    /// Opens the store (applying migrations) and sets up auth and the model.
    pub async fn new(config: Config) -> anyhow::Result<Self> {
        let store = crate::store::connect(config.database_url.as_deref(), &config.data_dir).await?;
        tracing::info!(engine = store.engine(), "store ready");
        let http = reqwest::Client::builder()
            .user_agent(concat!("wadi/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let auth = crate::auth::AuthService::new(&config, store.clone(), http).await?;
        let model = model_from(&config)?;
        let assets = WebAssets::locate(config.web_dir.as_deref());
        let run_settings = RunSettings {
            system_prompt: config.system_prompt.clone(),
            history_messages: config.history_messages,
            idle_timeout: config.model_idle_timeout,
            flush_interval: config.flush_interval,
            coalesce_window: config.coalesce_window,
            retention: config.run_retention,
        };
        let message_limiter = Arc::new(crate::limits::KeyedLimiter::per_minute(
            config.message_rate_burst,
            config.message_rate_per_minute,
        ));
        Ok(Self {
            config: Arc::new(config),
            assets: Arc::new(assets),
            store,
            auth: Arc::new(auth),
            model,
            hub: Arc::new(Hub::default()),
            clients: Arc::new(Registry::default()),
            metrics: Arc::new(Metrics::new()),
            message_limiter,
            run_settings: Arc::new(run_settings),
            shutdown: CancellationToken::new(),
            sockets: tokio_util::task::TaskTracker::new(),
        })
    }

    /// What a new run task needs.
    pub fn run_context(&self) -> RunContext {
        RunContext {
            store: self.store.clone(),
            model: self.model.clone(),
            metrics: self.metrics.clone(),
            hub: self.hub.clone(),
            settings: self.run_settings.clone(),
        }
    }
}

/// The OpenAI-compatible model when a key or base URL is configured, else the demo model.
fn model_from(config: &Config) -> anyhow::Result<Arc<dyn ChatModel>> {
    if config.openai_api_key.is_none() && config.openai_base_url.is_none() {
        tracing::warn!(
            "no model configured (OPENAI_API_KEY / OPENAI_BASE_URL): using the demo model"
        );
        return Ok(Arc::new(DemoModel::new(config.demo_pace)));
    }
    let base_url = config
        .openai_base_url
        .clone()
        .unwrap_or_else(|| "https://api.openai.com/v1".to_owned());
    tracing::info!(%base_url, model = %config.model, "using an OpenAI-compatible model");
    Ok(Arc::new(OpenAiModel::new(OpenAiSettings {
        base_url,
        api_key: config.openai_api_key.clone(),
        model: config.model.clone(),
        temperature: config.temperature,
        connect_timeout: config.model_connect_timeout,
    })?))
}
