//! One socket's loop: a `select!` over the next frame, the auth deadline or token expiry, notes
//! from the rest of the server, the heartbeat and shutdown. Frames go to the handlers
//! (`handlers.rs`); writes go through the socket's bounded queue to the writer (`writer.rs`).
//! However the socket ends, its registry entry and run watchers go, and a close frame is sent
//! when one can be.

use std::{collections::HashMap, ops::ControlFlow, pin::pin, sync::Arc, time::Duration};

use axum::extract::ws::{Message, WebSocket};
use futures_util::{Stream, StreamExt};
use tokio::{
    task::JoinHandle,
    time::{Instant, Sleep},
};
use uuid::Uuid;
use wadi_protocol::{ErrorCode, PROTOCOL_VERSION, ServerMessage, close};

use super::{
    outbox::{Outbox, TryPushError},
    registry::{Control, Endpoint, Inbox},
    writer::{Outbound, close_socket, write_loop},
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
pub async fn serve(socket: WebSocket, state: AppState, endpoint: Endpoint, addr: std::net::IpAddr) {
    let id = Uuid::now_v7();
    let span = tracing::info_span!("ws", client_id = %id, endpoint = endpoint.label());
    let inbox = Arc::new(Inbox::default());
    let _registration = state.clients.register(id, endpoint, inbox.clone(), addr);
    let gauge = state
        .metrics
        .connections
        .get_or_create(&EndpointLabel {
            endpoint: endpoint.label(),
        })
        .clone();
    gauge.inc();

    let (sink, mut stream) = socket.split();
    let out = Arc::new(Outbox::new(
        state.config.sockets.send_queue,
        state.config.sockets.send_queue_bytes,
    ));
    let writer = tokio::spawn(write_loop(
        sink,
        out.clone(),
        state.config.sockets.slow_client_timeout,
        inbox.clone(),
    ));
    let rate = TokenBucket::new(
        state.config.sockets.ws_rate_burst,
        state.config.sockets.ws_rate_per_second,
    );
    let mut connection = Connection {
        socket: Socket {
            id,
            state: state.clone(),
            endpoint,
            out,
            inbox,
            rate,
        },
        session: None,
        last_seen: Instant::now(),
    };
    let exit = tracing::Instrument::instrument(connection.run(&mut stream), span.clone()).await;

    let mut watchers = connection
        .session
        .take()
        .map(|session| session.watchers)
        .unwrap_or_default();
    if matches!(
        exit,
        Exit::Close {
            code: close::GOING_AWAY,
            ..
        }
    ) {
        // Shutdown: runs were stopped and saved first; let watchers hand over their `complete`
        // frames before the close frame.
        let drain = futures_util::future::join_all(watchers.values_mut());
        let _ = tokio::time::timeout(CLOSE_GRACE, drain).await;
    }
    for watcher in watchers.values() {
        watcher.abort();
    }
    let out = connection.socket.out.clone();
    drop(connection);
    match exit {
        Exit::Gone => writer.abort(),
        Exit::Slow => {
            state.metrics.slow_client_closes.inc();
            state.metrics.close(close::TRY_AGAIN_LATER);
            tracing::info!("closing a client that does not read");
            // Said through the queue's reserve, in case the client reads again within the
            // grace; if it does not, the writer is dropped with the socket.
            let error = ErrorCode::SlowConsumer.frame("you did not read fast enough; reconnect");
            close_socket(
                &out,
                writer,
                close::TRY_AGAIN_LATER,
                Some(error),
                CLOSE_GRACE,
            )
            .await;
        }
        Exit::Close { code, error } => {
            state.metrics.close(code);
            // A run socket closing normally may still be sending a large `complete`: give it
            // the same patience as any frame. Other closes need only a moment.
            let grace = if code == close::NORMAL {
                state.config.sockets.slow_client_timeout
            } else {
                CLOSE_GRACE
            };
            close_socket(&out, writer, code, error, grace).await;
            if code != close::GOING_AWAY {
                await_close_reply(&mut stream).await;
            }
        }
    }
    gauge.dec();
}

/// The closing handshake's second half: the client's close frame (or the end of its stream),
/// for at most [`CLOSE_GRACE`]. Dropping the connection right after our close frame would let
/// whatever the client sends meanwhile (a pong, its own close) reach a closed socket, whose
/// reset can discard our close frame, unread, on the client's side: it would see 1006 instead
/// of our code.
async fn await_close_reply(
    stream: &mut (impl Stream<Item = Result<Message, axum::Error>> + Unpin),
) {
    let reply = async {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, reply).await;
}

impl Connection {
    async fn run(
        &mut self,
        stream: &mut (impl Stream<Item = Result<Message, axum::Error>> + Unpin),
    ) -> Exit {
        if let ControlFlow::Break(exit) = self.socket.send(&ServerMessage::Connected {
            client_id: self.socket.id,
            protocol_version: PROTOCOL_VERSION,
        }) {
            return exit;
        }
        let config = self.socket.state.config.clone();
        let shutdown = self.socket.state.shutdown.clone();
        let mut deadline: std::pin::Pin<&mut Sleep> =
            pin!(tokio::time::sleep(config.sockets.auth_timeout));
        let heartbeat_every = config.sockets.heartbeat_interval;
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + heartbeat_every, heartbeat_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let flow = tokio::select! {
                biased;
                () = shutdown.cancelled() => ControlFlow::Break(Exit::close(
                    close::GOING_AWAY,
                    Some((ErrorCode::ShuttingDown, "the server is shutting down; reconnect shortly")),
                )),
                () = deadline.as_mut() => ControlFlow::Break(match self.session {
                    None => Exit::close(
                        close::POLICY_VIOLATION,
                        Some((ErrorCode::AuthTimeout, "no auth frame before the deadline")),
                    ),
                    Some(_) => Exit::close(
                        close::TOKEN_EXPIRED,
                        Some((ErrorCode::TokenExpired, "the access token expired; refresh it and reconnect")),
                    ),
                }),
                note = self.socket.inbox.next() => self.on_note(note),
                _ = heartbeat.tick() => {
                    if self.last_seen.elapsed() > heartbeat_every * 2 {
                        ControlFlow::Break(Exit::close(close::HEARTBEAT_TIMEOUT, None))
                    } else {
                        self.socket.queue(Outbound::Ping)
                    }
                }
                () = self.socket.out.closed() => ControlFlow::Break(Exit::Gone),
                frame = stream.next() => match frame {
                    None => ControlFlow::Break(Exit::Gone),
                    Some(Err(error)) => ControlFlow::Break(read_error(error)),
                    Some(Ok(message)) => {
                        self.last_seen = Instant::now();
                        // Boxed: the handlers' state would otherwise sit in every idle socket's
                        // task (~1 KiB each, measured).
                        Box::pin(self.on_message(message)).await
                    }
                },
            };
            if let ControlFlow::Break(exit) = flow {
                return exit;
            }
            if let Some(session) = &self.session
                && deadline.deadline() != session.expires
            {
                deadline.as_mut().reset(session.expires);
            }
        }
    }

    fn on_note(&mut self, note: Control) -> Flow {
        match note {
            Control::RunStarted(handle) => {
                if let Some(session) = &mut self.session {
                    session.watch(&self.socket, handle, 0, true);
                }
                ControlFlow::Continue(())
            }
            Control::SlowConsumer => ControlFlow::Break(Exit::Slow),
            Control::RunSent => ControlFlow::Break(Exit::close(close::NORMAL, None)),
            Control::Send(frame) => self.socket.send(&frame),
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
    /// Queues a frame for the writer; a full queue means the client is not reading.
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
