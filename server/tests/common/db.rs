//! A database of its own for each test: a SQLite file in a temporary directory, or a Postgres
//! database created on the server named by `WADI_TEST_POSTGRES_URL` and dropped afterwards.

use sqlx::{Connection, Executor, PgConnection};
use wadi_server::Config;

#[derive(Debug, Clone)]
pub enum Engine {
    Sqlite,
    /// The admin URL of a Postgres server (a database there to connect to, e.g. `postgres`).
    Postgres(String),
}

impl Engine {
    /// The Postgres server named by `WADI_TEST_POSTGRES_URL`. Tests that need it are ignored
    /// when it is unset (see `build.rs`), so this only runs when it is set.
    pub fn postgres() -> Self {
        Self::Postgres(
            std::env::var("WADI_TEST_POSTGRES_URL")
                .expect("WADI_TEST_POSTGRES_URL is set when Postgres tests run"),
        )
    }

    /// The admin URL, for Postgres.
    pub fn admin_url(&self) -> String {
        match self {
            Self::Postgres(url) => url.clone(),
            Self::Sqlite => panic!("not Postgres"),
        }
    }
}

/// Databases older than this are leftovers of crashed test runs and are dropped.
const STALE_AFTER_SECS: u64 = 3600;

pub struct TestDb {
    pub data_dir: tempfile::TempDir,
    /// Postgres only: the admin URL and the database's name.
    postgres: Option<(String, String)>,
}

impl TestDb {
    pub async fn create(engine: Engine) -> Self {
        let data_dir = tempfile::tempdir().unwrap();
        let postgres = match engine {
            Engine::Sqlite => None,
            Engine::Postgres(admin_url) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let name = format!("wadi_t_{now}_{}", uuid::Uuid::new_v4().simple());
                let mut admin = PgConnection::connect(&admin_url).await.unwrap();
                drop_stale(&mut admin, now).await;
                admin
                    .execute(format!("CREATE DATABASE \"{name}\"").as_str())
                    .await
                    .unwrap();
                Some((admin_url, name))
            }
        };
        Self { data_dir, postgres }
    }

    /// A test configuration using this database.
    pub fn config(&self) -> Config {
        let mut config = Config::for_tests(self.data_dir.path().to_path_buf());
        if let Some((admin_url, name)) = &self.postgres {
            config.database_url = Some(database_url(admin_url, name).into());
        }
        config
    }

    /// Runs a `SELECT COUNT(*) …` with one UUID parameter directly against the database.
    pub async fn count(&self, sql: &str, id: uuid::Uuid) -> i64 {
        match &self.postgres {
            Some((admin_url, name)) => {
                let mut conn = PgConnection::connect(&database_url(admin_url, name))
                    .await
                    .unwrap();
                let (n,): (i64,) = sqlx::query_as(sql)
                    .bind(id)
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
                n
            }
            None => {
                let path = self.data_dir.path().join("wadi.db");
                let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
                let mut conn = sqlx::SqliteConnection::connect_with(&options)
                    .await
                    .unwrap();
                let (n,): (i64,) = sqlx::query_as(sql)
                    .bind(id)
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
                n
            }
        }
    }

    /// Inserts a `running` run that no server task drives (what a failed save leaves behind),
    /// with a user message for it.
    pub async fn insert_orphan_run(
        &self,
        conversation: uuid::Uuid,
        owner: uuid::Uuid,
    ) -> uuid::Uuid {
        let run = uuid::Uuid::now_v7();
        let message = uuid::Uuid::now_v7();
        let now = 1_700_000_000_000_i64;
        let insert_message = "INSERT INTO messages (id, conversation_id, role, content, run_id, \
             client_message_id, created_at) VALUES ($1, $2, 'user', 'lost', $3, NULL, $4)";
        let insert_run = "INSERT INTO runs (id, conversation_id, owner_id, message_id, status, \
             model, output, last_seq, started_at) VALUES ($1, $2, $3, $4, 'running', 'fake', \
             'half an answer', 3, $5)";
        match &self.postgres {
            Some((admin_url, name)) => {
                let mut conn = PgConnection::connect(&database_url(admin_url, name))
                    .await
                    .unwrap();
                sqlx::query(insert_message)
                    .bind(message)
                    .bind(conversation)
                    .bind(run)
                    .bind(now)
                    .execute(&mut conn)
                    .await
                    .unwrap();
                sqlx::query(insert_run)
                    .bind(run)
                    .bind(conversation)
                    .bind(owner)
                    .bind(message)
                    .bind(now)
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
            None => {
                let path = self.data_dir.path().join("wadi.db");
                let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
                let mut conn = sqlx::SqliteConnection::connect_with(&options)
                    .await
                    .unwrap();
                sqlx::query(insert_message)
                    .bind(message)
                    .bind(conversation)
                    .bind(run)
                    .bind(now)
                    .execute(&mut conn)
                    .await
                    .unwrap();
                sqlx::query(insert_run)
                    .bind(run)
                    .bind(conversation)
                    .bind(owner)
                    .bind(message)
                    .bind(now)
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
        }
        run
    }

    /// Runs a statement with one UUID parameter directly against the database (Postgres only).
    pub async fn execute(&self, sql: &str, id: uuid::Uuid) {
        let (admin_url, name) = self.postgres.as_ref().expect("Postgres only");
        let mut conn = PgConnection::connect(&database_url(admin_url, name))
            .await
            .unwrap();
        sqlx::query(sql).bind(id).execute(&mut conn).await.unwrap();
    }

    /// A run as stored (Postgres only): status, output, last seq and chunk ends.
    pub async fn run_row(&self, id: uuid::Uuid) -> (String, String, i64, String) {
        let (admin_url, name) = self.postgres.as_ref().expect("Postgres only");
        let mut conn = PgConnection::connect(&database_url(admin_url, name))
            .await
            .unwrap();
        sqlx::query_as("SELECT status, output, last_seq, chunk_ends FROM runs WHERE id = $1")
            .bind(id)
            .fetch_one(&mut conn)
            .await
            .unwrap()
    }

    /// Postgres only: makes the database refuse new connections (or take them again) and ends
    /// the ones open, as a restart or a restore does.
    pub async fn refuse_connections(&self, refuse: bool) {
        let Some((admin_url, name)) = &self.postgres else {
            panic!("refuse_connections is for Postgres");
        };
        let mut admin = PgConnection::connect(admin_url).await.unwrap();
        admin
            .execute(format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS {}", !refuse).as_str())
            .await
            .unwrap();
        if refuse {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(name)
            .execute(&mut admin)
            .await
            .unwrap();
        }
    }

    pub async fn drop_database(self) {
        if let Some((admin_url, name)) = self.postgres {
            let mut admin = PgConnection::connect(&admin_url).await.unwrap();
            admin
                .execute(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str())
                .await
                .unwrap();
        }
    }
}

/// `postgres://user@host:port/admin_db?opts` with the database replaced by `name`.
fn database_url(admin_url: &str, name: &str) -> String {
    let (base, query) = match admin_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (admin_url, None),
    };
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

async fn drop_stale(admin: &mut PgConnection, now: u64) {
    let names: Vec<(String,)> =
        sqlx::query_as("SELECT datname FROM pg_database WHERE datname LIKE 'wadi\\_t\\_%'")
            .fetch_all(&mut *admin)
            .await
            .unwrap_or_default();
    for (name,) in names {
        let created = name
            .split('_')
            .nth(2)
            .and_then(|secs| secs.parse::<u64>().ok());
        if created.is_some_and(|created| now.saturating_sub(created) > STALE_AFTER_SECS) {
            let _ = admin
                .execute(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str())
                .await;
        }
    }
}
