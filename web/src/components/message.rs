//! One message bubble. Answers are Markdown, rendered safely (see `crate::markdown`); the
//! answer still streaming re-renders at most once per animation frame.
//!
//! Under each committed message: copy; `‹ 2/3 ›` when it has other versions; on answers,
//! regenerate (the model and usage on hover); on the user's messages, edit (a new version,
//! sent in its place; the original stays one `‹` away).

use leptos::prelude::*;
use uuid::Uuid;
use wadi_protocol::{RunStatus, api::Role};

use crate::{
    markdown,
    store::{MessageView, PendingState},
};

/// What a message's controls ask of the conversation.
#[derive(Clone, Copy)]
pub struct MessageActions {
    /// Retry a failed send (its client message id).
    pub retry: Callback<String>,
    /// Another answer to this user message.
    pub regenerate: Callback<Uuid>,
    /// A new version of this user message, with this text.
    pub edit: Callback<(Uuid, String)>,
    /// Show the branch through this version.
    pub branch: Callback<Uuid>,
    /// Drop a queued message (its client message id).
    pub cancel: Callback<String>,
    /// The user message whose editor the keyboard opened (`↑` in an empty composer).
    pub edit_request: RwSignal<Option<Uuid>>,
    /// True while an answer streams or a send waits: the tree cannot change then.
    pub busy: Signal<bool>,
}

/// A committed (or pending) message. Its content never changes once shown, so it renders once.
#[component]
pub fn Message(
    /// The message to show.
    message: MessageView,
    actions: MessageActions,
) -> impl IntoView {
    let role = match message.role {
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::System => "system",
    };
    let editing = RwSignal::new(false);
    let draft = RwSignal::new(message.content.clone());
    if let Some(id) = message.id {
        // `↑` in an empty composer opens the last message's editor.
        Effect::new(move |_| {
            if actions.edit_request.get() == Some(id) {
                actions.edit_request.set(None);
                editing.set(true);
                request_animation_frame(|| {
                    if let Ok(Some(editor)) =
                        document().query_selector("textarea[aria-label='Edit message']")
                        && let Ok(editor) =
                            wasm_bindgen::JsCast::dyn_into::<web_sys::HtmlElement>(editor)
                    {
                        let _ = editor.focus();
                    }
                });
            }
        });
    }
    let body = match message.role {
        Role::Assistant => {
            let html = markdown::render(&message.content);
            view! { <div class="content markdown" inner_html=html></div> }.into_any()
        }
        _ => {
            let text = message.content.clone();
            let id = message.id;
            let save = move || {
                let content = draft.get_untracked();
                if let Some(id) = id
                    && !content.trim().is_empty()
                {
                    editing.set(false);
                    actions.edit.run((id, content));
                }
            };
            view! {
                <Show
                    when=move || editing.get()
                    fallback=move || view! { <div class="content plain">{text.clone()}</div> }
                >
                    <form
                        class="edit"
                        on:submit=move |event: leptos::ev::SubmitEvent| {
                            event.prevent_default();
                            save();
                        }
                    >
                        <textarea
                            aria-label="Edit message"
                            prop:value=move || draft.get()
                            on:input=move |ev| draft.set(event_target_value(&ev))
                            on:keydown=move |event: leptos::ev::KeyboardEvent| {
                                if event.key() == "Enter" && !event.shift_key() && !event.is_composing() {
                                    event.prevent_default();
                                    save();
                                } else if event.key() == "Escape" {
                                    // Closes the editor only (not a stop).
                                    event.stop_propagation();
                                    editing.set(false);
                                }
                            }
                        ></textarea>
                        <div class="edit-actions">
                            <button type="button" class="link" on:click=move |_| editing.set(false)>
                                "Cancel"
                            </button>
                            <button type="submit" class="primary">"Send"</button>
                        </div>
                    </form>
                </Show>
            }
            .into_any()
        }
    };
    let status = message.status.and_then(|status| match status {
        RunStatus::Stopped => Some("Stopped"),
        RunStatus::Failed => Some("The model failed; this is what it wrote"),
        RunStatus::Interrupted => Some("Interrupted by a server restart"),
        _ => None,
    });
    let key = message.key.clone();
    let pending = match message.pending.clone() {
        Some(PendingState::Queued) => {
            let key = key.clone();
            Some(
                view! {
                    <span class="note queued" aria-live="polite">
                        "Queued: sent when the answer ends · "
                        <button class="link cancel" on:click=move |_| actions.cancel.run(key.clone())>
                            "Cancel"
                        </button>
                    </span>
                }
                .into_any(),
            )
        }
        Some(PendingState::Sending) => {
            Some(view! { <span class="note" aria-live="polite">"Sending…"</span> }.into_any())
        }
        Some(PendingState::Failed(reason)) => Some(
            view! {
                <span class="note error" role="alert">
                    {reason}
                    " "
                    <button class="link" on:click=move |_| actions.retry.run(key.clone())>
                        "Retry"
                    </button>
                </span>
            }
            .into_any(),
        ),
        None => None,
    };
    let controls = message
        .pending
        .is_none()
        .then(|| controls(&message, actions, editing));
    let about = answer_details(&message);
    view! {
        <article
            class=format!("message {role}")
            data-role=role
            data-id=message.id.map(|id| id.to_string())
            title=about
        >
            {body}
            {status.map(|s| view! { <span class="note">{s}</span> })}
            {pending}
            {controls}
        </article>
    }
}

/// "gpt-4o-mini · 25 prompt + 120 answer tokens", shown on hover of an answer; an estimate
/// (the answer ended before the provider reported its usage) says so.
fn answer_details(message: &MessageView) -> Option<String> {
    let model = message.model.clone()?;
    Some(match message.usage {
        Some(usage) if usage.estimated => format!(
            "{model} · ≈ {} prompt + {} answer tokens (estimate: the answer ended before the \
             provider reported its usage)",
            usage.prompt_tokens, usage.completion_tokens
        ),
        Some(usage) => format!(
            "{model} · {} prompt + {} answer tokens",
            usage.prompt_tokens, usage.completion_tokens
        ),
        None => model,
    })
}

fn controls(
    message: &MessageView,
    actions: MessageActions,
    editing: RwSignal<bool>,
) -> impl IntoView + use<> {
    let versions = message.version().map(|(at, count)| {
        let previous = message.sibling(-1);
        let next = message.sibling(1);
        view! {
            <span class="versions" aria-label="Versions">
                <button
                    class="icon prev"
                    aria-label="Previous version"
                    disabled=move || previous.is_none() || actions.busy.get()
                    on:click=move |_| {
                        if let Some(id) = previous {
                            actions.branch.run(id);
                        }
                    }
                >
                    "‹"
                </button>
                <span class="count">{format!("{at}/{count}")}</span>
                <button
                    class="icon next"
                    aria-label="Next version"
                    disabled=move || next.is_none() || actions.busy.get()
                    on:click=move |_| {
                        if let Some(id) = next {
                            actions.branch.run(id);
                        }
                    }
                >
                    "›"
                </button>
            </span>
        }
    });
    let content = message.content.clone();
    let copy = view! {
        <button
            class="icon copy-message"
            aria-label="Copy message"
            title="Copy"
            on:click=move |event: leptos::ev::MouseEvent| {
                crate::clipboard::copy(&content);
                event_target::<web_sys::HtmlElement>(&event).set_text_content(Some("Copied"));
            }
        >
            "Copy"
        </button>
    };
    let regenerate = (message.role == Role::Assistant)
        .then_some(message.parent_id)
        .flatten()
        .map(|question| {
            view! {
                <button
                    class="icon regenerate"
                    aria-label="Regenerate answer"
                    title="Regenerate"
                    disabled=move || actions.busy.get()
                    on:click=move |_| actions.regenerate.run(question)
                >
                    "↻ Regenerate"
                </button>
            }
        });
    let edit = (message.role == Role::User && message.id.is_some()).then(|| {
        view! {
            <button
                class="icon edit-message"
                aria-label="Edit message"
                title="Edit"
                disabled=move || actions.busy.get()
                on:click=move |_| editing.set(true)
            >
                "✎ Edit"
            </button>
        }
    });
    view! { <div class="actions">{versions} {copy} {edit} {regenerate}</div> }
}

/// The answer being written: its Markdown follows the streamed text. Blocks that are final are
/// rendered once and kept in the page; each update re-renders only the unfinished last block
/// (see [`markdown::Incremental`]), so a long answer costs the same per frame at its end as at
/// its start. With `?render=full` in the address, the whole answer re-renders on every update
/// instead (the old way, kept to measure the difference: `docs/performance.md`).
#[component]
pub fn StreamingMessage(
    /// The text streamed so far (updated at most once per animation frame).
    text: Signal<String>,
) -> impl IntoView {
    let content = if markdown::full_render_requested() {
        view! { <div class="content markdown" inner_html=move || markdown::render(&text.get())></div> }
            .into_any()
    } else {
        incremental_markdown(text).into_any()
    };
    view! {
        <article class="message assistant streaming" data-role="assistant" aria-busy="true">
            {content}
            <span class="cursor" aria-hidden="true"></span>
        </article>
    }
}

/// The streamed text's Markdown: the finished blocks, each rendered once, then the tail.
fn incremental_markdown(text: Signal<String>) -> impl IntoView {
    let incremental = StoredValue::new(markdown::Incremental::default());
    // The finished pieces, numbered in order; each renders once.
    let finished = RwSignal::new(Vec::<(usize, std::sync::Arc<str>)>::new());
    let tail = RwSignal::new(String::new());
    Effect::new(move |_| {
        let Some(update) = text.with(|text| incremental.try_update_value(|i| i.update(text)))
        else {
            return;
        };
        if let Some(html) = update.finished {
            finished.update(|pieces| pieces.push((pieces.len(), html.into())));
        }
        tail.set(update.tail);
    });
    view! {
        <div class="content markdown">
            <For each=move || finished.get() key=|(index, _)| *index let((_, html))>
                <div class="md-block" inner_html=html.to_string()></div>
            </For>
            <div class="md-block tail" inner_html=move || tail.get()></div>
        </div>
    }
}

#[cfg(test)]
mod tests {
    use wadi_protocol::Usage;

    use super::*;

    fn answer(usage: Option<Usage>) -> MessageView {
        MessageView {
            key: "a".into(),
            role: Role::Assistant,
            content: "Hi".into(),
            status: Some(RunStatus::Stopped),
            pending: None,
            run_id: None,
            id: None,
            parent_id: None,
            siblings: Vec::new(),
            model: Some("gpt-4o-mini".into()),
            usage,
        }
    }

    #[test]
    fn an_estimated_usage_says_it_is_one() {
        let usage = Usage {
            prompt_tokens: 25,
            completion_tokens: 9,
            total_tokens: 34,
            estimated: false,
        };
        assert_eq!(
            answer_details(&answer(Some(usage))).unwrap(),
            "gpt-4o-mini · 25 prompt + 9 answer tokens"
        );
        let estimated = answer_details(&answer(Some(Usage {
            estimated: true,
            ..usage
        })))
        .unwrap();
        assert!(
            estimated.starts_with("gpt-4o-mini · ≈ 25 prompt + 9 answer tokens (estimate"),
            "{estimated}"
        );
        assert_eq!(answer_details(&answer(None)).unwrap(), "gpt-4o-mini");
    }
}
