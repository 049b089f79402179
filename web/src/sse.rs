//! Following a run over Server-Sent Events with `fetch` (so the access token goes in a header,
//! which `EventSource` cannot do): the fallback when WebSocket cannot connect.

use futures::{Stream, StreamExt};
use js_sys::{Reflect, Uint8Array};
use uuid::Uuid;
use wadi_protocol::ServerMessage;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{ReadableStreamDefaultReader, RequestInit, Response};

/// The frames of `GET /api/runs/{run_id}/events` after `after_seq`, ending after `complete` or
/// when the connection drops.
pub async fn follow(
    run_id: Uuid,
    after_seq: u64,
    token: &str,
) -> Result<impl Stream<Item = ServerMessage>, JsValue> {
    let init = RequestInit::new();
    init.set_method("GET");
    let headers = web_sys::Headers::new()?;
    headers.set("Authorization", &format!("Bearer {token}"))?;
    headers.set("Accept", "text/event-stream")?;
    init.set_headers(&headers);
    let url = format!("/api/runs/{run_id}/events?afterSeq={after_seq}");
    let window = web_sys::window().ok_or_else(|| JsValue::from_str("no window"))?;
    let response: Response = JsFuture::from(window.fetch_with_str_and_init(&url, &init))
        .await?
        .dyn_into()?;
    if !response.ok() {
        return Err(JsValue::from_str(&format!("HTTP {}", response.status())));
    }
    let body = response
        .body()
        .ok_or_else(|| JsValue::from_str("no body"))?;
    let reader: ReadableStreamDefaultReader = body.get_reader().unchecked_into();
    let state = (reader, Vec::<u8>::new(), false);
    let blocks = futures::stream::unfold(state, |(reader, mut buffer, done)| async move {
        if done {
            return None;
        }
        loop {
            if let Some(end) = find_block_end(&buffer) {
                let block: Vec<u8> = buffer.drain(..end + 2).collect();
                return Some((
                    String::from_utf8_lossy(&block).into_owned(),
                    (reader, buffer, false),
                ));
            }
            let chunk = JsFuture::from(reader.read()).await.ok()?;
            let finished = Reflect::get(&chunk, &JsValue::from_str("done"))
                .ok()
                .and_then(|v| v.as_bool())
                .unwrap_or(true);
            if finished {
                return None;
            }
            let value = Reflect::get(&chunk, &JsValue::from_str("value")).ok()?;
            buffer.extend(Uint8Array::new(&value).to_vec());
        }
    });
    Ok(blocks.filter_map(|block| async move { parse_block(&block) }))
}

/// The index of the blank line (`\n\n`) ending the first event in `buffer`.
fn find_block_end(buffer: &[u8]) -> Option<usize> {
    buffer.windows(2).position(|pair| pair == b"\n\n")
}

/// The frame in one SSE event block (its `data:` lines); comments and keep-alives are `None`.
pub fn parse_block(block: &str) -> Option<ServerMessage> {
    let data: Vec<&str> = block
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| data.strip_prefix(' ').unwrap_or(data))
        .collect();
    if data.is_empty() {
        return None;
    }
    ServerMessage::decode(&data.join("\n")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_blocks_parse_into_frames() {
        let block = "event: chunk\nid: 3\ndata: {\"type\":\"chunk\",\"runId\":\"01900000-0000-7000-8000-000000000001\",\"seq\":3,\"content\":\"x\"}\n";
        assert!(matches!(
            parse_block(block),
            Some(ServerMessage::Chunk { seq: 3, .. })
        ));
        assert!(parse_block(": keep-alive\n").is_none());
        assert_eq!(find_block_end(b"data: a\n\ndata: b"), Some(7));
    }
}
