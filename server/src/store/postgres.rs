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

/// A tsquery matching every word (the last as a prefix: results while typing). The words are
/// letters and digits only (see `search::words`), so nothing in them is tsquery syntax.
fn ts_query(words: &[String]) -> String {
    let mut query = String::new();
    for (i, word) in words.iter().enumerate() {
        if i > 0 {
            query.push_str(" & ");
        }
        query.push_str(word);
        if i + 1 == words.len() {
            query.push_str(":*");
        }
    }
    query
}

/// How `ts_headline` marks a match: as the FTS5 side does (see `store::HIT_START`).
const HEADLINE: &str = "StartSel=\u{E000}, StopSel=\u{E001}, MaxWords=28, MinWords=10, \
                        MaxFragments=1, FragmentDelimiter=…";

impl PgStore {
    async fn search_message_rows(
        pool: &PgPool,
        owner: crate::ids::UserId,
        words: &[String],
        limit: u32,
        offset: u32,
    ) -> Result<Vec<super::MessageHitRow>, sqlx::Error> {
        sqlx::query_as::<Postgres, super::MessageHitRow>(
            "SELECT m.conversation_id, c.title, m.id AS message_id, m.role, m.created_at, \
             ts_headline('simple', m.content, q, $5) AS snippet \
             FROM messages m JOIN conversations c ON c.id = m.conversation_id, \
             to_tsquery('simple', $1) q \
             WHERE m.search @@ q AND c.owner_id = $2 \
             ORDER BY ts_rank(m.search, q) DESC, m.id DESC LIMIT $3 OFFSET $4",
        )
        .bind(ts_query(words))
        .bind(owner)
        .bind(i64::from(limit))
        .bind(i64::from(offset))
        .bind(HEADLINE)
        .fetch_all(pool)
        .await
    }

    async fn search_title_rows(
        pool: &PgPool,
        owner: crate::ids::UserId,
        words: &[String],
        limit: u32,
    ) -> Result<Vec<super::TitleHitRow>, sqlx::Error> {
        sqlx::query_as::<Postgres, super::TitleHitRow>(
            "SELECT c.id AS conversation_id, c.updated_at, \
             ts_headline('simple', COALESCE(c.title, ''), q, $4) AS snippet \
             FROM conversations c, to_tsquery('simple', $1) q \
             WHERE c.search @@ q AND c.owner_id = $2 \
             ORDER BY ts_rank(c.search, q) DESC, c.updated_at DESC LIMIT $3",
        )
        .bind(ts_query(words))
        .bind(owner)
        .bind(i64::from(limit))
        .bind(HEADLINE)
        .fetch_all(pool)
        .await
    }
}

sql_store!(
    PgStore,
    Postgres,
    "postgres",
    now = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
    lock = " FOR UPDATE OF r SKIP LOCKED",
    begin = "BEGIN"
);
