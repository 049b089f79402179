//! The user socket (`/ws/user`): every change to a user's conversations, as it happens, and
//! nothing of anyone else's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    Api, TestServer,
    upstream::{FakeUpstream, Script, Step},
    ws::WsClient,
};
use serde_json::{Value, json};

/// The next `conversation` frame (pings are answered by the client as it reads).
async fn change(socket: &mut WsClient) -> Value {
    let frame = socket.next().await;
    assert_eq!(frame["type"], "conversation", "{frame}");
    frame
}

fn token(api: &Api<'_>) -> String {
    api.token.clone().unwrap()
}

#[tokio::test]
async fn the_user_socket_tells_of_every_change_to_your_conversations_only() {
    let upstream = FakeUpstream::start(Script::Manual).await;
    let server =
        TestServer::configured(common::Engine::Sqlite, |config| upstream.configure(config)).await;
    let api = server.user().await;
    let stranger = server.user().await;
    let (mut socket, authenticated) = WsClient::authed(&server, "/ws/user", &token(&api)).await;
    assert_eq!(authenticated["type"], "authenticated", "{authenticated}");
    assert!(authenticated.get("activeRun").is_none());
    let (mut theirs, _) = WsClient::authed(&server, "/ws/user", &token(&stranger)).await;

    let conversation = api.new_conversation().await;
    let created = change(&mut socket).await;
    assert_eq!(
        created,
        json!({"type": "conversation", "conversationId": conversation, "change": "created",
               "title": "New conversation"})
    );
    let (status, _) = api
        .call(
            reqwest::Method::PATCH,
            &format!("/api/conversations/{conversation}"),
            Some(json!({"title": "Trip plans"})),
        )
        .await;
    assert_eq!(status, 200);
    let renamed = change(&mut socket).await;
    assert_eq!(renamed["change"], "updated");
    assert_eq!(renamed["title"], "Trip plans");

    let (status, sent) = api
        .post(
            &format!("/api/conversations/{conversation}/messages"),
            json!({"content": "Where to?"}),
        )
        .await;
    assert_eq!(status, 201, "{sent}");
    assert_eq!(change(&mut socket).await["change"], "message");
    let request = upstream.next_request().await;
    request.token("Porto.");
    request.send(Step::Finish);
    let answered = change(&mut socket).await;
    assert_eq!(answered["change"], "answered");
    assert_eq!(answered["conversationId"], conversation.as_str());

    // The user socket answers pings and refuses chat frames, staying open.
    socket.send(json!({"type": "ping"})).await;
    assert_eq!(socket.next().await["type"], "pong");
    for frame in [
        json!({"type": "message", "content": "hi"}),
        json!({"type": "stop"}),
        json!({"type": "regenerate", "messageId": uuid::Uuid::now_v7()}),
        json!({"type": "resume", "runId": uuid::Uuid::now_v7()}),
    ] {
        socket.send(frame.clone()).await;
        let error = socket.next().await;
        assert_eq!(error["type"], "error", "{frame}: {error}");
        assert_eq!(error["code"], "invalid_request", "{frame}: {error}");
    }

    let status = api.delete_conversation(&conversation).await;
    assert_eq!(status, 204);
    let deleted = change(&mut socket).await;
    assert_eq!(deleted["change"], "deleted");
    assert!(deleted.get("title").is_none());

    // The stranger heard nothing of it; their own change arrives first.
    stranger.new_conversation().await;
    let own = change(&mut theirs).await;
    assert_eq!(own["change"], "created");
    assert_ne!(own["conversationId"], conversation.as_str());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_user_socket_needs_a_valid_token() {
    let server = TestServer::start().await;
    // `connect` reads the `connected` frame.
    let mut socket = WsClient::connect(&server, "/ws/user").await;
    socket
        .send(json!({"type": "auth", "token": "not-a-token"}))
        .await;
    let (frames, code) = socket.until_closed().await;
    assert_eq!(code, 1008, "{frames:?}");
    assert!(
        frames.iter().any(|f| f["code"] == "invalid_token"),
        "{frames:?}"
    );
    server.shutdown().await.unwrap();
}

/// Every change reaches every open user socket promptly, whether the socket was idle or busy
/// with a frame of its own when it was told. The heartbeat is set to an hour: a socket whose
/// task missed a wake-up would otherwise be woken by its next ping and hide the loss.
#[tokio::test]
async fn every_user_socket_hears_every_change_without_waiting_for_a_heartbeat() {
    let server = TestServer::configured(common::Engine::Sqlite, |config| {
        config.sockets.heartbeat_interval = std::time::Duration::from_secs(3600);
        // The sockets' pings come faster than a client's would.
        config.sockets.ws_rate_burst = 1000;
    })
    .await;
    let api = server.user().await;
    let conversation = api.new_conversation().await;
    let mut sockets = Vec::new();
    for _ in 0..6 {
        let (socket, _) = WsClient::authed(&server, "/ws/user", &token(&api)).await;
        sockets.push(socket);
    }
    for round in 0..40 {
        // Half the sockets are handling a frame of theirs as the change is posted.
        for socket in sockets.iter_mut().skip(round % 2).step_by(2) {
            socket.send(json!({"type": "ping"})).await;
        }
        let title = format!("Round {round}");
        let (status, _) = api
            .call(
                reqwest::Method::PATCH,
                &format!("/api/conversations/{conversation}"),
                Some(json!({"title": title})),
            )
            .await;
        assert_eq!(status, 200);
        for (index, socket) in sockets.iter_mut().enumerate() {
            let pinged = index % 2 == round % 2;
            let mut frames = vec![socket.next().await];
            if pinged {
                frames.push(socket.next().await);
            }
            let changes: Vec<_> = frames
                .iter()
                .filter(|frame| frame["type"] == "conversation")
                .collect();
            assert_eq!(
                changes.len(),
                1,
                "socket {index}, round {round}: {frames:?}"
            );
            assert_eq!(changes[0]["title"], title.as_str(), "socket {index}");
            if pinged {
                assert!(
                    frames.iter().any(|frame| frame["type"] == "pong"),
                    "socket {index}, round {round}: {frames:?}"
                );
            }
        }
    }
    server.shutdown().await.unwrap();
}
