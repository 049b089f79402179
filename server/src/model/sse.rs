//! The body of a streamed chat completion: server-sent events, each `data` a JSON chunk, ending
//! with `data: [DONE]`.
//!
//! Decoded in the run's own task as the bytes arrive, with no task or channel in between, and
//! parsed into just what WADI uses: the first choice's text and the usage. Everything else in a
//! chunk (ids, model, fingerprints, logprobs, tool calls) is skipped without allocating.

use std::{borrow::Cow, fmt, marker::PhantomData};

use serde::{
    Deserialize, Deserializer,
    de::{SeqAccess, Visitor},
};
use wadi_protocol::Usage;

use super::{Cut, ModelError, ModelEvent};

/// Longest event WADI accepts. A chunk carries one token, a few hundred bytes; anything near this
/// is not a chat completion.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// Where the stream stands after some bytes were fed.
#[derive(Debug, PartialEq, Eq)]
pub enum Fed {
    /// More may come.
    Open,
    /// `[DONE]` arrived: the answer is complete.
    Done,
    /// The stream carried something that is not an answer; nothing after it counts.
    Failed(ModelError),
}

/// An incremental server-sent-events decoder that turns each event's data into [`ModelEvent`]s.
#[derive(Default)]
pub struct Decoder {
    /// Bytes of a line not yet ended.
    line: Vec<u8>,
    /// The data lines of the event being read, joined by `\n`.
    data: Vec<u8>,
    /// The event has a `data` field (which may be empty).
    has_data: bool,
    /// The event's `event` field is `keepalive` (some providers send those; they carry nothing).
    keepalive: bool,
    /// The previous byte was a `\r`: a `\n` right after it ends no second line.
    after_cr: bool,
    /// Past the start of the stream, where a byte-order mark may stand.
    started: bool,
}

/// UTF-8's byte-order mark, skipped at the start of a stream.
const BOM: &[u8] = b"\xEF\xBB\xBF";

impl Decoder {
    /// Feeds the next bytes of the body, appending what complete events said to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut impl Extend<ModelEvent>) -> Fed {
        if !self.started {
            // A byte-order mark may open the stream, split across reads like anything else:
            // held until it can be told from the first line.
            self.line.extend_from_slice(bytes);
            if self.line.len() < BOM.len() && BOM.starts_with(&self.line) {
                return Fed::Open;
            }
            self.started = true;
            let opening = std::mem::take(&mut self.line);
            return self.feed(opening.strip_prefix(BOM).unwrap_or(&opening), out);
        }
        let mut rest = bytes;
        // An empty read says nothing about what follows a `\r`.
        if self.after_cr && !rest.is_empty() {
            self.after_cr = false;
            if let Some(stripped) = rest.strip_prefix(b"\n") {
                rest = stripped;
            }
        }
        while let Some(end) = memchr::memchr2(b'\n', b'\r', rest) {
            let (content, tail) = rest.split_at(end);
            let fed = if self.line.is_empty() {
                self.line_ended(content, out)
            } else {
                self.line.extend_from_slice(content);
                let line = std::mem::take(&mut self.line);
                let fed = self.line_ended(&line, out);
                self.line = line;
                self.line.clear();
                fed
            };
            if fed != Fed::Open {
                return fed;
            }
            rest = match tail {
                [b'\r', b'\n', after @ ..] => after,
                [b'\r'] => {
                    self.after_cr = true;
                    &[]
                }
                [_, after @ ..] => after,
                [] => &[],
            };
        }
        self.line.extend_from_slice(rest);
        // The same check as on a whole line: a line is refused however it arrives.
        if self.line.len() > MAX_EVENT_BYTES {
            return Fed::Failed(too_long("a line"));
        }
        Fed::Open
    }

    /// The body ended without `[DONE]`: an error if it stopped inside an event (its last
    /// words would be lost without a trace); `None` at an event's end, as some servers close.
    pub fn finish(&self) -> Option<ModelError> {
        (!self.line.is_empty() || self.has_data)
            .then(|| broken("the stream ended inside an event".to_owned()))
    }

    fn line_ended(&mut self, line: &[u8], out: &mut impl Extend<ModelEvent>) -> Fed {
        if line.len() > MAX_EVENT_BYTES {
            return Fed::Failed(too_long("a line"));
        }
        if line.is_empty() {
            return self.dispatch(out);
        }
        if line[0] == b':' {
            return Fed::Open;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match field {
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.has_data = true;
                self.data.extend_from_slice(value);
                if self.data.len() > MAX_EVENT_BYTES {
                    return Fed::Failed(too_long("an event"));
                }
            }
            b"event" => self.keepalive = value == b"keepalive",
            // `id` and `retry` matter to a browser reconnecting; a completion is never resumed.
            _ => {}
        }
        Fed::Open
    }

    fn dispatch(&mut self, out: &mut impl Extend<ModelEvent>) -> Fed {
        let fed = if !self.has_data || self.keepalive {
            Fed::Open
        } else if self.data == b"[DONE]" {
            Fed::Done
        } else {
            match chunk_events(&self.data, out) {
                Ok(()) => Fed::Open,
                Err(error) => Fed::Failed(error),
            }
        };
        self.data.clear();
        self.has_data = false;
        self.keepalive = false;
        fed
    }
}

/// A whole body, given in pieces: its events and how it ended (`Open` if it did not). For
/// tests and the fuzz target.
pub fn decode_all<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> (Vec<ModelEvent>, Fed) {
    let mut decoder = Decoder::default();
    let mut events = Vec::new();
    for piece in pieces {
        let fed = decoder.feed(piece, &mut events);
        if fed != Fed::Open {
            return (events, fed);
        }
    }
    (events, Fed::Open)
}

fn broken(detail: String) -> ModelError {
    ModelError::Broken { detail }
}

fn too_long(what: &str) -> ModelError {
    broken(format!("{what} longer than {MAX_EVENT_BYTES} bytes"))
}

/// What one chunk's JSON says: the first choice's text (when not empty), whether the provider
/// cut the answer there (its `finish_reason`), then the usage.
pub fn chunk_events(json: &[u8], out: &mut impl Extend<ModelEvent>) -> Result<(), ModelError> {
    // UTF-8 checked once for the whole chunk: `from_slice` would check each string on its own,
    // skipped ones included, at a few times the cost. Bytes that are not UTF-8 become U+FFFD
    // rather than end the answer.
    let text = String::from_utf8_lossy(json);
    let not_json = |error: serde_json::Error| {
        let shown = String::from_utf8_lossy(&json[..json.len().min(200)]).into_owned();
        broken(format!("a chunk that is not JSON ({error}): {shown}"))
    };
    let repaired: String;
    let chunk: Chunk<'_> = match serde_json::from_str(&text) {
        Ok(chunk) => chunk,
        Err(error) => {
            // A provider that cut its text between the two halves of a UTF-16 surrogate pair
            // (as a JavaScript server slicing strings may): each half becomes U+FFFD, and the
            // answer goes on.
            repaired = without_lone_surrogates(&text);
            if repaired == text {
                return Err(not_json(error));
            }
            serde_json::from_str(&repaired).map_err(not_json)?
        }
    };
    if let Some(error) = chunk.error {
        return Err(broken(format!(
            "the provider sent an error mid-stream: {}",
            error.message.as_deref().unwrap_or("(no message)")
        )));
    }
    let Some(FirstChoice(text, finish)) = chunk.choices else {
        return Err(broken("a chunk without choices".to_owned()));
    };
    // U+0000 is dropped: Postgres cannot store it and no answer means one, so what is
    // streamed is what every store saves.
    let text = text.map(|text| {
        if text.contains('\0') {
            Cow::Owned(text.replace('\0', ""))
        } else {
            text
        }
    });
    if let Some(text) = text.filter(|text| !text.is_empty()) {
        out.extend([ModelEvent::Delta(text.into_owned())]);
    }
    match finish.as_deref() {
        Some("length") => out.extend([ModelEvent::Cut(Cut::Length)]),
        Some("content_filter") => out.extend([ModelEvent::Cut(Cut::ContentFilter)]),
        _ => {}
    }
    if let Some(usage) = chunk.usage {
        out.extend([ModelEvent::Usage(Usage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.total_tokens,
            estimated: false,
        })]);
    }
    Ok(())
}

/// JSON text with every `\u` escape of an unpaired UTF-16 surrogate replaced by `\uFFFD`.
fn without_lone_surrogates(json: &str) -> String {
    /// The code unit of a `\uXXXX` escape starting at `at`, if there is one.
    fn escape_at(json: &str, at: usize) -> Option<u16> {
        let hex = json.get(at..at + 6)?.strip_prefix("\\u")?;
        u16::from_str_radix(hex, 16).ok()
    }
    let high = 0xD800..=0xDBFF;
    let low = 0xDC00..=0xDFFF;
    let mut out = String::with_capacity(json.len());
    let mut at = 0;
    while let Some(found) = json[at..].find('\\') {
        let start = at + found;
        out.push_str(&json[at..start]);
        match escape_at(json, start) {
            Some(unit) if high.contains(&unit) => {
                if escape_at(json, start + 6).is_some_and(|next| low.contains(&next)) {
                    out.push_str(&json[start..start + 12]);
                    at = start + 12;
                } else {
                    out.push_str("\\uFFFD");
                    at = start + 6;
                }
            }
            Some(unit) if low.contains(&unit) => {
                out.push_str("\\uFFFD");
                at = start + 6;
            }
            _ => {
                // Any other escape (an escaped backslash too) is copied whole.
                let end = json[start + 1..]
                    .chars()
                    .next()
                    .map_or(json.len(), |c| start + 1 + c.len_utf8());
                out.push_str(&json[start..end]);
                at = end;
            }
        }
    }
    out.push_str(&json[at..]);
    out
}

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, default)]
    choices: Option<FirstChoice<'a>>,
    #[serde(default)]
    usage: Option<ChunkUsage>,
    #[serde(default)]
    error: Option<ChunkError>,
}

#[derive(Deserialize)]
struct ChunkUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

#[derive(Deserialize)]
struct ChunkError {
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default)]
    index: u32,
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
    /// Anything but a string is none: a provider's oddity here must not end the answer.
    #[serde(default, deserialize_with = "reason")]
    finish_reason: Option<String>,
}

fn reason<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::String(reason) => Some(reason),
        _ => None,
    })
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
}

/// The text and `finish_reason` of the choice with index 0 in a `choices` array; the others are
/// skipped (WADI asks for one choice, a provider may still send more).
struct FirstChoice<'a>(Option<Cow<'a, str>>, Option<String>);

impl<'de: 'a, 'a> Deserialize<'de> for FirstChoice<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Choices<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Choices<'a> {
            type Value = FirstChoice<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of choices")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut first = None;
                while let Some(choice) = seq.next_element::<Choice<'a>>()? {
                    if choice.index == 0 && first.is_none() {
                        first = Some(FirstChoice(
                            choice.delta.and_then(|delta| delta.content),
                            choice.finish_reason,
                        ));
                    }
                }
                Ok(first.unwrap_or(FirstChoice(None, None)))
            }
        }
        deserializer.deserialize_seq(Choices(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(text: &str) -> String {
        serde_json::json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "system_fingerprint": "fp", "usage": null,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                         "logprobs": null, "finish_reason": null}],
        })
        .to_string()
    }

    const USAGE: &str = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9,"prompt_tokens_details":{"cached_tokens":0}}}"#;

    fn body() -> String {
        format!(
            ": comment\n\ndata: {}\n\nevent: keepalive\ndata: {{}}\n\ndata: {}\r\n\r\ndata: {}\rdata:\r\rdata: {USAGE}\n\ndata: [DONE]\n\ndata: {}\n\n",
            delta("Hello"),
            delta(", wörld ✓"),
            delta("\"quoted\"\n"),
            delta("after the end"),
        )
    }

    fn expected() -> Vec<ModelEvent> {
        vec![
            ModelEvent::Delta("Hello".into()),
            ModelEvent::Delta(", wörld ✓".into()),
            ModelEvent::Delta("\"quoted\"\n".into()),
            ModelEvent::Usage(Usage {
                prompt_tokens: 7,
                completion_tokens: 2,
                total_tokens: 9,
                estimated: false,
            }),
        ]
    }

    #[test]
    fn decodes_a_body_however_it_is_cut() {
        let body = body();
        let bytes = body.as_bytes();
        assert_eq!(decode_all([bytes]), (expected(), Fed::Done));
        // Every cut, including inside `\r\n`, a multi-byte character and `[DONE]`, also with an
        // empty read at the cut (HTTP/2 can deliver one).
        for cut in 0..=bytes.len() {
            let (head, tail) = bytes.split_at(cut);
            assert_eq!(
                decode_all([head, tail]),
                (expected(), Fed::Done),
                "cut at {cut}"
            );
            assert_eq!(
                decode_all([head, &[][..], tail]),
                (expected(), Fed::Done),
                "cut at {cut}, an empty read between"
            );
        }
        // A byte-order mark at the start is skipped, however it arrives.
        let marked = [BOM, bytes].concat();
        for cut in 0..=4 {
            let (head, tail) = marked.split_at(cut);
            assert_eq!(
                decode_all([head, tail]),
                (expected(), Fed::Done),
                "BOM cut at {cut}"
            );
        }
        assert_eq!(
            decode_all(bytes.chunks(1)),
            (expected(), Fed::Done),
            "byte by byte"
        );
    }

    /// A `data:` line with nothing after it is an event with empty data: not JSON.
    #[test]
    fn an_empty_data_line_is_not_a_chunk() {
        let (events, fed) = decode_all([&b"data:\n\n"[..]]);
        assert!(events.is_empty());
        assert!(
            matches!(fed, Fed::Failed(ModelError::Broken { .. })),
            "{fed:?}"
        );
    }

    #[test]
    fn multi_line_data_is_joined() {
        let json = delta("two lines");
        let (head, tail) = json.split_at(json.find("\"choices\"").unwrap());
        let body = format!("data: {head}\ndata: {tail}\n\n");
        let (events, fed) = decode_all([body.as_bytes()]);
        assert_eq!(fed, Fed::Open);
        assert_eq!(events, vec![ModelEvent::Delta("two lines".into())]);
    }

    #[test]
    fn only_the_first_choice_counts_and_empty_text_is_dropped() {
        let json = r#"{"choices":[{"index":1,"delta":{"content":"other"}},{"index":0,"delta":{"content":"mine"}}]}"#;
        let mut out = Vec::new();
        chunk_events(json.as_bytes(), &mut out).unwrap();
        assert_eq!(out, vec![ModelEvent::Delta("mine".into())]);
        for nothing in [
            r#"{"choices":[{"index":0,"delta":{"content":""}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":null},"finish_reason":"stop"}]}"#,
            r#"{"choices":[{"index":0}]}"#,
            r#"{"choices":[{"index":0,"finish_reason":{"odd":1}},{"index":1,"finish_reason":7}]}"#,
            r#"{"choices":[]}"#,
        ] {
            let mut out = Vec::new();
            chunk_events(nothing.as_bytes(), &mut out).unwrap();
            assert!(out.is_empty(), "{nothing}: {out:?}");
        }
    }

    #[test]
    fn an_answer_the_provider_cut_says_why() {
        for (reason, cut) in [
            ("length", Cut::Length),
            ("content_filter", Cut::ContentFilter),
        ] {
            let json = format!(
                r#"{{"choices":[{{"index":1,"delta":{{}},"finish_reason":"stop"}},{{"index":0,"delta":{{"content":"last"}},"finish_reason":"{reason}"}}]}}"#
            );
            let mut out = Vec::new();
            chunk_events(json.as_bytes(), &mut out).unwrap();
            assert_eq!(
                out,
                vec![ModelEvent::Delta("last".into()), ModelEvent::Cut(cut)]
            );
        }
    }

    #[test]
    fn a_surrogate_pair_cut_between_chunks_and_bytes_that_are_not_utf8_do_not_end_the_answer() {
        let data = |content: &str| {
            format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}}}}]}}\n\n"
            )
        };
        let mut body = data("emoji \\ud83d").into_bytes();
        body.extend(data("\\ude00 end \\ud83d\\ude00 \\\\ud83d").into_bytes());
        body.extend(b"data: {\"choices\":[{\"delta\":{\"content\":\"caf\xe9\"}}]}\n\n");
        body.extend(b"data: [DONE]\n\n");
        let (events, fed) = decode_all([body.as_slice()]);
        assert_eq!(fed, Fed::Done);
        assert_eq!(
            events,
            [
                ModelEvent::Delta("emoji \u{FFFD}".into()),
                // A whole pair stays whole; an escaped backslash before `u` is no escape.
                ModelEvent::Delta("\u{FFFD} end 😀 \\ud83d".into()),
                ModelEvent::Delta("caf\u{FFFD}".into()),
            ]
        );
    }

    #[test]
    fn what_is_not_an_answer_breaks_the_stream() {
        for (json, says) in [
            ("{this is not json]", "not JSON"),
            (r#"{"id":"x"}"#, "without choices"),
            (r#"{"choices":{"index":0}}"#, "not JSON"),
            (
                r#"{"error":{"message":"overloaded","type":"server_error"}}"#,
                "mid-stream: overloaded",
            ),
        ] {
            let mut out = Vec::new();
            let error = chunk_events(json.as_bytes(), &mut out).unwrap_err();
            assert!(matches!(error, ModelError::Broken { .. }), "{json}");
            assert!(error.detail().contains(says), "{json}: {}", error.detail());
        }
    }

    #[test]
    fn a_body_that_ends_inside_an_event_is_cut_off() {
        let whole = format!("data: {}\n\n", delta("kept"));
        for (ending, cut_off) in [
            ("", false),
            (": a comment\n", false),
            (
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo",
                true,
            ),
            ("data: {\"choices\":[]}\n", true),
            ("event: keepalive", true),
        ] {
            let mut decoder = Decoder::default();
            let mut out = Vec::new();
            let body = format!("{whole}{ending}");
            assert_eq!(decoder.feed(body.as_bytes(), &mut out), Fed::Open);
            assert_eq!(out, vec![ModelEvent::Delta("kept".into())], "{ending:?}");
            assert_eq!(decoder.finish().is_some(), cut_off, "{ending:?}");
        }
    }

    #[test]
    fn an_endless_event_is_refused() {
        let mut decoder = Decoder::default();
        let mut out = Vec::new();
        assert_eq!(decoder.feed(b"data: \"", &mut out), Fed::Open);
        let piece = vec![b'a'; 64 * 1024];
        let mut fed = Fed::Open;
        for _ in 0..=MAX_EVENT_BYTES / piece.len() {
            fed = decoder.feed(&piece, &mut out);
            if fed != Fed::Open {
                break;
            }
        }
        assert!(
            matches!(&fed, Fed::Failed(error) if error.detail().contains("longer than")),
            "{fed:?}"
        );
    }
}
