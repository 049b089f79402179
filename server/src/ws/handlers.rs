//! What each client frame does. Before authentication only `ping` and `auth` are accepted;
//! after it, every handler works with the socket's [`Session`] (the verified user), never with
//! an optional one.

use std::{collections::HashMap, ops::ControlFlow, pin::pin, sync::Arc, time::Duration};

use futures_util::StreamExt;
use tokio::time::Instant;
use wadi_protocol::{ActiveRun, ClientMessage, ErrorCode, ServerMessage, close};

use super::{
    outbox::Offer,
    registry::{Control, Endpoint},
    socket::{Exit, Flow, Session, Socket},
    wire::Outbound,
};
use crate::{
    auth::{AuthUser, VerifyError},
    content::check_message,
    error::AppError,
    ids::{MessageId, RunId},
    runs::{FrameKind, Placement, RunHandle},
};

/// Handles one text frame.
pub(super) async fn frame(socket: &mut Socket, session: &mut Option<Session>, text: &str) -> Flow {
    let frame = match ClientMessage::decode(text) {
        Ok(frame) => frame,
        Err(error) => return socket.send(&ServerMessage::from(error)),
    };
    let session = match (frame, session) {
        (ClientMessage::Ping, _) => return socket.send(&ServerMessage::Pong),
        (ClientMessage::Auth { token }, Some(session)) => {
            return refresh(socket, session, &token).await;
        }
        (ClientMessage::Auth { token }, session @ None) => {
            *session = Some(authenticate(socket, &token).await?);
            return ControlFlow::Continue(());
        }
        (_, None) => {
            return socket.send_error(
                ErrorCode::NotAuthenticated,
                "send an auth frame with your access token first",
            );
        }
        (frame, Some(session)) => (frame, session),
    };
    match session {
        (
            ClientMessage::Message {
                content,
                client_message_id,
                parent_id,
                edit_of,
            },
            session,
        ) => {
            let placement = match Placement::from_request(parent_id, edit_of) {
                Ok(placement) => placement,
                Err(error) => return send_app_error(socket, error),
            };
            send(socket, session, content, client_message_id, placement).await
        }
        (ClientMessage::Regenerate { message_id }, session) => {
            regenerate(socket, session, message_id.into()).await
        }
        (ClientMessage::Stop { run_id }, session) => stop(socket, session, run_id).await,
        (ClientMessage::Resume { run_id, after_seq }, session) => {
            resume(socket, session, run_id.into(), after_seq).await
        }
        (ClientMessage::Ping | ClientMessage::Auth { .. }, _) => ControlFlow::Continue(()),
    }
}

/// Verifies a token; a refusal is told with the reason's code.
async fn verify(socket: &Socket, token: &str) -> Result<AuthUser, (ErrorCode, String)> {
    socket.state.auth.verify(token).await.map_err(|error| {
        socket.state.metrics.auth_failure(error.reason());
        tracing::info!(reason = error.reason(), "socket auth refused");
        let code = match error {
            VerifyError::Expired => ErrorCode::TokenExpired,
            _ => ErrorCode::InvalidToken,
        };
        (code, format!("token refused: {error}"))
    })
}

/// The first `auth`: the socket's conversation or run must be the caller's (missing and foreign
/// answer identically), and the user under their socket cap. A chat socket learns the
/// conversation's active run; a run socket starts following its run.
async fn authenticate(socket: &mut Socket, token: &str) -> ControlFlow<Exit, Session> {
    let user = match verify(socket, token).await {
        Ok(user) => user,
        Err((code, message)) => {
            return ControlFlow::Break(Exit::Close {
                code: close::POLICY_VIOLATION,
                error: Some(code.frame(message)),
            });
        }
    };
    let runs = socket.state.runs.clone();
    let followed = match socket.endpoint {
        Endpoint::Chat { conversation_id } => socket
            .state
            .store
            .conversation(conversation_id, user.id)
            .await
            .map(|found| found.map(|_| None)),
        Endpoint::Run { run_id, .. } => runs
            .find(run_id, user.id)
            .await
            .map(|found| found.map(Some)),
        Endpoint::User => Ok(Some(None)),
    };
    let run = match followed {
        Ok(Some(run)) => run,
        Ok(None) => {
            socket.state.metrics.auth_failure("not_found");
            return ControlFlow::Break(Exit::close(
                close::POLICY_VIOLATION,
                Some((ErrorCode::NotFound, "no such conversation or run")),
            ));
        }
        Err(error) if error.is_unavailable() => {
            tracing::warn!(%error, "cannot check socket access: the store is unavailable");
            return ControlFlow::Break(Exit::close(
                close::TRY_AGAIN_LATER,
                Some((
                    ErrorCode::Unavailable,
                    "the server cannot reach its storage right now; reconnect in a moment",
                )),
            ));
        }
        Err(error) => {
            tracing::error!(%error, "cannot check socket access");
            return ControlFlow::Break(Exit::close(
                close::INTERNAL_ERROR,
                Some((
                    ErrorCode::InternalError,
                    "the server could not check access",
                )),
            ));
        }
    };
    if socket
        .state
        .clients
        .authenticate(
            socket.id,
            user.id,
            socket.state.config.sockets.max_connections_per_user,
        )
        .is_err()
    {
        return ControlFlow::Break(Exit::close(
            close::TRY_AGAIN_LATER,
            Some((
                ErrorCode::TooManyConnections,
                "too many open connections for this user",
            )),
        ));
    }
    let expires = expiry_instant(socket, user.expires_at);
    let mut session = match socket.endpoint {
        Endpoint::Chat { conversation_id } => {
            // Subscribed before the active run is looked up: a run started after the lookup is
            // announced, one started before it is found.
            let user_events = runs.watch_user(user.id).await;
            let active = runs
                .active_for(conversation_id)
                .await
                .unwrap_or_else(|error| {
                    tracing::warn!(%error, "cannot look up the conversation's active run");
                    None
                });
            let session = Session {
                user,
                expires,
                _user_events: user_events,
                watchers: HashMap::new(),
            };
            socket.send(&authenticated_frame(&session, active.as_deref()))?;
            session
        }
        Endpoint::Run { .. } => {
            let session = Session {
                user,
                expires,
                _user_events: crate::runs::Lease::none(),
                watchers: HashMap::new(),
            };
            socket.send(&authenticated_frame(&session, None))?;
            session
        }
        Endpoint::User => {
            // Subscribed to the user's channel, so that changes made through other instances
            // reach this socket too.
            let user_events = runs.watch_user(user.id).await;
            tracing::debug!(client_id = %socket.id, user_id = %user.id, "user socket authenticated");
            let session = Session {
                user,
                expires,
                _user_events: user_events,
                watchers: HashMap::new(),
            };
            socket.send(&authenticated_frame(&session, None))?;
            session
        }
    };
    if let (Endpoint::Run { after_seq, .. }, Some(handle)) = (socket.endpoint, run) {
        session.watch(socket, handle, after_seq, false);
    }
    ControlFlow::Continue(session)
}

/// A later `auth`: a refreshed token for the same user extends the socket; a bad one keeps the
/// socket on its current token.
async fn refresh(socket: &Socket, session: &mut Session, token: &str) -> Flow {
    let user = match verify(socket, token).await {
        Ok(user) => user,
        Err((code, message)) => return socket.send_error(code, message),
    };
    if user.id != session.user.id {
        return socket.send_error(
            ErrorCode::UserMismatch,
            "a refreshed token must belong to the same user",
        );
    }
    session.expires = expiry_instant(socket, user.expires_at);
    session.user = user;
    let active = match socket.endpoint {
        Endpoint::Chat { conversation_id } => socket
            .state
            .runs
            .active_for(conversation_id)
            .await
            .unwrap_or_else(|error| {
                tracing::warn!(%error, "cannot look up the conversation's active run");
                None
            }),
        Endpoint::Run { .. } | Endpoint::User => None,
    };
    socket.send(&authenticated_frame(session, active.as_deref()))
}

fn authenticated_frame(session: &Session, active: Option<&RunHandle>) -> ServerMessage {
    ServerMessage::Authenticated {
        user_id: session.user.id.into(),
        expires_at: session.user.expires_at,
        active_run: active.map(|handle| ActiveRun {
            run_id: handle.id.into(),
            message_id: handle.message_id.into(),
            last_seq: handle.last_seq(),
        }),
    }
}

/// An `error` frame for a failed server operation, without internal details.
fn send_app_error(socket: &Socket, error: AppError) -> Flow {
    let code = error.code();
    if let AppError::Overloaded { retry_after } = &error {
        return socket.send(&ServerMessage::Error {
            code,
            message: error.to_string(),
            run_id: None,
            retry_after_ms: Some(u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX)),
        });
    }
    let message = if matches!(error, AppError::Unavailable(_)) {
        tracing::warn!(%error, "socket request failed: storage unavailable");
        "the server cannot reach its storage right now; nothing was saved, try again shortly"
            .to_owned()
    } else if error.status_code().is_server_error() && code != ErrorCode::ShuttingDown {
        tracing::error!(%error, "socket request failed");
        "the server could not do that; try again".to_owned()
    } else {
        error.to_string()
    };
    socket.send_error(code, message)
}

async fn send(
    socket: &Socket,
    session: &mut Session,
    content: String,
    client_message_id: Option<String>,
    placement: Placement,
) -> Flow {
    let Endpoint::Chat { conversation_id } = socket.endpoint else {
        return socket.send_error(
            ErrorCode::InvalidRequest,
            "messages are sent on a chat socket (/ws/chat/{conversationId})",
        );
    };
    if let Err(error) = check_message(
        &content,
        client_message_id.as_deref(),
        socket.state.config.runs.max_content_bytes,
    ) {
        return send_app_error(socket, error);
    }
    let sent = match socket
        .state
        .runs
        .send(
            session.user.id,
            conversation_id,
            content,
            client_message_id,
            placement,
        )
        .await
    {
        Ok(sent) => sent,
        Err(error) => return send_app_error(socket, error),
    };
    if sent.created {
        // The run was announced to every socket of the conversation, this one included.
        return ControlFlow::Continue(());
    }
    // A resend of a message already committed: show its run. The sender always gets a `start`
    // (it is how it learns the message was committed), even when this socket already follows
    // the run.
    let Some(handle) = sent.handle else {
        return ControlFlow::Continue(());
    };
    let start = ServerMessage::Start {
        run_id: handle.id.into(),
        conversation_id: handle.conversation_id.into(),
        message_id: handle.message_id.into(),
        client_message_id: sent.message.client_message_id.clone(),
    };
    if session.follows(handle.id) {
        return socket.send(&start);
    }
    socket.send(&start)?;
    session.watch(socket, handle, 0, false);
    ControlFlow::Continue(())
}

/// `regenerate`: another answer to a user message of this conversation. The run is announced
/// (`start`) to every socket of the conversation, this one included.
async fn regenerate(socket: &Socket, session: &mut Session, message_id: MessageId) -> Flow {
    let Endpoint::Chat { conversation_id } = socket.endpoint else {
        return socket.send_error(
            ErrorCode::InvalidRequest,
            "answers are regenerated on a chat socket (/ws/chat/{conversationId})",
        );
    };
    match socket
        .state
        .runs
        .regenerate(session.user.id, conversation_id, message_id)
        .await
    {
        Ok(_) => ControlFlow::Continue(()),
        Err(error) => send_app_error(socket, error),
    }
}

async fn stop(socket: &Socket, session: &Session, run_id: Option<uuid::Uuid>) -> Flow {
    let runs = &socket.state.runs;
    let target = match socket.endpoint {
        Endpoint::Chat { conversation_id } => match run_id {
            Some(id) => runs
                .find(id.into(), session.user.id)
                .await
                .map(|found| found.filter(|handle| handle.conversation_id == conversation_id)),
            None => runs.active_for(conversation_id).await,
        },
        Endpoint::Run {
            run_id: own_run, ..
        } => {
            if run_id.is_some_and(|id| RunId::from(id) != own_run) {
                return socket.send_error(
                    ErrorCode::InvalidRequest,
                    "a run socket can only stop its own run",
                );
            }
            runs.find(own_run, session.user.id).await
        }
        Endpoint::User => {
            return socket.send_error(
                ErrorCode::InvalidRequest,
                "answers are stopped on a chat or run socket, not the user socket",
            );
        }
    };
    let handle = match target {
        Ok(Some(handle)) => handle,
        Ok(None) => return socket.send_error(ErrorCode::NoActiveRun, "no run is streaming"),
        Err(error) => return send_app_error(socket, error.into()),
    };
    match runs.stop(&handle, session.user.id).await {
        Ok(()) => ControlFlow::Continue(()),
        Err(error) => send_app_error(socket, error),
    }
}

async fn resume(socket: &Socket, session: &mut Session, run_id: RunId, after_seq: u64) -> Flow {
    let Endpoint::Chat { conversation_id } = socket.endpoint else {
        return socket.send_error(
            ErrorCode::InvalidRequest,
            "resume is for chat sockets (run sockets resume with ?afterSeq= on their URL)",
        );
    };
    if !session.follows(run_id) && session.following() >= MAX_FOLLOWED {
        // Each resume of a finished run queues its whole answer: bounded per socket.
        return socket.send_error(
            ErrorCode::RateLimited,
            format!("at most {MAX_FOLLOWED} runs are followed at once on a socket"),
        );
    }
    match socket.state.runs.find(run_id, session.user.id).await {
        Ok(Some(handle)) if handle.conversation_id == conversation_id => {
            session.watch(socket, handle, after_seq, false);
            ControlFlow::Continue(())
        }
        Ok(_) => socket.send_error(ErrorCode::NotFound, "no such run in this conversation"),
        Err(error) => send_app_error(socket, error.into()),
    }
}

/// Runs a socket may follow at once through `resume` (a conversation has one active run; a
/// handful more covers replays of finished ones).
const MAX_FOLLOWED: usize = 8;

impl Session {
    /// Runs this socket is following now.
    fn following(&self) -> usize {
        self.watchers
            .values()
            .filter(|watcher| !watcher.is_finished())
            .count()
    }

    /// True if this socket follows the run (its watcher has not finished).
    pub(super) fn follows(&self, run: RunId) -> bool {
        self.watchers
            .get(&run)
            .is_some_and(|watcher| !watcher.is_finished())
    }

    /// True if this socket follows the run or was sent all of it: a finished watcher stays in
    /// the map until the next `watch`, which is after any stale announcement of its run.
    pub(super) fn watched(&self, run: RunId) -> bool {
        self.watchers.contains_key(&run)
    }

    /// Follows a run on this socket from the chunk after `after_seq`, replacing any watcher of
    /// the same run. The watcher never blocks the run: if the queue stays full for the
    /// slow-client timeout, the socket is closed.
    pub(super) fn watch(
        &mut self,
        socket: &Socket,
        handle: Arc<RunHandle>,
        after_seq: u64,
        with_start: bool,
    ) {
        self.watchers.retain(|_, task| !task.is_finished());
        if let Some(previous) = self.watchers.remove(&handle.id) {
            previous.abort();
        }
        let run_id = handle.id;
        let out = socket.out.clone();
        let inbox = socket.inbox.clone();
        let metrics = socket.state.metrics.clone();
        let patience = socket.state.config.sockets.slow_client_timeout;
        let run_socket = matches!(socket.endpoint, Endpoint::Run { .. });
        let task = tokio::spawn(async move {
            let mut frames = pin!(handle.follow(after_seq, with_start));
            while let Some(frame) = frames.next().await {
                let is_chunk = matches!(frame.kind, FrameKind::Chunk { .. });
                let bytes = frame.text.len() as u64;
                // Usually there is room; only a full queue waits, at most `patience`.
                match out.offer(Outbound::Text(frame.text)) {
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

/// The instant a token stops being accepted: its `exp` plus the verifier's leeway, on the
/// verifier's clock.
fn expiry_instant(socket: &Socket, exp: i64) -> Instant {
    let leeway = socket.state.config.auth.jwt_leeway;
    let now = socket.state.auth.verifier.clock().now_millis();
    let remaining_ms = exp
        .saturating_mul(1000)
        .saturating_add(i64::try_from(leeway.as_millis()).unwrap_or(0))
        .saturating_sub(now);
    Instant::now() + Duration::from_millis(u64::try_from(remaining_ms).unwrap_or(0))
}
