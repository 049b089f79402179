//! The embedded service's ES256 signing keys: generated on first start, persisted in the store
//! (so tokens survive restarts and every instance sharing a database signs alike), published as
//! a JWKS.

use std::collections::HashMap;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use p256::{
    SecretKey,
    elliptic_curve::sec1::ToEncodedPoint,
    pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding},
};
use serde_json::{Value, json};

use crate::{
    auth::verify::VerifyKey,
    store::{SigningKeyRecord, Store, StoreError},
};

pub struct SigningKeys {
    /// The key new tokens are signed with: the oldest in the store.
    pub kid: String,
    pub encoding: EncodingKey,
    /// Every stored key, for verification and the JWKS.
    pub public: Vec<PublicKey>,
}

pub struct PublicKey {
    pub kid: String,
    pub x: String,
    pub y: String,
    pub decoding: DecodingKey,
}

impl SigningKeys {
    /// Loads the stored keys, generating and storing one first if there are none.
    pub async fn load_or_create(store: &dyn Store, now: i64) -> Result<Self, StoreError> {
        let mut records = store.signing_keys().await?;
        if records.is_empty() {
            let secret = SecretKey::random(&mut rand_core::OsRng);
            let pem = secret
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| StoreError::Corrupt(format!("cannot encode signing key: {e}")))?;
            let record = SigningKeyRecord {
                kid: uuid::Uuid::new_v4().to_string(),
                private_key_pem: pem.to_string(),
                created_at: now,
            };
            store.insert_signing_key(&record).await?;
            tracing::info!(kid = %record.kid, "generated the auth signing key");
            // Re-read: another instance may have stored its key first; everyone signs with the
            // oldest.
            records = store.signing_keys().await?;
        }
        let mut public = Vec::with_capacity(records.len());
        let mut signer = None;
        for record in &records {
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
            if signer.is_none() {
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
            signer.ok_or_else(|| StoreError::Corrupt("no signing key stored".into()))?;
        Ok(Self {
            kid,
            encoding,
            public,
        })
    }

    /// The verifier's view: every key by `kid`, bound to ES256.
    pub fn verify_keys(&self) -> HashMap<String, VerifyKey> {
        self.public
            .iter()
            .map(|key| {
                let bound = VerifyKey {
                    algorithm: Algorithm::ES256,
                    key: key.decoding.clone(),
                };
                (key.kid.clone(), bound)
            })
            .collect()
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
