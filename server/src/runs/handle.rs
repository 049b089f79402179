//! One run in memory: its output, where each chunk ends, how it ended, and a way for any number
//! of watchers to follow it from any `seq` without the run ever waiting for them.
//!
//! The replay buffer is the output itself plus one offset per chunk, so replaying from any seq
//! costs no extra copy of the text. The run appends and bumps a version number; each watcher
//! reads what it has not seen under a short lock and then waits for the next bump. A slow watcher
//! only falls behind; it never slows the run or the others.
//!
//! Each chunk frame is encoded once per run, when the first watcher reads it, and the bytes are
//! shared by every watcher (a window of the latest chunks is kept encoded; a replay from further
//! back encodes again). A socket's writer sends those bytes as they are.
//!
//! A handle is either the run itself, on the instance that drives it (the only writer of its
//! seqs), or a *mirror* of a run driven elsewhere or already saved: filled in seq order from the
//! run's shared log or the store, so that sockets follow both kinds the same way.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
};

use axum::extract::ws::Utf8Bytes;
use futures_util::Stream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use wadi_protocol::{RunStatus, ServerMessage, Usage};

use crate::ids::{ConversationId, InstanceId, MessageId, RunId, UserId};

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    pub status: RunStatus,
    pub usage: Option<Usage>,
    pub error: Option<String>,
    /// The answer as saved, when it differs from the chunks in memory (a run reaped while its
    /// owner was cut off, or a mirror whose log lost a tail): `complete` carries this, since the
    /// saved answer is authoritative.
    pub saved_output: Option<String>,
}

impl Ending {
    pub fn new(status: RunStatus, usage: Option<Usage>, error: Option<String>) -> Self {
        Self {
            status,
            usage,
            error,
            saved_output: None,
        }
    }
}

/// Where a handle's chunks come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This instance drives the run.
    Owned,
    /// A copy of a run driven by `owner` (or already finished), filled from its log.
    Mirror { owner: Option<InstanceId> },
}

/// A mirror was handed a chunk past the one it expects: the chunks between are missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub expected: u64,
}

#[derive(Default)]
struct Log {
    output: String,
    /// `ends[i]` is the byte offset where chunk `i + 1` ends.
    ends: Vec<usize>,
    ending: Option<Ending>,
    /// The latest chunks' `chunk` frames as encoded for the first watcher that read them:
    /// `encoded[0]` is chunk `encoded_from`.
    encoded: VecDeque<Utf8Bytes>,
    encoded_from: u64,
}

impl Log {
    /// Chunk `seq`'s frame, encoded once while it is in the window and shared after that.
    fn chunk_frame(&mut self, run_id: RunId, seq: u64) -> Utf8Bytes {
        let held = self.encoded_from + self.encoded.len() as u64;
        if seq >= self.encoded_from && seq < held {
            return self.encoded[(seq - self.encoded_from) as usize].clone();
        }
        let index = (seq - 1) as usize;
        let start = if index == 0 { 0 } else { self.ends[index - 1] };
        let text = Utf8Bytes::from(ServerMessage::encode_chunk(
            run_id.into(),
            seq,
            &self.output[start..self.ends[index]],
        ));
        // Keep it if it extends the window (or starts a new one past it); an old chunk replayed
        // is not kept.
        if seq >= held {
            if seq > held {
                self.encoded.clear();
                self.encoded_from = seq;
            }
            self.encoded.push_back(text.clone());
            if self.encoded.len() > ENCODED_WINDOW {
                self.encoded.pop_front();
                self.encoded_from += 1;
            }
        }
        text
    }
}

/// Chunks kept encoded per run: live watchers are near the tail, so this covers them all while
/// bounding the memory a long run's encoded frames take.
const ENCODED_WINDOW: usize = 1024;

/// What a watcher sends next: a frame encoded once and shared by every watcher of the run.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: FrameKind,
    pub text: Utf8Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Start,
    Chunk { seq: u64 },
    Error,
    Complete,
}

impl Frame {
    fn encode(kind: FrameKind, message: &ServerMessage) -> Self {
        Self {
            kind,
            text: message.encode().into(),
        }
    }
}

pub struct RunHandle {
    pub id: RunId,
    pub conversation_id: ConversationId,
    pub owner_id: UserId,
    /// The user message that started the run, and its client id if it had one.
    pub message_id: MessageId,
    pub client_message_id: Option<String>,
    pub origin: Origin,
    log: Mutex<Log>,
    /// Bumped on every change; watchers wait on it.
    version: watch::Sender<u64>,
    /// Cancelled to stop the run; `stop_status` says why.
    cancel: CancellationToken,
    stop_status: Mutex<Option<RunStatus>>,
}

/// What a watcher reads in one go: `(seq, frame)` chunks, and the ending with the full output
/// once nothing is left to read.
type Batch = (Vec<(u64, Utf8Bytes)>, Option<(Ending, String)>);

/// Chunks read in one go by a watcher, to keep the lock short.
const READ_BATCH: usize = 256;

/// What identifies a run, for a new handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunKey {
    pub id: RunId,
    pub conversation_id: ConversationId,
    pub owner_id: UserId,
    pub message_id: MessageId,
    pub client_message_id: Option<String>,
}

impl RunHandle {
    pub fn new(key: RunKey, origin: Origin) -> Arc<Self> {
        Arc::new(Self {
            id: key.id,
            conversation_id: key.conversation_id,
            owner_id: key.owner_id,
            message_id: key.message_id,
            client_message_id: key.client_message_id,
            origin,
            log: Mutex::new(Log::default()),
            version: watch::Sender::new(0),
            cancel: CancellationToken::new(),
            stop_status: Mutex::new(None),
        })
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        // A panic while holding this lock cannot leave the log half-written (every update is
        // a push), so a poisoned lock is still safe to use.
        crate::util::lock(&self.log)
    }

    pub fn is_mirror(&self) -> bool {
        matches!(self.origin, Origin::Mirror { .. })
    }

    /// Mirrors: appends chunk `seq` if it is the next one; a seq already held is ignored (the
    /// same seq always carries the same text).
    pub fn push_at(&self, seq: u64, delta: &str) -> Result<(), Gap> {
        {
            let mut log = self.log();
            let expected = log.ends.len() as u64 + 1;
            if seq < expected || log.ending.is_some() {
                return Ok(());
            }
            if seq > expected {
                return Err(Gap { expected });
            }
            log.output.push_str(delta);
            let end = log.output.len();
            log.ends.push(end);
        }
        self.version.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Appends a chunk and returns its seq.
    pub fn push(&self, delta: &str) -> u64 {
        let seq = {
            let mut log = self.log();
            log.output.push_str(delta);
            let end = log.output.len();
            log.ends.push(end);
            log.ends.len() as u64
        };
        self.version.send_modify(|v| *v += 1);
        seq
    }

    /// Marks the run ended; watchers send `complete` once they have sent every chunk. The first
    /// ending wins.
    pub fn finish(&self, ending: Ending) {
        {
            let mut log = self.log();
            if log.ending.is_some() {
                return;
            }
            log.ending = Some(ending);
        }
        self.version.send_modify(|v| *v += 1);
    }

    /// The output so far and the last seq.
    pub fn snapshot(&self) -> (String, u64) {
        let log = self.log();
        (log.output.clone(), log.ends.len() as u64)
    }

    /// The output after chunk `after` with the ends of the chunks after it (as stored), and
    /// the last seq: what a checkpoint appends.
    pub fn since(&self, after: u64) -> (String, Vec<usize>, u64) {
        let log = self.log();
        let last = log.ends.len() as u64;
        let after = after.min(last) as usize;
        let start = if after == 0 { 0 } else { log.ends[after - 1] };
        (
            log.output[start..].to_owned(),
            log.ends[after..].to_vec(),
            last,
        )
    }

    /// Every chunk end, as stored.
    pub fn ends(&self) -> Vec<usize> {
        self.log().ends.clone()
    }

    /// Chunks with `seq > after`, at most `limit`, as `(seq, text)` (the replicator's batch).
    pub fn chunks_after(&self, after: u64, limit: usize) -> Vec<(u64, String)> {
        let log = self.log();
        let last = log.ends.len() as u64;
        let from = after.min(last);
        let to = (from + limit as u64).min(last);
        (from + 1..=to)
            .map(|seq| {
                let index = (seq - 1) as usize;
                let start = if index == 0 { 0 } else { log.ends[index - 1] };
                (seq, log.output[start..log.ends[index]].to_owned())
            })
            .collect()
    }

    /// A receiver that changes with every chunk and the ending: for tasks that follow the log
    /// without sending frames (the replicator).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    pub fn last_seq(&self) -> u64 {
        self.log().ends.len() as u64
    }

    pub fn ending(&self) -> Option<Ending> {
        self.log().ending.clone()
    }

    pub fn is_finished(&self) -> bool {
        self.log().ending.is_some()
    }

    /// Asks the run to stop; `status` is what it will be saved as (`stopped` when a user asked,
    /// `interrupted` at shutdown). The first request wins.
    pub fn stop(&self, status: RunStatus) {
        {
            let mut stop = crate::util::lock(&self.stop_status);
            stop.get_or_insert(status);
        }
        self.cancel.cancel();
    }

    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Why the run was stopped, if it was.
    pub fn stop_status(&self) -> Option<RunStatus> {
        *crate::util::lock(&self.stop_status)
    }

    /// Resolves once the run has ended.
    pub async fn finished(&self) {
        let mut version = self.version.subscribe();
        while !self.is_finished() {
            if version.changed().await.is_err() {
                return;
            }
        }
    }

    /// Chunks with `seq > after` (at most a batch), and, when none are left after those, how the
    /// run ended with its full output.
    fn read_after(&self, after: u64) -> Batch {
        let mut log = self.log();
        let last = log.ends.len() as u64;
        let from = after.min(last);
        let to = (from + READ_BATCH as u64).min(last);
        let mut chunks = Vec::with_capacity((to - from) as usize);
        for seq in from + 1..=to {
            chunks.push((seq, log.chunk_frame(self.id, seq)));
        }
        let ending = match &log.ending {
            Some(ending) if to == last => {
                let output = ending
                    .saved_output
                    .clone()
                    .unwrap_or_else(|| log.output.clone());
                Some((ending.clone(), output))
            }
            _ => None,
        };
        (chunks, ending)
    }

    /// The `start` frame of this run.
    pub fn start_frame(&self) -> ServerMessage {
        ServerMessage::Start {
            run_id: self.id.into(),
            conversation_id: self.conversation_id.into(),
            message_id: self.message_id.into(),
            client_message_id: self.client_message_id.clone(),
        }
    }

    /// The frames a watcher receives, from the chunk after `after_seq` to `complete`: replay,
    /// then live. With `with_start`, a `start` frame comes first.
    pub fn follow(
        self: Arc<Self>,
        after_seq: u64,
        with_start: bool,
    ) -> impl Stream<Item = Frame> + Send + 'static {
        let mut pending = VecDeque::new();
        if with_start {
            pending.push_back(Frame::encode(FrameKind::Start, &self.start_frame()));
        }
        let version = self.version.subscribe();
        let state = Follow {
            handle: self,
            cursor: after_seq,
            version,
            pending,
            done: false,
        };
        futures_util::stream::unfold(state, |mut state| async move {
            let frame = state.next().await?;
            Some((frame, state))
        })
    }
}

struct Follow {
    handle: Arc<RunHandle>,
    cursor: u64,
    version: watch::Receiver<u64>,
    pending: VecDeque<Frame>,
    done: bool,
}

impl Follow {
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                return Some(frame);
            }
            if self.done {
                return None;
            }
            // Mark the current version seen before reading, so a push that lands after the
            // read wakes us up.
            self.version.borrow_and_update();
            let (chunks, ending) = self.handle.read_after(self.cursor);
            for (seq, text) in chunks {
                self.cursor = seq;
                self.pending.push_back(Frame {
                    kind: FrameKind::Chunk { seq },
                    text,
                });
            }
            if let Some((ending, full_output)) = ending {
                // A failure is reported after the chunks it cut short, before `complete`.
                if let Some(error) = ending.error.filter(|_| ending.status == RunStatus::Failed) {
                    let error = ServerMessage::error(
                        wadi_protocol::ErrorCode::ModelError,
                        error,
                        Some(self.handle.id.into()),
                    );
                    self.pending
                        .push_back(Frame::encode(FrameKind::Error, &error));
                }
                let complete = ServerMessage::Complete {
                    run_id: self.handle.id.into(),
                    full_output,
                    status: ending.status,
                    usage: ending.usage,
                };
                self.pending
                    .push_back(Frame::encode(FrameKind::Complete, &complete));
                self.done = true;
                continue;
            }
            if self.pending.is_empty() && self.version.changed().await.is_err() {
                // The handle is gone without an ending (cannot happen while we hold it).
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    fn key() -> RunKey {
        RunKey {
            id: RunId::new(),
            conversation_id: ConversationId::new(),
            owner_id: UserId::new(),
            message_id: MessageId::new(),
            client_message_id: None,
        }
    }

    fn handle() -> Arc<RunHandle> {
        RunHandle::new(key(), Origin::Owned)
    }

    /// `RunHandle::follow`, decoded.
    fn follow(
        run: Arc<RunHandle>,
        after_seq: u64,
        with_start: bool,
    ) -> impl Stream<Item = ServerMessage> {
        run.follow(after_seq, with_start)
            .map(|frame| ServerMessage::decode(&frame.text).unwrap())
    }

    fn chunk_seqs(frames: &[ServerMessage]) -> Vec<u64> {
        frames
            .iter()
            .filter_map(|f| match f {
                ServerMessage::Chunk { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn replay_then_live_then_complete_with_every_seq_once() {
        let run = handle();
        run.push("Hel");
        run.push("lo");
        let follower = tokio::spawn(follow(run.clone(), 1, false).collect::<Vec<_>>());
        tokio::task::yield_now().await;
        run.push(", ");
        run.push("world");
        run.finish(Ending::new(RunStatus::Completed, None, None));
        let frames = follower.await.unwrap();
        assert_eq!(chunk_seqs(&frames), vec![2, 3, 4]);
        let text: String = frames
            .iter()
            .filter_map(|f| match f {
                ServerMessage::Chunk { content, .. } => Some(content.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(text, "lo, world");
        assert!(matches!(
            frames.last(),
            Some(ServerMessage::Complete { full_output, status: RunStatus::Completed, .. })
                if full_output == "Hello, world"
        ));
    }

    #[tokio::test]
    async fn a_finished_run_replays_from_any_seq() {
        let run = handle();
        for word in ["a", "b", "c"] {
            run.push(word);
        }
        run.finish(Ending::new(RunStatus::Stopped, None, None));
        let frames: Vec<_> = follow(run.clone(), 0, true).collect().await;
        assert!(matches!(frames[0], ServerMessage::Start { .. }));
        assert_eq!(chunk_seqs(&frames), vec![1, 2, 3]);
        let frames: Vec<_> = follow(run.clone(), 3, false).collect().await;
        assert_eq!(frames.len(), 1, "only complete");
        let frames: Vec<_> = follow(run, 99, false).collect().await;
        assert!(matches!(frames[..], [ServerMessage::Complete { .. }]));
    }

    #[tokio::test]
    async fn a_failed_run_sends_the_error_after_its_chunks_and_before_complete() {
        let run = handle();
        run.push("partial");
        run.finish(Ending::new(
            RunStatus::Failed,
            None,
            Some("upstream broke".into()),
        ));
        let frames: Vec<_> = follow(run, 0, false).collect().await;
        assert!(matches!(frames[0], ServerMessage::Chunk { seq: 1, .. }));
        assert!(matches!(
            &frames[1],
            ServerMessage::Error {
                code: wadi_protocol::ErrorCode::ModelError,
                ..
            }
        ));
        assert!(matches!(
            frames[2],
            ServerMessage::Complete {
                status: RunStatus::Failed,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn each_chunk_is_encoded_once_and_shared_by_every_watcher() {
        let run = handle();
        run.push("shared");
        let first: Vec<Frame> = run.clone().follow(0, false).take(1).collect().await;
        let second: Vec<Frame> = run.clone().follow(0, false).take(1).collect().await;
        assert_eq!(first[0].kind, FrameKind::Chunk { seq: 1 });
        assert_eq!(
            first[0].text.as_str().as_ptr(),
            second[0].text.as_str().as_ptr(),
            "the second watcher sends the first one's bytes"
        );
        // Beyond the window, a replay still gets every chunk right (encoded again).
        for i in 0..ENCODED_WINDOW + 10 {
            run.push(&i.to_string());
        }
        run.finish(Ending::new(RunStatus::Completed, None, None));
        let live: Vec<ServerMessage> = follow(run.clone(), 0, false).collect().await;
        let replay: Vec<ServerMessage> = follow(run, 0, false).collect().await;
        assert_eq!(live, replay);
        assert_eq!(
            chunk_seqs(&replay),
            (1..=ENCODED_WINDOW as u64 + 11).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn more_than_a_batch_is_replayed_in_order() {
        let run = handle();
        for i in 0..(READ_BATCH * 2 + 7) {
            run.push(&i.to_string());
        }
        run.finish(Ending::new(RunStatus::Completed, None, None));
        let frames: Vec<_> = follow(run, 0, false).collect().await;
        let seqs = chunk_seqs(&frames);
        assert_eq!(seqs, (1..=(READ_BATCH * 2 + 7) as u64).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_mirror_takes_chunks_in_order_ignores_repeats_and_reports_gaps() {
        let mirror = RunHandle::new(key(), Origin::Mirror { owner: None });
        mirror.push_at(1, "a").unwrap();
        mirror.push_at(1, "a").unwrap();
        assert_eq!(mirror.push_at(3, "c"), Err(Gap { expected: 2 }));
        mirror.push_at(2, "b").unwrap();
        mirror.push_at(3, "c").unwrap();
        assert_eq!(mirror.snapshot(), ("abc".to_owned(), 3));
        assert_eq!(
            mirror.since(1),
            ("bc".to_owned(), vec![2, 3], 3),
            "what a checkpoint after seq 1 appends"
        );
        let mut ending = Ending::new(RunStatus::Interrupted, None, None);
        ending.saved_output = Some("ab".into());
        mirror.finish(ending);
        mirror.push_at(4, "late").unwrap();
        let frames: Vec<_> = follow(mirror, 0, false).collect().await;
        assert_eq!(chunk_seqs(&frames), vec![1, 2, 3]);
        assert!(
            matches!(
                frames.last(),
                Some(ServerMessage::Complete { full_output, status: RunStatus::Interrupted, .. })
                    if full_output == "ab"
            ),
            "the saved answer is authoritative"
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// However the chunks and the ending interleave with a follower's start, it gets
            /// each seq after its own exactly once, in order, then `complete` with the whole
            /// output.
            #[test]
            fn follow_from_any_seq_yields_each_later_seq_once(
                chunks in proptest::collection::vec("[a-z ]{1,6}", 0..40),
                follow_at in 0usize..45,
                after in 0u64..45,
            ) {
                let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
                let frames = runtime.block_on(async {
                    let run = handle();
                    let mut follower = None;
                    for (index, chunk) in chunks.iter().enumerate() {
                        if index == follow_at {
                            follower = Some(tokio::spawn(follow(run.clone(), after, false).collect::<Vec<_>>()));
                            tokio::task::yield_now().await;
                        }
                        run.push(chunk);
                    }
                    let follower = match follower {
                        Some(follower) => follower,
                        None => tokio::spawn(follow(run.clone(), after, false).collect::<Vec<_>>()),
                    };
                    run.finish(Ending::new(RunStatus::Completed, None, None));
                    follower.await.unwrap()
                });
                let n = chunks.len() as u64;
                let expected: Vec<u64> = (after.min(n) + 1..=n).collect();
                prop_assert_eq!(chunk_seqs(&frames), expected);
                let full: String = chunks.concat();
                let completed = matches!(
                    frames.last(),
                    Some(ServerMessage::Complete { full_output, .. }) if *full_output == full
                );
                prop_assert!(completed, "complete with the whole output");
            }

            /// A mirror fed the same chunks in any order, with repeats, and filled from the log
            /// after every gap, ends up holding exactly the run.
            #[test]
            fn a_mirror_fed_in_any_order_ends_up_exact(
                chunks in proptest::collection::vec("[a-z]{1,4}", 1..30),
                deliveries in proptest::collection::vec(0usize..30, 0..80),
            ) {
                let mirror = RunHandle::new(key(), Origin::Mirror { owner: None });
                for index in deliveries {
                    let Some(text) = chunks.get(index) else { continue };
                    if mirror.push_at(index as u64 + 1, text).is_err() {
                        // A gap: read the log from the last seq held.
                        for (seq, text) in chunks.iter().enumerate().skip(mirror.last_seq() as usize) {
                            mirror.push_at(seq as u64 + 1, text).unwrap();
                        }
                    }
                }
                for (seq, text) in chunks.iter().enumerate().skip(mirror.last_seq() as usize) {
                    mirror.push_at(seq as u64 + 1, text).unwrap();
                }
                prop_assert_eq!(mirror.snapshot(), (chunks.concat(), chunks.len() as u64));
            }
        }
    }
}
