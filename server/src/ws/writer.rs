//! The writer: one task per socket owns the sink and drains the socket's bounded queue, writing
//! everything queued with one flush. A write that stalls past the slow-client timeout (the
//! client stopped reading) ends the writer, and with it the socket.

use std::{sync::Arc, time::Duration};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::{Sink, SinkExt};
use tokio::task::JoinHandle;
use wadi_protocol::{ServerMessage, close};

use super::{
    outbox::Outbox,
    registry::{Control, Inbox},
};

/// What the writer sends.
pub enum Outbound {
    Text(Utf8Bytes),
    Ping,
    Close(u16, &'static str),
}

/// Frames the writer drains per wake before flushing once.
const WRITE_BATCH: usize = 128;

/// Queues the `error` frame (if any) and the close frame, and waits up to `grace` for each of
/// room in the queue and the writer to send them; a writer still stuck then is dropped.
pub(super) async fn close_socket(
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
pub(super) async fn write_loop(
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
            // Under the same patience as the flush: feeding a full write buffer waits for the
            // socket too.
            match tokio::time::timeout(stall, sink.feed(message)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    inbox.post(Control::SlowConsumer);
                    return;
                }
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
