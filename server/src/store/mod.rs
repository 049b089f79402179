//! Persistence behind one [`Store`] trait, with a SQLite implementation (the default: a file in
//! the data directory) and a Postgres one (`DATABASE_URL=postgres://…`). The engine is chosen
//! once, from the URL, in [`connect`]; each engine has its own migrations, applied at startup.
//!
//! Both engines share one set of SQL statements (see `sql.rs`): the SQL is written in the common
//! subset (`$n` placeholders, `ON CONFLICT`, `RETURNING`), timestamps are Unix milliseconds and
//! ids are UUIDs, so each statement means the same on both.

mod postgres;
mod records;
mod sql;
mod sqlite;

use std::{path::Path, sync::Arc, time::Duration};

use async_trait::async_trait;
use uuid::Uuid;

pub use records::*;
pub(crate) use sqlite::{create_private_dir, create_private_file};

use crate::ids::{ConversationId, InstanceId, MessageId, RunId, UserId};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness rule was broken; the rule is named, so callers never guess which.
    #[error("already exists ({0:?})")]
    Conflict(Constraint),
    /// A row refers to one that no longer exists (e.g. a token for a deleted session).
    #[error("referenced row does not exist")]
    MissingParent,
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported DATABASE_URL ({0}): use sqlite:// or postgres://")]
    UnsupportedUrl(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The database's disk is full: nothing was written.
    #[error("the database's disk is full")]
    Full,
}

impl StoreError {
    /// The database cannot be reached or talked to now (no connection in time, the connection
    /// broke, a new one met something that is not the database: a partition), or its disk is
    /// full: trying again later may work. Anything else would fail the same way again.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Database(
                sqlx::Error::PoolTimedOut
                | sqlx::Error::Io(_)
                | sqlx::Error::PoolClosed
                | sqlx::Error::Protocol(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::WorkerCrashed,
            )
            | Self::Full => true,
            // Postgres going away or refusing connections for now: a connection exception
            // (class 08), an administrator's or a crash's shutdown, starting up, too many
            // connections, or the database not accepting connections (`ALLOW_CONNECTIONS
            // false`, during a restore).
            Self::Database(sqlx::Error::Database(db)) => db.code().is_some_and(|code| {
                code.starts_with("08")
                    || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "53300")
                    || (code == "55000" && db.message().contains("accepting connections"))
            }),
            _ => false,
        }
    }
}

/// The uniqueness rules of the schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Constraint {
    /// `users.email`: the address is registered already.
    UserEmail,
    /// `runs_one_active`: the conversation has a run streaming.
    OneActiveRun,
    /// `(conversation_id, client_message_id)` on messages.
    ClientMessageId,
    /// Another rule, by the name the database gave.
    Other(String),
}

impl Constraint {
    /// Postgres names the constraint; SQLite names the columns ("UNIQUE constraint failed:
    /// runs.conversation_id").
    fn of(error: &dyn sqlx::error::DatabaseError) -> Self {
        if let Some(name) = error.constraint() {
            return match name {
                "users_email_key" => Self::UserEmail,
                "runs_one_active" => Self::OneActiveRun,
                "messages_conversation_id_client_message_id_key" => Self::ClientMessageId,
                other => Self::Other(other.to_owned()),
            };
        }
        let columns = error
            .message()
            .strip_prefix("UNIQUE constraint failed: ")
            .unwrap_or_default();
        match columns {
            "users.email" => Self::UserEmail,
            "runs.conversation_id" => Self::OneActiveRun,
            "messages.conversation_id, messages.client_message_id" => Self::ClientMessageId,
            _ => Self::Other(error.message().to_owned()),
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                Self::Conflict(Constraint::of(db.as_ref()))
            }
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => Self::MissingParent,
            // SQLITE_FULL (13), and Postgres's disk_full (53100).
            sqlx::Error::Database(db)
                if matches!(db.code().as_deref(), Some("13") | Some("53100")) =>
            {
                Self::Full
            }
            _ => Self::Database(error),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// How long a request waits for a database connection before it fails (as unavailable).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything WADI keeps. Methods are small and each is one statement or one transaction, so
/// both engines implement them identically.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Which engine this is, for logs and `/readyz`.
    fn engine(&self) -> &'static str;

    /// A round trip to the database.
    async fn ping(&self) -> StoreResult<()>;

    // ---- Identity (embedded auth) ----

    /// Inserts a user; [`Constraint::UserEmail`] if the email is taken.
    async fn create_user(&self, user: &UserRecord) -> StoreResult<()>;
    async fn user_by_email(&self, email: &str) -> StoreResult<Option<UserRecord>>;
    async fn user_by_id(&self, id: UserId) -> StoreResult<Option<UserRecord>>;
    async fn record_sign_in(&self, user_id: UserId, at: i64) -> StoreResult<()>;

    /// Wrong passwords given for `email` since `since` (Unix ms), on any instance.
    async fn login_failures_since(&self, email: &str, since: i64) -> StoreResult<i64>;
    /// Records a wrong password for `email` at `at`, and forgets every one before
    /// `forget_before`.
    async fn record_login_failure(
        &self,
        email: &str,
        at: i64,
        forget_before: i64,
    ) -> StoreResult<()>;
    /// Forgets the wrong passwords of `email` (its owner signed in).
    async fn clear_login_failures(&self, email: &str) -> StoreResult<()>;

    /// Creates a session together with its first refresh token, atomically.
    async fn create_session(
        &self,
        session: &SessionRecord,
        token: &RefreshTokenRecord,
    ) -> StoreResult<()>;
    async fn session_by_id(&self, id: Uuid) -> StoreResult<Option<SessionRecord>>;
    /// Deletes a session and (by cascade) its refresh tokens. True if it existed.
    async fn delete_session(&self, id: Uuid) -> StoreResult<bool>;
    /// Deletes every session of a user, except `keep` if given. Returns how many went.
    async fn delete_user_sessions(&self, user_id: UserId, keep: Option<Uuid>) -> StoreResult<u64>;

    async fn refresh_token_by_hash(&self, hash: &str) -> StoreResult<Option<RefreshTokenRecord>>;
    /// Rotates an active token in one transaction: revokes it (keeping `next_token`, the sealed
    /// successor), inserts `child`, bumps the session's `updated_at`, and deletes the session's
    /// other revoked tokens rotated at or before `revoked_before` (Unix ms). False if the token
    /// was revoked already (a concurrent refresh won; its child is committed by the time this
    /// returns), in which case nothing is written.
    async fn rotate_refresh_token(
        &self,
        id: Uuid,
        next_token: &str,
        child: &RefreshTokenRecord,
        revoked_before: i64,
    ) -> StoreResult<bool>;
    /// Inserts a token into an existing session and bumps the session's `updated_at`.
    async fn insert_refresh_token(&self, token: &RefreshTokenRecord) -> StoreResult<()>;

    // ---- Conversations ----

    async fn create_conversation(&self, conversation: &ConversationRecord) -> StoreResult<()>;
    /// The conversation if it exists and belongs to `owner`.
    async fn conversation(
        &self,
        id: ConversationId,
        owner: UserId,
    ) -> StoreResult<Option<ConversationRecord>>;
    /// The owner's conversations, most recently updated first, after `cursor`.
    async fn list_conversations(
        &self,
        owner: UserId,
        cursor: Option<ConversationCursor>,
        limit: u32,
    ) -> StoreResult<Vec<ConversationRecord>>;
    /// Sets the title; false if there is no such conversation of `owner`.
    async fn rename_conversation(
        &self,
        id: ConversationId,
        owner: UserId,
        title: &str,
        now: i64,
    ) -> StoreResult<bool>;
    /// Sets a conversation's model and system prompt (`Some("")`: back to the server's
    /// default; `None`: unchanged). False if it is not the owner's.
    async fn set_conversation_settings(
        &self,
        id: ConversationId,
        owner: UserId,
        model: Option<&str>,
        system_prompt: Option<&str>,
        now: i64,
    ) -> StoreResult<bool>;
    /// Deletes the conversation with its messages and runs; false if there was none.
    async fn delete_conversation(&self, id: ConversationId, owner: UserId) -> StoreResult<bool>;

    // ---- Messages ----

    /// Commits a user message, and the run it starts if `run` is given, in one transaction.
    /// With a `client_message_id` the conversation already has, nothing is written and the
    /// existing message is returned with `false`. A new message titles an untitled
    /// conversation with `title_if_untitled` and bumps its `updated_at`. If the conversation
    /// already has a run streaming, nothing is written and the answer is
    /// [`Constraint::OneActiveRun`].
    async fn insert_user_message(
        &self,
        message: &MessageRecord,
        title_if_untitled: &str,
        run: Option<&RunRecord>,
    ) -> StoreResult<(MessageRecord, bool)>;
    /// One message of the conversation.
    async fn message(
        &self,
        conversation_id: ConversationId,
        id: MessageId,
    ) -> StoreResult<Option<MessageRecord>>;
    /// Whether the conversation holds a message sent with `client_message_id`.
    async fn has_client_message(
        &self,
        conversation_id: ConversationId,
        client_message_id: &str,
    ) -> StoreResult<bool>;
    /// Where the path through `through` ends: the newest message at or under it (under the
    /// whole conversation when `None`). `None` for an empty conversation or a message not in it.
    async fn newest_leaf(
        &self,
        conversation_id: ConversationId,
        through: Option<MessageId>,
    ) -> StoreResult<Option<MessageId>>;
    /// Every message of the conversation, every branch, oldest first (for export).
    async fn all_messages(&self, conversation_id: ConversationId) -> StoreResult<Vec<MessageRow>>;
    /// The path from the root to `leaf`, its last `limit` messages, oldest first: each with its
    /// run's status, model and usage (assistant messages) and its siblings (forks).
    async fn path(
        &self,
        conversation_id: ConversationId,
        leaf: MessageId,
        limit: u32,
    ) -> StoreResult<Vec<MessageRow>>;

    // ---- Search ----

    /// The owner's messages containing every one of `words` (the last one as a prefix), best
    /// first, `limit` from `offset`.
    async fn search_messages(
        &self,
        owner: UserId,
        words: &[String],
        limit: u32,
        offset: u32,
    ) -> StoreResult<Vec<MessageHitRow>>;
    /// The owner's conversations whose title contains every one of `words`, best first.
    async fn search_titles(
        &self,
        owner: UserId,
        words: &[String],
        limit: u32,
    ) -> StoreResult<Vec<TitleHitRow>>;

    // ---- Runs ----

    /// The run if it exists and belongs to `owner`.
    async fn run(&self, id: RunId, owner: UserId) -> StoreResult<Option<RunRecord>>;
    /// True if the run is stored and `owner`'s (without reading its output).
    async fn run_exists(&self, id: RunId, owner: UserId) -> StoreResult<bool>;
    /// The run, whoever it belongs to (for the server's own bookkeeping, never for a caller).
    async fn run_by_id(&self, id: RunId) -> StoreResult<Option<RunRecord>>;
    /// The conversation's `running` run, if any.
    async fn active_run(&self, conversation_id: ConversationId) -> StoreResult<Option<RunRecord>>;
    /// Every `running` run, whoever drives it (few: at most the instances' caps on active runs).
    async fn running_runs(&self) -> StoreResult<Vec<RunRecord>>;
    /// The run a user message started when it was sent, if any (regenerated answers are runs
    /// of the same message, started later).
    async fn run_for_message(&self, message_id: MessageId) -> StoreResult<Option<RunRecord>>;
    /// Starts another run for an existing user message (a regenerated answer), bumping the
    /// conversation's `updated_at`. [`Constraint::OneActiveRun`] if one is streaming.
    async fn insert_run(&self, run: &RunRecord) -> StoreResult<()>;
    /// Appends running runs' new output, in one transaction: each run's, if its owner still
    /// drives it and its stored output reaches exactly `checkpoint.from_seq`. One result per
    /// checkpoint, in order.
    async fn checkpoint_runs(
        &self,
        checkpoints: &[(RunId, InstanceId, Checkpoint)],
    ) -> StoreResult<Vec<CheckpointResult>>;
    /// Ends a `running` run driven by `owner` and stores its answer as an assistant message,
    /// atomically (`None` as the owner matches any: only for rows no instance owns). False if
    /// the run was not running with that owner (reaped, already finished, or its conversation
    /// deleted): whoever drove it lost it and must not write it again.
    async fn finish_run(
        &self,
        id: RunId,
        owner: Option<InstanceId>,
        outcome: &RunOutcome,
    ) -> StoreResult<bool>;
    /// Records a stop request for the caller's running run; answers the instance driving it
    /// (`Some(None)` for a row from before instances were recorded), or `None` if the run is
    /// not the caller's or not running.
    async fn request_stop(
        &self,
        id: RunId,
        owner: UserId,
        at: i64,
    ) -> StoreResult<Option<Option<InstanceId>>>;

    // ---- Instances: ownership, liveness and recovery ----

    /// Registers a starting process; its heartbeat starts now (database time).
    async fn register_instance(&self, id: InstanceId, host: &str, pid: i64) -> StoreResult<()>;
    /// Refreshes the heartbeat (database time). False if the row is gone: another instance
    /// declared this one dead and reaped its runs.
    async fn heartbeat(&self, id: InstanceId) -> StoreResult<bool>;
    /// Removes a stopping process's row (its runs, if any are left, become reapable at once).
    async fn deregister_instance(&self, id: InstanceId) -> StoreResult<()>;
    /// Every registered instance.
    async fn instances(&self) -> StoreResult<Vec<InstanceRecord>>;
    /// True if the instance heartbeated within `timeout` (database time).
    async fn instance_alive(&self, id: InstanceId, timeout: Duration) -> StoreResult<bool>;
    /// The runs `owner` drives according to the store, with their stop requests.
    async fn owned_running_runs(&self, owner: InstanceId) -> StoreResult<Vec<OwnedRun>>;
    /// Ends up to `limit` running runs whose instance is gone (no row, no owner, or no heartbeat
    /// within `timeout`): each is locked (skipping rows another reaper holds), `finalize` says
    /// how it is saved, and it is saved with its assistant message, all in one transaction.
    /// Returns the runs reaped with their outcomes. Instance rows silent for `forget_after` are
    /// deleted.
    async fn reap_runs(
        &self,
        timeout: Duration,
        forget_after: Duration,
        limit: u32,
        finalize: &dyn Finalize,
    ) -> StoreResult<Vec<(RunRecord, RunOutcome)>>;

    /// Every signing key, oldest first.
    async fn signing_keys(&self) -> StoreResult<Vec<SigningKeyRecord>>;
    async fn insert_signing_key(&self, key: &SigningKeyRecord) -> StoreResult<()>;
    /// In one transaction: retires every key in use (at `key.created_at`), deletes keys
    /// retired before `forget_before`, and adds `key`.
    async fn rotate_signing_key(
        &self,
        key: &SigningKeyRecord,
        forget_before: i64,
    ) -> StoreResult<()>;

    // ---- Administration ----
    /// Every account, oldest first, with its session and conversation counts.
    async fn list_users(&self) -> StoreResult<Vec<UserSummary>>;
    /// Deletes an account with its sessions and conversations. False if there was none.
    async fn delete_user(&self, id: UserId) -> StoreResult<bool>;
    /// Sets an account's password hash and ends all its sessions, in one transaction. False if
    /// there was no such account.
    async fn reset_password(&self, id: UserId, password_hash: &str, at: i64) -> StoreResult<bool>;
}

/// How a reaped run is saved (the run module knows; the store only asks, under the row lock).
#[async_trait]
pub trait Finalize: Send + Sync {
    async fn finalize(&self, run: &RunRecord) -> RunOutcome;
}

/// Opens the store named by `database_url`, or a SQLite file in `data_dir` when it is `None`,
/// and applies pending migrations.
pub async fn connect(database_url: Option<&str>, data_dir: &Path) -> StoreResult<Arc<dyn Store>> {
    match database_url {
        None => {
            let path = data_dir.join("wadi.db");
            Ok(Arc::new(sqlite::SqliteStore::open_file(&path).await?))
        }
        Some(url) if url.starts_with("sqlite:") => {
            Ok(Arc::new(sqlite::SqliteStore::open_url(url).await?))
        }
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(Arc::new(postgres::PgStore::open(url).await?))
        }
        Some(url) => {
            // Only the scheme is told: the rest may hold a password.
            let scheme = url
                .split_once("://")
                .map(|(scheme, _)| scheme)
                .filter(|scheme| {
                    !scheme.is_empty()
                        && scheme
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
                });
            Err(StoreError::UnsupportedUrl(match scheme {
                Some(scheme) => format!("scheme {scheme:?}"),
                None => "not a URL".to_owned(),
            }))
        }
    }
}
