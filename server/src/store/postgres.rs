//! The store for several instances behind a load balancer: `DATABASE_URL=postgres://…`.

use sqlx::{PgPool, Postgres, postgres::PgPoolOptions};

use super::{StoreResult, sql::sql_store};

pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub async fn open(url: &str) -> StoreResult<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            // A database that stopped answering fails requests in seconds, not half a minute.
            .acquire_timeout(super::ACQUIRE_TIMEOUT)
            .connect(url)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(Self { pool })
    }
}

sql_store!(
    PgStore,
    Postgres,
    "postgres",
    now = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
    lock = " FOR UPDATE OF r SKIP LOCKED"
);
