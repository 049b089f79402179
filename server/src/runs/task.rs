//! The task that drives one run: ask the model, append its deltas to the run's log as chunks,
//! save progress in the background, and save the outcome when it ends, however it ends.

use std::{sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt};
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;
use wadi_protocol::{RunStatus, Usage, api::Role};

use super::handle::{Ending, RunHandle};
use crate::{
    metrics::{Metrics, StatusLabel},
    model::{ChatMessage, ChatModel, ModelError, ModelEvent, ModelStream},
    store::{RunOutcome, Store},
    util::now_millis,
};

/// Everything a run needs, cloned from the server state when it starts.
#[derive(Clone)]
pub struct RunContext {
    pub store: Arc<dyn Store>,
    pub model: Arc<dyn ChatModel>,
    pub metrics: Arc<Metrics>,
    pub hub: Arc<super::hub::Hub>,
    pub settings: Arc<RunSettings>,
}

pub struct RunSettings {
    pub system_prompt: Option<String>,
    pub history_messages: u32,
    pub idle_timeout: Duration,
    pub flush_interval: Duration,
    pub coalesce_window: Duration,
    pub retention: Duration,
}

/// Coalescing stops at this size: one chunk is at most about this big (plus one delta).
const MAX_CHUNK_BYTES: usize = 16 * 1024;

/// Attempts at saving a run's outcome before giving up (the run then stays `running` in the
/// store with its last flushed output, and becomes `interrupted` at the next start).
const SAVE_ATTEMPTS: u32 = 5;

pub async fn drive(ctx: RunContext, handle: Arc<RunHandle>) {
    let span =
        tracing::info_span!("run", run_id = %handle.id, conversation_id = %handle.conversation_id);
    async move {
        let started = Instant::now();
        ctx.metrics.active_runs.inc();
        let (status, usage, error) = stream_answer(&ctx, &handle, started).await;
        let ending = Ending {
            status,
            usage,
            error,
        };
        save_outcome(&ctx, &handle, &ending).await;
        ctx.metrics.active_runs.dec();
        ctx.metrics
            .run_duration
            .observe(started.elapsed().as_secs_f64());
        ctx.metrics
            .runs_finished
            .get_or_create(&StatusLabel {
                status: status.as_str(),
            })
            .inc();
        match &ending.error {
            Some(error) => tracing::warn!(status = status.as_str(), %error, "run ended"),
            None => tracing::info!(
                status = status.as_str(),
                seq = handle.last_seq(),
                "run ended"
            ),
        }
        // Watchers send `complete` only now, so `complete` always means "saved".
        handle.finish(ending);
        ctx.hub.retire(&handle, ctx.settings.retention);
    }
    .instrument(span)
    .await;
}

type Outcome = (RunStatus, Option<Usage>, Option<String>);

fn stopped(handle: &RunHandle, usage: Option<Usage>) -> Outcome {
    (
        handle.stop_status().unwrap_or(RunStatus::Stopped),
        usage,
        None,
    )
}

fn failed(error: &ModelError, usage: Option<Usage>) -> Outcome {
    (RunStatus::Failed, usage, Some(error.to_string()))
}

/// Streams the model's answer into the handle until it ends, fails or is stopped. Returning
/// drops the model stream, which cancels the upstream request.
async fn stream_answer(ctx: &RunContext, handle: &RunHandle, started: Instant) -> Outcome {
    let settings = &ctx.settings;
    let cancel = handle.cancelled().clone();
    let history = match history(ctx, handle.conversation_id).await {
        Ok(history) => history,
        Err(error) => return (RunStatus::Failed, None, Some(error)),
    };
    let mut stream: ModelStream = tokio::select! {
        biased;
        () = cancel.cancelled() => return stopped(handle, None),
        result = tokio::time::timeout(settings.idle_timeout, ctx.model.stream(history)) => {
            match result {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => return failed(&error, None),
                Err(_) => return failed(&ModelError::Timeout, None),
            }
        }
    };

    let mut usage = None;
    let mut first_chunk = true;
    let mut flush = tokio::time::interval_at(
        Instant::now() + settings.flush_interval,
        settings.flush_interval,
    );
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut saved_seq = 0;
    let mut saving: Option<tokio::task::JoinHandle<()>> = None;
    // One deadline, moved only when the provider sends something: flush ticks must not restart
    // the idle clock.
    let mut silent_until = Instant::now() + settings.idle_timeout;
    loop {
        let event = tokio::select! {
            biased;
            () = cancel.cancelled() => return stopped(handle, usage),
            _ = flush.tick() => {
                // Save in the background: the stream never waits on storage.
                let idle = saving.as_ref().is_none_or(|task| task.is_finished());
                if idle && handle.last_seq() > saved_seq {
                    let (output, seq) = handle.snapshot();
                    saved_seq = seq;
                    let store = ctx.store.clone();
                    let id = handle.id;
                    saving = Some(tokio::spawn(async move {
                        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
                        if let Err(error) = store.save_run_progress(id, &output, seq).await {
                            tracing::warn!(run_id = %id, %error, "cannot save run progress");
                        }
                    }));
                }
                continue;
            }
            next = tokio::time::timeout_at(silent_until, stream.next()) => match next {
                Err(_) => Some(Err(ModelError::Timeout)),
                Ok(event) => event,
            },
        };
        silent_until = Instant::now() + settings.idle_timeout;
        let mut text = match event {
            None => return (RunStatus::Completed, usage, None),
            Some(Err(error)) => return failed(&error, usage),
            Some(Ok(ModelEvent::Usage(reported))) => {
                usage = Some(reported);
                continue;
            }
            Some(Ok(ModelEvent::Delta(text))) => text,
        };
        // Coalesce: deltas that are already waiting join this chunk, at no extra delay.
        let mut after = None;
        while text.len() < MAX_CHUNK_BYTES
            && let Some(next) = stream.next().now_or_never()
        {
            match Tail::of(next) {
                Ok(more) => text.push_str(&more),
                Err(tail) => {
                    after = Some(tail);
                    break;
                }
            }
        }
        if after.is_none() && !settings.coalesce_window.is_zero() {
            let deadline = Instant::now() + settings.coalesce_window;
            while text.len() < MAX_CHUNK_BYTES {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => break,
                    next = stream.next() => match Tail::of(next) {
                        Ok(more) => text.push_str(&more),
                        Err(tail) => {
                            after = Some(tail);
                            break;
                        }
                    },
                }
            }
        }
        if !text.is_empty() {
            handle.push(&text);
            if first_chunk {
                first_chunk = false;
                ctx.metrics
                    .time_to_first_token
                    .observe(started.elapsed().as_secs_f64());
            }
        }
        match after {
            None => {}
            Some(Tail::End) => return (RunStatus::Completed, usage, None),
            Some(Tail::Failed(error)) => return failed(&error, usage),
            Some(Tail::Usage(reported)) => usage = Some(reported),
        }
    }
}

/// A stream event that ends a coalesced chunk.
enum Tail {
    End,
    Failed(ModelError),
    Usage(Usage),
}

impl Tail {
    /// A delta's text, or the event that is not a delta.
    fn of(event: Option<Result<ModelEvent, ModelError>>) -> Result<String, Tail> {
        match event {
            Some(Ok(ModelEvent::Delta(text))) => Ok(text),
            Some(Ok(ModelEvent::Usage(usage))) => Err(Tail::Usage(usage)),
            Some(Err(error)) => Err(Tail::Failed(error)),
            None => Err(Tail::End),
        }
    }
}

/// The messages sent to the model: the system prompt, then the conversation's latest messages
/// (the new user message last). Empty answers (runs stopped before their first token) are left
/// out.
async fn history(ctx: &RunContext, conversation_id: Uuid) -> Result<Vec<ChatMessage>, String> {
    let records = ctx
        .store
        .recent_messages(conversation_id, ctx.settings.history_messages.max(1))
        .await
        .map_err(|e| format!("cannot load the conversation: {e}"))?;
    let mut history = Vec::with_capacity(records.len() + 1);
    if let Some(prompt) = &ctx.settings.system_prompt {
        history.push(ChatMessage {
            role: Role::System,
            content: prompt.clone(),
        });
    }
    history.extend(records.into_iter().filter_map(|record| {
        let role = Role::parse(&record.role)?;
        (!record.content.trim().is_empty()).then_some(ChatMessage {
            role,
            content: record.content,
        })
    }));
    Ok(history)
}

async fn save_outcome(ctx: &RunContext, handle: &RunHandle, ending: &Ending) {
    let (output, last_seq) = handle.snapshot();
    let outcome = RunOutcome {
        status: ending.status.as_str().to_owned(),
        output,
        error: ending.error.clone(),
        prompt_tokens: ending.usage.map(|u| i64::from(u.prompt_tokens)),
        completion_tokens: ending.usage.map(|u| i64::from(u.completion_tokens)),
        last_seq: i64::try_from(last_seq).unwrap_or(i64::MAX),
        finished_at: now_millis(),
        message_id: Uuid::now_v7(),
    };
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=SAVE_ATTEMPTS {
        match ctx.store.finish_run(handle.id, &outcome).await {
            Ok(true) => return,
            Ok(false) => {
                // Its conversation was deleted meanwhile, or another path already ended it.
                tracing::info!("run was no longer running in the store; outcome not saved");
                return;
            }
            Err(error) if attempt < SAVE_ATTEMPTS => {
                tracing::warn!(%error, attempt, "cannot save the run's outcome; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(error) => tracing::error!(%error, "cannot save the run's outcome; giving up"),
        }
    }
}
