//! Rows as stored. Timestamps are Unix milliseconds; handlers map rows to protocol DTOs.

use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UserRecord {
    pub id: Uuid,
    /// Lowercased.
    pub email: String,
    /// A PHC string (argon2id).
    pub password_hash: String,
    /// JSON object given at signup as `data`.
    pub user_metadata: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub last_sign_in_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SessionRecord {
    pub id: Uuid,
    pub user_id: Uuid,
    /// How the session was established (`password`), for the `amr` claim.
    pub amr_method: String,
    /// When it was established, in Unix milliseconds (the `amr` timestamp).
    pub amr_at: i64,
    pub created_at: i64,
    /// Last refresh.
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RefreshTokenRecord {
    pub id: Uuid,
    /// SHA-256 of the token, hex. The token itself is never stored.
    pub token_hash: String,
    pub session_id: Uuid,
    pub parent_id: Option<Uuid>,
    pub revoked: bool,
    pub created_at: i64,
    /// When it was revoked (or created, while active): the start of the reuse window.
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SigningKeyRecord {
    pub kid: String,
    /// PKCS#8 PEM of the P-256 private key.
    pub private_key_pem: String,
    pub created_at: i64,
}
