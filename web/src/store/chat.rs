//! One open conversation's state and how each server frame changes it. Pure: the socket driver
//! feeds frames in and carries the returned commands out.
//!
//! Chunks are applied strictly by `seq`: the next one extends the answer, an old one is a
//! duplicate and is ignored, a later one means frames were lost and the run is resumed from the
//! last applied seq. So whatever the network does, the text shown is the text produced, with no
//! gap and no repeat.

use uuid::Uuid;
use wadi_protocol::{
    ActiveRun, ClientMessage, ErrorCode, RunStatus, ServerMessage, Usage,
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
    /// The stored message's id (unknown for a pending message, or an answer until the history
    /// is fetched again).
    pub id: Option<Uuid>,
    /// The message it follows.
    pub parent_id: Option<Uuid>,
    /// Every version at this place in the tree, this one included, when there are several.
    pub siblings: Vec<Uuid>,
    /// Answers: the model that wrote it and the tokens it took.
    pub model: Option<String>,
    pub usage: Option<Usage>,
}

impl MessageView {
    /// `(position, count)` among its versions (1-based), when there are several.
    pub fn version(&self) -> Option<(usize, usize)> {
        let id = self.id?;
        let at = self.siblings.iter().position(|s| *s == id)?;
        (self.siblings.len() > 1).then_some((at + 1, self.siblings.len()))
    }

    /// What the list re-renders a message on: its identity and everything shown about it.
    pub fn render_key(&self) -> String {
        format!(
            "{}|{:?}|{:?}|{}",
            self.key,
            self.pending,
            self.id,
            self.siblings.len()
        )
    }

    /// The version `step` places away (-1: previous, +1: next), if there is one.
    pub fn sibling(&self, step: isize) -> Option<Uuid> {
        let (at, _) = self.version()?;
        let index = (at - 1).checked_add_signed(step)?;
        self.siblings.get(index).copied()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PendingState {
    /// Typed while an answer was being written: sent when it ends, unless cancelled.
    Queued,
    /// Sent (or queued until the socket is back); waiting for `start`.
    Sending,
    /// Refused; the user may retry.
    Failed(String),
}

/// A user message waiting for its `start`, with where it goes in the tree (resent as is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub client_message_id: String,
    pub content: String,
    pub parent_id: Option<Uuid>,
    pub edit_of: Option<Uuid>,
}

impl Pending {
    fn frame(&self) -> ClientMessage {
        ClientMessage::Message {
            content: self.content.clone(),
            client_message_id: Some(self.client_message_id.clone()),
            parent_id: self.parent_id,
            edit_of: self.edit_of,
        }
    }
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
    /// The path through the conversation's tree that is shown, oldest first.
    pub messages: Vec<MessageView>,
    pub streaming: Option<Streaming>,
    /// An error to show in place (not tied to one message).
    pub error: Option<String>,
    /// The branch shown: the path through this message (to its newest descendant); `None` for
    /// the conversation's newest message.
    pub through: Option<Uuid>,
    /// Sent messages without a `start` yet, oldest first.
    pending: Vec<Pending>,
    /// Refused messages the user may retry (where they were to go).
    failed: Vec<Pending>,
    /// A regenerate sent and not started yet: the user message it answers.
    regenerating: Option<Uuid>,
    /// Messages typed while an answer was being written, sent one by one as answers end.
    queue: Vec<Pending>,
    /// The cursor of the page before the first message shown (loaded when the user scrolls
    /// up), or `None` when the first message shown is the conversation's first.
    pub older: Option<String>,
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

/// Stored messages as shown.
fn views(history: Vec<api::Message>) -> Vec<MessageView> {
    history
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
            id: Some(message.id),
            parent_id: message.parent_id,
            siblings: message.siblings,
            model: message.model,
            usage: message.usage,
        })
        .collect()
}

impl ChatState {
    /// A conversation shown on the branch through `through` (the newest without it).
    pub fn showing(through: Option<Uuid>) -> Self {
        Self {
            through,
            ..Self::default()
        }
    }

    /// Replaces the history with what the server has (its newest page, and the cursor of the
    /// page before it), keeping messages still pending here. Older pages loaded by scrolling up
    /// stay when the new page continues them: a path is a chain from the conversation's first
    /// message, so a message on both paths has every message before it on both too.
    pub fn load_history(&mut self, history: Vec<api::Message>, older: Option<String>) {
        let mut messages = views(history);
        let continued = messages
            .first()
            .and_then(|first| first.id)
            .and_then(|first| self.messages.iter().position(|m| m.id == Some(first)));
        match continued {
            Some(index) if index > 0 && older.is_some() => {
                let mut earlier: Vec<MessageView> = self.messages[..index]
                    .iter()
                    .filter(|m| m.pending.is_none())
                    .cloned()
                    .collect();
                earlier.append(&mut messages);
                messages = earlier;
            }
            _ => self.older = older,
        }
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

    /// The page before the first message shown, fetched with `cursor`: shown above it. False
    /// (and nothing changes) when the history was replaced since the page was asked for.
    pub fn prepend_older(
        &mut self,
        cursor: &str,
        page: Vec<api::Message>,
        older: Option<String>,
    ) -> bool {
        if self.older.as_deref() != Some(cursor) {
            return false;
        }
        let mut earlier: Vec<MessageView> = views(page)
            .into_iter()
            .filter(|m| !self.messages.iter().any(|shown| shown.id == m.id))
            .collect();
        earlier.append(&mut self.messages);
        self.messages = earlier;
        self.older = older;
        true
    }

    /// The user sends a message: it shows at once, and goes out as a frame. It continues the
    /// branch shown: after its last answer (or, when that answer's id is not known yet, after
    /// the newest message, which it then is).
    pub fn send(&mut self, content: String, client_message_id: String) -> Vec<Command> {
        // While an answer is being written (or a send waits for its start), the message waits
        // its turn here instead of being refused by the server.
        if self.streaming.is_some() || !self.pending.is_empty() || !self.queue.is_empty() {
            self.error = None;
            self.messages.push(MessageView {
                key: client_message_id.clone(),
                role: Role::User,
                content: content.clone(),
                status: None,
                pending: Some(PendingState::Queued),
                run_id: None,
                id: None,
                parent_id: None,
                siblings: Vec::new(),
                model: None,
                usage: None,
            });
            self.queue.push(Pending {
                client_message_id,
                content,
                parent_id: None,
                edit_of: None,
            });
            return Vec::new();
        }
        let parent_id = self
            .messages
            .iter()
            .rev()
            .find(|m| m.pending.is_none())
            .filter(|m| m.role == Role::Assistant)
            .and_then(|m| m.id);
        self.submit(content, client_message_id, parent_id, None)
    }

    /// The user edits a message of the branch shown: a new version of it (a sibling), shown in
    /// its place; the original and what followed it stay stored, one `‹ ›` away.
    pub fn edit(
        &mut self,
        message_id: Uuid,
        content: String,
        client_message_id: String,
    ) -> Vec<Command> {
        if self.streaming.is_some() {
            return Vec::new();
        }
        let Some(at) = self.user_message_at(message_id) else {
            return Vec::new();
        };
        self.messages.truncate(at);
        self.submit(content, client_message_id, None, Some(message_id))
    }

    fn submit(
        &mut self,
        content: String,
        client_message_id: String,
        parent_id: Option<Uuid>,
        edit_of: Option<Uuid>,
    ) -> Vec<Command> {
        self.error = None;
        self.messages.push(MessageView {
            key: client_message_id.clone(),
            role: Role::User,
            content: content.clone(),
            status: None,
            pending: Some(PendingState::Sending),
            run_id: None,
            id: None,
            parent_id: None,
            siblings: Vec::new(),
            model: None,
            usage: None,
        });
        let pending = Pending {
            client_message_id,
            content,
            parent_id,
            edit_of,
        };
        let frame = pending.frame();
        self.pending.push(pending);
        vec![Command::Send(frame)]
    }

    /// The user cancels a queued message: it goes, unsent.
    pub fn cancel(&mut self, client_message_id: &str) {
        self.queue
            .retain(|q| q.client_message_id != client_message_id);
        self.messages
            .retain(|m| !(m.key == client_message_id && m.pending == Some(PendingState::Queued)));
    }

    /// Sends the next queued message, if nothing is being written now.
    fn next_queued(&mut self) -> Vec<Command> {
        if self.streaming.is_some() || !self.pending.is_empty() || self.queue.is_empty() {
            return Vec::new();
        }
        let next = self.queue.remove(0);
        if let Some(view) = self
            .messages
            .iter_mut()
            .find(|m| m.key == next.client_message_id)
        {
            view.pending = Some(PendingState::Sending);
        }
        let frame = next.frame();
        self.pending.push(next);
        vec![Command::Send(frame)]
    }

    /// Where the user message `message_id` is in the branch shown.
    fn user_message_at(&self, message_id: Uuid) -> Option<usize> {
        self.messages
            .iter()
            .position(|m| m.id == Some(message_id) && m.role == Role::User)
    }

    /// The user asks for another answer to the user message `message_id`: the answer shown
    /// after it makes way for the new one (it stays, one `‹ ›` away).
    pub fn regenerate(&mut self, message_id: Uuid) -> Vec<Command> {
        if self.streaming.is_some() {
            return Vec::new();
        }
        let Some(at) = self.user_message_at(message_id) else {
            return Vec::new();
        };
        self.error = None;
        self.messages.truncate(at + 1);
        self.regenerating = Some(message_id);
        vec![Command::Send(ClientMessage::Regenerate { message_id })]
    }

    /// The user switches to another version of a message: the path through it is fetched.
    pub fn show_branch(&mut self, through: Uuid) -> Vec<Command> {
        if self.streaming.is_some() || !self.pending.is_empty() {
            return Vec::new();
        }
        self.through = Some(through);
        vec![Command::RefreshHistory]
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
        let (parent_id, edit_of) = self
            .failed
            .iter()
            .find(|p| p.client_message_id == client_message_id)
            .map_or((None, None), |p| (p.parent_id, p.edit_of));
        self.failed
            .retain(|p| p.client_message_id != client_message_id);
        let pending = Pending {
            client_message_id: client_message_id.to_owned(),
            content,
            parent_id,
            edit_of,
        };
        let frame = pending.frame();
        self.pending.push(pending);
        vec![Command::Send(frame)]
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
            .map(|pending| Command::Send(pending.frame()))
            .collect()
    }

    /// The server's events may have been lost (its instance could not hear the others for a
    /// while): an answer that started and ended meanwhile is fetched with the shown path. Not
    /// while an answer streams or a message is on its way: their own frames bring them (and
    /// one run at a time per conversation means nothing else can have been missed).
    fn on_resync(&mut self) -> Vec<Command> {
        if self.streaming.is_some() || !self.pending.is_empty() {
            return Vec::new();
        }
        vec![Command::RefreshHistory]
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
                message_id,
                client_message_id,
                ..
            } => self.on_start(run_id, message_id, client_message_id),
            ServerMessage::Chunk {
                run_id,
                seq,
                content,
            } => self.on_chunk(run_id, seq, &content),
            ServerMessage::Complete {
                run_id,
                full_output,
                status,
                usage,
            } => self.on_complete(run_id, full_output, status, usage),
            ServerMessage::Error {
                code,
                message,
                run_id,
                ..
            } => self.on_error(code, message, run_id),
            ServerMessage::Authenticated { active_run, .. } => self.on_authenticated(active_run),
            ServerMessage::Connected { .. }
            | ServerMessage::Pong
            | ServerMessage::Conversation { .. } => Vec::new(),
            ServerMessage::Resync { .. } => self.on_resync(),
        }
    }

    fn has_answer(&self, run_id: Uuid) -> bool {
        self.messages
            .iter()
            .any(|m| m.role == Role::Assistant && m.run_id == Some(run_id))
    }

    fn on_start(
        &mut self,
        run_id: Uuid,
        message_id: Uuid,
        client_message_id: Option<String>,
    ) -> Vec<Command> {
        let mut commands = Vec::new();
        if self.regenerating == Some(message_id) {
            self.regenerating = None;
        }
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
            // Another answer to a message shown (regenerated here or elsewhere): what followed that
            // message makes way for it.
            None if self.messages.iter().any(|m| m.id == Some(message_id)) => {
                if let Some(at) = self.messages.iter().position(|m| m.id == Some(message_id)) {
                    self.messages.truncate(at + 1);
                }
            }
            None if !self.messages.iter().any(|m| m.run_id == Some(run_id)) => {
                // Another tab or device sent it: fetch its text.
                self.through = None;
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

    /// The answer is final: shown at once, then the branch is fetched again for what only the
    /// server knows (its id, its siblings, its model and usage).
    fn on_complete(
        &mut self,
        run_id: Uuid,
        full_output: String,
        status: RunStatus,
        usage: Option<Usage>,
    ) -> Vec<Command> {
        if self.streaming.as_ref().is_some_and(|s| s.run_id == run_id) {
            self.streaming = None;
        }
        if self.has_answer(run_id) {
            return Vec::new();
        }
        self.messages.push(MessageView {
            key: format!("answer-{run_id}"),
            role: Role::Assistant,
            content: full_output,
            status: Some(status),
            pending: None,
            run_id: Some(run_id),
            id: None,
            parent_id: None,
            siblings: Vec::new(),
            model: None,
            usage,
        });
        // The newest answer ends the branch it belongs to.
        self.through = None;
        let mut commands = self.next_queued();
        commands.push(Command::RefreshHistory);
        commands
    }

    fn on_error(&mut self, code: ErrorCode, message: String, run_id: Option<Uuid>) -> Vec<Command> {
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
            self.failed.push(pending.clone());
            if let Some(view) = self
                .messages
                .iter_mut()
                .find(|m| m.key == pending.client_message_id)
            {
                view.pending = Some(PendingState::Failed(human_error(code, &message)));
            }
            return self.next_queued();
        }
        let mut commands = Vec::new();
        let refuses_a_regenerate =
            refuses_a_send || matches!(code, ErrorCode::NotFound | ErrorCode::InvalidRequest);
        if refuses_a_regenerate && run_id.is_none() && self.regenerating.take().is_some() {
            // The answer it was to replace is shown again.
            commands.push(Command::RefreshHistory);
        }
        match code {
            // Handled by the socket driver (refresh and reconnect) or harmless.
            ErrorCode::TokenExpired
            | ErrorCode::InvalidToken
            | ErrorCode::NoActiveRun
            | ErrorCode::ShuttingDown => {}
            _ => self.error = Some(human_error(code, &message)),
        }
        commands
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
        complete_with(text, status, None)
    }

    fn complete_with(text: &str, status: RunStatus, usage: Option<Usage>) -> ServerMessage {
        ServerMessage::Complete {
            run_id: run(),
            full_output: text.into(),
            status,
            usage,
        }
    }

    #[test]
    fn a_stopped_answer_shows_the_usage_its_complete_carries_at_once() {
        let mut chat = ChatState::default();
        chat.send("hello".into(), "c-1".into());
        chat.apply(start());
        chat.apply(chunk(1, "Hel"));
        let usage = Usage {
            prompt_tokens: 8,
            completion_tokens: 1,
            total_tokens: 9,
            estimated: true,
        };
        chat.apply(complete_with("Hel", RunStatus::Stopped, Some(usage)));
        let answer = chat.messages.last().unwrap();
        assert_eq!(answer.status, Some(RunStatus::Stopped));
        assert_eq!(answer.usage, Some(usage));
    }

    #[test]
    fn a_sent_message_shows_at_once_and_is_confirmed_by_start() {
        let mut chat = ChatState::default();
        let commands = chat.send("hello".into(), "c-1".into());
        assert_eq!(
            commands,
            vec![Command::Send(ClientMessage::Message {
                content: "hello".into(),
                client_message_id: Some("c-1".into()),
                parent_id: None,
                edit_of: None,
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
                client_message_id: Some("c-9".into()),
                parent_id: None,
                edit_of: None,
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
    fn a_resync_refreshes_the_history_unless_an_answer_streams() {
        let mut chat = ChatState::default();
        assert_eq!(
            chat.apply(ServerMessage::Resync { within_ms: 0 }),
            vec![Command::RefreshHistory]
        );
        chat.apply(start());
        assert_eq!(
            chat.apply(ServerMessage::Resync { within_ms: 0 }),
            Vec::new()
        );
        chat.apply(complete("done", RunStatus::Completed));
        chat.send("next".into(), "c-2".into());
        assert_eq!(
            chat.apply(ServerMessage::Resync { within_ms: 0 }),
            Vec::new(),
            "a message on its way"
        );
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
                client_message_id: Some("c-2".into()),
                parent_id: None,
                edit_of: None,
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
            parent_id: None,
            siblings: Vec::new(),
            model: None,
            usage: None,
        };
        chat.load_history(vec![committed], None);
        assert_eq!(chat.messages.len(), 2);
        assert_eq!(chat.messages[0].key, "c-done");
        assert_eq!(chat.messages[0].pending, None);
        assert_eq!(chat.messages[1].key, "c-keep");
        assert_eq!(chat.unacknowledged().len(), 1);
    }

    fn stored(id: u128, parent: Option<u128>, role: Role, content: &str) -> api::Message {
        api::Message {
            id: Uuid::from_u128(id),
            conversation_id: Uuid::nil(),
            role,
            content: content.into(),
            run_id: None,
            run_status: None,
            client_message_id: None,
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            parent_id: parent.map(Uuid::from_u128),
            siblings: Vec::new(),
            model: None,
            usage: None,
        }
    }

    fn branch() -> Vec<api::Message> {
        vec![
            stored(1, None, Role::User, "q1"),
            stored(2, Some(1), Role::Assistant, "a1"),
            stored(3, Some(2), Role::User, "q2"),
            stored(4, Some(3), Role::Assistant, "a2"),
        ]
    }

    fn ids(chat: &ChatState) -> Vec<u128> {
        chat.messages
            .iter()
            .filter_map(|m| m.id.map(|id| id.as_u128()))
            .collect()
    }

    #[test]
    fn older_pages_go_above_and_survive_a_reload_of_the_newest_page() {
        let path: Vec<api::Message> = (1..=6u128)
            .map(|n| {
                let role = if n % 2 == 1 {
                    Role::User
                } else {
                    Role::Assistant
                };
                stored(n, (n > 1).then(|| n - 1), role, &format!("m{n}"))
            })
            .collect();
        let mut chat = ChatState::default();
        chat.load_history(path[4..].to_vec(), Some("before-5".into()));
        assert_eq!(ids(&chat), [5, 6]);
        assert_eq!(chat.older.as_deref(), Some("before-5"));
        // A page asked for before the history changed is dropped.
        assert!(!chat.prepend_older("stale", path[..4].to_vec(), None));
        assert!(chat.prepend_older("before-5", path[2..4].to_vec(), Some("before-3".into())));
        assert_eq!(ids(&chat), [3, 4, 5, 6]);
        assert_eq!(chat.older.as_deref(), Some("before-3"));
        // The newest page again (a message arrived elsewhere): what was loaded above stays.
        let mut newest = path[4..].to_vec();
        newest.push(stored(7, Some(6), Role::User, "m7"));
        chat.load_history(newest, Some("before-5".into()));
        assert_eq!(ids(&chat), [3, 4, 5, 6, 7]);
        assert_eq!(chat.older.as_deref(), Some("before-3"));
        assert!(chat.prepend_older("before-3", path[..2].to_vec(), None));
        assert_eq!(ids(&chat), [1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(chat.older, None);
        // Another branch that shares nothing shown: replaced, with its own cursor.
        chat.load_history(
            vec![stored(9, Some(8), Role::User, "x")],
            Some("before-9".into()),
        );
        assert_eq!(ids(&chat), [9]);
        assert_eq!(chat.older.as_deref(), Some("before-9"));
    }

    #[test]
    fn a_new_message_continues_the_branch_shown() {
        let mut chat = ChatState::default();
        chat.load_history(branch(), None);
        let commands = chat.send("q3".into(), "c-3".into());
        assert_eq!(
            commands,
            vec![Command::Send(ClientMessage::Message {
                content: "q3".into(),
                client_message_id: Some("c-3".into()),
                parent_id: Some(Uuid::from_u128(4)),
                edit_of: None,
            })]
        );
        // Resent as it was after a reconnect.
        assert_eq!(chat.unacknowledged(), commands);
        // An answer whose id is not known yet (just completed): after the newest message.
        let mut chat = ChatState::default();
        chat.send("q1".into(), "c-1".into());
        chat.apply(start());
        chat.apply(complete("a1", RunStatus::Completed));
        let commands = chat.send("q2".into(), "c-2".into());
        assert!(matches!(
            &commands[0],
            Command::Send(ClientMessage::Message {
                parent_id: None,
                edit_of: None,
                ..
            })
        ));
    }

    #[test]
    fn regenerate_replaces_the_answer_shown_and_a_refusal_brings_it_back() {
        let mut chat = ChatState::default();
        chat.load_history(branch(), None);
        let commands = chat.regenerate(Uuid::from_u128(3));
        assert_eq!(
            commands,
            vec![Command::Send(ClientMessage::Regenerate {
                message_id: Uuid::from_u128(3)
            })]
        );
        assert_eq!(chat.messages.len(), 3, "the old answer makes way");
        let commands = chat.apply(ServerMessage::error(ErrorCode::RunInProgress, "busy", None));
        assert_eq!(commands, vec![Command::RefreshHistory]);
        // Started: the new answer streams after the question, and completes into the branch.
        chat.load_history(branch(), None);
        chat.regenerate(Uuid::from_u128(3));
        let commands = chat.apply(ServerMessage::Start {
            run_id: run(),
            conversation_id: Uuid::nil(),
            message_id: Uuid::from_u128(3),
            client_message_id: None,
        });
        assert!(
            commands.is_empty(),
            "no refetch: it answers a message shown"
        );
        assert_eq!(chat.streaming, Some(Streaming::new(run())));
        let commands = chat.apply(complete("a2 again", RunStatus::Completed));
        assert_eq!(commands, vec![Command::RefreshHistory]);
        assert_eq!(chat.messages.last().unwrap().content, "a2 again");
        assert_eq!(chat.through, None);
        // Nothing to regenerate while an answer streams, or for an answer's id.
        chat.streaming = Some(Streaming::new(run()));
        assert!(chat.regenerate(Uuid::from_u128(3)).is_empty());
        chat.streaming = None;
        assert!(chat.regenerate(Uuid::from_u128(4)).is_empty());
    }

    #[test]
    fn another_tabs_regenerate_replaces_the_answer_shown_here() {
        let mut chat = ChatState::default();
        chat.load_history(branch(), None);
        let commands = chat.apply(ServerMessage::Start {
            run_id: run(),
            conversation_id: Uuid::nil(),
            message_id: Uuid::from_u128(3),
            client_message_id: None,
        });
        assert!(commands.is_empty());
        assert_eq!(chat.messages.len(), 3);
        assert_eq!(chat.streaming, Some(Streaming::new(run())));
    }

    #[test]
    fn an_edit_is_a_new_version_in_place_of_the_original() {
        let mut chat = ChatState::default();
        chat.load_history(branch(), None);
        let commands = chat.edit(Uuid::from_u128(3), "q2, better".into(), "c-e".into());
        assert_eq!(
            commands,
            vec![Command::Send(ClientMessage::Message {
                content: "q2, better".into(),
                client_message_id: Some("c-e".into()),
                parent_id: None,
                edit_of: Some(Uuid::from_u128(3)),
            })]
        );
        let shown: Vec<&str> = chat.messages.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(shown, ["q1", "a1", "q2, better"]);
        assert_eq!(chat.messages[2].pending, Some(PendingState::Sending));
        // Refused, then retried: where it goes is kept.
        chat.apply(ServerMessage::error(
            ErrorCode::RateLimited,
            "slow down",
            None,
        ));
        let commands = chat.retry("c-e");
        assert!(matches!(
            &commands[0],
            Command::Send(ClientMessage::Message { edit_of: Some(id), .. })
                if *id == Uuid::from_u128(3)
        ));
    }

    #[test]
    fn versions_are_counted_and_switching_fetches_the_branch() {
        let mut history = branch();
        history[3].siblings = vec![Uuid::from_u128(4), Uuid::from_u128(9)];
        let mut chat = ChatState::default();
        chat.load_history(history, None);
        let answer = &chat.messages[3];
        assert_eq!(answer.version(), Some((1, 2)));
        assert_eq!(answer.sibling(-1), None);
        assert_eq!(answer.sibling(1), Some(Uuid::from_u128(9)));
        assert_eq!(chat.messages[0].version(), None);
        assert_eq!(
            chat.show_branch(Uuid::from_u128(9)),
            vec![Command::RefreshHistory]
        );
        assert_eq!(chat.through, Some(Uuid::from_u128(9)));
        // Not while an answer streams.
        chat.streaming = Some(Streaming::new(run()));
        assert!(chat.show_branch(Uuid::from_u128(4)).is_empty());
    }

    #[test]
    fn a_message_typed_while_an_answer_streams_waits_its_turn() {
        let mut chat = ChatState::default();
        chat.send("first".into(), "c-1".into());
        chat.apply(start());
        // Queued, not sent (the server would refuse it: one answer at a time).
        assert!(chat.send("second".into(), "c-2".into()).is_empty());
        assert!(chat.send("third".into(), "c-3".into()).is_empty());
        assert_eq!(chat.messages[1].pending, Some(PendingState::Queued));
        // The user changes their mind about the third.
        chat.cancel("c-3");
        assert_eq!(chat.messages.len(), 2);
        // The answer ends: the second goes out.
        let commands = chat.apply(complete("done", RunStatus::Completed));
        assert_eq!(
            commands,
            vec![
                Command::Send(ClientMessage::Message {
                    content: "second".into(),
                    client_message_id: Some("c-2".into()),
                    parent_id: None,
                    edit_of: None,
                }),
                Command::RefreshHistory,
            ]
        );
        assert_eq!(chat.messages[1].pending, Some(PendingState::Sending));
        assert_eq!(chat.unacknowledged().len(), 1, "resent after a reconnect");
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
