//! The realtime heart of WADI against the real server: WebSocket and SSE clients, and a fake
//! OpenAI-compatible upstream streaming SSE at the pace each test sets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{
    Api, Engine, TIMEOUT, TestServer,
    upstream::{FakeUpstream, Request, Script, Step},
    ws::{WsClient, chunks, text},
};
use serde_json::{Value, json};

/// A server using `upstream`, adjusted by `adjust`, and a signed-in user with a conversation.
async fn setup(
    engine: Engine,
    upstream: &FakeUpstream,
    adjust: impl FnOnce(&mut wadi_server::Config),
) -> TestServer {
    TestServer::configured(engine, |config| {
        upstream.configure(config);
        adjust(config);
    })
    .await
}

fn token(api: &Api<'_>) -> String {
    api.token.clone().unwrap()
}

fn tokens(words: &[&str]) -> Script {
    Script::Tokens {
        tokens: words.iter().map(|w| (*w).to_owned()).collect(),
        pace: Duration::from_millis(5),
    }
}

/// Seqs among frames must be `from..=to` exactly, in order.
fn assert_seqs(frames: &[Value], expected: std::ops::RangeInclusive<u64>) {
    let seqs: Vec<u64> = chunks(frames).into_iter().map(|(seq, _)| seq).collect();
    assert_eq!(seqs, expected.collect::<Vec<_>>());
}

/// Reads chunk frames until their text is `expected`; returns the frames.
async fn read_text(ws: &mut WsClient, expected: &str) -> Vec<Value> {
    let mut frames = Vec::new();
    while text(&frames) != expected {
        let frame = ws.next().await;
        assert!(
            expected.starts_with(&text(&frames)),
            "unexpected text {:?} waiting for {expected:?}",
            text(&frames)
        );
        frames.push(frame);
    }
    frames
}

on_both_engines!(
    a_provider_that_sends_garbage_or_breaks_mid_event_fails_the_run_cleanly,
    concurrent_sends_start_one_run_and_never_end_it_as_an_orphan,
    a_silent_provider_fails_the_run_after_the_idle_timeout,
    a_resend_gets_its_start_even_when_the_socket_already_follows_the_run,
    a_running_run_no_task_drives_does_not_block_the_conversation,
    the_full_flow_streams_saves_and_matches,
    stop_before_the_first_token_cancels_upstream,
    stop_mid_stream_keeps_exactly_what_was_sent,
    deleting_a_conversation_stops_its_streaming_answer_at_once,
    another_users_run_cannot_be_read_followed_or_stopped_over_rest,
    another_users_run_cannot_be_stopped_or_resumed_over_a_socket,
    a_run_survives_disconnect_and_resumes_on_a_run_socket,
    resume_over_sse_with_last_event_id,
    a_reconnecting_chat_socket_learns_of_and_resumes_the_active_run,
    two_tabs_see_the_same_run_and_a_second_message_is_refused,
    upstream_failure_mid_stream_fails_the_run_and_keeps_the_output,
    a_resend_with_the_same_client_message_id_starts_nothing_new,
    shutdown_interrupts_and_saves_active_runs,
);

async fn a_provider_that_sends_garbage_or_breaks_mid_event_fails_the_run_cleanly(engine: Engine) {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(engine, &upstream, |_| {}).await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let (mut ws, _) =
        WsClient::authed(&server, &format!("/ws/chat/{conversation}"), &token(&api)).await;
    for (case, breakage) in [
        (
            "garbage",
            vec![Step::Raw("data: {this is not json]\n\n".into())],
        ),
        (
            "half an event",
            vec![
                Step::Raw("data: {\"id\":\"chatcmpl-fake\",\"choi".into()),
                Step::Fail,
            ],
        ),
        (
            "a clean end inside an event",
            vec![
                Step::Raw("data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo".into()),
                Step::End,
            ],
        ),
        (
            "an error event",
            vec![Step::Raw(
                "data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n"
                    .into(),
            )],
        ),
    ] {
        ws.send(json!({"type": "message", "content": case})).await;
        let start = ws.next().await;
        let request = upstream.next_request().await;
        request.token("kept ");
        read_text(&mut ws, "kept ").await;
        for step in breakage {
            request.send(step);
        }
        let frames = ws.until("complete").await;
        let error = frames.iter().find(|f| f["type"] == "error").unwrap();
        assert_eq!(error["code"], "model_error", "{case}");
        assert_eq!(
            error["message"], "the model provider's answer was cut off",
            "{case}"
        );
        let complete = frames.last().unwrap();
        assert_eq!(complete["status"], "failed", "{case}");
        assert_eq!(complete["fullOutput"], "kept ", "{case}: what came is kept");
        let (_, run) = api
            .get(&format!("/api/runs/{}", start["runId"].as_str().unwrap()))
            .await;
        assert_eq!(run["status"], "failed", "{case}");
        assert_eq!(run["output"], "kept ", "{case}");
    }
    server.shutdown().await.unwrap();
}

async fn concurrent_sends_start_one_run_and_never_end_it_as_an_orphan(engine: Engine) {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(engine, &upstream, |config| {
        config.runs.message_rate_burst = 100;
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    // Twenty sends at once: each that meets the new run in the store before this process has
    // registered it must see it as this process's, never as an orphan to end.
    let path = format!("/api/conversations/{conversation}/messages");
    let answers = futures_util::future::join_all(
        (0..20).map(|i| api.post(&path, json!({"content": format!("race {i}")}))),
    )
    .await;
    let created: Vec<&Value> = answers
        .iter()
        .filter(|(status, _)| *status == 201)
        .map(|(_, body)| body)
        .collect();
    assert_eq!(created.len(), 1, "exactly one run: {answers:?}");
    for (status, body) in &answers {
        assert!(
            *status == 201 || body["code"] == "run_in_progress",
            "{status} {body}"
        );
    }
    let run = created[0]["run"]["id"].as_str().unwrap();
    let (_, stored) = api.get(&format!("/api/runs/{run}")).await;
    assert_eq!(stored["status"], "running", "the new run was not ended");
    let request = upstream.next_request().await;
    request.send(Step::Finish);
    server.shutdown().await.unwrap();
}

async fn the_full_flow_streams_saves_and_matches(engine: Engine) {
    // A U+0000 from the provider is dropped (Postgres cannot store it): streamed and saved alike.
    let upstream = FakeUpstream::start(tokens(&["Hel", "lo", ", ", "wor\u{0}ld", "!"])).await;
    let server = setup(engine, &upstream, |_| {}).await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let (mut ws, authenticated) =
        WsClient::authed(&server, &format!("/ws/chat/{conversation}"), &token(&api)).await;
    assert!(authenticated["userId"].is_string());
    assert!(authenticated["expiresAt"].as_i64().unwrap() > 0);
    assert!(authenticated.get("activeRun").is_none());

    ws.send(json!({"type": "message", "content": "Say hello", "clientMessageId": "c-1"}))
        .await;
    let frames = ws.until("complete").await;
    let start = &frames[0];
    assert_eq!(start["type"], "start");
    assert_eq!(start["conversationId"], conversation.as_str());
    let run_id = start["runId"].as_str().unwrap().to_owned();
    let streamed = text(&frames);
    assert_eq!(streamed, "Hello, world!");
    let last = chunks(&frames).len() as u64;
    assert_seqs(&frames, 1..=last);
    let complete = frames.last().unwrap();
    assert_eq!(complete["runId"], run_id.as_str());
    assert_eq!(complete["status"], "completed");
    assert_eq!(complete["fullOutput"], streamed.as_str());
    assert_eq!(complete["usage"]["completionTokens"], 5);
    // The provider's own report is not an estimate.
    assert!(complete["usage"].get("estimated").is_none(), "{complete}");

    // What the model was asked.
    let request = upstream.next_request().await;
    assert_eq!(request.body["model"], "fake-model");
    assert_eq!(request.body["stream"], true);
    assert_eq!(
        request.messages().last().unwrap(),
        &("user".to_owned(), "Say hello".to_owned())
    );

    // What was saved equals what was streamed.
    let (_, messages) = api
        .get(&format!("/api/conversations/{conversation}/messages"))
        .await;
    let items = messages["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["role"], "user");
    assert_eq!(items[0]["id"], start["messageId"]);
    assert_eq!(items[0]["clientMessageId"], "c-1");
    assert_eq!(items[1]["role"], "assistant");
    assert_eq!(items[1]["content"], streamed.as_str());
    assert_eq!(items[1]["runStatus"], "completed");
    let (_, run) = api.get(&format!("/api/runs/{run_id}")).await;
    assert_eq!(run["status"], "completed");
    assert_eq!(run["output"], streamed.as_str());
    assert_eq!(run["lastSeq"], last);
    assert_eq!(run["usage"]["totalTokens"], 12);
    server.shutdown().await.unwrap();
}

/// The usage the server estimates for a run that sent `prompt` and kept `output`: OpenAI's
/// counting (3 framing tokens per message, 3 priming the reply) with `o200k_base`, the
/// vocabulary for a model the server does not know (`fake-model`).
fn estimated_usage(prompt: &[(String, String)], output: &str) -> Value {
    let bpe = tiktoken_rs::o200k_base_singleton();
    let prompt_tokens = prompt
        .iter()
        .map(|(role, content)| 3 + bpe.count_ordinary(role) + bpe.count_ordinary(content))
        .sum::<usize>()
        + 3;
    let completion_tokens = bpe.count_ordinary(output);
    json!({
        "promptTokens": prompt_tokens,
        "completionTokens": completion_tokens,
        "totalTokens": prompt_tokens + completion_tokens,
        "estimated": true,
    })
}

async fn stop_before_the_first_token_cancels_upstream(engine: Engine) {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(engine, &upstream, |_| {}).await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let (mut ws, _) =
        WsClient::authed(&server, &format!("/ws/chat/{conversation}"), &token(&api)).await;
    ws.send(json!({"type": "message", "content": "think hard"}))
        .await;
    let start = ws.next().await;
    assert_eq!(start["type"], "start");
    let request = upstream.next_request().await;
    ws.send(json!({"type": "stop"})).await;
    let complete = ws.next().await;
    assert_eq!(complete["type"], "complete", "{complete}");
    assert_eq!(complete["status"], "stopped");
    assert_eq!(complete["fullOutput"], "");
    // The prompt was sent, so it counts; the answer had no token yet.
    let usage = estimated_usage(&request.messages(), "");
    assert_eq!(usage["completionTokens"], 0);
    assert_eq!(complete["usage"], usage);
    request.cancelled().await;
    // A token the upstream might still send goes nowhere.
    request.token("too late");
    let run_id = start["runId"].as_str().unwrap();
    let (_, run) = api.get(&format!("/api/runs/{run_id}")).await;
    assert_eq!(run["status"], "stopped");
    assert_eq!(run["output"], "");
    server.shutdown().await.unwrap();
}

/// A new conversation of `api`'s, a chat socket on it, and a run answering `content` there
/// whose first words (`first`) the socket has read: (socket, conversation, run id, request).
async fn streaming_run(
    server: &TestServer,
    upstream: &FakeUpstream,
    api: &Api<'_>,
    first: &str,
) -> (WsClient, String, String, Arc<Request>) {
    let conversation = api.new_conversation().await;
    let (mut ws, _) =
        WsClient::authed(server, &format!("/ws/chat/{conversation}"), &token(api)).await;
    ws.send(json!({"type": "message", "content": "a long answer"}))
        .await;
    let run_id = ws.next().await["runId"].as_str().unwrap().to_owned();
    let request = upstream.next_request().await;
    request.token(first);
    read_text(&mut ws, first).await;
    (ws, conversation, run_id, request)
}

/// Streams `rest` and ends the run: it completes with `whole`, as if nothing had happened.
async fn finishes_untouched(ws: &mut WsClient, request: &Request, rest: &str, whole: &str) {
    request.token(rest);
    read_text(ws, rest).await;
    request.send(Step::Finish);
    let complete = ws.until("complete").await.pop().unwrap();
    assert_eq!(complete["status"], "completed");
    assert_eq!(complete["fullOutput"], whole);
}

async fn deleting_a_conversation_stops_its_streaming_answer_at_once(engine: Engine) {
    let upstream = FakeUpstream::start(Script::Manual).await;
    // No checkpoint and no heartbeat during the test: they would notice the deleted run too,
    // within a second or two, and hide whether the delete itself stops it.
    let server = setup(engine, &upstream, |config| {
        config.runs.flush_interval = Duration::from_secs(3600);
        config.runs.instance_heartbeat = Duration::from_secs(3600);
    })
    .await;
    let api = server.user().await;
    let (mut ws, conversation, run_id, request) =
        streaming_run(&server, &upstream, &api, "first words ").await;

    // Another user cannot delete it (and so cannot stop it).
    let other = server.user().await;
    let status = other.delete_conversation(&conversation).await;
    assert_eq!(status, 404);
    request.token("more ");
    read_text(&mut ws, "more ").await;
    let (mut sidebar, _) = WsClient::authed(&server, "/ws/user", &token(&api)).await;

    let status = api.delete_conversation(&conversation).await;
    assert_eq!(status, 204);
    // The provider is let go of at once, and the open socket is told the answer stopped.
    request.cancelled().await;
    let complete = ws.until("complete").await.pop().unwrap();
    assert_eq!(complete["runId"], run_id.as_str());
    assert_eq!(complete["status"], "stopped");
    // The sidebar hears it was deleted, and nothing of it after that (an `answered` would
    // come before `complete` is sent: a conversation made now is the next thing it hears).
    let next = api.new_conversation().await;
    let heard = sidebar.until("conversation").await;
    assert_eq!(heard.last().unwrap()["change"], "deleted", "{heard:?}");
    let heard = sidebar.next().await;
    assert_eq!(heard["change"], "created", "{heard}");
    assert_eq!(heard["conversationId"], next.as_str());
    // Nothing of it came back: not its row, nor its replay, which this server keeps in memory
    // for a while after a run ends.
    let (status, _) = api.get(&format!("/api/runs/{run_id}")).await;
    assert_eq!(status, 404);
    let (status, body) = api.get(&format!("/api/runs/{run_id}/events")).await;
    assert_eq!(status, 404, "{body}");
    let mut replay = WsClient::connect(&server, &format!("/ws/runs/{run_id}/stream")).await;
    replay
        .send(json!({"type": "auth", "token": token(&api)}))
        .await;
    let (frames, code) = replay.until_closed().await;
    assert_eq!(code, 1008, "{frames:?}");
    assert_eq!(frames.len(), 1, "nothing but the refusal: {frames:?}");
    assert_eq!(frames[0]["code"], "not_found");
    // The chat socket, once told the answer stopped, is told the conversation is gone and
    // closed: it has nothing left to show or take.
    let (frames, code) = ws.until_closed().await;
    assert_eq!(
        code,
        wadi_protocol::close::CONVERSATION_DELETED,
        "{frames:?}"
    );
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0]["code"], "not_found", "{frames:?}");
    let (status, _) = api
        .get(&format!("/api/conversations/{conversation}/messages"))
        .await;
    assert_eq!(status, 404);
    // The deleted conversation takes nothing more over REST.
    let (status, _) = api
        .post(
            &format!("/api/conversations/{conversation}/messages"),
            json!({"content": "after the delete"}),
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = api
        .call(
            reqwest::Method::PATCH,
            &format!("/api/conversations/{conversation}"),
            Some(json!({"title": "back?"})),
        )
        .await;
    assert_eq!(status, 404);
    let id = uuid::Uuid::parse_str(&conversation).unwrap();
    assert_eq!(
        server
            .db()
            .count(
                "SELECT COUNT(*) FROM messages WHERE conversation_id = $1",
                id
            )
            .await,
        0,
        "nothing written"
    );
    server.shutdown().await.unwrap();
}

async fn another_users_run_cannot_be_read_followed_or_stopped_over_rest(engine: Engine) {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(engine, &upstream, |_| {}).await;
    let api = server.user().await;
    let (mut ws, _, run_id, request) = streaming_run(&server, &upstream, &api, "secret ").await;

    let other = server.user().await;
    let anonymous = server.anonymous();
    for (who, expected) in [(&other, 404), (&anonymous, 401)] {
        let (status, body) = who.get(&format!("/api/runs/{run_id}")).await;
        assert_eq!(status, expected, "{body}");
        assert!(!body.to_string().contains("secret"), "{body}");
        let (status, body) = who.get(&format!("/api/runs/{run_id}/events")).await;
        assert_eq!(status, expected, "{body}");
        let (status, body) = who
            .post(&format!("/api/runs/{run_id}/stop"), json!({}))
            .await;
        assert_eq!(status, expected, "{body}");
    }
    finishes_untouched(&mut ws, &request, "still going", "secret still going").await;
    server.shutdown().await.unwrap();
}

async fn another_users_run_cannot_be_stopped_or_resumed_over_a_socket(engine: Engine) {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(engine, &upstream, |_| {}).await;
    let owner = server.user().await;
    let (mut ws, _, run_id, request) = streaming_run(&server, &upstream, &owner, "secret ").await;

    let intruder = server.user().await;
    let theirs = intruder.new_conversation().await;
    let (mut other, _) =
        WsClient::authed(&server, &format!("/ws/chat/{theirs}"), &token(&intruder)).await;
    other.send(json!({"type": "stop", "runId": run_id})).await;
    let refused = other.next().await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "no_active_run", "{refused}");
    other
        .send(json!({"type": "resume", "runId": run_id, "afterSeq": 0}))
        .await;
    let refused = other.next().await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "not_found", "{refused}");
    // The socket is still usable, and nothing of the run reached it.
    other.send(json!({"type": "ping"})).await;
    assert_eq!(other.next().await["type"], "pong");
    finishes_untouched(&mut ws, &request, "still going", "secret still going").await;
    server.shutdown().await.unwrap();
}

async fn stop_mid_stream_keeps_exactly_what_was_sent(engine: Engine) {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(engine, &upstream, |_| {}).await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let (mut ws, _) =
        WsClient::authed(&server, &format!("/ws/chat/{conversation}"), &token(&api)).await;

    // Over the socket.
    ws.send(json!({"type": "message", "content": "count"}))
        .await;
    let start = ws.next().await;
    let run_id = start["runId"].as_str().unwrap().to_owned();
    let request = upstream.next_request().await;
    for word in ["one ", "two ", "three "] {
        request.token(word);
    }
    let frames = read_text(&mut ws, "one two three ").await;
    ws.send(json!({"type": "stop", "runId": run_id})).await;
    let complete = ws.until("complete").await.pop().unwrap();
    assert_eq!(complete["status"], "stopped");
    assert_eq!(complete["fullOutput"], text(&frames).as_str());
    request.cancelled().await;
    // The provider never reported usage: it is counted with the model's tokenizer, exactly the
    // prompt that was sent and the output that was kept, and marked as an estimate.
    let usage = estimated_usage(&request.messages(), "one two three ");
    assert_eq!(complete["usage"], usage);
    let (_, run) = api.get(&format!("/api/runs/{run_id}")).await;
    assert_eq!(run["status"], "stopped");
    assert_eq!(run["output"], "one two three ");
    assert_eq!(run["usage"], usage);
    let (_, messages) = api
        .get(&format!("/api/conversations/{conversation}/messages"))
        .await;
    assert_eq!(messages["items"][1]["content"], "one two three ");
    assert_eq!(messages["items"][1]["runStatus"], "stopped");
    assert_eq!(messages["items"][1]["usage"], usage);

    // Over REST.
    let (status, sent) = api
        .post(
            &format!("/api/conversations/{conversation}/messages"),
            json!({"content": "again"}),
        )
        .await;
    assert_eq!(status, 201);
    let run_id = sent["run"]["id"].as_str().unwrap().to_owned();
    let request = upstream.next_request().await;
    request.token("partial");
    read_text(&mut ws, "partial").await;
    let (status, stopped) = api
        .post(&format!("/api/runs/{run_id}/stop"), json!({}))
        .await;
    assert_eq!(status, 200, "{stopped}");
    assert_eq!(stopped["status"], "stopped");
    assert_eq!(stopped["output"], "partial");
    request.cancelled().await;
    let (status, again) = api
        .post(&format!("/api/runs/{run_id}/stop"), json!({}))
        .await;
    assert_eq!(status, 409);
    assert_eq!(again["code"], "no_active_run");
    // Stopping with nothing running says so.
    ws.until("complete").await;
    ws.send(json!({"type": "stop"})).await;
    assert_eq!(ws.next().await["code"], "no_active_run");
    server.shutdown().await.unwrap();
}

async fn a_run_survives_disconnect_and_resumes_on_a_run_socket(engine: Engine) {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(engine, &upstream, |_| {}).await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let (mut ws, _) =
        WsClient::authed(&server, &format!("/ws/chat/{conversation}"), &token(&api)).await;
    ws.send(json!({"type": "message", "content": "long answer please"}))
        .await;
    let start = ws.next().await;
    let run_id = start["runId"].as_str().unwrap().to_owned();
    let request = upstream.next_request().await;
    for word in ["a1 ", "a2 ", "a3 "] {
        request.token(word);
    }
    let before = read_text(&mut ws, "a1 a2 a3 ").await;
    let seen = chunks(&before).last().unwrap().0;
    ws.close().await;

    // Nobody is watching: the run goes on.
    for word in ["b1 ", "b2 "] {
        request.token(word);
    }
    let (mut run_socket, authenticated) = WsClient::authed(
        &server,
        &format!("/ws/runs/{run_id}/stream?afterSeq={seen}"),
        &token(&api),
    )
    .await;
    assert!(authenticated.get("activeRun").is_none());
    request.token("c1 ");
    request.send(Step::Finish);
    let (after, code) = run_socket.until_closed().await;
    assert_eq!(code, 1000, "a run socket closes normally after complete");
    let complete = after.last().unwrap();
    assert_eq!(complete["type"], "complete");
    assert_eq!(complete["status"], "completed");
    let full = "a1 a2 a3 b1 b2 c1 ";
    assert_eq!(complete["fullOutput"], full);
    // Every seq exactly once, in order, across both sockets.
    let mut all = before.clone();
    all.extend(after.iter().cloned());
    assert_seqs(&all, 1..=chunks(&all).len() as u64);
    assert_eq!(text(&all), full);

    // A run socket on a finished run replays from the retained log, then closes.
    let (mut late, _) = WsClient::authed(
        &server,
        &format!("/ws/runs/{run_id}/stream?afterSeq={seen}"),
        &token(&api),
    )
    .await;
    let (replay, code) = late.until_closed().await;
    assert_eq!(code, 1000);
    assert_eq!(chunks(&replay), chunks(&after));
    assert_eq!(replay.last().unwrap()["fullOutput"], full);
    let (_, run) = api.get(&format!("/api/runs/{run_id}")).await;
    assert_eq!(run["output"], full);
    server.shutdown().await.unwrap();
}

/// Parses an SSE body into (event, id, data JSON).
fn sse_events(body: &str) -> Vec<(String, Option<u64>, Value)> {
    body.split("\n\n")
        .filter(|block| block.contains("data:"))
        .map(|block| {
            let mut event = String::new();
            let mut id = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    event = value.trim().to_owned();
                } else if let Some(value) = line.strip_prefix("id:") {
                    id = value.trim().parse().ok();
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push_str(value.trim_start());
                }
            }
            (event, id, serde_json::from_str(&data).unwrap())
        })
        .collect()
}

async fn resume_over_sse_with_last_event_id(engine: Engine) {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(engine, &upstream, |_| {}).await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let (status, sent) = api
        .post(
            &format!("/api/conversations/{conversation}/messages"),
            json!({"content": "stream it over SSE"}),
        )
        .await;
    assert_eq!(status, 201);
    let run_id = sent["run"]["id"].as_str().unwrap().to_owned();
    let request = upstream.next_request().await;
    request.token("x1 ");
    request.token("x2 ");
    // First SSE connection: read until the first chunk, then drop it.
    let response = api
        .request(reqwest::Method::GET, &format!("/api/runs/{run_id}/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.bytes_stream();
    let mut first = String::new();
    while !first.contains("\n\n") {
        use futures_util::StreamExt;
        let bytes = tokio::time::timeout(TIMEOUT, body.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        first.push_str(std::str::from_utf8(&bytes).unwrap());
    }
    drop(body);
    let first_events: Vec<_> = sse_events(&first)
        .into_iter()
        .filter(|(event, ..)| event == "chunk")
        .collect();
    let last_id = first_events.last().unwrap().1.unwrap();

    request.token("x3 ");
    request.send(Step::Finish);
    let rest = api
        .request(reqwest::Method::GET, &format!("/api/runs/{run_id}/events"))
        .header("Last-Event-ID", last_id.to_string())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let rest = sse_events(&rest);
    let (complete_event, _, complete) = rest.last().unwrap();
    assert_eq!(complete_event, "complete");
    assert_eq!(complete["status"], "completed");
    let mut frames: Vec<Value> = first_events
        .iter()
        .map(|(_, _, data)| data.clone())
        .collect();
    for (event, id, data) in &rest {
        if event == "chunk" {
            assert_eq!(Some(data["seq"].as_u64().unwrap()), *id, "id: is the seq");
            frames.push(data.clone());
        }
    }
    assert_seqs(&frames, 1..=chunks(&frames).len() as u64);
    assert_eq!(text(&frames), "x1 x2 x3 ");
    assert_eq!(complete["fullOutput"], "x1 x2 x3 ");
    let (status, bad) = api
        .get(&format!("/api/runs/{run_id}/events?afterSeq=soon"))
        .await;
    assert_eq!(status, 400);
    assert_eq!(bad["code"], "invalid_request");
    for last_event_id in ["soon", "-1", "1.5", "18446744073709551616"] {
        let response = api
            .request(reqwest::Method::GET, &format!("/api/runs/{run_id}/events"))
            .header("Last-Event-ID", last_event_id)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "Last-Event-ID {last_event_id}");
        let bad: Value = response.json().await.unwrap();
        assert_eq!(
            bad["code"], "invalid_request",
            "Last-Event-ID {last_event_id}"
        );
        assert_eq!(bad["message"], "Last-Event-ID must be a seq");
    }
    // An empty one is none (nothing seen yet): the whole run again.
    let response = api
        .request(reqwest::Method::GET, &format!("/api/runs/{run_id}/events"))
        .header("Last-Event-ID", "")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    assert!(body.contains("id: 1\n"), "{body}");
    server.shutdown().await.unwrap();
}

async fn a_reconnecting_chat_socket_learns_of_and_resumes_the_active_run(engine: Engine) {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(engine, &upstream, |_| {}).await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let path = format!("/ws/chat/{conversation}");
    let (mut ws, _) = WsClient::authed(&server, &path, &token(&api)).await;
    ws.send(json!({"type": "message", "content": "go"})).await;
    let start = ws.next().await;
    let request = upstream.next_request().await;
    request.token("p1 ");
    request.token("p2 ");
    let before = read_text(&mut ws, "p1 p2 ").await;
    let seen = chunks(&before).last().unwrap().0;
    ws.close().await;
    request.token("p3 ");

    let (mut again, authenticated) = WsClient::authed(&server, &path, &token(&api)).await;
    let active = &authenticated["activeRun"];
    assert_eq!(active["runId"], start["runId"]);
    assert_eq!(active["messageId"], start["messageId"]);
    assert!(active["lastSeq"].as_u64().unwrap() >= seen);
    again
        .send(json!({"type": "resume", "runId": start["runId"], "afterSeq": seen}))
        .await;
    request.token("p4");
    request.send(Step::Finish);
    let after = again.until("complete").await;
    let mut all = before.clone();
    all.extend(after.iter().cloned());
    assert_seqs(&all, 1..=chunks(&all).len() as u64);
    assert_eq!(text(&all), "p1 p2 p3 p4");
    assert_eq!(after.last().unwrap()["fullOutput"], "p1 p2 p3 p4");
    // Resuming an unknown run says so.
    again
        .send(json!({"type": "resume", "runId": uuid::Uuid::now_v7(), "afterSeq": 0}))
        .await;
    assert_eq!(again.next().await["code"], "not_found");
    server.shutdown().await.unwrap();
}

async fn two_tabs_see_the_same_run_and_a_second_message_is_refused(engine: Engine) {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(engine, &upstream, |_| {}).await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let path = format!("/ws/chat/{conversation}");
    let (mut tab1, _) = WsClient::authed(&server, &path, &token(&api)).await;
    let (mut tab2, _) = WsClient::authed(&server, &path, &token(&api)).await;
    tab1.send(json!({"type": "message", "content": "hello from tab 1"}))
        .await;
    let start1 = tab1.next().await;
    let start2 = tab2.next().await;
    assert_eq!(start1, start2);
    let request = upstream.next_request().await;

    tab2.send(json!({"type": "message", "content": "me too"}))
        .await;
    let refused = tab2.next().await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["code"], "run_in_progress");
    let (status, body) = api
        .post(
            &format!("/api/conversations/{conversation}/messages"),
            json!({"content": "rest"}),
        )
        .await;
    assert_eq!(status, 409);
    assert_eq!(body["code"], "run_in_progress");

    for word in ["same ", "for ", "both"] {
        request.token(word);
    }
    request.send(Step::Finish);
    let frames1 = tab1.until("complete").await;
    let frames2 = tab2.until("complete").await;
    assert_eq!(chunks(&frames1), chunks(&frames2), "same seqs, same text");
    assert_eq!(text(&frames1), "same for both");
    // Nothing of the refused messages was stored.
    let (_, messages) = api
        .get(&format!("/api/conversations/{conversation}/messages"))
        .await;
    assert_eq!(messages["items"].as_array().unwrap().len(), 2);
    // Once complete, the other tab may send.
    tab2.send(json!({"type": "message", "content": "my turn"}))
        .await;
    assert_eq!(tab2.next().await["type"], "start");
    assert_eq!(tab1.next().await["type"], "start");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_answer_past_the_size_limit_ends_failed_with_what_came_before_it() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(Engine::Sqlite, &upstream, |config| {
        config.runs.max_answer_bytes = 10;
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let (mut ws, _) =
        WsClient::authed(&server, &format!("/ws/chat/{conversation}"), &token(&api)).await;
    ws.send(json!({"type": "message", "content": "never stop"}))
        .await;
    let start = ws.next().await;
    let request = upstream.next_request().await;
    // 8 bytes, then two 2-byte characters of which one fits: the cut is between characters.
    request.token("abcdefgh");
    request.token("éé");
    request.token("and on and on");
    let frames = ws.until("complete").await;
    let error = frames.iter().find(|f| f["type"] == "error").unwrap();
    assert_eq!(error["code"], "model_error");
    assert_eq!(
        error["message"],
        "the answer was longer than this server keeps (10 bytes)"
    );
    let complete = frames.last().unwrap();
    assert_eq!(complete["status"], "failed");
    assert_eq!(complete["fullOutput"], "abcdefghé");
    assert_eq!(text(&frames), "abcdefghé");
    // The provider is told to stop.
    request.cancelled().await;
    let run_id = start["runId"].as_str().unwrap();
    let (_, run) = api.get(&format!("/api/runs/{run_id}")).await;
    assert_eq!(run["status"], "failed");
    assert_eq!(run["output"], "abcdefghé");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_answer_the_provider_cuts_at_its_limit_ends_failed_saying_why() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(Engine::Sqlite, &upstream, |config| {
        config.provider.max_output_tokens = Some(3);
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let (mut ws, _) =
        WsClient::authed(&server, &format!("/ws/chat/{conversation}"), &token(&api)).await;
    for (reason, says) in [
        ("length", "the answer reached its length limit"),
        (
            "content_filter",
            "the model provider's content filter stopped the answer",
        ),
    ] {
        ws.send(json!({"type": "message", "content": reason})).await;
        let start = ws.next().await;
        let request = upstream.next_request().await;
        // The limit is asked of the provider.
        assert_eq!(request.body["max_tokens"], 3, "{}", request.body);
        request.token("one two three");
        request.send(Step::Raw(format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"{reason}\"}}]}}\n\n"
        )));
        // The usage still comes after it, and is kept.
        request.send(Step::Finish);
        let frames = ws.until("complete").await;
        let error = frames.iter().find(|f| f["type"] == "error").unwrap();
        assert_eq!(error["code"], "model_error");
        assert_eq!(error["message"], says);
        let complete = frames.last().unwrap();
        assert_eq!(complete["status"], "failed");
        assert_eq!(complete["fullOutput"], "one two three");
        assert_eq!(complete["usage"]["estimated"], json!(null), "{complete}");
        let run_id = start["runId"].as_str().unwrap();
        let (_, run) = api.get(&format!("/api/runs/{run_id}")).await;
        assert_eq!(run["status"], "failed");
        assert_eq!(run["error"], says);
        assert_eq!(run["output"], "one two three");
    }
    server.shutdown().await.unwrap();
}

async fn upstream_failure_mid_stream_fails_the_run_and_keeps_the_output(engine: Engine) {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(engine, &upstream, |_| {}).await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let (mut ws, _) =
        WsClient::authed(&server, &format!("/ws/chat/{conversation}"), &token(&api)).await;
    ws.send(json!({"type": "message", "content": "fail please"}))
        .await;
    let start = ws.next().await;
    let request = upstream.next_request().await;
    request.token("par");
    request.token("tial");
    read_text(&mut ws, "partial").await;
    request.send(Step::Fail);
    let frames = ws.until("complete").await;
    let error = frames.iter().find(|f| f["type"] == "error").unwrap();
    assert_eq!(error["code"], "model_error");
    assert_eq!(error["runId"], start["runId"]);
    let complete = frames.last().unwrap();
    assert_eq!(complete["status"], "failed");
    assert_eq!(complete["fullOutput"], "partial");
    let run_id = start["runId"].as_str().unwrap();
    let (_, run) = api.get(&format!("/api/runs/{run_id}")).await;
    assert_eq!(run["status"], "failed");
    assert_eq!(run["output"], "partial");
    // What users see is the kind of failure, never the provider's words or address.
    assert_eq!(error["message"], "the model provider's answer was cut off");
    assert_eq!(run["error"], error["message"]);

    // A provider that keeps answering 500 is retried with backoff before the first token, then
    // the run fails.
    upstream.set_script(Script::Status(500));
    ws.send(json!({"type": "message", "content": "again"}))
        .await;
    let frames = ws.until("complete").await;
    assert_eq!(frames.last().unwrap()["status"], "failed");
    assert_eq!(frames.last().unwrap()["fullOutput"], "");
    let error = frames.iter().find(|f| f["code"] == "model_error").unwrap();
    assert_eq!(
        error["message"],
        "the model provider is unavailable; try again in a moment"
    );
    assert_eq!(
        upstream.statuses_served(),
        vec![500, 500, 500, 500],
        "1 try + 3 retries"
    );

    // A spent quota is a refusal: no wait cures it, so it is not asked again.
    upstream.set_script(Script::Error {
        status: 429,
        kind: "insufficient_quota",
    });
    ws.send(json!({"type": "message", "content": "out of money"}))
        .await;
    let frames = ws.until("complete").await;
    let error = frames.iter().find(|f| f["code"] == "model_error").unwrap();
    assert_eq!(error["message"], "the model provider refused the request");
    assert_eq!(
        upstream.statuses_served(),
        vec![500, 500, 500, 500, 429],
        "no retry"
    );

    // A refusal (a bad key, say): the provider's message stays in the log.
    upstream.set_script(Script::Status(401));
    ws.send(json!({"type": "message", "content": "once more"}))
        .await;
    let frames = ws.until("complete").await;
    let error = frames.iter().find(|f| f["code"] == "model_error").unwrap();
    assert_eq!(error["message"], "the model provider refused the request");
    for frame in &frames {
        let text = frame.to_string();
        assert!(!text.contains("fake upstream error"), "{text}");
        assert!(!text.contains("127.0.0.1"), "{text}");
    }
    server.shutdown().await.unwrap();
}

async fn a_resend_with_the_same_client_message_id_starts_nothing_new(engine: Engine) {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(engine, &upstream, |_| {}).await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let path = format!("/ws/chat/{conversation}");
    let (mut ws, _) = WsClient::authed(&server, &path, &token(&api)).await;
    let message = json!({"type": "message", "content": "once", "clientMessageId": "same-id"});
    ws.send(message.clone()).await;
    let start = ws.next().await;
    let request = upstream.next_request().await;
    request.token("one ");
    read_text(&mut ws, "one ").await;
    ws.close().await;
    // After a reconnect the client resends: the same run comes back, nothing new is stored.
    let (mut again, _) = WsClient::authed(&server, &path, &token(&api)).await;
    again.send(message.clone()).await;
    let replayed_start = again.next().await;
    assert_eq!(replayed_start, start);
    request.token("answer");
    request.send(Step::Finish);
    let frames = again.until("complete").await;
    assert_eq!(text(&frames), "one answer", "replayed from seq 1");
    // Once finished, a resend answers with the outcome.
    again.send(message).await;
    let frames = again.until("complete").await;
    assert_eq!(frames[0], start);
    assert_eq!(frames.last().unwrap()["fullOutput"], "one answer");
    let (_, messages) = api
        .get(&format!("/api/conversations/{conversation}/messages"))
        .await;
    assert_eq!(messages["items"].as_array().unwrap().len(), 2);
    server.shutdown().await.unwrap();
}

async fn shutdown_interrupts_and_saves_active_runs(engine: Engine) {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let mut server = setup(engine, &upstream, |_| {}).await;
    let api = server.user().await;
    let token = token(&api);
    let conversation = api.new_conversation().await;
    let (mut ws, _) = WsClient::authed(&server, &format!("/ws/chat/{conversation}"), &token).await;
    ws.send(json!({"type": "message", "content": "long"})).await;
    let start = ws.next().await;
    let request = upstream.next_request().await;
    request.token("kept");
    read_text(&mut ws, "kept").await;
    let stopping = tokio::spawn(async move {
        server.stop().await.unwrap();
        server
    });
    let (frames, code) = ws.until_closed().await;
    assert_eq!(code, 1001);
    let complete = frames.iter().find(|f| f["type"] == "complete").unwrap();
    assert_eq!(complete["status"], "interrupted");
    assert_eq!(complete["fullOutput"], "kept");
    assert!(frames.iter().any(|f| f["code"] == "shutting_down"));
    request.cancelled().await;
    let mut server = stopping.await.unwrap();
    let db = server.take_db();
    let uuid = uuid::Uuid::parse_str(start["runId"].as_str().unwrap()).unwrap();
    assert_eq!(
        db.count("SELECT COUNT(*) FROM runs WHERE id = $1 AND status = 'interrupted' AND output = 'kept'", uuid)
            .await,
        1
    );
    db.drop_database().await;
}

// ---- Authentication on sockets ----

on_both_engines!(
    auth_deadline_bad_tokens_and_frames_before_auth,
    another_users_conversation_and_run_close_with_1008,
);

async fn auth_deadline_bad_tokens_and_frames_before_auth(engine: Engine) {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(engine, &upstream, |config| {
        config.sockets.auth_timeout = Duration::from_millis(300);
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let path = format!("/ws/chat/{conversation}");

    let mut silent = WsClient::connect(&server, &path).await;
    let (frames, code) = silent.until_closed().await;
    assert_eq!(frames[0]["code"], "auth_timeout");
    assert_eq!(code, 1008);

    let mut bad = WsClient::connect(&server, &path).await;
    bad.send(json!({"type": "auth", "token": "not-a-jwt"}))
        .await;
    let (frames, code) = bad.until_closed().await;
    assert_eq!(frames[0]["code"], "invalid_token");
    assert_eq!(code, 1008);

    let mut early = WsClient::connect(&server, &path).await;
    early
        .send(json!({"type": "message", "content": "hi"}))
        .await;
    assert_eq!(early.next().await["code"], "not_authenticated");
    early.send(json!({"type": "stop"})).await;
    assert_eq!(early.next().await["code"], "not_authenticated");
    let someone = uuid::Uuid::now_v7();
    early
        .send(json!({"type": "regenerate", "messageId": someone}))
        .await;
    assert_eq!(early.next().await["code"], "not_authenticated");
    early
        .send(json!({"type": "resume", "runId": someone, "afterSeq": 0}))
        .await;
    assert_eq!(early.next().await["code"], "not_authenticated");
    // An auth frame without its token, or with one of the wrong type, is a typed error; the
    // socket can still authenticate.
    early.send(json!({"type": "auth"})).await;
    assert_eq!(early.next().await["code"], "invalid_message");
    early.send(json!({"type": "auth", "token": 5})).await;
    assert_eq!(early.next().await["code"], "invalid_message");
    early.send(json!({"type": "ping"})).await;
    assert_eq!(early.next().await["type"], "pong");
    early
        .send(json!({"type": "auth", "token": token(&api)}))
        .await;
    assert_eq!(early.next().await["type"], "authenticated");
    server.shutdown().await.unwrap();
}

async fn another_users_conversation_and_run_close_with_1008(engine: Engine) {
    let upstream = FakeUpstream::start(tokens(&["private"])).await;
    let server = setup(engine, &upstream, |_| {}).await;
    let owner = server.user().await;
    let intruder = server.user().await;
    let conversation = owner.new_conversation().await;
    let sent = owner.send_and_finish(&conversation, "secret").await;
    let run_id = sent["run"]["id"].as_str().unwrap().to_owned();
    let missing = uuid::Uuid::now_v7();
    for path in [
        format!("/ws/chat/{conversation}"),
        format!("/ws/chat/{missing}"),
        format!("/ws/runs/{run_id}/stream"),
        format!("/ws/runs/{missing}/stream"),
    ] {
        let mut ws = WsClient::connect(&server, &path).await;
        ws.send(json!({"type": "auth", "token": token(&intruder)}))
            .await;
        let (frames, code) = ws.until_closed().await;
        assert_eq!(code, 1008, "{path}");
        assert_eq!(frames.len(), 1, "{path}: nothing but the refusal");
        assert_eq!(frames[0]["code"], "not_found", "{path}");
    }
    server.shutdown().await.unwrap();
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

const SECRET: &str = "a-test-secret-that-is-long-enough-for-hs256";

fn mint(user: uuid::Uuid, exp: i64) -> String {
    let claims = json!({
        "iss": "wadi", "sub": user.to_string(), "aud": "authenticated", "exp": exp,
        "iat": now(), "role": "authenticated", "email": "", "session_id": uuid::Uuid::new_v4(),
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A server accepting HS256 tokens the test mints, with no leeway, and a conversation of `user`.
async fn minting_server(user: uuid::Uuid) -> (TestServer, FakeUpstream, String) {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(Engine::Sqlite, &upstream, |config| {
        config.auth.supabase_jwt_secret = Some(SECRET.into());
        config.auth.jwt_leeway = Duration::ZERO;
    })
    .await;
    let api = Api {
        server: &server,
        token: Some(mint(user, now() + 600)),
    };
    let conversation = api.new_conversation().await;
    (server, upstream, conversation)
}

/// Moves tokio's clock (which the server's timers and its token clock follow) by `by`, at
/// once, letting every timer due meanwhile fire.
async fn fast_forward(by: Duration) {
    tokio::time::pause();
    tokio::time::advance(by).await;
    tokio::time::resume();
}

/// The next frame after a `ping` of ours: a `pong` if the socket is open and had nothing else to
/// say, or whatever came first.
async fn next_after_ping(ws: &mut WsClient) -> common::ws::Incoming {
    ws.send(json!({"type": "ping"})).await;
    ws.incoming().await
}

#[tokio::test]
async fn an_expired_token_closes_the_socket_with_4001() {
    let user = uuid::Uuid::new_v4();
    let (server, _upstream, conversation) = minting_server(user).await;
    // `now()` is whole seconds: this token has between 9 and 10 seconds left.
    let exp = now() + 10;
    let (mut ws, authenticated) = WsClient::authed(
        &server,
        &format!("/ws/chat/{conversation}"),
        &mint(user, exp),
    )
    .await;
    assert_eq!(authenticated["expiresAt"], exp);
    // Still open well before `exp`…
    fast_forward(Duration::from_secs(8)).await;
    assert!(
        matches!(next_after_ping(&mut ws).await, common::ws::Incoming::Frame(f) if f["type"] == "pong")
    );
    // …and closed once it has passed, without anyone waiting for it.
    fast_forward(Duration::from_secs(3)).await;
    let (frames, code) = ws.until_closed().await;
    assert_eq!(frames[0]["code"], "token_expired");
    assert_eq!(code, 4001);
    // An already expired token is refused at auth.
    let mut late = WsClient::connect(&server, &format!("/ws/chat/{conversation}")).await;
    late.send(json!({"type": "auth", "token": mint(user, now() - 5)}))
        .await;
    let (frames, code) = late.until_closed().await;
    assert_eq!(frames[0]["code"], "token_expired");
    assert_eq!(code, 1008);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_in_band_refresh_extends_the_socket_without_interrupting_the_stream() {
    let user = uuid::Uuid::new_v4();
    let (server, upstream, conversation) = minting_server(user).await;
    let expires = now() + 2;
    let (mut ws, _) = WsClient::authed(
        &server,
        &format!("/ws/chat/{conversation}"),
        &mint(user, expires),
    )
    .await;
    ws.send(json!({"type": "message", "content": "stream across the refresh"}))
        .await;
    assert_eq!(ws.next().await["type"], "start");
    let request = upstream.next_request().await;
    request.token("before ");
    read_text(&mut ws, "before ").await;

    // Another user's token is refused and changes nothing.
    ws.send(json!({"type": "auth", "token": mint(uuid::Uuid::new_v4(), now() + 600)}))
        .await;
    assert_eq!(ws.next().await["code"], "user_mismatch");
    // A garbage refresh is refused and changes nothing.
    ws.send(json!({"type": "auth", "token": "garbage"})).await;
    assert_eq!(ws.next().await["code"], "invalid_token");
    // The same user's fresh token extends the connection.
    ws.send(json!({"type": "auth", "token": mint(user, now() + 600)}))
        .await;
    let refreshed = ws.next().await;
    assert_eq!(refreshed["type"], "authenticated");
    assert!(refreshed["expiresAt"].as_i64().unwrap() > expires + 500);
    assert!(refreshed["activeRun"].is_object());

    // Past the first token's expiry nothing closes the socket: the next frame after a ping is
    // its pong, not a close.
    fast_forward(Duration::from_secs(3)).await;
    match next_after_ping(&mut ws).await {
        common::ws::Incoming::Frame(frame) => assert_eq!(frame["type"], "pong", "{frame}"),
        other => panic!("the socket closed at the old token's expiry: {other:?}"),
    }
    // …and the stream carries on to the end.
    request.token("after");
    request.send(Step::Finish);
    let frames = ws.until("complete").await;
    assert_eq!(frames.last().unwrap()["fullOutput"], "before after");
    server.shutdown().await.unwrap();
}

// ---- Bad input and limits ----

#[tokio::test]
async fn each_bad_frame_gets_a_typed_error_and_the_socket_stays_usable() {
    use tokio_tungstenite::tungstenite::Message;
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(Engine::Sqlite, &upstream, |config| {
        config.runs.max_content_bytes = 100;
        config.sockets.ws_rate_burst = 100;
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let (mut ws, _) =
        WsClient::authed(&server, &format!("/ws/chat/{conversation}"), &token(&api)).await;
    let cases: Vec<(Message, &str)> = vec![
        (
            Message::Binary(vec![1, 2, 3].into()),
            "binary_not_supported",
        ),
        (Message::Text("{not json".into()), "invalid_json"),
        (Message::Text("[1,2]".into()), "invalid_frame"),
        (
            Message::Text(r#"{"content":"no type"}"#.into()),
            "invalid_frame",
        ),
        (
            Message::Text(r#"{"type":"subscribe"}"#.into()),
            "unknown_type",
        ),
        (
            Message::Text(r#"{"type":"message"}"#.into()),
            "invalid_message",
        ),
        (
            Message::Text(r#"{"type":"message","content":7}"#.into()),
            "invalid_message",
        ),
        (
            Message::Text(r#"{"type":"message","content":"   "}"#.into()),
            "empty_content",
        ),
        (
            Message::Text(
                json!({"type": "message", "content": "x".repeat(101)})
                    .to_string()
                    .into(),
            ),
            "too_large",
        ),
        (
            Message::Text(r#"{"type":"resume"}"#.into()),
            "invalid_message",
        ),
    ];
    for (message, code) in cases {
        ws.send_raw(message.clone()).await;
        let answer = ws.next().await;
        assert_eq!(answer["type"], "error", "{message:?}");
        assert_eq!(answer["code"], code, "{message:?}");
        ws.send(json!({"type": "ping"})).await;
        assert_eq!(ws.next().await["type"], "pong", "usable after {message:?}");
    }
    // Frames valid in general but not on a run socket.
    let (status, sent) = api
        .post(
            &format!("/api/conversations/{conversation}/messages"),
            json!({"content": "hi"}),
        )
        .await;
    assert_eq!(status, 201);
    let run_id = sent["run"]["id"].as_str().unwrap();
    let (mut run_socket, _) =
        WsClient::authed(&server, &format!("/ws/runs/{run_id}/stream"), &token(&api)).await;
    for frame in [
        json!({"type": "message", "content": "here?"}),
        json!({"type": "resume", "runId": run_id, "afterSeq": 0}),
        json!({"type": "stop", "runId": uuid::Uuid::now_v7()}),
    ] {
        run_socket.send(frame.clone()).await;
        assert_eq!(
            run_socket.next().await["code"],
            "invalid_request",
            "{frame}"
        );
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn oversized_frames_and_invalid_utf8_close_with_their_codes() {
    use tokio_tungstenite::tungstenite::{
        Message,
        protocol::frame::{
            Frame,
            coding::{Data, OpCode},
        },
    };
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(Engine::Sqlite, &upstream, |config| {
        config.sockets.max_frame_bytes = 1024;
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let path = format!("/ws/chat/{conversation}");

    let (mut big, _) = WsClient::authed(&server, &path, &token(&api)).await;
    big.send(json!({"type": "message", "content": "y".repeat(2000)}))
        .await;
    let (frames, code) = big.until_closed().await;
    assert_eq!(code, 1009);
    assert_eq!(frames[0]["code"], "too_large");

    // Before authentication too: an oversized `auth` frame is refused unread.
    let mut unauthed = WsClient::connect(&server, &path).await;
    unauthed
        .send(json!({"type": "auth", "token": "t".repeat(2000)}))
        .await;
    let (frames, code) = unauthed.until_closed().await;
    assert_eq!(code, 1009);
    assert_eq!(frames.len(), 1, "only the refusal: {frames:?}");
    assert_eq!(frames[0]["code"], "too_large");

    let (mut garbled, _) = WsClient::authed(&server, &path, &token(&api)).await;
    let frame = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    garbled.send_raw(Message::Frame(frame)).await;
    let (frames, code) = garbled.until_closed().await;
    assert_eq!(code, 1007);
    assert_eq!(frames[0]["code"], "invalid_utf8");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_rate_limit_drops_frames_and_keeps_the_socket() {
    use tokio_tungstenite::tungstenite::Message;
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(Engine::Sqlite, &upstream, |config| {
        config.sockets.ws_rate_burst = 5;
        config.sockets.ws_rate_per_second = 0.01;
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let mut ws = WsClient::connect(&server, &format!("/ws/chat/{conversation}")).await;
    for _ in 0..5 {
        ws.send(json!({"type": "ping"})).await;
        assert_eq!(ws.next().await["type"], "pong");
    }
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(ws.next().await["code"], "rate_limited");
    // Still connected: protocol pings are answered.
    ws.send_raw(Message::Ping(b"alive?".to_vec().into())).await;
    let pong = tokio::time::timeout(TIMEOUT, async {
        use futures_util::StreamExt;
        loop {
            match ws.socket.next().await {
                Some(Ok(Message::Pong(payload))) => return payload,
                Some(Ok(_)) => {}
                other => panic!("socket ended: {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(&pong[..], b"alive?");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn connection_caps_per_user_and_in_total() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(Engine::Sqlite, &upstream, |config| {
        config.sockets.max_connections_per_user = 2;
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let path = format!("/ws/chat/{conversation}");
    let (_a, _) = WsClient::authed(&server, &path, &token(&api)).await;
    let (_b, _) = WsClient::authed(&server, &path, &token(&api)).await;
    let mut c = WsClient::connect(&server, &path).await;
    c.send(json!({"type": "auth", "token": token(&api)})).await;
    let (frames, code) = c.until_closed().await;
    assert_eq!(frames[0]["code"], "too_many_connections");
    assert_eq!(code, 1013);
    server.shutdown().await.unwrap();

    // In total: the upgrade itself is refused.
    let server = setup(Engine::Sqlite, &upstream, |config| {
        config.sockets.max_connections = 2;
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let path = format!("/ws/chat/{conversation}");
    let _d = WsClient::connect(&server, &path).await;
    let _e = WsClient::connect(&server, &path).await;
    let refused = tokio_tungstenite::connect_async(format!("ws://{}{path}", server.addr)).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
        }
        other => panic!("expected HTTP 503, got {other:?}"),
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_client_that_never_reads_is_closed_and_never_slows_the_others() {
    // 1 MiB of answer: its queue of 4 frames fills long before the end.
    stalled_client_is_cut_off(64, |config| config.sockets.send_queue = 4).await;
}

#[tokio::test]
async fn a_client_whose_connection_stops_taking_frames_is_closed_with_room_in_its_queue() {
    // 6 MiB of answer, more than the kernel buffers hold (4 MiB of send buffer here at most),
    // and a queue that never fills: the write itself stalls.
    stalled_client_is_cut_off(384, |config| {
        config.sockets.send_queue = 100_000;
        config.sockets.send_queue_bytes = 1 << 30;
    })
    .await;
}

/// A client that authenticates and then never reads, while another follows an answer of
/// `deltas` 16 KiB deltas sent as fast as the fake can: the stalled one is closed as slow
/// before the end, and the other gets everything.
async fn stalled_client_is_cut_off(deltas: usize, adjust: impl FnOnce(&mut wadi_server::Config)) {
    let big = "z".repeat(16 * 1024);
    let upstream = FakeUpstream::start(Script::Tokens {
        tokens: vec![big; deltas],
        pace: Duration::ZERO,
    })
    .await;
    let server = setup(Engine::Sqlite, &upstream, |config| {
        config.sockets.slow_client_timeout = Duration::from_millis(500);
        config.runs.max_answer_bytes = deltas * 16 * 1024;
        adjust(config);
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let path = format!("/ws/chat/{conversation}");
    // The stalled client: authenticates, then never reads again. A tiny receive window makes the
    // server's socket buffer fill quickly.
    let stalled_tcp = tokio::net::TcpSocket::new_v4().unwrap();
    stalled_tcp.set_recv_buffer_size(4096).unwrap();
    let stalled_tcp = stalled_tcp.connect(server.addr).await.unwrap();
    let (mut stalled, _) =
        tokio_tungstenite::client_async(format!("ws://{}{path}", server.addr), stalled_tcp)
            .await
            .unwrap();
    {
        use futures_util::{SinkExt, StreamExt};
        stalled.next().await.unwrap().unwrap(); // connected
        stalled
            .send(tokio_tungstenite::tungstenite::Message::Text(
                json!({"type": "auth", "token": token(&api)})
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
        // Once authenticated it watches the conversation; from here on it reads nothing.
        let authenticated = stalled.next().await.unwrap().unwrap();
        assert!(authenticated.to_text().unwrap().contains("authenticated"));
    }
    let (mut reader, _) = WsClient::authed(&server, &path, &token(&api)).await;
    reader
        .send(json!({"type": "message", "content": "lots"}))
        .await;
    // The reader reads on its own, so that the stalled client is read from as soon as it is
    // cut off, however long the answer takes: what the server says to it must arrive within
    // the close's grace.
    let reading = tokio::spawn(async move { reader.until("complete").await });

    // The stalled client is cut off once its queue has been full, or its writes have made no
    // progress, for the slow-client timeout.
    server
        .await_metric("wadi_slow_client_closes_total", 1.0)
        .await;
    // What it had received stops short of the end: its backlog was dropped, not written (which
    // a client that reads fast once judged slow would otherwise get in full), so it never got
    // `complete`; it was told why, then closed.
    let mut got_complete = false;
    let mut told = false;
    let mut close_code = None;
    {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        while let Ok(Some(Ok(message))) = tokio::time::timeout(TIMEOUT, stalled.next()).await {
            match message {
                Message::Text(text) => {
                    got_complete |= text.contains("\"complete\"");
                    told |= text.contains("\"slow_consumer\"");
                }
                Message::Close(frame) => close_code = frame.map(|frame| u16::from(frame.code)),
                _ => {}
            }
        }
    }
    assert!(
        !got_complete,
        "the stalled client was cut off before the end"
    );
    assert!(told, "the stalled client was told it was too slow");
    assert_eq!(close_code, Some(wadi_protocol::close::TRY_AGAIN_LATER));
    let frames = reading.await.unwrap();
    let complete = frames.last().unwrap();
    assert_eq!(complete["status"], "completed");
    assert_eq!(
        text(&frames).len(),
        deltas * 16 * 1024,
        "the reader got everything"
    );
    assert_eq!(server.metric("wadi_slow_client_closes_total").await, 1.0);
    drop(stalled);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn one_address_cannot_fill_the_server_and_pending_sockets_never_crowd_out_users() {
    let upstream = FakeUpstream::start(tokens(&["hi"])).await;
    let server = setup(Engine::Sqlite, &upstream, |config| {
        config.proxies.trusted_proxies = 1;
        config.sockets.max_connections_per_address = 4;
        config.sockets.max_pending_per_address = 2;
        config.sockets.max_pending_connections = 3;
        config.sockets.max_sse_per_user = 1;
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let path = format!("/ws/chat/{conversation}");
    let auth = json!({"type": "auth", "token": token(&api)});
    // Two sockets from one address that never authenticate: its third is refused.
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(
            WsClient::connect_from(&server, &path, "203.0.113.9")
                .await
                .unwrap(),
        );
    }
    assert_eq!(
        WsClient::connect_from(&server, &path, "203.0.113.9")
            .await
            .err(),
        Some(429)
    );
    // Another address still gets in, and once it authenticates it is not pending any more.
    let mut user = WsClient::connect_from(&server, &path, "198.51.100.2")
        .await
        .unwrap();
    user.send(auth.clone()).await;
    assert_eq!(user.next().await["type"], "authenticated");
    // Three pending sockets in all: a third address waits for them to go.
    idle.push(
        WsClient::connect_from(&server, &path, "192.0.2.3")
            .await
            .unwrap(),
    );
    assert_eq!(
        WsClient::connect_from(&server, &path, "192.0.2.4")
            .await
            .err(),
        Some(429),
        "no room for another unauthenticated socket"
    );
    drop(idle);
    // One address holds at most 4 sockets, authenticated or not.
    let mut held = vec![user];
    while held.len() < 4 {
        let mut next = tokio::time::timeout(TIMEOUT, async {
            loop {
                // The dropped sockets leave the registry as their tasks notice.
                if let Ok(socket) = WsClient::connect_from(&server, &path, "198.51.100.2").await {
                    return socket;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the dropped sockets never left");
        next.send(auth.clone()).await;
        assert_eq!(next.next().await["type"], "authenticated");
        held.push(next);
    }
    assert_eq!(
        WsClient::connect_from(&server, &path, "198.51.100.2")
            .await
            .err(),
        Some(429)
    );
    assert!(
        server
            .metric("wadi_refused_connections_total{reason=\"address\"}")
            .await
            >= 1.0
    );

    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn server_sent_event_streams_are_capped_per_user() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(Engine::Sqlite, &upstream, |config| {
        config.sockets.max_sse_per_user = 1;
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let (status, sent) = api
        .post(
            &format!("/api/conversations/{conversation}/messages"),
            json!({"content": "stream it"}),
        )
        .await;
    assert_eq!(status, 201);
    let run = sent["run"]["id"].as_str().unwrap().to_owned();
    let request = upstream.next_request().await;
    let events = format!("/api/runs/{run}/events");
    let first = api
        .request(reqwest::Method::GET, &events)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let (status, body) = api.get(&events).await;
    assert_eq!(
        status, 429,
        "a second stream while the first is open: {body}"
    );
    request.token("done");
    request.send(Step::Finish);
    let body = tokio::time::timeout(TIMEOUT, first.text())
        .await
        .unwrap()
        .unwrap();
    assert!(body.contains("event: complete"), "{body}");
    // The first stream ended: its place is free again.
    tokio::time::timeout(TIMEOUT, async {
        while api.get(&events).await.0 != 200 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the ended stream was never uncounted");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn past_its_load_limit_a_server_refuses_new_runs_and_keeps_the_running_one() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(Engine::Sqlite, &upstream, |config| {
        config.runs.max_active_runs = 1;
    })
    .await;
    let api = server.user().await;
    let busy = api.new_conversation().await;
    let other = api.new_conversation().await;
    let (mut running, _) =
        WsClient::authed(&server, &format!("/ws/chat/{busy}"), &token(&api)).await;
    running
        .send(json!({"type": "message", "content": "the one that runs"}))
        .await;
    assert_eq!(running.next().await["type"], "start");
    let request = upstream.next_request().await;
    request.token("steady ");
    read_text(&mut running, "steady ").await;

    // A second answer, elsewhere: refused at once, with a hint, over the socket…
    let (mut refused, _) =
        WsClient::authed(&server, &format!("/ws/chat/{other}"), &token(&api)).await;
    refused
        .send(json!({"type": "message", "content": "one more"}))
        .await;
    let error = refused.next().await;
    assert_eq!(error["code"], "overloaded", "{error}");
    assert_eq!(error["retryAfterMs"], 2000);
    // …and over REST, with nothing written.
    let response = api
        .request(
            reqwest::Method::POST,
            &format!("/api/conversations/{other}/messages"),
        )
        .json(&json!({"content": "one more"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "2");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "overloaded");
    let (_, messages) = api
        .get(&format!("/api/conversations/{other}/messages"))
        .await;
    assert_eq!(
        messages["items"].as_array().unwrap().len(),
        0,
        "nothing saved"
    );

    // The running answer goes on untouched, and once it ends there is room again.
    request.token("done");
    request.send(Step::Finish);
    let frames = running.until("complete").await;
    assert_eq!(frames.last().unwrap()["fullOutput"], "steady done");
    refused
        .send(json!({"type": "message", "content": "now?"}))
        .await;
    assert_eq!(refused.next().await["type"], "start");
    assert_eq!(server.metric("wadi_overload_refusals_total").await, 2.0);
    upstream.next_request().await.send(Step::Finish);
    server.shutdown().await.unwrap();
}

/// `postgres://user@host:port/db` with `host:port` swapped for `addr`.
fn through(url: &str, addr: std::net::SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (credentials, rest) = rest.split_once('@').unwrap();
    let path = &rest[rest.find('/').unwrap()..];
    format!("{scheme}://{credentials}@{addr}{path}")
}

fn postgres_addr(url: &str) -> std::net::SocketAddr {
    let rest = url.split_once('@').unwrap().1;
    let host = &rest[..rest.find('/').unwrap_or(rest.len())];
    host.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn a_database_outage_mid_run_loses_nothing_and_refuses_new_messages_clearly() {
    let engine = Engine::postgres();
    let proxy = common::net::Proxy::start(postgres_addr(&engine.admin_url())).await;
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(engine, &upstream, |config| {
        let url = config.database_url.clone().unwrap();
        config.database_url = Some(through(url.expose(), proxy.addr).into());
        config.runs.flush_interval = Duration::from_millis(100);
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let (mut ws, _) =
        WsClient::authed(&server, &format!("/ws/chat/{conversation}"), &token(&api)).await;
    ws.send(json!({"type": "message", "content": "before the outage"}))
        .await;
    let start = ws.next().await;
    let run = start["runId"].as_str().unwrap().to_owned();
    let request = upstream.next_request().await;
    request.token("one ");
    read_text(&mut ws, "one ").await;
    // A second tab, open before the outage (authenticating needs the database).
    let (mut other, _) =
        WsClient::authed(&server, &format!("/ws/chat/{conversation}"), &token(&api)).await;

    proxy.partition();
    // The answer streams on from memory.
    request.token("two ");
    read_text(&mut ws, "two ").await;
    // Readiness says so, quickly.
    let ready = tokio::time::timeout(TIMEOUT, server.http.get(server.url("/readyz")).send())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["store"], "down");
    // A new message is refused clearly, and nothing of it is kept.
    other
        .send(json!({"type": "message", "content": "during", "clientMessageId": "during-1"}))
        .await;
    let refused = loop {
        let frame = other.next().await;
        if frame["type"] == "error" {
            break frame;
        }
    };
    assert_eq!(refused["code"], "unavailable", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("nothing was saved"),
        "{refused}"
    );
    request.token("three");
    request.send(Step::Finish);

    // The database comes back: the answer's save, retried meanwhile, lands, and `complete`
    // carries all of it.
    proxy.heal();
    let frames = ws.until("complete").await;
    let complete = frames.last().unwrap();
    assert_eq!(complete["status"], "completed");
    assert_eq!(complete["fullOutput"], "one two three");
    let (_, stored) = api.get(&format!("/api/runs/{run}")).await;
    assert_eq!(stored["output"], "one two three");
    let (_, messages) = api
        .get(&format!("/api/conversations/{conversation}/messages"))
        .await;
    let contents: Vec<&str> = messages["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        contents,
        ["before the outage", "one two three"],
        "nothing half-written"
    );
    // And it serves again without a restart.
    let ready = server.http.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    drop(other);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn a_server_started_while_its_database_is_down_waits_for_it_and_says_so() {
    let engine = Engine::postgres();
    let proxy = common::net::Proxy::start(postgres_addr(&engine.admin_url())).await;
    proxy.partition();
    let db = common::TestDb::create(engine).await;
    let mut config = db.config();
    let url = config.database_url.clone().unwrap();
    config.database_url = Some(through(url.expose(), proxy.addr).into());
    // It listens and is alive, but not ready, and says why.
    let server = TestServer::start_unready(config).await;
    let ready = server.http.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["status"], "starting");
    assert_eq!(ready["store"], "down");
    let signup = server
        .http
        .post(server.url("/auth/v1/signup"))
        .json(&json!({"email": "early@example.com", "password": "correct horse battery"}))
        .send()
        .await
        .unwrap();
    assert_eq!(signup.status(), 503);
    let body: Value = signup.json().await.unwrap();
    assert_eq!(body["code"], "unavailable");

    // The database answers: no restart needed.
    proxy.heal();
    tokio::time::timeout(TIMEOUT, async {
        while server
            .http
            .get(server.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            != 200
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the server never became ready");
    let api = server.user().await;
    api.new_conversation().await;
    server.shutdown().await.unwrap();
    db.drop_database().await;
}

#[tokio::test]
async fn resumes_in_flight_on_a_socket_are_capped() {
    // Long finished answers: each resume of one queues the whole answer again.
    let big = "r".repeat(16 * 1024);
    let upstream = FakeUpstream::start(Script::Tokens {
        tokens: vec![big; 64],
        pace: Duration::ZERO,
    })
    .await;
    let server = setup(Engine::Sqlite, &upstream, |config| {
        config.sockets.ws_rate_burst = 100;
        config.runs.message_rate_burst = 100;
        // Only the new message: earlier megabyte answers stay out of each request.
        config.runs.history_messages = 1;
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let mut runs = Vec::new();
    for i in 0..12 {
        let sent = api
            .send_and_finish(&conversation, &format!("long {i}"))
            .await;
        runs.push(sent["run"]["id"].as_str().unwrap().to_owned());
    }
    for _ in &runs {
        upstream.next_request().await;
    }
    upstream.set_script(Script::Manual);
    let (mut ws, _) =
        WsClient::authed(&server, &format!("/ws/chat/{conversation}"), &token(&api)).await;
    // Twelve resumes, then a message, and nothing read until the message reached the model:
    // the socket handles frames in order, so every resume was decided by then, while no
    // watcher could hand over its megabyte to a client that does not read.
    for run in &runs {
        ws.send(json!({"type": "resume", "runId": run, "afterSeq": 0}))
            .await;
    }
    ws.send(json!({"type": "message", "content": "after the resumes"}))
        .await;
    upstream.next_request().await;
    let mut refused = 0;
    let mut completes = 0;
    while completes + refused < runs.len() {
        let frame = ws.next().await;
        match frame["type"].as_str().unwrap() {
            // (The message's own answer ends too, empty: the model's side was let go of.)
            "complete" if runs.iter().any(|run| frame["runId"] == run.as_str()) => completes += 1,
            "error" => {
                assert_eq!(frame["code"], "rate_limited", "{frame}");
                refused += 1;
            }
            _ => {}
        }
    }
    // 4 here; 3 on a host whose socket buffers can take a whole megabyte-long answer.
    assert!(
        (3..=4).contains(&refused),
        "at most 8 in flight: {refused} refused"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn readyz_and_metrics_report_the_server() {
    let upstream = FakeUpstream::start(tokens(&["a", "b"])).await;
    let server = setup(Engine::Sqlite, &upstream, |_| {}).await;
    let ready = server.http.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["cluster"], "local");
    assert_eq!(ready["store"], "up");
    assert_eq!(ready["redis"], "off");
    assert!(ready["instance"].is_string());
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let (mut ws, _) =
        WsClient::authed(&server, &format!("/ws/chat/{conversation}"), &token(&api)).await;
    ws.send(json!({"type": "message", "content": "count me"}))
        .await;
    ws.until("complete").await;
    let mut bad = WsClient::connect(&server, &format!("/ws/chat/{conversation}")).await;
    bad.send(json!({"type": "auth", "token": "nope"})).await;
    bad.until_closed().await;
    // A refused REST request counts too.
    let refused = server
        .http
        .get(server.url("/api/conversations"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    // The refused socket is gone once its task has finished: only `ws` remains.
    tokio::time::timeout(TIMEOUT, async {
        while server
            .metric("wadi_ws_connections{endpoint=\"chat\"}")
            .await
            != 1.0
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the refused socket was never deregistered");
    let metrics = server.metrics_text().await;
    for expected in [
        "wadi_ws_connections{endpoint=\"chat\"} 1",
        "wadi_active_runs 0",
        "wadi_chunks_sent_total",
        "wadi_bytes_sent_total",
        "wadi_auth_failures_total{reason=\"malformed\"} 2",
        "wadi_ws_closes_total{code=\"1008\"} 1",
        "wadi_runs_finished_total{status=\"completed\"} 1",
        "wadi_time_to_first_token_seconds_count 1",
        "wadi_run_duration_seconds_count 1",
        "wadi_slow_client_closes_total 0",
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected:?} in\n{metrics}"
        );
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn without_a_model_the_demo_model_answers_and_says_so() {
    let server = TestServer::start().await;
    let (_, config) = server.anonymous().get("/api/config").await;
    assert_eq!(config["demoModel"], true);
    assert_eq!(config["model"], "demo");
    assert_eq!(config["authMode"], "embedded");
    assert_eq!(config["authUrl"], "/auth/v1");
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let (mut ws, _) =
        WsClient::authed(&server, &format!("/ws/chat/{conversation}"), &token(&api)).await;
    ws.send(json!({"type": "message", "content": "are you real?"}))
        .await;
    let frames = ws.until("complete").await;
    let answer = text(&frames);
    assert!(answer.contains("demo model"), "{answer}");
    assert!(answer.contains("OPENAI_API_KEY"), "{answer}");
    assert!(chunks(&frames).len() > 1, "streamed in several chunks");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_crash_leaves_runs_interrupted_with_their_flushed_output() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let db = common::TestDb::create(Engine::Sqlite).await;
    let data_dir = db.data_dir.path().to_path_buf();
    // The real binary, so that it can be killed like a crash.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wadi"))
        .env("WADI_ADDR", "127.0.0.1:0")
        .env("WADI_DATA_DIR", &data_dir)
        .env("OPENAI_BASE_URL", &upstream.base_url)
        .env("OPENAI_API_KEY", "sk-test")
        .env("WADI_FLUSH_INTERVAL", "50ms")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let addr = tokio::time::timeout(TIMEOUT, async {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.strip_prefix("WADI is running at http://") {
                return url.trim_end_matches('/').to_owned();
            }
        }
        panic!("the server exited before printing its address");
    })
    .await
    .unwrap();
    let crashed = TestServer::external(addr.parse().unwrap());
    let api = crashed.user().await;
    let conversation = api.new_conversation().await;
    let (status, sent) = api
        .post(
            &format!("/api/conversations/{conversation}/messages"),
            json!({"content": "hi"}),
        )
        .await;
    assert_eq!(status, 201);
    let run_id = uuid::Uuid::parse_str(sent["run"]["id"].as_str().unwrap()).unwrap();
    let request = upstream.next_request().await;
    request.token("flushed before the crash");
    // Wait for the periodic flush to reach the database.
    let flushed = "SELECT COUNT(*) FROM runs WHERE id = $1 AND output = 'flushed before the crash'";
    tokio::time::timeout(TIMEOUT, async {
        while db.count(flushed, run_id).await == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the output was never flushed");
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let running = "SELECT COUNT(*) FROM runs WHERE id = $1 AND status = 'running'";
    assert_eq!(
        db.count(running, run_id).await,
        1,
        "the crash left it running"
    );

    // A restart turns it into `interrupted`, keeping the output.
    let restarted = TestServer::start_with(db.config()).await;
    let interrupted = "SELECT COUNT(*) FROM runs WHERE id = $1 AND status = 'interrupted' \
                       AND output = 'flushed before the crash'";
    assert_eq!(db.count(interrupted, run_id).await, 1);
    let answer = "SELECT COUNT(*) FROM messages WHERE run_id = $1 AND role = 'assistant'";
    assert_eq!(db.count(answer, run_id).await, 1);
    // Its usage died with the process: the server counts the prompt and the words kept, as for
    // a stopped run.
    let counted = "SELECT COUNT(*) FROM runs WHERE id = $1 AND usage_estimated \
                   AND prompt_tokens > 0 AND completion_tokens BETWEEN 3 AND 8";
    assert_eq!(
        db.count(counted, run_id).await,
        1,
        "the usage was estimated"
    );
    restarted.shutdown().await.unwrap();
}

#[tokio::test]
async fn malformed_socket_requests_get_json_errors() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(Engine::Sqlite, &upstream, |_| {}).await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let run = uuid::Uuid::now_v7();
    // Real handshakes to addresses that are not valid.
    for path in [
        "/ws/chat/not-a-uuid".to_owned(),
        "/ws/runs/nope/stream".to_owned(),
        format!("/ws/runs/{run}/stream?afterSeq=abc"),
        format!("/ws/runs/{run}/stream?afterSeq=1&afterSeq=2"),
    ] {
        let url = format!("ws://{}{path}", server.addr);
        match tokio_tungstenite::connect_async(url.as_str()).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 400, "{path}");
                let body: Value =
                    serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                        .unwrap_or_else(|e| panic!("{path}: not JSON: {e}"));
                assert_eq!(body["code"], "invalid_request", "{path}");
            }
            other => panic!("{path} must be refused, got {other:?}"),
        }
    }
    // Plain requests to socket addresses (no handshake).
    for path in [
        format!("/ws/chat/{conversation}"),
        "/ws/user".to_owned(),
        format!("/ws/runs/{run}/stream"),
    ] {
        let (status, body) = api.get(&path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["code"], "invalid_request", "{path}");
    }
    // A handshake over HTTP/1.0, which cannot upgrade: 426, still in JSON.
    let answer = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(
            b"GET /ws/user HTTP/1.0\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(TIMEOUT, tcp.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        answer
    };
    assert!(answer.starts_with("HTTP/1.0 426"), "{answer}");
    assert!(answer.contains(r#""code":"invalid_request""#), "{answer}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_closed_with_4002() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    // Long enough that a reading client on a loaded test machine (parallel tests, a fuzzer)
    // always answers within two intervals.
    let server = setup(Engine::Sqlite, &upstream, |config| {
        config.sockets.heartbeat_interval = Duration::from_millis(300);
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let path = format!("/ws/chat/{conversation}");
    // A client that keeps reading answers every ping (tungstenite pongs as it reads).
    let (mut alive, _) = WsClient::authed(&server, &path, &token(&api)).await;
    let (stop_reading, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        // `incoming` skips pings (answering them); anything else it returns is a disturbance.
        let seen = tokio::select! {
            _ = &mut stopped => None,
            incoming = alive.incoming() => Some(incoming),
        };
        (alive, seen)
    });
    // A client that reads nothing answers no ping: it is closed after two silent intervals.
    let (mut silent, _) = WsClient::authed(&server, &path, &token(&api)).await;
    server
        .await_metric("wadi_ws_closes_total{code=\"4002\"}", 1.0)
        .await;
    let (_, code) = silent.until_closed().await;
    assert_eq!(code, 4002);
    // Meanwhile the reading client received nothing but pings: no close.
    let _ = stop_reading.send(());
    let (mut alive, seen) = reader.await.unwrap();
    assert!(seen.is_none(), "the reading client was disturbed: {seen:?}");
    alive.send(json!({"type": "ping"})).await;
    assert_eq!(alive.next().await["type"], "pong");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn sockets_from_foreign_origins_are_refused() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(Engine::Sqlite, &upstream, |config| {
        config.sockets.allowed_origins = vec!["http://localhost:8081".into()];
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let url = format!("ws://{}/ws/chat/{conversation}", server.addr);
    let with_origin = |origin: &str| {
        let mut request = url.as_str().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Origin", origin.parse().unwrap());
        request
    };
    match tokio_tungstenite::connect_async(with_origin("https://evil.example")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
        }
        other => panic!("a foreign origin must be refused, got {other:?}"),
    }
    let own = format!("http://{}", server.addr);
    for origin in [own.as_str(), "http://localhost:8081"] {
        let (socket, _) = tokio_tungstenite::connect_async(with_origin(origin))
            .await
            .unwrap_or_else(|e| panic!("{origin} must be allowed: {e}"));
        drop(socket);
    }
    server.shutdown().await.unwrap();
}

async fn a_silent_provider_fails_the_run_after_the_idle_timeout(engine: Engine) {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(engine, &upstream, |config| {
        config.runs.model_idle_timeout = Duration::from_millis(400);
        // Flushes tick far more often than the idle timeout; they must not reset it.
        config.runs.flush_interval = Duration::from_millis(50);
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let (mut ws, _) =
        WsClient::authed(&server, &format!("/ws/chat/{conversation}"), &token(&api)).await;
    ws.send(json!({"type": "message", "content": "hello?"}))
        .await;
    let request = upstream.next_request().await;
    request.token("half");
    // The provider keeps the connection open and sends nothing more.
    let frames = ws.until("complete").await;
    let error = frames.iter().find(|f| f["type"] == "error").unwrap();
    assert_eq!(error["code"], "model_error");
    let complete = frames.last().unwrap();
    assert_eq!(complete["status"], "failed");
    assert_eq!(complete["fullOutput"], "half");
    request.cancelled().await;
    server.shutdown().await.unwrap();
}

async fn a_resend_gets_its_start_even_when_the_socket_already_follows_the_run(engine: Engine) {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(engine, &upstream, |_| {}).await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let path = format!("/ws/chat/{conversation}");
    let message = json!({"type": "message", "content": "hi", "clientMessageId": "c-42"});
    let (mut first, _) = WsClient::authed(&server, &path, &token(&api)).await;
    first.send(message.clone()).await;
    let start = first.next().await;
    assert_eq!(start["clientMessageId"], "c-42");
    let request = upstream.next_request().await;
    first.close().await;
    // After a reconnect the client resumes the active run, then resends what it never saw
    // acknowledged: it must still get a `start` for it.
    let (mut second, authenticated) = WsClient::authed(&server, &path, &token(&api)).await;
    let run_id = authenticated["activeRun"]["runId"].clone();
    second
        .send(json!({"type": "resume", "runId": run_id, "afterSeq": 0}))
        .await;
    second.send(message).await;
    let replayed = second.next().await;
    assert_eq!(replayed, start);
    request.token("done");
    request.send(Step::Finish);
    let frames = second.until("complete").await;
    assert_eq!(frames.last().unwrap()["fullOutput"], "done");
    server.shutdown().await.unwrap();
}

async fn a_running_run_no_task_drives_does_not_block_the_conversation(engine: Engine) {
    let upstream = FakeUpstream::start(tokens(&["fresh answer"])).await;
    let server = setup(engine, &upstream, |_| {}).await;
    let api = server.user().await;
    let (_, me) = api.get("/api/me").await;
    let owner = uuid::Uuid::parse_str(me["id"].as_str().unwrap()).unwrap();
    let conversation = api.new_conversation().await;
    let conversation_id = uuid::Uuid::parse_str(&conversation).unwrap();
    // What a failed final save leaves behind: the store says `running`, nothing drives it.
    let orphan = server.db().insert_orphan_run(conversation_id, owner).await;
    let sent = api.send_and_finish(&conversation, "still there?").await;
    assert_eq!(sent["message"]["content"], "still there?");
    let (_, old) = api.get(&format!("/api/runs/{orphan}")).await;
    assert_eq!(old["status"], "interrupted");
    assert_eq!(old["output"], "half an answer", "what it had is kept");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn messages_are_rate_limited_per_user_across_sockets_and_rest() {
    let upstream = FakeUpstream::start(tokens(&["ok"])).await;
    let server = setup(Engine::Sqlite, &upstream, |config| {
        config.runs.message_rate_burst = 2;
        config.runs.message_rate_per_minute = 0.01;
    })
    .await;
    let api = server.user().await;
    let first = api.new_conversation().await;
    let second = api.new_conversation().await;
    api.send_and_finish(&first, "one").await;
    let (mut ws, _) = WsClient::authed(&server, &format!("/ws/chat/{second}"), &token(&api)).await;
    ws.send(json!({"type": "message", "content": "two"})).await;
    assert_eq!(
        ws.until("complete").await.last().unwrap()["status"],
        "completed"
    );
    // A third message, from a fresh socket or over REST, is over the user's budget.
    let (mut other, _) =
        WsClient::authed(&server, &format!("/ws/chat/{first}"), &token(&api)).await;
    other
        .send(json!({"type": "message", "content": "three"}))
        .await;
    assert_eq!(other.next().await["code"], "rate_limited");
    let (status, body) = api
        .post(
            &format!("/api/conversations/{second}/messages"),
            json!({"content": "four"}),
        )
        .await;
    assert_eq!(status, 429);
    assert_eq!(body["code"], "rate_limited");
    // Another user is not affected.
    let someone_else = server.user().await;
    let theirs = someone_else.new_conversation().await;
    someone_else.send_and_finish(&theirs, "mine").await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_resend_of_a_committed_message_is_answered_once_the_messages_are_spent() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(Engine::Sqlite, &upstream, |config| {
        config.runs.message_rate_burst = 1;
        config.runs.message_rate_per_minute = 0.01;
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let messages = format!("/api/conversations/{conversation}/messages");
    let first = json!({"content": "one", "clientMessageId": "c-1"});
    let (status, sent) = api.post(&messages, first.clone()).await;
    assert_eq!(status, 201, "{sent}");
    let request = upstream.next_request().await;
    request.send(Step::Finish);
    api.events(sent["run"]["id"].as_str().unwrap()).await;
    let (status, body) = api.post(&messages, json!({"content": "two"})).await;
    assert_eq!(status, 429, "{body}");
    // Every message is spent, but a resend of the one committed (its first answer was lost)
    // gets it back: over REST, and on a socket as the run's start.
    let (status, body) = api.post(&messages, first.clone()).await;
    assert!(status.is_success(), "{status} {body}");
    assert_eq!(body["message"]["id"], sent["message"]["id"]);
    assert_eq!(body["run"]["id"], sent["run"]["id"]);
    let (mut ws, _) =
        WsClient::authed(&server, &format!("/ws/chat/{conversation}"), &token(&api)).await;
    ws.send(json!({"type": "message", "content": "one", "clientMessageId": "c-1"}))
        .await;
    let again = ws.next().await;
    assert_eq!(again["type"], "start", "{again}");
    assert_eq!(again["runId"], sent["run"]["id"]);
    // A new message with a client id of its own is still refused.
    let (status, body) = api
        .post(
            &messages,
            json!({"content": "five", "clientMessageId": "c-5"}),
        )
        .await;
    assert_eq!(status, 429, "{body}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn once_the_messages_are_spent_a_send_into_a_busy_conversation_is_told_it_is_busy() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(Engine::Sqlite, &upstream, |config| {
        config.runs.message_rate_burst = 1;
        config.runs.message_rate_per_minute = 0.01;
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let messages = format!("/api/conversations/{conversation}/messages");
    let (status, sent) = api.post(&messages, json!({"content": "one"})).await;
    assert_eq!(status, 201, "{sent}");
    let request = upstream.next_request().await;
    // The only message is spent and the answer streams: busy, not rate limited (waiting for
    // the answer is what helps), over REST and on a socket.
    let (status, body) = api.post(&messages, json!({"content": "two"})).await;
    assert_eq!(
        (status.as_u16(), &body["code"]),
        (409, &json!("run_in_progress"))
    );
    let (mut ws, _) =
        WsClient::authed(&server, &format!("/ws/chat/{conversation}"), &token(&api)).await;
    ws.send(json!({"type": "message", "content": "two"})).await;
    let refused = ws.next().await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "run_in_progress");
    // Once it has ended, the rate is what refuses.
    request.send(Step::Finish);
    api.events(sent["run"]["id"].as_str().unwrap()).await;
    let (status, body) = api.post(&messages, json!({"content": "three"})).await;
    assert_eq!(
        (status.as_u16(), &body["code"]),
        (429, &json!("rate_limited"))
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn sends_refused_while_an_answer_streams_and_resends_do_not_use_up_the_message_rate() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(Engine::Sqlite, &upstream, |config| {
        config.runs.message_rate_burst = 3;
        config.runs.message_rate_per_minute = 0.01;
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let messages = format!("/api/conversations/{conversation}/messages");
    let (mut ws, _) =
        WsClient::authed(&server, &format!("/ws/chat/{conversation}"), &token(&api)).await;
    ws.send(json!({"type": "message", "content": "one", "clientMessageId": "c-1"}))
        .await;
    let start = ws.next().await;
    assert_eq!(start["type"], "start", "{start}");
    let request = upstream.next_request().await;

    // A client retrying while the answer streams, over REST and the socket: refused, and free.
    for _ in 0..5 {
        let (status, body) = api.post(&messages, json!({"content": "again?"})).await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["code"], "run_in_progress");
    }
    ws.send(json!({"type": "message", "content": "again?"}))
        .await;
    assert_eq!(ws.next().await["code"], "run_in_progress");
    // Resends of the message already committed are free too.
    for _ in 0..5 {
        let (status, body) = api
            .post(
                &messages,
                json!({"content": "one", "clientMessageId": "c-1"}),
            )
            .await;
        assert!(status.is_success(), "{status} {body}");
        assert_eq!(body["message"]["id"], start["messageId"]);
    }
    request.token("done");
    request.send(Step::Finish);
    ws.until("complete").await;

    // Bad input is not: it spends the second message of the three.
    let (status, _) = api
        .post(
            &messages,
            json!({"content": "two", "parentId": uuid::Uuid::now_v7()}),
        )
        .await;
    assert_eq!(status, 400);
    let (status, body) = api.post(&messages, json!({"content": "three"})).await;
    assert_eq!(status, 201, "{body}");
    let request = upstream.next_request().await;
    request.send(Step::Finish);
    ws.until("complete").await;
    let (status, body) = api.post(&messages, json!({"content": "four"})).await;
    assert_eq!(status, 429, "{body}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn attempts_refused_for_free_are_still_capped() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server = setup(Engine::Sqlite, &upstream, |config| {
        config.runs.message_rate_burst = 2;
        config.runs.message_rate_per_minute = 0.01;
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let messages = format!("/api/conversations/{conversation}/messages");
    let (status, body) = api.post(&messages, json!({"content": "one"})).await;
    assert_eq!(status, 201, "{body}");
    let request = upstream.next_request().await;
    // Five attempts per message, ten in all: the first was the message, nine retries are
    // refused for free (the second message stays available), and the next attempt is over the
    // cap.
    for _ in 0..9 {
        let (status, body) = api.post(&messages, json!({"content": "again?"})).await;
        assert_eq!(status, 409, "{body}");
    }
    let (status, body) = api.post(&messages, json!({"content": "again?"})).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "rate_limited");
    request.send(Step::Finish);
    server.shutdown().await.unwrap();
}

on_both_engines!(checkpoints_written_together_each_get_their_own_answer);

/// One batch of progress checkpoints, as the checkpoint writer sends it: each row is answered on
/// its own (saved, behind, fenced), in order, and only the saved ones change their run.
async fn checkpoints_written_together_each_get_their_own_answer(engine: Engine) {
    use wadi_protocol::{RunStatus, api::Role};
    use wadi_server::{
        ids::{ConversationId, InstanceId, MessageId, RunId, UserId},
        store::{
            Checkpoint, CheckpointResult, ConversationRecord, MessageRecord, RunOutcome, RunRecord,
            UserRecord,
        },
    };

    let db = common::TestDb::create(engine).await;
    let config = db.config();
    let store = wadi_server::store::connect(
        config.database_url.as_ref().map(|url| url.expose()),
        &config.data_dir,
    )
    .await
    .unwrap();
    let now = 1_700_000_000_000;
    let user = UserId::new();
    store
        .create_user(&UserRecord {
            id: user,
            email: format!("{}@example.com", uuid::Uuid::new_v4()),
            password_hash: "x".into(),
            user_metadata: "{}".into(),
            created_at: now,
            updated_at: now,
            last_sign_in_at: None,
        })
        .await
        .unwrap();
    let owner = InstanceId::new();
    let other = InstanceId::new();
    // Four runs, each in its own conversation (one may stream per conversation), all driven by
    // `owner` and with nothing stored yet.
    let mut runs = Vec::new();
    for i in 0..4 {
        let conversation = ConversationId::new();
        store
            .create_conversation(&ConversationRecord {
                id: conversation,
                owner_id: user,
                title: None,
                created_at: now,
                updated_at: now,
                model: None,
                system_prompt: None,
            })
            .await
            .unwrap();
        let run = RunRecord::running(
            RunId::new(),
            conversation,
            user,
            MessageId::new(),
            "fake-model".into(),
            now,
            owner,
        );
        let message = MessageRecord {
            id: MessageId::new(),
            conversation_id: conversation,
            role: Role::User,
            content: format!("question {i}"),
            run_id: Some(run.id),
            client_message_id: None,
            created_at: now,
            parent_id: None,
        };
        store
            .insert_user_message(&message, "title", Some(&run))
            .await
            .unwrap();
        runs.push(run);
    }
    let [saved, behind, foreign, finished] = [0, 1, 2, 3].map(|i| runs[i].id);
    // `finished` ends before the batch is written; its owner still has a checkpoint queued.
    assert!(
        store
            .finish_run(
                finished,
                Some(owner),
                &RunOutcome {
                    status: RunStatus::Stopped,
                    output: "kept".into(),
                    chunk_ends: "4".into(),
                    error: None,
                    prompt_tokens: None,
                    completion_tokens: None,
                    usage_estimated: false,
                    last_seq: 1,
                    finished_at: now + 1,
                    message_id: runs[3].message_id,
                },
            )
            .await
            .unwrap()
    );

    let checkpoint = |from_seq: i64, delta: &str, ends: &str, to_seq: i64| Checkpoint {
        from_seq,
        delta: delta.into(),
        ends: ends.into(),
        to_seq,
    };
    let results = store
        .checkpoint_runs(&[
            (saved, owner, checkpoint(0, "Hello", "5,", 1)),
            // Stored at 0, but this one thinks 2 was saved: told where the store is.
            (behind, owner, checkpoint(2, "lost", "9,", 3)),
            (foreign, other, checkpoint(0, "not mine", "8,", 1)),
            (finished, owner, checkpoint(1, " more", "9,", 2)),
            // The same run twice in one batch: the second continues from the first.
            (saved, owner, checkpoint(1, " world", "11,", 2)),
        ])
        .await
        .unwrap();
    assert_eq!(
        results,
        [
            CheckpointResult::Saved,
            CheckpointResult::Behind { stored_seq: 0 },
            CheckpointResult::Fenced,
            CheckpointResult::Fenced,
            CheckpointResult::Saved,
        ]
    );

    let stored = |id| {
        let store = store.clone();
        async move { store.run_by_id(id).await.unwrap().unwrap() }
    };
    let run = stored(saved).await;
    assert_eq!(
        (run.output.as_str(), run.chunk_ends.as_str(), run.last_seq),
        ("Hello world", "5,11,", 2)
    );
    for id in [behind, foreign] {
        let run = stored(id).await;
        assert_eq!(
            (run.output.as_str(), run.last_seq, run.status),
            ("", 0, RunStatus::Running),
            "a refused checkpoint writes nothing"
        );
    }
    let run = stored(finished).await;
    assert_eq!(
        (run.output.as_str(), run.last_seq, run.status),
        ("kept", 1, RunStatus::Stopped),
        "a finished run keeps its outcome"
    );
    assert_eq!(
        store.checkpoint_runs(&[]).await.unwrap(),
        [],
        "an empty batch"
    );
}
