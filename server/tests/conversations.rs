//! The conversations REST API over real HTTP, on SQLite and on Postgres.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;

use common::{Engine, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

on_both_engines!(
    crud_round_trip,
    untitled_conversations_take_the_first_message_as_title,
    conversation_pages_miss_and_repeat_nothing,
    message_pages_miss_and_repeat_nothing,
    sending_with_a_client_message_id_is_idempotent,
    deleting_a_conversation_deletes_its_messages,
    another_users_conversation_is_a_404_on_every_route,
    bad_input_gets_a_json_4xx_and_writes_nothing,
    conversation_creation_is_rate_limited_per_user,
);

async fn conversation_creation_is_rate_limited_per_user(engine: Engine) {
    let server = TestServer::configured(engine, |config| {
        config.runs.conversation_rate_burst = 3;
        config.runs.conversation_rate_per_minute = 0.0;
    })
    .await;
    let api = server.user().await;
    for _ in 0..3 {
        api.new_conversation().await;
    }
    let (status, body) = api.post("/api/conversations", json!({})).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "rate_limited");
    // Another user is not affected.
    server.user().await.new_conversation().await;
    server.shutdown().await.unwrap();
}

async fn crud_round_trip(engine: Engine) {
    let server = TestServer::on(engine).await;
    let api = server.user().await;
    let (status, created) = api
        .post("/api/conversations", json!({"title": "  Trip planning  "}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(created["title"], "Trip planning");
    let id = created["id"].as_str().unwrap();
    assert_eq!(Uuid::parse_str(id).unwrap().get_version_num(), 7);

    let (status, fetched) = api.get(&format!("/api/conversations/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fetched, created);

    let (status, renamed) = api
        .call(
            Method::PATCH,
            &format!("/api/conversations/{id}"),
            Some(json!({"title": "Trip to Lisbon"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(renamed["title"], "Trip to Lisbon");
    // A title stays on one line: control characters become spaces (the export's heading, a
    // terminal showing it).
    let (status, odd) = api
        .post(
            "/api/conversations",
            json!({"title": "first\nsecond\u{1b}[31m"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(odd["title"], "first second [31m");
    let odd_id = odd["id"].as_str().unwrap();
    let (status, odd) = api
        .call(
            Method::PATCH,
            &format!("/api/conversations/{odd_id}"),
            Some(json!({"title": "\tthird\r\nline"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(odd["title"], "third  line");
    assert_eq!(
        api.delete_conversation(odd_id).await,
        StatusCode::NO_CONTENT
    );
    // Every field is optional: no body at all is a conversation with none.
    let bare = api
        .request(Method::POST, "/api/conversations")
        .send()
        .await
        .unwrap();
    assert_eq!(bare.status(), StatusCode::CREATED);
    let bare: Value = bare.json().await.unwrap();
    assert_eq!(bare["title"], "New conversation");
    let bare_id = bare["id"].as_str().unwrap();
    assert_eq!(
        api.delete_conversation(bare_id).await,
        StatusCode::NO_CONTENT
    );

    let (status, sent) = api
        .post(
            &format!("/api/conversations/{id}/messages"),
            json!({"content": "Where should we eat?"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(sent["message"]["role"], "user");
    assert_eq!(sent["message"]["content"], "Where should we eat?");

    let (_, list) = api.get("/api/conversations").await;
    assert_eq!(list["items"][0]["id"], id);
    assert_eq!(
        list["items"][0]["title"], "Trip to Lisbon",
        "a set title is kept"
    );
    assert!(list.get("nextCursor").is_none());

    let (status, messages) = api.get(&format!("/api/conversations/{id}/messages")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(messages["items"][0]["id"], sent["message"]["id"]);
    assert_eq!(messages["items"][0]["runId"], sent["run"]["id"]);

    let status = api.delete_conversation(id).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = api.get(&format!("/api/conversations/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "not_found");
    let status = api.delete_conversation(id).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.shutdown().await.unwrap();
}

async fn untitled_conversations_take_the_first_message_as_title(engine: Engine) {
    let server = TestServer::on(engine).await;
    let api = server.user().await;
    let id = api.new_conversation().await;
    let (_, fetched) = api.get(&format!("/api/conversations/{id}")).await;
    assert_eq!(fetched["title"], "New conversation");
    for content in ["\n  How do WebSockets work?\nAnd why?", "A second message"] {
        api.send_and_finish(&id, content).await;
    }
    let (_, fetched) = api.get(&format!("/api/conversations/{id}")).await;
    assert_eq!(fetched["title"], "How do WebSockets work?");
    server.shutdown().await.unwrap();
}

/// Follows `nextCursor` through every page, collecting item ids.
async fn collect_pages(api: &common::Api<'_>, path: &str, limit: u32) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(cursor) => format!("{path}?limit={limit}&cursor={cursor}"),
            None => format!("{path}?limit={limit}"),
        };
        let (status, page) = api.get(&url).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= limit as usize);
        ids.extend(
            items
                .iter()
                .map(|item| item["id"].as_str().unwrap().to_owned()),
        );
        match page.get("nextCursor").and_then(Value::as_str) {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    ids
}

async fn conversation_pages_miss_and_repeat_nothing(engine: Engine) {
    let server = TestServer::on(engine).await;
    let api = server.user().await;
    let other = server.user().await;
    other.new_conversation().await;
    let mut created = Vec::new();
    for _ in 0..7 {
        created.push(api.new_conversation().await);
    }
    // Touch the oldest: it becomes the most recent.
    api.post(
        &format!("/api/conversations/{}/messages", created[0]),
        json!({"content": "bump"}),
    )
    .await;
    let ids = collect_pages(&api, "/api/conversations", 3).await;
    assert_eq!(ids.len(), 7);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 7, "no repeats");
    assert_eq!(ids[0], created[0], "most recently updated first");
    let mut expected: Vec<String> = created[1..].iter().rev().cloned().collect();
    expected.insert(0, created[0].clone());
    assert_eq!(ids, expected);
    server.shutdown().await.unwrap();
}

async fn message_pages_miss_and_repeat_nothing(engine: Engine) {
    let server = TestServer::on(engine).await;
    let api = server.user().await;
    let id = api.new_conversation().await;
    let mut sent = Vec::new();
    for i in 0..6 {
        let body = api.send_and_finish(&id, &format!("m{i}")).await;
        sent.push(body["message"]["id"].as_str().unwrap().to_owned());
    }
    // Everything in one page is the reference order.
    let (_, all) = api
        .get(&format!("/api/conversations/{id}/messages?limit=100"))
        .await;
    let all: Vec<String> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(all.len(), 12, "each message and its answer");
    let user_ids: Vec<&String> = all.iter().step_by(2).collect();
    assert_eq!(user_ids, sent.iter().collect::<Vec<_>>(), "oldest first");
    let ids = collect_pages(&api, &format!("/api/conversations/{id}/messages"), 5).await;
    assert_eq!(ids, all, "pages miss and repeat nothing");
    // A cursor of this list is refused on another conversation's.
    let (_, first) = api
        .get(&format!("/api/conversations/{id}/messages?limit=3"))
        .await;
    let cursor = first["nextCursor"].as_str().unwrap();
    let other = api.new_conversation().await;
    let (status, body) = api
        .get(&format!(
            "/api/conversations/{other}/messages?cursor={cursor}"
        ))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "invalid_request");
    server.shutdown().await.unwrap();
}

async fn sending_with_a_client_message_id_is_idempotent(engine: Engine) {
    let server = TestServer::on(engine).await;
    let api = server.user().await;
    let id = api.new_conversation().await;
    let path = format!("/api/conversations/{id}/messages");
    let body = json!({"content": "only once", "clientMessageId": "c-1"});
    let (first_status, first) = api.post(&path, body.clone()).await;
    let (second_status, second) = api.post(&path, body).await;
    assert_eq!(first_status, StatusCode::CREATED);
    assert_eq!(second_status, StatusCode::OK);
    assert_eq!(first["message"], second["message"]);
    assert_eq!(first["message"]["clientMessageId"], "c-1");
    // The same client id in another conversation is another message.
    let other = api.new_conversation().await;
    let (status, _) = api
        .post(
            &format!("/api/conversations/{other}/messages"),
            json!({"content": "only once", "clientMessageId": "c-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, list) = api.get(&path).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    server.shutdown().await.unwrap();
}

async fn deleting_a_conversation_deletes_its_messages(engine: Engine) {
    let server = TestServer::on(engine).await;
    let api = server.user().await;
    let id = api.new_conversation().await;
    for i in 0..3 {
        api.send_and_finish(&id, &format!("{i}")).await;
    }
    let uuid = Uuid::parse_str(&id).unwrap();
    let count = "SELECT COUNT(*) FROM messages WHERE conversation_id = $1";
    assert_eq!(server.db().count(count, uuid).await, 6);
    let runs = "SELECT COUNT(*) FROM runs WHERE conversation_id = $1";
    assert_eq!(server.db().count(runs, uuid).await, 3);
    let token = api.token.clone().unwrap();
    let (mut chat, _) =
        common::ws::WsClient::authed(&server, &format!("/ws/chat/{id}"), &token).await;
    let status = api.delete_conversation(&id).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(server.db().count(count, uuid).await, 0);
    assert_eq!(server.db().count(runs, uuid).await, 0);
    // Its chat socket is told and closed, not left open on nothing.
    let (frames, code) = chat.until_closed().await;
    assert_eq!(
        code,
        wadi_protocol::close::CONVERSATION_DELETED,
        "{frames:?}"
    );
    assert_eq!(frames.last().unwrap()["code"], "not_found", "{frames:?}");
    server.shutdown().await.unwrap();
}

async fn another_users_conversation_is_a_404_on_every_route(engine: Engine) {
    let server = TestServer::on(engine).await;
    let owner = server.user().await;
    let intruder = server.user().await;
    let id = owner.new_conversation().await;
    let missing = Uuid::now_v7().to_string();
    let routes = |id: &str| {
        vec![
            (Method::GET, format!("/api/conversations/{id}"), None),
            (
                Method::PATCH,
                format!("/api/conversations/{id}"),
                Some(json!({"title": "mine now"})),
            ),
            (
                Method::GET,
                format!("/api/conversations/{id}/messages"),
                None,
            ),
            (
                Method::POST,
                format!("/api/conversations/{id}/messages"),
                Some(json!({"content": "hello"})),
            ),
            (Method::DELETE, format!("/api/conversations/{id}"), None),
        ]
    };
    for ((method, path, body), (_, missing_path, _)) in
        routes(&id).into_iter().zip(routes(&missing))
    {
        let (status, mut answer) = intruder.call(method.clone(), &path, body.clone()).await;
        let (missing_status, mut missing_answer) =
            intruder.call(method.clone(), &missing_path, body).await;
        // Identical but for each request's own id.
        answer.as_object_mut().unwrap().remove("requestId");
        missing_answer.as_object_mut().unwrap().remove("requestId");
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
        assert_eq!(
            (status, &answer),
            (missing_status, &missing_answer),
            "no existence leak"
        );
    }
    // Nothing the intruder did touched the conversation.
    let (status, fetched) = owner.get(&format!("/api/conversations/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fetched["title"], "New conversation");
    let uuid = Uuid::parse_str(&id).unwrap();
    assert_eq!(
        server
            .db()
            .count(
                "SELECT COUNT(*) FROM messages WHERE conversation_id = $1",
                uuid
            )
            .await,
        0
    );
    let (_, listed) = intruder.get("/api/conversations").await;
    assert_eq!(listed["items"], json!([]));
    // Without a token: 401 on every route, and on the lists and creation too.
    let own = [
        (Method::GET, "/api/conversations".to_owned(), None),
        (
            Method::POST,
            "/api/conversations".to_owned(),
            Some(json!({})),
        ),
        (Method::GET, format!("/api/conversations/{id}/path"), None),
        (Method::GET, format!("/api/conversations/{id}/export"), None),
        (Method::GET, "/api/search?q=hello".to_owned(), None),
    ];
    for (method, path, body) in routes(&id).into_iter().chain(own) {
        let (status, answer) = server.anonymous().call(method, &path, body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(answer["code"], "invalid_token");
    }
    server.shutdown().await.unwrap();
}

async fn bad_input_gets_a_json_4xx_and_writes_nothing(engine: Engine) {
    let server =
        TestServer::configured(engine, |config| config.runs.max_content_bytes = 1000).await;
    let api = server.user().await;
    let id = api.new_conversation().await;
    let messages = format!("/api/conversations/{id}/messages");
    let raw = |method: Method, path: &str, body: &'static str| {
        api.request(method, path)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let expect =
        |status: StatusCode, body: &Value, want_status: u16, want_code: &str, what: &str| {
            assert_eq!(status.as_u16(), want_status, "{what}: {body}");
            assert_eq!(body["code"], want_code, "{what}");
            assert!(
                body["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{what}"
            );
        };
    async fn json_of(response: reqwest::Response) -> (StatusCode, Value) {
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    let (s, b) = json_of(raw(Method::POST, &messages, "{not json").await.unwrap()).await;
    expect(s, &b, 400, "invalid_json", "malformed JSON");
    // Bytes that are not UTF-8, even in a field nothing reads: refused, and nothing written.
    for (path, body) in [
        (
            &messages,
            &b"{\"content\": \"ok\", \"junk\": \"\xff\xfe\"}"[..],
        ),
        (&messages, b"{\"content\": \"a\xffb\"}"),
        (
            &"/api/conversations".to_owned(),
            b"{\"title\": \"t\", \"x\": \"\xc0\"}",
        ),
    ] {
        let response = api
            .request(Method::POST, path)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        let (s, b) = json_of(response).await;
        expect(s, &b, 400, "invalid_utf8", "a body that is not UTF-8");
    }
    let (_, written) = api.get(&messages).await;
    assert_eq!(written["items"], json!([]), "{written}");
    let (s, b) = json_of(raw(Method::POST, &messages, "").await.unwrap()).await;
    expect(s, &b, 400, "invalid_message", "empty body: no content");
    for body in [r#"["hello from an array"]"#, r#""hi""#, "7", "null"] {
        let (s, b) = json_of(raw(Method::POST, &messages, body).await.unwrap()).await;
        expect(s, &b, 400, "invalid_message", body);
        let (s, b) = json_of(raw(Method::POST, "/api/conversations", body).await.unwrap()).await;
        expect(s, &b, 400, "invalid_message", body);
    }
    let (s, b) = api.post(&messages, json!({"clientMessageId": "x"})).await;
    expect(s, &b, 400, "invalid_message", "missing content");
    let (s, b) = api.post(&messages, json!({"content": 5})).await;
    expect(s, &b, 400, "invalid_message", "content of the wrong type");
    let (s, b) = api.post(&messages, json!({"content": "  \n "})).await;
    expect(s, &b, 400, "empty_content", "blank content");
    let (s, b) = api
        .post(&messages, json!({"content": "x".repeat(1001)}))
        .await;
    expect(s, &b, 413, "too_large", "content over the limit");
    // A body over the limit is refused from its Content-Length, before it is read. (Sending the
    // body too would race the server's early answer against a connection reset.)
    let (s, b) = common::declared_oversized_post(&server, api.token.as_deref(), &messages).await;
    expect(s, &b, 413, "too_large", "body over the limit");
    let (s, b) = api
        .post(
            &messages,
            json!({"content": "ok", "clientMessageId": "c".repeat(129)}),
        )
        .await;
    expect(s, &b, 400, "invalid_message", "client id too long");
    let (s, b) = api
        .post(
            "/api/conversations/not-a-uuid/messages",
            json!({"content": "hi"}),
        )
        .await;
    expect(s, &b, 400, "invalid_request", "invalid id");
    let (s, b) = api.get("/api/conversations/123").await;
    expect(s, &b, 400, "invalid_request", "invalid id");
    let (s, b) = api.get("/api/conversations?cursor=garbage").await;
    expect(s, &b, 400, "invalid_request", "bad cursor");
    let message_cursor = base64_url(&format!("m:{}", Uuid::now_v7()));
    let (s, b) = api
        .get(&format!("/api/conversations?cursor={message_cursor}"))
        .await;
    expect(s, &b, 400, "invalid_request", "cursor of another list");
    let (s, b) = api.get(&format!("{messages}?cursor=bm90LWEtdXVpZA")).await;
    expect(s, &b, 400, "invalid_request", "bad message cursor");
    let (s, b) = api
        .get(&format!("{messages}?cursor={message_cursor}"))
        .await;
    expect(s, &b, 400, "invalid_request", "message cursor made up");
    for limit in ["0", "101", "ten"] {
        let (s, b) = api.get(&format!("/api/conversations?limit={limit}")).await;
        expect(s, &b, 400, "invalid_request", "bad limit");
    }
    let (s, b) = api.post("/api/conversations", json!({"title": ""})).await;
    expect(s, &b, 400, "invalid_message", "empty title");
    let (s, b) = json_of(
        raw(Method::POST, "/api/conversations", "{not json")
            .await
            .unwrap(),
    )
    .await;
    expect(s, &b, 400, "invalid_json", "malformed JSON on create");
    let (s, b) = api.post("/api/conversations", json!({"title": 5})).await;
    expect(s, &b, 400, "invalid_message", "title of the wrong type");
    let (s, b) = api
        .post(
            "/api/conversations",
            json!({"systemPrompt": "x".repeat(40_000)}),
        )
        .await;
    expect(s, &b, 413, "too_large", "system prompt over the limit");
    let (s, b) =
        common::declared_oversized_post(&server, api.token.as_deref(), "/api/conversations").await;
    expect(s, &b, 413, "too_large", "create body over the limit");
    let (s, b) = api
        .post("/api/conversations", json!({"title": "t".repeat(201)}))
        .await;
    expect(s, &b, 413, "too_large", "long title");
    let (s, b) = api
        .call(
            Method::PATCH,
            &format!("/api/conversations/{id}"),
            Some(json!({})),
        )
        .await;
    expect(s, &b, 400, "invalid_message", "rename without title");
    // U+0000 cannot be stored on Postgres: refused on every store alike, never a 500.
    let conversation = format!("/api/conversations/{id}");
    for (method, path, body, what) in [
        (
            Method::POST,
            &messages,
            json!({"content": "a\u{0}b"}),
            "NUL in content",
        ),
        (
            Method::POST,
            &messages,
            json!({"content": "ok", "clientMessageId": "c\u{0}"}),
            "NUL in the client id",
        ),
        (
            Method::POST,
            &"/api/conversations".to_owned(),
            json!({"title": "a\u{0}b"}),
            "NUL in a new title",
        ),
        (
            Method::POST,
            &"/api/conversations".to_owned(),
            json!({"systemPrompt": "a\u{0}b"}),
            "NUL in a new system prompt",
        ),
        (
            Method::PATCH,
            &conversation,
            json!({"title": "a\u{0}b"}),
            "NUL in a rename",
        ),
        (
            Method::PATCH,
            &conversation,
            json!({"systemPrompt": "a\u{0}b"}),
            "NUL in a changed system prompt",
        ),
    ] {
        let (s, b) = api.call(method, path, Some(body)).await;
        expect(s, &b, 400, "invalid_message", what);
        assert!(
            b["message"].as_str().unwrap().contains("U+0000"),
            "{what}: {b}"
        );
    }
    // Every word of a search must match, so more words than it takes are refused, not dropped.
    let (s, b) = api.get("/api/search?q=a+b+c+d+e+f+g+h+i").await;
    expect(s, &b, 413, "too_large", "nine words");
    // A query string that does not parse (a repeated key) is a JSON error too, on every route
    // that reads one (axum's own answer is plain text).
    let run = Uuid::now_v7();
    for path in [
        "/api/search?q=a&q=b".to_owned(),
        format!("/api/conversations/{id}/path?through=x&through=y"),
        format!("/api/conversations/{id}/export?format=md&format=json"),
        format!("/api/runs/{run}/events?afterSeq=1&afterSeq=2"),
        format!("/ws/runs/{run}/stream?afterSeq=1&afterSeq=2"),
        "/api/conversations?limit=1&limit=2".to_owned(),
    ] {
        let (s, b) = api.get(&path).await;
        expect(s, &b, 400, "invalid_request", &path);
    }

    // Nothing was written by any of it.
    let uuid = Uuid::parse_str(&id).unwrap();
    assert_eq!(
        server
            .db()
            .count(
                "SELECT COUNT(*) FROM messages WHERE conversation_id = $1",
                uuid
            )
            .await,
        0
    );
    let (_, list) = api.get("/api/conversations").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(list["items"][0]["title"], "New conversation");
    server.shutdown().await.unwrap();
}

fn base64_url(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

/// A tmpfs of `size` mounted on a fresh directory (needs root: the test says so and stops if it
/// cannot mount), unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|status| status.success());
        mounted.then_some(Self { dir })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily: the server's last file handles may still be closing.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_refuses_writes_clearly_and_half_writes_nothing() {
    let Some(disk) = SmallDisk::mount("8m") else {
        eprintln!("cannot mount a small tmpfs here (not root?): the disk-full test did not run");
        return;
    };
    let data = disk.dir.path().join("data");
    let mut config = wadi_server::Config::for_tests(data.clone());
    config.runs.message_rate_burst = 1000;
    let upstream = common::upstream::FakeUpstream::start(common::upstream::Script::Tokens {
        tokens: vec!["ok".into()],
        pace: std::time::Duration::ZERO,
    })
    .await;
    upstream.configure(&mut config);
    let server = TestServer::start_with(config).await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    api.send_and_finish(&conversation, "before").await;

    let filler = fill_disk(disk.dir.path());
    // Messages until one is refused (the database may still have room in pages it holds).
    let path = format!("/api/conversations/{conversation}/messages");
    let mut refused = None;
    for i in 0..200 {
        let content = format!("during {i} {}", "x".repeat(16 * 1024));
        let (status, body) = api.post(&path, json!({"content": content})).await;
        if status != 201 {
            refused = Some((i, status, body));
            break;
        }
        let run = body["run"]["id"].as_str().unwrap();
        // Let each answer end (and fail to save, once the disk is full) before the next.
        api.events(run).await;
    }
    let (index, status, body) = refused.expect("the full disk never refused a message");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "unavailable", "{body}");

    // Room again: it works, and the refused message left no trace.
    std::fs::remove_file(&filler).unwrap();
    let (status, _) = api.post(&path, json!({"content": "after"})).await;
    assert_eq!(status, 201);
    let (_, messages) = api.get(&format!("{path}?limit=100")).await;
    let items = messages["items"].as_array().unwrap();
    assert!(
        items.iter().all(|m| !m["content"]
            .as_str()
            .unwrap()
            .starts_with(&format!("during {index} "))),
        "the refused message was not stored"
    );
    // Every user message stored has its run (nothing half-written).
    for message in items.iter().filter(|m| m["role"] == "user") {
        assert!(message["runId"].is_string(), "{message}");
    }
    server.shutdown().await.unwrap();
    drop(disk);
}

/// Fills the disk under `dir` to its last byte; the file to remove for room again.
fn fill_disk(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let filler = dir.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let block = vec![0u8; 64 * 1024];
    while file.write_all(&block).is_ok() {}
    let small = [0u8; 512];
    while file.write_all(&small).is_ok() {}
    let _ = file.sync_all();
    filler
}

#[tokio::test]
async fn an_answer_whose_save_failed_is_saved_as_told_once_the_disk_has_room() {
    use common::upstream::{FakeUpstream, Script, Step};
    let Some(disk) = SmallDisk::mount("8m") else {
        eprintln!(
            "cannot mount a small tmpfs here (not root?): the unsaved-answer test did not run"
        );
        return;
    };
    let mut config = wadi_server::Config::for_tests(disk.dir.path().join("data"));
    // Its task gives up on the save at once; no checkpoint holds the answer; the heartbeat
    // comes often.
    config.runs.save_patience = std::time::Duration::from_millis(200);
    config.runs.flush_interval = std::time::Duration::from_secs(3600);
    config.runs.instance_heartbeat = std::time::Duration::from_millis(100);
    let upstream = FakeUpstream::start(Script::Manual).await;
    upstream.configure(&mut config);
    let server = TestServer::start_with(config).await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let sent = api.send(&conversation, "a long answer, please").await;
    let run = sent["run"]["id"].as_str().unwrap().to_owned();
    let request = upstream.next_request().await;
    // More than any free page of the database or its log can take.
    let piece = "y".repeat(64 * 1024);
    for _ in 0..32 {
        request.token(&piece);
    }
    let filler = fill_disk(disk.dir.path());
    request.send(Step::Finish);
    // Its followers are told it completed, with all of it: that is what must be saved.
    let events = api.events(&run).await;
    let complete = events
        .rsplit("event: complete\ndata: ")
        .next()
        .and_then(|data| data.lines().next())
        .expect("no complete event");
    let complete: Value = serde_json::from_str(complete).unwrap();
    assert_eq!(complete["status"], "completed");
    assert_eq!(
        complete["fullOutput"].as_str().unwrap().len(),
        32 * 64 * 1024
    );
    let stored = || async { api.get(&format!("/api/runs/{run}")).await.1 };
    assert_eq!(stored().await["status"], "running", "not saved yet");

    // Room again: the heartbeat saves what the followers were told (before, it ended the run
    // as an orphan with its last checkpoint: empty).
    std::fs::remove_file(&filler).unwrap();
    let saved = tokio::time::timeout(common::TIMEOUT, async {
        loop {
            let run = stored().await;
            if run["status"] != "running" {
                return run;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the answer was never saved");
    assert_eq!(saved["status"], "completed");
    assert_eq!(saved["output"], complete["fullOutput"]);
    let (_, messages) = api
        .get(&format!("/api/conversations/{conversation}/messages"))
        .await;
    assert_eq!(messages["items"][1]["content"], complete["fullOutput"]);
    assert_eq!(messages["items"][1]["runStatus"], "completed");
    server.shutdown().await.unwrap();
    drop(disk);
}

#[tokio::test]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn a_database_refusing_connections_is_unavailable_not_a_server_failure() {
    let server = TestServer::on(Engine::postgres()).await;
    let email = format!("refused-{}@example.com", Uuid::new_v4());
    let session = server.sign_up_as(&email, "a fine password").await;
    let api = common::Api {
        server: &server,
        token: Some(session.access_token().to_owned()),
    };
    let id = api.new_conversation().await;
    server.db().refuse_connections(true).await;
    // What a Postgres restart or a restore looks like to clients: try again later, not a bug.
    let (status, body) = api
        .post(
            &format!("/api/conversations/{id}/messages"),
            json!({"content": "while it restarts"}),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "unavailable", "{body}");
    let (status, body) = api.post("/api/conversations", json!({})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let login = server
        .http
        .post(server.url("/auth/v1/token?grant_type=password"))
        .json(&json!({"email": email, "password": "a fine password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::SERVICE_UNAVAILABLE);
    let token = session.access_token().to_owned();
    let mut chat = common::ws::WsClient::connect(&server, &format!("/ws/chat/{id}")).await;
    chat.send(json!({"type": "auth", "token": token})).await;
    let (frames, code) = chat.until_closed().await;
    assert_eq!(code, wadi_protocol::close::TRY_AGAIN_LATER, "{frames:?}");
    assert_eq!(frames.last().unwrap()["code"], "unavailable", "{frames:?}");

    server.db().refuse_connections(false).await;
    api.send(&id, "once it is back").await;
    server.shutdown().await.unwrap();
}
