//! The connection behind an open conversation: one WebSocket, authenticated as in
//! `docs/protocol.md`, reconnected with backoff and full jitter (at once when the browser comes
//! back online or the tab becomes visible), its token refreshed on the open socket before it
//! expires, and, when WebSocket cannot connect at all, REST sends followed over SSE.
//!
//! The driver owns the conversation's [`ChatState`]; the UI talks to it through [`ChatDriver`]
//! and reads [`ChatSignals`]. Chunks reach the screen at most once per animation frame.

use std::{
    cell::{Cell, RefCell},
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{
    FutureExt, SinkExt, StreamExt,
    channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded},
    future::{Fuse, FusedFuture},
    stream::FusedStream,
};
use gloo_net::websocket::{Message, WebSocketError, futures::WebSocket};
use leptos::{prelude::*, task::spawn_local};
use uuid::Uuid;
use wadi_protocol::{
    ClientMessage, ServerMessage,
    api::{SendMessage, SentMessage},
};

use crate::{
    api::Api,
    auth,
    store::{Backoff, ChatState, Command, MessageView, timing},
};

/// Failed opens in a row after which sends go over REST and SSE until a socket works again.
const FALLBACK_AFTER: u32 = 3;

/// The socket's state, for the banner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Connecting,
    Online,
    Reconnecting,
    /// WebSocket cannot connect; sending over REST, answers over SSE.
    Fallback,
}

/// What the UI reads.
#[derive(Clone, Copy)]
pub struct ChatSignals {
    pub messages: RwSignal<Vec<MessageView>>,
    /// The answer streaming now: its run and text so far.
    pub streaming: RwSignal<Option<(Uuid, String)>>,
    pub error: RwSignal<Option<String>>,
    pub link: RwSignal<Link>,
    pub loaded: RwSignal<bool>,
    /// True while there is history above the first message shown.
    pub older: RwSignal<bool>,
    /// Bumped when the conversation list may have changed (title, order).
    pub list_changed: RwSignal<u64>,
}

/// What the UI asks.
#[derive(Debug)]
pub enum Action {
    Send(String),
    Retry(String),
    Stop,
    /// Another answer to this user message.
    Regenerate(Uuid),
    /// A new version of this user message, with this text.
    Edit(Uuid, String),
    /// Show the branch through this message (another version of one shown).
    ShowBranch(Uuid),
    /// Drop a queued message (its client message id) before it is sent.
    Cancel(String),
    /// Reconnect now (online again, tab visible again).
    Wake,
    /// Show the page of history before the first message shown (the user scrolled up).
    LoadOlder,
}

/// The UI's handle; dropping it ends the driver and closes the socket.
pub struct ChatDriver {
    actions: UnboundedSender<Action>,
    alive: Arc<AtomicBool>,
}

impl ChatDriver {
    pub fn act(&self, action: Action) {
        let _ = self.actions.unbounded_send(action);
    }
}

impl Drop for ChatDriver {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::SeqCst);
        self.actions.close_channel();
    }
}

/// Starts the driver for `conversation_id`, showing the branch through `through` (the newest
/// one without it).
pub fn start(
    api: Api,
    conversation_id: Uuid,
    signals: ChatSignals,
    through: Option<Uuid>,
) -> ChatDriver {
    let (actions, receiver) = unbounded();
    let alive = Arc::new(AtomicBool::new(true));
    let driver = Driver {
        api,
        conversation_id,
        signals,
        state: ChatState::showing(through),
        alive: alive.clone(),
        actions: receiver,
        backoff: Backoff::default(),
        frame: Rc::new(FrameScheduler::default()),
        resync: Fuse::terminated(),
    };
    spawn_local(driver.run());
    ChatDriver { actions, alive }
}

/// Coalesces streaming text updates to one per animation frame.
#[derive(Default)]
struct FrameScheduler {
    latest: RefCell<Option<(Uuid, String)>>,
    scheduled: Cell<bool>,
}

impl FrameScheduler {
    fn show(
        self: &Rc<Self>,
        value: Option<(Uuid, String)>,
        signal: RwSignal<Option<(Uuid, String)>>,
    ) {
        *self.latest.borrow_mut() = value;
        if self.scheduled.replace(true) {
            return;
        }
        let this = self.clone();
        request_animation_frame(move || {
            this.scheduled.set(false);
            let latest = this.latest.borrow_mut().take();
            signal.set(latest);
        });
    }
}

/// How one connection ended.
enum Ended {
    /// The UI went away.
    Stopped,
    SignedOut,
    /// The socket closed: was it ever authenticated, and with which code.
    Closed {
        authenticated: bool,
        code: u16,
    },
}

struct Driver {
    api: Api,
    conversation_id: Uuid,
    signals: ChatSignals,
    state: ChatState,
    alive: Arc<AtomicBool>,
    actions: UnboundedReceiver<Action>,
    backoff: Backoff,
    frame: Rc<FrameScheduler>,
    /// A `resync` is acted on at a moment of this tab's own within the server's window; kept
    /// across reconnects, so a reconnect inside the window does not lose it.
    resync: Fuse<gloo_timers::future::TimeoutFuture>,
}

fn client_message_id() -> String {
    web_sys::window()
        .and_then(|w| w.crypto().ok())
        .map(|crypto| crypto.random_uuid())
        .unwrap_or_else(|| format!("c-{}-{}", js_sys::Date::now(), js_sys::Math::random()))
}

fn socket_url(conversation_id: Uuid) -> String {
    let location = window().location();
    let scheme = if location.protocol().as_deref() == Ok("https:") {
        "wss"
    } else {
        "ws"
    };
    let host = location.host().unwrap_or_default();
    format!("{scheme}://{host}/ws/chat/{conversation_id}")
}

impl Driver {
    fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Pushes the state to the UI (everything but the streaming text, which goes per frame).
    fn sync(&self) {
        self.signals.messages.set(self.state.messages.clone());
        self.signals.older.set(self.state.older.is_some());
        self.signals.error.set(self.state.error.clone());
        let streaming = self
            .state
            .streaming
            .as_ref()
            .map(|s| (s.run_id, s.text.clone()));
        if streaming.is_none() {
            self.signals.streaming.set(None);
        }
        self.frame.show(streaming, self.signals.streaming);
    }

    fn sync_stream(&self) {
        let streaming = self
            .state
            .streaming
            .as_ref()
            .map(|s| (s.run_id, s.text.clone()));
        self.frame.show(streaming, self.signals.streaming);
    }

    /// The newest page of the branch shown (older pages shown above it stay when it continues
    /// them).
    async fn load_history(&mut self) {
        match self
            .api
            .path_page(self.conversation_id, self.state.through, None)
            .await
        {
            Ok(page) => {
                self.state.load_history(page.items, page.older_cursor);
                self.sync();
                self.signals.loaded.set(true);
            }
            Err(error) => {
                self.state.error = Some(error.describe());
                self.sync();
            }
        }
    }

    /// The page before the first message shown, above it.
    async fn load_older(&mut self) {
        let Some(cursor) = self.state.older.clone() else {
            return;
        };
        match self
            .api
            .path_page(self.conversation_id, None, Some(&cursor))
            .await
        {
            Ok(page) => {
                if self
                    .state
                    .prepend_older(&cursor, page.items, page.older_cursor)
                {
                    self.sync();
                }
            }
            Err(error) => {
                self.state.error = Some(error.describe());
                self.sync();
            }
        }
    }

    async fn run(mut self) {
        self.load_history().await;
        let mut failed_opens = 0u32;
        while self.alive() {
            self.signals.link.set(if failed_opens >= FALLBACK_AFTER {
                Link::Fallback
            } else if self.signals.link.get_untracked() == Link::Online {
                Link::Reconnecting
            } else {
                self.signals.link.get_untracked()
            });
            match self.connection().await {
                Ended::Stopped | Ended::SignedOut => return,
                Ended::Closed {
                    code: wadi_protocol::close::CONVERSATION_DELETED,
                    ..
                } => {
                    // Deleted on another device: nothing to reconnect to.
                    self.state.error = Some("This conversation was deleted.".into());
                    self.sync();
                    return;
                }
                Ended::Closed {
                    authenticated,
                    code,
                } => {
                    if authenticated {
                        failed_opens = 0;
                    } else {
                        failed_opens += 1;
                    }
                    // Auth refused or token expired: refresh, then reconnect. A refresh that is
                    // refused ends the session (the app shows sign-in, keeping the draft).
                    if matches!(code, 1008 | 4001) && self.api.auth.refresh().await.is_err() {
                        return;
                    }
                }
            }
            if !self.alive() {
                return;
            }
            self.signals.link.set(if failed_opens >= FALLBACK_AFTER {
                Link::Fallback
            } else {
                Link::Reconnecting
            });
            let delay = self.backoff.next_delay(js_sys::Math::random());
            if !self.wait(delay, failed_opens >= FALLBACK_AFTER).await {
                return;
            }
        }
    }

    /// Waits out the backoff delay, handling what the user does meanwhile. Returns false when
    /// the driver should end.
    async fn wait(&mut self, delay: Duration, fallback: bool) -> bool {
        if fallback {
            // Messages typed while the socket was trying go out now.
            self.send_over_rest().await;
        }
        let mut timer = gloo_timers::future::sleep(delay).fuse();
        loop {
            futures::select! {
                () = timer => return true,
                action = self.actions.next() => match action {
                    None => return false,
                    Some(Action::Wake) => return true,
                    Some(Action::Send(content)) => {
                        let id = client_message_id();
                        // Shown at once; sent when the socket is back, or now over REST.
                        self.state.send(content, id);
                        self.sync();
                        if fallback {
                            self.send_over_rest().await;
                        }
                    }
                    Some(Action::Retry(id)) => {
                        self.state.retry(&id);
                        self.sync();
                        if fallback {
                            self.send_over_rest().await;
                        }
                    }
                    Some(Action::Edit(message_id, content)) => {
                        self.state.edit(message_id, content, client_message_id());
                        self.sync();
                        if fallback {
                            self.send_over_rest().await;
                        }
                    }
                    Some(Action::Regenerate(message_id)) => {
                        if fallback {
                            self.regenerate_over_rest(message_id).await;
                        }
                    }
                    Some(Action::ShowBranch(through)) => {
                        if !self.state.show_branch(through).is_empty() {
                            self.load_history().await;
                        }
                    }
                    Some(Action::Cancel(key)) => {
                        self.state.cancel(&key);
                        self.sync();
                    }
                    Some(Action::Stop) => self.stop_over_rest().await,
                    Some(Action::LoadOlder) => self.load_older().await,
                },
            }
        }
    }

    /// Fallback: sends the unacknowledged messages over REST and follows their runs over SSE.
    async fn send_over_rest(&mut self) {
        for command in self.state.unacknowledged() {
            let Command::Send(frame) = command else {
                continue;
            };
            let Some(message) = over_rest(frame) else {
                continue;
            };
            match self.api.send_message(self.conversation_id, message).await {
                Ok(sent) => self.follow_sent(sent).await,
                Err(error) => {
                    self.state.error = Some(error.describe());
                    self.sync();
                    return;
                }
            }
        }
    }

    /// Sends one message over REST while the socket stays: the socket hears its run start
    /// (`start` carries its `clientMessageId`) and streams the answer as for any other.
    async fn send_one_over_rest(&mut self, message: SendMessage) {
        if let Err(error) = self.api.send_message(self.conversation_id, message).await {
            self.state.error = Some(error.describe());
            self.sync();
        }
    }

    /// Fallback: `regenerate` over REST, its answer followed over SSE.
    async fn regenerate_over_rest(&mut self, message_id: Uuid) {
        self.state.regenerate(message_id);
        self.sync();
        match self.api.regenerate(self.conversation_id, message_id).await {
            Ok(sent) => self.follow_sent(sent).await,
            Err(error) => {
                self.state.error = Some(error.describe());
                self.load_history().await;
            }
        }
    }

    async fn follow_sent(&mut self, sent: SentMessage) {
        if let Some(run) = sent.run {
            self.state.apply(ServerMessage::Start {
                run_id: run.id,
                conversation_id: run.conversation_id,
                message_id: run.message_id,
                client_message_id: sent.message.client_message_id.clone(),
            });
            self.sync();
            self.follow_over_sse(run.id).await;
        }
    }

    async fn follow_over_sse(&mut self, run_id: Uuid) {
        let Ok(token) = self.api.auth.valid_token().await else {
            return;
        };
        let after = self
            .state
            .streaming
            .as_ref()
            .filter(|s| s.run_id == run_id)
            .map_or(0, |s| s.applied);
        let Ok(frames) = crate::sse::follow(run_id, after, &token).await else {
            return;
        };
        let mut frames = std::pin::pin!(frames.fuse());
        loop {
            futures::select! {
                frame = frames.next() => match frame {
                    Some(frame) => self.apply(frame).await,
                    None => return,
                },
                action = self.actions.next() => match action {
                    Some(Action::Stop) => self.stop_over_rest().await,
                    None => return,
                    // Shown at once and kept; sent when this answer has ended.
                    Some(Action::Send(content)) => {
                        self.state.send(content, client_message_id());
                        self.sync();
                    }
                    Some(Action::Retry(id)) => {
                        self.state.retry(&id);
                        self.sync();
                    }
                    Some(Action::Cancel(key)) => {
                        self.state.cancel(&key);
                        self.sync();
                    }
                    Some(Action::LoadOlder) => self.load_older().await,
                    Some(Action::Wake | Action::Regenerate(_) | Action::Edit(..) | Action::ShowBranch(_)) => {}
                },
            }
        }
    }

    async fn stop_over_rest(&mut self) {
        if let Some(streaming) = &self.state.streaming {
            let _ = self.api.stop_run(streaming.run_id).await;
        }
    }

    /// Applies a frame and carries out the commands it produces, except sends (there is no
    /// socket in the fallback); a gap there is filled by the next SSE resume.
    async fn apply(&mut self, frame: ServerMessage) {
        let chunk = matches!(frame, ServerMessage::Chunk { .. });
        let ended = matches!(frame, ServerMessage::Complete { .. });
        let commands = self.state.apply(frame);
        if chunk {
            self.sync_stream();
        } else {
            self.sync();
        }
        if ended {
            self.signals.list_changed.update(|v| *v += 1);
        }
        if commands.contains(&Command::RefreshHistory) {
            self.load_history().await;
            self.signals.list_changed.update(|v| *v += 1);
        }
    }

    /// One socket, from open to close.
    async fn connection(&mut self) -> Ended {
        let Ok(socket) = WebSocket::open(&socket_url(self.conversation_id)) else {
            return Ended::Closed {
                authenticated: false,
                code: 1006,
            };
        };
        let (mut sink, stream) = socket.split();
        let mut stream = stream.fuse();
        let mut authenticated = false;
        // The server speaks first (`connected`); a socket that fails to open ends here.
        match stream.next().await {
            Some(Ok(Message::Text(text)))
                if matches!(
                    ServerMessage::decode(&text),
                    Ok(ServerMessage::Connected { .. })
                ) => {}
            Some(Err(WebSocketError::ConnectionClose(event))) => {
                return Ended::Closed {
                    authenticated,
                    code: event.code,
                };
            }
            _ => {
                return Ended::Closed {
                    authenticated,
                    code: 1006,
                };
            }
        }
        let Ok(token) = self.api.auth.valid_token().await else {
            return Ended::SignedOut;
        };
        if send(
            &mut sink,
            &ClientMessage::Auth {
                token: token.clone(),
            },
        )
        .await
        .is_err()
        {
            return Ended::Closed {
                authenticated,
                code: 1006,
            };
        }
        // The token this socket was last given. The refresh timer is armed once and re-armed
        // only when it fires: rebuilding it on every frame would postpone it forever while an
        // answer streams faster than its floor, and the server would close the socket when the
        // token expires.
        let mut sent = token;
        let mut refresh = refresh_timer(&self.api, Duration::ZERO);
        loop {
            futures::select! {
                incoming = stream.next() => match incoming {
                    Some(Ok(Message::Text(text))) => {
                        let Ok(frame) = ServerMessage::decode(&text) else { continue };
                        if let ServerMessage::Resync { within_ms } = frame {
                            if self.resync.is_terminated() {
                                self.resync = resync_timer(within_ms);
                            }
                            continue;
                        }
                        if let ServerMessage::Authenticated { .. } = &frame {
                            authenticated = true;
                            self.backoff.reset();
                            self.signals.link.set(Link::Online);
                        }
                        let chunk = matches!(frame, ServerMessage::Chunk { .. });
                        let ended = matches!(frame, ServerMessage::Complete { .. });
                        let commands = self.state.apply(frame);
                        if chunk { self.sync_stream() } else { self.sync() }
                        if ended {
                            self.signals.list_changed.update(|v| *v += 1);
                        }
                        if self.execute(&mut sink, commands).await.is_err() {
                            return Ended::Closed { authenticated, code: 1006 };
                        }
                    }
                    Some(Ok(Message::Bytes(_))) => {}
                    Some(Err(WebSocketError::ConnectionClose(event))) => {
                        return Ended::Closed { authenticated, code: event.code };
                    }
                    // An `error` event precedes the `close` event; wait for that.
                    Some(Err(_)) => {}
                    None => return Ended::Closed { authenticated, code: 1006 },
                },
                action = self.actions.next() => {
                    let commands = match action {
                        None => return Ended::Stopped,
                        Some(Action::Send(content)) => {
                            let commands = self.state.send(content, client_message_id());
                            self.sync();
                            commands
                        }
                        Some(Action::Retry(id)) => {
                            let commands = self.state.retry(&id);
                            self.sync();
                            commands
                        }
                        Some(Action::Regenerate(message_id)) => {
                            let commands = self.state.regenerate(message_id);
                            self.sync();
                            commands
                        }
                        Some(Action::Edit(message_id, content)) => {
                            let commands = self.state.edit(message_id, content, client_message_id());
                            self.sync();
                            commands
                        }
                        Some(Action::ShowBranch(through)) => self.state.show_branch(through),
                        Some(Action::Cancel(key)) => {
                            self.state.cancel(&key);
                            self.sync();
                            Vec::new()
                        }
                        Some(Action::Stop) => self.state.stop(),
                        Some(Action::Wake) => Vec::new(),
                        Some(Action::LoadOlder) => {
                            self.load_older().await;
                            Vec::new()
                        }
                    };
                    if self.execute(&mut sink, commands).await.is_err() {
                        return Ended::Closed { authenticated, code: 1006 };
                    }
                },
                () = &mut self.resync => {
                    let commands = self.state.apply(ServerMessage::Resync { within_ms: 0 });
                    if self.execute(&mut sink, commands).await.is_err() {
                        return Ended::Closed { authenticated, code: 1006 };
                    }
                },
                () = refresh => {
                    // Refresh before expiry (unless another part of the app already did) and
                    // hand the new token to the open socket.
                    let Ok(token) = self.api.auth.valid_token().await else {
                        return Ended::SignedOut;
                    };
                    let renewed = token != sent;
                    if renewed {
                        let frame = ClientMessage::Auth { token: token.clone() };
                        if send(&mut sink, &frame).await.is_err() {
                            return Ended::Closed { authenticated, code: 1006 };
                        }
                        sent = token;
                    }
                    // A refresh that failed for now (network, 5xx, 429) is retried in 5 s, not
                    // at once.
                    let retry_after = if renewed {
                        Duration::ZERO
                    } else {
                        timing::REFRESH_RETRY
                    };
                    refresh = refresh_timer(&self.api, retry_after);
                },
            }
            if !self.alive() {
                return Ended::Stopped;
            }
            if stream.is_terminated() {
                return Ended::Closed {
                    authenticated,
                    code: 1006,
                };
            }
        }
    }

    async fn execute<S>(&mut self, sink: &mut S, commands: Vec<Command>) -> Result<(), ()>
    where
        S: futures::Sink<Message> + Unpin,
    {
        for command in commands {
            match command {
                Command::Send(frame) => {
                    let text = frame.encode();
                    // A message whose frame the server would refuse as too large, though its
                    // content is within the content limit (mostly characters JSON escapes:
                    // quotes, backslashes, control characters), goes over REST, whose body
                    // limit allows for the escaping.
                    let limit = self.api.auth.config.max_frame_bytes;
                    match over_rest(frame) {
                        Some(message) if limit > 0 && text.len() > limit => {
                            self.send_one_over_rest(message).await;
                        }
                        _ => sink.send(Message::Text(text)).await.map_err(|_| ())?,
                    }
                }
                Command::RefreshHistory => {
                    self.load_history().await;
                    self.signals.list_changed.update(|v| *v += 1);
                }
            }
        }
        Ok(())
    }
}

/// A timer that fires at a random moment within a `resync`'s window.
pub(crate) fn resync_timer(within_ms: u64) -> Fuse<gloo_timers::future::TimeoutFuture> {
    gloo_timers::future::sleep(timing::resync_delay(within_ms, js_sys::Math::random())).fuse()
}

/// A timer that fires when the session should be refreshed, and not before `at_least`.
fn refresh_timer(api: &Api, at_least: Duration) -> Fuse<gloo_timers::future::TimeoutFuture> {
    let wait = api.auth.current().map_or(Duration::from_secs(3600), |s| {
        timing::refresh_delay(s.issued_at, s.expires_at, auth::now())
    });
    let wait = wait.max(at_least).max(Duration::from_millis(500));
    gloo_timers::future::sleep(wait).fuse()
}

/// A `message` frame as the REST send it is (other frames have none).
fn over_rest(frame: ClientMessage) -> Option<SendMessage> {
    let ClientMessage::Message {
        content,
        client_message_id,
        parent_id,
        edit_of,
    } = frame
    else {
        return None;
    };
    Some(SendMessage {
        content,
        client_message_id,
        parent_id,
        edit_of,
    })
}

async fn send<S>(sink: &mut S, frame: &ClientMessage) -> Result<(), ()>
where
    S: futures::Sink<Message> + Unpin,
{
    sink.send(Message::Text(frame.encode()))
        .await
        .map_err(|_| ())
}
