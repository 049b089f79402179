//! What the fuzz targets (`fuzz/`, `cargo xtask fuzz`) exercise, one function per target, kept
//! here so that the committed corpus is also replayed by an ordinary test
//! (`tests/fuzz_corpus.rs`) on every CI run. Each takes arbitrary bytes, must never panic, and
//! checks what must hold of whatever it accepts.

use std::time::Duration;

use wadi_protocol::{ClientMessage, api};

use crate::{
    auth::{Verifier, verify::KeySource},
    content::check_message,
    http::{conversations::parse_conversation_cursor, extract::decode_cursor},
    util::Clock,
};

/// A fuzz target: arbitrary bytes in, a panic only for a bug.
pub type Target = fn(&[u8]);

/// Every fuzz target by name, for the corpus replay.
pub const TARGETS: [(&str, Target); 5] = [
    ("client_frame", client_frame),
    ("jwt", jwt),
    ("cursor", cursor),
    ("upstream_sse", upstream_sse),
    ("rest_body", rest_body),
];

/// A client frame: decoding never panics, and what decodes encodes back to itself.
pub fn client_frame(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(frame) = ClientMessage::decode(&text) {
        let again = ClientMessage::decode(&frame.encode());
        assert_eq!(
            again.as_ref(),
            Ok(&frame),
            "a decoded frame must round-trip"
        );
    }
}

/// A bearer token: the verifier (HS256 secret and the JOSE header parsed by hand) refuses
/// garbage with a reason, never a panic; nothing unsigned is ever accepted.
pub fn jwt(data: &[u8]) {
    let token = String::from_utf8_lossy(data);
    let verifier = Verifier::new(
        Some("a-fuzzing-secret-of-at-least-32-bytes!!"),
        KeySource::Static(Default::default()),
        Some("wadi".to_owned()),
        Duration::from_secs(10),
        Clock::system(),
    );
    let runtime = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(runtime) => runtime,
        Err(_) => return,
    };
    let verified = runtime.block_on(verifier.verify(&token));
    assert!(
        verified.is_err(),
        "random bytes never carry a valid signature: {token:?}"
    );
}

/// A pagination cursor, of either kind.
pub fn cursor(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = parse_conversation_cursor(&text);
    if let Ok(fields) = decode_cursor("m", &text) {
        let _ = fields.parse::<crate::ids::MessageId>();
    }
}

/// An upstream answer as bytes on the wire, cut into pieces where the fuzzer says: the SSE
/// decoder, the chunk JSON, and what a chunk becomes. However the body is cut, it decodes to the
/// same events and ends the same way.
pub fn upstream_sse(data: &[u8]) {
    use crate::model::sse::decode_all;
    let (cuts, body) = match data.split_first() {
        Some((cuts, body)) => (usize::from(*cuts).max(1), body),
        None => return,
    };
    let whole = decode_all([body]);
    // Each piece followed by an empty read, as HTTP/2 can deliver.
    let cut = decode_all(body.chunks(cuts).flat_map(|piece| [piece, &[][..]]));
    for event in &whole.0 {
        if let crate::model::ModelEvent::Delta(text) = event {
            assert!(!text.is_empty(), "empty deltas are dropped");
        }
    }
    assert_eq!(whole, cut, "cut every {cuts} bytes");
}

/// A REST body, as each JSON endpoint reads it, and the rules applied after.
pub fn rest_body(data: &[u8]) {
    if let Ok(send) = serde_json::from_slice::<api::SendMessage>(data) {
        let _ = check_message(&send.content, send.client_message_id.as_deref(), 32 * 1024);
    }
    let _ = serde_json::from_slice::<api::CreateConversation>(data);
    let _ = serde_json::from_slice::<api::UpdateConversation>(data);
    let _ = crate::auth::embedded::json_body::<crate::auth::embedded::Credentials>(Ok(
        axum::body::Bytes::copy_from_slice(data),
    ));
}
