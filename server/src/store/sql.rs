//! The SQL both engines run, written once. `sql_store!(Type, Database)` implements [`Store`] for
//! a struct with a `pool: sqlx::Pool<Database>` field.
//!
//! [`Store`]: super::Store

macro_rules! sql_store {
    // `$now`: the database's clock in Unix milliseconds (liveness uses the database's time, never
    // a local clock). `$lock`: how the reaper locks the rows it claims, skipping those another
    // reaper holds (nothing on SQLite, where writers are serialised anyway).
    // `$begin`: how a write transaction starts. SQLite takes the write lock up front
    // (`BEGIN IMMEDIATE`): a deferred transaction that reads and then writes cannot wait for a
    // concurrent writer (SQLite answers "database is locked" at once instead of using the busy
    // timeout).
    // Search is written per engine (FTS5, tsvector): `$store::search_*_rows` are its inherent
    // functions.
    ($store:ty, $db:ty, $engine:literal, now = $now:literal, lock = $lock:literal, begin = $begin:literal) => {
        impl $store {
            /// Saves a run's outcome with its assistant message, within `connection`'s
            /// transaction. With `owner`, only if that instance still drives the run. Returns the
            /// run as it was before, or `None` if it was not running (with that owner).
            async fn save_outcome_row(
                connection: &mut <$db as sqlx::Database>::Connection,
                id: $crate::ids::RunId,
                owner: Option<$crate::ids::InstanceId>,
                outcome: &$crate::store::RunOutcome,
            ) -> Result<Option<$crate::store::RunRecord>, sqlx::Error> {
                let run = sqlx::query_as::<$db, $crate::store::RunRecord>(
                    "UPDATE runs SET status = $2, output = $3, chunk_ends = $4, error = $5, \
                     prompt_tokens = $6, completion_tokens = $7, last_seq = $8, finished_at = $9, \
                     usage_estimated = $11 \
                     WHERE id = $1 AND status = 'running' \
                     AND ($10 IS NULL OR owner_instance = $10) RETURNING *",
                )
                .bind(id)
                .bind(outcome.status.as_str())
                .bind(&outcome.output)
                .bind(&outcome.chunk_ends)
                .bind(&outcome.error)
                .bind(outcome.prompt_tokens)
                .bind(outcome.completion_tokens)
                .bind(outcome.last_seq)
                .bind(outcome.finished_at)
                .bind(owner)
                .bind(outcome.usage_estimated)
                .fetch_optional(&mut *connection)
                .await?;
                let Some(run) = run else {
                    return Ok(None);
                };
                sqlx::query(
                    "INSERT INTO messages (id, conversation_id, role, content, run_id, \
                     client_message_id, created_at, parent_id) \
                     VALUES ($1, $2, 'assistant', $3, $4, NULL, $5, $6)",
                )
                .bind(outcome.message_id)
                .bind(run.conversation_id)
                .bind(&outcome.output)
                .bind(run.id)
                .bind(outcome.finished_at)
                .bind(run.message_id)
                .execute(&mut *connection)
                .await?;
                sqlx::query("UPDATE conversations SET updated_at = $2 WHERE id = $1")
                    .bind(run.conversation_id)
                    .bind(outcome.finished_at)
                    .execute(&mut *connection)
                    .await?;
                Ok(Some(run))
            }

            /// The one statement that stores a new run (with a user message, or regenerated).
            async fn insert_run_row(
                connection: &mut <$db as sqlx::Database>::Connection,
                run: &$crate::store::RunRecord,
            ) -> Result<(), sqlx::Error> {
                sqlx::query(
                    "INSERT INTO runs (id, conversation_id, owner_id, message_id, status, \
                     model, output, chunk_ends, error, prompt_tokens, completion_tokens, \
                     last_seq, started_at, finished_at, owner_instance, stop_requested_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
                     $15, $16)",
                )
                .bind(run.id)
                .bind(run.conversation_id)
                .bind(run.owner_id)
                .bind(run.message_id)
                .bind(run.status.as_str())
                .bind(&run.model)
                .bind(&run.output)
                .bind(&run.chunk_ends)
                .bind(&run.error)
                .bind(run.prompt_tokens)
                .bind(run.completion_tokens)
                .bind(run.last_seq)
                .bind(run.started_at)
                .bind(run.finished_at)
                .bind(run.owner_instance)
                .bind(run.stop_requested_at)
                .execute(connection)
                .await?;
                Ok(())
            }

            /// The one statement that stores a refresh token (first or rotated).
            async fn insert_refresh_token_row(
                connection: &mut <$db as sqlx::Database>::Connection,
                token: &$crate::store::RefreshTokenRecord,
            ) -> Result<(), sqlx::Error> {
                sqlx::query(
                    "INSERT INTO refresh_tokens (id, token_hash, session_id, parent_id, revoked, \
                     created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(token.id)
                .bind(&token.token_hash)
                .bind(token.session_id)
                .bind(token.parent_id)
                .bind(token.revoked)
                .bind(token.created_at)
                .bind(token.updated_at)
                .execute(connection)
                .await?;
                Ok(())
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            fn engine(&self) -> &'static str {
                $engine
            }

            async fn ping(&self) -> $crate::store::StoreResult<()> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            async fn create_user(
                &self,
                user: &$crate::store::UserRecord,
            ) -> $crate::store::StoreResult<()> {
                sqlx::query(
                    "INSERT INTO users (id, email, password_hash, user_metadata, created_at, \
                     updated_at, last_sign_in_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(user.id)
                .bind(&user.email)
                .bind(&user.password_hash)
                .bind(&user.user_metadata)
                .bind(user.created_at)
                .bind(user.updated_at)
                .bind(user.last_sign_in_at)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn user_by_email(
                &self,
                email: &str,
            ) -> $crate::store::StoreResult<Option<$crate::store::UserRecord>> {
                Ok(sqlx::query_as::<$db, $crate::store::UserRecord>(
                    "SELECT * FROM users WHERE email = $1",
                )
                .bind(email)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn user_by_id(
                &self,
                id: $crate::ids::UserId,
            ) -> $crate::store::StoreResult<Option<$crate::store::UserRecord>> {
                Ok(sqlx::query_as::<$db, $crate::store::UserRecord>(
                    "SELECT * FROM users WHERE id = $1",
                )
                .bind(id)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn record_sign_in(
                &self,
                user_id: $crate::ids::UserId,
                at: i64,
            ) -> $crate::store::StoreResult<()> {
                sqlx::query("UPDATE users SET last_sign_in_at = $2, updated_at = $2 WHERE id = $1")
                    .bind(user_id)
                    .bind(at)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn login_failures_since(
                &self,
                email: &str,
                since: i64,
            ) -> $crate::store::StoreResult<i64> {
                let (count,): (i64,) = sqlx::query_as(
                    "SELECT COUNT(*) FROM login_failures WHERE email = $1 AND at >= $2",
                )
                .bind(email)
                .bind(since)
                .fetch_one(&self.pool)
                .await?;
                Ok(count)
            }

            async fn record_login_failure(
                &self,
                email: &str,
                at: i64,
                forget_before: i64,
            ) -> $crate::store::StoreResult<()> {
                let mut tx = self.pool.begin_with($begin).await?;
                sqlx::query("DELETE FROM login_failures WHERE at < $1")
                    .bind(forget_before)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("INSERT INTO login_failures (email, at) VALUES ($1, $2)")
                    .bind(email)
                    .bind(at)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn clear_login_failures(&self, email: &str) -> $crate::store::StoreResult<()> {
                sqlx::query("DELETE FROM login_failures WHERE email = $1")
                    .bind(email)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn create_session(
                &self,
                session: &$crate::store::SessionRecord,
                token: &$crate::store::RefreshTokenRecord,
            ) -> $crate::store::StoreResult<()> {
                let mut tx = self.pool.begin_with($begin).await?;
                sqlx::query(
                    "INSERT INTO auth_sessions (id, user_id, amr_method, amr_at, created_at, \
                     updated_at) VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(session.id)
                .bind(session.user_id)
                .bind(&session.amr_method)
                .bind(session.amr_at)
                .bind(session.created_at)
                .bind(session.updated_at)
                .execute(&mut *tx)
                .await?;
                Self::insert_refresh_token_row(&mut tx, token).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn session_by_id(
                &self,
                id: uuid::Uuid,
            ) -> $crate::store::StoreResult<Option<$crate::store::SessionRecord>> {
                Ok(sqlx::query_as::<$db, $crate::store::SessionRecord>(
                    "SELECT * FROM auth_sessions WHERE id = $1",
                )
                .bind(id)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn delete_session(&self, id: uuid::Uuid) -> $crate::store::StoreResult<bool> {
                let done = sqlx::query("DELETE FROM auth_sessions WHERE id = $1")
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn delete_user_sessions(
                &self,
                user_id: $crate::ids::UserId,
                keep: Option<uuid::Uuid>,
            ) -> $crate::store::StoreResult<u64> {
                let done = sqlx::query(
                    "DELETE FROM auth_sessions WHERE user_id = $1 AND ($2 IS NULL OR id <> $2)",
                )
                .bind(user_id)
                .bind(keep)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected())
            }

            async fn refresh_token_by_hash(
                &self,
                hash: &str,
            ) -> $crate::store::StoreResult<Option<$crate::store::RefreshTokenRecord>> {
                Ok(sqlx::query_as::<$db, $crate::store::RefreshTokenRecord>(
                    "SELECT * FROM refresh_tokens WHERE token_hash = $1",
                )
                .bind(hash)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn rotate_refresh_token(
                &self,
                id: uuid::Uuid,
                next_token: &str,
                child: &$crate::store::RefreshTokenRecord,
                revoked_before: i64,
            ) -> $crate::store::StoreResult<bool> {
                let mut tx = self.pool.begin_with($begin).await?;
                // Of two concurrent rotations of one token, the second waits here for the
                // first to commit, then finds the token revoked.
                let done = sqlx::query(
                    "UPDATE refresh_tokens SET revoked = TRUE, updated_at = $2, next_token = $3 \
                     WHERE id = $1 AND revoked = FALSE",
                )
                .bind(id)
                .bind(child.created_at)
                .bind(next_token)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() != 1 {
                    return Ok(false);
                }
                Self::insert_refresh_token_row(&mut tx, child).await?;
                sqlx::query("UPDATE auth_sessions SET updated_at = $2 WHERE id = $1")
                    .bind(child.session_id)
                    .bind(child.created_at)
                    .execute(&mut *tx)
                    .await?;
                // The token just rotated stays whatever its age: it is the parent of the
                // active one, which its holder gets back if the answer was lost.
                sqlx::query(
                    "DELETE FROM refresh_tokens WHERE session_id = $1 AND revoked = TRUE \
                     AND updated_at <= $2 AND id <> $3",
                )
                .bind(child.session_id)
                .bind(revoked_before)
                .bind(id)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn insert_refresh_token(
                &self,
                token: &$crate::store::RefreshTokenRecord,
            ) -> $crate::store::StoreResult<()> {
                let mut tx = self.pool.begin_with($begin).await?;
                Self::insert_refresh_token_row(&mut tx, token).await?;
                sqlx::query("UPDATE auth_sessions SET updated_at = $2 WHERE id = $1")
                    .bind(token.session_id)
                    .bind(token.created_at)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn create_conversation(
                &self,
                conversation: &$crate::store::ConversationRecord,
            ) -> $crate::store::StoreResult<()> {
                sqlx::query(
                    "INSERT INTO conversations (id, owner_id, title, created_at, updated_at, \
                     model, system_prompt) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(conversation.id)
                .bind(conversation.owner_id)
                .bind(&conversation.title)
                .bind(conversation.created_at)
                .bind(conversation.updated_at)
                .bind(&conversation.model)
                .bind(&conversation.system_prompt)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn conversation(
                &self,
                id: $crate::ids::ConversationId,
                owner: $crate::ids::UserId,
            ) -> $crate::store::StoreResult<Option<$crate::store::ConversationRecord>> {
                Ok(sqlx::query_as::<$db, $crate::store::ConversationRecord>(
                    "SELECT * FROM conversations WHERE id = $1 AND owner_id = $2",
                )
                .bind(id)
                .bind(owner)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn list_conversations(
                &self,
                owner: $crate::ids::UserId,
                cursor: Option<$crate::store::ConversationCursor>,
                limit: u32,
            ) -> $crate::store::StoreResult<Vec<$crate::store::ConversationRecord>> {
                Ok(sqlx::query_as::<$db, $crate::store::ConversationRecord>(
                    "SELECT * FROM conversations WHERE owner_id = $1 \
                     AND ($2 IS NULL OR updated_at < $2 OR (updated_at = $2 AND id < $3)) \
                     ORDER BY updated_at DESC, id DESC LIMIT $4",
                )
                .bind(owner)
                .bind(cursor.map(|c| c.updated_at))
                .bind(cursor.map(|c| c.id))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?)
            }

            async fn rename_conversation(
                &self,
                id: $crate::ids::ConversationId,
                owner: $crate::ids::UserId,
                title: &str,
                now: i64,
            ) -> $crate::store::StoreResult<bool> {
                let done = sqlx::query(
                    "UPDATE conversations SET title = $3, updated_at = $4 \
                     WHERE id = $1 AND owner_id = $2",
                )
                .bind(id)
                .bind(owner)
                .bind(title)
                .bind(now)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn set_conversation_settings(
                &self,
                id: $crate::ids::ConversationId,
                owner: $crate::ids::UserId,
                model: Option<&str>,
                system_prompt: Option<&str>,
                now: i64,
            ) -> $crate::store::StoreResult<bool> {
                // `$3`/`$5` say whether to change each; an empty value goes back to NULL.
                let done = sqlx::query(
                    "UPDATE conversations SET \
                     model = CASE WHEN $3 THEN NULLIF($4, '') ELSE model END, \
                     system_prompt = CASE WHEN $5 THEN NULLIF($6, '') ELSE system_prompt END, \
                     updated_at = $7 WHERE id = $1 AND owner_id = $2",
                )
                .bind(id)
                .bind(owner)
                .bind(model.is_some())
                .bind(model.unwrap_or_default())
                .bind(system_prompt.is_some())
                .bind(system_prompt.unwrap_or_default())
                .bind(now)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn delete_conversation(
                &self,
                id: $crate::ids::ConversationId,
                owner: $crate::ids::UserId,
            ) -> $crate::store::StoreResult<bool> {
                let done = sqlx::query("DELETE FROM conversations WHERE id = $1 AND owner_id = $2")
                    .bind(id)
                    .bind(owner)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn insert_user_message(
                &self,
                message: &$crate::store::MessageRecord,
                title_if_untitled: &str,
                run: Option<&$crate::store::RunRecord>,
            ) -> $crate::store::StoreResult<($crate::store::MessageRecord, bool)> {
                let mut tx = self.pool.begin_with($begin).await?;
                let done = sqlx::query(
                    "INSERT INTO messages (id, conversation_id, role, content, run_id, \
                     client_message_id, created_at, parent_id) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                     ON CONFLICT (conversation_id, client_message_id) DO NOTHING",
                )
                .bind(message.id)
                .bind(message.conversation_id)
                .bind(message.role.as_str())
                .bind(&message.content)
                .bind(message.run_id)
                .bind(&message.client_message_id)
                .bind(message.created_at)
                .bind(message.parent_id)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() == 0 {
                    let existing = sqlx::query_as::<$db, $crate::store::MessageRecord>(
                        "SELECT * FROM messages WHERE conversation_id = $1 \
                         AND client_message_id = $2",
                    )
                    .bind(message.conversation_id)
                    .bind(&message.client_message_id)
                    .fetch_one(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    return Ok((existing, false));
                }
                sqlx::query(
                    "UPDATE conversations SET title = COALESCE(title, $2), updated_at = $3 \
                     WHERE id = $1",
                )
                .bind(message.conversation_id)
                .bind(title_if_untitled)
                .bind(message.created_at)
                .execute(&mut *tx)
                .await?;
                if let Some(run) = run {
                    // The partial unique index `runs_one_active` turns a second running run into
                    // StoreError::Conflict(Constraint::OneActiveRun); the rollback on drop undoes
                    // the message too.
                    Self::insert_run_row(&mut tx, run).await?;
                }
                tx.commit().await?;
                Ok((message.clone(), true))
            }

            async fn message(
                &self,
                conversation_id: $crate::ids::ConversationId,
                id: $crate::ids::MessageId,
            ) -> $crate::store::StoreResult<Option<$crate::store::MessageRecord>> {
                Ok(sqlx::query_as::<$db, $crate::store::MessageRecord>(
                    "SELECT * FROM messages WHERE id = $1 AND conversation_id = $2",
                )
                .bind(id)
                .bind(conversation_id)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn has_client_message(
                &self,
                conversation_id: $crate::ids::ConversationId,
                client_message_id: &str,
            ) -> $crate::store::StoreResult<bool> {
                let count: i64 = sqlx::query_scalar::<$db, i64>(
                    "SELECT COUNT(*) FROM messages \
                     WHERE conversation_id = $1 AND client_message_id = $2",
                )
                .bind(conversation_id)
                .bind(client_message_id)
                .fetch_one(&self.pool)
                .await?;
                Ok(count > 0)
            }

            async fn newest_leaf(
                &self,
                conversation_id: $crate::ids::ConversationId,
                through: Option<$crate::ids::MessageId>,
            ) -> $crate::store::StoreResult<Option<$crate::ids::MessageId>> {
                let Some(through) = through else {
                    return Ok(sqlx::query_scalar::<$db, $crate::ids::MessageId>(
                        "SELECT id FROM messages WHERE conversation_id = $1 \
                         ORDER BY id DESC LIMIT 1",
                    )
                    .bind(conversation_id)
                    .fetch_optional(&self.pool)
                    .await?);
                };
                // Ids are time-ordered: the greatest under `through` is the newest.
                Ok(sqlx::query_scalar::<$db, $crate::ids::MessageId>(
                    "WITH RECURSIVE under (id) AS ( \
                     SELECT id FROM messages WHERE id = $1 AND conversation_id = $2 \
                     UNION ALL \
                     SELECT m.id FROM messages m JOIN under u ON m.parent_id = u.id) \
                     SELECT id FROM under ORDER BY id DESC LIMIT 1",
                )
                .bind(through)
                .bind(conversation_id)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn search_messages(
                &self,
                owner: $crate::ids::UserId,
                words: &[String],
                limit: u32,
                offset: u32,
            ) -> $crate::store::StoreResult<Vec<$crate::store::MessageHitRow>> {
                Ok(Self::search_message_rows(&self.pool, owner, words, limit, offset).await?)
            }

            async fn search_titles(
                &self,
                owner: $crate::ids::UserId,
                words: &[String],
                limit: u32,
            ) -> $crate::store::StoreResult<Vec<$crate::store::TitleHitRow>> {
                Ok(Self::search_title_rows(&self.pool, owner, words, limit).await?)
            }

            async fn all_messages(
                &self,
                conversation_id: $crate::ids::ConversationId,
            ) -> $crate::store::StoreResult<Vec<$crate::store::MessageRow>> {
                Ok(sqlx::query_as::<$db, $crate::store::MessageRow>(
                    "SELECT m.id, m.conversation_id, m.role, m.content, m.run_id, \
                     m.client_message_id, m.created_at, m.parent_id, \
                     CASE WHEN m.role = 'assistant' THEN r.status END AS run_status, \
                     CASE WHEN m.role = 'assistant' THEN r.model END AS run_model, \
                     CASE WHEN m.role = 'assistant' THEN r.prompt_tokens END AS prompt_tokens, \
                     CASE WHEN m.role = 'assistant' THEN r.completion_tokens END \
                     AS completion_tokens, \
                     CASE WHEN m.role = 'assistant' THEN r.usage_estimated END \
                     AS usage_estimated \
                     FROM messages m LEFT JOIN runs r ON r.id = m.run_id \
                     WHERE m.conversation_id = $1 ORDER BY m.id",
                )
                .bind(conversation_id)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn path(
                &self,
                conversation_id: $crate::ids::ConversationId,
                leaf: $crate::ids::MessageId,
                limit: u32,
            ) -> $crate::store::StoreResult<Vec<$crate::store::MessageRow>> {
                let mut rows = sqlx::query_as::<$db, $crate::store::MessageRow>(
                    "WITH RECURSIVE path (id, parent_id, depth) AS ( \
                     SELECT id, parent_id, 1 FROM messages WHERE id = $1 AND conversation_id = $2 \
                     UNION ALL \
                     SELECT m.id, m.parent_id, p.depth + 1 FROM messages m \
                     JOIN path p ON m.id = p.parent_id WHERE p.depth < $3) \
                     SELECT m.id, m.conversation_id, m.role, m.content, m.run_id, \
                     m.client_message_id, m.created_at, m.parent_id, \
                     CASE WHEN m.role = 'assistant' THEN r.status END AS run_status, \
                     CASE WHEN m.role = 'assistant' THEN r.model END AS run_model, \
                     CASE WHEN m.role = 'assistant' THEN r.prompt_tokens END AS prompt_tokens, \
                     CASE WHEN m.role = 'assistant' THEN r.completion_tokens END \
                     AS completion_tokens, \
                     CASE WHEN m.role = 'assistant' THEN r.usage_estimated END \
                     AS usage_estimated \
                     FROM path JOIN messages m ON m.id = path.id \
                     LEFT JOIN runs r ON r.id = m.run_id ORDER BY path.depth DESC",
                )
                .bind(leaf)
                .bind(conversation_id)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                // The forks: every message that shares its parent with another, oldest first.
                let forks = sqlx::query_as::<$db, ($crate::ids::MessageId, Option<$crate::ids::MessageId>)>(
                    "SELECT id, parent_id FROM messages WHERE conversation_id = $1 AND ( \
                     parent_id IN (SELECT parent_id FROM messages WHERE conversation_id = $1 \
                     AND parent_id IS NOT NULL GROUP BY parent_id HAVING COUNT(*) > 1) \
                     OR (parent_id IS NULL AND (SELECT COUNT(*) FROM messages \
                     WHERE conversation_id = $1 AND parent_id IS NULL) > 1)) ORDER BY id",
                )
                .bind(conversation_id)
                .fetch_all(&self.pool)
                .await?;
                if !forks.is_empty() {
                    for row in &mut rows {
                        row.siblings = forks
                            .iter()
                            .filter(|(_, parent)| *parent == row.message.parent_id)
                            .map(|(id, _)| *id)
                            .collect();
                    }
                }
                Ok(rows)
            }

            async fn run(
                &self,
                id: $crate::ids::RunId,
                owner: $crate::ids::UserId,
            ) -> $crate::store::StoreResult<Option<$crate::store::RunRecord>> {
                Ok(sqlx::query_as::<$db, $crate::store::RunRecord>(
                    "SELECT * FROM runs WHERE id = $1 AND owner_id = $2",
                )
                .bind(id)
                .bind(owner)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn run_exists(
                &self,
                id: $crate::ids::RunId,
                owner: $crate::ids::UserId,
            ) -> $crate::store::StoreResult<bool> {
                let (count,): (i64,) =
                    sqlx::query_as("SELECT COUNT(*) FROM runs WHERE id = $1 AND owner_id = $2")
                        .bind(id)
                        .bind(owner)
                        .fetch_one(&self.pool)
                        .await?;
                Ok(count > 0)
            }

            async fn run_by_id(
                &self,
                id: $crate::ids::RunId,
            ) -> $crate::store::StoreResult<Option<$crate::store::RunRecord>> {
                Ok(sqlx::query_as::<$db, $crate::store::RunRecord>(
                    "SELECT * FROM runs WHERE id = $1",
                )
                .bind(id)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn active_run(
                &self,
                conversation_id: $crate::ids::ConversationId,
            ) -> $crate::store::StoreResult<Option<$crate::store::RunRecord>> {
                Ok(sqlx::query_as::<$db, $crate::store::RunRecord>(
                    "SELECT * FROM runs WHERE conversation_id = $1 AND status = 'running'",
                )
                .bind(conversation_id)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn run_for_message(
                &self,
                message_id: $crate::ids::MessageId,
            ) -> $crate::store::StoreResult<Option<$crate::store::RunRecord>> {
                Ok(sqlx::query_as::<$db, $crate::store::RunRecord>(
                    "SELECT * FROM runs WHERE message_id = $1 ORDER BY started_at, id LIMIT 1",
                )
                .bind(message_id)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn insert_run(
                &self,
                run: &$crate::store::RunRecord,
            ) -> $crate::store::StoreResult<()> {
                let mut tx = self.pool.begin_with($begin).await?;
                Self::insert_run_row(&mut tx, run).await?;
                sqlx::query("UPDATE conversations SET updated_at = $2 WHERE id = $1")
                    .bind(run.conversation_id)
                    .bind(run.started_at)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn checkpoint_runs(
                &self,
                checkpoints: &[(
                    $crate::ids::RunId,
                    $crate::ids::InstanceId,
                    $crate::store::Checkpoint,
                )],
            ) -> $crate::store::StoreResult<Vec<$crate::store::CheckpointResult>> {
                let mut tx = self.pool.begin_with($begin).await?;
                let mut results = Vec::with_capacity(checkpoints.len());
                for (id, owner, checkpoint) in checkpoints {
                    // Appends, never rewrites: a long answer costs its new text per
                    // checkpoint, not its whole length.
                    let done = sqlx::query(
                        "UPDATE runs SET output = output || $4, chunk_ends = chunk_ends || $5, \
                         last_seq = $6 WHERE id = $1 AND status = 'running' \
                         AND owner_instance = $2 AND last_seq = $3",
                    )
                    .bind(id)
                    .bind(owner)
                    .bind(checkpoint.from_seq)
                    .bind(&checkpoint.delta)
                    .bind(&checkpoint.ends)
                    .bind(checkpoint.to_seq)
                    .execute(&mut *tx)
                    .await?;
                    if done.rows_affected() == 1 {
                        results.push($crate::store::CheckpointResult::Saved);
                        continue;
                    }
                    let row: Option<(String, Option<$crate::ids::InstanceId>, i64)> =
                        sqlx::query_as(
                            "SELECT status, owner_instance, last_seq FROM runs WHERE id = $1",
                        )
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?;
                    results.push(match row {
                        Some((status, Some(driver), stored_seq))
                            if status == "running" && driver == *owner =>
                        {
                            $crate::store::CheckpointResult::Behind { stored_seq }
                        }
                        _ => $crate::store::CheckpointResult::Fenced,
                    });
                }
                tx.commit().await?;
                Ok(results)
            }

            async fn finish_run(
                &self,
                id: $crate::ids::RunId,
                owner: Option<$crate::ids::InstanceId>,
                outcome: &$crate::store::RunOutcome,
            ) -> $crate::store::StoreResult<bool> {
                let mut tx = self.pool.begin_with($begin).await?;
                let saved = Self::save_outcome_row(&mut tx, id, owner, outcome).await?;
                if saved.is_none() {
                    return Ok(false);
                }
                tx.commit().await?;
                Ok(true)
            }

            async fn request_stop(
                &self,
                id: $crate::ids::RunId,
                owner: $crate::ids::UserId,
                at: i64,
            ) -> $crate::store::StoreResult<Option<Option<$crate::ids::InstanceId>>> {
                let row: Option<(Option<$crate::ids::InstanceId>,)> = sqlx::query_as(
                    "UPDATE runs SET stop_requested_at = COALESCE(stop_requested_at, $3) \
                     WHERE id = $1 AND owner_id = $2 AND status = 'running' \
                     RETURNING owner_instance",
                )
                .bind(id)
                .bind(owner)
                .bind(at)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(|(instance,)| instance))
            }

            async fn register_instance(
                &self,
                id: $crate::ids::InstanceId,
                host: &str,
                pid: i64,
            ) -> $crate::store::StoreResult<()> {
                sqlx::query(concat!(
                    "INSERT INTO instances (id, host, pid, started_at, heartbeat_at) \
                     VALUES ($1, $2, $3, ", $now, ", ", $now, ")"
                ))
                .bind(id)
                .bind(host)
                .bind(pid)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn heartbeat(
                &self,
                id: $crate::ids::InstanceId,
            ) -> $crate::store::StoreResult<bool> {
                let done = sqlx::query(concat!(
                    "UPDATE instances SET heartbeat_at = ", $now, " WHERE id = $1"
                ))
                .bind(id)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn deregister_instance(
                &self,
                id: $crate::ids::InstanceId,
            ) -> $crate::store::StoreResult<()> {
                sqlx::query("DELETE FROM instances WHERE id = $1")
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn instances(
                &self,
            ) -> $crate::store::StoreResult<Vec<$crate::store::InstanceRecord>> {
                Ok(sqlx::query_as::<$db, $crate::store::InstanceRecord>(
                    "SELECT * FROM instances ORDER BY started_at",
                )
                .fetch_all(&self.pool)
                .await?)
            }

            async fn instance_alive(
                &self,
                id: $crate::ids::InstanceId,
                timeout: std::time::Duration,
            ) -> $crate::store::StoreResult<bool> {
                let (count,): (i64,) = sqlx::query_as(concat!(
                    "SELECT COUNT(*) FROM instances WHERE id = $1 AND heartbeat_at >= ",
                    $now,
                    " - $2"
                ))
                .bind(id)
                .bind(i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX))
                .fetch_one(&self.pool)
                .await?;
                Ok(count > 0)
            }

            async fn running_runs(
                &self,
            ) -> $crate::store::StoreResult<Vec<$crate::store::RunRecord>> {
                Ok(sqlx::query_as::<$db, $crate::store::RunRecord>(
                    "SELECT * FROM runs WHERE status = 'running'",
                )
                .fetch_all(&self.pool)
                .await?)
            }

            async fn owned_running_runs(
                &self,
                owner: $crate::ids::InstanceId,
            ) -> $crate::store::StoreResult<Vec<$crate::store::OwnedRun>> {
                Ok(sqlx::query_as::<$db, $crate::store::OwnedRun>(
                    "SELECT id, stop_requested_at IS NOT NULL AS stop_requested FROM runs \
                     WHERE owner_instance = $1 AND status = 'running'",
                )
                .bind(owner)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn reap_runs(
                &self,
                timeout: std::time::Duration,
                forget_after: std::time::Duration,
                limit: u32,
                finalize: &dyn $crate::store::Finalize,
            ) -> $crate::store::StoreResult<Vec<($crate::store::RunRecord, $crate::store::RunOutcome)>>
            {
                let millis =
                    |duration: std::time::Duration| i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
                let mut tx = self.pool.begin_with($begin).await?;
                sqlx::query(concat!("DELETE FROM instances WHERE heartbeat_at < ", $now, " - $1"))
                    .bind(millis(forget_after))
                    .execute(&mut *tx)
                    .await?;
                let candidates = sqlx::query_as::<$db, $crate::store::RunRecord>(concat!(
                    "SELECT r.* FROM runs r WHERE r.status = 'running' \
                     AND (r.owner_instance IS NULL OR NOT EXISTS (SELECT 1 FROM instances i \
                     WHERE i.id = r.owner_instance AND i.heartbeat_at >= ",
                    $now,
                    " - $1)) ORDER BY r.id LIMIT $2",
                    $lock
                ))
                .bind(millis(timeout))
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await?;
                let mut reaped = Vec::with_capacity(candidates.len());
                for run in candidates {
                    let outcome = finalize.finalize(&run).await;
                    if Self::save_outcome_row(&mut tx, run.id, None, &outcome)
                        .await?
                        .is_some()
                    {
                        reaped.push((run, outcome));
                    }
                }
                tx.commit().await?;
                Ok(reaped)
            }

            async fn signing_keys(
                &self,
            ) -> $crate::store::StoreResult<Vec<$crate::store::SigningKeyRecord>> {
                Ok(sqlx::query_as::<$db, $crate::store::SigningKeyRecord>(
                    "SELECT * FROM auth_signing_keys ORDER BY created_at, kid",
                )
                .fetch_all(&self.pool)
                .await?)
            }

            async fn insert_signing_key(
                &self,
                key: &$crate::store::SigningKeyRecord,
            ) -> $crate::store::StoreResult<()> {
                sqlx::query(
                    "INSERT INTO auth_signing_keys (kid, private_key_pem, created_at) \
                     VALUES ($1, $2, $3) ON CONFLICT (kid) DO NOTHING",
                )
                .bind(&key.kid)
                .bind(&key.private_key_pem)
                .bind(key.created_at)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn rotate_signing_key(
                &self,
                key: &$crate::store::SigningKeyRecord,
                forget_before: i64,
            ) -> $crate::store::StoreResult<()> {
                let mut tx = self.pool.begin_with($begin).await?;
                sqlx::query(
                    "UPDATE auth_signing_keys SET retired_at = $1 WHERE retired_at IS NULL",
                )
                .bind(key.created_at)
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM auth_signing_keys WHERE retired_at < $1")
                    .bind(forget_before)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO auth_signing_keys (kid, private_key_pem, created_at) \
                     VALUES ($1, $2, $3)",
                )
                .bind(&key.kid)
                .bind(&key.private_key_pem)
                .bind(key.created_at)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn list_users(
                &self,
            ) -> $crate::store::StoreResult<Vec<$crate::store::UserSummary>> {
                Ok(sqlx::query_as::<$db, $crate::store::UserSummary>(
                    "SELECT u.id, u.email, u.created_at, u.last_sign_in_at, \
                     (SELECT COUNT(*) FROM auth_sessions s WHERE s.user_id = u.id) AS sessions, \
                     (SELECT COUNT(*) FROM conversations c WHERE c.owner_id = u.id) \
                     AS conversations FROM users u ORDER BY u.created_at, u.id",
                )
                .fetch_all(&self.pool)
                .await?)
            }

            async fn delete_user(
                &self,
                id: $crate::ids::UserId,
            ) -> $crate::store::StoreResult<bool> {
                let mut tx = self.pool.begin_with($begin).await?;
                // Messages and runs go with their conversations; sessions and refresh tokens
                // with the user.
                sqlx::query("DELETE FROM conversations WHERE owner_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                let done = sqlx::query("DELETE FROM users WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(done.rows_affected() == 1)
            }

            async fn reset_password(
                &self,
                id: $crate::ids::UserId,
                password_hash: &str,
                at: i64,
            ) -> $crate::store::StoreResult<bool> {
                let mut tx = self.pool.begin_with($begin).await?;
                let done = sqlx::query(
                    "UPDATE users SET password_hash = $2, updated_at = $3 WHERE id = $1",
                )
                .bind(id)
                .bind(password_hash)
                .bind(at)
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM auth_sessions WHERE user_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(done.rows_affected() == 1)
            }
        }
    };
}

pub(crate) use sql_store;
