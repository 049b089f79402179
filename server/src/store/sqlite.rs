//! The default store: one SQLite file, WAL mode, created if missing.

use std::{path::Path, str::FromStr, time::Duration};

use sqlx::{
    Sqlite, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use super::{StoreResult, sql::sql_store};

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating it and its directory if needed) the database file at `path`. What this
    /// creates is private to the server's user: the directory `0700`, the file `0600` (SQLite
    /// gives its `-wal` and `-shm` files the database file's mode). It holds password hashes
    /// and the auth signing key.
    pub async fn open_file(path: &Path) -> StoreResult<Self> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.exists()
        {
            create_private_dir(dir).map_err(sqlx::Error::Io)?;
        }
        if !path.exists() {
            create_private_file(path).map_err(sqlx::Error::Io)?;
        }
        Self::open(SqliteConnectOptions::new().filename(path)).await
    }

    /// Opens a `sqlite:` URL (e.g. `sqlite:///var/lib/wadi/wadi.db` or `sqlite::memory:`).
    pub async fn open_url(url: &str) -> StoreResult<Self> {
        Self::open(SqliteConnectOptions::from_str(url)?).await
    }

    async fn open(options: SqliteConnectOptions) -> StoreResult<Self> {
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL with NORMAL is durable across application crashes, which is what runs need;
            // only an OS crash can lose the last transactions.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(super::ACQUIRE_TIMEOUT)
            // A COMMIT that fails for a full disk is rolled back by SQLite itself, so the
            // ROLLBACK sqlx then queues fails and sqlx keeps counting a transaction the
            // connection no longer has: every later `BEGIN IMMEDIATE` on it would be refused.
            // Such a connection is closed instead of handed out (the pool's ping on acquire
            // runs after any queued ROLLBACK, so a healthy connection is at depth 0 here).
            .before_acquire(|connection, _| {
                Box::pin(async move {
                    use sqlx::TransactionManager;
                    Ok(
                        sqlx::sqlite::SqliteTransactionManager::get_transaction_depth(connection)
                            == 0,
                    )
                })
            })
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Self { pool })
    }
}

/// An FTS5 query matching every word (the last as a prefix: results while typing). The words
/// are letters and digits only (see `search::words`), quoted all the same.
fn fts_query(words: &[String]) -> String {
    let mut query = String::new();
    for (i, word) in words.iter().enumerate() {
        if i > 0 {
            query.push(' ');
        }
        query.push('"');
        query.push_str(&word.replace('"', ""));
        query.push('"');
        if i + 1 == words.len() {
            query.push('*');
        }
    }
    query
}

impl SqliteStore {
    async fn search_message_rows(
        pool: &SqlitePool,
        owner: crate::ids::UserId,
        words: &[String],
        limit: u32,
        offset: u32,
    ) -> Result<Vec<super::MessageHitRow>, sqlx::Error> {
        sqlx::query_as::<Sqlite, super::MessageHitRow>(
            "SELECT m.conversation_id, c.title, m.id AS message_id, m.role, m.created_at, \
             snippet(messages_fts, 0, char(57344), char(57345), '…', 16) AS snippet \
             FROM messages_fts JOIN messages m ON m.rowid = messages_fts.rowid \
             JOIN conversations c ON c.id = m.conversation_id \
             WHERE messages_fts MATCH $1 AND c.owner_id = $2 \
             ORDER BY bm25(messages_fts), m.id DESC LIMIT $3 OFFSET $4",
        )
        .bind(fts_query(words))
        .bind(owner)
        .bind(i64::from(limit))
        .bind(i64::from(offset))
        .fetch_all(pool)
        .await
    }

    async fn search_title_rows(
        pool: &SqlitePool,
        owner: crate::ids::UserId,
        words: &[String],
        limit: u32,
    ) -> Result<Vec<super::TitleHitRow>, sqlx::Error> {
        sqlx::query_as::<Sqlite, super::TitleHitRow>(
            "SELECT c.id AS conversation_id, c.updated_at, \
             highlight(conversations_fts, 0, char(57344), char(57345)) AS snippet \
             FROM conversations_fts JOIN conversations c ON c.rowid = conversations_fts.rowid \
             WHERE conversations_fts MATCH $1 AND c.owner_id = $2 \
             ORDER BY bm25(conversations_fts), c.updated_at DESC LIMIT $3",
        )
        .bind(fts_query(words))
        .bind(owner)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await
    }
}

#[cfg(unix)]
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

/// Creates an empty file only the server's user can read (0600 on Unix); fails if it exists.
#[cfg(unix)]
pub(crate) fn create_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
}

#[cfg(not(unix))]
pub(crate) fn create_private_file(path: &Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map(drop)
}

sql_store!(
    SqliteStore,
    Sqlite,
    "sqlite",
    now = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    lock = "",
    begin = "BEGIN IMMEDIATE"
);
