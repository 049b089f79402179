//! One socket's loop: a `select!` over the connection (the next frame, while queued frames are
//! written), the auth deadline or token expiry, notes from the rest of the server, the
//! heartbeat and shutdown. Frames go to the handlers (`handlers.rs`); what the socket sends
//! goes through its bounded queue (`outbox.rs`) and is written by this same task (`wire.rs`).
//! However the socket ends, its registry entry and run watchers go, and a close frame is sent
//! when one can be.

use std::{collections::HashMap, ops::ControlFlow, pin::pin, sync::Arc, time::Duration};

use axum::extract::ws::{Message, WebSocket};
use tokio::{
    task::JoinHandle,
    time::{Instant, Sleep},
};
use uuid::Uuid;
use wadi_protocol::{ErrorCode, PROTOCOL_VERSION, ServerMessage, close};

use super::{
    outbox::{Outbox, TryPushError},
    registry::{Control, Endpoint, Inbox},
    wire::{Event, Outbound, Wire},
};
use crate::{
    auth::AuthUser, ids::RunId, limits::TokenBucket, metrics::EndpointLabel, runs::Lease,
    state::AppState,
};

/// How long a closing socket's last frames may take to go out.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// What a step of the loop decided: go on, or end the socket this way (`?` ends a handler
/// early). Ending is not an error: a run socket whose run was sent ends this way too.
pub(super) type Flow = ControlFlow<Exit>;

/// How a socket ends.
pub(super) enum Exit {
    /// The client closed or the connection broke: nothing more can be sent.
    Gone,
    /// The client did not read fast enough: its queue is full, so nothing more can be queued.
    Slow,
    /// Close with this code, after this `error` frame if any.
    Close {
        code: u16,
        error: Option<ServerMessage>,
    },
}

impl Exit {
    pub(super) fn close(code: u16, error: Option<(ErrorCode, &str)>) -> Self {
        Self::Close {
            code,
            error: error.map(|(code, message)| code.frame(message)),
        }
    }
}

/// What every socket has, authenticated or not.
pub(super) struct Socket {
    pub id: Uuid,
    pub state: AppState,
    pub endpoint: Endpoint,
    pub out: Arc<Outbox>,
    pub inbox: Arc<Inbox>,
    pub rate: TokenBucket,
    /// The id of the upgrade request, for the socket's span.
    pub request_id: Option<Box<str>>,
}

/// What an authenticated socket has.
pub(super) struct Session {
    pub user: AuthUser,
    /// When the token expires (its `exp` plus the verifier's leeway).
    pub expires: Instant,
    /// Keeps this instance subscribed to the user's events while the socket is open.
    pub _user_events: Lease,
    /// The watcher task of each run this socket follows.
    pub watchers: HashMap<RunId, JoinHandle<()>>,
}

struct Connection {
    socket: Socket,
    session: Option<Session>,
    last_seen: Instant,
}

/// Runs a socket to its end. Whatever ends it, its registry entry and watcher tasks go.
///
/// Not an `async fn`: its arguments would stay in the future, beside the copies made of them
/// (the connection alone is ~370 bytes), for as long as the socket is open. Built here, they
/// are moved into the future once.
pub fn serve(
    socket: WebSocket,
    state: AppState,
    endpoint: Endpoint,
    addr: std::net::IpAddr,
    request_id: Option<String>,
) -> impl Future<Output = ()> + Send {
    let id = Uuid::now_v7();
    let inbox = Arc::new(Inbox::default());
    let registration = state.clients.register(id, endpoint, inbox.clone(), addr);
    let gauge = state
        .metrics
        .connections
        .get_or_create(&EndpointLabel {
            endpoint: endpoint.label(),
        })
        .clone();
    gauge.inc();
    let out = Arc::new(Outbox::new(
        state.config.sockets.send_queue,
        state.config.sockets.send_queue_bytes,
    ));
    let mut wire = Wire::new(
        socket,
        out.clone(),
        state.config.sockets.slow_client_timeout,
    );
    let rate = TokenBucket::new(
        state.config.sockets.ws_rate_burst,
        state.config.sockets.ws_rate_per_second,
    );
    let mut connection = Connection {
        socket: Socket {
            id,
            state,
            endpoint,
            out,
            inbox,
            rate,
            request_id: request_id.map(String::into_boxed_str),
        },
        session: None,
        last_seen: Instant::now(),
    };
    async move {
        let exit = connection.run(&mut wire).await;
        let span = connection.socket.span();
        tracing::Instrument::instrument(connection.close(&mut wire, exit), span).await;
        gauge.dec();
        drop(registration);
    }
}

impl Connection {
    /// Ends the socket as `exit` says: its watchers go (on shutdown, after handing over their
    /// last frames), then the close frame, if one can be sent.
    async fn close(&mut self, wire: &mut Wire, exit: Exit) {
        let mut watchers = self
            .session
            .take()
            .map(|session| session.watchers)
            .unwrap_or_default();
        if matches!(
            exit,
            Exit::Close {
                code: close::GOING_AWAY | close::CONVERSATION_DELETED,
                ..
            }
        ) {
            // Shutdown, or the conversation deleted: runs were stopped first; let watchers
            // hand over their `complete` frames before the close frame, writing them meanwhile.
            let drain = futures_util::future::join_all(watchers.values_mut());
            let _ = tokio::time::timeout(CLOSE_GRACE, async {
                tokio::select! {
                    _ = drain => {}
                    () = wire.write_until_stuck() => {}
                }
            })
            .await;
        }
        for watcher in watchers.values() {
            watcher.abort();
        }
        drop(watchers);
        let state = &self.socket.state;
        match exit {
            Exit::Gone => {}
            Exit::Slow => {
                state.metrics.slow_client_closes.inc();
                state.metrics.close(close::TRY_AGAIN_LATER);
                tracing::info!("closing a client that does not read");
                // Its backlog is dropped; the error and the close frame are said in case the
                // client reads again within the grace; if it does not, the connection is
                // dropped.
                let error =
                    ErrorCode::SlowConsumer.frame("you did not read fast enough; reconnect");
                wire.close_slow(error, CLOSE_GRACE).await;
            }
            Exit::Close { code, error } => {
                state.metrics.close(code);
                // A run socket closing normally may still be sending a large `complete`: give
                // it the same patience as any frame. Other closes need only a moment.
                let grace = if code == close::NORMAL {
                    state.config.sockets.slow_client_timeout
                } else {
                    CLOSE_GRACE
                };
                wire.close(code, error, grace).await;
                if code != close::GOING_AWAY {
                    wire.await_close_reply(CLOSE_GRACE).await;
                }
            }
        }
    }

    async fn run(&mut self, wire: &mut Wire) -> Exit {
        if let ControlFlow::Break(exit) = self.socket.send(&ServerMessage::Connected {
            client_id: self.socket.id,
            protocol_version: PROTOCOL_VERSION,
        }) {
            return exit;
        }
        let config = self.socket.state.config.clone();
        // Shutdown arrives as a note; one that began before this socket was registered is
        // seen here.
        if self.socket.state.shutdown.is_cancelled() {
            return going_away();
        }
        // One timer for the auth deadline (then the token's expiry) and the heartbeat: it
        // fires at whichever is due first.
        let heartbeat_every = config.sockets.heartbeat_interval;
        let mut deadline = Instant::now() + config.sockets.auth_timeout;
        let mut next_ping = Instant::now() + heartbeat_every;
        let mut timer: std::pin::Pin<&mut Sleep> =
            pin!(tokio::time::sleep_until(deadline.min(next_ping)));
        loop {
            let flow = tokio::select! {
                biased;
                note = std::future::poll_fn(|cx| self.socket.inbox.poll_next(cx)) => self.on_note(note),
                () = timer.as_mut() => if Instant::now() >= deadline {
                    ControlFlow::Break(match self.session {
                        None => Exit::close(
                            close::POLICY_VIOLATION,
                            Some((ErrorCode::AuthTimeout, "no auth frame before the deadline")),
                        ),
                        Some(_) => Exit::close(
                            close::TOKEN_EXPIRED,
                            Some((ErrorCode::TokenExpired, "the access token expired; refresh it and reconnect")),
                        ),
                    })
                } else {
                    next_ping = Instant::now() + heartbeat_every;
                    if self.last_seen.elapsed() > heartbeat_every * 2 {
                        ControlFlow::Break(Exit::close(close::HEARTBEAT_TIMEOUT, None))
                    } else {
                        self.socket.queue(Outbound::Ping)
                    }
                },
                event = wire.next_event() => match event {
                    Event::Read(None) | Event::WriteFailed => ControlFlow::Break(Exit::Gone),
                    Event::Stalled => ControlFlow::Break(Exit::Slow),
                    Event::Read(Some(Err(error))) => ControlFlow::Break(read_error(error)),
                    Event::Read(Some(Ok(message))) => {
                        self.last_seen = Instant::now();
                        // Control frames (a pong every heartbeat) get no span of their own.
                        let span = match message {
                            Message::Text(_) | Message::Binary(_) => self.socket.span(),
                            _ => tracing::Span::none(),
                        };
                        // Boxed: the handlers' state would otherwise sit in every idle socket's
                        // task (~1 KiB each, measured).
                        let handling =
                            tracing::Instrument::instrument(self.on_message(message), span);
                        let mut handling = Box::pin(handling);
                        // What is queued keeps going out while a handler waits on the store. A
                        // handler is never dropped half-way: if writing fails meanwhile, it
                        // finishes, and the next turn of the loop meets the failure.
                        tokio::select! {
                            biased;
                            flow = &mut handling => flow,
                            () = wire.write_until_stuck() => handling.await,
                        }
                    }
                },
            };
            if let ControlFlow::Break(exit) = flow {
                return exit;
            }
            if let Some(session) = &self.session {
                deadline = session.expires;
            }
            let due = deadline.min(next_ping);
            if timer.deadline() != due {
                timer.as_mut().reset(due);
            }
        }
    }

    fn on_note(&mut self, note: Control) -> Flow {
        match note {
            Control::RunStarted(handle) => {
                // Announced again (after a gap in the cluster's events) while this socket
                // follows it, or after it was sent all of it (the run ended between the store
                // read behind the announcement and now): nothing to do; watching again would
                // resend it.
                if let Some(session) = &mut self.session
                    && !session.watched(handle.id)
                {
                    session.watch(&self.socket, handle, 0, true);
                }
                ControlFlow::Continue(())
            }
            Control::SlowConsumer => ControlFlow::Break(Exit::Slow),
            Control::RunSent => ControlFlow::Break(Exit::close(close::NORMAL, None)),
            Control::Send(frame) => {
                tracing::debug!(client_id = %self.socket.id, "queueing a frame posted to this socket");
                self.socket.send(&frame)
            }
            Control::Shutdown => ControlFlow::Break(going_away()),
            Control::ConversationDeleted => ControlFlow::Break(Exit::close(
                close::CONVERSATION_DELETED,
                Some((ErrorCode::NotFound, "this conversation was deleted")),
            )),
        }
    }

    async fn on_message(&mut self, message: Message) -> Flow {
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                if !self.socket.within_rate()? {
                    return ControlFlow::Continue(());
                }
                return self.socket.send_error(
                    ErrorCode::BinaryNotSupported,
                    "binary frames are not part of the protocol; send JSON text frames",
                );
            }
            // Pongs and pings only prove liveness; tungstenite answers pings itself.
            Message::Ping(_) | Message::Pong(_) => return ControlFlow::Continue(()),
            Message::Close(_) => return ControlFlow::Break(Exit::Gone),
        };
        if !self.socket.within_rate()? {
            return ControlFlow::Continue(());
        }
        super::handlers::frame(&mut self.socket, &mut self.session, text.as_str()).await
    }
}

impl Socket {
    /// Queues a frame to send; a full queue means the client is not reading.
    pub(super) fn send(&self, frame: &ServerMessage) -> Flow {
        self.queue(Outbound::Text(frame.encode().into()))
    }

    pub(super) fn queue(&self, item: Outbound) -> Flow {
        match self.out.try_push(item) {
            Ok(()) => ControlFlow::Continue(()),
            Err(TryPushError::Full) => ControlFlow::Break(Exit::Slow),
            Err(TryPushError::Closed) => ControlFlow::Break(Exit::Gone),
        }
    }

    pub(super) fn send_error(&self, code: ErrorCode, message: impl Into<String>) -> Flow {
        self.send(&ServerMessage::error(code, message, None))
    }

    /// False (after telling the client) if it is sending faster than its rate limit: the frame
    /// is dropped and the connection stays.
    fn within_rate(&mut self) -> ControlFlow<Exit, bool> {
        if self.rate.try_take() {
            return ControlFlow::Continue(true);
        }
        self.send_error(ErrorCode::RateLimited, "too many frames; slow down")?;
        ControlFlow::Continue(false)
    }

    /// The span of what the socket does: made for each text frame handled and for the close,
    /// not kept open with the socket (an open span costs about 0.5 KiB with the log layer,
    /// more than a tenth of an idle socket; docs/performance.md). Runs a frame starts are its
    /// children.
    fn span(&self) -> tracing::Span {
        tracing::info_span!(
            "ws",
            request_id = self.request_id.as_deref(),
            client_id = %self.id,
            endpoint = self.endpoint.label(),
        )
    }
}

fn going_away() -> Exit {
    Exit::close(
        close::GOING_AWAY,
        Some((
            ErrorCode::ShuttingDown,
            "the server is shutting down; reconnect shortly",
        )),
    )
}

/// A read error: too-large frames and invalid UTF-8 get their RFC 6455 close codes; anything
/// else means the connection is gone.
fn read_error(error: axum::Error) -> Exit {
    let inner = error.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => Exit::close(
            close::MESSAGE_TOO_BIG,
            Some((ErrorCode::TooLarge, "frame larger than the server accepts")),
        ),
        Some(tungstenite::Error::Utf8(_)) => Exit::close(
            close::INVALID_PAYLOAD,
            Some((ErrorCode::InvalidUtf8, "text frame was not valid UTF-8")),
        ),
        _ => Exit::Gone,
    }
}
