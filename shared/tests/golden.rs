#![allow(clippy::unwrap_used, clippy::expect_used)]

//! Golden tests: the exact JSON of every frame, both directions, including the original system's
//! shapes. A change here is a protocol change and must be reflected in `docs/protocol.md`.

use serde_json::{Value, json};
use uuid::Uuid;
use wadi_protocol::{
    ActiveRun, ClientMessage, DecodeError, ErrorCode, PROTOCOL_VERSION, RunStatus, ServerMessage,
    Usage, close,
};

const RUN: Uuid = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
const CONV: Uuid = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0002);
const MSG: Uuid = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0003);
const USER: Uuid = Uuid::from_u128(0x1111_1111_1111_1111_1111_1111_1111_1111);

fn to_value(frame: &ServerMessage) -> Value {
    serde_json::from_str(&frame.encode()).unwrap()
}

#[test]
fn client_frames_have_pinned_json() {
    let cases = [
        (
            ClientMessage::Auth { token: "t".into() },
            r#"{"type":"auth","token":"t"}"#,
        ),
        (
            ClientMessage::Message {
                content: "hi".into(),
                client_message_id: None,
                parent_id: None,
                edit_of: None,
            },
            r#"{"type":"message","content":"hi"}"#,
        ),
        (
            ClientMessage::Message {
                content: "hi".into(),
                client_message_id: Some("c-1".into()),
                parent_id: None,
                edit_of: None,
            },
            r#"{"type":"message","content":"hi","clientMessageId":"c-1"}"#,
        ),
        (
            ClientMessage::Message {
                content: "hi".into(),
                client_message_id: Some("c-2".into()),
                parent_id: Some(MSG),
                edit_of: None,
            },
            r#"{"type":"message","content":"hi","clientMessageId":"c-2","parentId":"01900000-0000-7000-8000-000000000003"}"#,
        ),
        (
            ClientMessage::Message {
                content: "hi again".into(),
                client_message_id: None,
                parent_id: None,
                edit_of: Some(MSG),
            },
            r#"{"type":"message","content":"hi again","editOf":"01900000-0000-7000-8000-000000000003"}"#,
        ),
        (
            ClientMessage::Regenerate { message_id: MSG },
            r#"{"type":"regenerate","messageId":"01900000-0000-7000-8000-000000000003"}"#,
        ),
        (ClientMessage::Stop { run_id: None }, r#"{"type":"stop"}"#),
        (
            ClientMessage::Stop { run_id: Some(RUN) },
            r#"{"type":"stop","runId":"01900000-0000-7000-8000-000000000001"}"#,
        ),
        (
            ClientMessage::Resume {
                run_id: RUN,
                after_seq: 7,
            },
            r#"{"type":"resume","runId":"01900000-0000-7000-8000-000000000001","afterSeq":7}"#,
        ),
        (ClientMessage::Ping, r#"{"type":"ping"}"#),
    ];
    for (frame, json) in cases {
        assert_eq!(frame.encode(), json);
        assert_eq!(ClientMessage::decode(json).unwrap(), frame, "{json}");
    }
}

#[test]
fn the_original_clients_frames_parse() {
    assert_eq!(
        ClientMessage::decode(r#"{"type":"auth","token":"t"}"#).unwrap(),
        ClientMessage::Auth { token: "t".into() }
    );
    assert_eq!(
        ClientMessage::decode(r#"{"type":"message","content":"hi"}"#).unwrap(),
        ClientMessage::Message {
            content: "hi".into(),
            client_message_id: None,
            parent_id: None,
            edit_of: None,
        }
    );
    assert_eq!(
        ClientMessage::decode(r#"{"type":"stop"}"#).unwrap(),
        ClientMessage::Stop { run_id: None }
    );
}

#[test]
fn unknown_and_null_optional_fields_are_ignored() {
    assert_eq!(
        ClientMessage::decode(
            r#"{"type":"message","content":"hi","extra":[1,2],"clientMessageId":null}"#
        )
        .unwrap(),
        ClientMessage::Message {
            content: "hi".into(),
            client_message_id: None,
            parent_id: None,
            edit_of: None,
        }
    );
    assert_eq!(
        ClientMessage::decode(
            r#"{"type":"resume","runId":"01900000-0000-7000-8000-000000000001"}"#
        )
        .unwrap(),
        ClientMessage::Resume {
            run_id: RUN,
            after_seq: 0
        }
    );
    // A server from before the window said only `resync`: reload at once.
    assert_eq!(
        ServerMessage::decode(r#"{"type":"resync"}"#).unwrap(),
        ServerMessage::Resync { within_ms: 0 }
    );
}

#[test]
fn server_frames_have_pinned_json() {
    let cases = [
        (
            ServerMessage::Connected {
                client_id: MSG,
                protocol_version: PROTOCOL_VERSION,
            },
            json!({"type": "connected", "clientId": MSG, "protocolVersion": 1}),
        ),
        (
            ServerMessage::Authenticated {
                user_id: USER,
                expires_at: 1_767_229_200,
                active_run: None,
            },
            json!({"type": "authenticated", "userId": USER, "expiresAt": 1_767_229_200}),
        ),
        (
            ServerMessage::Authenticated {
                user_id: USER,
                expires_at: 1_767_229_200,
                active_run: Some(ActiveRun {
                    run_id: RUN,
                    message_id: MSG,
                    last_seq: 12,
                }),
            },
            json!({"type": "authenticated", "userId": USER, "expiresAt": 1_767_229_200,
                   "activeRun": {"runId": RUN, "messageId": MSG, "lastSeq": 12}}),
        ),
        (
            ServerMessage::Start {
                run_id: RUN,
                conversation_id: CONV,
                message_id: MSG,
                client_message_id: None,
            },
            json!({"type": "start", "runId": RUN, "conversationId": CONV, "messageId": MSG}),
        ),
        (
            ServerMessage::Start {
                run_id: RUN,
                conversation_id: CONV,
                message_id: MSG,
                client_message_id: Some("c-1".into()),
            },
            json!({"type": "start", "runId": RUN, "conversationId": CONV, "messageId": MSG,
                   "clientMessageId": "c-1"}),
        ),
        (
            ServerMessage::Chunk {
                run_id: RUN,
                seq: 1,
                content: "Hel".into(),
            },
            json!({"type": "chunk", "runId": RUN, "seq": 1, "content": "Hel"}),
        ),
        (
            ServerMessage::Complete {
                run_id: RUN,
                full_output: "Hello".into(),
                status: RunStatus::Completed,
                usage: Some(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 2,
                    total_tokens: 5,
                    estimated: false,
                }),
            },
            json!({"type": "complete", "runId": RUN, "fullOutput": "Hello", "status": "completed",
                   "usage": {"promptTokens": 3, "completionTokens": 2, "totalTokens": 5}}),
        ),
        (
            ServerMessage::Complete {
                run_id: RUN,
                full_output: "Hel".into(),
                status: RunStatus::Stopped,
                usage: Some(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 1,
                    total_tokens: 4,
                    estimated: true,
                }),
            },
            json!({"type": "complete", "runId": RUN, "fullOutput": "Hel", "status": "stopped",
                   "usage": {"promptTokens": 3, "completionTokens": 1, "totalTokens": 4,
                             "estimated": true}}),
        ),
        (
            ServerMessage::Complete {
                run_id: RUN,
                full_output: "He".into(),
                status: RunStatus::Stopped,
                usage: None,
            },
            json!({"type": "complete", "runId": RUN, "fullOutput": "He", "status": "stopped"}),
        ),
        (
            ServerMessage::error(ErrorCode::RunInProgress, "busy", None),
            json!({"type": "error", "code": "run_in_progress", "message": "busy"}),
        ),
        (
            ServerMessage::error(ErrorCode::ModelError, "upstream failed", Some(RUN)),
            json!({"type": "error", "code": "model_error", "message": "upstream failed", "runId": RUN}),
        ),
        (
            ServerMessage::Error {
                code: ErrorCode::Overloaded,
                message: "busy".into(),
                run_id: None,
                retry_after_ms: Some(2000),
            },
            json!({"type": "error", "code": "overloaded", "message": "busy", "retryAfterMs": 2000}),
        ),
        (ServerMessage::Pong, json!({"type": "pong"})),
        (
            ServerMessage::Resync { within_ms: 1500 },
            json!({"type": "resync", "withinMs": 1500}),
        ),
    ];
    for (frame, expected) in cases {
        assert_eq!(to_value(&frame), expected);
        assert_eq!(ServerMessage::decode(&frame.encode()).unwrap(), frame);
    }
}

#[test]
fn conversation_changes_have_pinned_json() {
    let frame = ServerMessage::Conversation {
        conversation_id: CONV,
        change: wadi_protocol::ConversationChange::Created,
        title: Some("New conversation".into()),
    };
    assert_eq!(
        to_value(&frame),
        json!({"type": "conversation", "conversationId": CONV, "change": "created",
               "title": "New conversation"})
    );
    let deleted = ServerMessage::Conversation {
        conversation_id: CONV,
        change: wadi_protocol::ConversationChange::Deleted,
        title: None,
    };
    assert_eq!(
        to_value(&deleted),
        json!({"type": "conversation", "conversationId": CONV, "change": "deleted"})
    );
    for (change, name) in [
        (wadi_protocol::ConversationChange::Updated, "updated"),
        (wadi_protocol::ConversationChange::Message, "message"),
        (wadi_protocol::ConversationChange::Answered, "answered"),
    ] {
        assert_eq!(serde_json::to_value(change).unwrap(), json!(name));
    }
    assert_eq!(ServerMessage::decode(&frame.encode()).unwrap(), frame);
}

#[test]
fn a_chunk_written_directly_is_the_frame_serde_writes() {
    let contents = [
        "",
        "abc",
        "quotes \" and backslashes \\ and / slashes",
        "line\nbreaks\r\ttabs",
        "controls \u{0} \u{1} \u{1f} \u{7f}",
        "wörld ✓ 日本語 🦀",
        "\u{2028}\u{2029} and </script>",
    ];
    for (i, content) in contents.into_iter().enumerate() {
        for seq in [1, 9, 10, u64::from(u32::MAX) + 7, u64::MAX] {
            let expected = ServerMessage::Chunk {
                run_id: RUN,
                seq,
                content: content.to_owned(),
            }
            .encode();
            assert_eq!(
                ServerMessage::encode_chunk(RUN, seq, content),
                expected,
                "content {i}, seq {seq}"
            );
        }
    }
    let random = uuid::Uuid::from_u128(0xa1b2_c3d4_e5f6_4789_8abc_def0_1234_5678);
    assert_eq!(
        ServerMessage::encode_chunk(random, 1, "x"),
        ServerMessage::Chunk {
            run_id: random,
            seq: 1,
            content: "x".into(),
        }
        .encode()
    );
}

#[test]
fn chunk_and_complete_keep_the_original_fields() {
    // The original client reads `content` from chunk and `fullOutput` from complete; we only add.
    let chunk = to_value(&ServerMessage::Chunk {
        run_id: RUN,
        seq: 3,
        content: "abc".into(),
    });
    assert_eq!(chunk["type"], "chunk");
    assert_eq!(chunk["content"], "abc");
    let complete = to_value(&ServerMessage::Complete {
        run_id: RUN,
        full_output: "abc".into(),
        status: RunStatus::Completed,
        usage: None,
    });
    assert_eq!(complete["type"], "complete");
    assert_eq!(complete["fullOutput"], "abc");
}

#[test]
fn each_kind_of_bad_frame_is_a_distinct_error() {
    type IsExpected = fn(&DecodeError) -> bool;
    let cases: [(&str, IsExpected, ErrorCode); 11] = [
        (
            "{not json",
            |e| matches!(e, DecodeError::Malformed(_)),
            ErrorCode::InvalidJson,
        ),
        (
            "",
            |e| matches!(e, DecodeError::Malformed(_)),
            ErrorCode::InvalidJson,
        ),
        (
            "[1,2]",
            |e| *e == DecodeError::NotAnObject,
            ErrorCode::InvalidFrame,
        ),
        (
            r#"{"content":"hi"}"#,
            |e| *e == DecodeError::MissingType,
            ErrorCode::InvalidFrame,
        ),
        (
            r#"{"type":5}"#,
            |e| *e == DecodeError::InvalidType,
            ErrorCode::InvalidFrame,
        ),
        (
            r#"{"type":"subscribe"}"#,
            |e| *e == DecodeError::UnknownType("subscribe".into()),
            ErrorCode::UnknownType,
        ),
        (
            r#"{"type":"message"}"#,
            |e| {
                *e == DecodeError::MissingField {
                    kind: "message".into(),
                    field: "content".into(),
                }
            },
            ErrorCode::InvalidMessage,
        ),
        (
            r#"{"type":"auth","token":42}"#,
            |e| matches!(e, DecodeError::InvalidField { kind, .. } if kind == "auth"),
            ErrorCode::InvalidMessage,
        ),
        (
            r#"{"type":"stop","runId":"not-a-uuid"}"#,
            |e| matches!(e, DecodeError::InvalidField { kind, .. } if kind == "stop"),
            ErrorCode::InvalidMessage,
        ),
        (
            r#"{"type":"regenerate"}"#,
            |e| {
                *e == DecodeError::MissingField {
                    kind: "regenerate".into(),
                    field: "messageId".into(),
                }
            },
            ErrorCode::InvalidMessage,
        ),
        (
            r#"{"type":"message","content":"hi","parentId":"nope"}"#,
            |e| matches!(e, DecodeError::InvalidField { kind, .. } if kind == "message"),
            ErrorCode::InvalidMessage,
        ),
    ];
    for (text, is_expected, code) in cases {
        let error = ClientMessage::decode(text).unwrap_err();
        assert!(is_expected(&error), "{text:?} gave {error:?}");
        assert_eq!(error.code(), code, "{text:?}");
        let frame = to_value(&ServerMessage::from(error));
        assert_eq!(frame["type"], "error");
        assert_eq!(frame["code"], code.as_str());
    }
}

#[test]
fn hostile_input_never_panics() {
    let long = "x".repeat(100_000);
    let deep = "[".repeat(10_000);
    for text in [
        long.as_str(),
        deep.as_str(),
        "\u{0}",
        r#"{"type":"message","content":"\ud800"}"#,
        r#"{"type":null}"#,
        r#"{"type":"ping","type":"auth"}"#,
        "null",
        "1e999",
    ] {
        let _ = ClientMessage::decode(text);
    }
}

#[test]
fn error_code_names_match_their_json() {
    for code in ErrorCode::ALL {
        assert_eq!(serde_json::to_value(code).unwrap(), json!(code.as_str()));
    }
    for status in [
        RunStatus::Running,
        RunStatus::Completed,
        RunStatus::Stopped,
        RunStatus::Failed,
        RunStatus::Interrupted,
    ] {
        assert_eq!(
            serde_json::to_value(status).unwrap(),
            json!(status.as_str())
        );
        assert_eq!(RunStatus::parse(status.as_str()), Some(status));
    }
}

#[test]
fn every_code_and_close_code_is_documented() {
    let doc = include_str!("../../docs/protocol.md");
    for code in ErrorCode::ALL {
        assert!(
            doc.contains(&format!("`{}`", code.as_str())),
            "{code} undocumented"
        );
    }
    for (code, name) in close::ALL {
        assert!(
            doc.contains(&format!("`{code}`")),
            "close {code} ({name}) undocumented"
        );
    }
    for kind in ClientMessage::TYPES {
        assert!(
            doc.contains(&format!("`{kind}`")),
            "client frame {kind} undocumented"
        );
    }
}
