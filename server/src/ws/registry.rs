//! Every live socket, indexed by id, user, conversation and run, so that announcing a run to a
//! conversation's sockets and counting a user's connections are lookups, not scans. A socket's
//! entry is removed by the drop of its [`Registration`], so it goes whatever ends the socket.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
};

use futures_util::task::AtomicWaker;
use uuid::Uuid;

use wadi_protocol::{ConversationChange, ServerMessage};

use crate::{
    ids::{ConversationId, RunId, UserId},
    runs::{Announce, RunHandle},
};

/// How many sockets told to reload (`resync`) may do so per second: each reload is a request or
/// two (the list, the shown conversation's messages) that would otherwise all arrive at once.
const RELOADS_PER_SECOND: usize = 1_000;
/// The longest window a reload is spread over, however many sockets there are.
const MAX_RELOAD_WINDOW_MS: u64 = 30_000;

/// The window `told` sockets spread their reloads over, each at a random moment in it.
fn reload_window_ms(told: usize) -> u64 {
    let ms = told.saturating_mul(1_000) / RELOADS_PER_SECOND;
    u64::try_from(ms).map_or(MAX_RELOAD_WINDOW_MS, |ms| ms.min(MAX_RELOAD_WINDOW_MS))
}

/// What the rest of the server tells a socket's task.
pub enum Control {
    /// A run started in the socket's conversation.
    RunStarted(Arc<RunHandle>),
    /// A watcher could not hand frames to the socket fast enough.
    SlowConsumer,
    /// The run a run socket follows was sent completely.
    RunSent,
    /// A frame to send as it is (user sockets: a conversation changed).
    Send(Arc<ServerMessage>),
    /// The server is shutting down (its runs were stopped and saved).
    Shutdown,
    /// The chat socket's conversation was deleted.
    ConversationDeleted,
}

/// Notes for one socket's task, oldest first. Most sockets are idle and never get one, so this
/// allocates nothing until the first note (a channel would allocate its buffer up front).
#[derive(Default)]
pub struct Inbox {
    notes: Mutex<VecDeque<Control>>,
    /// The socket's task, waiting for a note.
    ready: AtomicWaker,
}

impl Inbox {
    pub fn post(&self, note: Control) {
        self.notes().push_back(note);
        self.ready.wake();
    }

    fn notes(&self) -> MutexGuard<'_, VecDeque<Control>> {
        crate::util::lock(&self.notes)
    }

    /// The next note; while there is none, the caller is woken when one is posted.
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Control> {
        if let Some(note) = self.notes().pop_front() {
            return Poll::Ready(note);
        }
        // Registered before looking again, so a note posted in between is not missed.
        self.ready.register(cx.waker());
        match self.notes().pop_front() {
            Some(note) => Poll::Ready(note),
            None => Poll::Pending,
        }
    }

    /// The next note, waiting for one if there is none.
    pub async fn next(&self) -> Control {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }
}

/// What a socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat {
        conversation_id: ConversationId,
    },
    Run {
        run_id: RunId,
        after_seq: u64,
    },
    /// `/ws/user`: the user's conversations changing (the sidebar).
    User,
}

impl Endpoint {
    pub fn label(self) -> &'static str {
        match self {
            Self::Chat { .. } => "chat",
            Self::Run { .. } => "run",
            Self::User => "user",
        }
    }
}

struct Entry {
    endpoint: Endpoint,
    user: Option<UserId>,
    inbox: Arc<Inbox>,
    /// The client's address, as limits key it.
    addr: IpAddr,
}

/// Sockets of one address: open, and of those not authenticated yet.
#[derive(Default, Clone, Copy)]
struct AddressCount {
    open: usize,
    pending: usize,
}

#[derive(Default)]
struct Index {
    clients: HashMap<Uuid, Entry>,
    by_user: HashMap<UserId, HashSet<Uuid>>,
    by_conversation: HashMap<ConversationId, HashSet<Uuid>>,
    by_run: HashMap<RunId, HashSet<Uuid>>,
    by_addr: HashMap<IpAddr, AddressCount>,
    /// Sockets not authenticated yet, in total.
    pending: usize,
    /// Open Server-Sent Event streams per user.
    sse: HashMap<UserId, usize>,
}

/// How many sockets may be open, per address and before authentication.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub total: usize,
    pub per_address: usize,
    /// Sockets that have not authenticated yet (an authenticated user never waits for them).
    pub pending: usize,
    pub pending_per_address: usize,
}

/// Why a new socket is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The server is full.
    Total,
    /// This address holds its share.
    Address,
    /// Too many sockets (of this address, or in all) have not authenticated yet.
    Pending,
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
        crate::util::lock(&self.index)
    }

    /// Tells every open socket that the server is shutting down. Called after the shutdown
    /// token is cancelled: a socket registered later finds the token cancelled when it starts.
    /// (A note, not the token, because a socket polls its notes on every wake-up: polling the
    /// token's future takes a lock that every socket shares.)
    pub fn shut_down(&self) {
        for entry in self.index().clients.values() {
            entry.inbox.post(Control::Shutdown);
        }
    }

    /// Open sockets.
    pub fn len(&self) -> usize {
        self.index().clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a new socket from `addr` fits under `caps` (checked before the upgrade).
    pub fn admit(&self, addr: IpAddr, caps: &Caps) -> Result<(), Refusal> {
        let index = self.index();
        let count = index.by_addr.get(&addr).copied().unwrap_or_default();
        if index.clients.len() >= caps.total {
            Err(Refusal::Total)
        } else if count.open >= caps.per_address {
            Err(Refusal::Address)
        } else if index.pending >= caps.pending || count.pending >= caps.pending_per_address {
            Err(Refusal::Pending)
        } else {
            Ok(())
        }
    }

    /// Adds a socket (not yet authenticated) from `addr`. Its entry lives as long as the
    /// returned guard.
    pub fn register(
        self: &Arc<Self>,
        id: Uuid,
        endpoint: Endpoint,
        inbox: Arc<Inbox>,
        addr: IpAddr,
    ) -> Registration {
        let mut index = self.index();
        index.clients.insert(
            id,
            Entry {
                endpoint,
                user: None,
                inbox,
                addr,
            },
        );
        index.pending += 1;
        let count = index.by_addr.entry(addr).or_default();
        count.open += 1;
        count.pending += 1;
        match endpoint {
            Endpoint::Chat { .. } | Endpoint::User => {}
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
        let was_pending = entry.user.is_none();
        entry.user = Some(user);
        let endpoint = entry.endpoint;
        let addr = entry.addr;
        if was_pending {
            index.pending = index.pending.saturating_sub(1);
            if let Some(count) = index.by_addr.get_mut(&addr) {
                count.pending = count.pending.saturating_sub(1);
            }
        }
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
        } else {
            index.pending = index.pending.saturating_sub(1);
        }
        if let Some(count) = index.by_addr.get_mut(&entry.addr) {
            count.open = count.open.saturating_sub(1);
            if entry.user.is_none() {
                count.pending = count.pending.saturating_sub(1);
            }
            if count.open == 0 {
                index.by_addr.remove(&entry.addr);
            }
        }
        match entry.endpoint {
            Endpoint::Chat { conversation_id } => {
                remove_from(&mut index.by_conversation, conversation_id, id);
            }
            Endpoint::Run { run_id, .. } => remove_from(&mut index.by_run, run_id, id),
            Endpoint::User => {}
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

    fn shown(&self) -> Vec<ConversationId> {
        self.index().by_conversation.keys().copied().collect()
    }

    fn events_may_be_lost(&self) {
        let index = self.index();
        let reloads = |entry: &&Entry| {
            matches!(entry.endpoint, Endpoint::User | Endpoint::Chat { .. }) && entry.user.is_some()
        };
        let told = index.clients.values().filter(reloads).count();
        let within_ms = reload_window_ms(told);
        let frame = Arc::new(ServerMessage::Resync { within_ms });
        for entry in index.clients.values().filter(reloads) {
            entry.inbox.post(Control::Send(frame.clone()));
        }
        drop(index);
        tracing::info!(
            sockets = told,
            within_ms,
            "sockets told to reload after a gap"
        );
    }

    /// Sends a `conversation` frame to every user socket of the user here.
    fn conversation_changed(&self, changed: &crate::runs::cluster::Changed) {
        let index = self.index();
        let Some(clients) = index.by_user.get(&changed.user) else {
            return;
        };
        let frame = Arc::new(ServerMessage::Conversation {
            conversation_id: changed.conversation.into(),
            change: changed.change,
            title: changed.title.clone(),
        });
        let mut told = 0;
        for client in clients {
            if let Some(entry) = index.clients.get(client)
                && entry.endpoint == Endpoint::User
            {
                entry.inbox.post(Control::Send(frame.clone()));
                told += 1;
            }
        }
        // A chat socket on a deleted conversation has nothing left to show: it is closed.
        if changed.change == ConversationChange::Deleted
            && let Some(chats) = index.by_conversation.get(&changed.conversation)
        {
            for client in chats {
                if let Some(entry) = index.clients.get(client)
                    && entry.user == Some(changed.user)
                {
                    entry.inbox.post(Control::ConversationDeleted);
                }
            }
        }
        drop(index);
        tracing::debug!(
            user_id = %changed.user,
            conversation_id = %changed.conversation,
            change = ?changed.change,
            sockets = told,
            "conversation change posted to user sockets"
        );
    }
}

impl Registry {
    /// Counts an open Server-Sent Events stream of `user`; refused beyond `cap`. The stream
    /// holds the returned guard.
    pub fn open_sse(self: &Arc<Self>, user: UserId, cap: usize) -> Option<SseStream> {
        let mut index = self.index();
        let open = index.sse.entry(user).or_default();
        if *open >= cap {
            return None;
        }
        *open += 1;
        Some(SseStream {
            registry: self.clone(),
            user,
        })
    }
}

/// An open SSE stream, counted until dropped.
pub struct SseStream {
    registry: Arc<Registry>,
    user: UserId,
}

impl Drop for SseStream {
    fn drop(&mut self) {
        let mut index = self.registry.index();
        if let Some(open) = index.sse.get_mut(&self.user) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                index.sse.remove(&self.user);
            }
        }
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
    fn reloads_are_spread_by_how_many_sockets_reload() {
        assert_eq!(reload_window_ms(0), 0);
        assert_eq!(reload_window_ms(1), 1);
        assert_eq!(reload_window_ms(2_500), 2_500);
        assert_eq!(reload_window_ms(19_000), 19_000);
        assert_eq!(reload_window_ms(100_000), MAX_RELOAD_WINDOW_MS);
        assert_eq!(reload_window_ms(usize::MAX), MAX_RELOAD_WINDOW_MS);
    }

    #[test]
    fn entries_are_indexed_and_always_removed() {
        let registry = Arc::new(Registry::default());
        let conversation_id = ConversationId::new();
        let user = UserId::new();
        let inbox = Arc::new(Inbox::default());
        let addr = IpAddr::from([192, 0, 2, 1]);
        let a = registry.register(
            Uuid::now_v7(),
            Endpoint::Chat { conversation_id },
            inbox.clone(),
            addr,
        );
        let b = registry.register(
            Uuid::now_v7(),
            Endpoint::Chat { conversation_id },
            inbox.clone(),
            addr,
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
        let c = registry.register(
            Uuid::now_v7(),
            Endpoint::Chat { conversation_id },
            inbox,
            addr,
        );
        assert!(
            registry.authenticate(c.id, user, 2).is_err(),
            "over the per-user limit"
        );
        drop(a);
        drop(c);
        assert_eq!(registry.user_connections(user), 1);
        drop(b);
        assert!(registry.is_empty());
        let caps = Caps {
            total: 10,
            per_address: 10,
            pending: 10,
            pending_per_address: 10,
        };
        assert_eq!(registry.admit(addr, &caps), Ok(()), "nothing left counted");
        assert_eq!(registry.watching_conversation(conversation_id), 0);
        assert_eq!(registry.user_connections(user), 0);
    }

    #[test]
    fn caps_count_per_address_and_before_authentication() {
        let registry = Arc::new(Registry::default());
        let here = IpAddr::from([192, 0, 2, 1]);
        let there = IpAddr::from([192, 0, 2, 2]);
        let caps = Caps {
            total: 5,
            per_address: 3,
            pending: 3,
            pending_per_address: 2,
        };
        let inbox = Arc::new(Inbox::default());
        let endpoint = Endpoint::Chat {
            conversation_id: ConversationId::new(),
        };
        let first = registry.register(Uuid::now_v7(), endpoint, inbox.clone(), here);
        let _second = registry.register(Uuid::now_v7(), endpoint, inbox.clone(), here);
        assert_eq!(registry.admit(here, &caps), Err(Refusal::Pending));
        assert_eq!(registry.admit(there, &caps), Ok(()));
        // Authenticated sockets no longer count as pending, but still as the address's.
        registry.authenticate(first.id, UserId::new(), 10).unwrap();
        assert_eq!(registry.admit(here, &caps), Ok(()));
        let _third = registry.register(Uuid::now_v7(), endpoint, inbox.clone(), here);
        assert_eq!(registry.admit(here, &caps), Err(Refusal::Address));
        let _fourth = registry.register(Uuid::now_v7(), endpoint, inbox.clone(), there);
        assert_eq!(
            registry.admit(there, &caps),
            Err(Refusal::Pending),
            "three pending in all"
        );
        let _fifth = registry.register(Uuid::now_v7(), endpoint, inbox, there);
        assert_eq!(registry.admit(there, &caps), Err(Refusal::Total));
    }

    #[test]
    fn sse_streams_are_counted_per_user_until_dropped() {
        let registry = Arc::new(Registry::default());
        let user = UserId::new();
        let a = registry.open_sse(user, 2).unwrap();
        let _b = registry.open_sse(user, 2).unwrap();
        assert!(registry.open_sse(user, 2).is_none());
        assert!(registry.open_sse(UserId::new(), 2).is_some());
        drop(a);
        assert!(registry.open_sse(user, 2).is_some());
    }
}
