//! The one access-token verifier behind every HTTP route and the WebSocket.
//!
//! Accepts ES256/RS256 tokens whose `kid` names a key from a JWKS (Supabase's, fetched and
//! cached, or the embedded service's own keys), and HS256 tokens only when a shared secret is
//! configured. It never takes the algorithm from the token without a key bound to it.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, Jwk, JwkSet},
};
use serde::Deserialize;
use uuid::Uuid;

/// The verified identity of a request or connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthUser {
    pub id: crate::ids::UserId,
    pub email: Option<String>,
    pub role: String,
    /// The auth session the token belongs to (Supabase's `session_id` claim).
    pub session_id: Option<Uuid>,
    /// The token's `exp`, Unix seconds.
    pub expires_at: i64,
    /// Verified with the shared HS256 secret: minted by another party (a Supabase project, a
    /// service), not by a key of ours, so its session is not ours to check.
    pub shared_secret: bool,
}

/// Why a token was refused. Each variant is logged with its own reason and counted separately.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("token is not a well-formed JWT")]
    Malformed,
    #[error("unsigned tokens (alg none) are refused")]
    AlgNone,
    #[error("algorithm {0} is not accepted")]
    AlgorithmNotAllowed(String),
    #[error("token has no kid")]
    MissingKid,
    #[error("no key with kid {0:?}")]
    UnknownKid(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token audience is not accepted")]
    WrongAudience,
    #[error("token issuer is not accepted")]
    WrongIssuer,
    #[error("token claims are invalid: {0}")]
    InvalidClaims(String),
    #[error("signing keys are unavailable: {0}")]
    KeysUnavailable(String),
    #[error("the token's session has ended (signed out, revoked, or its account deleted)")]
    SessionEnded,
}

impl VerifyError {
    /// A short, stable label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::AlgNone => "alg_none",
            Self::AlgorithmNotAllowed(_) => "algorithm_not_allowed",
            Self::MissingKid => "missing_kid",
            Self::UnknownKid(_) => "unknown_kid",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::WrongAudience => "wrong_audience",
            Self::WrongIssuer => "wrong_issuer",
            Self::InvalidClaims(_) => "invalid_claims",
            Self::KeysUnavailable(_) => "keys_unavailable",
            Self::SessionEnded => "session_ended",
        }
    }
}

/// A public key bound to the one algorithm it may verify.
#[derive(Clone)]
pub struct VerifyKey {
    pub algorithm: Algorithm,
    pub key: DecodingKey,
}

impl VerifyKey {
    /// The key of a JWK, if it is an ES256 or RS256 signing key.
    pub fn from_jwk(jwk: &Jwk) -> Option<Self> {
        let algorithm = match &jwk.algorithm {
            AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            _ => return None,
        };
        // A JWK that names another algorithm (ES384, RS512, …) is not one we accept.
        if let Some(declared) = jwk.common.key_algorithm {
            let declared = format!("{declared:?}");
            if declared != format!("{algorithm:?}") {
                return None;
            }
        }
        let key = DecodingKey::from_jwk(jwk).ok()?;
        Some(Self { algorithm, key })
    }
}

/// Where asymmetric keys come from.
pub enum KeySource {
    /// A fixed set (none, for the fuzz targets).
    Static(HashMap<String, VerifyKey>),
    /// The embedded auth service's keys, as the store holds them.
    Local(Arc<crate::auth::embedded::KeyRing>),
    /// A remote JWKS (Supabase), cached by `kid`.
    Remote(JwksCache),
}

/// The claims we read. Unknown claims are ignored; `aud`, `exp` and `iss` are checked by
/// `jsonwebtoken`'s validation before these are looked at.
#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    #[serde(default)]
    nbf: Option<i64>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    session_id: Option<String>,
}

pub struct Verifier {
    hmac: Option<DecodingKey>,
    keys: KeySource,
    audience: String,
    issuer: Option<String>,
    leeway: Duration,
    /// What `exp` and `nbf` are checked against.
    clock: crate::util::Clock,
}

impl Verifier {
    pub fn new(
        hmac_secret: Option<&str>,
        keys: KeySource,
        issuer: Option<String>,
        leeway: Duration,
        clock: crate::util::Clock,
    ) -> Self {
        Self {
            hmac: hmac_secret.map(|secret| DecodingKey::from_secret(secret.as_bytes())),
            keys,
            audience: "authenticated".to_owned(),
            issuer,
            leeway,
            clock,
        }
    }

    /// The clock tokens are checked against.
    pub fn clock(&self) -> crate::util::Clock {
        self.clock
    }

    /// Verifies signature and claims and returns who the token is for.
    pub async fn verify(&self, token: &str) -> Result<AuthUser, VerifyError> {
        let header = RawHeader::parse(token)?;
        let (algorithm, key) = match header.alg.as_str() {
            "HS256" => {
                let key = self
                    .hmac
                    .clone()
                    .ok_or_else(|| VerifyError::AlgorithmNotAllowed(header.alg.clone()))?;
                (Algorithm::HS256, key)
            }
            "ES256" | "RS256" => {
                let kid = header.kid.ok_or(VerifyError::MissingKid)?;
                let bound = self.key(&kid).await?;
                // The key decides the algorithm: an RS256 header on an EC key is refused.
                if format!("{:?}", bound.algorithm) != header.alg {
                    return Err(VerifyError::AlgorithmNotAllowed(header.alg));
                }
                (bound.algorithm, bound.key)
            }
            other if other.eq_ignore_ascii_case("none") => return Err(VerifyError::AlgNone),
            other => return Err(VerifyError::AlgorithmNotAllowed(other.to_owned())),
        };

        let mut validation = Validation::new(algorithm);
        validation.set_audience(&[&self.audience]);
        // `iss` must be present (and, below, be ours). `exp` and `nbf` are checked below, on
        // the verifier's clock.
        validation.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| match e
            .kind()
        {
            ErrorKind::InvalidSignature => VerifyError::BadSignature,
            ErrorKind::ExpiredSignature => VerifyError::Expired,
            ErrorKind::InvalidAudience => VerifyError::WrongAudience,
            ErrorKind::InvalidIssuer => VerifyError::WrongIssuer,
            ErrorKind::InvalidAlgorithm => VerifyError::AlgorithmNotAllowed(header.alg.clone()),
            ErrorKind::MissingRequiredClaim(claim) => {
                VerifyError::InvalidClaims(format!("missing {claim}"))
            }
            ErrorKind::ImmatureSignature => VerifyError::InvalidClaims("not yet valid".into()),
            ErrorKind::Json(_) => VerifyError::InvalidClaims("claims are not valid JSON".into()),
            _ => VerifyError::Malformed,
        })?;
        let claims = data.claims;
        let now = self.clock.now_secs();
        let leeway = i64::try_from(self.leeway.as_secs()).unwrap_or(i64::MAX);
        if claims.exp.saturating_add(leeway) <= now {
            return Err(VerifyError::Expired);
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf.saturating_sub(leeway) > now)
        {
            return Err(VerifyError::InvalidClaims("not yet valid".into()));
        }
        let id = Uuid::parse_str(&claims.sub)
            .map(crate::ids::UserId::from)
            .map_err(|_| VerifyError::InvalidClaims("sub is not a UUID".into()))?;
        let role = claims
            .role
            .ok_or_else(|| VerifyError::InvalidClaims("missing role".into()))?;
        if role != "authenticated" {
            return Err(VerifyError::InvalidClaims(format!(
                "role {role:?} is not a user"
            )));
        }
        let session_id = match claims.session_id {
            Some(id) => Some(
                Uuid::parse_str(&id)
                    .map_err(|_| VerifyError::InvalidClaims("session_id is not a UUID".into()))?,
            ),
            None => None,
        };
        Ok(AuthUser {
            id,
            email: claims.email.filter(|email| !email.is_empty()),
            role,
            session_id,
            expires_at: claims.exp,
            shared_secret: algorithm == Algorithm::HS256,
        })
    }

    async fn key(&self, kid: &str) -> Result<VerifyKey, VerifyError> {
        match &self.keys {
            KeySource::Static(keys) => keys
                .get(kid)
                .cloned()
                .ok_or_else(|| VerifyError::UnknownKid(kid.to_owned())),
            KeySource::Local(ring) => ring.verify_key(kid).await,
            KeySource::Remote(cache) => cache.key(kid).await,
        }
    }
}

/// The JOSE header, read by hand so that `alg: none` and unknown algorithms get their own
/// reasons instead of a generic parse error.
struct RawHeader {
    alg: String,
    kid: Option<String>,
}

impl RawHeader {
    fn parse(token: &str) -> Result<Self, VerifyError> {
        let mut parts = token.split('.');
        let (Some(header), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(VerifyError::Malformed);
        };
        let bytes = URL_SAFE_NO_PAD
            .decode(header.trim_end_matches('='))
            .map_err(|_| VerifyError::Malformed)?;
        #[derive(Deserialize)]
        struct Header {
            alg: String,
            #[serde(default)]
            kid: Option<String>,
        }
        let header: Header = serde_json::from_slice(&bytes).map_err(|_| VerifyError::Malformed)?;
        Ok(Self {
            alg: header.alg,
            kid: header.kid,
        })
    }
}

/// A remote JWKS, cached by `kid`. An unknown `kid` triggers a refetch at most once per
/// `refetch_interval`; the whole set is refreshed when older than [`JWKS_TTL`] (Supabase's own
/// clients cache for the same time), keeping the old keys if the refresh fails.
///
/// Fetches are single-flight and never hold the keys' lock: while one request fetches (an
/// unknown `kid` waits for it), every other verification reads the cached keys as usual.
#[derive(Clone)]
pub struct JwksCache(Arc<Jwks>);

struct Jwks {
    url: String,
    http: reqwest::Client,
    refetch_interval: Duration,
    keys: std::sync::RwLock<Cached>,
    /// Held by the one task fetching; others with an unknown `kid` wait here.
    fetching: tokio::sync::Mutex<()>,
}

/// Supabase's edge and clients cache the JWKS for 10 minutes; so do we.
const JWKS_TTL: Duration = Duration::from_secs(600);

#[derive(Default)]
struct Cached {
    keys: HashMap<String, VerifyKey>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
}

impl JwksCache {
    pub fn new(url: String, http: reqwest::Client, refetch_interval: Duration) -> Self {
        Self(Arc::new(Jwks {
            url,
            http,
            refetch_interval,
            keys: std::sync::RwLock::new(Cached::default()),
            fetching: tokio::sync::Mutex::new(()),
        }))
    }

    async fn key(&self, kid: &str) -> Result<VerifyKey, VerifyError> {
        let jwks = &self.0;
        let (known, stale) = {
            let cached = jwks.cached();
            (
                cached.keys.get(kid).cloned(),
                cached.fetched_at.is_none_or(|at| at.elapsed() >= JWKS_TTL),
            )
        };
        match known {
            Some(key) if !stale => return Ok(key),
            // Known but old: answer with it now, and refresh in the background.
            Some(key) => {
                let jwks = self.0.clone();
                tokio::spawn(async move {
                    if let Ok(_fetching) = jwks.fetching.try_lock() {
                        jwks.refetch().await;
                    }
                });
                return Ok(key);
            }
            None => {}
        }
        // Unknown: wait for the one fetch in flight (or make it), then look again.
        {
            let _fetching = jwks.fetching.lock().await;
            if !jwks.cached().keys.contains_key(kid) {
                jwks.refetch().await;
            }
        }
        let cached = jwks.cached();
        match cached.keys.get(kid) {
            Some(key) => Ok(key.clone()),
            None if cached.fetched_at.is_none() => Err(VerifyError::KeysUnavailable(
                "the JWKS could not be fetched".into(),
            )),
            None => Err(VerifyError::UnknownKid(kid.to_owned())),
        }
    }
}

impl Jwks {
    fn cached(&self) -> std::sync::RwLockReadGuard<'_, Cached> {
        crate::util::read(&self.keys)
    }

    /// Fetches the set unless the last attempt was within the refetch interval; keeps the old
    /// keys if it fails. Called with `fetching` held.
    async fn refetch(&self) {
        let may = self
            .cached()
            .last_attempt
            .is_none_or(|at| at.elapsed() >= self.refetch_interval);
        if !may {
            return;
        }
        {
            let mut cached = crate::util::write(&self.keys);
            cached.last_attempt = Some(Instant::now());
        }
        match self.fetch().await {
            Ok(keys) => {
                tracing::info!(
                    url = %crate::util::redact_url(&self.url),
                    keys = keys.len(),
                    "fetched JWKS"
                );
                let mut cached = crate::util::write(&self.keys);
                cached.keys = keys;
                cached.fetched_at = Some(Instant::now());
            }
            Err(error) => tracing::warn!(
                url = %crate::util::redact_url(&self.url),
                %error,
                "cannot fetch JWKS"
            ),
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, VerifyKey>, String> {
        let response = self
            .http
            .get(&self.url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        let set: JwkSet = response.json().await.map_err(|e| e.to_string())?;
        Ok(keys_of(&set))
    }
}

/// The usable keys of a JWKS, by `kid`. Keys without a `kid` or of other types are skipped.
pub fn keys_of(set: &JwkSet) -> HashMap<String, VerifyKey> {
    set.keys
        .iter()
        .filter_map(|jwk| {
            let kid = jwk.common.key_id.clone()?;
            Some((kid, VerifyKey::from_jwk(jwk)?))
        })
        .collect()
}

/// Shared handle to the verifier.
pub type SharedVerifier = Arc<Verifier>;
