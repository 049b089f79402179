//! `wadi admin …` against real databases (SQLite and Postgres) that real servers use: the
//! commands run through `wadi_server::admin::run`, what `main` calls, and their effects are
//! checked through the servers' HTTP API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use common::{Engine, TestServer};
use reqwest::StatusCode;
use serde_json::{Value, json};
use wadi_server::{
    Config,
    admin::{AdminCommand, UsersCommand},
};

const PASSWORD: &str = "correct horse battery";

/// Runs an admin command with `input` on standard input; returns what it printed, or its error.
async fn admin(config: &Config, command: AdminCommand, input: &str) -> Result<String, String> {
    let mut input = std::io::Cursor::new(input.as_bytes().to_vec());
    let mut out = Vec::new();
    let result = wadi_server::admin::run(command, config, &mut input, &mut out).await;
    let printed = String::from_utf8(out).unwrap();
    result
        .map(|()| printed)
        .map_err(|error| format!("{error:#}"))
}

async fn login(server: &TestServer, email: &str, password: &str) -> (StatusCode, Value) {
    let response = server
        .http
        .post(server.url("/auth/v1/token?grant_type=password"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn refresh(server: &TestServer, token: &str) -> StatusCode {
    server
        .http
        .post(server.url("/auth/v1/token?grant_type=refresh_token"))
        .json(&json!({"refresh_token": token}))
        .send()
        .await
        .unwrap()
        .status()
}

fn unique_email() -> String {
    format!("admin-{}@example.com", uuid::Uuid::new_v4())
}

on_both_engines!(
    users_are_listed_shown_reset_revoked_and_deleted,
    a_rotated_signing_key_signs_new_tokens_and_the_old_one_still_verifies,
    backup_and_restore_keep_what_was_there_or_point_to_pg_dump,
);

async fn users_are_listed_shown_reset_revoked_and_deleted(engine: Engine) {
    let server = TestServer::on(engine).await;
    let config = server.db().config();
    let alice = unique_email();
    let bob = unique_email();
    let alice_session = server.sign_up_as(&alice, PASSWORD).await;
    let bob_session = server.sign_up_as(&bob, PASSWORD).await;
    let bob_api = common::Api {
        server: &server,
        token: Some(bob_session.access_token().to_owned()),
    };
    bob_api.new_conversation().await;

    // list (JSON lines): both accounts with their counts, no password hash.
    let listed = admin(
        &config,
        AdminCommand::Users(UsersCommand::List { json: true }),
        "",
    )
    .await
    .unwrap();
    let rows: Vec<Value> = listed
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let row = |email: &str| {
        rows.iter()
            .find(|row| row["email"] == email)
            .unwrap()
            .clone()
    };
    assert_eq!(row(&bob)["conversations"], 1);
    assert_eq!(row(&bob)["sessions"], 1);
    assert_eq!(row(&alice)["conversations"], 0);
    assert!(!listed.contains("argon2"), "{listed}");
    let table = admin(
        &config,
        AdminCommand::Users(UsersCommand::List { json: false }),
        "",
    )
    .await
    .unwrap();
    assert!(
        table.contains(&alice) && table.contains("account(s)"),
        "{table}"
    );

    // show, by email in any case or by id.
    let shown = admin(
        &config,
        AdminCommand::Users(UsersCommand::Show {
            user: alice.to_uppercase(),
        }),
        "",
    )
    .await
    .unwrap();
    assert!(
        shown.contains(&alice_session.user_id().to_string()),
        "{shown}"
    );
    let by_id = admin(
        &config,
        AdminCommand::Users(UsersCommand::Show {
            user: alice_session.user_id().to_string(),
        }),
        "",
    )
    .await
    .unwrap();
    assert!(by_id.contains(&alice), "{by_id}");
    let missing = admin(
        &config,
        AdminCommand::Users(UsersCommand::Show {
            user: "nobody@example.com".into(),
        }),
        "",
    )
    .await
    .unwrap_err();
    assert!(missing.contains("no account"), "{missing}");

    // reset-password from standard input: the new one works, the old one and every session
    // do not.
    let reset = admin(
        &config,
        AdminCommand::Users(UsersCommand::ResetPassword {
            user: alice.clone(),
            password_stdin: true,
        }),
        "a brand new password\n",
    )
    .await
    .unwrap();
    assert!(!reset.contains("a brand new password"), "{reset}");
    assert_eq!(
        login(&server, &alice, PASSWORD).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        login(&server, &alice, "a brand new password").await.0,
        StatusCode::OK
    );
    assert_eq!(
        refresh(&server, alice_session.refresh_token()).await,
        StatusCode::BAD_REQUEST,
        "the reset ended the old session"
    );
    // …or generated and printed once; too short a password is refused.
    let generated = admin(
        &config,
        AdminCommand::Users(UsersCommand::ResetPassword {
            user: alice.clone(),
            password_stdin: false,
        }),
        "",
    )
    .await
    .unwrap();
    let password = generated
        .lines()
        .find_map(|line| line.strip_prefix("new password: "))
        .unwrap();
    assert_eq!(login(&server, &alice, password).await.0, StatusCode::OK);
    let short = admin(
        &config,
        AdminCommand::Users(UsersCommand::ResetPassword {
            user: alice.clone(),
            password_stdin: true,
        }),
        "abc\n",
    )
    .await
    .unwrap_err();
    assert!(short.contains("shorter"), "{short}");
    assert_eq!(login(&server, &alice, password).await.0, StatusCode::OK);

    // revoke-sessions: refresh tokens stop working at once.
    let (_, fresh) = login(&server, &bob, PASSWORD).await;
    let revoked = admin(
        &config,
        AdminCommand::Users(UsersCommand::RevokeSessions { user: bob.clone() }),
        "",
    )
    .await
    .unwrap();
    assert!(revoked.contains("ended 2 session(s)"), "{revoked}");
    for token in [
        bob_session.refresh_token(),
        fresh["refresh_token"].as_str().unwrap(),
    ] {
        assert_eq!(refresh(&server, token).await, StatusCode::BAD_REQUEST);
    }
    // So do their access tokens, well before they expire: on REST and on sockets alike.
    assert_ended(&server, bob_session.access_token()).await;

    // delete: a wrong confirmation deletes nothing; `--yes` deletes the account and its
    // conversations.
    let refused = admin(
        &config,
        AdminCommand::Users(UsersCommand::Delete {
            user: bob.clone(),
            yes: false,
        }),
        "not-bob@example.com\n",
    )
    .await
    .unwrap_err();
    assert!(refused.contains("nothing was deleted"), "{refused}");
    let (status, signed_in) = login(&server, &bob, PASSWORD).await;
    assert_eq!(status, StatusCode::OK);
    let bob_token = signed_in["access_token"].as_str().unwrap();
    let bob_api = common::Api {
        server: &server,
        token: Some(bob_token.to_owned()),
    };
    bob_api.new_conversation().await;
    let confirmed = admin(
        &config,
        AdminCommand::Users(UsersCommand::Delete {
            user: bob.clone(),
            yes: false,
        }),
        // Confirmed in another case than it was typed: emails are found in any case.
        &format!("{}\n", bob.to_uppercase()),
    )
    .await
    .unwrap();
    assert!(confirmed.contains("deleted"), "{confirmed}");
    assert_eq!(
        login(&server, &bob, PASSWORD).await.0,
        StatusCode::BAD_REQUEST
    );
    // A deleted account's token creates nothing more (its data would be out of every admin
    // command's reach).
    assert_ended(&server, bob_token).await;
    let owner = bob_session.user_id();
    assert_eq!(
        server
            .db()
            .count(
                "SELECT COUNT(*) FROM conversations WHERE owner_id = $1",
                owner
            )
            .await,
        0
    );
    let gone = admin(
        &config,
        AdminCommand::Users(UsersCommand::Delete {
            user: bob.clone(),
            yes: true,
        }),
        "",
    )
    .await
    .unwrap_err();
    assert!(gone.contains("no account"), "{gone}");
    server.shutdown().await.unwrap();
}

/// `wadi admin restore <file> [--force]`: what it printed, or its error.
async fn restore(config: &Config, file: &std::path::Path, force: bool) -> Result<String, String> {
    let command = AdminCommand::Restore {
        file: file.to_path_buf(),
        force,
    };
    admin(config, command, "").await
}

/// `token` is refused, though its signature and expiry are fine: its session has ended.
async fn assert_ended(server: &TestServer, token: &str) {
    let api = common::Api {
        server,
        token: Some(token.to_owned()),
    };
    let (status, body) = api.post("/api/conversations", json!({})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["code"], "invalid_token", "{body}");
    let mut socket = common::ws::WsClient::connect(server, "/ws/user").await;
    socket.send(json!({"type": "auth", "token": token})).await;
    let (frames, code) = socket.until_closed().await;
    assert_eq!(code, 1008, "{frames:?}");
    assert_eq!(
        frames.last().unwrap()["code"],
        "invalid_token",
        "{frames:?}"
    );
}

/// The `kid` in an access token's header.
fn kid(token: &str) -> String {
    let header = token.split('.').next().unwrap();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

async fn me(server: &TestServer, token: &str) -> StatusCode {
    server
        .http
        .get(server.url("/api/me"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
}

async fn a_rotated_signing_key_signs_new_tokens_and_the_old_one_still_verifies(engine: Engine) {
    let first = TestServer::on(engine).await;
    let config = first.db().config();
    let email = unique_email();
    let before = first.sign_up_as(&email, PASSWORD).await;
    let old_kid = kid(before.access_token());

    let said = admin(&config, AdminCommand::RotateSigningKey, "")
        .await
        .unwrap();
    assert!(said.contains("new signing key"), "{said}");

    // Another instance starting now signs with the new key…
    let second = TestServer::start_with(first.db().config()).await;
    let (status, after) = login(&second, &email, PASSWORD).await;
    assert_eq!(status, StatusCode::OK);
    let new_token = after["access_token"].as_str().unwrap();
    let new_kid = kid(new_token);
    assert_ne!(new_kid, old_kid);
    // …and verifies tokens of the retired key until they expire.
    assert_eq!(me(&second, before.access_token()).await, StatusCode::OK);
    // The running instance learns the new key from the first token naming it, and publishes
    // both.
    assert_eq!(me(&first, new_token).await, StatusCode::OK);
    let jwks: Value = first.jwks().await;
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|key| key["kid"].as_str().unwrap())
        .collect();
    assert!(
        kids.contains(&old_kid.as_str()) && kids.contains(&new_kid.as_str()),
        "{jwks}"
    );
    // Having re-read the keys, it signs with the new one too.
    let (_, from_first) = login(&first, &email, PASSWORD).await;
    assert_eq!(kid(from_first["access_token"].as_str().unwrap()), new_kid);

    // A token naming a key nobody has is still refused (after one re-read).
    let forged = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","typ":"JWT","kid":"no-such-key"}"#),
        new_token.split_once('.').unwrap().1
    );
    assert_eq!(me(&first, &forged).await, StatusCode::UNAUTHORIZED);

    // With Supabase, there is nothing to rotate here.
    let mut supabase = config.clone();
    supabase.auth.supabase_url = Some("https://project.supabase.co".into());
    let refused = admin(&supabase, AdminCommand::RotateSigningKey, "")
        .await
        .unwrap_err();
    assert!(refused.contains("Supabase"), "{refused}");
    let mut second = second;
    second.stop().await.unwrap();
    first.shutdown().await.unwrap();
}

async fn backup_and_restore_keep_what_was_there_or_point_to_pg_dump(engine: Engine) {
    let mut server = TestServer::on(engine.clone()).await;
    let config = server.db().config();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.db");
    let user = server.user().await;
    let kept = user.new_conversation().await;

    if let Engine::Postgres(_) = engine {
        let pointer = admin(&config, AdminCommand::Backup { file: file.clone() }, "")
            .await
            .unwrap_err();
        assert!(pointer.contains("pg_dump --format=custom"), "{pointer}");
        assert!(!file.exists());
        let pointer = restore(&config, &file, true).await.unwrap_err();
        assert!(pointer.contains("pg_restore"), "{pointer}");
        server.shutdown().await.unwrap();
        return;
    }

    // Online: the server keeps running and writing.
    let said = admin(&config, AdminCommand::Backup { file: file.clone() }, "")
        .await
        .unwrap();
    assert!(said.contains("1 conversation(s)"), "{said}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the backup holds password hashes");
    }
    let again = admin(&config, AdminCommand::Backup { file: file.clone() }, "")
        .await
        .unwrap_err();
    assert!(again.contains("must not exist"), "{again}");
    let later = user.new_conversation().await;
    let token = user.token.clone();

    // Not while a server runs on the database.
    let running = restore(&config, &file, true).await.unwrap_err();
    assert!(running.contains("stop it first"), "{running}");
    server.stop().await.unwrap();

    // Not over data without --force; not from a file that is no WADI database.
    let held = restore(&config, &file, false).await.unwrap_err();
    assert!(held.contains("--force"), "{held}");
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, b"not a database at all").unwrap();
    let refused = restore(&config, &junk, true).await.unwrap_err();
    assert!(refused.contains("cannot be restored"), "{refused}");

    let restored = restore(&config, &file, true).await.unwrap();
    assert!(restored.contains("restored"), "{restored}");
    assert!(config.data_dir.join("wadi.db.before-restore").exists());
    // At once again: the heartbeat the backup copied from the running server does not make
    // the restored file look in use, and the first copy kept aside is not overwritten.
    let again = restore(&config, &file, true).await.unwrap();
    assert!(again.contains("wadi.db.before-restore.2"), "{again}");
    assert!(config.data_dir.join("wadi.db.before-restore").exists());

    // A server on the restored database has what the backup had, and not what came after.
    let db = server.take_db();
    let restarted = TestServer::start_with(db.config()).await;
    let user = common::Api {
        server: &restarted,
        token,
    };
    let (status, _) = user.get(&format!("/api/conversations/{kept}")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = user.get(&format!("/api/conversations/{later}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let mut restarted = restarted;
    restarted.stop().await.unwrap();
    db.drop_database().await;
}

#[tokio::test]
async fn a_data_directory_without_a_database_is_refused_not_filled() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::for_tests(dir.path().join("mistyped"));
    for command in [
        AdminCommand::Users(UsersCommand::List { json: false }),
        AdminCommand::RotateSigningKey,
        AdminCommand::Backup {
            file: dir.path().join("backup.db"),
        },
    ] {
        let refused = admin(&config, command, "").await.unwrap_err();
        assert!(refused.contains("there is no database at"), "{refused}");
    }
    assert!(!config.data_dir.exists(), "nothing was created");

    // A backup into a directory that does not exist says so.
    let server = TestServer::on(Engine::Sqlite).await;
    let missing = dir.path().join("no such dir").join("backup.db");
    let refused = admin(
        &server.db().config(),
        AdminCommand::Backup { file: missing },
        "",
    )
    .await
    .unwrap_err();
    assert!(refused.contains("No such file or directory"), "{refused}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_listing_cut_short_by_its_reader_is_no_failure() {
    let server = TestServer::on(Engine::Sqlite).await;
    server.sign_up().await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wadi"))
        .args(["admin", "users", "list"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("WADI_DATA_DIR", server.db().config().data_dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // `| head -0`: the reader is gone before the first line.
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn healthcheck_passes_against_a_serving_server_and_fails_otherwise() {
    let server = TestServer::start().await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || wadi_server::admin::healthcheck(addr))
        .await
        .unwrap()
        .unwrap();
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let error = tokio::task::spawn_blocking(move || wadi_server::admin::healthcheck(closed))
        .await
        .unwrap()
        .unwrap_err();
    assert!(error.to_string().contains("nothing answers"), "{error}");
    server.shutdown().await.unwrap();
}
