//! One socket: a writer task that owns the sink and drains a bounded queue, and the reader loop
//! that handles frames, deadlines, heartbeats and notes from the rest of the server. Run
//! watchers (one task per run this socket follows) feed the same queue.

use std::{collections::HashMap, pin::pin, sync::Arc, time::Duration};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::{
    task::JoinHandle,
    time::{Instant, Sleep},
};
use uuid::Uuid;
use wadi_protocol::{
    ActiveRun, ClientMessage, ErrorCode, PROTOCOL_VERSION, RunStatus, ServerMessage, close,
};

use super::{
    outbox::{Offer, Outbox, TryPushError},
    registry::{Control, Endpoint, Inbox},
};
use crate::{
    auth::{AuthUser, VerifyError},
    error::AppError,
    http::{conversations::check_message, dto},
    limits::TokenBucket,
    metrics::EndpointLabel,
    runs::{self, RunHandle},
    state::AppState,
    store::RunRecord,
};

/// What the writer sends.
pub enum Outbound {
    Text(Utf8Bytes),
    Ping,
    Close(u16, &'static str),
}

/// Frames the writer drains per wake before flushing once.
const WRITE_BATCH: usize = 128;
/// How long a closing socket's last frames may take to go out.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Why the reader loop ended.
enum Exit {
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
    fn close(code: u16, error: Option<(ErrorCode, &str)>) -> Self {
        Self::Close {
            code,
            error: error.map(|(code, message)| code.frame(message)),
        }
    }
}

struct Authed {
    user: AuthUser,
    /// When the token expires (its `exp` plus the verifier's leeway).
    expires: Instant,
}

struct Connection {
    id: Uuid,
    state: AppState,
    endpoint: Endpoint,
    out: Arc<Outbox>,
    inbox: Arc<Inbox>,
    auth: Option<Authed>,
    rate: TokenBucket,
    /// The watcher task of each run this socket follows.
    watchers: HashMap<Uuid, JoinHandle<()>>,
    last_seen: Instant,
}

/// Runs a socket to its end. Whatever ends it, its registry entry and watcher tasks go.
pub async fn serve(socket: WebSocket, state: AppState, endpoint: Endpoint) {
    let id = Uuid::now_v7();
    let span = tracing::info_span!("ws", client_id = %id, endpoint = endpoint.label());
    let inbox = Arc::new(Inbox::default());
    let _registration = state.clients.register(id, endpoint, inbox.clone());
    let gauge = state
        .metrics
        .connections
        .get_or_create(&EndpointLabel {
            endpoint: endpoint.label(),
        })
        .clone();
    gauge.inc();

    let (sink, mut stream) = socket.split();
    let out = Arc::new(Outbox::new(state.config.send_queue));
    let writer = tokio::spawn(write_loop(
        sink,
        out.clone(),
        state.config.slow_client_timeout,
        inbox.clone(),
    ));
    let rate = TokenBucket::new(state.config.ws_rate_burst, state.config.ws_rate_per_second);
    let mut connection = Connection {
        id,
        state: state.clone(),
        endpoint,
        out,
        inbox,
        auth: None,
        rate,
        watchers: HashMap::new(),
        last_seen: Instant::now(),
    };
    let exit = tracing::Instrument::instrument(connection.run(&mut stream), span.clone()).await;

    if matches!(
        exit,
        Exit::Close {
            code: close::GOING_AWAY,
            ..
        }
    ) {
        // Shutdown: runs were stopped and saved first; let watchers hand over their `complete`
        // frames before the close frame.
        let drain = futures_util::future::join_all(connection.watchers.values_mut());
        let _ = tokio::time::timeout(CLOSE_GRACE, drain).await;
    }
    for watcher in connection.watchers.values() {
        watcher.abort();
    }
    match exit {
        Exit::Gone => writer.abort(),
        Exit::Slow => {
            state.metrics.slow_client_closes.inc();
            state.metrics.close(close::TRY_AGAIN_LATER);
            tracing::info!("closing a client that does not read");
            // Said through the queue's reserve, in case the client reads again within the
            // grace; if it does not, the writer is dropped with the socket.
            let error = ErrorCode::SlowConsumer.frame("you did not read fast enough; reconnect");
            let out = connection.out.clone();
            drop(connection);
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
                state.config.slow_client_timeout
            } else {
                CLOSE_GRACE
            };
            let out = connection.out.clone();
            drop(connection);
            close_socket(&out, writer, code, error, grace).await;
        }
    }
    gauge.dec();
}

/// Queues the `error` frame (if any) and the close frame, and waits up to `grace` for each of
/// room in the queue and the writer to send them; a writer still stuck then is dropped.
async fn close_socket(
    out: &Outbox,
    mut writer: JoinHandle<()>,
    code: u16,
    error: Option<ServerMessage>,
    grace: Duration,
) {
    if let Some(error) = error {
        let _ = out.try_push(Outbound::Text(error.encode().into()));
    }
    let close = Outbound::Close(code, close_reason(code));
    let _ = tokio::time::timeout(grace, out.push(close)).await;
    if tokio::time::timeout(grace, &mut writer).await.is_err() {
        writer.abort();
    }
}

fn close_reason(code: u16) -> &'static str {
    match code {
        close::NORMAL => "run complete",
        close::GOING_AWAY => "server shutting down",
        close::INVALID_PAYLOAD => "invalid UTF-8",
        close::POLICY_VIOLATION => "unauthorized",
        close::MESSAGE_TOO_BIG => "frame too large",
        close::TRY_AGAIN_LATER => "try again later",
        close::TOKEN_EXPIRED => "token expired",
        close::HEARTBEAT_TIMEOUT => "heartbeat timeout",
        _ => "internal error",
    }
}

/// Drains the queue into the socket: everything queued goes out with one flush. A flush that
/// stalls past `stall` (the client stopped reading) ends the writer, and with it the socket.
/// However it ends, the outbox is closed so that nobody waits on it any more.
async fn write_loop(
    sink: impl Sink<Message, Error = axum::Error> + Unpin,
    outbox: Arc<Outbox>,
    stall: Duration,
    inbox: Arc<Inbox>,
) {
    write_all(sink, &outbox, stall, &inbox).await;
    outbox.close();
}

async fn write_all(
    mut sink: impl Sink<Message, Error = axum::Error> + Unpin,
    outbox: &Outbox,
    stall: Duration,
    inbox: &Inbox,
) {
    let mut batch = Vec::new();
    while outbox.pop_many(&mut batch, WRITE_BATCH).await > 0 {
        let mut closing = None;
        for item in batch.drain(..) {
            let message = match item {
                Outbound::Text(text) => Message::Text(text),
                Outbound::Ping => Message::Ping(axum::body::Bytes::new()),
                Outbound::Close(code, reason) => {
                    closing = Some(CloseFrame {
                        code,
                        reason: reason.into(),
                    });
                    break;
                }
            };
            if sink.feed(message).await.is_err() {
                return;
            }
        }
        match tokio::time::timeout(stall, sink.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                // Tell the reader before the outbox closes, so it counts a slow client.
                inbox.post(Control::SlowConsumer);
                return;
            }
        }
        if let Some(frame) = closing {
            let _ = tokio::time::timeout(stall, sink.send(Message::Close(Some(frame)))).await;
            return;
        }
        // Give back a large batch's memory between bursts.
        if batch.capacity() > WRITE_BATCH {
            batch = Vec::new();
        }
    }
}

impl Connection {
    async fn run(
        &mut self,
        stream: &mut (impl Stream<Item = Result<Message, axum::Error>> + Unpin),
    ) -> Exit {
        if let Err(exit) = self.send(&ServerMessage::Connected {
            client_id: self.id,
            protocol_version: PROTOCOL_VERSION,
        }) {
            return exit;
        }
        let config = self.state.config.clone();
        let shutdown = self.state.shutdown.clone();
        let mut deadline: std::pin::Pin<&mut Sleep> = pin!(tokio::time::sleep(config.auth_timeout));
        let heartbeat_every = config.heartbeat_interval;
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + heartbeat_every, heartbeat_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let step = tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    Err(Exit::close(close::GOING_AWAY, Some((ErrorCode::ShuttingDown, "the server is shutting down; reconnect shortly"))))
                }
                () = deadline.as_mut() => Err(match self.auth {
                    None => Exit::close(
                        close::POLICY_VIOLATION,
                        Some((ErrorCode::AuthTimeout, "no auth frame before the deadline")),
                    ),
                    Some(_) => Exit::close(
                        close::TOKEN_EXPIRED,
                        Some((ErrorCode::TokenExpired, "the access token expired; refresh it and reconnect")),
                    ),
                }),
                note = self.inbox.next() => match note {
                    Control::RunStarted(handle) => {
                        self.watch(handle, 0, true);
                        Ok(())
                    }
                    Control::SlowConsumer => Err(Exit::Slow),
                    Control::RunSent => Err(Exit::close(close::NORMAL, None)),
                },
                _ = heartbeat.tick() => {
                    if self.last_seen.elapsed() > heartbeat_every * 2 {
                        Err(Exit::close(close::HEARTBEAT_TIMEOUT, None))
                    } else {
                        self.queue(Outbound::Ping)
                    }
                }
                () = self.out.closed() => Err(Exit::Gone),
                frame = stream.next() => match frame {
                    None => Err(Exit::Gone),
                    Some(Err(error)) => Err(read_error(error)),
                    Some(Ok(message)) => {
                        self.last_seen = Instant::now();
                        // Boxed: the handlers' state would otherwise sit in every idle socket's
                        // task (~1 KiB each, measured).
                        Box::pin(self.on_message(message)).await
                    }
                },
            };
            if let Err(exit) = step {
                return exit;
            }
            if let Some(authed) = &self.auth
                && deadline.deadline() != authed.expires
            {
                deadline.as_mut().reset(authed.expires);
            }
        }
    }

    /// Queues a frame for the writer; a full queue means the client is not reading.
    fn send(&self, frame: &ServerMessage) -> Result<(), Exit> {
        self.queue(Outbound::Text(frame.encode().into()))
    }

    fn queue(&self, item: Outbound) -> Result<(), Exit> {
        match self.out.try_push(item) {
            Ok(()) => Ok(()),
            Err(TryPushError::Full) => Err(Exit::Slow),
            Err(TryPushError::Closed) => Err(Exit::Gone),
        }
    }

    fn send_error(&self, code: ErrorCode, message: impl Into<String>) -> Result<(), Exit> {
        self.send(&ServerMessage::error(code, message, None))
    }

    /// An `error` frame for a failed server operation, without internal details.
    fn send_app_error(&self, error: AppError) -> Result<(), Exit> {
        let code = error.code();
        let message = if error.status_code().is_server_error() && code != ErrorCode::ShuttingDown {
            tracing::error!(%error, "socket request failed");
            "the server could not do that; try again".to_owned()
        } else {
            error.to_string()
        };
        self.send_error(code, message)
    }

    async fn on_message(&mut self, message: Message) -> Result<(), Exit> {
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                if !self.within_rate()? {
                    return Ok(());
                }
                return self.send_error(
                    ErrorCode::BinaryNotSupported,
                    "binary frames are not part of the protocol; send JSON text frames",
                );
            }
            // Pongs and pings only prove liveness; tungstenite answers pings itself.
            Message::Ping(_) | Message::Pong(_) => return Ok(()),
            Message::Close(_) => return Err(Exit::Gone),
        };
        if !self.within_rate()? {
            return Ok(());
        }
        let frame = match ClientMessage::decode(text.as_str()) {
            Ok(frame) => frame,
            Err(error) => return self.send(&ServerMessage::from(error)),
        };
        match frame {
            ClientMessage::Ping => self.send(&ServerMessage::Pong),
            ClientMessage::Auth { token } => self.on_auth(&token).await,
            _ if self.auth.is_none() => self.send_error(
                ErrorCode::NotAuthenticated,
                "send an auth frame with your access token first",
            ),
            ClientMessage::Message {
                content,
                client_message_id,
            } => self.on_send(content, client_message_id).await,
            ClientMessage::Stop { run_id } => self.on_stop(run_id),
            ClientMessage::Resume { run_id, after_seq } => self.on_resume(run_id, after_seq).await,
        }
    }

    /// False (after telling the client) if it is sending faster than its rate limit: the frame
    /// is dropped and the connection stays.
    fn within_rate(&mut self) -> Result<bool, Exit> {
        if self.rate.try_take() {
            return Ok(true);
        }
        self.send_error(ErrorCode::RateLimited, "too many frames; slow down")?;
        Ok(false)
    }

    async fn on_auth(&mut self, token: &str) -> Result<(), Exit> {
        let user = match self.state.auth.verifier.verify(token).await {
            Ok(user) => user,
            Err(error) => {
                self.state.metrics.auth_failure(error.reason());
                tracing::info!(reason = error.reason(), "socket auth refused");
                let code = match error {
                    VerifyError::Expired => ErrorCode::TokenExpired,
                    _ => ErrorCode::InvalidToken,
                };
                let message = format!("token refused: {error}");
                if self.auth.is_none() {
                    return Err(Exit::Close {
                        code: close::POLICY_VIOLATION,
                        error: Some(code.frame(message)),
                    });
                }
                // A bad refresh keeps the connection on its current token.
                return self.send_error(code, message);
            }
        };
        let expires = expiry_instant(user.expires_at, self.state.config.jwt_leeway);
        if let Some(authed) = &mut self.auth {
            if authed.user.id != user.id {
                return self.send_error(
                    ErrorCode::UserMismatch,
                    "a refreshed token must belong to the same user",
                );
            }
            authed.user = user;
            authed.expires = expires;
            let frame = self.authenticated_frame();
            return self.send(&frame);
        }

        // First auth: the socket's conversation or run must be the caller's. Missing and
        // foreign answer identically.
        let allowed = match self.endpoint {
            Endpoint::Chat { conversation_id } => self
                .state
                .store
                .conversation(conversation_id, user.id)
                .await
                .map(|found| found.is_some()),
            Endpoint::Run { run_id, .. } => self
                .state
                .store
                .run(run_id, user.id)
                .await
                .map(|found| found.is_some()),
        };
        match allowed {
            Ok(true) => {}
            Ok(false) => {
                self.state.metrics.auth_failure("not_found");
                return Err(Exit::close(
                    close::POLICY_VIOLATION,
                    Some((ErrorCode::NotFound, "no such conversation or run")),
                ));
            }
            Err(error) => {
                tracing::error!(%error, "cannot check socket access");
                return Err(Exit::close(
                    close::INTERNAL_ERROR,
                    Some((
                        ErrorCode::InternalError,
                        "the server could not check access",
                    )),
                ));
            }
        }
        if self
            .state
            .clients
            .authenticate(self.id, user.id, self.state.config.max_connections_per_user)
            .is_err()
        {
            return Err(Exit::close(
                close::TRY_AGAIN_LATER,
                Some((
                    ErrorCode::TooManyConnections,
                    "too many open connections for this user",
                )),
            ));
        }
        self.auth = Some(Authed { user, expires });
        let frame = self.authenticated_frame();
        self.send(&frame)?;
        if let Endpoint::Run { run_id, after_seq } = self.endpoint {
            match self.state.hub.get(run_id) {
                Some(handle) => self.watch(handle, after_seq, false),
                None => {
                    self.send_stored_outcome(run_id).await?;
                    return Err(Exit::close(close::NORMAL, None));
                }
            }
        }
        Ok(())
    }

    fn authenticated_frame(&self) -> ServerMessage {
        let (user_id, expires_at) = self
            .auth
            .as_ref()
            .map_or((Uuid::nil(), 0), |a| (a.user.id, a.user.expires_at));
        let active_run = match self.endpoint {
            Endpoint::Chat { conversation_id } => {
                self.state
                    .hub
                    .active_for(conversation_id)
                    .map(|handle| ActiveRun {
                        run_id: handle.id,
                        message_id: handle.message_id,
                        last_seq: handle.last_seq(),
                    })
            }
            Endpoint::Run { .. } => None,
        };
        ServerMessage::Authenticated {
            user_id,
            expires_at,
            active_run,
        }
    }

    async fn on_send(
        &mut self,
        content: String,
        client_message_id: Option<String>,
    ) -> Result<(), Exit> {
        let Endpoint::Chat { conversation_id } = self.endpoint else {
            return self.send_error(
                ErrorCode::InvalidRequest,
                "messages are sent on a chat socket, not a run socket",
            );
        };
        let Some(user) = self.auth.as_ref().map(|a| a.user.clone()) else {
            return Ok(());
        };
        if let Err(error) = check_message(
            &content,
            client_message_id.as_deref(),
            self.state.config.max_content_bytes,
        ) {
            return self.send_app_error(error);
        }
        let sent = match runs::send(
            &self.state,
            &user,
            conversation_id,
            content,
            client_message_id,
        )
        .await
        {
            Ok(sent) => sent,
            Err(error) => return self.send_app_error(error),
        };
        if sent.created {
            // The run was announced to every socket of the conversation, this one included.
            return Ok(());
        }
        // A resend of a message already committed: show its run. The sender always gets a
        // `start` (it is how it learns the message was committed), even when this socket
        // already follows the run.
        match (sent.handle, sent.run) {
            (Some(handle), _) if !handle.is_finished() => {
                if self.watchers.contains_key(&handle.id) {
                    self.send(&handle.start_frame())
                } else {
                    self.watch(handle, 0, true);
                    Ok(())
                }
            }
            (_, Some(run)) => {
                self.send(&ServerMessage::Start {
                    run_id: run.id,
                    conversation_id: run.conversation_id,
                    message_id: run.message_id,
                    client_message_id: sent.message.client_message_id.clone(),
                })?;
                let fresh = self.state.store.run(run.id, user.id).await.ok().flatten();
                self.send_outcome(&fresh.unwrap_or(run))
            }
            (_, None) => Ok(()),
        }
    }

    fn on_stop(&mut self, run_id: Option<Uuid>) -> Result<(), Exit> {
        let target = match self.endpoint {
            Endpoint::Chat { conversation_id } => match run_id {
                Some(id) => self
                    .state
                    .hub
                    .get(id)
                    .filter(|handle| handle.conversation_id == conversation_id),
                None => self.state.hub.active_for(conversation_id),
            },
            Endpoint::Run {
                run_id: own_run, ..
            } => {
                if run_id.is_some_and(|id| id != own_run) {
                    return self.send_error(
                        ErrorCode::InvalidRequest,
                        "a run socket can only stop its own run",
                    );
                }
                self.state.hub.get(own_run)
            }
        };
        match target.filter(|handle| !handle.is_finished()) {
            Some(handle) => {
                tracing::info!(run_id = %handle.id, "stop requested");
                handle.stop(RunStatus::Stopped);
                Ok(())
            }
            None => self.send_error(ErrorCode::NoActiveRun, "no run is streaming"),
        }
    }

    async fn on_resume(&mut self, run_id: Uuid, after_seq: u64) -> Result<(), Exit> {
        let Endpoint::Chat { conversation_id } = self.endpoint else {
            return self.send_error(
                ErrorCode::InvalidRequest,
                "run sockets resume with ?afterSeq= on their URL",
            );
        };
        if let Some(handle) = self
            .state
            .hub
            .get(run_id)
            .filter(|handle| handle.conversation_id == conversation_id)
        {
            self.watch(handle, after_seq, false);
            return Ok(());
        }
        let Some(user) = self.auth.as_ref().map(|a| a.user.id) else {
            return Ok(());
        };
        match self.state.store.run(run_id, user).await {
            Ok(Some(run)) if run.conversation_id == conversation_id => self.send_outcome(&run),
            Ok(_) => self.send_error(ErrorCode::NotFound, "no such run in this conversation"),
            Err(error) => self.send_app_error(error.into()),
        }
    }

    /// A run no longer in memory: its saved output as `complete`.
    async fn send_stored_outcome(&self, run_id: Uuid) -> Result<(), Exit> {
        let user = self.auth.as_ref().map_or(Uuid::nil(), |a| a.user.id);
        match self.state.store.run(run_id, user).await {
            Ok(Some(run)) => self.send_outcome(&run),
            Ok(None) => self.send_error(ErrorCode::NotFound, "no such run"),
            Err(error) => self.send_app_error(error.into()),
        }
    }

    fn send_outcome(&self, run: &RunRecord) -> Result<(), Exit> {
        self.send(&dto::complete_frame(run))
    }

    /// Follows a run on this socket from the chunk after `after_seq`, replacing any watcher of
    /// the same run. The watcher never blocks the run: if the queue stays full for the slow-client
    /// timeout, the socket is closed.
    fn watch(&mut self, handle: Arc<RunHandle>, after_seq: u64, with_start: bool) {
        self.watchers.retain(|_, task| !task.is_finished());
        if let Some(previous) = self.watchers.remove(&handle.id) {
            previous.abort();
        }
        let run_id = handle.id;
        let out = self.out.clone();
        let inbox = self.inbox.clone();
        let metrics = self.state.metrics.clone();
        let patience = self.state.config.slow_client_timeout;
        let run_socket = matches!(self.endpoint, Endpoint::Run { .. });
        let task = tokio::spawn(async move {
            let mut frames = pin!(handle.follow(after_seq, with_start));
            while let Some(frame) = frames.next().await {
                let is_chunk = matches!(frame, ServerMessage::Chunk { .. });
                let text = frame.encode();
                let bytes = text.len() as u64;
                // Usually there is room; only a full queue waits, at most `patience`.
                match out.offer(Outbound::Text(text.into())) {
                    Offer::Queued => {}
                    Offer::Closed => return,
                    Offer::Full(item) => match tokio::time::timeout(patience, out.push(item)).await
                    {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return,
                        Err(_) => {
                            inbox.post(Control::SlowConsumer);
                            return;
                        }
                    },
                }
                if is_chunk {
                    metrics.chunks_sent.inc();
                }
                metrics.bytes_sent.inc_by(bytes);
            }
            if run_socket {
                inbox.post(Control::RunSent);
            }
        });
        self.watchers.insert(run_id, task);
    }
}

/// The instant a token stops being accepted: its `exp` plus the verifier's leeway.
fn expiry_instant(exp: i64, leeway: Duration) -> Instant {
    let now = crate::util::now_millis();
    let remaining_ms = exp
        .saturating_mul(1000)
        .saturating_add(i64::try_from(leeway.as_millis()).unwrap_or(0))
        .saturating_sub(now);
    Instant::now() + Duration::from_millis(u64::try_from(remaining_ms).unwrap_or(0))
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
