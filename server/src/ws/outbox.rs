//! A socket's bounded send queue. It does the job of a bounded `mpsc` channel but allocates
//! nothing until the first frame: tokio's channel allocates a block of 32 slots up front, which
//! for thousands of idle sockets is a large share of their memory (docs/performance.md). Run
//! watchers and the socket's own task put frames in; the socket's task takes them out and
//! writes them.

use std::{
    collections::VecDeque,
    pin::pin,
    sync::{Mutex, MutexGuard},
    task::{Context, Poll},
};

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use super::wire::Outbound;

/// The socket is gone: nothing more can be queued.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed;

/// Why a frame could not be queued without waiting.
#[derive(Debug, PartialEq, Eq)]
pub enum TryPushError {
    Full,
    Closed,
}

/// Room beyond the capacity for the socket's own frames (see [`Outbox::try_push`]).
const RESERVE: usize = 16;
/// Bytes of room beyond the byte capacity for the socket's own frames (they are small).
const RESERVE_BYTES: usize = 64 * 1024;

/// What [`Outbox::offer`] did.
pub enum Offer {
    Queued,
    Full(Outbound),
    Closed,
}

#[derive(Default)]
struct State {
    items: VecDeque<Outbound>,
    /// Bytes of text queued.
    bytes: usize,
    closed: bool,
    /// A sender waits for room (so taking a frame must wake it).
    senders_wait: bool,
}

impl State {
    /// Whether `size` more bytes fit under `frames` / `bytes`. An empty queue takes any one
    /// frame, however large (a `complete` carries a whole answer).
    fn fits(&self, size: usize, frames: usize, bytes: usize) -> bool {
        self.items.len() < frames && (self.items.is_empty() || self.bytes + size <= bytes)
    }
}

fn size_of(item: &Outbound) -> usize {
    match item {
        Outbound::Text(text) => text.len(),
        Outbound::Ping => 0,
    }
}

/// A socket's send queue, bounded in frames and in bytes: a client that does not read can pin
/// at most this much of the server's memory.
pub struct Outbox {
    state: Mutex<State>,
    capacity: usize,
    byte_capacity: usize,
    /// The socket's task, waiting for a frame to write.
    queued: AtomicWaker,
    /// Signalled when room frees up (senders wait on it).
    room: Notify,
}

impl Outbox {
    pub fn new(capacity: usize, byte_capacity: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            capacity: capacity.max(1),
            byte_capacity: byte_capacity.max(1),
            queued: AtomicWaker::new(),
            room: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        crate::util::lock(&self.state)
    }

    /// Queues one of the socket's own frames (pong, error, ping) if there is room, counting a
    /// small reserve beyond the capacity: a queue that run chunks filled a moment ago must not
    /// make a healthy client look slow.
    pub fn try_push(&self, item: Outbound) -> Result<(), TryPushError> {
        match self.offer_within(
            item,
            self.capacity + RESERVE,
            self.byte_capacity + RESERVE_BYTES,
        ) {
            Offer::Queued => Ok(()),
            Offer::Full(_) => Err(TryPushError::Full),
            Offer::Closed => Err(TryPushError::Closed),
        }
    }

    /// Queues a run's frame if there is room, else hands it back (so a sender can wait with it
    /// without setting a timer for every frame that fits at once).
    pub fn offer(&self, item: Outbound) -> Offer {
        self.offer_within(item, self.capacity, self.byte_capacity)
    }

    fn offer_within(&self, item: Outbound, frames: usize, bytes: usize) -> Offer {
        {
            let mut state = self.state();
            if state.closed {
                return Offer::Closed;
            }
            let size = size_of(&item);
            if !state.fits(size, frames, bytes) {
                return Offer::Full(item);
            }
            state.bytes += size;
            state.items.push_back(item);
        }
        self.queued.wake();
        Offer::Queued
    }

    /// Queues a frame, waiting for room.
    pub async fn push(&self, item: Outbound) -> Result<(), Closed> {
        let mut item = Some(item);
        loop {
            // Register for the wake-up before checking, so a pop in between is not missed.
            let mut room = pin!(self.room.notified());
            room.as_mut().enable();
            {
                let mut state = self.state();
                if state.closed {
                    return Err(Closed);
                }
                let size = item.as_ref().map_or(0, size_of);
                if state.fits(size, self.capacity, self.byte_capacity) {
                    if let Some(item) = item.take() {
                        state.bytes += size;
                        state.items.push_back(item);
                    }
                    drop(state);
                    self.queued.wake();
                    return Ok(());
                }
                state.senders_wait = true;
            }
            room.await;
        }
    }

    /// The oldest queued frame; `Ready(None)` once the outbox is closed and empty. While the
    /// queue is empty, the caller is woken when a frame is queued.
    pub fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Option<Outbound>> {
        if let Some(item) = self.pop() {
            return Poll::Ready(Some(item));
        }
        // Registered before looking again, so a frame queued in between is not missed.
        self.queued.register(cx.waker());
        match self.pop() {
            Some(item) => Poll::Ready(Some(item)),
            None if self.state().closed => Poll::Ready(None),
            None => Poll::Pending,
        }
    }

    fn pop(&self) -> Option<Outbound> {
        let mut state = self.state();
        let item = state.items.pop_front()?;
        state.bytes -= size_of(&item);
        if state.items.is_empty() && state.items.capacity() > self.capacity {
            // Give back a burst's memory.
            state.items = VecDeque::new();
        }
        let wake = std::mem::take(&mut state.senders_wait);
        drop(state);
        if wake {
            self.room.notify_waiters();
        }
        Some(item)
    }

    /// Ends the queue with `last` as the only frame left in it: what was queued is dropped (a
    /// client judged slow would only fall further behind; it resumes from its last seq after
    /// reconnecting), and nothing more can be queued. One step, so that no frame a sender
    /// queues meanwhile can come before `last`. Waiting senders get [`Closed`].
    pub fn close_with_last(&self, last: Outbound) {
        {
            let mut state = self.state();
            state.items = VecDeque::from([last]);
            state.bytes = state.items.iter().map(size_of).sum();
            state.closed = true;
        }
        self.room.notify_waiters();
        self.queued.wake();
    }

    /// The socket is ending: wakes every waiting sender (they get [`Closed`]). What was queued
    /// can still be taken.
    pub fn close(&self) {
        self.state().closed = true;
        self.room.notify_waiters();
        self.queued.wake();
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;

    fn frame(text: &str) -> Outbound {
        Outbound::Text(text.to_owned().into())
    }

    fn text(item: &Outbound) -> String {
        match item {
            Outbound::Text(text) => text.as_str().to_owned(),
            Outbound::Ping => String::new(),
        }
    }

    /// Up to `max` queued frames, waiting for the first (none once closed and empty).
    async fn take(outbox: &Outbox, max: usize) -> Vec<Outbound> {
        let first = std::future::poll_fn(|cx| outbox.poll_pop(cx)).await;
        let mut taken: Vec<_> = first.into_iter().collect();
        while taken.len() < max
            && let Some(item) = outbox.pop()
        {
            taken.push(item);
        }
        taken
    }

    #[tokio::test]
    async fn frames_come_out_in_order_and_the_bound_holds() {
        let outbox = Outbox::new(2, 1 << 20);
        assert!(matches!(outbox.offer(frame("a")), Offer::Queued));
        assert!(matches!(outbox.offer(frame("b")), Offer::Queued));
        assert!(matches!(outbox.offer(frame("c")), Offer::Full(_)));
        // The socket's own frames still fit, up to the reserve.
        for _ in 0..RESERVE {
            outbox.try_push(frame("own")).unwrap();
        }
        assert_eq!(
            outbox.try_push(frame("one too many")),
            Err(TryPushError::Full)
        );
        let batch = take(&outbox, 100).await;
        assert_eq!(batch.len(), 2 + RESERVE);
        assert_eq!(text(&batch[0]), "a");
        assert_eq!(text(&batch[1]), "b");
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_too_but_always_takes_one_frame() {
        let outbox = Outbox::new(100, 10);
        let big = "x".repeat(50);
        assert!(
            matches!(outbox.offer(frame(&big)), Offer::Queued),
            "an empty queue takes one frame of any size"
        );
        assert!(
            matches!(outbox.offer(frame("y")), Offer::Full(_)),
            "over 10 bytes"
        );
        take(&outbox, 10).await;
        for _ in 0..2 {
            assert!(matches!(outbox.offer(frame("12345")), Offer::Queued));
        }
        assert!(
            matches!(outbox.offer(frame("z")), Offer::Full(_)),
            "10 bytes queued"
        );
        outbox.try_push(frame("own")).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_outbox_makes_senders_wait_until_the_socket_takes_frames() {
        let outbox = Arc::new(Outbox::new(1, 1 << 20));
        assert!(matches!(outbox.offer(frame("first")), Offer::Queued));
        let sender = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.push(frame("second")).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!sender.is_finished(), "waits while full");
        take(&outbox, 1).await;
        tokio::time::timeout(Duration::from_secs(1), sender)
            .await
            .expect("taking a frame wakes the sender")
            .unwrap()
            .unwrap();
        assert_eq!(text(&take(&outbox, 10).await[0]), "second");
    }

    #[tokio::test]
    async fn a_frame_queued_wakes_the_socket_waiting_for_one() {
        let outbox = Arc::new(Outbox::new(4, 1 << 20));
        let socket = tokio::spawn({
            let outbox = outbox.clone();
            async move { take(&outbox, 1).await }
        });
        tokio::task::yield_now().await;
        assert!(matches!(outbox.offer(frame("late")), Offer::Queued));
        let taken = tokio::time::timeout(Duration::from_secs(5), socket)
            .await
            .expect("woken by the frame")
            .unwrap();
        assert_eq!(text(&taken[0]), "late");
    }

    #[tokio::test]
    async fn closing_releases_senders_and_the_socket() {
        let outbox = Arc::new(Outbox::new(1, 1 << 20));
        assert!(matches!(outbox.offer(frame("x")), Offer::Queued));
        let sender = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.push(frame("y")).await }
        });
        tokio::task::yield_now().await;
        outbox.close();
        assert_eq!(sender.await.unwrap(), Err(Closed));
        assert_eq!(outbox.try_push(frame("z")), Err(TryPushError::Closed));
        assert_eq!(
            take(&outbox, 10).await.len(),
            1,
            "what was queued still drains"
        );
        assert!(take(&outbox, 10).await.is_empty());
    }

    #[tokio::test]
    async fn closing_with_a_last_frame_drops_the_backlog_and_takes_nothing_after() {
        let outbox = Arc::new(Outbox::new(2, 1 << 20));
        assert!(matches!(outbox.offer(frame("old 1")), Offer::Queued));
        assert!(matches!(outbox.offer(frame("old 2")), Offer::Queued));
        let sender = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.push(frame("waiting")).await }
        });
        tokio::task::yield_now().await;
        outbox.close_with_last(frame("last word"));
        let waited = tokio::time::timeout(Duration::from_secs(5), sender)
            .await
            .expect("closing wakes a sender waiting for room")
            .unwrap();
        assert_eq!(waited, Err(Closed));
        assert!(matches!(outbox.offer(frame("late")), Offer::Closed));
        assert_eq!(outbox.try_push(frame("own")), Err(TryPushError::Closed));
        let left: Vec<_> = take(&outbox, 10).await.iter().map(text).collect();
        assert_eq!(left, ["last word"], "nothing before it, nothing after it");
        assert!(take(&outbox, 10).await.is_empty());
    }
}
