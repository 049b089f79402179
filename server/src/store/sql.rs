//! The SQL both engines run, written once. `sql_store!(Type, Database)` implements [`Store`] for
//! a struct with a `pool: sqlx::Pool<Database>` field.
//!
//! [`Store`]: super::Store

macro_rules! sql_store {
    ($store:ty, $db:ty, $engine:literal) => {
        impl $store {
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
                id: uuid::Uuid,
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
                user_id: uuid::Uuid,
                at: i64,
            ) -> $crate::store::StoreResult<()> {
                sqlx::query("UPDATE users SET last_sign_in_at = $2, updated_at = $2 WHERE id = $1")
                    .bind(user_id)
                    .bind(at)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn create_session(
                &self,
                session: &$crate::store::SessionRecord,
                token: &$crate::store::RefreshTokenRecord,
            ) -> $crate::store::StoreResult<()> {
                let mut tx = self.pool.begin().await?;
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
                user_id: uuid::Uuid,
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

            async fn revoke_refresh_token(
                &self,
                id: uuid::Uuid,
                at: i64,
            ) -> $crate::store::StoreResult<bool> {
                let done = sqlx::query(
                    "UPDATE refresh_tokens SET revoked = TRUE, updated_at = $2 \
                     WHERE id = $1 AND revoked = FALSE",
                )
                .bind(id)
                .bind(at)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn insert_refresh_token(
                &self,
                token: &$crate::store::RefreshTokenRecord,
            ) -> $crate::store::StoreResult<()> {
                let mut tx = self.pool.begin().await?;
                Self::insert_refresh_token_row(&mut tx, token).await?;
                sqlx::query("UPDATE auth_sessions SET updated_at = $2 WHERE id = $1")
                    .bind(token.session_id)
                    .bind(token.created_at)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn has_active_child(
                &self,
                parent: uuid::Uuid,
            ) -> $crate::store::StoreResult<bool> {
                let found: Option<(i32,)> = sqlx::query_as(
                    "SELECT 1 FROM refresh_tokens WHERE parent_id = $1 AND revoked = FALSE LIMIT 1",
                )
                .bind(parent)
                .fetch_optional(&self.pool)
                .await?;
                Ok(found.is_some())
            }

            async fn create_conversation(
                &self,
                conversation: &$crate::store::ConversationRecord,
            ) -> $crate::store::StoreResult<()> {
                sqlx::query(
                    "INSERT INTO conversations (id, owner_id, title, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(conversation.id)
                .bind(conversation.owner_id)
                .bind(&conversation.title)
                .bind(conversation.created_at)
                .bind(conversation.updated_at)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn conversation(
                &self,
                id: uuid::Uuid,
                owner: uuid::Uuid,
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
                owner: uuid::Uuid,
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
                id: uuid::Uuid,
                owner: uuid::Uuid,
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

            async fn delete_conversation(
                &self,
                id: uuid::Uuid,
                owner: uuid::Uuid,
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
                let mut tx = self.pool.begin().await?;
                let done = sqlx::query(
                    "INSERT INTO messages (id, conversation_id, role, content, run_id, \
                     client_message_id, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                     ON CONFLICT (conversation_id, client_message_id) DO NOTHING",
                )
                .bind(message.id)
                .bind(message.conversation_id)
                .bind(&message.role)
                .bind(&message.content)
                .bind(message.run_id)
                .bind(&message.client_message_id)
                .bind(message.created_at)
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
                    // a unique violation, i.e. StoreError::Conflict; the rollback on drop undoes
                    // the message too.
                    sqlx::query(
                        "INSERT INTO runs (id, conversation_id, owner_id, message_id, status, \
                         model, output, error, prompt_tokens, completion_tokens, last_seq, \
                         started_at, finished_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                    )
                    .bind(run.id)
                    .bind(run.conversation_id)
                    .bind(run.owner_id)
                    .bind(run.message_id)
                    .bind(&run.status)
                    .bind(&run.model)
                    .bind(&run.output)
                    .bind(&run.error)
                    .bind(run.prompt_tokens)
                    .bind(run.completion_tokens)
                    .bind(run.last_seq)
                    .bind(run.started_at)
                    .bind(run.finished_at)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok((message.clone(), true))
            }

            async fn list_messages(
                &self,
                conversation_id: uuid::Uuid,
                after: Option<uuid::Uuid>,
                limit: u32,
            ) -> $crate::store::StoreResult<Vec<$crate::store::MessageRow>> {
                Ok(sqlx::query_as::<$db, $crate::store::MessageRow>(
                    "SELECT m.id, m.conversation_id, m.role, m.content, m.run_id, \
                     m.client_message_id, m.created_at, \
                     CASE WHEN m.role = 'assistant' THEN r.status END AS run_status \
                     FROM messages m LEFT JOIN runs r ON r.id = m.run_id \
                     WHERE m.conversation_id = $1 AND ($2 IS NULL OR m.id > $2) \
                     ORDER BY m.id LIMIT $3",
                )
                .bind(conversation_id)
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?)
            }

            async fn recent_messages(
                &self,
                conversation_id: uuid::Uuid,
                limit: u32,
            ) -> $crate::store::StoreResult<Vec<$crate::store::MessageRecord>> {
                let mut rows = sqlx::query_as::<$db, $crate::store::MessageRecord>(
                    "SELECT * FROM messages WHERE conversation_id = $1 ORDER BY id DESC LIMIT $2",
                )
                .bind(conversation_id)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                rows.reverse();
                Ok(rows)
            }

            async fn run(
                &self,
                id: uuid::Uuid,
                owner: uuid::Uuid,
            ) -> $crate::store::StoreResult<Option<$crate::store::RunRecord>> {
                Ok(sqlx::query_as::<$db, $crate::store::RunRecord>(
                    "SELECT * FROM runs WHERE id = $1 AND owner_id = $2",
                )
                .bind(id)
                .bind(owner)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn active_run(
                &self,
                conversation_id: uuid::Uuid,
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
                message_id: uuid::Uuid,
            ) -> $crate::store::StoreResult<Option<$crate::store::RunRecord>> {
                Ok(sqlx::query_as::<$db, $crate::store::RunRecord>(
                    "SELECT * FROM runs WHERE message_id = $1",
                )
                .bind(message_id)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn save_run_progress(
                &self,
                id: uuid::Uuid,
                output: &str,
                last_seq: i64,
            ) -> $crate::store::StoreResult<()> {
                sqlx::query(
                    "UPDATE runs SET output = $2, last_seq = $3 \
                     WHERE id = $1 AND status = 'running' AND last_seq <= $3",
                )
                .bind(id)
                .bind(output)
                .bind(last_seq)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn finish_run(
                &self,
                id: uuid::Uuid,
                outcome: &$crate::store::RunOutcome,
            ) -> $crate::store::StoreResult<bool> {
                let mut tx = self.pool.begin().await?;
                let run = sqlx::query_as::<$db, $crate::store::RunRecord>(
                    "UPDATE runs SET status = $2, output = $3, error = $4, prompt_tokens = $5, \
                     completion_tokens = $6, last_seq = $7, finished_at = $8 \
                     WHERE id = $1 AND status = 'running' RETURNING *",
                )
                .bind(id)
                .bind(&outcome.status)
                .bind(&outcome.output)
                .bind(&outcome.error)
                .bind(outcome.prompt_tokens)
                .bind(outcome.completion_tokens)
                .bind(outcome.last_seq)
                .bind(outcome.finished_at)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(run) = run else {
                    return Ok(false);
                };
                sqlx::query(
                    "INSERT INTO messages (id, conversation_id, role, content, run_id, \
                     client_message_id, created_at) VALUES ($1, $2, 'assistant', $3, $4, NULL, $5)",
                )
                .bind(outcome.message_id)
                .bind(run.conversation_id)
                .bind(&outcome.output)
                .bind(run.id)
                .bind(outcome.finished_at)
                .execute(&mut *tx)
                .await?;
                sqlx::query("UPDATE conversations SET updated_at = $2 WHERE id = $1")
                    .bind(run.conversation_id)
                    .bind(outcome.finished_at)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(true)
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
        }
    };
}

pub(crate) use sql_store;
