//! The open conversation: history, the streaming answer, the composer, the connection banner.

use leptos::{html, prelude::*};
use uuid::Uuid;

use crate::{
    api::Api,
    app::Shared,
    components::message::{Message, MessageActions, StreamingMessage},
    socket::{self, Action, ChatSignals, Link},
    store::PendingState,
};

/// How close to the bottom (in pixels) still counts as "at the bottom".
const STICK_THRESHOLD: i32 = 48;
/// How close to the top (in pixels) loads the page of history before the first message shown.
const LOAD_OLDER_WITHIN: i32 = 800;
/// Frames during which a message stays put after a page went in above it: the page's messages
/// near the view render in the frames after (their estimated heights become real ones).
const KEEP_IN_PLACE_FRAMES: u32 = 4;
/// Past this many messages the browser skips rendering the ones far from view (`.long`).
const LONG_THREAD: usize = 200;

fn draft_key(id: Uuid) -> String {
    format!("wadi.draft.{id}")
}

fn load_draft(id: Uuid) -> String {
    window()
        .local_storage()
        .ok()
        .flatten()
        .and_then(|s| s.get_item(&draft_key(id)).ok().flatten())
        .unwrap_or_default()
}

/// Drafts survive reloads and an ended session (signing in again brings it back).
fn save_draft(id: Uuid, text: &str) {
    if let Some(storage) = window().local_storage().ok().flatten() {
        let _ = if text.is_empty() {
            storage.remove_item(&draft_key(id))
        } else {
            storage.set_item(&draft_key(id), text)
        };
    }
}

#[component]
pub fn ChatPane(
    /// The conversation shown.
    id: Uuid,
) -> impl IntoView {
    let api = expect_context::<Api>();
    let shared = expect_context::<Shared>();
    let signals = ChatSignals {
        messages: RwSignal::new(Vec::new()),
        streaming: RwSignal::new(None),
        error: RwSignal::new(None),
        link: RwSignal::new(Link::Connecting),
        loaded: RwSignal::new(false),
        older: RwSignal::new(false),
        list_changed: shared.list_changed,
    };
    // Seen: no dot on it in the sidebar.
    shared.unread.update(|unread| {
        unread.remove(&id);
    });
    // Opened from a search hit: on the branch that holds the message, scrolled to it.
    let found = shared
        .open_at
        .get_untracked()
        .filter(|(conversation, _)| *conversation == id)
        .map(|(_, message)| message);
    if found.is_some() {
        shared.open_at.set(None);
    }
    let focus = RwSignal::new(found);
    let driver = StoredValue::new_local(socket::start(api.clone(), id, signals, found));
    let act = move |action: Action| driver.with_value(|d| d.act(action));

    // Reconnect at once when the network or the tab comes back.
    let online = window_event_listener(leptos::ev::online, move |_| act(Action::Wake));
    let visible = window_event_listener(leptos::ev::visibilitychange, move |_| {
        if document().visibility_state() == web_sys::VisibilityState::Visible {
            act(Action::Wake);
        }
    });
    on_cleanup(move || {
        online.remove();
        visible.remove();
    });

    let title = RwSignal::new(String::new());
    // The conversation's model and system prompt (`None`: the server's defaults).
    let model = RwSignal::new(None::<String>);
    let system_prompt = RwSignal::new(None::<String>);
    let models = RwSignal::new(None::<wadi_protocol::api::ModelList>);
    {
        let api = api.clone();
        Effect::new(move |_| {
            shared.list_changed.track();
            let api = api.clone();
            leptos::task::spawn_local(async move {
                if let Ok(conversation) = api.conversation(id).await {
                    title.set(conversation.title);
                    model.set(conversation.model);
                    system_prompt.set(conversation.system_prompt);
                }
            });
        });
    }
    {
        let api = api.clone();
        leptos::task::spawn_local(async move {
            if let Ok(list) = api.models().await {
                models.set(Some(list));
            }
        });
    }
    let update = {
        let api = api.clone();
        StoredValue::new(move |change: wadi_protocol::api::UpdateConversation| {
            let api = api.clone();
            leptos::task::spawn_local(async move {
                match api.update(id, change).await {
                    Ok(conversation) => {
                        model.set(conversation.model);
                        system_prompt.set(conversation.system_prompt);
                    }
                    Err(error) => signals.error.set(Some(error.describe())),
                }
            });
        })
    };
    let prompt_open = RwSignal::new(false);
    let prompt_draft = RwSignal::new(String::new());

    let draft = RwSignal::new(load_draft(id));
    let streaming_text = Signal::derive(move || {
        signals
            .streaming
            .with(|s| s.as_ref().map(|(_, text)| text.clone()).unwrap_or_default())
    });
    let is_streaming = Memo::new(move |_| signals.streaming.with(Option::is_some));
    let sending = Memo::new(move |_| {
        signals.messages.with(|messages| {
            messages
                .iter()
                .any(|m| m.pending == Some(PendingState::Sending))
        })
    });

    let busy = Signal::derive(move || is_streaming.get() || sending.get());
    let edit_request = RwSignal::new(None::<Uuid>);
    // Esc stops the answer being written (an open editor takes Esc for itself).
    let escape = window_event_listener(leptos::ev::keydown, move |event| {
        if event.key() == "Escape" && !event.default_prevented() && is_streaming.get_untracked() {
            act(Action::Stop);
        }
    });
    on_cleanup(move || escape.remove());

    let send = move || {
        let text = draft.get_untracked();
        if text.trim().is_empty() {
            return;
        }
        act(Action::Send(text));
        draft.set(String::new());
        save_draft(id, "");
    };
    let on_key = move |event: leptos::ev::KeyboardEvent| {
        // Enter sends; Shift+Enter is a new line; IME composition is left alone.
        if event.key() == "Enter" && !event.shift_key() && !event.is_composing() {
            event.prevent_default();
            send();
        } else if event.key() == "ArrowUp"
            && draft.with_untracked(String::is_empty)
            && !event.shift_key()
            && !busy.get_untracked()
        {
            // ↑ in an empty composer edits the last message you sent.
            let last = signals.messages.with_untracked(|messages| {
                messages
                    .iter()
                    .rev()
                    .find(|m| m.role == wadi_protocol::api::Role::User && m.pending.is_none())
                    .and_then(|m| m.id)
            });
            if let Some(id) = last {
                event.prevent_default();
                edit_request.set(Some(id));
            }
        }
    };

    // Auto-scroll: follow the answer unless the user scrolled up.
    let scroller = NodeRef::<html::Div>::new();
    let stick = RwSignal::new(true);
    // History loads a page at a time as the user nears the top. While a page is on its way:
    // the key of the first message shown, its element and where it was on screen, to put it
    // back there once the page is in, so what the user reads stays put.
    let loading_older =
        StoredValue::new_local(None::<(Option<String>, Option<web_sys::Element>, f64)>);
    let maybe_load_older = move || {
        let Some(el) = scroller.get_untracked() else {
            return;
        };
        if el.scroll_top() > LOAD_OLDER_WITHIN
            || !signals.older.get_untracked()
            || loading_older.with_value(Option::is_some)
        {
            return;
        }
        let first = signals
            .messages
            .with_untracked(|messages| messages.first().map(|m| m.key.clone()));
        let element = el.query_selector(".message").ok().flatten();
        let top = element
            .as_ref()
            .map_or(0.0, |element| element.get_bounding_client_rect().top());
        loading_older.set_value(Some((first, element, top)));
        act(Action::LoadOlder);
    };
    let on_scroll = move |_| {
        if let Some(el) = scroller.get_untracked() {
            let distance = el.scroll_height() - el.scroll_top() - el.client_height();
            stick.set(distance <= STICK_THRESHOLD);
        }
        maybe_load_older();
    };
    let to_bottom = move || {
        if let Some(el) = scroller.get_untracked() {
            el.set_scroll_top(el.scroll_height());
        }
        // A first page shorter than the screen cannot be scrolled up: load on.
        maybe_load_older();
    };
    // A failed load may be retried.
    Effect::new(move |_| {
        if signals.error.with(Option::is_some) {
            loading_older.set_value(None);
        }
    });
    Effect::new(move |_| {
        signals.messages.track();
        signals.streaming.track();
        let waiting = loading_older.with_value(|loading| {
            loading
                .as_ref()
                .map(|(first, element, top)| (first.clone(), element.clone(), *top))
        });
        if let Some((first, element, top)) = waiting {
            let now_first = signals
                .messages
                .with_untracked(|messages| messages.first().map(|m| m.key.clone()));
            if now_first != first {
                // A page went in above: the message that was first goes back where it was on
                // screen (scroll anchoring may already have put it there; then this is a no-op).
                loading_older.set_value(None);
                if let (Some(el), Some(element)) = (scroller.get_untracked(), element) {
                    keep_in_place(el, element, top, KEEP_IN_PLACE_FRAMES);
                }
                request_animation_frame(maybe_load_older);
                return;
            }
        }
        if let Some(target) = focus.get_untracked() {
            // A found message: scrolled into view and marked once it is shown.
            let shown = signals
                .messages
                .with_untracked(|messages| messages.iter().any(|m| m.id == Some(target)));
            if shown {
                focus.set(None);
                stick.set(false);
                request_animation_frame(move || {
                    if let Ok(Some(element)) =
                        document().query_selector(&format!("[data-id=\"{target}\"]"))
                    {
                        element.scroll_into_view();
                        let _ = element.class_list().add_1("found");
                    }
                });
            }
            return;
        }
        if stick.get_untracked() {
            request_animation_frame(to_bottom);
        }
    });
    // A search hit in the conversation already open: switch to its branch.
    Effect::new(move |_| {
        if let Some((conversation, target)) = shared.open_at.get()
            && conversation == id
        {
            shared.open_at.set(None);
            focus.set(Some(target));
            act(Action::ShowBranch(target));
        }
    });

    // Copy buttons in code blocks, by delegation.
    let on_click = move |event: leptos::ev::MouseEvent| {
        use wasm_bindgen::JsCast;
        let Some(target) = event
            .target()
            .and_then(|t| t.dyn_into::<web_sys::Element>().ok())
        else {
            return;
        };
        let Ok(Some(button)) = target.closest("button.copy") else {
            return;
        };
        let code = button
            .parent_element()
            .and_then(|block| block.query_selector("pre").ok().flatten())
            .and_then(|pre| pre.text_content())
            .unwrap_or_default();
        crate::clipboard::copy(&code);
        button.set_text_content(Some("Copied"));
    };

    let export = {
        let api = api.clone();
        StoredValue::new(move |format: &'static str| {
            let api = api.clone();
            // The branch shown ends at its last stored message.
            let through = signals
                .messages
                .with_untracked(|messages| messages.iter().rev().find_map(|m| m.id));
            leptos::task::spawn_local(async move {
                match api.export(id, format, through).await {
                    Ok((name, text)) => save_file(&name, &text, format),
                    Err(error) => signals.error.set(Some(error.describe())),
                }
            });
        })
    };
    let actions = MessageActions {
        retry: Callback::new(move |key: String| act(Action::Retry(key))),
        regenerate: Callback::new(move |id: Uuid| act(Action::Regenerate(id))),
        edit: Callback::new(move |(id, text): (Uuid, String)| act(Action::Edit(id, text))),
        branch: Callback::new(move |id: Uuid| act(Action::ShowBranch(id))),
        cancel: Callback::new(move |key: String| act(Action::Cancel(key))),
        edit_request,
        busy,
    };

    view! {
        <section class="chat" aria-label="Conversation">
            <header class="chat-head">
                <button
                    class="menu-toggle"
                    aria-label="Show conversations"
                    on:click=move |_| shared.sidebar_open.update(|open| *open = !*open)
                >
                    "☰"
                </button>
                <h2 class="title">{move || title.get()}</h2>
                {move || {
                    models
                        .get()
                        .filter(|list| list.models.len() > 1)
                        .map(|list| {
                            let chosen = model.get().unwrap_or_else(|| list.default.clone());
                            let default = list.default.clone();
                            view! {
                                <select
                                    class="model"
                                    aria-label="Model"
                                    title="The model that answers in this conversation"
                                    on:change=move |ev| {
                                        let picked = event_target_value(&ev);
                                        let value = if picked == default { String::new() } else { picked };
                                        update.with_value(|f| f(wadi_protocol::api::UpdateConversation {
                                            model: Some(value),
                                            ..Default::default()
                                        }));
                                    }
                                >
                                    {list
                                        .models
                                        .into_iter()
                                        .map(|name| {
                                            let selected = name == chosen;
                                            view! { <option value=name.clone() selected=selected>{name.clone()}</option> }
                                        })
                                        .collect_view()}
                                </select>
                            }
                        })
                }}
                <button
                    class="icon prompt-toggle"
                    class:set=move || system_prompt.with(Option::is_some)
                    aria-expanded=move || prompt_open.get().to_string()
                    title="The instructions the model gets before this conversation"
                    on:click=move |_| {
                        prompt_draft.set(system_prompt.get_untracked().unwrap_or_default());
                        prompt_open.update(|open| *open = !*open);
                    }
                >
                    "System prompt"
                </button>
                <details class="export">
                    <summary aria-label="Export conversation">"Export"</summary>
                    <div class="menu">
                        <button class="icon" on:click=move |_| export.with_value(|f| f("markdown"))>
                            "Markdown (this branch)"
                        </button>
                        <button class="icon" on:click=move |_| export.with_value(|f| f("json"))>
                            "JSON (every branch)"
                        </button>
                    </div>
                </details>
            </header>
            <Show when=move || prompt_open.get()>
                <form
                    class="system-prompt"
                    on:submit=move |event: leptos::ev::SubmitEvent| {
                        event.prevent_default();
                        prompt_open.set(false);
                        update.with_value(|f| f(wadi_protocol::api::UpdateConversation {
                            system_prompt: Some(prompt_draft.get_untracked()),
                            ..Default::default()
                        }));
                    }
                >
                    <textarea
                        aria-label="System prompt"
                        placeholder="Instructions for the model in this conversation (empty: the server's default)"
                        prop:value=move || prompt_draft.get()
                        on:input=move |ev| prompt_draft.set(event_target_value(&ev))
                    ></textarea>
                    <div class="edit-actions">
                        <button type="button" class="link" on:click=move |_| prompt_open.set(false)>
                            "Cancel"
                        </button>
                        <button type="submit" class="primary">"Save"</button>
                    </div>
                </form>
            </Show>
            <Banner link=signals.link />
            <div
                class="messages"
                class:long=move || signals.messages.with(|m| m.len() > LONG_THREAD)
                node_ref=scroller
                on:scroll=on_scroll
                on:click=on_click
            >
                {move || {
                    (!signals.loaded.get())
                        .then(|| view! { <p class="muted loading">"Loading…"</p> })
                }}
                {move || {
                    signals
                        .older
                        .get()
                        .then(|| view! { <p class="muted older">"Loading earlier messages…"</p> })
                }}
                <For
                    each=move || signals.messages.get()
                    key=|m| m.render_key()
                    children=move |message| view! { <Message message actions /> }
                />
                <Show when=move || is_streaming.get()>
                    <StreamingMessage text=streaming_text />
                </Show>
                {move || {
                    signals
                        .error
                        .get()
                        .map(|error| {
                            view! {
                                <div class="error in-place" role="alert">
                                    {error}
                                    " "
                                    <button class="link" on:click=move |_| act(Action::Wake)>
                                        "Retry"
                                    </button>
                                </div>
                            }
                        })
                }}
            </div>
            <Show when=move || !stick.get()>
                <button
                    class="jump"
                    on:click=move |_| {
                        stick.set(true);
                        to_bottom();
                    }
                >
                    "↓ Jump to latest"
                </button>
            </Show>
            <form
                class="composer"
                on:submit=move |event: leptos::ev::SubmitEvent| {
                    event.prevent_default();
                    send();
                }
            >
                <textarea
                    aria-label="Message"
                    placeholder=move || {
                        if is_streaming.get() {
                            "Message WADI… (sent when this answer ends)"
                        } else {
                            "Message WADI…"
                        }
                    }
                    title="Enter sends; Shift+Enter starts a new line"
                    rows="2"
                    prop:value=move || draft.get()
                    on:input=move |ev| {
                        let text = event_target_value(&ev);
                        save_draft(id, &text);
                        draft.set(text);
                    }
                    on:keydown=on_key
                ></textarea>
                <Show
                    when=move || is_streaming.get()
                    fallback=move || {
                        view! {
                            <button
                                class="primary send"
                                type="submit"
                                disabled=move || draft.with(|d| d.trim().is_empty()) || sending.get()
                            >
                                "Send"
                            </button>
                        }
                    }
                >
                    <button class="stop" type="button" on:click=move |_| act(Action::Stop)>
                        "■ Stop"
                    </button>
                </Show>
            </form>
        </section>
    }
}

/// Offers `text` as a download named `name`.
fn save_file(name: &str, text: &str, format: &str) {
    use wasm_bindgen::JsCast;
    let parts = js_sys::Array::of1(&wasm_bindgen::JsValue::from_str(text));
    let options = web_sys::BlobPropertyBag::new();
    options.set_type(if format == "json" {
        "application/json"
    } else {
        "text/markdown"
    });
    let Ok(blob) = web_sys::Blob::new_with_str_sequence_and_options(&parts, &options) else {
        return;
    };
    let Ok(url) = web_sys::Url::create_object_url_with_blob(&blob) else {
        return;
    };
    if let Ok(link) = document().create_element("a")
        && let Ok(link) = link.dyn_into::<web_sys::HtmlAnchorElement>()
    {
        link.set_href(&url);
        link.set_download(name);
        link.click();
    }
    let _ = web_sys::Url::revoke_object_url(&url);
}

/// Shown while the socket is not connected.
#[component]
fn Banner(
    /// The socket's state.
    link: RwSignal<Link>,
) -> impl IntoView {
    move || {
        let text = match link.get() {
            Link::Online => return None,
            Link::Connecting => "Connecting…",
            Link::Reconnecting => "Connection lost. Reconnecting…",
            Link::Fallback => "Live connection unavailable: messages are sent over HTTP.",
        };
        Some(view! { <div class="banner" role="status">{text}</div> })
    }
}

/// Scrolls `list` so that `element` is `top` pixels from the top of the viewport, on this
/// animation frame and the `frames - 1` after it.
fn keep_in_place(list: web_sys::HtmlDivElement, element: web_sys::Element, top: f64, frames: u32) {
    if frames == 0 {
        return;
    }
    request_animation_frame(move || {
        let moved = element.get_bounding_client_rect().top() - top;
        if moved.abs() >= 0.5 {
            list.set_scroll_top(list.scroll_top() + moved.round() as i32);
        }
        keep_in_place(list, element, top, frames - 1);
    });
}
