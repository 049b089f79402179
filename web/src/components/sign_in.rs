//! Sign in or create an account.

use leptos::{prelude::*, task::spawn_local};

use crate::auth::Auth;

#[component]
pub fn SignIn() -> impl IntoView {
    let auth = expect_context::<Auth>();
    let email = RwSignal::new(String::new());
    let password = RwSignal::new(String::new());
    let creating = RwSignal::new(false);
    let busy = RwSignal::new(false);
    let error = RwSignal::new(None::<String>);
    let submit = move |event: leptos::ev::SubmitEvent| {
        event.prevent_default();
        if busy.get_untracked() {
            return;
        }
        busy.set(true);
        error.set(None);
        let auth = auth.clone();
        spawn_local(async move {
            let (email, password) = (email.get_untracked(), password.get_untracked());
            let result = if creating.get_untracked() {
                auth.sign_up(email.trim(), &password).await
            } else {
                auth.sign_in(email.trim(), &password).await
            };
            busy.set(false);
            if let Err(message) = result {
                error.set(Some(message));
            }
        });
    };
    view! {
        <div class="sign-in">
            <form class="card" on:submit=submit>
                <h1>"WADI"</h1>
                <p class="muted">
                    {move || if creating.get() { "Create an account" } else { "Sign in to chat" }}
                </p>
                <label>
                    "Email"
                    <input
                        type="email"
                        name="email"
                        autocomplete="email"
                        required
                        prop:value=move || email.get()
                        on:input=move |ev| email.set(event_target_value(&ev))
                    />
                </label>
                <label>
                    "Password"
                    <input
                        type="password"
                        name="password"
                        required
                        autocomplete=move || {
                            if creating.get() { "new-password" } else { "current-password" }
                        }
                        prop:value=move || password.get()
                        on:input=move |ev| password.set(event_target_value(&ev))
                    />
                </label>
                {move || error.get().map(|e| view! { <p class="error" role="alert">{e}</p> })}
                <button class="primary" type="submit" disabled=move || busy.get()>
                    {move || if creating.get() { "Create account" } else { "Sign in" }}
                </button>
                <button
                    type="button"
                    class="link"
                    on:click=move |_| {
                        creating.update(|c| *c = !*c);
                        error.set(None);
                    }
                >
                    {move || {
                        if creating.get() {
                            "I have an account: sign in"
                        } else {
                            "New here? Create an account"
                        }
                    }}
                </button>
            </form>
        </div>
    }
}
