//! A socket's connection, read and written by the socket's own task: no second task per
//! socket, so an idle socket costs one task. Writes drain the socket's bounded queue
//! (`outbox.rs`), a batch at a time with one flush; writes that make no progress for the
//! slow-client timeout (the client stopped reading) end the socket.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::time::{Instant, Sleep};
use wadi_protocol::{ServerMessage, close};

use super::outbox::Outbox;

/// What the socket sends besides the close frame.
pub enum Outbound {
    Text(Utf8Bytes),
    Ping,
}

impl Outbound {
    fn into_message(self) -> Message {
        match self {
            Self::Text(text) => Message::Text(text),
            Self::Ping => Message::Ping(axum::body::Bytes::new()),
        }
    }
}

/// Frames written per wake before flushing once and letting other tasks run.
const WRITE_BATCH: usize = 128;

/// What happened on the connection.
pub(super) enum Event {
    /// A frame from the client, or the end of its stream (`None`).
    Read(Option<Result<Message, axum::Error>>),
    /// A write failed: the connection is gone.
    WriteFailed,
    /// Writes made no progress for the slow-client timeout: the client does not read.
    Stalled,
}

/// Why writing stopped.
enum WriteError {
    Failed,
    Stalled,
}

pub(super) struct Wire {
    socket: WebSocket,
    out: Arc<Outbox>,
    /// Taken from the queue but not yet accepted by the socket (its buffer was full).
    next: Option<Message>,
    /// Frames were written since the last flush.
    unflushed: bool,
    /// How long writes may make no progress.
    stall: Duration,
    /// Fires when writes have made no progress for `stall`; allocated the first time writes
    /// wait on the client, which most sockets never do.
    stalled: Option<Pin<Box<Sleep>>>,
    /// Whether `stalled` is counting (writes are waiting on the client).
    waiting: bool,
    /// A write failed. Remembered, because not every failure repeats (a frame too large for
    /// the write buffer fails alone), and one met while draining beside a handler must still
    /// end the socket on the loop's next turn.
    failed: bool,
}

impl Wire {
    pub(super) fn new(socket: WebSocket, out: Arc<Outbox>, stall: Duration) -> Self {
        Self {
            socket,
            out,
            next: None,
            unflushed: false,
            stall,
            stalled: None,
            waiting: false,
            failed: false,
        }
    }

    /// The next thing that happens on the connection. Meanwhile, whatever is queued is written.
    pub(super) async fn next_event(&mut self) -> Event {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        match self.poll_write(cx) {
            Poll::Ready(Err(WriteError::Failed)) => return Poll::Ready(Event::WriteFailed),
            Poll::Ready(Err(WriteError::Stalled)) => return Poll::Ready(Event::Stalled),
            Poll::Ready(Ok(())) | Poll::Pending => {}
        }
        self.socket.poll_next_unpin(cx).map(Event::Read)
    }

    /// Writes what is queued. Ready once everything queued is written and flushed (the caller
    /// is then woken when more is queued); pending while the socket cannot take more.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteError>> {
        if self.failed {
            return Poll::Ready(Err(WriteError::Failed));
        }
        let result = self.poll_write_batch(cx);
        if matches!(result, Poll::Ready(Err(WriteError::Failed))) {
            self.failed = true;
        }
        result
    }

    fn poll_write_batch(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteError>> {
        let mut written = 0;
        loop {
            if self.next.is_none() && written < WRITE_BATCH {
                self.next = match self.out.poll_pop(cx) {
                    Poll::Ready(item) => item.map(Outbound::into_message),
                    Poll::Pending => None,
                };
            }
            if let Some(message) = self.next.take() {
                match self.socket.poll_ready_unpin(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => return Poll::Ready(Err(WriteError::Failed)),
                    Poll::Pending => {
                        self.next = Some(message);
                        return self.poll_stalled(cx);
                    }
                }
                if self.socket.start_send_unpin(message).is_err() {
                    return Poll::Ready(Err(WriteError::Failed));
                }
                self.unflushed = true;
                self.waiting = false;
                written += 1;
                continue;
            }
            if self.unflushed {
                match self.socket.poll_flush_unpin(cx) {
                    Poll::Ready(Ok(())) => self.unflushed = false,
                    Poll::Ready(Err(_)) => return Poll::Ready(Err(WriteError::Failed)),
                    Poll::Pending => return self.poll_stalled(cx),
                }
            }
            self.waiting = false;
            if written < WRITE_BATCH {
                return Poll::Ready(Ok(()));
            }
            // A full batch went out: let other tasks run, and come back for the rest.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
    }

    /// Writes wait on the client: pending, unless they have waited for `stall` already.
    fn poll_stalled(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteError>> {
        let deadline = Instant::now() + self.stall;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.waiting {
            self.waiting = true;
            timer.as_mut().reset(deadline);
        }
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(WriteError::Stalled))
    }

    /// Writes what is queued until the socket fails or stalls (for draining alongside
    /// something else).
    pub(super) async fn write_until_stuck(&mut self) {
        std::future::poll_fn(|cx| match self.poll_write(cx) {
            Poll::Ready(Ok(())) | Poll::Pending => Poll::Pending,
            Poll::Ready(Err(_)) => Poll::Ready(()),
        })
        .await;
    }

    /// Writes what is queued, then the `error` frame if any (through the queue's reserve), then
    /// the close frame, within `grace`; a client that does not take them in time is dropped.
    pub(super) async fn close(&mut self, code: u16, error: Option<ServerMessage>, grace: Duration) {
        if let Some(error) = error {
            let _ = self.out.try_push(Outbound::Text(error.encode().into()));
        }
        self.out.close();
        self.stall = grace;
        self.waiting = false;
        let send = async {
            if std::future::poll_fn(|cx| self.poll_write(cx))
                .await
                .is_err()
            {
                return;
            }
            let frame = CloseFrame {
                code,
                reason: close_reason(code).into(),
            };
            let _ = self.socket.send(Message::Close(Some(frame))).await;
        };
        let _ = tokio::time::timeout(grace, send).await;
    }

    /// Closes a client that does not read: what is queued for it is dropped, not written (it
    /// would only delay the close; the client resumes from its last seq after reconnecting),
    /// then the `error` frame and the close frame are written within `grace`. A frame the
    /// socket has started stays whole: its rest goes first.
    pub(super) async fn close_slow(&mut self, error: ServerMessage, grace: Duration) {
        self.out
            .close_with_last(Outbound::Text(error.encode().into()));
        self.next = None;
        self.close(close::TRY_AGAIN_LATER, None, grace).await;
    }

    /// The closing handshake's second half: the client's close frame (or the end of its
    /// stream), for at most `grace`. Dropping the connection right after our close frame would
    /// let whatever the client sends meanwhile (a pong, its own close) reach a closed socket,
    /// whose reset can discard our close frame, unread, on the client's side: it would see 1006
    /// instead of our code.
    pub(super) async fn await_close_reply(&mut self, grace: Duration) {
        let reply = async {
            while let Some(Ok(message)) = self.socket.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(grace, reply).await;
    }
}

impl Drop for Wire {
    /// However the socket ends, nothing more can be queued for it.
    fn drop(&mut self) {
        self.out.close();
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
