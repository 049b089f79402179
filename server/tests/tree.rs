//! Conversations as trees, over REST on both engines: regenerate and edit add versions beside
//! the earlier ones (nothing is deleted), the path shown and the history the model sees follow
//! the branch, and the old guarantees (idempotent sends, one run at a time) still hold.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{
    Api, Engine, TIMEOUT, TestServer,
    upstream::{FakeUpstream, Request, Script, Step},
};
use reqwest::StatusCode;
use serde_json::{Value, json};

on_both_engines!(
    regenerate_and_edit_keep_every_version_and_the_model_sees_only_its_branch,
    branches_are_paged_and_bad_placements_are_refused,
    conversations_export_as_markdown_and_json,
);

async fn server(engine: Engine) -> (FakeUpstream, TestServer) {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = TestServer::configured(engine, |config| upstream.configure(config)).await;
    (upstream, server)
}

/// Answers the model request with `text`, then waits until the run is saved.
async fn answer(api: &Api<'_>, request: Arc<Request>, run: &str, text: &str) {
    request.token(text);
    request.send(Step::Finish);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let (_, run) = api.get(&format!("/api/runs/{run}")).await;
        if run["status"] != "running" {
            assert_eq!(run["status"], "completed", "{run}");
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run never ended"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn send(api: &Api<'_>, conversation: &str, body: Value) -> (StatusCode, Value) {
    api.post(&format!("/api/conversations/{conversation}/messages"), body)
        .await
}

/// The shown path (through `through` when given) as (role, content), and the rows themselves.
async fn path(api: &Api<'_>, conversation: &str, through: Option<&str>) -> Vec<Value> {
    let query = through.map_or_else(String::new, |id| format!("?through={id}"));
    let (status, page) = api
        .get(&format!("/api/conversations/{conversation}/path{query}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.get("olderCursor").is_none(), "{page}");
    page["items"].as_array().unwrap().clone()
}

fn contents(rows: &[Value]) -> Vec<&str> {
    rows.iter()
        .map(|row| row["content"].as_str().unwrap())
        .collect()
}

fn id(row: &Value) -> &str {
    row["id"].as_str().unwrap()
}

fn history(request: &Request) -> Vec<String> {
    request
        .messages()
        .into_iter()
        .map(|(_, content)| content)
        .collect()
}

async fn regenerate_and_edit_keep_every_version_and_the_model_sees_only_its_branch(engine: Engine) {
    let (upstream, server) = server(engine).await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;

    let (status, sent) = send(&api, &conversation, json!({"content": "q1"})).await;
    assert_eq!(status, StatusCode::CREATED, "{sent}");
    let q1 = sent["message"]["id"].as_str().unwrap().to_owned();
    assert!(
        sent["message"].get("parentId").is_none(),
        "the first message has no parent"
    );
    let request = upstream.next_request().await;
    assert_eq!(history(&request), ["q1"]);
    answer(&api, request, sent["run"]["id"].as_str().unwrap(), "a1").await;

    let (_, sent) = send(&api, &conversation, json!({"content": "q2"})).await;
    let q2 = sent["message"]["id"].as_str().unwrap().to_owned();
    let request = upstream.next_request().await;
    assert_eq!(history(&request), ["q1", "a1", "q2"]);
    answer(&api, request, sent["run"]["id"].as_str().unwrap(), "a2").await;
    let shown = path(&api, &conversation, None).await;
    assert_eq!(contents(&shown), ["q1", "a1", "q2", "a2"]);
    assert_eq!(shown[2]["parentId"], shown[1]["id"]);
    assert!(shown.iter().all(|row| row.get("siblings").is_none()));
    let a2 = id(&shown[3]).to_owned();
    assert_eq!(shown[3]["model"], "fake-model");

    // Regenerate: a new answer to q2; the model sees q2's branch without the old answer.
    let (status, regenerated) = api
        .post(
            &format!("/api/conversations/{conversation}/messages/{q2}/regenerate"),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{regenerated}");
    assert_eq!(regenerated["message"]["id"], q2.as_str());
    assert_eq!(regenerated["run"]["messageId"], q2.as_str());
    let request = upstream.next_request().await;
    assert_eq!(history(&request), ["q1", "a1", "q2"]);
    answer(
        &api,
        request,
        regenerated["run"]["id"].as_str().unwrap(),
        "a2 again",
    )
    .await;
    let shown = path(&api, &conversation, None).await;
    assert_eq!(contents(&shown), ["q1", "a1", "q2", "a2 again"]);
    let a2_again = id(&shown[3]).to_owned();
    assert_eq!(shown[3]["siblings"], json!([a2, a2_again]));
    // Flip back: the path through the first answer.
    let first = path(&api, &conversation, Some(&a2)).await;
    assert_eq!(contents(&first), ["q1", "a1", "q2", "a2"]);
    assert_eq!(first[3]["siblings"], json!([a2, a2_again]));

    // Edit q2: a sibling of it; the model sees the edited question, not the old one.
    let (status, edited) = send(
        &api,
        &conversation,
        json!({"content": "q2, edited", "editOf": q2, "clientMessageId": "edit-1"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{edited}");
    assert_eq!(edited["message"]["parentId"], shown[1]["id"]);
    let request = upstream.next_request().await;
    assert_eq!(history(&request), ["q1", "a1", "q2, edited"]);
    answer(&api, request, edited["run"]["id"].as_str().unwrap(), "a3").await;
    // Resending the edit writes nothing more.
    let (status, again) = send(
        &api,
        &conversation,
        json!({"content": "q2, edited", "editOf": q2, "clientMessageId": "edit-1"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["message"]["id"], edited["message"]["id"]);
    assert_eq!(again["run"]["id"], edited["run"]["id"]);
    let shown = path(&api, &conversation, None).await;
    assert_eq!(contents(&shown), ["q1", "a1", "q2, edited", "a3"]);
    let q2_edited = id(&shown[2]).to_owned();
    assert_eq!(shown[2]["siblings"], json!([q2, q2_edited]));

    // Continue the first branch: after a2, whichever branch is newest.
    let (status, sent) = send(
        &api,
        &conversation,
        json!({"content": "q3", "parentId": a2}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{sent}");
    let request = upstream.next_request().await;
    assert_eq!(history(&request), ["q1", "a1", "q2", "a2", "q3"]);
    answer(&api, request, sent["run"]["id"].as_str().unwrap(), "a4").await;
    let shown = path(&api, &conversation, None).await;
    assert_eq!(contents(&shown), ["q1", "a1", "q2", "a2", "q3", "a4"]);
    assert_eq!(shown[2]["siblings"], json!([q2, q2_edited]));
    assert_eq!(shown[3]["siblings"], json!([a2, a2_again]));
    // The edited branch is still there, whole.
    let edited_branch = path(&api, &conversation, Some(&q2_edited)).await;
    assert_eq!(contents(&edited_branch), ["q1", "a1", "q2, edited", "a3"]);

    // Editing the first message makes a second root.
    let (status, sent) = send(
        &api,
        &conversation,
        json!({"content": "q1, edited", "editOf": q1}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{sent}");
    let request = upstream.next_request().await;
    assert_eq!(history(&request), ["q1, edited"]);
    answer(&api, request, sent["run"]["id"].as_str().unwrap(), "a5").await;
    let shown = path(&api, &conversation, None).await;
    assert_eq!(contents(&shown), ["q1, edited", "a5"]);
    assert_eq!(shown[0]["siblings"].as_array().unwrap().len(), 2);

    // A client that knows nothing of branches reads the path to the newest message, as before.
    let (_, linear) = api
        .get(&format!("/api/conversations/{conversation}/messages"))
        .await;
    assert_eq!(
        contents(linear["items"].as_array().unwrap()),
        ["q1, edited", "a5"]
    );
    server.shutdown().await.unwrap();
}

async fn branches_are_paged_and_bad_placements_are_refused(engine: Engine) {
    let (upstream, server) = server(engine).await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let other = api.new_conversation().await;
    let mut sent_rows = Vec::new();
    for i in 1..=3 {
        let (_, sent) = send(&api, &conversation, json!({"content": format!("q{i}")})).await;
        let request = upstream.next_request().await;
        answer(
            &api,
            request,
            sent["run"]["id"].as_str().unwrap(),
            &format!("a{i}"),
        )
        .await;
        sent_rows.push(sent);
    }
    // Pages of 2, newest first, each oldest first; together the whole path.
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = cursor
            .as_ref()
            .map_or_else(String::new, |cursor| format!("&cursor={cursor}"));
        let (status, page) = api
            .get(&format!(
                "/api/conversations/{conversation}/path?limit=2{query}"
            ))
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        pages.push(contents(page["items"].as_array().unwrap()).join(","));
        match page["olderCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, ["q3,a3", "q2,a2", "q1,a1"]);
    // A cursor goes on along its own page's branch: with `through` too, which of the two was
    // meant is not known.
    let (_, first) = api
        .get(&format!("/api/conversations/{conversation}/path?limit=2"))
        .await;
    let older = first["olderCursor"].as_str().unwrap();
    let through = first["items"][0]["id"].as_str().unwrap();
    let (status, error) = api
        .get(&format!(
            "/api/conversations/{conversation}/path?limit=2&cursor={older}&through={through}"
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert_eq!(error["code"], "invalid_request");

    let q1 = sent_rows[0]["message"]["id"].as_str().unwrap();
    let shown = path(&api, &conversation, None).await;
    let a1 = id(&shown[1]).to_owned();
    let refused = [
        (
            json!({"content": "x", "parentId": a1, "editOf": q1}),
            "not both",
        ),
        (json!({"content": "x", "parentId": q1}), "must be an answer"),
        (
            json!({"content": "x", "editOf": a1}),
            "must be a user message",
        ),
        (json!({"content": "x", "parentId": "not-a-uuid"}), ""),
    ];
    for (body, says) in refused {
        let (status, error) = send(&api, &conversation, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {error}");
        assert!(error["message"].as_str().unwrap().contains(says), "{error}");
    }
    // Another conversation's message is no parent here.
    let (status, error) = send(&api, &other, json!({"content": "x", "parentId": a1})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert_eq!(error["code"], "invalid_request");
    let regenerate =
        |message: &str| format!("/api/conversations/{conversation}/messages/{message}/regenerate");
    let (status, _) = api.post(&regenerate(&a1), json!({})).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "an answer is not regenerated"
    );
    let (status, _) = api
        .post(&regenerate(&uuid::Uuid::now_v7().to_string()), json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api.post(&regenerate("nope"), json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = api
        .get(&format!(
            "/api/conversations/{conversation}/path?through={}",
            uuid::Uuid::now_v7()
        ))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Someone else's conversation is not found, whatever the message.
    let stranger = server.user().await;
    let (status, _) = stranger.post(&regenerate(q1), json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = stranger
        .get(&format!("/api/conversations/{conversation}/path"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Without a token: 401.
    let anonymous = Api {
        server: &server,
        token: None,
    };
    let (status, _) = anonymous.post(&regenerate(q1), json!({})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // One run at a time: a regenerate while an answer streams is refused, and writes nothing.
    let (_, streaming) = send(&api, &conversation, json!({"content": "q4"})).await;
    let request = upstream.next_request().await;
    let (status, error) = api.post(&regenerate(q1), json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{error}");
    assert_eq!(error["code"], "run_in_progress");
    answer(
        &api,
        request,
        streaming["run"]["id"].as_str().unwrap(),
        "a4",
    )
    .await;
    let shown = path(&api, &conversation, None).await;
    assert_eq!(
        contents(&shown),
        ["q1", "a1", "q2", "a2", "q3", "a3", "q4", "a4"]
    );
    assert!(shown.iter().all(|row| row.get("siblings").is_none()));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn regenerate_and_branch_placement_work_over_the_chat_socket() {
    let (upstream, server) = server(Engine::Sqlite).await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let token = api.token.clone().unwrap();
    let (mut socket, _) =
        common::ws::WsClient::authed(&server, &format!("/ws/chat/{conversation}"), &token).await;

    socket
        .send(json!({"type": "message", "content": "q1", "clientMessageId": "c1"}))
        .await;
    let start = socket.until("start").await.pop().unwrap();
    let q1 = start["messageId"].as_str().unwrap().to_owned();
    let request = upstream.next_request().await;
    request.token("a1");
    request.send(Step::Finish);
    socket.until("complete").await;

    // Another answer to q1: announced with `start` naming q1, streamed like any run.
    socket
        .send(json!({"type": "regenerate", "messageId": q1}))
        .await;
    let start = socket.until("start").await.pop().unwrap();
    assert_eq!(start["messageId"], q1.as_str());
    let request = upstream.next_request().await;
    assert_eq!(history(&request), ["q1"]);
    request.token("a1 again");
    request.send(Step::Finish);
    let complete = socket.until("complete").await.pop().unwrap();
    assert_eq!(complete["fullOutput"], "a1 again");
    let shown = path(&api, &conversation, None).await;
    assert_eq!(contents(&shown), ["q1", "a1 again"]);
    let first_answer = shown[1]["siblings"][0].as_str().unwrap().to_owned();

    // A message after the first answer: the model sees that branch.
    socket
        .send(json!({"type": "message", "content": "q2", "parentId": first_answer}))
        .await;
    socket.until("start").await;
    let request = upstream.next_request().await;
    assert_eq!(history(&request), ["q1", "a1", "q2"]);
    request.token("a2");
    request.send(Step::Finish);
    socket.until("complete").await;

    // Bad placements and regenerates get errors, and the socket stays open.
    for (frame, code) in [
        (
            json!({"type": "message", "content": "x", "parentId": q1, "editOf": q1}),
            "invalid_request",
        ),
        (
            json!({"type": "regenerate", "messageId": first_answer}),
            "invalid_request",
        ),
        (
            json!({"type": "regenerate", "messageId": uuid::Uuid::now_v7()}),
            "not_found",
        ),
        (json!({"type": "regenerate"}), "invalid_message"),
        (
            json!({"type": "regenerate", "messageId": 7}),
            "invalid_message",
        ),
    ] {
        socket.send(frame.clone()).await;
        let error = socket.until("error").await.pop().unwrap();
        assert_eq!(error["code"], code, "{frame}: {error}");
    }
    socket.send(json!({"type": "ping"})).await;
    socket.until("pong").await;

    // Not on a run socket (of a run still streaming, so that the socket stays open).
    socket
        .send(json!({"type": "message", "content": "q3"}))
        .await;
    let start = socket.until("start").await.pop().unwrap();
    let request = upstream.next_request().await;
    let run = start["runId"].as_str().unwrap();
    let (mut run_socket, _) =
        common::ws::WsClient::authed(&server, &format!("/ws/runs/{run}/stream"), &token).await;
    run_socket
        .send(json!({"type": "regenerate", "messageId": q1}))
        .await;
    let error = run_socket.until("error").await.pop().unwrap();
    assert_eq!(error["code"], "invalid_request", "{error}");
    // …and while it streams, a regenerate on the chat socket is refused.
    socket
        .send(json!({"type": "regenerate", "messageId": q1}))
        .await;
    let error = socket.until("error").await.pop().unwrap();
    assert_eq!(error["code"], "run_in_progress", "{error}");
    request.send(Step::Finish);
    socket.until("complete").await;
    server.shutdown().await.unwrap();
}

/// A conversation stored before messages had parents becomes one path, in its order.
#[tokio::test]
async fn conversations_from_before_branches_become_one_path() {
    use sqlx::{Connection, Executor};
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("wadi.db");
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&file)
        .create_if_missing(true);
    let mut connection = sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();
    // The schema as it was: every migration before the tree.
    let mut before = sqlx::migrate!("./migrations/sqlite");
    let tree = before
        .migrations
        .iter()
        .position(|migration| migration.description.contains("message tree"))
        .unwrap();
    before.migrations = before.migrations[..tree].to_vec().into();
    before.run(&mut connection).await.unwrap();
    let conversation = uuid::Uuid::now_v7();
    let owner = uuid::Uuid::new_v4();
    connection
        .execute(
            sqlx::query(
                "INSERT INTO conversations (id, owner_id, title, created_at, updated_at) \
                 VALUES ($1, $2, 'old', 1, 1)",
            )
            .bind(conversation)
            .bind(owner),
        )
        .await
        .unwrap();
    let mut ids = Vec::new();
    for (i, role) in ["user", "assistant", "user", "assistant"]
        .iter()
        .enumerate()
    {
        let id = uuid::Uuid::now_v7();
        connection
            .execute(
                sqlx::query(
                    "INSERT INTO messages (id, conversation_id, role, content, created_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(id)
                .bind(conversation)
                .bind(role)
                .bind(format!("m{i}"))
                .bind(i64::try_from(i).unwrap()),
            )
            .await
            .unwrap();
        ids.push(id);
    }
    connection.close().await.unwrap();

    let store = wadi_server::store::connect(None, data.path())
        .await
        .unwrap();
    let rows = store
        .path(conversation.into(), ids[3].into(), 100)
        .await
        .unwrap();
    let parents: Vec<Option<uuid::Uuid>> = rows
        .iter()
        .map(|row| row.message.parent_id.map(Into::into))
        .collect();
    assert_eq!(parents, [None, Some(ids[0]), Some(ids[1]), Some(ids[2])]);
    assert!(rows.iter().all(|row| row.siblings.is_empty()));
}

async fn conversations_export_as_markdown_and_json(engine: Engine) {
    let (upstream, server) = server(engine).await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let (_, sent) = send(&api, &conversation, json!({"content": "Plan a trip"})).await;
    let q = sent["message"]["id"].as_str().unwrap().to_owned();
    let request = upstream.next_request().await;
    answer(
        &api,
        request,
        sent["run"]["id"].as_str().unwrap(),
        "Go to *Lisbon*",
    )
    .await;
    let (_, again) = api
        .post(
            &format!("/api/conversations/{conversation}/messages/{q}/regenerate"),
            json!({}),
        )
        .await;
    let request = upstream.next_request().await;
    answer(
        &api,
        request,
        again["run"]["id"].as_str().unwrap(),
        "Go to Porto",
    )
    .await;

    let download = |format: &str| {
        api.request(
            reqwest::Method::GET,
            &format!("/api/conversations/{conversation}/export?format={format}"),
        )
        .send()
    };
    let response = download("markdown").await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "text/markdown; charset=utf-8"
    );
    assert_eq!(
        response.headers()["content-disposition"],
        "attachment; filename=\"plan-a-trip.md\""
    );
    let markdown = response.text().await.unwrap();
    assert!(markdown.starts_with("# Plan a trip\n"), "{markdown}");
    assert!(markdown.contains("**You** · "), "{markdown}");
    assert!(
        markdown.contains("**Assistant (fake-model)** · "),
        "{markdown}"
    );
    assert!(
        markdown.contains("Go to Porto"),
        "the branch shown: {markdown}"
    );
    assert!(
        !markdown.contains("Lisbon"),
        "not the other branch: {markdown}"
    );

    let response = download("json").await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-disposition"],
        "attachment; filename=\"plan-a-trip.json\""
    );
    let export: Value = response.json().await.unwrap();
    assert_eq!(export["conversation"]["title"], "Plan a trip");
    let messages = export["messages"].as_array().unwrap();
    assert_eq!(
        contents(messages),
        ["Plan a trip", "Go to *Lisbon*", "Go to Porto"],
        "every branch"
    );
    assert_eq!(messages[1]["parentId"], q.as_str());
    assert_eq!(messages[2]["parentId"], q.as_str());

    let response = download("pdf").await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let stranger = server.user().await;
    let (status, _) = stranger
        .get(&format!(
            "/api/conversations/{conversation}/export?format=json"
        ))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.shutdown().await.unwrap();
}
