//! Optional OpenTelemetry trace export (`--otlp-endpoint`): a `tracing` layer that turns the
//! server's spans (`request`, `ws`, `run`, with their fields and the events logged inside
//! them) into OTLP spans, and a task that posts them in batches to `{endpoint}/v1/traces` as
//! OTLP/HTTP JSON, which the OpenTelemetry Collector, Jaeger, Tempo and others accept.
//!
//! Written here rather than pulled in with the `opentelemetry` crates: the whole exporter is a
//! few hundred lines, and those crates would add minutes to every cold build. A span's trace
//! comes from its parent span, or from a W3C `traceparent` the request carried (recorded as the
//! span's `traceparent` field), or is new. `otel.name` and `otel.kind` fields name a span and
//! give its kind, as `tracing-opentelemetry` reads them.
//!
//! Export never slows the server: finished spans go into a bounded queue, and when the
//! collector is slow or down they are dropped (and counted), never waited for.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
    span::{Attributes, Id, Record},
};
use tracing_subscriber::{Layer, layer::Context, registry::LookupSpan};

use crate::util::hex;

/// Spans waiting to be sent; past this, new ones are dropped.
const QUEUE: usize = 8192;
/// Spans per request to the collector.
const BATCH: usize = 512;
/// How long spans wait for a batch to fill.
const BATCH_DELAY: Duration = Duration::from_secs(1);
/// Events kept per span (the first ones).
const EVENTS_PER_SPAN: usize = 32;

/// The layer to add to the subscriber, and the handle that flushes it at shutdown.
pub fn otlp(endpoint: &str, service_name: &str) -> (OtlpLayer, Exporter) {
    let (spans, receiver) = mpsc::channel(QUEUE);
    let (flushes, flush_requests) = mpsc::channel(1);
    let dropped = Arc::new(AtomicU64::new(0));
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    tokio::spawn(export(
        url,
        service_name.to_owned(),
        receiver,
        flush_requests,
        dropped.clone(),
    ));
    (
        OtlpLayer {
            spans,
            dropped: dropped.clone(),
        },
        Exporter { flushes },
    )
}

pub struct OtlpLayer {
    spans: mpsc::Sender<SpanData>,
    dropped: Arc<AtomicU64>,
}

/// Asks the export task to send what it holds.
pub struct Exporter {
    flushes: mpsc::Sender<oneshot::Sender<()>>,
}

impl Exporter {
    /// Sends the spans finished so far, waiting at most `limit`.
    pub async fn flush(&self, limit: Duration) {
        let (done, wait) = oneshot::channel();
        if self.flushes.send(done).await.is_ok() {
            let _ = tokio::time::timeout(limit, wait).await;
        }
    }
}

/// A span as it is built, kept in the `tracing` span's extensions.
struct SpanData {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent_span_id: Option<[u8; 8]>,
    name: String,
    kind: u8,
    start: u128,
    end: u128,
    attributes: Fieldset,
    events: Vec<SpanEvent>,
    error: bool,
}

/// A span's or event's fields, in the order first seen.
type Fieldset = Vec<(String, Attribute)>;

/// An event logged inside a span: when, its message, its other fields.
struct SpanEvent {
    at: u128,
    message: String,
    fields: Fieldset,
}

#[derive(Clone, Debug, PartialEq)]
enum Attribute {
    Str(String),
    Int(i64),
    Double(f64),
    Bool(bool),
}

impl Attribute {
    fn json(&self) -> Value {
        match self {
            Self::Str(text) => json!({ "stringValue": text }),
            // OTLP JSON carries 64-bit integers as strings.
            Self::Int(number) => json!({ "intValue": number.to_string() }),
            Self::Double(number) => json!({ "doubleValue": number }),
            Self::Bool(flag) => json!({ "boolValue": flag }),
        }
    }
}

/// Collects a span's or event's fields.
struct Fields<'a>(&'a mut Fieldset);

impl Fields<'_> {
    fn set(&mut self, field: &Field, value: Attribute) {
        let name = field.name();
        match self.0.iter_mut().find(|(key, _)| key == name) {
            Some((_, old)) => *old = value,
            None => self.0.push((name.to_owned(), value)),
        }
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field, Attribute::Str(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.set(field, Attribute::Int(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        match i64::try_from(value) {
            Ok(value) => self.set(field, Attribute::Int(value)),
            Err(_) => self.set(field, Attribute::Str(value.to_string())),
        }
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.set(field, Attribute::Double(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.set(field, Attribute::Bool(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // `%value` fields arrive here formatted with Display.
        self.set(field, Attribute::Str(format!("{value:?}")));
    }
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos())
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    let mut filled = 0;
    while filled < N {
        let chunk = uuid::Uuid::new_v4().into_bytes();
        let take = (N - filled).min(chunk.len());
        bytes[filled..filled + take].copy_from_slice(&chunk[..take]);
        filled += take;
    }
    bytes
}

/// The trace id and parent span id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn parse_traceparent(text: &str) -> Option<([u8; 16], [u8; 8])> {
    let mut parts = text.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2 || version == "ff" || flags.len() != 2 {
        return None;
    }
    let trace: [u8; 16] = decode_hex(trace)?.try_into().ok()?;
    let parent: [u8; 8] = decode_hex(parent)?.try_into().ok()?;
    if trace == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some((trace, parent))
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn kind_of(text: &str) -> u8 {
    match text {
        "internal" => 1,
        "server" => 2,
        "client" => 3,
        "producer" => 4,
        "consumer" => 5,
        _ => 0,
    }
}

impl<S> Layer<S> for OtlpLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut attributes = Vec::new();
        attrs.record(&mut Fields(&mut attributes));
        let parent = span.parent().and_then(|parent| {
            parent
                .extensions()
                .get::<SpanData>()
                .map(|data| (data.trace_id, data.span_id))
        });
        let remote = attributes.iter().find_map(|(key, value)| match value {
            Attribute::Str(text) if key == "traceparent" => parse_traceparent(text),
            _ => None,
        });
        let (trace_id, parent_span_id) = match (parent, remote) {
            (Some((trace, span)), _) | (None, Some((trace, span))) => (trace, Some(span)),
            (None, None) => (random(), None),
        };
        let mut data = SpanData {
            trace_id,
            span_id: random(),
            parent_span_id,
            name: attrs.metadata().name().to_owned(),
            kind: 1,
            start: now_nanos(),
            end: 0,
            attributes,
            events: Vec::new(),
            error: false,
        };
        apply_otel_fields(&mut data);
        span.extensions_mut().insert(data);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        if let Some(data) = span.extensions_mut().get_mut::<SpanData>() {
            values.record(&mut Fields(&mut data.attributes));
            apply_otel_fields(data);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.event_span(event) else {
            return;
        };
        let mut extensions = span.extensions_mut();
        let Some(data) = extensions.get_mut::<SpanData>() else {
            return;
        };
        if *event.metadata().level() == tracing::Level::ERROR {
            data.error = true;
        }
        if data.events.len() >= EVENTS_PER_SPAN {
            return;
        }
        let mut fields = Vec::new();
        event.record(&mut Fields(&mut fields));
        let message = match fields.iter().position(|(key, _)| key == "message") {
            Some(at) => match fields.remove(at).1 {
                Attribute::Str(text) => text,
                other => format!("{other:?}"),
            },
            None => event.metadata().name().to_owned(),
        };
        fields.push((
            "level".to_owned(),
            Attribute::Str(event.metadata().level().to_string()),
        ));
        data.events.push(SpanEvent {
            at: now_nanos(),
            message,
            fields,
        });
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(mut data) = span.extensions_mut().remove::<SpanData>() else {
            return;
        };
        data.end = now_nanos();
        if self.spans.try_send(data).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `otel.name` renames the span, `otel.kind` sets its kind; neither is exported as an
/// attribute.
fn apply_otel_fields(data: &mut SpanData) {
    data.attributes
        .retain(|(key, value)| match (key.as_str(), value) {
            ("otel.name", Attribute::Str(name)) => {
                data.name.clone_from(name);
                false
            }
            ("otel.kind", Attribute::Str(kind)) => {
                data.kind = kind_of(kind);
                false
            }
            _ => true,
        });
}

fn span_json(span: &SpanData) -> Value {
    let attributes = |list: &[(String, Attribute)]| -> Vec<Value> {
        list.iter()
            .map(|(key, value)| json!({ "key": key, "value": value.json() }))
            .collect()
    };
    let events: Vec<Value> = span
        .events
        .iter()
        .map(|event| {
            json!({
                "timeUnixNano": event.at.to_string(),
                "name": event.message,
                "attributes": attributes(&event.fields),
            })
        })
        .collect();
    json!({
        "traceId": hex(&span.trace_id),
        "spanId": hex(&span.span_id),
        "parentSpanId": span.parent_span_id.map(|id| hex(&id)).unwrap_or_default(),
        "name": span.name,
        "kind": span.kind,
        "startTimeUnixNano": span.start.to_string(),
        "endTimeUnixNano": span.end.to_string(),
        "attributes": attributes(&span.attributes),
        "events": events,
        // 2: error (an error was logged inside the span); 0: unset.
        "status": { "code": if span.error { 2 } else { 0 } },
    })
}

fn batch_json(service_name: &str, spans: &[SpanData]) -> Value {
    json!({
        "resourceSpans": [{
            "resource": {
                "attributes": [
                    { "key": "service.name", "value": { "stringValue": service_name } },
                    {
                        "key": "service.version",
                        "value": { "stringValue": env!("CARGO_PKG_VERSION") },
                    },
                ],
            },
            "scopeSpans": [{
                "scope": { "name": "wadi", "version": env!("CARGO_PKG_VERSION") },
                "spans": spans.iter().map(span_json).collect::<Vec<_>>(),
            }],
        }],
    })
}

async fn export(
    url: String,
    service_name: String,
    mut spans: mpsc::Receiver<SpanData>,
    mut flushes: mpsc::Receiver<oneshot::Sender<()>>,
    dropped: Arc<AtomicU64>,
) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .user_agent(concat!("wadi/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(http) => http,
        Err(error) => {
            eprintln!("wadi: cannot export traces: {error}");
            return;
        }
    };
    let mut batch = Vec::with_capacity(BATCH);
    let mut failures = 0_u64;
    loop {
        let mut flushed = None;
        tokio::select! {
            span = spans.recv() => match span {
                Some(span) => {
                    batch.push(span);
                    if batch.len() < BATCH {
                        // Wait a little for more, so spans go in batches.
                        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
                        while batch.len() < BATCH {
                            match tokio::time::timeout_at(deadline, spans.recv()).await {
                                Ok(Some(span)) => batch.push(span),
                                Ok(None) | Err(_) => break,
                            }
                        }
                    }
                }
                None => return,
            },
            request = flushes.recv() => match request {
                Some(done) => {
                    while let Ok(span) = spans.try_recv() {
                        batch.push(span);
                    }
                    flushed = Some(done);
                }
                None => return,
            },
        }
        for chunk in batch.chunks(BATCH) {
            let body = batch_json(&service_name, chunk);
            let sent = http.post(&url).json(&body).send().await;
            match sent.map(|response| response.error_for_status()) {
                Ok(Ok(_)) => failures = 0,
                // Written to stderr, not logged: a log line inside a span would feed the queue
                // it is about.
                Ok(Err(error)) | Err(error) => {
                    failures += 1;
                    if failures.is_power_of_two() {
                        eprintln!(
                            "wadi: cannot export {} span(s) to {url} ({failures} failure(s) in a \
                             row; {} dropped for a full queue so far): {error}",
                            chunk.len(),
                            dropped.load(Ordering::Relaxed)
                        );
                    }
                }
            }
        }
        batch.clear();
        if let Some(done) = flushed {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_parsed_or_refused() {
        let (trace, parent) =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(hex(&trace), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&parent), "00f067aa0ba902b7");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }
}
