//! The conversation list: newest first, more loaded as you scroll, with new, rename, delete and
//! sign out.

use leptos::{prelude::*, task::spawn_local};
use uuid::Uuid;
use wadi_protocol::{ConversationChange, ServerMessage, api::Conversation};

use crate::{api::Api, app::Shared, route::Route, user_socket};

#[component]
pub fn Sidebar() -> impl IntoView {
    let api = expect_context::<Api>();
    let shared = expect_context::<Shared>();
    let items = RwSignal::new(Vec::<Conversation>::new());
    let cursor = RwSignal::new(None::<String>);
    let loading = RwSignal::new(false);
    let error = RwSignal::new(None::<String>);

    // Each load of the first page bumps the generation, and an answer is applied only if no
    // newer load started meanwhile: two quick changes start two loads whose answers can arrive
    // in either order, and the older one would put a stale list back. (`try_get_value`: the
    // sidebar may be gone by then, on sign-out.)
    let generation = StoredValue::new(0_u64);
    // (Re)load the first page whenever the list may have changed.
    let load_first = {
        let api = api.clone();
        move || {
            let api = api.clone();
            generation.update_value(|g| *g += 1);
            let mine = generation.get_value();
            spawn_local(async move {
                loading.set(true);
                let page = api.conversations(None).await;
                if generation.try_get_value() != Some(mine) {
                    return;
                }
                match page {
                    Ok(page) => {
                        items.set(page.items);
                        cursor.set(page.next_cursor);
                        error.set(None);
                    }
                    Err(e) => error.set(Some(e.describe())),
                }
                loading.set(false);
            });
        }
    };
    Effect::new({
        let load_first = load_first.clone();
        move |_| {
            shared.list_changed.track();
            load_first();
        }
    });
    // Live: what changes in any tab or device (through the user socket) reloads the list; an
    // answer finished in a conversation not open here gets a dot.
    let live = user_socket::start(api.clone(), move |frame| {
        if let Some(ServerMessage::Conversation {
            conversation_id,
            change,
            ..
        }) = frame
        {
            let open = shared.router.route.get_untracked() == Route::Conversation(conversation_id);
            match change {
                ConversationChange::Answered if !open => {
                    shared.unread.update(|unread| {
                        unread.insert(conversation_id);
                    });
                }
                ConversationChange::Deleted => {
                    shared.unread.update(|unread| {
                        unread.remove(&conversation_id);
                    });
                    if open {
                        shared.router.replace(Route::Home);
                    }
                }
                _ => {}
            }
        }
        shared.list_changed.update(|v| *v += 1);
    });
    let _live = StoredValue::new_local(live);

    let load_more = {
        let api = api.clone();
        move || {
            let Some(next) = cursor.get_untracked() else {
                return;
            };
            if loading.get_untracked() {
                return;
            }
            loading.set(true);
            let api = api.clone();
            let mine = generation.get_value();
            spawn_local(async move {
                let page = api.conversations(Some(&next)).await;
                // A page of a list reloaded since belongs to neither.
                if generation.try_get_value() != Some(mine) {
                    return;
                }
                match page {
                    Ok(page) => {
                        items.update(|items| {
                            for item in page.items {
                                if !items.iter().any(|existing| existing.id == item.id) {
                                    items.push(item);
                                }
                            }
                        });
                        cursor.set(page.next_cursor);
                    }
                    Err(e) => error.set(Some(e.describe())),
                }
                loading.set(false);
            });
        }
    };
    let on_scroll = {
        let load_more = load_more.clone();
        move |event: leptos::ev::Event| {
            let list: web_sys::Element = event_target(&event);
            if list.scroll_top() + list.client_height() + 80 >= list.scroll_height() {
                load_more();
            }
        }
    };

    let new_conversation = {
        let api = api.clone();
        move |_| {
            let api = api.clone();
            spawn_local(async move {
                match api.create_conversation().await {
                    Ok(conversation) => {
                        items.update(|items| items.insert(0, conversation.clone()));
                        shared.sidebar_open.set(false);
                        shared.router.navigate(Route::Conversation(conversation.id));
                    }
                    Err(e) => error.set(Some(e.describe())),
                }
            });
        }
    };
    let sign_out = {
        let auth = api.auth.clone();
        move |_| {
            let auth = auth.clone();
            spawn_local(async move { auth.sign_out().await });
        }
    };
    let email = api.auth.current().map(|s| s.email).unwrap_or_default();
    let route = shared.router.route;

    view! {
        <nav class="sidebar" aria-label="Conversations">
            <div class="sidebar-head">
                <button class="primary new" on:click=new_conversation title="Ctrl+Shift+O">
                    "+ New conversation"
                </button>
                <button
                    class="icon open-search"
                    aria-label="Search conversations"
                    title="Search (Ctrl+K)"
                    on:click=move |_| shared.search_open.set(true)
                >
                    "⌕"
                </button>
                <button
                    class="icon close-sidebar"
                    aria-label="Hide conversations"
                    on:click=move |_| shared.sidebar_open.set(false)
                >
                    "×"
                </button>
            </div>
            {move || error.get().map(|e| view! { <p class="error" role="alert">{e}</p> })}
            <ul class="conversations" on:scroll=on_scroll>
                <For
                    each=move || items.get()
                    key=|c| (c.id, c.title.clone())
                    children=move |conversation| {
                        let id = conversation.id;
                        view! {
                            <ConversationItem
                                conversation
                                active=Signal::derive(move || route.get() == Route::Conversation(id))
                                items
                            />
                        }
                    }
                />
                {move || {
                    cursor
                        .get()
                        .is_some()
                        .then(|| {
                            let load_more = load_more.clone();
                            view! {
                                <li>
                                    <button class="link more" on:click=move |_| load_more()>
                                        "Load more"
                                    </button>
                                </li>
                            }
                        })
                }}
            </ul>
            <div class="sidebar-foot">
                <span class="muted email" title=email.clone()>{email.clone()}</span>
                <button class="link" on:click=sign_out>"Sign out"</button>
            </div>
        </nav>
    }
}

#[component]
fn ConversationItem(
    /// The conversation shown.
    conversation: Conversation,
    /// True when it is the one open.
    active: Signal<bool>,
    /// The list, to update after rename or delete.
    items: RwSignal<Vec<Conversation>>,
) -> impl IntoView {
    let api = expect_context::<Api>();
    let shared = expect_context::<Shared>();
    let id: Uuid = conversation.id;
    let title = conversation.title.clone();
    let editing = RwSignal::new(false);
    let draft = RwSignal::new(title.clone());

    let rename = {
        let api = api.clone();
        move || {
            let new_title = draft.get_untracked().trim().to_owned();
            editing.set(false);
            if new_title.is_empty() {
                return;
            }
            let api = api.clone();
            spawn_local(async move {
                if let Ok(renamed) = api.rename(id, new_title).await {
                    items.update(|items| {
                        if let Some(item) = items.iter_mut().find(|c| c.id == id) {
                            *item = renamed;
                        }
                    });
                    // The open conversation's header shows the title too.
                    shared.list_changed.update(|v| *v += 1);
                }
            });
        }
    };
    let delete = {
        let api = api.clone();
        let title = title.clone();
        move |_| {
            let confirmed = window()
                .confirm_with_message(&format!("Delete “{title}”? This cannot be undone."))
                .unwrap_or(false);
            if !confirmed {
                return;
            }
            let api = api.clone();
            spawn_local(async move {
                if api.delete(id).await.is_ok() {
                    items.update(|items| items.retain(|c| c.id != id));
                    if shared.router.route.get_untracked() == Route::Conversation(id) {
                        shared.router.replace(Route::Home);
                    }
                }
            });
        }
    };
    let open = move |event: leptos::ev::MouseEvent| {
        event.prevent_default();
        shared.sidebar_open.set(false);
        shared.router.navigate(Route::Conversation(id));
    };
    let rename_on_enter = {
        let rename = rename.clone();
        move |event: leptos::ev::KeyboardEvent| match event.key().as_str() {
            "Enter" => rename(),
            "Escape" => editing.set(false),
            _ => {}
        }
    };

    view! {
        <li
            class="conversation"
            class:active=move || active.get()
            class:unread=move || shared.unread.with(|unread| unread.contains(&id))
        >
            <Show
                when=move || editing.get()
                fallback={
                    let title = title.clone();
                    move || {
                        view! {
                            <a
                                href=Route::Conversation(id).path()
                                on:click=open
                                aria-current=move || active.get().then_some("page")
                            >
                                {title.clone()}
                                <span
                                    class="dot"
                                    title="A new answer"
                                    aria-label=move || {
                                        shared
                                            .unread
                                            .with(|unread| unread.contains(&id))
                                            .then_some("new answer")
                                    }
                                ></span>
                            </a>
                        }
                    }
                }
            >
                <input
                    class="rename"
                    aria-label="New title"
                    prop:value=move || draft.get()
                    on:input=move |ev| draft.set(event_target_value(&ev))
                    on:keydown=rename_on_enter.clone()
                    on:blur={
                        let rename = rename.clone();
                        move |_| rename()
                    }
                    autofocus
                />
            </Show>
            <span class="actions">
                <button class="icon" aria-label="Rename" title="Rename" on:click=move |_| editing.set(true)>
                    "✎"
                </button>
                <button class="icon" aria-label="Delete" title="Delete" on:click=delete>
                    "✕"
                </button>
            </span>
        </li>
    }
}
