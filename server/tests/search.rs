//! Full-text search over REST on both engines: only the caller's conversations, titles and
//! messages, words marked, paged, and kept up to date as conversations change.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    Api, Engine, TestServer,
    upstream::{FakeUpstream, Script},
};
use reqwest::StatusCode;
use serde_json::{Value, json};

on_both_engines!(search_finds_only_your_words_marks_them_and_pages);

async fn search(api: &Api<'_>, query: &str) -> (StatusCode, Value) {
    let url = reqwest::Url::parse_with_params("http://x/api/search", &[("q", query)]).unwrap();
    api.get(&format!("/api/search?{}", url.query().unwrap()))
        .await
}

/// The marked words of every message hit.
fn hits(results: &Value) -> Vec<String> {
    results["messages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|hit| hit["snippet"].as_array().unwrap().clone())
        .filter(|piece| piece["hit"] == true)
        .map(|piece| piece["text"].as_str().unwrap().to_lowercase())
        .collect()
}

async fn search_finds_only_your_words_marks_them_and_pages(engine: Engine) {
    // The model answers "Noted." to everything: only the users' own words are searched for.
    let upstream = FakeUpstream::start(Script::Tokens {
        tokens: vec!["Noted.".into()],
        pace: std::time::Duration::from_millis(1),
    })
    .await;
    let server = TestServer::configured(engine, |config| upstream.configure(config)).await;
    let api = server.user().await;
    let lisbon = api.new_conversation().await;
    api.send_and_finish(&lisbon, "Zebra crossings in Lisbon are rare")
        .await;
    api.send_and_finish(&lisbon, "Where do zebras live?").await;
    let fox = api.new_conversation().await;
    api.send_and_finish(&fox, "The quick brown fox jumps").await;
    let stranger = server.user().await;
    let theirs = stranger.new_conversation().await;
    stranger
        .send_and_finish(&theirs, "Zebra zebra zebra, not yours")
        .await;

    // Words anywhere in the caller's messages, marked; a title match listed too.
    let (status, found) = search(&api, "zebra").await;
    assert_eq!(status, StatusCode::OK, "{found}");
    let messages = found["messages"].as_array().unwrap();
    assert_eq!(
        messages.len(),
        2,
        "only yours (a word, or a word it begins): {found}"
    );
    assert!(
        messages
            .iter()
            .all(|m| m["conversationId"] == lisbon.as_str() && m["role"] == "user")
    );
    let mut marked = hits(&found);
    marked.sort();
    assert_eq!(marked, ["zebra", "zebras"]);
    let titles = found["conversations"].as_array().unwrap();
    assert_eq!(titles.len(), 1, "{found}");
    assert_eq!(titles[0]["conversationId"], lisbon.as_str());
    assert!(
        titles[0]["title"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["hit"] == true)
    );
    // The last word is a prefix (results while typing); every word must match.
    let (_, found) = search(&api, "zeb").await;
    assert_eq!(found["messages"].as_array().unwrap().len(), 2, "{found}");
    let (_, found) = search(&api, "zebras live").await;
    assert_eq!(found["messages"].as_array().unwrap().len(), 1, "{found}");
    let (_, found) = search(&api, "QUICK fox").await;
    assert_eq!(found["messages"].as_array().unwrap().len(), 1);
    assert_eq!(found["messages"][0]["conversationId"], fox.as_str());
    let (_, found) = search(&api, "quick zebra").await;
    assert!(found["messages"].as_array().unwrap().is_empty());
    // Query syntax is just words here.
    let (status, found) = search(&api, "\"zebra\" OR * NEAR(x) -- ;").await;
    assert_eq!(status, StatusCode::OK, "{found}");

    // Paged.
    let (_, first) = api.get("/api/search?q=zeb&limit=1").await;
    assert_eq!(first["messages"].as_array().unwrap().len(), 1);
    let cursor = first["nextCursor"].as_str().unwrap();
    let (_, second) = api
        .get(&format!("/api/search?q=zeb&limit=1&cursor={cursor}"))
        .await;
    assert_eq!(second["messages"].as_array().unwrap().len(), 1);
    assert_ne!(
        second["messages"][0]["messageId"],
        first["messages"][0]["messageId"]
    );
    assert!(
        second["conversations"].as_array().unwrap().is_empty(),
        "titles on page one only"
    );
    assert!(second.get("nextCursor").is_none(), "{second}");

    // Kept up to date: a renamed title is found by its new words, a deleted conversation's
    // messages are gone.
    let (status, _) = api
        .call(
            reqwest::Method::PATCH,
            &format!("/api/conversations/{fox}"),
            Some(json!({"title": "Canine agility notes"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, found) = search(&api, "agility").await;
    assert_eq!(found["conversations"][0]["conversationId"], fox.as_str());
    let status = api.delete_conversation(&lisbon).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, found) = search(&api, "zebra").await;
    assert!(found["messages"].as_array().unwrap().is_empty(), "{found}");
    assert!(
        found["conversations"].as_array().unwrap().is_empty(),
        "{found}"
    );
    let (_, found) = search(&stranger, "zebra").await;
    assert_eq!(
        found["messages"].as_array().unwrap().len(),
        1,
        "theirs is theirs"
    );

    // Bad input.
    for (query, status) in [
        ("", StatusCode::BAD_REQUEST),
        ("*** --", StatusCode::BAD_REQUEST),
        (&"a".repeat(300)[..], StatusCode::PAYLOAD_TOO_LARGE),
    ] {
        let (got, body) = search(&api, query).await;
        assert_eq!(got, status, "{query:?}: {body}");
        assert!(body["code"].is_string(), "{body}");
    }
    let (status, _) = api.get("/api/search?q=zebra&cursor=bogus").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = api.get("/api/search").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let anonymous = Api {
        server: &server,
        token: None,
    };
    let (status, _) = search(&anonymous, "zebra").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    server.shutdown().await.unwrap();
}
