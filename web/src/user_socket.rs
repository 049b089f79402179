//! The user socket (`/ws/user`): how the sidebar learns, live, that a conversation was created,
//! renamed, deleted, got a message or finished an answer, in this tab or any other, on any
//! device. One per tab, reconnected with backoff like the chat socket, its token refreshed on
//! the open socket before it expires.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{
    FutureExt, SinkExt, StreamExt,
    future::{Fuse, FusedFuture},
};
use gloo_net::websocket::{Message, WebSocketError, futures::WebSocket};
use leptos::task::spawn_local;
use wadi_protocol::{ClientMessage, ServerMessage};

use crate::{
    api::Api,
    auth,
    socket::resync_timer,
    store::{Backoff, timing},
};

/// Stops the socket when dropped.
pub struct UserSocket {
    alive: Arc<AtomicBool>,
}

impl Drop for UserSocket {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::SeqCst);
    }
}

/// Opens the user socket; `on_frame` gets every `conversation` frame, and `None` after each
/// (re)connection (changes may have been missed while away: reload).
pub fn start(api: Api, on_frame: impl Fn(Option<ServerMessage>) + 'static) -> UserSocket {
    let alive = Arc::new(AtomicBool::new(true));
    let running = alive.clone();
    spawn_local(async move {
        let mut backoff = Backoff::default();
        while running.load(Ordering::SeqCst) {
            let code = connection(&api, &on_frame, &running, &mut backoff).await;
            if !running.load(Ordering::SeqCst) {
                return;
            }
            // Refused or expired: refresh first; a refused refresh is the end of the session.
            if matches!(code, Some(1008 | 4001)) && api.auth.refresh().await.is_err() {
                return;
            }
            let delay = backoff.next_delay(js_sys::Math::random());
            gloo_timers::future::sleep(delay).await;
        }
    });
    UserSocket { alive }
}

fn url() -> String {
    let location = leptos::prelude::window().location();
    let scheme = if location.protocol().as_deref() == Ok("https:") {
        "wss"
    } else {
        "ws"
    };
    format!("{scheme}://{}/ws/user", location.host().unwrap_or_default())
}

/// One socket, from open to close; its close code if it had one.
async fn connection(
    api: &Api,
    on_frame: &impl Fn(Option<ServerMessage>),
    alive: &AtomicBool,
    backoff: &mut Backoff,
) -> Option<u16> {
    let socket = WebSocket::open(&url()).ok()?;
    let (mut sink, stream) = socket.split();
    let mut stream = stream.fuse();
    let send = |frame: ClientMessage| Message::Text(frame.encode());
    let token = api.auth.valid_token().await.ok()?;
    let mut sent = token.clone();
    let mut refresh = refresh_timer(api, Duration::ZERO);
    let mut authenticated = false;
    // A `resync` reloads at a moment of this tab's own within the server's window.
    let mut resync = Fuse::terminated();
    loop {
        futures::select! {
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Text(text))) => match ServerMessage::decode(&text) {
                    Ok(ServerMessage::Connected { .. }) => {
                        sink.send(send(ClientMessage::Auth { token: token.clone() })).await.ok()?;
                    }
                    Ok(ServerMessage::Authenticated { .. }) if !authenticated => {
                        authenticated = true;
                        backoff.reset();
                        on_frame(None);
                    }
                    Ok(frame @ ServerMessage::Conversation { .. }) => on_frame(Some(frame)),
                    Ok(ServerMessage::Resync { within_ms }) if resync.is_terminated() => {
                        resync = resync_timer(within_ms);
                    }
                    _ => {}
                },
                Some(Ok(Message::Bytes(_))) | Some(Err(_)) => {
                    if let Some(Err(WebSocketError::ConnectionClose(event))) = incoming {
                        return Some(event.code);
                    }
                }
                None => return None,
            },
            // Changes may have been lost: reload, as after a reconnect.
            () = resync => on_frame(None),
            () = refresh => {
                let token = api.auth.valid_token().await.ok()?;
                let renewed = token != sent;
                if renewed {
                    sink.send(send(ClientMessage::Auth { token: token.clone() })).await.ok()?;
                    sent = token;
                }
                refresh = refresh_timer(api, if renewed { Duration::ZERO } else { timing::REFRESH_RETRY });
            },
        }
        if !alive.load(Ordering::SeqCst) {
            let _ = sink.close().await;
            return None;
        }
    }
}

/// When the session should be refreshed (and not before `at_least`).
fn refresh_timer(api: &Api, at_least: Duration) -> Fuse<gloo_timers::future::TimeoutFuture> {
    let wait = api.auth.current().map_or(Duration::from_secs(3600), |s| {
        timing::refresh_delay(s.issued_at, s.expires_at, auth::now())
    });
    gloo_timers::future::sleep(wait.max(at_least).max(Duration::from_millis(500))).fuse()
}
