//! The root component.

use leptos::prelude::*;
use wadi_protocol::PROTOCOL_VERSION;

/// The whole app. Later issues fill in sign-in, the sidebar and the chat view.
#[component]
pub fn App() -> impl IntoView {
    view! {
        <main class="app">
            <h1>"WADI"</h1>
            <p class="muted">{format!("protocol v{PROTOCOL_VERSION}")}</p>
        </main>
    }
}
