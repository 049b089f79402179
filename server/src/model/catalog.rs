//! Which models users may pick: `--model` (the default) and `--models`, a fixed list or `*`
//! for whatever the provider lists (asked at most every 10 minutes; the last good answer, or
//! just the default, while it cannot be asked).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;
use wadi_protocol::ErrorCode;

use super::{ChatModel, ProviderSettings};
use crate::error::AppError;

/// How long the provider's list is trusted.
const LIST_TTL: Duration = Duration::from_secs(600);
/// How soon a failed listing is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(30);

pub struct Catalog {
    model: Arc<dyn ChatModel>,
    /// `None`: ask the provider (`*`).
    fixed: Option<Vec<String>>,
    listed: Mutex<Listed>,
    asking: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Listed {
    names: Vec<String>,
    /// When the list may be asked for again.
    fresh_until: Option<Instant>,
}

impl Catalog {
    pub fn new(model: Arc<dyn ChatModel>, settings: &ProviderSettings) -> Self {
        let default = model.name().to_owned();
        let fixed = if model.is_demo() {
            Some(vec![default])
        } else if settings.models.iter().any(|name| name.trim() == "*") {
            None
        } else {
            let mut names = vec![default];
            for name in &settings.models {
                let name = name.trim();
                if !name.is_empty() && !names.iter().any(|known| known == name) {
                    names.push(name.to_owned());
                }
            }
            Some(names)
        };
        Self {
            model,
            fixed,
            listed: Mutex::default(),
            asking: tokio::sync::Mutex::new(()),
        }
    }

    /// The default model (new conversations use it).
    pub fn default_model(&self) -> &str {
        self.model.name()
    }

    /// The models users may pick, the default first.
    pub async fn models(&self) -> Vec<String> {
        let Some(fixed) = &self.fixed else {
            return self.listed().await;
        };
        fixed.clone()
    }

    /// `Ok` if `name` may be picked, else `invalid_request` naming the choices.
    pub async fn check(&self, name: &str) -> Result<(), AppError> {
        let models = self.models().await;
        if models.iter().any(|model| model == name) {
            Ok(())
        } else {
            Err(AppError::invalid(
                ErrorCode::InvalidRequest,
                format!(
                    "unknown model {name:?}; the choices are {}",
                    models.join(", ")
                ),
            ))
        }
    }

    async fn listed(&self) -> Vec<String> {
        let cached = |this: &Self| {
            let listed = crate::util::lock(&this.listed);
            let fresh = listed
                .fresh_until
                .is_some_and(|until| Instant::now() < until);
            (fresh, this.with_default(&listed.names))
        };
        let (fresh, names) = cached(self);
        if fresh {
            return names;
        }
        // One caller asks; the others wait for its answer.
        let _asking = self.asking.lock().await;
        let (fresh, names) = cached(self);
        if fresh {
            return names;
        }
        let answer = self.model.list().await;
        let mut listed = crate::util::lock(&self.listed);
        match answer {
            Ok(names) => {
                listed.names = names;
                listed.fresh_until = Some(Instant::now() + LIST_TTL);
            }
            Err(error) => {
                tracing::warn!(%error, detail = error.detail(), "cannot list the provider's models");
                listed.fresh_until = Some(Instant::now() + RETRY_AFTER);
            }
        }
        self.with_default(&listed.names)
    }

    fn with_default(&self, names: &[String]) -> Vec<String> {
        let default = self.model.name();
        std::iter::once(default.to_owned())
            .chain(names.iter().filter(|name| *name != default).cloned())
            .collect()
    }
}
