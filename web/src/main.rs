//! Entry point: install the panic hook and mount the app.

mod api;
mod app;
mod auth;
mod clipboard;
mod components;
mod highlight;
mod markdown;
mod route;
mod socket;
mod sse;
mod store;
mod user_socket;

fn main() {
    console_error_panic_hook::set_once();
    // Read before the router rewrites the address (the query does not survive navigation).
    markdown::full_render_requested();
    leptos::mount::mount_to_body(app::App);
}
