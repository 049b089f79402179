//! One message bubble. Answers are Markdown, rendered safely (see `crate::markdown`); the
//! answer still streaming re-renders at most once per animation frame.

use leptos::prelude::*;
use wadi_protocol::{RunStatus, api::Role};

use crate::{
    markdown,
    store::{MessageView, PendingState},
};

/// A committed (or pending) message. Its content never changes once shown, so it renders once.
#[component]
pub fn Message(
    /// The message to show.
    message: MessageView,
    /// Called with the client message id when the user retries a failed send.
    on_retry: Callback<String>,
) -> impl IntoView {
    let role = match message.role {
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::System => "system",
    };
    let body = match message.role {
        Role::Assistant => {
            let html = markdown::render(&message.content);
            view! { <div class="content markdown" inner_html=html></div> }.into_any()
        }
        _ => view! { <div class="content plain">{message.content.clone()}</div> }.into_any(),
    };
    let status = message.status.and_then(|status| match status {
        RunStatus::Stopped => Some("Stopped"),
        RunStatus::Failed => Some("The model failed; this is what it wrote"),
        RunStatus::Interrupted => Some("Interrupted by a server restart"),
        _ => None,
    });
    let key = message.key.clone();
    let pending = match message.pending {
        Some(PendingState::Sending) => {
            Some(view! { <span class="note" aria-live="polite">"Sending…"</span> }.into_any())
        }
        Some(PendingState::Failed(reason)) => Some(
            view! {
                <span class="note error" role="alert">
                    {reason}
                    " "
                    <button class="link" on:click=move |_| on_retry.run(key.clone())>
                        "Retry"
                    </button>
                </span>
            }
            .into_any(),
        ),
        None => None,
    };
    view! {
        <article class=format!("message {role}") data-role=role>
            {body}
            {status.map(|s| view! { <span class="note">{s}</span> })}
            {pending}
        </article>
    }
}

/// The answer being written: its Markdown follows the streamed text.
#[component]
pub fn StreamingMessage(
    /// The text streamed so far (updated at most once per animation frame).
    text: Signal<String>,
) -> impl IntoView {
    view! {
        <article class="message assistant streaming" data-role="assistant" aria-busy="true">
            <div class="content markdown" inner_html=move || markdown::render(&text.get())></div>
            <span class="cursor" aria-hidden="true"></span>
        </article>
    }
}
