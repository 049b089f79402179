//! Two routes, kept in the URL so reload and back/forward work: `/` and `/c/{conversationId}`.

use leptos::prelude::*;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Home,
    Conversation(Uuid),
}

impl Route {
    pub fn parse(path: &str) -> Self {
        path.strip_prefix("/c/")
            .and_then(|id| Uuid::parse_str(id.trim_end_matches('/')).ok())
            .map_or(Self::Home, Self::Conversation)
    }

    pub fn path(self) -> String {
        match self {
            Self::Home => "/".to_owned(),
            Self::Conversation(id) => format!("/c/{id}"),
        }
    }
}

/// The current route, as a signal that follows back/forward.
#[derive(Clone, Copy)]
pub struct Router {
    pub route: RwSignal<Route>,
}

impl Router {
    pub fn new() -> Self {
        let initial = Route::parse(&location_pathname().unwrap_or_default());
        let route = RwSignal::new(initial);
        let handle = window_event_listener(leptos::ev::popstate, move |_| {
            route.set(Route::parse(&location_pathname().unwrap_or_default()));
        });
        on_cleanup(move || handle.remove());
        Self { route }
    }

    /// Goes to `to`, adding a history entry.
    pub fn navigate(self, to: Route) {
        if self.route.get_untracked() == to {
            return;
        }
        if let Ok(history) = window().history() {
            let _ = history.push_state_with_url(&wasm_bindgen::JsValue::NULL, "", Some(&to.path()));
        }
        self.route.set(to);
    }

    /// Goes to `to` without a history entry (e.g. away from a deleted conversation).
    pub fn replace(self, to: Route) {
        if let Ok(history) = window().history() {
            let _ =
                history.replace_state_with_url(&wasm_bindgen::JsValue::NULL, "", Some(&to.path()));
        }
        self.route.set(to);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip() {
        let id = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
        assert_eq!(
            Route::parse(&Route::Conversation(id).path()),
            Route::Conversation(id)
        );
        assert_eq!(Route::parse("/"), Route::Home);
        assert_eq!(Route::parse("/c/not-an-id"), Route::Home);
        assert_eq!(Route::parse(&format!("/c/{id}/")), Route::Conversation(id));
    }
}
