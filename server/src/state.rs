//! The state every handler shares: one cheap-to-clone struct of `Arc`s.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::{config::Config, http::static_files::WebAssets};

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub assets: Arc<WebAssets>,
    /// Cancelled when the server starts shutting down; long-lived tasks watch it.
    pub shutdown: CancellationToken,
}

impl AppState {
    pub fn new(config: Config) -> anyhow::Result<Self> {
        let assets = WebAssets::locate(config.web_dir.as_deref());
        Ok(Self {
            config: Arc::new(config),
            assets: Arc::new(assets),
            shutdown: CancellationToken::new(),
        })
    }
}
