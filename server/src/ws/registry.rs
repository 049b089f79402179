//! Every live socket, indexed by id, user, conversation and run, so that announcing a run to a
//! conversation's sockets and counting a user's connections are lookups, not scans. A socket's
//! entry is removed by the drop of its [`Registration`], so it goes whatever ends the socket.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::Notify;
use uuid::Uuid;

use crate::{
    ids::{ConversationId, RunId, UserId},
    runs::{Announce, RunHandle},
};

/// What the rest of the server tells a socket's task.
pub enum Control {
    /// A run started in the socket's conversation.
    RunStarted(Arc<RunHandle>),
    /// A watcher could not hand frames to the socket fast enough.
    SlowConsumer,
    /// The run a run socket follows was sent completely.
    RunSent,
}

/// Notes for one socket's task, oldest first. Most sockets are idle and never get one, so this
/// allocates nothing until the first note (a channel would allocate its buffer up front).
#[derive(Default)]
pub struct Inbox {
    notes: Mutex<VecDeque<Control>>,
    ready: Notify,
}

impl Inbox {
    pub fn post(&self, note: Control) {
        match self.notes.lock() {
            Ok(mut notes) => notes.push_back(note),
            Err(poisoned) => poisoned.into_inner().push_back(note),
        }
        self.ready.notify_one();
    }

    /// The next note, waiting for one if there is none.
    pub async fn next(&self) -> Control {
        loop {
            let note = match self.notes.lock() {
                Ok(mut notes) => notes.pop_front(),
                Err(poisoned) => poisoned.into_inner().pop_front(),
            };
            if let Some(note) = note {
                return note;
            }
            // A post between the check and here leaves a permit: no wake-up is lost.
            self.ready.notified().await;
        }
    }
}

/// What a socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat { conversation_id: ConversationId },
    Run { run_id: RunId, after_seq: u64 },
}

impl Endpoint {
    pub fn label(self) -> &'static str {
        match self {
            Self::Chat { .. } => "chat",
            Self::Run { .. } => "run",
        }
    }
}

struct Entry {
    endpoint: Endpoint,
    user: Option<UserId>,
    inbox: Arc<Inbox>,
}

#[derive(Default)]
struct Index {
    clients: HashMap<Uuid, Entry>,
    by_user: HashMap<UserId, HashSet<Uuid>>,
    by_conversation: HashMap<ConversationId, HashSet<Uuid>>,
    by_run: HashMap<RunId, HashSet<Uuid>>,
}

fn remove_from<K: std::hash::Hash + Eq>(
    index: &mut HashMap<K, HashSet<Uuid>>,
    key: K,
    client: Uuid,
) {
    if let Some(set) = index.get_mut(&key) {
        set.remove(&client);
        if set.is_empty() {
            index.remove(&key);
        }
    }
}

#[derive(Default)]
pub struct Registry {
    index: Mutex<Index>,
}

/// Too many connections for the user.
#[derive(Debug)]
pub struct OverUserLimit;

impl Registry {
    fn index(&self) -> MutexGuard<'_, Index> {
        match self.index.lock() {
            Ok(index) => index,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Open sockets.
    pub fn len(&self) -> usize {
        self.index().clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a socket (not yet authenticated). Its entry lives as long as the returned guard.
    pub fn register(
        self: &Arc<Self>,
        id: Uuid,
        endpoint: Endpoint,
        inbox: Arc<Inbox>,
    ) -> Registration {
        let mut index = self.index();
        index.clients.insert(
            id,
            Entry {
                endpoint,
                user: None,
                inbox,
            },
        );
        match endpoint {
            Endpoint::Chat { .. } => {}
            Endpoint::Run { run_id, .. } => {
                index.by_run.entry(run_id).or_default().insert(id);
            }
        }
        Registration {
            registry: self.clone(),
            id,
        }
    }

    /// Records who the socket belongs to once it authenticated; refused beyond `limit`
    /// sockets per user. A chat socket starts receiving its conversation's runs from here on.
    pub fn authenticate(&self, id: Uuid, user: UserId, limit: usize) -> Result<(), OverUserLimit> {
        let mut index = self.index();
        if index
            .by_user
            .get(&user)
            .is_some_and(|set| set.len() >= limit)
        {
            return Err(OverUserLimit);
        }
        let Some(entry) = index.clients.get_mut(&id) else {
            return Ok(());
        };
        entry.user = Some(user);
        let endpoint = entry.endpoint;
        index.by_user.entry(user).or_default().insert(id);
        if let Endpoint::Chat { conversation_id } = endpoint {
            index
                .by_conversation
                .entry(conversation_id)
                .or_default()
                .insert(id);
        }
        Ok(())
    }

    /// Sockets watching a conversation (tests and metrics).
    pub fn watching_conversation(&self, conversation_id: ConversationId) -> usize {
        self.index()
            .by_conversation
            .get(&conversation_id)
            .map_or(0, HashSet::len)
    }

    /// Sockets of a user.
    pub fn user_connections(&self, user: UserId) -> usize {
        self.index().by_user.get(&user).map_or(0, HashSet::len)
    }

    fn remove(&self, id: Uuid) {
        let mut index = self.index();
        let Some(entry) = index.clients.remove(&id) else {
            return;
        };
        if let Some(user) = entry.user {
            remove_from(&mut index.by_user, user, id);
        }
        match entry.endpoint {
            Endpoint::Chat { conversation_id } => {
                remove_from(&mut index.by_conversation, conversation_id, id);
            }
            Endpoint::Run { run_id, .. } => remove_from(&mut index.by_run, run_id, id),
        }
    }
}

impl Announce for Registry {
    /// Tells every chat socket of the run's conversation that it started.
    fn run_started(&self, handle: &Arc<RunHandle>) {
        let index = self.index();
        let Some(clients) = index.by_conversation.get(&handle.conversation_id) else {
            return;
        };
        for client in clients {
            if let Some(entry) = index.clients.get(client) {
                entry.inbox.post(Control::RunStarted(handle.clone()));
            }
        }
    }

    fn shows(&self, conversation: ConversationId) -> bool {
        self.index().by_conversation.contains_key(&conversation)
    }
}

/// Removes the socket from the registry when dropped.
pub struct Registration {
    registry: Arc<Registry>,
    id: Uuid,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn inbox_notes_arrive_in_order_and_none_is_lost() {
        let inbox = Arc::new(Inbox::default());
        inbox.post(Control::SlowConsumer);
        inbox.post(Control::RunSent);
        assert!(matches!(inbox.next().await, Control::SlowConsumer));
        assert!(matches!(inbox.next().await, Control::RunSent));
        let waiting = tokio::spawn({
            let inbox = inbox.clone();
            async move { inbox.next().await }
        });
        tokio::task::yield_now().await;
        inbox.post(Control::RunSent);
        assert!(matches!(waiting.await.unwrap(), Control::RunSent));
    }

    #[test]
    fn entries_are_indexed_and_always_removed() {
        let registry = Arc::new(Registry::default());
        let conversation_id = ConversationId::new();
        let user = UserId::new();
        let inbox = Arc::new(Inbox::default());
        let a = registry.register(
            Uuid::now_v7(),
            Endpoint::Chat { conversation_id },
            inbox.clone(),
        );
        let b = registry.register(
            Uuid::now_v7(),
            Endpoint::Chat { conversation_id },
            inbox.clone(),
        );
        assert_eq!(registry.len(), 2);
        assert_eq!(
            registry.watching_conversation(conversation_id),
            0,
            "not before auth"
        );
        registry.authenticate(a.id, user, 2).unwrap();
        registry.authenticate(b.id, user, 2).unwrap();
        assert_eq!(registry.watching_conversation(conversation_id), 2);
        let c = registry.register(Uuid::now_v7(), Endpoint::Chat { conversation_id }, inbox);
        assert!(
            registry.authenticate(c.id, user, 2).is_err(),
            "over the per-user limit"
        );
        drop(a);
        drop(c);
        assert_eq!(registry.user_connections(user), 1);
        drop(b);
        assert!(registry.is_empty());
        assert_eq!(registry.watching_conversation(conversation_id), 0);
        assert_eq!(registry.user_connections(user), 0);
    }
}
