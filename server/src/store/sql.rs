//! The SQL both engines run, written once. `sql_store!(Type, Database)` implements [`Store`] for
//! a struct with a `pool: sqlx::Pool<Database>` field.
//!
//! [`Store`]: super::Store

macro_rules! sql_store {
    ($store:ty, $db:ty, $engine:literal) => {
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
                .execute(&mut *tx)
                .await?;
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
                .execute(&mut *tx)
                .await?;
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
