//! Models and system prompts per conversation, over REST on both engines: the operator's list,
//! a conversation's choice reaching the provider, the model recorded on each answer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    Api, Engine, TIMEOUT, TestServer,
    upstream::{FakeUpstream, Script, Step},
};
use reqwest::StatusCode;
use serde_json::{Value, json};

on_both_engines!(models_and_system_prompts_are_chosen_per_conversation);

/// Sends `content` and answers it with `text`; returns what the provider was asked.
async fn exchange(
    upstream: &FakeUpstream,
    api: &Api<'_>,
    conversation: &str,
    content: &str,
    text: &str,
) -> Value {
    let (status, sent) = api
        .post(
            &format!("/api/conversations/{conversation}/messages"),
            json!({"content": content}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{sent}");
    let request = upstream.next_request().await;
    assert_eq!(request.headers["authorization"], "Bearer sk-test");
    assert_eq!(request.headers["openai-organization"], "org-wadi");
    assert_eq!(request.headers["openai-project"], "proj-wadi");
    request.token(text);
    request.send(Step::Finish);
    let run = sent["run"]["id"].as_str().unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let (_, state) = api.get(&format!("/api/runs/{run}")).await;
        if state["status"] != "running" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    request.body.clone()
}

async fn models_and_system_prompts_are_chosen_per_conversation(engine: Engine) {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = TestServer::configured(engine, |config| {
        upstream.configure(config);
        config.provider.openai_organization = Some("org-wadi".into());
        config.provider.openai_project = Some("proj-wadi".into());
        config.provider.models = vec!["big-model".into(), " small-model ".into(), "".into()];
        config.runs.system_prompt = Some("Server default prompt.".into());
    })
    .await;
    let api = server.user().await;
    let (status, models) = api.get("/api/models").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        models,
        json!({"models": ["fake-model", "big-model", "small-model"], "default": "fake-model"})
    );

    // Created with a model: its answers come from it, with the server's prompt.
    let (status, created) = api
        .post("/api/conversations", json!({"model": "small-model"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["model"], "small-model");
    let conversation = created["id"].as_str().unwrap().to_owned();
    let asked = exchange(&upstream, &api, &conversation, "hi", "hello").await;
    assert_eq!(asked["model"], "small-model");
    assert_eq!(
        asked["messages"][0],
        json!({"role": "system", "content": "Server default prompt."})
    );

    // Switched, with a prompt of its own.
    let (status, updated) = api
        .call(
            reqwest::Method::PATCH,
            &format!("/api/conversations/{conversation}"),
            Some(json!({"model": "big-model", "systemPrompt": "  Be brief.  "})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["model"], "big-model");
    assert_eq!(updated["systemPrompt"], "Be brief.");
    let asked = exchange(&upstream, &api, &conversation, "again", "ok").await;
    assert_eq!(asked["model"], "big-model");
    assert_eq!(
        asked["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    // Each answer records the model that wrote it.
    let (_, path) = api
        .get(&format!("/api/conversations/{conversation}/path"))
        .await;
    let answers: Vec<&Value> = path["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "assistant")
        .collect();
    assert_eq!(answers[0]["model"], "small-model");
    assert_eq!(answers[1]["model"], "big-model");

    // Empty values go back to the server's defaults; the title is untouched.
    let (status, reset) = api
        .call(
            reqwest::Method::PATCH,
            &format!("/api/conversations/{conversation}"),
            Some(json!({"model": "", "systemPrompt": ""})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{reset}");
    assert!(
        reset.get("model").is_none() && reset.get("systemPrompt").is_none(),
        "{reset}"
    );
    assert_eq!(reset["title"], "hi");
    let asked = exchange(&upstream, &api, &conversation, "third", "fine").await;
    assert_eq!(asked["model"], "fake-model");
    assert_eq!(asked["messages"][0]["content"], "Server default prompt.");

    // Refused: a model the operator does not allow, nothing to change, too long a prompt,
    // another user's conversation, no token.
    let target = format!("/api/conversations/{conversation}");
    let patch = |body: Value| api.call(reqwest::Method::PATCH, &target, Some(body));
    let (status, error) = patch(json!({"model": "gpt-9"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("big-model"),
        "{error}"
    );
    let (status, _) = patch(json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = patch(json!({"systemPrompt": "x".repeat(40_000)})).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _) = patch(json!({"model": 7})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = api
        .post("/api/conversations", json!({"model": "gpt-9"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let stranger = server.user().await;
    let (status, _) = stranger
        .call(
            reqwest::Method::PATCH,
            &format!("/api/conversations/{conversation}"),
            Some(json!({"model": "big-model"})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let anonymous = Api {
        server: &server,
        token: None,
    };
    let (status, _) = anonymous.get("/api/models").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    server.shutdown().await.unwrap();
}

/// A server offering whatever `upstream` lists (`--models '*'`).
async fn offering_the_providers_models(upstream: &FakeUpstream) -> TestServer {
    TestServer::configured(Engine::Sqlite, |config| {
        upstream.configure(config);
        config.provider.models = vec!["*".into()];
    })
    .await
}

#[tokio::test]
async fn a_star_lists_the_providers_models_and_asks_rarely() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    upstream.set_models(&["beta", "alpha", "fake-model"]);
    let server = offering_the_providers_models(&upstream).await;
    let api = server.user().await;
    let (_, models) = api.get("/api/models").await;
    assert_eq!(models["models"], json!(["fake-model", "alpha", "beta"]));
    let (status, created) = api
        .post("/api/conversations", json!({"model": "beta"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (_, _) = api.get("/api/models").await;
    assert_eq!(upstream.model_lists(), 1, "the list is cached");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_huge_or_hostile_model_list_is_trimmed_to_what_a_menu_can_hold() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let mut names: Vec<String> = (0..1_500).map(|i| format!("model-{i:04}")).collect();
    // Both sort first: only the filter keeps them out.
    names.push(format!("a{}", "x".repeat(200)));
    names.push("a\nline".into());
    names.push("model-0000".into());
    upstream.set_models(&names.iter().map(String::as_str).collect::<Vec<_>>());
    let server = offering_the_providers_models(&upstream).await;
    let api = server.user().await;
    let (_, models) = api.get("/api/models").await;
    let models: Vec<&str> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    // The default, then the first thousand by name, once each.
    assert_eq!(models.len(), 1_001);
    assert_eq!(models[0], "fake-model");
    assert_eq!(models[1], "model-0000");
    assert_eq!(models[1_000], "model-0999");
    assert!(models.iter().all(|m| m.len() <= 200 && !m.contains('\n')));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_provider_that_never_lists_its_models_leaves_the_default_one() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    upstream.hang_model_lists();
    let server = TestServer::configured(Engine::Sqlite, |config| {
        upstream.configure(config);
        config.provider.models = vec!["*".into()];
        config.provider.model_list_timeout = std::time::Duration::from_millis(300);
    })
    .await;
    let api = server.user().await;
    let (status, models) = tokio::time::timeout(TIMEOUT, api.get("/api/models"))
        .await
        .expect("the list is answered without the provider's");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(models["models"], json!(["fake-model"]));
    assert_eq!(upstream.model_lists(), 1, "a timeout is not retried");
    server.shutdown().await.unwrap();
}
