//! One open conversation's state and how each server frame changes it. Pure: the socket driver
//! feeds frames in and carries the returned commands out.
//!
//! Chunks are applied strictly by `seq`: the next one extends the answer, an old one is a
//! duplicate and is ignored, a later one means frames were lost and the run is resumed from the
//! last applied seq. So whatever the network does, the text shown is the text produced, with no
//! gap and no repeat.

use uuid::Uuid;
use wadi_protocol::{
    ActiveRun, ClientMessage, ErrorCode, RunStatus, ServerMessage,
    api::{self, Role},
};

/// A message as shown.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageView {
    /// Stable across the pending → committed transition: the client message id when there is
    /// one, else the message id.
    pub key: String,
    pub role: Role,
    pub content: String,
    /// How the run that produced an answer ended.
    pub status: Option<RunStatus>,
    /// For a user message not yet acknowledged by the server.
    pub pending: Option<PendingState>,
    pub run_id: Option<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PendingState {
    /// Sent (or queued until the socket is back); waiting for `start`.
    Sending,
    /// Refused; the user may retry.
    Failed(String),
}

/// A user message waiting for its `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub client_message_id: String,
    pub content: String,
}

/// The answer streaming now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streaming {
    pub run_id: Uuid,
    /// The last seq applied to `text`.
    pub applied: u64,
    pub text: String,
}

/// What the driver must do after a state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Send this frame on the socket (or queue it until the socket is back).
    Send(ClientMessage),
    /// Reload the history over REST (a message arrived that this tab did not send).
    RefreshHistory,
}

#[derive(Debug, Default)]
pub struct ChatState {
    pub messages: Vec<MessageView>,
    pub streaming: Option<Streaming>,
    /// An error to show in place (not tied to one message).
    pub error: Option<String>,
    /// Sent messages without a `start` yet, oldest first.
    pending: Vec<Pending>,
}

/// What applying one chunk did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkOutcome {
    Applied,
    Duplicate,
    /// Chunks after this seq are missing.
    Gap {
        after: u64,
    },
}

impl Streaming {
    pub fn new(run_id: Uuid) -> Self {
        Self {
            run_id,
            applied: 0,
            text: String::new(),
        }
    }

    /// Applies a chunk if it is the next one.
    pub fn apply(&mut self, seq: u64, content: &str) -> ChunkOutcome {
        if seq <= self.applied {
            ChunkOutcome::Duplicate
        } else if seq == self.applied + 1 {
            self.text.push_str(content);
            self.applied = seq;
            ChunkOutcome::Applied
        } else {
            ChunkOutcome::Gap {
                after: self.applied,
            }
        }
    }
}

impl ChatState {
    /// Replaces the history with what the server has, keeping messages still pending here.
    pub fn load_history(&mut self, history: Vec<api::Message>) {
        let mut messages: Vec<MessageView> = history
            .into_iter()
            .map(|message| MessageView {
                key: message
                    .client_message_id
                    .clone()
                    .unwrap_or_else(|| message.id.to_string()),
                role: message.role,
                content: message.content,
                status: message.run_status,
                pending: None,
                run_id: message.run_id,
            })
            .collect();
        for view in &self.messages {
            if view.pending.is_some() && !messages.iter().any(|m| m.key == view.key) {
                messages.push(view.clone());
            }
        }
        // A pending message the server has already committed is not pending any more.
        self.pending.retain(|p| {
            !messages
                .iter()
                .any(|m| m.key == p.client_message_id && m.pending.is_none())
        });
        self.messages = messages;
    }

    /// The user sends a message: it shows at once, and goes out as a frame.
    pub fn send(&mut self, content: String, client_message_id: String) -> Vec<Command> {
        self.error = None;
        self.messages.push(MessageView {
            key: client_message_id.clone(),
            role: Role::User,
            content: content.clone(),
            status: None,
            pending: Some(PendingState::Sending),
            run_id: None,
        });
        self.pending.push(Pending {
            client_message_id: client_message_id.clone(),
            content: content.clone(),
        });
        vec![Command::Send(ClientMessage::Message {
            content,
            client_message_id: Some(client_message_id),
        })]
    }

    /// Sends a failed message again, with the same client id (so it is never stored twice).
    pub fn retry(&mut self, client_message_id: &str) -> Vec<Command> {
        let Some(view) = self.messages.iter_mut().find(|m| {
            m.key == client_message_id && matches!(m.pending, Some(PendingState::Failed(_)))
        }) else {
            return Vec::new();
        };
        view.pending = Some(PendingState::Sending);
        let content = view.content.clone();
        self.error = None;
        self.pending.push(Pending {
            client_message_id: client_message_id.to_owned(),
            content: content.clone(),
        });
        vec![Command::Send(ClientMessage::Message {
            content,
            client_message_id: Some(client_message_id.to_owned()),
        })]
    }

    /// The user presses stop.
    pub fn stop(&self) -> Vec<Command> {
        match &self.streaming {
            Some(streaming) => vec![Command::Send(ClientMessage::Stop {
                run_id: Some(streaming.run_id),
            })],
            None => Vec::new(),
        }
    }

    /// Messages still waiting for the server, to send again after a reconnect.
    pub fn unacknowledged(&self) -> Vec<Command> {
        self.pending
            .iter()
            .map(|pending| {
                Command::Send(ClientMessage::Message {
                    content: pending.content.clone(),
                    client_message_id: Some(pending.client_message_id.clone()),
                })
            })
            .collect()
    }

    /// After (re)authenticating: resume the answer we were showing from its last applied seq,
    /// or adopt the run the server says is active, then resend unacknowledged messages.
    pub fn on_authenticated(&mut self, active_run: Option<ActiveRun>) -> Vec<Command> {
        let mut commands = Vec::new();
        match (&self.streaming, active_run) {
            // The run we showed has ended and another one started while we were away: show the
            // new one from its start, and fetch the saved answer of the old one.
            (Some(streaming), Some(active)) if active.run_id != streaming.run_id => {
                self.streaming = Some(Streaming::new(active.run_id));
                commands.push(Command::Send(ClientMessage::Resume {
                    run_id: active.run_id,
                    after_seq: 0,
                }));
                commands.push(Command::RefreshHistory);
            }
            (Some(streaming), _) => commands.push(Command::Send(ClientMessage::Resume {
                run_id: streaming.run_id,
                after_seq: streaming.applied,
            })),
            (None, Some(active)) => {
                self.streaming = Some(Streaming::new(active.run_id));
                commands.push(Command::Send(ClientMessage::Resume {
                    run_id: active.run_id,
                    after_seq: 0,
                }));
            }
            (None, None) => {}
        }
        commands.extend(self.unacknowledged());
        commands
    }

    /// Applies one frame from the server.
    pub fn apply(&mut self, frame: ServerMessage) -> Vec<Command> {
        match frame {
            ServerMessage::Start {
                run_id,
                client_message_id,
                ..
            } => self.on_start(run_id, client_message_id),
            ServerMessage::Chunk {
                run_id,
                seq,
                content,
            } => self.on_chunk(run_id, seq, &content),
            ServerMessage::Complete {
                run_id,
                full_output,
                status,
                ..
            } => {
                self.on_complete(run_id, full_output, status);
                Vec::new()
            }
            ServerMessage::Error {
                code,
                message,
                run_id,
                ..
            } => {
                self.on_error(code, message, run_id);
                Vec::new()
            }
            ServerMessage::Authenticated { active_run, .. } => self.on_authenticated(active_run),
            ServerMessage::Connected { .. } | ServerMessage::Pong => Vec::new(),
        }
    }

    fn has_answer(&self, run_id: Uuid) -> bool {
        self.messages
            .iter()
            .any(|m| m.role == Role::Assistant && m.run_id == Some(run_id))
    }

    fn on_start(&mut self, run_id: Uuid, client_message_id: Option<String>) -> Vec<Command> {
        let mut commands = Vec::new();
        // Ours if it names one of our unacknowledged messages; never guessed from order, since
        // another tab or device may start a run at the same moment.
        let ours = client_message_id.as_ref().and_then(|id| {
            self.pending
                .iter()
                .position(|pending| &pending.client_message_id == id)
        });
        match ours {
            Some(index) => {
                let pending = self.pending.remove(index);
                if let Some(view) = self
                    .messages
                    .iter_mut()
                    .find(|m| m.key == pending.client_message_id)
                {
                    view.pending = None;
                    view.run_id = Some(run_id);
                }
            }
            None if !self.messages.iter().any(|m| m.run_id == Some(run_id)) => {
                // Another tab or device sent it: fetch its text.
                commands.push(Command::RefreshHistory);
            }
            None => {}
        }
        let streaming_this = self.streaming.as_ref().is_some_and(|s| s.run_id == run_id);
        if !streaming_this && !self.has_answer(run_id) {
            self.streaming = Some(Streaming::new(run_id));
        }
        commands
    }

    fn on_chunk(&mut self, run_id: Uuid, seq: u64, content: &str) -> Vec<Command> {
        if self.has_answer(run_id) {
            return Vec::new();
        }
        let streaming = match &mut self.streaming {
            Some(streaming) if streaming.run_id == run_id => streaming,
            _ => self.streaming.insert(Streaming::new(run_id)),
        };
        match streaming.apply(seq, content) {
            ChunkOutcome::Applied | ChunkOutcome::Duplicate => Vec::new(),
            ChunkOutcome::Gap { after } => vec![Command::Send(ClientMessage::Resume {
                run_id,
                after_seq: after,
            })],
        }
    }

    fn on_complete(&mut self, run_id: Uuid, full_output: String, status: RunStatus) {
        if self.streaming.as_ref().is_some_and(|s| s.run_id == run_id) {
            self.streaming = None;
        }
        if self.has_answer(run_id) {
            return;
        }
        self.messages.push(MessageView {
            key: format!("answer-{run_id}"),
            role: Role::Assistant,
            content: full_output,
            status: Some(status),
            pending: None,
            run_id: Some(run_id),
        });
    }

    fn on_error(&mut self, code: ErrorCode, message: String, run_id: Option<Uuid>) {
        let refuses_a_send = matches!(
            code,
            ErrorCode::RunInProgress
                | ErrorCode::EmptyContent
                | ErrorCode::TooLarge
                | ErrorCode::InvalidMessage
                | ErrorCode::RateLimited
                | ErrorCode::Overloaded
                | ErrorCode::Unavailable
        );
        if refuses_a_send && run_id.is_none() && !self.pending.is_empty() {
            let pending = self.pending.remove(0);
            if let Some(view) = self
                .messages
                .iter_mut()
                .find(|m| m.key == pending.client_message_id)
            {
                view.pending = Some(PendingState::Failed(human_error(code, &message)));
            }
            return;
        }
        match code {
            // Handled by the socket driver (refresh and reconnect) or harmless.
            ErrorCode::TokenExpired
            | ErrorCode::InvalidToken
            | ErrorCode::NoActiveRun
            | ErrorCode::ShuttingDown => {}
            _ => self.error = Some(human_error(code, &message)),
        }
    }
}

/// Words a person understands for an error code.
pub fn human_error(code: ErrorCode, message: &str) -> String {
    match code {
        ErrorCode::RunInProgress => {
            "An answer is still being written. Wait for it or stop it, then send again.".into()
        }
        ErrorCode::TooLarge => "That message is too long.".into(),
        ErrorCode::EmptyContent => "Type a message first.".into(),
        ErrorCode::RateLimited => "You are sending too fast. Try again in a moment.".into(),
        ErrorCode::Overloaded => "The server is busy right now. Try again in a moment.".into(),
        ErrorCode::ModelError => format!("The model failed to answer: {message}"),
        ErrorCode::NotFound => "This conversation no longer exists.".into(),
        ErrorCode::TooManyConnections => {
            "Too many open tabs or devices. Close some and retry.".into()
        }
        _ => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> Uuid {
        Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001)
    }

    fn message_id() -> Uuid {
        Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0002)
    }

    fn start() -> ServerMessage {
        start_for(Some("c-1"))
    }

    fn start_for(client_message_id: Option<&str>) -> ServerMessage {
        ServerMessage::Start {
            run_id: run(),
            conversation_id: Uuid::nil(),
            message_id: message_id(),
            client_message_id: client_message_id.map(str::to_owned),
        }
    }

    fn chunk(seq: u64, content: &str) -> ServerMessage {
        ServerMessage::Chunk {
            run_id: run(),
            seq,
            content: content.into(),
        }
    }

    fn complete(text: &str, status: RunStatus) -> ServerMessage {
        ServerMessage::Complete {
            run_id: run(),
            full_output: text.into(),
            status,
            usage: None,
        }
    }

    #[test]
    fn a_sent_message_shows_at_once_and_is_confirmed_by_start() {
        let mut chat = ChatState::default();
        let commands = chat.send("hello".into(), "c-1".into());
        assert_eq!(
            commands,
            vec![Command::Send(ClientMessage::Message {
                content: "hello".into(),
                client_message_id: Some("c-1".into())
            })]
        );
        assert_eq!(chat.messages[0].pending, Some(PendingState::Sending));
        assert!(chat.apply(start()).is_empty());
        assert_eq!(chat.messages[0].pending, None);
        assert_eq!(chat.messages[0].run_id, Some(run()));
        assert_eq!(chat.streaming, Some(Streaming::new(run())));
    }

    #[test]
    fn chunks_apply_by_seq_ignoring_duplicates_and_resuming_gaps() {
        let mut chat = ChatState::default();
        chat.send("q".into(), "c-1".into());
        chat.apply(start());
        chat.apply(chunk(1, "Hel"));
        chat.apply(chunk(2, "lo"));
        assert!(chat.apply(chunk(2, "lo")).is_empty(), "duplicate ignored");
        assert!(
            chat.apply(chunk(1, "Hel")).is_empty(),
            "old duplicate ignored"
        );
        let gap = chat.apply(chunk(4, "!"));
        assert_eq!(
            gap,
            vec![Command::Send(ClientMessage::Resume {
                run_id: run(),
                after_seq: 2
            })]
        );
        assert_eq!(
            chat.streaming.as_ref().unwrap().text,
            "Hello",
            "a gap applies nothing"
        );
        chat.apply(chunk(3, ", world"));
        chat.apply(chunk(4, "!"));
        assert_eq!(chat.streaming.as_ref().unwrap().text, "Hello, world!");
        chat.apply(complete("Hello, world!", RunStatus::Completed));
        assert!(chat.streaming.is_none());
        let answer = chat.messages.last().unwrap();
        assert_eq!(answer.role, Role::Assistant);
        assert_eq!(answer.content, "Hello, world!");
        assert_eq!(answer.status, Some(RunStatus::Completed));
        // A second complete (a replay) adds nothing.
        chat.apply(complete("Hello, world!", RunStatus::Completed));
        assert_eq!(chat.messages.len(), 2);
    }

    #[test]
    fn reconnecting_resumes_from_the_last_applied_seq_and_resends_unacknowledged() {
        let mut chat = ChatState::default();
        chat.send("first".into(), "c-1".into());
        chat.apply(start());
        chat.apply(chunk(1, "a"));
        chat.apply(chunk(2, "b"));
        let commands = chat.on_authenticated(Some(ActiveRun {
            run_id: run(),
            message_id: message_id(),
            last_seq: 5,
        }));
        assert_eq!(
            commands,
            vec![Command::Send(ClientMessage::Resume {
                run_id: run(),
                after_seq: 2
            })]
        );
        // A message whose start never came is sent again with the same client id.
        let mut chat = ChatState::default();
        chat.send("lost?".into(), "c-9".into());
        assert_eq!(
            chat.on_authenticated(None),
            vec![Command::Send(ClientMessage::Message {
                content: "lost?".into(),
                client_message_id: Some("c-9".into())
            })]
        );
    }

    #[test]
    fn a_fresh_tab_adopts_the_active_run_from_the_start() {
        let mut chat = ChatState::default();
        let commands = chat.on_authenticated(Some(ActiveRun {
            run_id: run(),
            message_id: message_id(),
            last_seq: 7,
        }));
        assert_eq!(
            commands,
            vec![Command::Send(ClientMessage::Resume {
                run_id: run(),
                after_seq: 0
            })]
        );
        chat.apply(chunk(1, "x"));
        assert_eq!(chat.streaming.as_ref().unwrap().text, "x");
    }

    #[test]
    fn a_run_started_elsewhere_refreshes_the_history() {
        let mut chat = ChatState::default();
        assert_eq!(chat.apply(start()), vec![Command::RefreshHistory]);
        assert!(chat.streaming.is_some());
    }

    #[test]
    fn another_devices_run_is_never_taken_for_our_unacknowledged_message() {
        // We sent P; at the same moment another device's message M started a run.
        let mut chat = ChatState::default();
        chat.send("P".into(), "c-p".into());
        assert_eq!(
            chat.apply(start_for(Some("c-m"))),
            vec![Command::RefreshHistory]
        );
        assert_eq!(
            chat.messages[0].pending,
            Some(PendingState::Sending),
            "P is not M's"
        );
        // P is then refused (a run is in progress) and can be retried.
        chat.apply(ServerMessage::error(ErrorCode::RunInProgress, "busy", None));
        assert!(matches!(
            chat.messages[0].pending,
            Some(PendingState::Failed(_))
        ));
    }

    #[test]
    fn a_new_active_run_found_on_reconnect_replaces_the_one_we_showed() {
        let mut chat = ChatState::default();
        chat.send("first".into(), "c-1".into());
        chat.apply(start());
        chat.apply(chunk(1, "old"));
        let other = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0009);
        let commands = chat.on_authenticated(Some(ActiveRun {
            run_id: other,
            message_id: message_id(),
            last_seq: 3,
        }));
        assert_eq!(
            commands,
            vec![
                Command::Send(ClientMessage::Resume {
                    run_id: other,
                    after_seq: 0
                }),
                Command::RefreshHistory,
            ]
        );
        assert_eq!(chat.streaming, Some(Streaming::new(other)));
    }

    #[test]
    fn a_refused_send_can_be_retried_with_the_same_client_id() {
        let mut chat = ChatState::default();
        chat.send("too soon".into(), "c-2".into());
        chat.apply(ServerMessage::error(ErrorCode::RunInProgress, "busy", None));
        assert!(matches!(
            chat.messages[0].pending,
            Some(PendingState::Failed(_))
        ));
        assert!(
            chat.on_authenticated(None).is_empty(),
            "failed messages are not resent"
        );
        let commands = chat.retry("c-2");
        assert_eq!(
            commands,
            vec![Command::Send(ClientMessage::Message {
                content: "too soon".into(),
                client_message_id: Some("c-2".into())
            })]
        );
        assert_eq!(chat.messages[0].pending, Some(PendingState::Sending));
    }

    #[test]
    fn model_errors_are_shown_and_stop_targets_the_streaming_run() {
        let mut chat = ChatState::default();
        assert!(chat.stop().is_empty());
        chat.send("q".into(), "c-1".into());
        chat.apply(start());
        assert_eq!(
            chat.stop(),
            vec![Command::Send(ClientMessage::Stop {
                run_id: Some(run())
            })]
        );
        chat.apply(ServerMessage::error(
            ErrorCode::ModelError,
            "upstream 500",
            Some(run()),
        ));
        assert!(chat.error.as_deref().unwrap().contains("upstream 500"));
    }

    #[test]
    fn history_reload_keeps_pending_messages_and_drops_committed_ones() {
        let mut chat = ChatState::default();
        chat.send("kept".into(), "c-keep".into());
        chat.send("committed".into(), "c-done".into());
        let committed = api::Message {
            id: message_id(),
            conversation_id: Uuid::nil(),
            role: Role::User,
            content: "committed".into(),
            run_id: Some(run()),
            run_status: None,
            client_message_id: Some("c-done".into()),
            created_at: time::OffsetDateTime::UNIX_EPOCH,
        };
        chat.load_history(vec![committed]);
        assert_eq!(chat.messages.len(), 2);
        assert_eq!(chat.messages[0].key, "c-done");
        assert_eq!(chat.messages[0].pending, None);
        assert_eq!(chat.messages[1].key, "c-keep");
        assert_eq!(chat.unacknowledged().len(), 1);
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// Chunks arriving in any order, repeated or missing, with a resume from the last
            /// applied seq after every gap (the server replays what follows it, in order):
            /// the text shown is exactly the answer, each chunk once.
            #[test]
            fn any_delivery_with_resume_on_gaps_shows_the_exact_answer(
                chunks in proptest::collection::vec("[a-z ]{1,5}", 1..40),
                deliveries in proptest::collection::vec(0usize..40, 0..100),
            ) {
                let mut streaming = Streaming::new(run());
                let resume = |streaming: &mut Streaming, after: u64| {
                    for (index, text) in chunks.iter().enumerate().skip(after as usize) {
                        assert_eq!(
                            streaming.apply(index as u64 + 1, text),
                            ChunkOutcome::Applied
                        );
                    }
                };
                for index in deliveries {
                    let Some(text) = chunks.get(index) else { continue };
                    if let ChunkOutcome::Gap { after } = streaming.apply(index as u64 + 1, text) {
                        resume(&mut streaming, after);
                    }
                }
                let after = streaming.applied;
                resume(&mut streaming, after);
                prop_assert_eq!(&streaming.text, &chunks.concat());
                prop_assert_eq!(streaming.applied, chunks.len() as u64);
            }
        }
    }
}
