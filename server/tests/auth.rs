//! Identity through real HTTP on a running server: the embedded Supabase-compatible auth service,
//! and the verifier behind every route, on SQLite and on Postgres.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{Json, Router, extract::State, routing::get};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use common::{Engine, TestServer};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::{
    SecretKey,
    elliptic_curve::sec1::ToEncodedPoint,
    pkcs8::{EncodePrivateKey, EncodePublicKey},
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims shaped like the ones Supabase issues.
fn supabase_claims(issuer: &str, user: Uuid, exp: i64) -> Value {
    json!({
        "iss": issuer,
        "sub": user.to_string(),
        "aud": "authenticated",
        "exp": exp,
        "iat": exp - 3600,
        "email": "someone@example.com",
        "phone": "",
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "user_metadata": {},
        "role": "authenticated",
        "aal": "aal1",
        "amr": [{"method": "password", "timestamp": exp - 3600}],
        "session_id": Uuid::new_v4().to_string(),
        "is_anonymous": false,
    })
}

/// A P-256 key the test signs with, and its JWK.
struct EcKey {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

impl EcKey {
    fn generate(kid: &str) -> Self {
        let secret = SecretKey::random(&mut rand_core::OsRng);
        let der = secret.to_pkcs8_der().unwrap();
        let point = secret.public_key().to_encoded_point(false);
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "key_ops": ["verify"],
            "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(point.x().unwrap()),
            "y": URL_SAFE_NO_PAD.encode(point.y().unwrap()),
        });
        Self {
            kid: kid.to_owned(),
            encoding: EncodingKey::from_ec_der(der.as_bytes()),
            jwk,
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

const RSA_PEM: &str = include_str!("fixtures/rsa-test-key.pem");
const RSA_N: &str = include_str!("fixtures/rsa-test-key.n");

fn rsa_jwk(kid: &str) -> Value {
    json!({"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid, "n": RSA_N.trim(), "e": "AQAB"})
}

fn rsa_sign(kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    let key = EncodingKey::from_rsa_pem(RSA_PEM.as_bytes()).unwrap();
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

/// A stand-in for a Supabase project's JWKS endpoint whose keys the test can rotate.
struct FakeJwks {
    url: String,
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
    /// While a test holds its write half, fetches hang (a slow or stuck JWKS endpoint).
    gate: Arc<tokio::sync::RwLock<()>>,
}

#[derive(Clone)]
struct JwksState {
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::RwLock<()>>,
}

impl FakeJwks {
    async fn start(keys: Vec<Value>) -> Self {
        let state = JwksState {
            keys: Arc::new(Mutex::new(keys)),
            fetches: Arc::new(AtomicUsize::new(0)),
            gate: Arc::new(tokio::sync::RwLock::new(())),
        };
        async fn jwks(State(state): State<JwksState>) -> Json<Value> {
            state.fetches.fetch_add(1, Ordering::SeqCst);
            let _open = state.gate.read().await;
            let keys = state.keys.lock().unwrap().clone();
            Json(json!({ "keys": keys }))
        }
        let app = Router::new()
            .route("/auth/v1/.well-known/jwks.json", get(jwks))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            url,
            keys: state.keys,
            fetches: state.fetches,
            gate: state.gate,
        }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

async fn me(server: &TestServer, token: &str) -> reqwest::Response {
    server
        .http
        .get(server.url("/api/me"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn refresh(server: &TestServer, token: &str) -> reqwest::Response {
    server
        .http
        .post(server.url("/auth/v1/token?grant_type=refresh_token"))
        .json(&json!({"refresh_token": token}))
        .send()
        .await
        .unwrap()
}

async fn login(server: &TestServer, email: &str, password: &str) -> reqwest::Response {
    server
        .http
        .post(server.url("/auth/v1/token?grant_type=password"))
        .json(&json!({"email": email, "password": password, "gotrue_meta_security": {}}))
        .send()
        .await
        .unwrap()
}

async fn get_user(server: &TestServer, token: &str) -> reqwest::Response {
    server
        .http
        .get(server.url("/auth/v1/user"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn error_code(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    (status, body["code"].as_str().unwrap_or_default().to_owned())
}

/// Decodes a JWT's header and payload without verifying (test inspection only).
fn jwt_parts(token: &str) -> (Value, Value) {
    let mut parts = token.split('.');
    let header = URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap();
    let payload = URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap();
    (
        serde_json::from_slice(&header).unwrap(),
        serde_json::from_slice(&payload).unwrap(),
    )
}

on_both_engines!(
    signup_login_user_refresh_logout,
    reuse_within_the_window_returns_the_active_token,
    the_parent_of_the_active_token_gets_it_back_and_other_reuse_revokes_the_session,
    concurrent_refreshes_with_one_token_get_the_same_child,
    a_replayed_token_never_forks_the_session_and_logout_ends_it_all,
    rotated_tokens_past_the_retention_are_deleted_at_the_next_refresh,
    wrong_password_and_unknown_email_answer_identically,
    signup_errors_match_supabase,
    login_and_signup_are_rate_limited_per_address,
    limits_key_on_the_address_a_trusted_proxy_saw_and_on_the_account,
    refresh_grants_are_rate_limited_per_address,
    expired_tokens_are_refused_by_the_extractor,
    forged_tokens_are_refused,
    jwks_is_fetched_cached_and_refetched_on_rotation,
    a_jwks_fetch_never_holds_up_tokens_of_known_keys,
    long_passwords_and_large_signup_data_are_refused_before_any_work,
    a_flood_of_logins_is_refused_once_the_hashing_queue_is_full,
    unknown_kids_refetch_at_most_once_per_interval,
    rs256_tokens_from_the_jwks_are_accepted,
    supabase_hs256_tokens_are_accepted,
    the_signing_key_survives_a_restart,
    logout_scopes,
    session_and_jwks_have_supabase_shapes,
);

async fn signup_login_user_refresh_logout(engine: Engine) {
    let server = TestServer::on(engine).await;
    let email = format!("Flow-{}@Example.com", Uuid::new_v4());
    let signed_up = server.sign_up_as(&email, "hunter22").await;
    let user_id = signed_up.user_id();

    // Login (email is case-insensitive) → a new session for the same user.
    let response = login(&server, &email.to_uppercase(), "hunter22").await;
    assert_eq!(response.status(), 200);
    let session: Value = response.json().await.unwrap();
    assert_eq!(session["user"]["id"], user_id.to_string());
    assert_eq!(session["user"]["email"], email.to_lowercase());
    let access = session["access_token"].as_str().unwrap();
    let refresh_1 = session["refresh_token"].as_str().unwrap();

    // /user and the extractor both accept the token.
    let user = get_user(&server, access).await;
    assert_eq!(user.status(), 200);
    assert_eq!(
        user.json::<Value>().await.unwrap()["id"],
        user_id.to_string()
    );
    let me_body: Value = me(&server, access).await.json().await.unwrap();
    assert_eq!(me_body["id"], user_id.to_string());

    // Refresh rotates: a different refresh token, a working access token, same session.
    let response = refresh(&server, refresh_1).await;
    assert_eq!(response.status(), 200);
    let rotated: Value = response.json().await.unwrap();
    let refresh_2 = rotated["refresh_token"].as_str().unwrap();
    assert_ne!(refresh_2, refresh_1);
    let access_2 = rotated["access_token"].as_str().unwrap();
    assert_eq!(me(&server, access_2).await.status(), 200);
    assert_eq!(
        jwt_parts(access).1["session_id"],
        jwt_parts(access_2).1["session_id"]
    );

    // Logout ends the session: refresh fails, /user says the session is gone.
    let response = server
        .http
        .post(server.url("/auth/v1/logout?scope=local"))
        .bearer_auth(access_2)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(
        error_code(refresh(&server, refresh_2).await).await,
        (StatusCode::BAD_REQUEST, "refresh_token_not_found".into())
    );
    assert_eq!(
        error_code(get_user(&server, access_2).await).await,
        (StatusCode::FORBIDDEN, "session_not_found".into())
    );
    // The first session (from signup) is untouched by a local logout.
    assert_eq!(
        refresh(&server, signed_up.refresh_token()).await.status(),
        200
    );
    // Logging out of a session that has ended is refused like any use of it.
    let again = server
        .http
        .post(server.url("/auth/v1/logout?scope=local"))
        .bearer_auth(access_2)
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(again).await,
        (StatusCode::FORBIDDEN, "session_not_found".into())
    );
    // /user without a token, or with one that is not a JWT, says so in Supabase's shape.
    let anonymous = server
        .http
        .get(server.url("/auth/v1/user"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(anonymous).await,
        (StatusCode::UNAUTHORIZED, "no_authorization".into())
    );
    assert_eq!(
        error_code(get_user(&server, "garbage").await).await,
        (StatusCode::FORBIDDEN, "bad_jwt".into())
    );
    server.shutdown().await.unwrap();
}

async fn reuse_within_the_window_returns_the_active_token(engine: Engine) {
    // A retention shorter than the reuse window is raised to it: no token a tab may still
    // present within the window is deleted.
    let server = TestServer::configured(engine, |config| {
        config.auth.refresh_token_retention = std::time::Duration::ZERO;
    })
    .await;
    let session = server.sign_up().await;
    let first = session.refresh_token();
    let second: Value = refresh(&server, first).await.json().await.unwrap();
    let second = second["refresh_token"].as_str().unwrap().to_owned();
    // Another tab still holding the first token refreshes within the 10 s window: it gets the
    // session's active token, not a second branch.
    let again: Value = refresh(&server, first).await.json().await.unwrap();
    assert_eq!(again["refresh_token"], second.as_str());
    let third: Value = refresh(&server, &second).await.json().await.unwrap();
    let third = third["refresh_token"].as_str().unwrap().to_owned();
    // Still within its window, the first token leads to the active one through the chain.
    let later: Value = refresh(&server, first).await.json().await.unwrap();
    assert_eq!(later["refresh_token"], third.as_str());
    assert_eq!(
        session_tokens(&server, &session).await,
        3,
        "no token but the chain's"
    );
    server.shutdown().await.unwrap();
}

/// The refresh tokens stored for the session an access token belongs to.
async fn session_tokens(server: &TestServer, session: &common::Session) -> i64 {
    let claims = session.access_token().split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, claims).unwrap(),
    )
    .unwrap();
    let id = uuid::Uuid::parse_str(claims["session_id"].as_str().unwrap()).unwrap();
    server
        .db()
        .count(
            "SELECT COUNT(*) FROM refresh_tokens WHERE session_id = $1",
            id,
        )
        .await
}

async fn the_parent_of_the_active_token_gets_it_back_and_other_reuse_revokes_the_session(
    engine: Engine,
) {
    let server = TestServer::configured(engine, |config| {
        config.auth.refresh_reuse_interval = std::time::Duration::ZERO;
    })
    .await;
    let session = server.sign_up().await;
    let t1 = session.refresh_token().to_owned();
    let t2: Value = refresh(&server, &t1).await.json().await.unwrap();
    let t2 = t2["refresh_token"].as_str().unwrap().to_owned();
    // t1 is the parent of the active t2: a client that lost the response gets t2 again, with
    // no new token, at any time.
    let retried: Value = refresh(&server, &t1).await.json().await.unwrap();
    assert_eq!(retried["refresh_token"], t2.as_str());
    assert_eq!(session_tokens(&server, &session).await, 2);
    let t3: Value = refresh(&server, &t2).await.json().await.unwrap();
    let t3 = t3["refresh_token"].as_str().unwrap().to_owned();

    // Reusing t1 now (no longer the parent of the active token) is theft: refused, and the
    // whole session is revoked, its tokens gone.
    assert_eq!(
        error_code(refresh(&server, &t1).await).await,
        (StatusCode::BAD_REQUEST, "refresh_token_already_used".into())
    );
    assert_eq!(
        error_code(refresh(&server, &t3).await).await,
        (StatusCode::BAD_REQUEST, "refresh_token_not_found".into())
    );
    assert_eq!(
        error_code(get_user(&server, session.access_token()).await).await,
        (StatusCode::FORBIDDEN, "session_not_found".into())
    );
    assert_eq!(session_tokens(&server, &session).await, 0);
    server.shutdown().await.unwrap();
}

async fn concurrent_refreshes_with_one_token_get_the_same_child(engine: Engine) {
    let server = TestServer::configured(engine, |config| {
        config.auth.refresh_reuse_interval = std::time::Duration::ZERO;
    })
    .await;
    let session = server.sign_up().await;
    let token = session.refresh_token().to_owned();
    let answers = futures_util::future::join_all((0..8).map(|_| async {
        refresh(&server, &token)
            .await
            .json::<Value>()
            .await
            .unwrap()
    }))
    .await;
    let children: std::collections::HashSet<&str> = answers
        .iter()
        .map(|answer| answer["refresh_token"].as_str().unwrap())
        .collect();
    assert_eq!(
        children.len(),
        1,
        "every tab got the same child: {answers:?}"
    );
    assert_eq!(session_tokens(&server, &session).await, 2, "one rotation");
    server.shutdown().await.unwrap();
}

async fn a_replayed_token_never_forks_the_session_and_logout_ends_it_all(engine: Engine) {
    let server = TestServer::on(engine).await;
    let session = server.sign_up().await;
    let r0 = session.refresh_token().to_owned();
    let r1: Value = refresh(&server, &r0).await.json().await.unwrap();
    // Replaying r0 returns r1 itself, not a new r2 of its own.
    let replayed: Value = refresh(&server, &r0).await.json().await.unwrap();
    assert_eq!(replayed["refresh_token"], r1["refresh_token"]);
    let r2: Value = refresh(&server, r1["refresh_token"].as_str().unwrap())
        .await
        .json()
        .await
        .unwrap();
    // Logging out with the newest session ends every token ever issued in it.
    let logout = server
        .http
        .post(server.url("/auth/v1/logout?scope=local"))
        .bearer_auth(r2["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), 204);
    for token in [&r0, r1["refresh_token"].as_str().unwrap()] {
        assert_eq!(
            error_code(refresh(&server, token).await).await,
            (StatusCode::BAD_REQUEST, "refresh_token_not_found".into()),
            "no branch outlives the logout"
        );
    }
    assert_eq!(session_tokens(&server, &session).await, 0, "pruned with it");
    server.shutdown().await.unwrap();
}

async fn rotated_tokens_past_the_retention_are_deleted_at_the_next_refresh(engine: Engine) {
    // With no retention and no reuse window, a rotation keeps only the token it rotates (the
    // parent of the new one) and the new one; with the defaults (a week) a token stays.
    let server = TestServer::configured(engine.clone(), |config| {
        config.auth.refresh_reuse_interval = std::time::Duration::ZERO;
        config.auth.refresh_token_retention = std::time::Duration::ZERO;
    })
    .await;
    let session = server.sign_up().await;
    let mut tokens = vec![session.refresh_token().to_owned()];
    for _ in 0..4 {
        let next: Value = refresh(&server, tokens.last().unwrap())
            .await
            .json()
            .await
            .unwrap();
        tokens.push(next["refresh_token"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        session_tokens(&server, &session).await,
        2,
        "the active token and its parent"
    );
    // The parent still gets the active token back (its holder lost the last answer).
    let retried: Value = refresh(&server, &tokens[3]).await.json().await.unwrap();
    assert_eq!(retried["refresh_token"], tokens[4].as_str());
    // A deleted token is unknown: refused, and the session it belonged to goes on.
    assert_eq!(
        error_code(refresh(&server, &tokens[1]).await).await,
        (StatusCode::BAD_REQUEST, "refresh_token_not_found".into())
    );
    let next = refresh(&server, &tokens[4]).await;
    assert_eq!(next.status(), 200, "the session was not revoked");
    assert_eq!(session_tokens(&server, &session).await, 2);
    server.shutdown().await.unwrap();

    let server = TestServer::on(engine).await;
    let session = server.sign_up().await;
    let mut token = session.refresh_token().to_owned();
    for _ in 0..3 {
        let next: Value = refresh(&server, &token).await.json().await.unwrap();
        token = next["refresh_token"].as_str().unwrap().to_owned();
    }
    assert_eq!(
        session_tokens(&server, &session).await,
        4,
        "kept within the default retention"
    );
    server.shutdown().await.unwrap();
}

async fn long_passwords_and_large_signup_data_are_refused_before_any_work(engine: Engine) {
    let server = TestServer::on(engine).await;
    let email = format!("long-{}@example.com", Uuid::new_v4());
    server.sign_up_as(&email, "correct horse battery").await;
    // 100 KiB of password at sign-in is refused as such, never hashed (a hash would answer
    // `invalid_credentials`).
    let huge = "p".repeat(100 * 1024);
    assert_eq!(
        error_code(login(&server, &email, &huge).await).await,
        (StatusCode::BAD_REQUEST, "validation_failed".into())
    );
    assert_eq!(
        error_code(login(&server, &email, &"p".repeat(73)).await).await,
        (StatusCode::BAD_REQUEST, "validation_failed".into())
    );
    // Signup `data` is copied into every token: 16 KiB at most.
    let signup = |data: Value| {
        server
            .http
            .post(server.url("/auth/v1/signup"))
            .json(&json!({
                "email": format!("data-{}@example.com", Uuid::new_v4()),
                "password": "correct horse battery",
                "data": data,
            }))
            .send()
    };
    let response = signup(json!({"bio": "x".repeat(17 * 1024)})).await.unwrap();
    assert_eq!(
        error_code(response).await,
        (StatusCode::BAD_REQUEST, "validation_failed".into())
    );
    let response = signup(json!({"bio": "x".repeat(8 * 1024)})).await.unwrap();
    assert_eq!(response.status(), 200);
    server.shutdown().await.unwrap();
}

async fn a_flood_of_logins_is_refused_once_the_hashing_queue_is_full(engine: Engine) {
    let server = TestServer::configured(engine, |config| {
        config.auth.auth_rate_burst = 10_000;
        config.auth.login_rate_burst = 10_000;
    })
    .await;
    let email = format!("flood-{}@example.com", Uuid::new_v4());
    server.sign_up_as(&email, "correct horse battery").await;
    let statuses = futures_util::future::join_all((0..120).map(|_| async {
        login(&server, &email, "correct horse battery")
            .await
            .status()
    }))
    .await;
    let refused = statuses
        .iter()
        .filter(|status| **status == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert!(refused > 0, "a full queue answers 429: {statuses:?}");
    assert!(
        statuses
            .iter()
            .all(|status| *status == StatusCode::OK || *status == StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    server.shutdown().await.unwrap();
}

async fn wrong_password_and_unknown_email_answer_identically(engine: Engine) {
    let server = TestServer::on(engine).await;
    let email = format!("known-{}@example.com", Uuid::new_v4());
    server.sign_up_as(&email, "the-right-one").await;
    let wrong_password = login(&server, &email, "the-wrong-one").await;
    let unknown_email = login(&server, "nobody-here@example.com", "the-wrong-one").await;
    assert_eq!(wrong_password.status(), StatusCode::BAD_REQUEST);
    assert_eq!(unknown_email.status(), wrong_password.status());
    let mut a: Value = wrong_password.json().await.unwrap();
    let mut b: Value = unknown_email.json().await.unwrap();
    // Identical but for the request's own id.
    assert_ne!(a["request_id"], b["request_id"]);
    a.as_object_mut().unwrap().remove("request_id");
    b.as_object_mut().unwrap().remove("request_id");
    assert_eq!(a, b);
    assert_eq!(a["code"], "invalid_credentials");
    assert_eq!(a["message"], "Invalid login credentials");
    server.shutdown().await.unwrap();
}

async fn signup_errors_match_supabase(engine: Engine) {
    let server = TestServer::on(engine).await;
    let post = |body: Value| {
        server
            .http
            .post(server.url("/auth/v1/signup"))
            .header("X-Supabase-Api-Version", "2024-01-01")
            .json(&body)
            .send()
    };
    let email = format!("dup-{}@example.com", Uuid::new_v4());
    // supabase-js sends extra and null fields: they are ignored.
    let first = post(
        json!({"email": email, "password": "hunter22", "data": {"name": "D"},
        "gotrue_meta_security": {}, "code_challenge": null, "code_challenge_method": null}),
    )
    .await
    .unwrap();
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["user"]["user_metadata"]["name"], "D");

    let cases = [
        (
            json!({"email": email, "password": "hunter22"}),
            422,
            "user_already_exists",
        ),
        (
            json!({"email": email.to_uppercase(), "password": "hunter22"}),
            422,
            "user_already_exists",
        ),
        (
            json!({"email": "new@example.com", "password": "abc"}),
            422,
            "weak_password",
        ),
        (
            json!({"email": "new@example.com", "password": "x".repeat(73)}),
            400,
            "validation_failed",
        ),
        (
            json!({"email": "new@example.com", "password": ""}),
            400,
            "validation_failed",
        ),
        (
            json!({"email": "new@example.com"}),
            400,
            "validation_failed",
        ),
        (
            json!({"email": "not-an-email", "password": "hunter22"}),
            400,
            "validation_failed",
        ),
        (
            json!({"password": "hunter22"}),
            422,
            "anonymous_provider_disabled",
        ),
        (
            json!({"phone": "+15550001", "password": "hunter22"}),
            400,
            "phone_provider_disabled",
        ),
        (
            json!({"email": "a@example.com", "phone": "+15550001", "password": "hunter22"}),
            400,
            "validation_failed",
        ),
    ];
    for (body, status, code) in cases {
        let response = post(body.clone()).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{body}");
        assert_eq!(response.headers()["x-supabase-api-version"], "2024-01-01");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["code"], code, "{body}");
        assert_eq!(error["error_code"], code, "{body}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        if code == "weak_password" {
            assert_eq!(error["weak_password"]["reasons"], json!(["length"]));
        }
    }

    // Bad JSON and a body over the limit, on the signup and on the token grant.
    for path in ["/auth/v1/signup", "/auth/v1/token?grant_type=password"] {
        let malformed = server
            .http
            .post(server.url(path))
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(malformed).await,
            (StatusCode::BAD_REQUEST, "bad_json".into()),
            "{path}"
        );
        // Not UTF-8, in a field nothing reads: no account is made, no password tried.
        let not_utf8 = server
            .http
            .post(server.url(path))
            .header("content-type", "application/json")
            .body(&b"{\"email\": \"u8@example.com\", \"password\": \"hunter22!\", \"x\": \"\xff\"}"[..])
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(not_utf8).await,
            (StatusCode::BAD_REQUEST, "bad_json".into()),
            "{path}"
        );
        let (status, body) = common::declared_oversized_post(&server, None, path).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{path}");
        assert_eq!(body["code"], "request_entity_too_large", "{path}");
    }
    let unsupported = server
        .http
        .post(server.url("/auth/v1/token?grant_type=magic"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(unsupported).await,
        (StatusCode::BAD_REQUEST, "invalid_credentials".into())
    );
    // A query string that does not parse is Supabase's JSON error too, not axum's plain text.
    for path in [
        "/auth/v1/token?grant_type=password&grant_type=refresh_token",
        "/auth/v1/logout?scope=local&scope=global",
    ] {
        let response = server
            .http
            .post(server.url(path))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(response).await,
            (StatusCode::BAD_REQUEST, "validation_failed".into()),
            "{path}"
        );
    }
    server.shutdown().await.unwrap();
}

async fn login_and_signup_are_rate_limited_per_address(engine: Engine) {
    let server = TestServer::configured(engine, |config| {
        config.auth.auth_rate_burst = 3;
        config.auth.auth_rate_per_minute = 0.0;
    })
    .await;
    let session = server.sign_up().await; // 1
    let email = session.0["user"]["email"].as_str().unwrap().to_owned();
    assert_eq!(login(&server, &email, "wrong").await.status(), 400); // 2
    assert_eq!(
        login(&server, &email, "correct horse battery")
            .await
            .status(),
        200
    ); // 3
    assert_eq!(
        error_code(login(&server, &email, "correct horse battery").await).await,
        (
            StatusCode::TOO_MANY_REQUESTS,
            "over_request_rate_limit".into()
        )
    );
    // Refreshing has a limit of its own: logins used up do not stop a session's refresh.
    assert_eq!(
        refresh(&server, session.refresh_token()).await.status(),
        200
    );
    server.shutdown().await.unwrap();
}

/// A login from `client` as a proxy in front of the server would forward it: the client sent
/// `spoofed` as its own `X-Forwarded-For`, and the proxy appended the address it saw.
async fn login_via_proxy(
    server: &TestServer,
    email: &str,
    spoofed: &str,
    client: &str,
) -> reqwest::Response {
    server
        .http
        .post(server.url("/auth/v1/token?grant_type=password"))
        .header("X-Forwarded-For", format!("{spoofed}, {client}"))
        .json(&json!({"email": email, "password": "wrong password"}))
        .send()
        .await
        .unwrap()
}

async fn limits_key_on_the_address_a_trusted_proxy_saw_and_on_the_account(engine: Engine) {
    let server = TestServer::configured(engine, |config| {
        config.proxies.trusted_proxies = 1;
        config.auth.auth_rate_burst = 2;
        config.auth.auth_rate_per_minute = 0.0;
        config.auth.login_rate_burst = 5;
        config.auth.login_rate_per_minute = 0.0;
    })
    .await;
    let email = format!("target-{}@example.com", Uuid::new_v4());
    // A client that makes up a new first X-Forwarded-For entry each time is still one client.
    for spoofed in ["1.1.1.1", "2.2.2.2"] {
        assert_eq!(
            login_via_proxy(&server, &email, spoofed, "203.0.113.5")
                .await
                .status(),
            400
        );
    }
    assert_eq!(
        error_code(login_via_proxy(&server, &email, "3.3.3.3", "203.0.113.5").await).await,
        (
            StatusCode::TOO_MANY_REQUESTS,
            "over_request_rate_limit".into()
        )
    );
    // Another client behind the same proxy is not locked out by it.
    assert_eq!(
        login_via_proxy(&server, &email, "3.3.3.3", "198.51.100.7")
            .await
            .status(),
        400
    );
    // IPv6 addresses of one /64 are one client.
    for host in ["2001:db8:5:6::1", "2001:db8:5:6::2"] {
        assert_eq!(
            login_via_proxy(&server, &email, "x", host).await.status(),
            400,
            "{host}"
        );
    }
    assert_eq!(
        login_via_proxy(&server, &email, "x", "2001:db8:5:6:ffff::3")
            .await
            .status(),
        429,
        "the same /64"
    );
    // But one account is guessed at from many addresses: it has its own limit (5 so far).
    assert_eq!(
        error_code(login_via_proxy(&server, &email, "x", "192.0.2.99").await).await,
        (
            StatusCode::TOO_MANY_REQUESTS,
            "over_request_rate_limit".into()
        )
    );
    let other = format!("other-{}@example.com", Uuid::new_v4());
    assert_eq!(
        login_via_proxy(&server, &other, "x", "192.0.2.98")
            .await
            .status(),
        400,
        "another account is not affected"
    );
    server.shutdown().await.unwrap();
}

async fn refresh_grants_are_rate_limited_per_address(engine: Engine) {
    let server = TestServer::configured(engine, |config| {
        config.auth.refresh_rate_burst = 2;
        config.auth.refresh_rate_per_minute = 0.0;
    })
    .await;
    let session = server.sign_up().await;
    let token = session.refresh_token().to_owned();
    let next: Value = refresh(&server, &token).await.json().await.unwrap();
    let next = next["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!(refresh(&server, &next).await.status(), 200);
    assert_eq!(
        error_code(refresh(&server, &next).await).await,
        (
            StatusCode::TOO_MANY_REQUESTS,
            "over_request_rate_limit".into()
        )
    );
    server.shutdown().await.unwrap();
}

async fn expired_tokens_are_refused_by_the_extractor(engine: Engine) {
    let secret = "a-shared-secret-of-at-least-32-characters!";
    let server = TestServer::configured(engine, |config| {
        config.auth.supabase_jwt_secret = Some(secret.into());
    })
    .await;
    let key = EncodingKey::from_secret(secret.as_bytes());
    let user = Uuid::new_v4();
    let fresh = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &supabase_claims("wadi", user, now() + 600),
        &key,
    )
    .unwrap();
    assert_eq!(me(&server, &fresh).await.status(), 200);
    // Past the 10 s leeway.
    let expired = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &supabase_claims("wadi", user, now() - 60),
        &key,
    )
    .unwrap();
    assert_eq!(
        error_code(me(&server, &expired).await).await,
        (StatusCode::UNAUTHORIZED, "token_expired".into())
    );
    server.shutdown().await.unwrap();
}

async fn forged_tokens_are_refused(engine: Engine) {
    let server = TestServer::on(engine).await;
    let session = server.sign_up().await;
    let token = session.access_token();
    let (header, claims) = jwt_parts(token);
    let kid = header["kid"].as_str().unwrap();
    assert_eq!(me(&server, token).await.status(), 200);

    let unauthorized = |status: StatusCode| assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Payload changed after signing.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut tampered_claims = claims.clone();
    tampered_claims["sub"] = json!(Uuid::new_v4().to_string());
    parts[1] = URL_SAFE_NO_PAD.encode(tampered_claims.to_string());
    unauthorized(me(&server, &parts.join(".")).await.status());

    // alg: none, unsigned.
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    unauthorized(me(&server, &none).await.status());

    // Signed by a key the server does not know, claiming the server's kid, and an unknown kid.
    let stranger = EcKey::generate(kid);
    unauthorized(me(&server, &stranger.sign(&claims)).await.status());
    let unknown = EcKey::generate("not-a-known-kid");
    unauthorized(me(&server, &unknown.sign(&claims)).await.status());

    // HS256 "signed" with the server's public key (algorithm confusion).
    let jwks: Value = server.jwks().await;
    let public_jwk = &jwks["keys"][0];
    let confusion_secret = public_jwk.to_string();
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some(kid.to_owned());
    let confused = jsonwebtoken::encode(
        &hs_header,
        &claims,
        &EncodingKey::from_secret(confusion_secret.as_bytes()),
    )
    .unwrap();
    unauthorized(me(&server, &confused).await.status());

    // Wrong audience and wrong issuer, signed with a trusted key (via the HS256 secret path a
    // second server accepts), so only the claim is wrong.
    let secret = "another-shared-secret-of-32-characters!!";
    let hs_server = TestServer::configured(Engine::Sqlite, |config| {
        config.auth.supabase_jwt_secret = Some(secret.into());
    })
    .await;
    let hs_key = EncodingKey::from_secret(secret.as_bytes());
    let sign_hs = |claims: &Value| {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &hs_key).unwrap()
    };
    let good = supabase_claims("wadi", Uuid::new_v4(), now() + 600);
    assert_eq!(me(&hs_server, &sign_hs(&good)).await.status(), 200);
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = json!("anon");
    unauthorized(me(&hs_server, &sign_hs(&wrong_aud)).await.status());
    let mut wrong_iss = good.clone();
    wrong_iss["iss"] = json!("https://evil.example.com/auth/v1");
    unauthorized(me(&hs_server, &sign_hs(&wrong_iss)).await.status());
    let mut service_role = good.clone();
    service_role["role"] = json!("service_role");
    unauthorized(me(&hs_server, &sign_hs(&service_role)).await.status());
    // No issuer at all, and one that is not valid yet.
    let mut no_issuer = good.clone();
    no_issuer.as_object_mut().unwrap().remove("iss");
    unauthorized(me(&hs_server, &sign_hs(&no_issuer)).await.status());
    let mut not_yet = good.clone();
    not_yet["nbf"] = json!(now() + 600);
    unauthorized(me(&hs_server, &sign_hs(&not_yet)).await.status());
    // The public-key confusion token fails there too (its HMAC secret is not the configured one).
    unauthorized(me(&hs_server, &confused).await.status());

    // Not a JWT at all, and no header.
    unauthorized(me(&server, "garbage").await.status());
    let anonymous = server.http.get(server.url("/api/me")).send().await.unwrap();
    assert_eq!(
        error_code(anonymous).await,
        (StatusCode::UNAUTHORIZED, "invalid_token".into())
    );
    hs_server.shutdown().await.unwrap();
    server.shutdown().await.unwrap();
}

/// A server in Supabase mode trusting the fake project at `jwks.url`.
async fn supabase_server(
    engine: Engine,
    jwks: &FakeJwks,
    refetch: std::time::Duration,
) -> TestServer {
    let url = jwks.url.clone();
    TestServer::configured(engine, move |config| {
        config.auth.supabase_url = Some(url);
        config.auth.jwks_refetch_interval = refetch;
    })
    .await
}

async fn a_jwks_fetch_never_holds_up_tokens_of_known_keys(engine: Engine) {
    let key_a = EcKey::generate("key-a");
    let key_b = EcKey::generate("key-b");
    let jwks = FakeJwks::start(vec![key_a.jwk.clone()]).await;
    let server = supabase_server(engine, &jwks, std::time::Duration::ZERO).await;
    let issuer = format!("{}/auth/v1", jwks.url);
    let claims = supabase_claims(&issuer, Uuid::new_v4(), now() + 600);
    assert_eq!(me(&server, &key_a.sign(&claims)).await.status(), 200);

    // The JWKS endpoint hangs; a token with a new kid waits for it…
    let stuck = jwks.gate.write().await;
    jwks.keys.lock().unwrap().push(key_b.jwk.clone());
    let waiting = tokio::spawn({
        let url = server.url("/api/me");
        let token = key_b.sign(&claims);
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    while jwks.fetches() < 2 {
        tokio::task::yield_now().await;
    }
    // …while tokens of the known key go through as usual.
    for _ in 0..3 {
        let known = tokio::time::timeout(common::TIMEOUT, me(&server, &key_a.sign(&claims)))
            .await
            .expect("a known key waited for the JWKS fetch");
        assert_eq!(known.status(), 200);
    }
    drop(stuck);
    assert_eq!(waiting.await.unwrap(), 200, "the new key, once fetched");
    server.shutdown().await.unwrap();
}

async fn jwks_is_fetched_cached_and_refetched_on_rotation(engine: Engine) {
    let key_a = EcKey::generate("key-a");
    let jwks = FakeJwks::start(vec![key_a.jwk.clone()]).await;
    let server = supabase_server(engine, &jwks, std::time::Duration::ZERO).await;
    let issuer = format!("{}/auth/v1", jwks.url);
    let claims = supabase_claims(&issuer, Uuid::new_v4(), now() + 600);

    assert_eq!(me(&server, &key_a.sign(&claims)).await.status(), 200);
    assert_eq!(jwks.fetches(), 1);
    assert_eq!(me(&server, &key_a.sign(&claims)).await.status(), 200);
    assert_eq!(jwks.fetches(), 1, "served from the cache");

    // The project rotates to key B: a token with the new kid triggers a refetch.
    let key_b = EcKey::generate("key-b");
    jwks.keys.lock().unwrap().push(key_b.jwk.clone());
    assert_eq!(me(&server, &key_b.sign(&claims)).await.status(), 200);
    assert_eq!(jwks.fetches(), 2);
    assert_eq!(me(&server, &key_a.sign(&claims)).await.status(), 200);
    assert_eq!(jwks.fetches(), 2);

    // Key A is revoked: tokens still cached for it... until a refetch drops it.
    jwks.keys.lock().unwrap().remove(0);
    let key_c = EcKey::generate("key-c");
    jwks.keys.lock().unwrap().push(key_c.jwk.clone());
    assert_eq!(me(&server, &key_c.sign(&claims)).await.status(), 200);
    assert_eq!(jwks.fetches(), 3);
    assert_eq!(me(&server, &key_a.sign(&claims)).await.status(), 401);
    server.shutdown().await.unwrap();
}

async fn unknown_kids_refetch_at_most_once_per_interval(engine: Engine) {
    let key = EcKey::generate("only-key");
    let jwks = FakeJwks::start(vec![key.jwk.clone()]).await;
    let server = supabase_server(engine, &jwks, std::time::Duration::from_secs(60)).await;
    let claims = supabase_claims(
        &format!("{}/auth/v1", jwks.url),
        Uuid::new_v4(),
        now() + 600,
    );
    assert_eq!(me(&server, &key.sign(&claims)).await.status(), 200);
    assert_eq!(jwks.fetches(), 1);
    for i in 0..5 {
        let stranger = EcKey::generate(&format!("unknown-{i}"));
        assert_eq!(me(&server, &stranger.sign(&claims)).await.status(), 401);
    }
    assert_eq!(
        jwks.fetches(),
        1,
        "unknown kids within the interval do not refetch"
    );
    server.shutdown().await.unwrap();
}

async fn rs256_tokens_from_the_jwks_are_accepted(engine: Engine) {
    let jwks = FakeJwks::start(vec![rsa_jwk("rsa-1")]).await;
    let server = supabase_server(engine, &jwks, std::time::Duration::ZERO).await;
    let user = Uuid::new_v4();
    let claims = supabase_claims(&format!("{}/auth/v1", jwks.url), user, now() + 600);
    let response = me(&server, &rsa_sign("rsa-1", &claims)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap()["id"],
        user.to_string()
    );
    // An ES256 header naming the RSA key is refused: the key decides the algorithm.
    let impostor = EcKey::generate("rsa-1");
    assert_eq!(me(&server, &impostor.sign(&claims)).await.status(), 401);
    server.shutdown().await.unwrap();
}

async fn supabase_hs256_tokens_are_accepted(engine: Engine) {
    // As a Supabase project with the legacy JWT secret mints them.
    let secret = "super-secret-jwt-token-with-at-least-32-characters-long";
    let jwks = FakeJwks::start(vec![]).await;
    let url = jwks.url.clone();
    let server = TestServer::configured(engine, |config| {
        config.auth.supabase_url = Some(url);
        config.auth.supabase_jwt_secret = Some(secret.into());
    })
    .await;
    let user = Uuid::new_v4();
    let claims = supabase_claims(&format!("{}/auth/v1", jwks.url), user, now() + 3600);
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let response = me(&server, &token).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["id"], user.to_string());
    assert_eq!(body["email"], "someone@example.com");
    // No embedded auth service in Supabase mode.
    let signup = server
        .http
        .post(server.url("/auth/v1/signup"))
        .json(&json!({"email": "a@example.com", "password": "hunter22"}))
        .send()
        .await
        .unwrap();
    assert_ne!(signup.status(), 200);
    server.shutdown().await.unwrap();
}

async fn the_signing_key_survives_a_restart(engine: Engine) {
    let mut first = TestServer::on(engine).await;
    let session = first.sign_up().await;
    let jwks_before: Value = first.jwks().await;
    first.stop().await.unwrap();
    let db = first.take_db();

    let second = TestServer::start_with(db.config()).await;
    let jwks_after: Value = second.jwks().await;
    assert_eq!(jwks_before, jwks_after);
    assert_eq!(me(&second, session.access_token()).await.status(), 200);
    assert_eq!(
        refresh(&second, session.refresh_token()).await.status(),
        200
    );
    second.shutdown().await.unwrap();
    db.drop_database().await;
}

async fn logout_scopes(engine: Engine) {
    let server = TestServer::on(engine).await;
    let email = format!("scopes-{}@example.com", Uuid::new_v4());
    let a = server.sign_up_as(&email, "hunter22").await;
    let login_session = |_: ()| async {
        let response = login(&server, &email, "hunter22").await;
        assert_eq!(response.status(), 200);
        common::Session(response.json().await.unwrap())
    };
    let b = login_session(()).await;
    let c = login_session(()).await;
    let logout = |token: String, scope: &'static str| {
        server
            .http
            .post(server.url(&format!("/auth/v1/logout?scope={scope}")))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(
        error_code(logout(a.access_token().into(), "everything").await.unwrap()).await,
        (StatusCode::BAD_REQUEST, "validation_failed".into())
    );
    // `others` from A ends B and C, keeps A.
    assert_eq!(
        logout(a.access_token().into(), "others")
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(get_user(&server, a.access_token()).await.status(), 200);
    assert_eq!(get_user(&server, b.access_token()).await.status(), 403);
    assert_eq!(get_user(&server, c.access_token()).await.status(), 403);
    // The API refuses an ended session's access token at once, not only at its `exp`.
    let me = |token: &str| {
        server
            .http
            .get(server.url("/api/me"))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(me(a.access_token()).await.unwrap().status(), 200);
    assert_eq!(
        error_code(me(b.access_token()).await.unwrap()).await,
        (StatusCode::UNAUTHORIZED, "invalid_token".into())
    );
    // `global` (the default) ends A too.
    let d = login_session(()).await;
    let response = server
        .http
        .post(server.url("/auth/v1/logout"))
        .bearer_auth(d.access_token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(get_user(&server, a.access_token()).await.status(), 403);
    assert_eq!(refresh(&server, a.refresh_token()).await.status(), 400);
    // Without a token: 401 no_authorization.
    let response = server
        .http
        .post(server.url("/auth/v1/logout"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(response).await,
        (StatusCode::UNAUTHORIZED, "no_authorization".into())
    );
    server.shutdown().await.unwrap();
}

async fn session_and_jwks_have_supabase_shapes(engine: Engine) {
    let server = TestServer::on(engine).await;
    let session = server.sign_up().await.0;
    assert_eq!(session["token_type"], "bearer");
    let expires_in = session["expires_in"].as_i64().unwrap();
    assert!((3590..=3600).contains(&expires_in), "{expires_in}");
    assert!((session["expires_at"].as_i64().unwrap() - now() - 3600).abs() <= 5);
    assert!(session["refresh_token"].as_str().unwrap().len() >= 22);
    let user = &session["user"];
    for field in [
        "id",
        "aud",
        "role",
        "email",
        "phone",
        "app_metadata",
        "user_metadata",
        "identities",
        "created_at",
        "updated_at",
        "is_anonymous",
        "email_confirmed_at",
        "last_sign_in_at",
    ] {
        assert!(!user[field].is_null(), "user.{field} missing");
    }
    assert_eq!(user["aud"], "authenticated");
    assert_eq!(user["identities"][0]["provider"], "email");

    let (header, claims) = jwt_parts(session["access_token"].as_str().unwrap());
    assert_eq!(header["alg"], "ES256");
    assert!(header["kid"].is_string());
    for claim in [
        "iss",
        "sub",
        "aud",
        "exp",
        "iat",
        "email",
        "role",
        "aal",
        "amr",
        "session_id",
        "is_anonymous",
        "app_metadata",
        "user_metadata",
    ] {
        assert!(!claims[claim].is_null(), "claim {claim} missing");
    }
    assert_eq!(claims["aud"], "authenticated");
    assert_eq!(claims["role"], "authenticated");
    assert_eq!(claims["amr"][0]["method"], "password");
    assert_eq!(claims["exp"], session["expires_at"]);

    let response = server
        .http
        .get(server.url("/auth/v1/.well-known/jwks.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["cache-control"], "public, max-age=600");
    let jwks: Value = response.json().await.unwrap();
    let key = &jwks["keys"][0];
    assert_eq!(key["kid"], header["kid"]);
    assert_eq!(key["kty"], "EC");
    assert_eq!(key["crv"], "P-256");
    assert_eq!(key["alg"], "ES256");
    assert_eq!(key["use"], "sig");
    assert_eq!(key["key_ops"], json!(["verify"]));
    assert!(key.get("d").is_none(), "never the private part");

    // A browser on another origin can read the API version header.
    let preflight = server
        .http
        .request(reqwest::Method::OPTIONS, server.url("/auth/v1/token"))
        .header("Origin", "http://localhost:5173")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "apikey,x-client-info,content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    let response = server
        .http
        .get(server.url("/auth/v1/.well-known/jwks.json"))
        .header("Origin", "http://localhost:5173")
        .send()
        .await
        .unwrap();
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(exposed.contains("x-supabase-api-version"), "{exposed}");
    server.shutdown().await.unwrap();
}

/// The classic algorithm-confusion attack uses a PEM public key as the HMAC secret.
#[tokio::test]
async fn hs256_signed_with_the_pem_public_key_is_refused() {
    let server = TestServer::start().await;
    let session = server.sign_up().await;
    let (header, claims) = jwt_parts(session.access_token());
    let other = SecretKey::random(&mut rand_core::OsRng);
    let pem = other
        .public_key()
        .to_public_key_pem(p256::pkcs8::LineEnding::LF)
        .unwrap();
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = header["kid"].as_str().map(str::to_owned);
    let token =
        jsonwebtoken::encode(&hs, &claims, &EncodingKey::from_secret(pem.as_bytes())).unwrap();
    assert_eq!(me(&server, &token).await.status(), StatusCode::UNAUTHORIZED);
    server.shutdown().await.unwrap();
}
