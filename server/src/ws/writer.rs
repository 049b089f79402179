//! The writer: one task per socket owns the sink. It writes the socket's own frames from its
//! bounded queue and the frames of the runs the socket follows, which it reads itself from each
//! run (a [`Cursor`]) when the run wakes it: a chunk costs a socket one task wake-up and no
//! copy. Everything ready goes out with one flush. A write that stalls past the slow-client
//! timeout (the client stopped reading) ends the writer, and with it the socket.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::{Sink, SinkExt};
use tokio::task::JoinHandle;
use wadi_protocol::{ServerMessage, close};

use super::{
    outbox::Outbox,
    registry::{Control, Inbox},
};
use crate::{
    metrics::Metrics,
    runs::{Cursor, FrameKind},
};

/// What the writer sends.
pub enum Outbound {
    Text(Utf8Bytes),
    Ping,
    Close(u16, &'static str),
    /// Send this run's frames from now on (instead of any earlier cursor on the same run).
    Follow(Box<Followed>),
}

/// A run the socket follows: its cursor, and a flag the writer sets once it is done with it
/// (`complete` written, replaced, or the socket gone).
pub struct Followed {
    cursor: Cursor,
    released: Arc<AtomicBool>,
}

impl Followed {
    /// The cursor to hand the writer, and the flag that tells when it let go of it.
    pub fn new(cursor: Cursor) -> (Box<Self>, Arc<AtomicBool>) {
        let released = Arc::new(AtomicBool::new(false));
        (
            Box::new(Self {
                cursor,
                released: released.clone(),
            }),
            released,
        )
    }
}

impl Drop for Followed {
    fn drop(&mut self) {
        self.released.store(true, Ordering::Release);
    }
}

/// What the writer needs besides its sink and queue.
pub struct WriterSettings {
    /// A write or flush stalled this long means the client stopped reading.
    pub stall: Duration,
    /// Tell the reader when a followed run is done (a run socket then closes normally).
    pub run_socket: bool,
    pub metrics: Arc<Metrics>,
}

/// Queued frames the writer takes per wake before flushing once.
const WRITE_BATCH: usize = 128;
/// Frames of one run written per wake: a long replay is sent in pieces, with the socket's own
/// frames between them.
const RUN_BATCH: usize = 256;

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

/// Writes until the socket closes. However it ends, the outbox is closed so that nobody waits on
/// it any more.
pub(super) async fn write_loop(
    sink: impl Sink<Message, Error = axum::Error> + Unpin,
    outbox: Arc<Outbox>,
    inbox: Arc<Inbox>,
    settings: WriterSettings,
) {
    let mut writer = Writer {
        sink,
        outbox: &outbox,
        inbox: &inbox,
        settings,
        runs: Vec::new(),
    };
    writer.run().await;
    outbox.close();
}

struct Writer<'a, S> {
    sink: S,
    outbox: &'a Outbox,
    inbox: &'a Inbox,
    settings: WriterSettings,
    runs: Vec<Followed>,
}

/// Why a round of writing ended the writer.
enum End {
    /// The socket is gone (a write failed).
    Gone,
    /// The close frame was sent.
    Closed,
}

impl<S: Sink<Message, Error = axum::Error> + Unpin> Writer<'_, S> {
    async fn run(&mut self) {
        let mut batch = Vec::new();
        while self.outbox.next_batch(&mut batch, WRITE_BATCH).await {
            let stall = self.settings.stall;
            match tokio::time::timeout(stall, self.round(&mut batch)).await {
                Ok(Ok(())) => {}
                Ok(Err(End::Gone | End::Closed)) => return,
                Err(_) => {
                    // Tell the reader before the outbox closes, so it counts a slow client.
                    self.inbox.post(Control::SlowConsumer);
                    return;
                }
            }
            // Give back a large batch's memory between bursts.
            if batch.capacity() > WRITE_BATCH {
                batch = Vec::new();
            }
        }
    }

    /// One wake's worth: the queued items in order, then what the followed runs have ready,
    /// with one flush. A `close` item first writes everything the runs have ready (at shutdown,
    /// their `complete`), then the close frame.
    async fn round(&mut self, batch: &mut Vec<Outbound>) -> Result<(), End> {
        let mut closing = None;
        for item in batch.drain(..) {
            match item {
                Outbound::Text(text) => self.feed(Message::Text(text)).await?,
                Outbound::Ping => {
                    self.feed(Message::Ping(axum::body::Bytes::new())).await?;
                }
                Outbound::Follow(followed) => {
                    let run = followed.cursor.run_id();
                    self.runs.retain(|other| other.cursor.run_id() != run);
                    self.runs.push(*followed);
                }
                Outbound::Close(code, reason) => {
                    closing = Some(CloseFrame {
                        code,
                        reason: reason.into(),
                    });
                    break;
                }
            }
        }
        let limit = if closing.is_some() {
            usize::MAX
        } else {
            RUN_BATCH
        };
        let more = self.write_runs(limit).await?;
        self.sink.flush().await.map_err(|_| End::Gone)?;
        if let Some(frame) = closing {
            let _ = self.sink.send(Message::Close(Some(frame))).await;
            return Err(End::Closed);
        }
        if more {
            // A run had more than a batch ready: come back for it after this flush.
            self.outbox.wake();
        }
        Ok(())
    }

    /// Writes up to `limit` ready frames of each followed run; true if one has more ready.
    async fn write_runs(&mut self, limit: usize) -> Result<bool, End> {
        let mut more = false;
        let mut index = 0;
        while index < self.runs.len() {
            let mut written = 0;
            while written < limit {
                let Some(frame) = self.runs[index].cursor.ready() else {
                    break;
                };
                written += 1;
                let metrics = &self.settings.metrics;
                if matches!(frame.kind, FrameKind::Chunk { .. }) {
                    metrics.chunks_sent.inc();
                }
                metrics.bytes_sent.inc_by(frame.text.len() as u64);
                self.feed(Message::Text(frame.text)).await?;
            }
            if self.runs[index].cursor.is_done() {
                self.runs.swap_remove(index);
                if self.settings.run_socket {
                    self.inbox.post(Control::RunSent);
                }
                continue;
            }
            more |= written == limit;
            index += 1;
        }
        Ok(more)
    }

    async fn feed(&mut self, message: Message) -> Result<(), End> {
        self.sink.feed(message).await.map_err(|_| End::Gone)
    }
}
