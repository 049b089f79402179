//! The state every handler shares: one cheap-to-clone struct of `Arc`s.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::{auth::AuthService, config::Config, http::static_files::WebAssets, store::Store};

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub assets: Arc<WebAssets>,
    pub store: Arc<dyn Store>,
    pub auth: Arc<AuthService>,
    /// Cancelled when the server starts shutting down; long-lived tasks watch it.
    pub shutdown: CancellationToken,
}

impl AppState {
    /// Opens the store (applying migrations) and sets up auth.
    pub async fn new(config: Config) -> anyhow::Result<Self> {
        let store = crate::store::connect(config.database_url.as_deref(), &config.data_dir).await?;
        tracing::info!(engine = store.engine(), "store ready");
        let http = reqwest::Client::builder()
            .user_agent(concat!("wadi/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let auth = crate::auth::AuthService::new(&config, store.clone(), http).await?;
        let assets = WebAssets::locate(config.web_dir.as_deref());
        Ok(Self {
            config: Arc::new(config),
            assets: Arc::new(assets),
            store,
            auth: Arc::new(auth),
            shutdown: CancellationToken::new(),
        })
    }
}
