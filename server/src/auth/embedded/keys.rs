//! The embedded service's ES256 signing keys: generated on first start, persisted in the store
//! (so tokens survive restarts and every instance sharing a database signs alike), published as
//! a JWKS, and rotated by `wadi admin rotate-signing-key`: the new key signs, the retired ones
//! keep verifying until the tokens they signed have expired. Every instance re-reads the keys
//! every minute, and at once (at most every few seconds) when a token names a key it does not
//! know.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use p256::{
    SecretKey,
    elliptic_curve::sec1::ToEncodedPoint,
    pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding},
};
use serde_json::{Value, json};

use crate::{
    auth::verify::{VerifyError, VerifyKey},
    store::{SigningKeyRecord, Store, StoreError},
    util::now_millis,
};

/// How often every instance re-reads the keys (a rotation reaches all within this).
pub const RELOAD_EVERY: Duration = Duration::from_secs(60);
/// A token naming an unknown key re-reads them at most this often.
const RELOAD_AT_MOST_EVERY: Duration = Duration::from_secs(5);

/// A new P-256 key, as stored.
pub fn generate(now: i64) -> Result<SigningKeyRecord, StoreError> {
    let secret = SecretKey::random(&mut rand_core::OsRng);
    let pem = secret
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode signing key: {e}")))?;
    Ok(SigningKeyRecord {
        kid: uuid::Uuid::new_v4().to_string(),
        private_key_pem: pem.to_string(),
        created_at: now,
        retired_at: None,
    })
}

/// The keys as the store holds them now, kept fresh.
pub struct KeyRing {
    store: Arc<dyn Store>,
    /// How long a retired key keeps verifying, in milliseconds.
    keep_retired: i64,
    current: RwLock<Arc<SigningKeys>>,
    /// Held by the one task re-reading for an unknown key; when that last happened.
    reloading: tokio::sync::Mutex<Option<tokio::time::Instant>>,
}

impl KeyRing {
    /// Loads the stored keys, generating and storing one first if none signs. A retired key
    /// verifies for `keep_retired` after its retirement. Re-reads them every [`RELOAD_EVERY`]
    /// for as long as the ring lives.
    pub async fn open(
        store: Arc<dyn Store>,
        keep_retired: Duration,
    ) -> Result<Arc<Self>, StoreError> {
        let keep_retired = i64::try_from(keep_retired.as_millis()).unwrap_or(i64::MAX);
        let mut records = store.signing_keys().await?;
        if records.iter().all(|record| record.retired_at.is_some()) {
            let record = generate(now_millis())?;
            store.insert_signing_key(&record).await?;
            tracing::info!(kid = %record.kid, "generated the auth signing key");
            // Re-read: another instance may have stored its key first; everyone signs with the
            // oldest key in use.
            records = store.signing_keys().await?;
        }
        let keys = SigningKeys::from_records(&records, now_millis().saturating_sub(keep_retired))?;
        let ring = Arc::new(Self {
            store,
            keep_retired,
            current: RwLock::new(Arc::new(keys)),
            reloading: tokio::sync::Mutex::new(None),
        });
        let weak = Arc::downgrade(&ring);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RELOAD_EVERY).await;
                let Some(ring) = weak.upgrade() else { break };
                if let Err(error) = ring.reload().await {
                    tracing::warn!(%error, "cannot re-read the auth signing keys");
                }
            }
        });
        Ok(ring)
    }

    /// The keys as last read.
    pub fn current(&self) -> Arc<SigningKeys> {
        crate::util::read(&self.current).clone()
    }

    /// Re-reads the keys from the store.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let records = self.store.signing_keys().await?;
        let keys =
            SigningKeys::from_records(&records, now_millis().saturating_sub(self.keep_retired))?;
        if keys.kid != self.current().kid {
            tracing::info!(kid = %keys.kid, "signing with a new auth key");
        }
        *crate::util::write(&self.current) = Arc::new(keys);
        Ok(())
    }

    /// The key that verifies tokens naming `kid`. An unknown `kid` may be a key another
    /// instance just rotated to: the keys are re-read (by one caller, at most every few
    /// seconds; the others wait for it) before the token is refused.
    pub async fn verify_key(&self, kid: &str) -> Result<VerifyKey, VerifyError> {
        if let Some(key) = self.current().verify_key(kid) {
            return Ok(key);
        }
        {
            let mut last = self.reloading.lock().await;
            if let Some(key) = self.current().verify_key(kid) {
                return Ok(key);
            }
            if last.is_none_or(|at| at.elapsed() >= RELOAD_AT_MOST_EVERY) {
                *last = Some(tokio::time::Instant::now());
                if let Err(error) = self.reload().await {
                    tracing::warn!(%error, "cannot re-read the auth signing keys");
                }
            }
        }
        self.current()
            .verify_key(kid)
            .ok_or_else(|| VerifyError::UnknownKid(kid.to_owned()))
    }
}

pub struct SigningKeys {
    /// The key new tokens are signed with: the oldest one in use.
    pub kid: String,
    pub encoding: EncodingKey,
    /// The keys in use and those retired recently enough, for verification and the JWKS.
    pub public: Vec<PublicKey>,
}

pub struct PublicKey {
    pub kid: String,
    pub x: String,
    pub y: String,
    pub decoding: DecodingKey,
}

impl SigningKeys {
    /// The keys of `records` (oldest first): the oldest one in use signs; those in use and
    /// those retired at or after `retired_since` verify.
    fn from_records(records: &[SigningKeyRecord], retired_since: i64) -> Result<Self, StoreError> {
        let mut public = Vec::with_capacity(records.len());
        let mut signer = None;
        for record in records {
            if record.retired_at.is_some_and(|at| at < retired_since) {
                continue;
            }
            let secret = SecretKey::from_pkcs8_pem(&record.private_key_pem).map_err(|e| {
                StoreError::Corrupt(format!("signing key {} is unreadable: {e}", record.kid))
            })?;
            let point = secret.public_key().to_encoded_point(false);
            let (Some(x), Some(y)) = (point.x(), point.y()) else {
                return Err(StoreError::Corrupt(format!(
                    "signing key {} has no point",
                    record.kid
                )));
            };
            let x = URL_SAFE_NO_PAD.encode(x);
            let y = URL_SAFE_NO_PAD.encode(y);
            let decoding = DecodingKey::from_ec_components(&x, &y)
                .map_err(|e| StoreError::Corrupt(format!("signing key {}: {e}", record.kid)))?;
            if signer.is_none() && record.retired_at.is_none() {
                let der = secret
                    .to_pkcs8_der()
                    .map_err(|e| StoreError::Corrupt(format!("signing key {}: {e}", record.kid)))?;
                signer = Some((record.kid.clone(), EncodingKey::from_ec_der(der.as_bytes())));
            }
            public.push(PublicKey {
                kid: record.kid.clone(),
                x,
                y,
                decoding,
            });
        }
        let (kid, encoding) =
            signer.ok_or_else(|| StoreError::Corrupt("no signing key in use".into()))?;
        Ok(Self {
            kid,
            encoding,
            public,
        })
    }

    /// The key that verifies tokens naming `kid`, bound to ES256.
    fn verify_key(&self, kid: &str) -> Option<VerifyKey> {
        self.public
            .iter()
            .find(|key| key.kid == kid)
            .map(|key| VerifyKey {
                algorithm: Algorithm::ES256,
                key: key.decoding.clone(),
            })
    }

    /// `GET /auth/v1/.well-known/jwks.json`: public keys only, as Supabase publishes them.
    pub fn jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .public
            .iter()
            .map(|key| {
                json!({
                    "alg": "ES256",
                    "crv": "P-256",
                    "kty": "EC",
                    "kid": key.kid,
                    "key_ops": ["verify"],
                    "use": "sig",
                    "x": key.x,
                    "y": key.y,
                })
            })
            .collect();
        json!({ "keys": keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_key_in_use_signs_and_retired_keys_verify_only_within_their_window() {
        let mut old = generate(1_000).unwrap();
        old.retired_at = Some(5_000);
        let mut older = generate(500).unwrap();
        older.retired_at = Some(2_000);
        let current = generate(5_000).unwrap();
        let newer = generate(6_000).unwrap();
        let records = [older.clone(), old.clone(), current.clone(), newer.clone()];

        let keys = SigningKeys::from_records(&records, 3_000).unwrap();
        assert_eq!(keys.kid, current.kid, "the oldest key in use signs");
        assert!(
            keys.verify_key(&old.kid).is_some(),
            "retired within the window"
        );
        assert!(keys.verify_key(&newer.kid).is_some());
        assert!(
            keys.verify_key(&older.kid).is_none(),
            "retired before the window"
        );
        let published = keys.jwks().to_string();
        assert!(!published.contains(&older.kid) && published.contains(&old.kid));

        let all_retired = [old, older];
        assert!(SigningKeys::from_records(&all_retired, 0).is_err());
    }
}
