//! Entry point: install the panic hook and mount the app.

mod api;
mod app;
mod auth;
mod components;
mod markdown;
mod route;
mod socket;
mod sse;
mod store;
mod user_socket;

fn main() {
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(app::App);
}
