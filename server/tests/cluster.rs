//! Several real `wadi` processes on one Postgres and one Redis, behind no sticky anything: a run
//! driven by one instance is followed, resumed, streamed over SSE and stopped from the others;
//! instances restart, crash and stall without harming each other's runs; Redis restarts and
//! partitions lose nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{
    Api, Engine, TIMEOUT, TestServer,
    cluster::{Cluster, Options},
    upstream::{FakeUpstream, Request, Script, Step},
    ws::{WsClient, chunks, text},
};
use serde_json::{Value, json};

/// `count` instances on Postgres and Redis, with `env` on top of the test defaults.
async fn cluster(count: usize, upstream: &FakeUpstream, env: &[(&str, &str)]) -> Cluster {
    Cluster::start(
        Engine::postgres().admin_url(),
        Options {
            count,
            redis: true,
            proxy_first_to_redis: false,
            model_url: &upstream.base_url,
            env,
        },
    )
    .await
}

/// The same user, acting on another instance.
fn on<'a>(server: &'a TestServer, api: &Api<'_>) -> Api<'a> {
    Api {
        server,
        token: api.token.clone(),
    }
}

fn words(range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|i| format!("w{i} ")).collect()
}

/// Sends each word as one upstream token.
fn say(request: &Request, words: &[String]) {
    for word in words {
        request.token(word);
    }
}

/// Two instances, the first of which reaches Redis through a proxy the test can cut.
async fn first_behind_a_proxy(upstream: &FakeUpstream, env: &[(&str, &str)]) -> Cluster {
    Cluster::start(
        Engine::postgres().admin_url(),
        Options {
            count: 2,
            redis: true,
            proxy_first_to_redis: true,
            model_url: &upstream.base_url,
            env,
        },
    )
    .await
}

/// Cuts the first instance off Redis (its connections are cut, and it cannot connect again)
/// and waits until it has noticed.
async fn cut_off_first(cluster: &Cluster) {
    let first = cluster.at(0);
    let errors = first.metric("wadi_redis_errors_total").await;
    cluster.redis_proxy.as_ref().unwrap().partition();
    tokio::time::timeout(TIMEOUT, async {
        while first.metric("wadi_redis_errors_total").await <= errors {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the cut was never noticed");
}

/// Waits until `server` has announced `count` runs again after gaps in all.
async fn announced_again(server: &TestServer, count: f64) {
    tokio::time::timeout(TIMEOUT, async {
        while server.metric("wadi_runs_announced_again_total").await < count {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the run was never announced again");
}

/// Reads frames until a `resync` has come and the chunks' text is `expected`.
async fn until_resync_and_text(ws: &mut WsClient, expected: &str) -> Vec<Value> {
    let mut frames: Vec<Value> = Vec::new();
    while text(&frames) != expected || !frames.iter().any(|f| f["type"] == "resync") {
        frames.push(ws.next().await);
    }
    frames
}

/// Reads frames until the chunks' text is `expected`; only chunk frames may come meanwhile.
async fn read_text(ws: &mut WsClient, expected: &str) -> Vec<Value> {
    let mut frames = Vec::new();
    while text(&frames) != expected {
        let frame = ws.next().await;
        assert_eq!(frame["type"], "chunk", "{frame}");
        frames.push(frame);
        assert!(
            expected.starts_with(&text(&frames)),
            "unexpected text {:?} waiting for {expected:?}",
            text(&frames)
        );
    }
    frames
}

/// The seqs of the chunks among `frames` must be exactly `from..=to`, each once, in order.
fn assert_contiguous(frames: &[Value], from: u64) -> u64 {
    let seqs: Vec<u64> = chunks(frames).into_iter().map(|(seq, _)| seq).collect();
    let expected: Vec<u64> = (from..from + seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "every seq once, in order");
    seqs.last().copied().unwrap_or(from - 1)
}

/// Server-Sent Events as `(event, id, data)`.
fn parse_sse(body: &str) -> Vec<(String, Option<u64>, Value)> {
    body.split("\n\n")
        .filter_map(|block| {
            let mut event = None;
            let mut id = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    event = Some(value.to_owned());
                } else if let Some(value) = line.strip_prefix("id: ") {
                    id = value.parse().ok();
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(value).ok();
                }
            }
            Some((event?, id, data?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn a_run_driven_by_one_instance_is_followed_resumed_and_streamed_on_the_others() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let cluster = cluster(3, &upstream, &[]).await;
    let (a, b, c) = (cluster.at(0), cluster.at(1), cluster.at(2));
    let api = a.user().await;
    let token = api.token.clone().unwrap();
    let conversation = api.new_conversation().await;
    let chat = format!("/ws/chat/{conversation}");
    // A chat socket on B before the run starts: it learns of the run through Redis.
    let (mut on_b, _) = WsClient::authed(b, &chat, &token).await;
    let (mut on_a, _) = WsClient::authed(a, &chat, &token).await;
    on_a.send(json!({"type": "message", "content": "hello cluster", "clientMessageId": "m-1"}))
        .await;
    let start = on_a.next().await;
    assert_eq!(start["type"], "start", "{start}");
    let run_id = start["runId"].as_str().unwrap().to_owned();
    let start_b = on_b.next().await;
    assert_eq!(start_b["type"], "start", "{start_b}");
    assert_eq!(start_b["runId"], run_id.as_str());
    assert_eq!(start_b["clientMessageId"], "m-1");

    let request = upstream.next_request().await;
    let all = words(1..=30);
    say(&request, &all[..10]);
    let live_b = read_text(&mut on_b, &all[..10].concat()).await;
    let seen = assert_contiguous(&live_b, 1);
    assert!(b.metric("wadi_remote_watchers").await >= 1.0);

    // A run socket on C resumes after what B saw: every later seq exactly once.
    let (mut on_c, _) = WsClient::authed(
        c,
        &format!("/ws/runs/{run_id}/stream?afterSeq={seen}"),
        &token,
    )
    .await;
    say(&request, &all[10..]);
    request.send(Step::Finish);
    let (frames_c, close) = on_c.until_closed().await;
    assert_eq!(close, 1000, "a run socket closes normally after complete");
    assert_contiguous(&frames_c, seen + 1);
    assert_eq!(text(&frames_c), all[10..].concat());
    let complete = frames_c.last().unwrap();
    assert_eq!(complete["type"], "complete");
    assert_eq!(complete["status"], "completed");
    assert_eq!(complete["fullOutput"], all.concat());

    // B and A get the rest live, and `complete`.
    for (socket, from) in [(&mut on_b, seen + 1), (&mut on_a, 1)] {
        let frames = socket.until("complete").await;
        assert_contiguous(&frames, from);
        assert_eq!(frames.last().unwrap()["fullOutput"], all.concat());
    }

    // SSE on B resumes after the fifth chunk.
    let response = on(b, &api)
        .request(reqwest::Method::GET, &format!("/api/runs/{run_id}/events"))
        .header("Last-Event-ID", "5")
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, 200, "{body}");
    let events = parse_sse(&body);
    let ids: Vec<u64> = events.iter().filter_map(|(_, id, _)| *id).collect();
    assert_eq!(ids.first(), Some(&6), "{body}");
    assert_eq!(ids, (6..6 + ids.len() as u64).collect::<Vec<_>>());
    let (kind, _, last) = events.last().unwrap();
    assert_eq!(kind, "complete");
    assert_eq!(last["fullOutput"], all.concat());

    // What was saved is what was streamed, and the owner copied it to Redis.
    let (_, run) = on(c, &api).get(&format!("/api/runs/{run_id}")).await;
    assert_eq!(run["status"], "completed");
    assert_eq!(run["output"], all.concat());
    assert!(a.metric("wadi_redis_append_seconds_count").await > 0.0);
    let redis = cluster.redis.as_ref().unwrap();
    let log_key = format!("wadi:run:{{{run_id}}}:log");
    let entries: usize = redis.cli(&["XLEN", &log_key]).await.parse().unwrap();
    assert_eq!(
        entries as u64,
        run["lastSeq"].as_u64().unwrap() + 1,
        "every chunk and the end"
    );

    // Once the log has expired, a resume replays the same chunks from Postgres.
    let meta_key = format!("wadi:run:{{{run_id}}}:meta");
    redis.cli(&["DEL", &log_key, &meta_key]).await;
    let (mut late, _) =
        WsClient::authed(b, &format!("/ws/runs/{run_id}/stream?afterSeq=3"), &token).await;
    let (replayed, _) = late.until_closed().await;
    assert_contiguous(&replayed, 4);
    let boundaries: Vec<(u64, String)> = chunks(&live_b).into_iter().skip(3).collect();
    assert_eq!(
        chunks(&replayed)[..boundaries.len()],
        boundaries[..],
        "the same seqs carry the same text"
    );
    assert_eq!(replayed.last().unwrap()["fullOutput"], all.concat());
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn stop_on_another_instance_cancels_the_upstream_request() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let cluster = cluster(2, &upstream, &[]).await;
    let (a, b) = (cluster.at(0), cluster.at(1));
    let api = a.user().await;
    let token = api.token.clone().unwrap();
    let conversation = api.new_conversation().await;
    let chat = format!("/ws/chat/{conversation}");
    let (mut on_a, _) = WsClient::authed(a, &chat, &token).await;

    // Before the first token, over a chat socket on B.
    on_a.send(json!({"type": "message", "content": "never mind"}))
        .await;
    let run_id = on_a.next().await["runId"].as_str().unwrap().to_owned();
    let request = upstream.next_request().await;
    let (mut on_b, authenticated) = WsClient::authed(b, &chat, &token).await;
    assert_eq!(authenticated["activeRun"]["runId"], run_id.as_str());
    on_b.send(json!({"type": "stop", "runId": run_id})).await;
    request.cancelled().await;
    let frames = on_a.until("complete").await;
    assert_eq!(frames.last().unwrap()["status"], "stopped");
    assert_eq!(frames.last().unwrap()["fullOutput"], "");

    // Mid-stream, over REST on B.
    on_a.send(json!({"type": "message", "content": "go on"}))
        .await;
    let start = on_a.next().await;
    let run_id = start["runId"].as_str().unwrap().to_owned();
    let request = upstream.next_request().await;
    request.token("partial ");
    read_text(&mut on_a, "partial ").await;
    let (status, stopped) = on(b, &api)
        .post(&format!("/api/runs/{run_id}/stop"), json!({}))
        .await;
    assert_eq!(status, 200, "{stopped}");
    assert_eq!(stopped["status"], "stopped");
    assert_eq!(stopped["output"], "partial ");
    request.cancelled().await;
    let frames = on_a.until("complete").await;
    assert_eq!(frames.last().unwrap()["status"], "stopped");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn deleting_a_conversation_on_another_instance_stops_its_answer_at_once() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    // The owner's own checks (checkpoints, heartbeats) would find the run gone too, but only
    // after these intervals: the stop must come from the delete.
    let cluster = cluster(
        2,
        &upstream,
        &[
            ("WADI_FLUSH_INTERVAL", "1h"),
            ("WADI_INSTANCE_HEARTBEAT", "30s"),
            ("WADI_INSTANCE_TIMEOUT", "120s"),
        ],
    )
    .await;
    let (a, b) = (cluster.at(0), cluster.at(1));
    let api = a.user().await;
    let token = api.token.clone().unwrap();
    let conversation = api.new_conversation().await;
    let (mut on_a, _) = WsClient::authed(a, &format!("/ws/chat/{conversation}"), &token).await;
    on_a.send(json!({"type": "message", "content": "a long answer"}))
        .await;
    let run_id = on_a.next().await["runId"].as_str().unwrap().to_owned();
    let request = upstream.next_request().await;
    request.token("first words ");
    read_text(&mut on_a, "first words ").await;
    // Followers on the instance that deletes it, which does not drive it: its chat socket and
    // a run socket.
    let (mut on_b, _) = WsClient::authed(b, &format!("/ws/chat/{conversation}"), &token).await;
    on_b.send(json!({"type": "resume", "runId": run_id, "afterSeq": 0}))
        .await;
    read_text(&mut on_b, "first words ").await;
    let (mut run_on_b, _) = WsClient::authed(b, &format!("/ws/runs/{run_id}/stream"), &token).await;
    read_text(&mut run_on_b, "first words ").await;

    let status = on(b, &api).delete_conversation(&conversation).await;
    assert_eq!(status, 204);
    request.cancelled().await;
    // Every follower is told it stopped, on either instance (those away from its driver hung).
    for ws in [&mut on_a, &mut on_b, &mut run_on_b] {
        let complete = ws.until("complete").await.pop().unwrap();
        assert_eq!(complete["runId"], run_id.as_str());
        assert_eq!(complete["status"], "stopped");
    }
    // Then both chat sockets are closed, on the instance that deleted it and on the other.
    for ws in [&mut on_a, &mut on_b] {
        let (frames, code) = ws.until_closed().await;
        assert_eq!(
            code,
            wadi_protocol::close::CONVERSATION_DELETED,
            "{frames:?}"
        );
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn an_answer_started_while_an_instance_could_not_hear_redis_reaches_its_sockets() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let cluster = first_behind_a_proxy(&upstream, &[]).await;
    let (deaf, driver) = (cluster.at(0), cluster.at(1));
    let api = driver.user().await;
    let token = api.token.clone().unwrap();
    let conversation = api.new_conversation().await;
    let chat = format!("/ws/chat/{conversation}");
    let (mut on_deaf, _) = WsClient::authed(deaf, &chat, &token).await;
    let (mut user_on_deaf, _) = WsClient::authed(deaf, "/ws/user", &token).await;

    // The first instance stops hearing Redis, and notices.
    cut_off_first(&cluster).await;
    // Meanwhile an answer starts on the second: its announcement cannot reach the first.
    let (mut on_driver, _) = WsClient::authed(driver, &chat, &token).await;
    on_driver
        .send(json!({"type": "message", "content": "while it is deaf"}))
        .await;
    let run_id = on_driver.next().await["runId"].as_str().unwrap().to_owned();
    let request = upstream.next_request().await;
    request.token("while deaf ");
    read_text(&mut on_driver, "while deaf ").await;

    // Once it hears Redis again, its socket learns of the run from the store and follows it
    // from its first chunk, to the end.
    // The chat socket is also told to reload (an answer may have started and ended in the gap),
    // and its user socket, whose `conversation` frames (the message sent) were lost, too.
    cluster.redis_proxy.as_ref().unwrap().heal();
    let seen = until_resync_and_text(&mut on_deaf, "while deaf ").await;
    let starts: Vec<&Value> = seen.iter().filter(|f| f["type"] == "start").collect();
    assert_eq!(starts.len(), 1, "{seen:?}");
    assert_eq!(starts[0]["runId"], run_id.as_str());
    assert_eq!(chunks(&seen), vec![(1, "while deaf ".to_owned())]);
    let resync = user_on_deaf.until("resync").await.pop().unwrap();
    // Both sockets on the instance reload, each at a random moment within 2 ms (1 000 a
    // second).
    assert_eq!(resync["withinMs"], 2, "{resync}");
    let resync = seen.iter().find(|f| f["type"] == "resync").unwrap();
    assert_eq!(resync["withinMs"], 2, "{resync}");
    announced_again(deaf, 1.0).await;

    // Another gap: the run is announced again, and the socket, which follows it already, goes
    // on where it was (no second `start`, no chunk twice).
    cut_off_first(&cluster).await;
    cluster.redis_proxy.as_ref().unwrap().heal();
    announced_again(deaf, 2.0).await;
    request.token("and after");
    let frames = until_resync_and_text(&mut on_deaf, "and after").await;
    assert_eq!(
        chunks(&frames),
        vec![(2, "and after".to_owned())],
        "{frames:?}"
    );
    assert!(frames.iter().all(|f| f["type"] != "start"), "{frames:?}");
    request.send(Step::Finish);
    let complete = on_deaf.until("complete").await.pop().unwrap();
    assert_eq!(complete["status"], "completed");
    assert_eq!(complete["fullOutput"], "while deaf and after");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn a_run_a_socket_was_sent_completely_is_not_sent_again_when_announced_after_a_gap() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    // No heartbeat during the test: the owner would end the run that the test marks streaming
    // again (it drives no such run).
    let cluster = first_behind_a_proxy(
        &upstream,
        &[
            ("WADI_INSTANCE_HEARTBEAT", "1h"),
            ("WADI_INSTANCE_TIMEOUT", "2h"),
        ],
    )
    .await;
    let (first, driver) = (cluster.at(0), cluster.at(1));
    let api = driver.user().await;
    let token = api.token.clone().unwrap();
    let conversation = api.new_conversation().await;
    let chat = format!("/ws/chat/{conversation}");
    let (mut on_first, _) = WsClient::authed(first, &chat, &token).await;
    let (mut on_driver, _) = WsClient::authed(driver, &chat, &token).await;
    on_driver
        .send(json!({"type": "message", "content": "answer once"}))
        .await;
    let run_id = on_driver.next().await["runId"].as_str().unwrap().to_owned();
    let request = upstream.next_request().await;
    request.token("only once");
    request.send(Step::Finish);
    let frames = on_first.until("complete").await;
    assert_eq!(text(&frames), "only once");

    // The race this stands for: after a gap, the first instance reads the run as streaming
    // from the store just before it ends, and announces it to its socket just after the socket
    // was sent all of it. Here the run's row says `running` again.
    let run = uuid::Uuid::parse_str(&run_id).unwrap();
    cluster
        .db
        .execute("UPDATE runs SET status = 'running' WHERE id = $1", run)
        .await;
    cut_off_first(&cluster).await;
    cluster.redis_proxy.as_ref().unwrap().heal();
    announced_again(first, 1.0).await;
    on_first.send(json!({"type": "ping"})).await;
    let frames = on_first.until("pong").await;
    assert!(
        frames
            .iter()
            .all(|f| f["type"] == "resync" || f["type"] == "pong"),
        "the answer was sent again: {frames:?}"
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn a_stop_whose_message_is_lost_still_stops_the_run_through_the_store() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let cluster = first_behind_a_proxy(&upstream, &[]).await;
    let (a, b) = (cluster.at(0), cluster.at(1));
    let api = a.user().await;
    let token = api.token.clone().unwrap();
    let conversation = api.new_conversation().await;
    let chat = format!("/ws/chat/{conversation}");
    let (mut on_a, _) = WsClient::authed(a, &chat, &token).await;
    on_a.send(json!({"type": "message", "content": "stop me"}))
        .await;
    let run_id = on_a.next().await["runId"].as_str().unwrap().to_owned();
    let request = upstream.next_request().await;
    // A cannot hear Redis: the stop message B publishes never reaches it.
    cluster.redis_proxy.as_ref().unwrap().partition();
    let (status, stopped) = on(b, &api)
        .post(&format!("/api/runs/{run_id}/stop"), json!({}))
        .await;
    assert_eq!(status, 200, "{stopped}");
    assert_eq!(stopped["status"], "stopped");
    request.cancelled().await;
    cluster.redis_proxy.as_ref().unwrap().heal();
    let frames = on_a.until("complete").await;
    assert_eq!(frames.last().unwrap()["status"], "stopped");
    cluster.stop().await;
}

/// A stop reaches a follower on another instance this fast even while Redis stalls (its
/// mirror's watchdog alone would take 5 s, one read of the stalled log 2 s; here it takes
/// about 0.7 s: a 200 ms heartbeat and the mirror's reads of the store).
const STOP_LANDS: Duration = Duration::from_millis(1500);
/// Sockets that sign in while Redis stalls wait at most one subscription's timeout (2 s), not
/// one each.
const SIGN_IN_WHILE_STALLED: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn a_stalled_redis_holds_up_neither_a_stop_nor_sign_ins_and_its_return_is_heard() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let cluster = cluster(2, &upstream, &[]).await;
    let (a, b) = (cluster.at(0), cluster.at(1));
    let api = a.user().await;
    let token = api.token.clone().unwrap();
    let conversation = api.new_conversation().await;
    let chat = format!("/ws/chat/{conversation}");
    let (mut on_b, _) = WsClient::authed(b, &chat, &token).await;
    let (mut on_a, _) = WsClient::authed(a, &chat, &token).await;
    on_a.send(json!({"type": "message", "content": "stall"}))
        .await;
    let run_id = on_a.next().await["runId"].as_str().unwrap().to_owned();
    assert_eq!(on_b.next().await["type"], "start");
    let request = upstream.next_request().await;
    request.token("partial ");
    read_text(&mut on_b, "partial ").await;
    // Another user, whose channel B has not subscribed yet.
    let other = b.user().await;
    let other_token = other.token.clone().unwrap();

    // Redis keeps its connections and answers nothing.
    let redis = cluster.redis.as_ref().unwrap();
    redis.pause().await;
    on_b.send(json!({"type": "stop", "runId": run_id})).await;
    let asked = std::time::Instant::now();
    let frames = tokio::time::timeout(STOP_LANDS, on_b.until("complete"))
        .await
        .expect("the stop did not land on the follower in time");
    eprintln!("the stop landed on the follower in {:?}", asked.elapsed());
    let complete = frames.last().unwrap();
    assert_eq!(complete["status"], "stopped", "{complete}");
    assert_eq!(complete["fullOutput"], "partial ");
    request.cancelled().await;
    assert_eq!(
        on_a.until("complete").await.last().unwrap()["status"],
        "stopped"
    );

    // Five sockets of the other user sign in on B at once while Redis still stalls.
    let signed_in = tokio::time::timeout(
        SIGN_IN_WHILE_STALLED,
        futures_util::future::join_all(
            (0..5).map(|_| WsClient::authed(b, "/ws/user", &other_token)),
        ),
    )
    .await
    .expect("sockets waited on Redis one after another to sign in");
    let mut sidebars: Vec<WsClient> = signed_in.into_iter().map(|(socket, _)| socket).collect();

    // Once Redis answers again, they are told to reload what they may have missed, and they
    // hear of changes made through A from then on.
    redis.resume().await;
    for sidebar in &mut sidebars {
        let frames = sidebar.until("resync").await;
        assert_eq!(frames.len(), 1, "{frames:?}");
    }
    let created = on(a, &other).new_conversation().await;
    for sidebar in &mut sidebars {
        let frame = sidebar.next().await;
        assert_eq!(frame["change"], "created", "{frame}");
        assert_eq!(frame["conversationId"], created.as_str());
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn restarting_or_crashing_one_instance_never_touches_another_ones_runs() {
    for redis in [true, false] {
        let upstream = FakeUpstream::start(Script::Manual).await;
        let mut cluster = Cluster::start(
            Engine::postgres().admin_url(),
            Options {
                count: 2,
                redis,
                proxy_first_to_redis: false,
                model_url: &upstream.base_url,
                env: &[],
            },
        )
        .await;
        let a = TestServer::external(cluster.at(0).addr);
        let api = a.user().await;
        let token = api.token.clone().unwrap();
        let conversation = api.new_conversation().await;
        let (mut on_a, _) = WsClient::authed(&a, &format!("/ws/chat/{conversation}"), &token).await;
        on_a.send(json!({"type": "message", "content": "long answer"}))
            .await;
        let run_id = on_a.next().await["runId"].as_str().unwrap().to_owned();
        let request = upstream.next_request().await;
        request.token("one ");
        read_text(&mut on_a, "one ").await;

        // B stops gracefully and starts again; then it crashes and starts again.
        cluster.instances[1].stop().await;
        cluster.instances[1].restart().await;
        cluster.instances[1].kill().await;
        cluster.instances[1].restart().await;
        // Long enough for any instance to have reaped A's run, were it taken for dead.
        tokio::time::sleep(common::cluster::INSTANCE_TIMEOUT * 2).await;
        let uuid = uuid::Uuid::parse_str(&run_id).unwrap();
        let (status, ..) = cluster.db.run_row(uuid).await;
        assert_eq!(status, "running", "redis={redis}: A's run was touched");

        request.token("two");
        request.send(Step::Finish);
        let frames = on_a.until("complete").await;
        let complete = frames.last().unwrap();
        assert_eq!(complete["status"], "completed", "redis={redis}");
        assert_eq!(complete["fullOutput"], "one two");
        // And B, restarted, replays it (from Redis or from the store).
        let body = on(cluster.at(1), &api).events(&run_id).await;
        let events = parse_sse(&body);
        let streamed: String = events
            .iter()
            .filter(|(kind, ..)| kind == "chunk")
            .map(|(_, _, data)| data["content"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(streamed, "one two", "redis={redis}");
        cluster.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn a_killed_owners_run_is_reaped_and_its_watchers_told() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let mut cluster = cluster(3, &upstream, &[]).await;
    let a = TestServer::external(cluster.at(0).addr);
    let api = a.user().await;
    let token = api.token.clone().unwrap();
    let conversation = api.new_conversation().await;
    let (mut on_a, _) =
        WsClient::authed(cluster.at(0), &format!("/ws/chat/{conversation}"), &token).await;
    on_a.send(json!({"type": "message", "content": "crash while answering"}))
        .await;
    let run_id = on_a.next().await["runId"].as_str().unwrap().to_owned();
    let request = upstream.next_request().await;
    let (mut on_b, _) =
        WsClient::authed(cluster.at(1), &format!("/ws/runs/{run_id}/stream"), &token).await;
    let said = words(1..=5);
    say(&request, &said);
    read_text(&mut on_b, &said.concat()).await;

    cluster.instances[0].kill().await;
    request.cancelled().await;
    let (frames, close) = on_b.until_closed().await;
    assert_eq!(close, 1000);
    let complete = frames.last().unwrap();
    assert_eq!(complete["type"], "complete", "{frames:?}");
    assert_eq!(complete["status"], "interrupted");
    assert_eq!(
        complete["fullOutput"],
        said.concat(),
        "what it produced is kept"
    );
    // The provider's report died with the owner: the reaper counts what was asked and said.
    assert_eq!(complete["usage"]["estimated"], true, "{complete}");
    assert!(complete["usage"]["promptTokens"].as_u64().unwrap() > 0);
    assert!(complete["usage"]["completionTokens"].as_u64().unwrap() >= 5);
    let (status, output, last_seq, _) = cluster
        .db
        .run_row(uuid::Uuid::parse_str(&run_id).unwrap())
        .await;
    assert_eq!(
        (status.as_str(), output.as_str()),
        ("interrupted", said.concat().as_str())
    );
    assert!(last_seq >= 1);
    let reaped = cluster.at(1).metric("wadi_reaped_runs_total").await
        + cluster.at(2).metric("wadi_reaped_runs_total").await;
    assert_eq!(reaped, 1.0, "reaped once, by one instance");
    // The conversation is free again.
    let (status, _) = on(cluster.at(2), &api)
        .post(
            &format!("/api/conversations/{conversation}/messages"),
            json!({"content": "again"}),
        )
        .await;
    assert_eq!(status, 201);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn wrong_passwords_are_counted_across_instances() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let cluster = cluster(
        2,
        &upstream,
        &[
            ("WADI_LOGIN_RATE_BURST", "3"),
            ("WADI_LOGIN_RATE_PER_MINUTE", "0.01"),
        ],
    )
    .await;
    let (a, b) = (cluster.at(0), cluster.at(1));
    let email = format!("guessed-{}@example.com", uuid::Uuid::new_v4());
    a.sign_up_as(&email, "the right password").await;
    let login = |server: &TestServer, password: &str| {
        server
            .http
            .post(server.url("/auth/v1/token?grant_type=password"))
            .json(&json!({"email": email, "password": password}))
            .send()
    };
    for _ in 0..3 {
        let response = login(a, "a guess").await.unwrap();
        assert_eq!(response.status(), 400);
    }
    // The account's three wrong passwords were given to A: B refuses a fourth guess, and the
    // right password too until the window has passed (each instance counted only its own).
    for password in ["another guess", "the right password"] {
        let response = login(b, password).await.unwrap();
        assert_eq!(response.status(), 429, "{password}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error_code"], "over_request_rate_limit", "{body}");
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn a_rest_stop_of_a_run_whose_owner_is_frozen_is_accepted_and_ends_it_stopped() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let cluster = cluster(2, &upstream, &[]).await;
    let (a, b) = (cluster.at(0), cluster.at(1));
    let api = a.user().await;
    let token = api.token.clone().unwrap();
    let conversation = api.new_conversation().await;
    let (mut on_a, _) = WsClient::authed(a, &format!("/ws/chat/{conversation}"), &token).await;
    on_a.send(json!({"type": "message", "content": "freeze while answering"}))
        .await;
    let run_id = on_a.next().await["runId"].as_str().unwrap().to_owned();
    let request = upstream.next_request().await;
    let (mut on_b, _) = WsClient::authed(b, &format!("/ws/runs/{run_id}/stream"), &token).await;
    request.token("before ");
    read_text(&mut on_b, "before ").await;

    cluster.instances[0].pause().await;
    // Nobody can confirm it: accepted (not a 503 that says nothing was saved), the run as it
    // stands.
    let (status, run) = on(b, &api)
        .post(&format!("/api/runs/{run_id}/stop"), json!({}))
        .await;
    assert_eq!(status, 202, "{run}");
    assert_eq!(run["status"], "running");
    // The stop holds: the frozen owner is reaped, and the run ends stopped.
    let frames = on_b.until("complete").await;
    assert_eq!(frames.last().unwrap()["status"], "stopped");
    cluster.instances[0].resume().await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn a_paused_owner_that_wakes_up_never_writes_the_run_it_lost() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let cluster = cluster(2, &upstream, &[]).await;
    let api = cluster.at(0).user().await;
    let token = api.token.clone().unwrap();
    let conversation = api.new_conversation().await;
    let (mut on_a, _) =
        WsClient::authed(cluster.at(0), &format!("/ws/chat/{conversation}"), &token).await;
    on_a.send(json!({"type": "message", "content": "pause while answering"}))
        .await;
    let run_id = on_a.next().await["runId"].as_str().unwrap().to_owned();
    let uuid = uuid::Uuid::parse_str(&run_id).unwrap();
    let request = upstream.next_request().await;
    let (mut on_b, _) =
        WsClient::authed(cluster.at(1), &format!("/ws/runs/{run_id}/stream"), &token).await;
    let said = words(1..=3);
    say(&request, &said);
    read_text(&mut on_b, &said.concat()).await;

    cluster.instances[0].pause().await;
    let frames = on_b.until("complete").await;
    let complete = frames.last().unwrap();
    assert_eq!(complete["status"], "interrupted");
    assert_eq!(complete["fullOutput"], said.concat());
    let saved = cluster.db.run_row(uuid).await;
    let redis = cluster.redis.as_ref().unwrap();
    let log_key = format!("wadi:run:{{{run_id}}}:log");
    let log_before = redis.cli(&["XLEN", &log_key]).await;

    // The model kept talking while A slept; A wakes up with that in its socket.
    say(&request, &words(4..=6));
    cluster.instances[0].resume().await;
    request.cancelled().await;
    // A has cut the run off: whatever it does now, it never writes it.
    cluster
        .at(0)
        .await_metric("wadi_fenced_runs_total", 1.0)
        .await;
    let frames = on_a.until("complete").await;
    assert_eq!(frames.last().unwrap()["status"], "interrupted");
    assert_eq!(
        cluster.db.run_row(uuid).await,
        saved,
        "the store is untouched"
    );
    assert_eq!(
        redis.cli(&["XLEN", &log_key]).await,
        log_before,
        "the log is untouched"
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn a_redis_restart_mid_run_loses_and_repeats_nothing() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let mut cluster = cluster(2, &upstream, &[]).await;
    let a = TestServer::external(cluster.at(0).addr);
    let api = a.user().await;
    let token = api.token.clone().unwrap();
    let conversation = api.new_conversation().await;
    let (mut on_a, _) = WsClient::authed(&a, &format!("/ws/chat/{conversation}"), &token).await;
    on_a.send(json!({"type": "message", "content": "survive redis"}))
        .await;
    let run_id = on_a.next().await["runId"].as_str().unwrap().to_owned();
    let request = upstream.next_request().await;
    let (mut on_b, _) =
        WsClient::authed(cluster.at(1), &format!("/ws/runs/{run_id}/stream"), &token).await;
    let all = words(1..=15);
    say(&request, &all[..5]);
    let mut seen = read_text(&mut on_b, &all[..5].concat()).await;

    let redis = cluster.redis.as_mut().unwrap();
    redis.kill().await;
    say(&request, &all[5..10]);
    // A streams on without Redis; B catches up from the store.
    seen.extend(read_text(&mut on_b, &all[5..10].concat()).await);
    redis.start_again().await;
    say(&request, &all[10..]);
    request.send(Step::Finish);
    seen.extend(on_b.until("complete").await);
    assert_contiguous(&seen, 1);
    assert_eq!(text(&seen), all.concat());
    assert_eq!(seen.last().unwrap()["fullOutput"], all.concat());
    let (_, run) = api.get(&format!("/api/runs/{run_id}")).await;
    assert_eq!(run["output"], all.concat());
    let frames = on_a.until("complete").await;
    assert_contiguous(&frames, 1);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn an_owner_cut_off_from_redis_for_a_while_loses_and_repeats_nothing() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let cluster = first_behind_a_proxy(&upstream, &[]).await;
    let api = cluster.at(0).user().await;
    let token = api.token.clone().unwrap();
    let conversation = api.new_conversation().await;
    let (mut on_a, _) =
        WsClient::authed(cluster.at(0), &format!("/ws/chat/{conversation}"), &token).await;
    on_a.send(json!({"type": "message", "content": "partition"}))
        .await;
    let run_id = on_a.next().await["runId"].as_str().unwrap().to_owned();
    let request = upstream.next_request().await;
    let (mut on_b, _) =
        WsClient::authed(cluster.at(1), &format!("/ws/runs/{run_id}/stream"), &token).await;
    let all = words(1..=15);
    say(&request, &all[..5]);
    let mut seen = read_text(&mut on_b, &all[..5].concat()).await;
    let proxy = cluster.redis_proxy.as_ref().unwrap();
    proxy.partition();
    say(&request, &all[5..10]);
    // Cut off from Redis, A's appends fail; B still gets the words (from the store).
    seen.extend(read_text(&mut on_b, &all[5..10].concat()).await);
    proxy.heal();
    say(&request, &all[10..]);
    request.send(Step::Finish);
    seen.extend(on_b.until("complete").await);
    assert_contiguous(&seen, 1);
    assert_eq!(text(&seen), all.concat());
    let (_, run) = api.get(&format!("/api/runs/{run_id}")).await;
    assert_eq!(run["output"], all.concat());
    assert!(cluster.at(0).metric("wadi_redis_errors_total").await >= 1.0);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn one_active_run_per_conversation_holds_across_instances() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let cluster = cluster(2, &upstream, &[]).await;
    let api = cluster.at(0).user().await;
    let api_b = on(cluster.at(1), &api);
    let conversation = api.new_conversation().await;
    let path = format!("/api/conversations/{conversation}/messages");
    let (mut on_a, _) = WsClient::authed(
        cluster.at(0),
        &format!("/ws/chat/{conversation}"),
        &api.token.clone().unwrap(),
    )
    .await;
    for round in 1..=5 {
        // Two sends at once, one on each instance, while no run streams.
        let body = json!({"content": format!("race {round}")});
        let (a, b) = tokio::join!(api.post(&path, body.clone()), api_b.post(&path, body));
        let mut statuses = [a.0.as_u16(), b.0.as_u16()];
        statuses.sort_unstable();
        assert_eq!(statuses, [201, 409], "round {round}: {a:?} {b:?}");
        let refused = if a.0 == 409 { &a.1 } else { &b.1 };
        assert_eq!(refused["code"], "run_in_progress", "round {round}");
        let request = upstream.next_request().await;
        request.send(Step::Finish);
        on_a.until("complete").await;
    }
    let conversation_id = uuid::Uuid::parse_str(&conversation).unwrap();
    let count = cluster
        .db
        .count(
            "SELECT COUNT(*) FROM runs WHERE conversation_id = $1",
            conversation_id,
        )
        .await;
    assert_eq!(count, 5, "one run per round");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn readyz_names_the_instance_and_reports_redis() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let mut cluster = cluster(2, &upstream, &[]).await;
    let (a, b) = (
        cluster.instances[0].ready().await,
        cluster.instances[1].ready().await,
    );
    assert_eq!(a["status"], "ready", "{a}");
    assert_eq!(a["cluster"], "redis");
    assert_eq!(a["redis"], "up");
    assert_ne!(a["instance"], b["instance"], "each instance has its own id");
    assert!(
        cluster
            .at(0)
            .metrics_text()
            .await
            .contains(&format!("instance=\"{}\"", a["instance"].as_str().unwrap()))
    );
    cluster.redis.as_mut().unwrap().kill().await;
    let response = cluster
        .at(0)
        .http
        .get(cluster.at(0).url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["redis"], "down");
    cluster.redis.as_mut().unwrap().start_again().await;
    // B was not asked while Redis was away: its connection is the one the restart broke. It is
    // replaced at the first ask, not reported down.
    let b = cluster.instances[1].ready().await;
    assert_eq!(b["redis"], "up", "{b}");
    tokio::time::timeout(TIMEOUT, async {
        while cluster.instances[0].ready().await["redis"] != "up" {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("readyz never saw Redis again");
    // A Redis that answers but refuses writes (out of memory, noeviction) is no better.
    let redis = cluster.redis.as_ref().unwrap();
    redis.cli(&["CONFIG", "SET", "maxmemory", "1"]).await;
    let response = cluster
        .at(0)
        .http
        .get(cluster.at(0).url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]).await;
    assert_eq!(cluster.instances[0].ready().await["redis"], "up");
    cluster.stop().await;
}

#[tokio::test]
async fn cluster_mode_refuses_sqlite_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_wadi"))
        .env_clear()
        .env("WADI_ADDR", "127.0.0.1:0")
        .env("WADI_DATA_DIR", dir.path())
        .env("REDIS_URL", "redis://127.0.0.1:1")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("Postgres"), "{said}");
    assert!(said.contains("REDIS_URL"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn a_users_sidebar_on_one_instance_hears_of_changes_made_through_another() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let cluster = cluster(2, &upstream, &[]).await;
    let (a, b) = (cluster.at(0), cluster.at(1));
    let api = a.user().await;
    let token = api.token.clone().unwrap();
    let (mut sidebar, _) = WsClient::authed(b, "/ws/user", &token).await;
    let conversation = api.new_conversation().await;
    let created = sidebar.next().await;
    assert_eq!(created["type"], "conversation", "{created}");
    assert_eq!(created["change"], "created");
    assert_eq!(created["conversationId"], conversation.as_str());
    let (status, _) = api
        .post(
            &format!("/api/conversations/{conversation}/messages"),
            json!({"content": "through A"}),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(sidebar.next().await["change"], "message");
    let request = upstream.next_request().await;
    request.token("done");
    request.send(Step::Finish);
    let answered = sidebar.next().await;
    assert_eq!(answered["change"], "answered", "{answered}");
    assert_eq!(answered["conversationId"], conversation.as_str());
}

/// A user's status and error code from a REST call.
fn refused(answer: &(reqwest::StatusCode, Value)) -> (u16, &str) {
    (
        answer.0.as_u16(),
        answer.1["code"].as_str().unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn message_and_conversation_rates_hold_across_instances() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let cluster = cluster(
        2,
        &upstream,
        &[
            ("WADI_MESSAGE_RATE_BURST", "2"),
            ("WADI_MESSAGE_RATE_PER_MINUTE", "0.01"),
            ("WADI_CONVERSATION_RATE_BURST", "4"),
            ("WADI_CONVERSATION_RATE_PER_MINUTE", "0.01"),
        ],
    )
    .await;
    let (a, b) = (cluster.at(0), cluster.at(1));
    let on_a = a.user().await;
    let on_b = on(b, &on_a);

    // Four conversations, two through each instance: the user's whole allowance, though each
    // instance counted only two of its four.
    let first = on_a.new_conversation().await;
    let second = on_b.new_conversation().await;
    let third = on_a.new_conversation().await;
    on_b.new_conversation().await;
    for api in [&on_a, &on_b] {
        let answer = api.post("/api/conversations", json!({})).await;
        assert_eq!(refused(&answer), (429, "rate_limited"), "{}", answer.1);
    }
    // Redis holds when the allowance is whole again: four events of 6 000 s each from now, and
    // forgets the key then.
    let redis = cluster.redis.as_ref().unwrap();
    let key = redis
        .cli(&["--scan", "--pattern", "wadi:rate:conversations:*"])
        .await;
    let ttl: u64 = redis.cli(&["PTTL", &key]).await.parse().unwrap();
    assert!(
        (4 * 6_000_000 - 60_000..=4 * 6_000_000).contains(&ttl),
        "{key}: {ttl} ms"
    );

    // Two messages in all. A send refused because an answer is being written gives its message
    // back on every instance, not only on the one that refused it.
    let path = |conversation: &str| format!("/api/conversations/{conversation}/messages");
    let sent = on_a.send(&first, "one").await;
    let request = upstream.next_request().await;
    let busy = on_b.post(&path(&first), json!({"content": "two"})).await;
    assert_eq!(refused(&busy), (409, "run_in_progress"), "{}", busy.1);
    let second_sent = on_b.send(&second, "two, elsewhere").await;
    let second_request = upstream.next_request().await;
    for api in [&on_a, &on_b] {
        let answer = api.post(&path(&third), json!({"content": "three"})).await;
        assert_eq!(refused(&answer), (429, "rate_limited"), "{}", answer.1);
    }

    request.send(Step::Finish);
    second_request.send(Step::Finish);
    for (api, sent) in [(&on_a, &sent), (&on_b, &second_sent)] {
        let events = api.events(sent["run"]["id"].as_str().unwrap()).await;
        assert!(events.contains("event: complete"), "{events}");
    }
    let keys = redis.cli(&["--scan", "--pattern", "wadi:rate:*"]).await;
    for name in ["messages", "attempts", "conversations"] {
        assert!(keys.contains(&format!("wadi:rate:{name}:")), "{keys}");
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn signups_and_refreshes_per_address_hold_across_instances() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let cluster = cluster(
        2,
        &upstream,
        &[
            ("WADI_AUTH_RATE_BURST", "3"),
            ("WADI_AUTH_RATE_PER_MINUTE", "0.01"),
            ("WADI_REFRESH_RATE_BURST", "2"),
            ("WADI_REFRESH_RATE_PER_MINUTE", "0.01"),
        ],
    )
    .await;
    let (a, b) = (cluster.at(0), cluster.at(1));
    let session = a.sign_up().await;
    b.sign_up().await;
    a.sign_up().await;
    let signup = |server: &TestServer| {
        server
            .http
            .post(server.url("/auth/v1/signup"))
            .json(&json!({
                "email": format!("one-too-many-{}@example.com", uuid::Uuid::new_v4()),
                "password": "a fine password",
            }))
            .send()
    };
    for server in [a, b] {
        let response = signup(server).await.unwrap();
        assert_eq!(response.status(), 429);
    }

    let refresh = |server: &TestServer, token: String| {
        server
            .http
            .post(server.url("/auth/v1/token?grant_type=refresh_token"))
            .json(&json!({"refresh_token": token}))
            .send()
    };
    let response = refresh(a, session.refresh_token().to_owned())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let rotated: Value = response.json().await.unwrap();
    let token = rotated["refresh_token"].as_str().unwrap().to_owned();
    let response = refresh(b, token).await.unwrap();
    assert_eq!(response.status(), 200);
    let rotated: Value = response.json().await.unwrap();
    let token = rotated["refresh_token"].as_str().unwrap().to_owned();
    for server in [a, b] {
        let response = refresh(server, token.clone()).await.unwrap();
        assert_eq!(
            response.status(),
            429,
            "the address's two refreshes are spent"
        );
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn an_instance_cut_off_from_redis_counts_rates_on_its_own() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let cluster = first_behind_a_proxy(
        &upstream,
        &[
            ("WADI_CONVERSATION_RATE_BURST", "3"),
            ("WADI_CONVERSATION_RATE_PER_MINUTE", "0.01"),
        ],
    )
    .await;
    let (a, b) = (cluster.at(0), cluster.at(1));
    let on_a = a.user().await;
    let on_b = on(b, &on_a);
    // B spends the whole shared allowance.
    for _ in 0..3 {
        on_b.new_conversation().await;
    }
    assert_eq!(
        refused(&on_a.post("/api/conversations", json!({})).await),
        (429, "rate_limited"),
        "A asks Redis"
    );
    cut_off_first(&cluster).await;
    // A cannot ask: its own count decides, up to its own burst (less the refused request, which
    // A counted too).
    for _ in 0..2 {
        on_a.new_conversation().await;
    }
    assert_eq!(
        refused(&on_a.post("/api/conversations", json!({})).await),
        (429, "rate_limited"),
        "A's own count"
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(wadi_postgres),
    ignore = "needs Postgres: set WADI_TEST_POSTGRES_URL (cargo xtask test does)"
)]
async fn rates_are_shared_again_at_the_first_request_after_redis_restarts() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let mut cluster = cluster(
        2,
        &upstream,
        &[
            ("WADI_CONVERSATION_RATE_BURST", "2"),
            ("WADI_CONVERSATION_RATE_PER_MINUTE", "0.01"),
        ],
    )
    .await;
    let token = {
        let api = cluster.at(0).user().await;
        api.new_conversation().await;
        api.token.clone()
    };
    let redis = cluster.redis.as_mut().unwrap();
    redis.kill().await;
    redis.start_again().await;
    // Redis is empty again: the count starts over, and each instance's first request after the
    // restart is counted there (its connection, broken by the restart, is replaced), not by the
    // instance alone.
    let as_user = |server| Api {
        server,
        token: token.clone(),
    };
    as_user(cluster.at(0)).new_conversation().await;
    let on_b = as_user(cluster.at(1));
    on_b.new_conversation().await;
    let answer = on_b.post("/api/conversations", json!({})).await;
    assert_eq!(refused(&answer), (429, "rate_limited"), "{}", answer.1);
    cluster.stop().await;
}
