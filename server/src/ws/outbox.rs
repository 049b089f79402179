//! A socket's bounded send queue. It does the job of a bounded `mpsc` channel but allocates
//! nothing until the first frame: tokio's channel allocates a block of 32 slots up front, which
//! for thousands of idle sockets is a large share of their memory (docs/performance.md).

use std::{
    collections::VecDeque,
    pin::pin,
    sync::{Mutex, MutexGuard},
};

use tokio::sync::Notify;

use super::writer::Outbound;

/// The writer is gone: nothing more can be queued.
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

/// What [`Outbox::offer`] did.
pub enum Offer {
    Queued,
    Full(Outbound),
    Closed,
}

#[derive(Default)]
struct State {
    items: VecDeque<Outbound>,
    closed: bool,
}

pub struct Outbox {
    state: Mutex<State>,
    capacity: usize,
    /// Signalled when an item is queued (the writer waits on it).
    queued: Notify,
    /// Signalled when room frees up (senders wait on it).
    room: Notify,
    /// Signalled when the writer closes the outbox.
    gone: Notify,
}

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            capacity: capacity.max(1),
            queued: Notify::new(),
            room: Notify::new(),
            gone: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Queues one of the socket's own frames (pong, error, ping, close) if there is room,
    /// counting a small reserve beyond the capacity: a queue that run chunks filled a moment ago
    /// must not make a healthy client look slow.
    pub fn try_push(&self, item: Outbound) -> Result<(), TryPushError> {
        match self.offer_within(item, self.capacity + RESERVE) {
            Offer::Queued => Ok(()),
            Offer::Full(_) => Err(TryPushError::Full),
            Offer::Closed => Err(TryPushError::Closed),
        }
    }

    /// Queues a run's frame if there is room, else hands it back (so a sender can wait with it
    /// without setting a timer for every frame that fits at once).
    pub fn offer(&self, item: Outbound) -> Offer {
        self.offer_within(item, self.capacity)
    }

    fn offer_within(&self, item: Outbound, limit: usize) -> Offer {
        {
            let mut state = self.state();
            if state.closed {
                return Offer::Closed;
            }
            if state.items.len() >= limit {
                return Offer::Full(item);
            }
            state.items.push_back(item);
        }
        self.queued.notify_one();
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
                if state.items.len() < self.capacity {
                    if let Some(item) = item.take() {
                        state.items.push_back(item);
                    }
                    drop(state);
                    self.queued.notify_one();
                    return Ok(());
                }
            }
            room.await;
        }
    }

    /// Moves up to `max` queued frames into `into`, waiting for at least one. Returns 0 once the
    /// outbox is closed and empty.
    pub async fn pop_many(&self, into: &mut Vec<Outbound>, max: usize) -> usize {
        loop {
            let mut queued = pin!(self.queued.notified());
            queued.as_mut().enable();
            {
                let mut state = self.state();
                let count = state.items.len().min(max);
                if count > 0 {
                    into.extend(state.items.drain(..count));
                    if state.items.is_empty() && state.items.capacity() > self.capacity {
                        // Give back a burst's memory.
                        state.items = VecDeque::new();
                    }
                    drop(state);
                    self.room.notify_waiters();
                    return count;
                }
                if state.closed {
                    return 0;
                }
            }
            queued.await;
        }
    }

    /// The writer is gone: wakes every waiting sender (they get [`Closed`]).
    pub fn close(&self) {
        self.state().closed = true;
        self.room.notify_waiters();
        self.queued.notify_one();
        self.gone.notify_waiters();
    }

    /// Resolves once the outbox is closed.
    pub async fn closed(&self) {
        loop {
            let mut gone = pin!(self.gone.notified());
            gone.as_mut().enable();
            if self.state().closed {
                return;
            }
            gone.await;
        }
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
            _ => String::new(),
        }
    }

    #[tokio::test]
    async fn frames_come_out_in_order_and_the_bound_holds() {
        let outbox = Outbox::new(2);
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
        let mut batch = Vec::new();
        assert_eq!(outbox.pop_many(&mut batch, 100).await, 2 + RESERVE);
        assert_eq!(text(&batch[0]), "a");
        assert_eq!(text(&batch[1]), "b");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_outbox_makes_senders_wait_until_the_writer_takes_frames() {
        let outbox = Arc::new(Outbox::new(1));
        assert!(matches!(outbox.offer(frame("first")), Offer::Queued));
        let sender = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.push(frame("second")).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!sender.is_finished(), "waits while full");
        let mut batch = Vec::new();
        outbox.pop_many(&mut batch, 10).await;
        sender.await.unwrap().unwrap();
        batch.clear();
        outbox.pop_many(&mut batch, 10).await;
        assert_eq!(text(&batch[0]), "second");
    }

    #[tokio::test]
    async fn closing_releases_senders_and_the_writer() {
        let outbox = Arc::new(Outbox::new(1));
        assert!(matches!(outbox.offer(frame("x")), Offer::Queued));
        let sender = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.push(frame("y")).await }
        });
        let watcher = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.closed().await }
        });
        tokio::task::yield_now().await;
        outbox.close();
        assert_eq!(sender.await.unwrap(), Err(Closed));
        watcher.await.unwrap();
        assert_eq!(outbox.try_push(frame("z")), Err(TryPushError::Closed));
        let mut batch = Vec::new();
        assert_eq!(
            outbox.pop_many(&mut batch, 10).await,
            1,
            "what was queued still drains"
        );
        assert_eq!(outbox.pop_many(&mut batch, 10).await, 0);
    }
}
