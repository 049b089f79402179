//! The root: load the server's client config, then show sign-in or the signed-in shell.

use leptos::prelude::*;
use uuid::Uuid;

use crate::{
    api::{self, Api},
    auth::Auth,
    components::{chat::ChatPane, search::SearchDialog, sidebar::Sidebar, sign_in::SignIn},
    route::{Route, Router},
};

#[component]
pub fn App() -> impl IntoView {
    let config = LocalResource::new(api::config);
    view! {
        <Suspense fallback=|| view! { <div class="splash" aria-busy="true">"Loading…"</div> }>
            {move || {
                config
                    .get()
                    .map(|config| match config {
                        Ok(config) => view! { <Signed config /> }.into_any(),
                        Err(error) => {
                            view! {
                                <div class="splash error" role="alert">
                                    <p>{error.describe()}</p>
                                    <button on:click=move |_| config_reload()>"Retry"</button>
                                </div>
                            }
                                .into_any()
                        }
                    })
            }}
        </Suspense>
    }
}

fn config_reload() {
    let _ = window().location().reload();
}

/// Sign-in until there is a session, then the app.
#[component]
fn Signed(config: wadi_protocol::api::ClientConfig) -> impl IntoView {
    let auth = Auth::new(config);
    provide_context(auth.clone());
    let signed_in = Memo::new(move |_| auth.session.with(Option::is_some));
    view! {
        <Show when=move || signed_in.get() fallback=|| view! { <SignIn /> }>
            <Shell />
        </Show>
    }
}

/// Shared state of the signed-in app.
#[derive(Clone, Copy)]
pub struct Shared {
    pub router: Router,
    /// Bumped when the conversation list should be reloaded.
    pub list_changed: RwSignal<u64>,
    /// The sidebar is open (phone-sized screens).
    pub sidebar_open: RwSignal<bool>,
    /// The search dialog is open.
    pub search_open: RwSignal<bool>,
    /// A message to show (a search hit), with its conversation: that conversation opens on the
    /// message's branch, scrolled to it.
    pub open_at: RwSignal<Option<(Uuid, Uuid)>>,
    /// Conversations whose answer finished while another one was open (the sidebar's dots).
    pub unread: RwSignal<std::collections::HashSet<Uuid>>,
}

#[component]
fn Shell() -> impl IntoView {
    let auth = expect_context::<Auth>();
    let api = Api { auth };
    provide_context(api.clone());
    let api = StoredValue::new(api);
    let shared = Shared {
        router: Router::new(),
        list_changed: RwSignal::new(0),
        sidebar_open: RwSignal::new(false),
        search_open: RwSignal::new(false),
        open_at: RwSignal::new(None),
        unread: RwSignal::new(std::collections::HashSet::new()),
    };
    provide_context(shared);
    let route = shared.router.route;
    // Ctrl+Shift+O (⌘⇧O on a Mac) starts a new conversation, wherever you are; Ctrl+K (⌘K)
    // searches.
    let new_chat = window_event_listener(leptos::ev::keydown, move |event| {
        let command = event.ctrl_key() || event.meta_key();
        if command && event.shift_key() && event.key().eq_ignore_ascii_case("o") {
            event.prevent_default();
            start_conversation(api.get_value(), shared, None);
        } else if command && !event.shift_key() && event.key().eq_ignore_ascii_case("k") {
            // Ctrl+K (⌘K): search.
            event.prevent_default();
            shared.search_open.update(|open| *open = !*open);
        }
    });
    on_cleanup(move || new_chat.remove());
    view! {
        <div class="shell" class:sidebar-open=move || shared.sidebar_open.get()>
            <Sidebar />
            <Show when=move || shared.search_open.get()>
                <SearchDialog />
            </Show>
            <main class="main">
                {move || match route.get() {
                    Route::Conversation(id) => view! { <ChatPane id /> }.into_any(),
                    Route::Home => view! { <Welcome /> }.into_any(),
                }}
            </main>
        </div>
    }
}

/// Creates a conversation and opens it; a failure shows in `error` when given.
pub fn start_conversation(api: Api, shared: Shared, error: Option<RwSignal<Option<String>>>) {
    leptos::task::spawn_local(async move {
        match api.create_conversation().await {
            Ok(conversation) => {
                shared.list_changed.update(|v| *v += 1);
                shared.sidebar_open.set(false);
                shared.router.navigate(Route::Conversation(conversation.id));
            }
            Err(e) => {
                if let Some(error) = error {
                    error.set(Some(e.describe()));
                }
            }
        }
    });
}

/// The empty state: start a conversation.
#[component]
fn Welcome() -> impl IntoView {
    let shared = expect_context::<Shared>();
    let api = expect_context::<Api>();
    let config = api.auth.config.clone();
    let error = RwSignal::new(None::<String>);
    let start = move |_| start_conversation(api.clone(), shared, Some(error));
    view! {
        <div class="welcome">
            <button
                class="menu-toggle"
                aria-label="Show conversations"
                on:click=move |_| shared.sidebar_open.update(|open| *open = !*open)
            >
                "☰"
            </button>
            <h1>"WADI"</h1>
            <p class="muted">"Pick a conversation, or start a new one."</p>
            <button class="primary" on:click=start>"New conversation"</button>
            {config
                .demo_model
                .then(|| {
                    view! {
                        <p class="demo-note">
                            "No AI model is configured: a demo model answers. Set OPENAI_API_KEY or OPENAI_BASE_URL on the server to use a real one."
                        </p>
                    }
                })}
            {move || error.get().map(|e| view! { <p class="error" role="alert">{e}</p> })}
        </div>
    }
}
