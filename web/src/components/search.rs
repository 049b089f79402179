//! Search (Ctrl/Cmd+K): the user's conversation titles and messages, matches marked; a hit
//! opens its conversation on the branch that holds it, scrolled to it.

use leptos::{html, prelude::*};
use wadi_protocol::api::{Highlight, Role, SearchResults};

use crate::{api::Api, app::Shared, route::Route};

/// Time after the last keystroke before searching.
const DEBOUNCE_MS: u32 = 180;

#[component]
pub fn SearchDialog() -> impl IntoView {
    let api = expect_context::<Api>();
    let shared = expect_context::<Shared>();
    let query = RwSignal::new(String::new());
    let results = RwSignal::new(None::<SearchResults>);
    let error = RwSignal::new(None::<String>);
    let searching = RwSignal::new(false);
    // Each keystroke bumps the generation; a search whose generation is stale is dropped.
    let generation = StoredValue::new(0_u64);
    let input = NodeRef::<html::Input>::new();
    Effect::new(move |_| {
        if let Some(input) = input.get() {
            let _ = input.focus();
        }
    });
    let close = move || shared.search_open.set(false);
    let on_input = {
        let api = api.clone();
        move |ev| {
            let text = event_target_value(&ev);
            query.set(text.clone());
            generation.update_value(|g| *g += 1);
            let mine = generation.get_value();
            let api = api.clone();
            leptos::task::spawn_local(async move {
                gloo_timers::future::TimeoutFuture::new(DEBOUNCE_MS).await;
                if generation.get_value() != mine {
                    return;
                }
                if !text.chars().any(char::is_alphanumeric) {
                    results.set(None);
                    error.set(None);
                    return;
                }
                searching.set(true);
                let found = api.search(&text, None).await;
                if generation.get_value() != mine {
                    return;
                }
                searching.set(false);
                match found {
                    Ok(found) => {
                        error.set(None);
                        results.set(Some(found));
                    }
                    Err(e) => error.set(Some(e.describe())),
                }
            });
        }
    };
    let open = move |conversation: uuid::Uuid, message: Option<uuid::Uuid>| {
        shared
            .open_at
            .set(message.map(|message| (conversation, message)));
        shared.search_open.set(false);
        shared.sidebar_open.set(false);
        shared.router.navigate(Route::Conversation(conversation));
    };
    let on_key = move |event: leptos::ev::KeyboardEvent| {
        match event.key().as_str() {
            "Escape" => {
                event.prevent_default();
                event.stop_propagation();
                close();
            }
            // Enter opens the first hit.
            "Enter" => {
                let first = results.with_untracked(|found| {
                    found.as_ref().and_then(|found| {
                        found
                            .messages
                            .first()
                            .map(|hit| (hit.conversation_id, Some(hit.message_id)))
                            .or_else(|| {
                                found
                                    .conversations
                                    .first()
                                    .map(|hit| (hit.conversation_id, None))
                            })
                    })
                });
                if let Some((conversation, message)) = first {
                    event.prevent_default();
                    open(conversation, message);
                }
            }
            _ => {}
        }
    };
    view! {
        <div class="search-backdrop" on:click=move |_| close()>
            <div
                class="search"
                role="dialog"
                aria-label="Search conversations"
                on:click=|event: leptos::ev::MouseEvent| event.stop_propagation()
            >
                <input
                    node_ref=input
                    type="search"
                    aria-label="Search"
                    placeholder="Search your conversations…"
                    prop:value=move || query.get()
                    on:input=on_input
                    on:keydown=on_key
                />
                <div class="results" aria-live="polite">
                    {move || error.get().map(|e| view! { <p class="error">{e}</p> })}
                    {move || {
                        results
                            .get()
                            .map(|found| {
                                if found.conversations.is_empty() && found.messages.is_empty() {
                                    return view! { <p class="muted empty">"Nothing found."</p> }.into_any();
                                }
                                let titles = found
                                    .conversations
                                    .into_iter()
                                    .map(|hit| {
                                        let id = hit.conversation_id;
                                        view! {
                                            <button class="hit title-hit" on:click=move |_| open(id, None)>
                                                <span class="where">"Conversation"</span>
                                                <span class="text">{marked(hit.title)}</span>
                                            </button>
                                        }
                                    })
                                    .collect_view();
                                let messages = found
                                    .messages
                                    .into_iter()
                                    .map(|hit| {
                                        let (id, message) = (hit.conversation_id, hit.message_id);
                                        let who = match hit.role {
                                            Role::User => "You",
                                            _ => "Answer",
                                        };
                                        view! {
                                            <button class="hit message-hit" on:click=move |_| open(id, Some(message))>
                                                <span class="where">{format!("{} · {who}", hit.conversation_title)}</span>
                                                <span class="text">{marked(hit.snippet)}</span>
                                            </button>
                                        }
                                    })
                                    .collect_view();
                                view! { {titles} {messages} }.into_any()
                            })
                    }}
                    {move || searching.get().then(|| view! { <p class="muted">"Searching…"</p> })}
                </div>
                <p class="hint muted">"Enter opens the first result · Esc closes"</p>
            </div>
        </div>
    }
}

/// The pieces of a title or snippet, matches in `<mark>` (as text: nothing is parsed as HTML).
fn marked(pieces: Vec<Highlight>) -> impl IntoView {
    pieces
        .into_iter()
        .map(|piece| {
            if piece.hit {
                view! { <mark>{piece.text}</mark> }.into_any()
            } else {
                view! { <span>{piece.text}</span> }.into_any()
            }
        })
        .collect_view()
}
