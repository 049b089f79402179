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

use std::{path::Path, sync::Arc};

use async_trait::async_trait;
use uuid::Uuid;

pub use records::*;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness rule was broken (e.g. an email that is already registered).
    #[error("already exists")]
    Conflict,
    /// A row refers to one that no longer exists (e.g. a token for a deleted session).
    #[error("referenced row does not exist")]
    MissingParent,
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported DATABASE_URL scheme {0:?} (use sqlite:// or postgres://)")]
    UnsupportedUrl(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Database(db) if db.is_unique_violation() => Self::Conflict,
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => Self::MissingParent,
            _ => Self::Database(error),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Everything WADI keeps. Methods are small and each is one statement or one transaction, so
/// both engines implement them identically.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Which engine this is, for logs and `/readyz`.
    fn engine(&self) -> &'static str;

    /// A round trip to the database.
    async fn ping(&self) -> StoreResult<()>;

    // ---- Identity (embedded auth) ----

    /// Inserts a user; [`StoreError::Conflict`] if the email is taken.
    async fn create_user(&self, user: &UserRecord) -> StoreResult<()>;
    async fn user_by_email(&self, email: &str) -> StoreResult<Option<UserRecord>>;
    async fn user_by_id(&self, id: Uuid) -> StoreResult<Option<UserRecord>>;
    async fn record_sign_in(&self, user_id: Uuid, at: i64) -> StoreResult<()>;

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
    async fn delete_user_sessions(&self, user_id: Uuid, keep: Option<Uuid>) -> StoreResult<u64>;

    async fn refresh_token_by_hash(&self, hash: &str) -> StoreResult<Option<RefreshTokenRecord>>;
    /// Revokes a token if it is not revoked yet. True if this call revoked it: of two
    /// concurrent refreshes with one token, exactly one wins.
    async fn revoke_refresh_token(&self, id: Uuid, at: i64) -> StoreResult<bool>;
    /// Inserts a rotated token and bumps its session's `updated_at`.
    async fn insert_refresh_token(&self, token: &RefreshTokenRecord) -> StoreResult<()>;
    /// True if some unrevoked token has `parent` as its parent (i.e. `parent` is the parent of
    /// an active token).
    async fn has_active_child(&self, parent: Uuid) -> StoreResult<bool>;

    // ---- Conversations ----

    async fn create_conversation(&self, conversation: &ConversationRecord) -> StoreResult<()>;
    /// The conversation if it exists and belongs to `owner`.
    async fn conversation(&self, id: Uuid, owner: Uuid) -> StoreResult<Option<ConversationRecord>>;
    /// The owner's conversations, most recently updated first, after `cursor`.
    async fn list_conversations(
        &self,
        owner: Uuid,
        cursor: Option<ConversationCursor>,
        limit: u32,
    ) -> StoreResult<Vec<ConversationRecord>>;
    /// Sets the title; false if there is no such conversation of `owner`.
    async fn rename_conversation(
        &self,
        id: Uuid,
        owner: Uuid,
        title: &str,
        now: i64,
    ) -> StoreResult<bool>;
    /// Deletes the conversation with its messages and runs; false if there was none.
    async fn delete_conversation(&self, id: Uuid, owner: Uuid) -> StoreResult<bool>;

    // ---- Messages ----

    /// Commits a user message, and the run it starts if `run` is given, in one transaction.
    /// With a `client_message_id` the conversation already has, nothing is written and the
    /// existing message is returned with `false`. A new message titles an untitled
    /// conversation with `title_if_untitled` and bumps its `updated_at`. If the run cannot be
    /// created because the conversation already has one running, nothing is written and the
    /// answer is [`StoreError::Conflict`].
    async fn insert_user_message(
        &self,
        message: &MessageRecord,
        title_if_untitled: &str,
        run: Option<&RunRecord>,
    ) -> StoreResult<(MessageRecord, bool)>;
    /// Messages oldest first, after the message `after`.
    async fn list_messages(
        &self,
        conversation_id: Uuid,
        after: Option<Uuid>,
        limit: u32,
    ) -> StoreResult<Vec<MessageRow>>;

    /// The conversation's latest `limit` messages, oldest first (the model's context).
    async fn recent_messages(
        &self,
        conversation_id: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<MessageRecord>>;

    // ---- Runs ----

    /// The run if it exists and belongs to `owner`.
    async fn run(&self, id: Uuid, owner: Uuid) -> StoreResult<Option<RunRecord>>;
    /// The conversation's `running` run, if any.
    async fn active_run(&self, conversation_id: Uuid) -> StoreResult<Option<RunRecord>>;
    /// The run started by a user message, if any.
    async fn run_for_message(&self, message_id: Uuid) -> StoreResult<Option<RunRecord>>;
    /// Saves the output streamed so far of a run that is still `running`.
    async fn save_run_progress(&self, id: Uuid, output: &str, last_seq: i64) -> StoreResult<()>;
    /// Ends a `running` run and stores its answer as an assistant message, atomically. False if
    /// the run was not running (already finished, or its conversation was deleted).
    async fn finish_run(&self, id: Uuid, outcome: &RunOutcome) -> StoreResult<bool>;
    /// Every run still marked `running` (used at startup: those were cut off by a crash).
    async fn running_runs(&self) -> StoreResult<Vec<RunRecord>>;

    /// Every signing key, oldest first.
    async fn signing_keys(&self) -> StoreResult<Vec<SigningKeyRecord>>;
    async fn insert_signing_key(&self, key: &SigningKeyRecord) -> StoreResult<()>;
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
            let scheme = url.split(':').next().unwrap_or_default();
            Err(StoreError::UnsupportedUrl(scheme.to_owned()))
        }
    }
}
