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
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Self { pool })
    }
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

#[cfg(unix)]
fn create_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
}

#[cfg(not(unix))]
fn create_private_file(path: &Path) -> std::io::Result<()> {
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
    lock = ""
);
