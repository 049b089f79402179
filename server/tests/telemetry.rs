//! OpenTelemetry export: the real binary, started with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at
//! a small OTLP/HTTP receiver run by the test, sends the spans of what it did.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, Router, extract::State, routing::post};
use common::{TIMEOUT, cluster::Instance};
use serde_json::{Value, json};

/// Every span the receiver got, flattened: `resourceSpans[].scopeSpans[].spans[]`, each with
/// its resource's `service.name` added as `service`.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Value>>>);

impl Received {
    fn spans(&self) -> Vec<Value> {
        self.0.lock().unwrap().clone()
    }

    /// Waits for a span matching `find`.
    async fn span(&self, what: &str, find: impl Fn(&Value) -> bool) -> Value {
        tokio::time::timeout(TIMEOUT, async {
            loop {
                if let Some(span) = self.spans().into_iter().find(|span| find(span)) {
                    return span;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {what} span among {:#?}", self.spans()))
    }
}

async fn receive(State(received): State<Received>, Json(body): Json<Value>) -> Json<Value> {
    for resource in body["resourceSpans"].as_array().unwrap() {
        let service = resource["resource"]["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|attribute| attribute["key"] == "service.name")
            .map(|attribute| attribute["value"]["stringValue"].clone())
            .unwrap();
        for scope in resource["scopeSpans"].as_array().unwrap() {
            for span in scope["spans"].as_array().unwrap() {
                let mut span = span.clone();
                span["service"] = service.clone();
                received.0.lock().unwrap().push(span);
            }
        }
    }
    Json(json!({}))
}

fn attribute<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|attribute| attribute["key"] == key)
        .map(|attribute| &attribute["value"])
}

#[tokio::test]
async fn requests_and_runs_are_exported_as_one_trace_to_an_otlp_receiver() {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/v1/traces", post(receive))
        .with_state(received.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let data = tempfile::tempdir().unwrap();
    let env = [
        ("WADI_DATA_DIR", data.path().to_str().unwrap()),
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            &format!("http://{receiver}/"),
        ),
        ("OTEL_SERVICE_NAME", "wadi-under-test"),
        ("WADI_DEMO_PACE", "1ms"),
    ]
    .map(|(key, value)| (key.to_owned(), value.to_owned()));
    let mut instance = Instance::start("traced", &env).await;
    let server = &instance.server;
    let user = server.user().await;
    let conversation = user.new_conversation().await;

    // A request that continues a caller's trace, with a request id of its own.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let response = server
        .http
        .post(server.url(&format!("/api/conversations/{conversation}/messages")))
        .bearer_auth(user.token.as_deref().unwrap())
        .header("x-request-id", "otlp-test-request")
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .json(&json!({"content": "hello", "clientMessageId": uuid::Uuid::new_v4()}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());

    let request = received
        .span("the message request", |span| {
            attribute(span, "request_id") == Some(&json!({"stringValue": "otlp-test-request"}))
        })
        .await;
    assert_eq!(request["service"], "wadi-under-test");
    assert_eq!(request["name"], "POST /api/conversations/{id}/messages");
    assert_eq!(request["kind"], 2, "a server span");
    assert_eq!(
        request["traceId"], caller_trace,
        "the caller's trace goes on"
    );
    assert_eq!(request["parentSpanId"], caller_span);
    assert_eq!(
        attribute(&request, "status"),
        Some(&json!({"intValue": "201"}))
    );
    let start: u128 = request["startTimeUnixNano"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let end: u128 = request["endTimeUnixNano"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(end >= start);
    // The request's log line is an event of its span.
    let events = request["events"].as_array().unwrap();
    assert!(
        events.iter().any(|event| event["name"] == "request"),
        "{request:#}"
    );

    // The run it started is a child of the request, in the same trace.
    let run = received
        .span("the run", |span| {
            span["name"] == "run" && span["traceId"] == caller_trace
        })
        .await;
    assert_eq!(run["parentSpanId"], request["spanId"]);
    assert!(attribute(&run, "run_id").is_some());

    // A run sent over a socket is a child of the span of the frame that sent it, which carries
    // the socket's fields (the socket keeps no span open: it would cost each idle socket
    // memory).
    let (mut ws, _) = common::ws::WsClient::authed(
        server,
        &format!("/ws/chat/{conversation}"),
        user.token.as_deref().unwrap(),
    )
    .await;
    ws.send(json!({"type": "message", "content": "over the socket"}))
        .await;
    let frames = ws.until("complete").await;
    let run_id = frames[0]["runId"].as_str().unwrap().to_owned();
    let run = received
        .span("the socket's run", |span| {
            span["name"] == "run"
                && attribute(span, "run_id") == Some(&json!({"stringValue": run_id}))
        })
        .await;
    let frame = received
        .span("the socket frame's span", |span| {
            span["spanId"] == run["parentSpanId"]
        })
        .await;
    assert_eq!(frame["name"], "ws", "{frame:#}");
    assert_eq!(
        attribute(&frame, "endpoint"),
        Some(&json!({"stringValue": "chat"}))
    );
    assert!(attribute(&frame, "client_id").is_some(), "{frame:#}");
    assert!(attribute(&frame, "request_id").is_some(), "{frame:#}");

    // Spans without a caller's trace start their own.
    let other = received
        .span("a sign-up", |span| span["name"] == "POST /auth/v1/signup")
        .await;
    assert_ne!(other["traceId"], caller_trace);
    assert_eq!(other["parentSpanId"], "");
    instance.stop().await;
}
