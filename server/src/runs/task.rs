//! The task that drives one run: ask the model, append its deltas to the run's log as chunks,
//! save progress in the background, and save the outcome when it ends, however it ends.

use std::{sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt};
use tokio::time::Instant;
use tracing::Instrument;
use wadi_protocol::{RunStatus, Usage, api::Role};

use super::{
    Runs,
    handle::{Ending, RunHandle},
};
use crate::{
    dto,
    ids::{ConversationId, MessageId, RunId, UserId},
    metrics::StatusLabel,
    model::{ChatMessage, Cut, ModelError, ModelEvent, ModelStream, tokens},
    store::{Checkpoint, CheckpointResult, ChunkEnds, RunOutcome},
    util::now_millis,
};

/// Coalescing stops at this size: one chunk is at most about this big (plus one delta).
const MAX_CHUNK_BYTES: usize = 16 * 1024;

/// How long a run's final save is retried in its task (`RunSettings::save_patience`). After
/// it the run stays `running` in the store, and its outcome (what its followers were told) is
/// kept: the heartbeat saves it once the database answers again.
pub(super) const SAVE_PATIENCE: Duration = Duration::from_secs(60);
/// The longest pause between two attempts.
const SAVE_RETRY_MAX: Duration = Duration::from_secs(2);

/// Drives a run to its end. Call it where the run was asked for: its span is a child of the
/// current one (the request or socket that sent the message), so logs and traces follow the
/// run from there.
pub fn drive(ctx: Arc<Runs>, handle: Arc<RunHandle>) -> impl Future<Output = ()> {
    let span =
        tracing::info_span!("run", run_id = %handle.id, conversation_id = %handle.conversation_id);
    async move {
        let started = Instant::now();
        ctx.metrics.active_runs.inc();
        let request = history(
            &ctx,
            handle.id,
            handle.conversation_id,
            handle.owner_id,
            handle.message_id,
        )
        .await;
        let (status, usage, error) = match &request {
            Ok(request) => stream_answer(&ctx, &handle, started, request).await,
            Err(error) => (RunStatus::Failed, None, Some(error.clone())),
        };
        let (ending, kept) = save_outcome(
            &ctx,
            &handle,
            Ending::new(status, usage, error),
            request.ok(),
        )
        .await;
        ctx.metrics.active_runs.dec();
        ctx.metrics
            .run_duration
            .observe(started.elapsed().as_secs_f64());
        ctx.metrics
            .runs_finished
            .get_or_create(&StatusLabel {
                status: ending.status.as_str(),
            })
            .inc();
        match &ending.error {
            Some(error) => tracing::warn!(status = ending.status.as_str(), %error, "run ended"),
            None => tracing::info!(
                status = ending.status.as_str(),
                seq = handle.last_seq(),
                "run ended"
            ),
        }
        // Watchers send `complete` only now, so `complete` means "saved", or kept to be saved
        // when the store is back (see `save_outcome`).
        handle.finish(ending);
        // A conversation deleted while its answer streamed was announced `deleted` already: no
        // `answered` for it after that.
        if kept {
            ctx.conversation_changed(
                handle.owner_id,
                handle.conversation_id,
                wadi_protocol::ConversationChange::Answered,
                None,
            );
        }
        ctx.hub.retire(&handle, ctx.settings.run_retention);
    }
    .instrument(span)
}

type Outcome = (RunStatus, Option<Usage>, Option<String>);

fn stopped(handle: &RunHandle, usage: Option<Usage>) -> Outcome {
    (
        handle.stop_status().unwrap_or(RunStatus::Stopped),
        usage,
        None,
    )
}

/// The provider's stream ended: `completed`, unless it said it cut the answer short (at its
/// token limit, or by its content filter), which fails the run with what came before kept.
fn ended(cut: Option<Cut>, usage: Option<Usage>) -> Outcome {
    match cut {
        None => (RunStatus::Completed, usage, None),
        Some(Cut::Length) => failed(&ModelError::LengthLimit, usage),
        Some(Cut::ContentFilter) => failed(&ModelError::Filtered, usage),
    }
}

/// A model failure: users get its kind (saved with the run, sent in `error`), the log gets the
/// provider's own words.
fn failed(error: &ModelError, usage: Option<Usage>) -> Outcome {
    tracing::warn!(kind = %error, detail = error.detail(), "the model failed");
    (RunStatus::Failed, usage, Some(error.to_string()))
}

/// Streams the model's answer to `request` into the handle until it ends, fails or is stopped.
/// Returning drops the model stream, which cancels the upstream request.
async fn stream_answer(
    ctx: &Runs,
    handle: &RunHandle,
    started: Instant,
    request: &Request,
) -> Outcome {
    let settings = &ctx.settings;
    let cancel = handle.cancelled().clone();
    let asked = ctx.model.stream(&request.model, &request.messages);
    let mut stream: ModelStream = tokio::select! {
        biased;
        () = cancel.cancelled() => return stopped(handle, None),
        result = tokio::time::timeout(settings.model_idle_timeout, asked) => {
            match result {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => return failed(&error, None),
                Err(_) => return failed(&ModelError::Timeout, None),
            }
        }
    };

    let mut usage = None;
    // The provider said the answer is cut (the usage may still follow, then the end).
    let mut cut = None;
    let mut first_chunk = true;
    let mut produced = 0usize;
    let mut flush = tokio::time::interval_at(
        Instant::now() + settings.flush_interval,
        settings.flush_interval,
    );
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checkpoints = Checkpoints::default();
    // One deadline, moved only when the provider sends something: flush ticks must not restart
    // the idle clock.
    let mut silent_until = Instant::now() + settings.model_idle_timeout;
    loop {
        let event = tokio::select! {
            biased;
            () = cancel.cancelled() => return stopped(handle, usage),
            _ = flush.tick() => {
                checkpoints.tick(ctx, handle);
                continue;
            }
            next = tokio::time::timeout_at(silent_until, stream.next()) => match next {
                Err(_) => Some(Err(ModelError::Timeout)),
                Ok(event) => event,
            },
        };
        silent_until = Instant::now() + settings.model_idle_timeout;
        let mut text = match event {
            None => return ended(cut, usage),
            Some(Err(error)) => return failed(&error, usage),
            Some(Ok(ModelEvent::Usage(reported))) => {
                usage = Some(reported);
                continue;
            }
            Some(Ok(ModelEvent::Cut(why))) => {
                cut = Some(why);
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
        let room = settings.max_answer_bytes.saturating_sub(produced);
        let too_long = text.len() > room;
        if too_long {
            let cut = (0..=room)
                .rev()
                .find(|&at| text.is_char_boundary(at))
                .unwrap_or(0);
            text.truncate(cut);
        }
        produced += text.len();
        if !text.is_empty() {
            handle.push(&text);
            if first_chunk {
                first_chunk = false;
                ctx.metrics
                    .time_to_first_token
                    .observe(started.elapsed().as_secs_f64());
            }
        }
        if too_long {
            if let Some(Tail::Usage(reported)) = after {
                usage = Some(reported);
            }
            let limit = settings.max_answer_bytes;
            return failed(&ModelError::TooLong { limit }, usage);
        }
        match after {
            None => {}
            Some(Tail::End) => return ended(cut, usage),
            Some(Tail::Failed(error)) => return failed(&error, usage),
            Some(Tail::Usage(reported)) => usage = Some(reported),
            Some(Tail::Cut(why)) => cut = Some(why),
        }
    }
}

/// A stream event that ends a coalesced chunk.
enum Tail {
    End,
    Failed(ModelError),
    Usage(Usage),
    Cut(Cut),
}

impl Tail {
    /// A delta's text, or the event that is not a delta.
    fn of(event: Option<Result<ModelEvent, ModelError>>) -> Result<String, Tail> {
        match event {
            Some(Ok(ModelEvent::Delta(text))) => Ok(text),
            Some(Ok(ModelEvent::Usage(usage))) => Err(Tail::Usage(usage)),
            Some(Ok(ModelEvent::Cut(cut))) => Err(Tail::Cut(cut)),
            Some(Err(error)) => Err(Tail::Failed(error)),
            None => Err(Tail::End),
        }
    }
}

/// Saves the output in the background as it grows: each checkpoint appends what is new since
/// the last one (written with other runs' in one transaction, `checkpoints.rs`), and the stream
/// never waits on storage. A checkpoint the store refuses because the run is no longer ours (it
/// was reaped while this process was paused) stops the run.
#[derive(Default)]
struct Checkpoints {
    saved_seq: u64,
    /// The checkpoint being written: the seq it reaches, and its answer to come.
    saving: Option<(u64, super::checkpoints::Answer)>,
}

impl Checkpoints {
    fn tick(&mut self, ctx: &Runs, handle: &RunHandle) {
        if let Some((to_seq, answer)) = &mut self.saving {
            let answered = match answer.try_recv() {
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => return,
                Ok(answered) => answered,
                // Not written (the writer is gone): tried again below.
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => None,
            };
            let to_seq = *to_seq;
            self.saving = None;
            match answered {
                Some(CheckpointResult::Saved) => self.saved_seq = to_seq,
                Some(CheckpointResult::Behind { stored_seq }) => {
                    self.saved_seq = u64::try_from(stored_seq).unwrap_or_default();
                }
                Some(CheckpointResult::Fenced) => {
                    tracing::warn!("the run is no longer this instance's; cutting it off");
                    ctx.metrics.fenced_runs.inc();
                    handle.stop(RunStatus::Interrupted);
                    return;
                }
                // Its batch failed (logged there): the next checkpoint covers it.
                None => {}
            }
        }
        if handle.last_seq() <= self.saved_seq {
            return;
        }
        let (delta, ends, to_seq) = handle.since(self.saved_seq);
        let checkpoint = Checkpoint {
            from_seq: i64::try_from(self.saved_seq).unwrap_or(i64::MAX),
            delta,
            ends: ChunkEnds::encode(&ends),
            to_seq: i64::try_from(to_seq).unwrap_or(i64::MAX),
        };
        let answer = ctx.checkpoints.queue(handle.id, ctx.instance, checkpoint);
        self.saving = Some((to_seq, answer));
    }
}

/// What a run asks the model.
pub(super) struct Request {
    model: String,
    messages: Vec<ChatMessage>,
}

/// The model the run was started with, and the messages sent to it: the conversation's system
/// prompt (or the server's), then the latest messages of the path that ends at the user message
/// being answered (that message last): exactly the branch the answer belongs to, never another
/// version's. Empty answers (runs stopped before their first token) are left out.
pub(super) async fn history(
    ctx: &Runs,
    run_id: RunId,
    conversation_id: ConversationId,
    owner_id: UserId,
    message_id: MessageId,
) -> Result<Request, String> {
    let unavailable = |error: crate::store::StoreError| {
        tracing::error!(%error, %run_id, "cannot load the conversation's history");
        "the server could not load the conversation; try again".to_owned()
    };
    let model = ctx
        .store
        .run_by_id(run_id)
        .await
        .map_err(unavailable)?
        .map_or_else(|| ctx.model.name().to_owned(), |run| run.model);
    let prompt = ctx
        .store
        .conversation(conversation_id, owner_id)
        .await
        .map_err(unavailable)?
        .and_then(|conversation| conversation.system_prompt)
        .or_else(|| ctx.settings.system_prompt.clone());
    let records = ctx
        .store
        .path(
            conversation_id,
            message_id,
            ctx.settings.history_messages.max(1),
        )
        .await
        .map_err(unavailable)?;
    let mut history = Vec::with_capacity(records.len() + 1);
    if let Some(prompt) = prompt {
        history.push(ChatMessage {
            role: Role::System,
            content: prompt,
        });
    }
    history.extend(records.into_iter().filter_map(|row| {
        let record = row.message;
        (!record.content.trim().is_empty()).then_some(ChatMessage {
            role: record.role,
            content: record.content,
        })
    }));
    Ok(Request {
        model,
        messages: history,
    })
}

/// Saves how the run ended with its whole output, retrying a failing store a few times. Returns
/// the ending watchers get: this one, or, if the store says the run is no longer ours (it was
/// reaped while this process was paused), the one saved by whoever reaped it. A run that asked
/// the model (`request`) and got no usage from it (stopped, failed, or a provider that does not
/// report) gets the server's estimate.
async fn save_outcome(
    ctx: &Runs,
    handle: &RunHandle,
    mut ending: Ending,
    request: Option<Request>,
) -> (Ending, bool) {
    let (output, last_seq) = handle.snapshot();
    if ending.usage.is_none()
        && let Some(request) = request
    {
        ending.usage = estimate_usage(request, output.clone()).await;
    }
    let outcome = RunOutcome {
        status: ending.status,
        output,
        chunk_ends: ChunkEnds::encode(&handle.ends()),
        error: ending.error.clone(),
        prompt_tokens: ending.usage.map(|u| i64::from(u.prompt_tokens)),
        completion_tokens: ending.usage.map(|u| i64::from(u.completion_tokens)),
        usage_estimated: ending.usage.is_some_and(|u| u.estimated),
        last_seq: i64::try_from(last_seq).unwrap_or(i64::MAX),
        finished_at: now_millis(),
        message_id: MessageId::new(),
    };
    let started = Instant::now();
    let mut delay = Duration::from_millis(50);
    for attempt in 1.. {
        match ctx
            .store
            .finish_run(handle.id, Some(ctx.instance), &outcome)
            .await
        {
            Ok(true) => return (ending, true),
            Ok(false) => return lost_ending(ctx, handle, ending).await,
            Err(error) if started.elapsed() + delay < ctx.settings.save_patience => {
                tracing::warn!(%error, attempt, "cannot save the run's outcome; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(SAVE_RETRY_MAX);
            }
            Err(error) if error.is_unavailable() => {
                tracing::error!(%error, "cannot save the run's outcome; the heartbeat will retry");
                ctx.keep_unsaved(handle.id, outcome);
                break;
            }
            Err(error) => {
                // It would fail the same way again: the heartbeat ends it as an orphan, with its
                // last checkpoint.
                tracing::error!(%error, "cannot save the run's outcome; giving up");
                break;
            }
        }
    }
    (ending, true)
}

/// The usage of a run the provider did not report on, counted with the model's tokenizer on a
/// blocking thread (the first count loads the vocabulary).
pub(super) async fn estimate_usage(request: Request, output: String) -> Option<Usage> {
    tokio::task::spawn_blocking(move || {
        tokens::estimate(&request.model, &request.messages, &output)
    })
    .await
    .inspect_err(|error| tracing::warn!(%error, "cannot count the run's tokens"))
    .ok()
}

/// The store did not take our outcome: the run was reaped (or its conversation deleted). What
/// was saved is what everyone gets.
async fn lost_ending(ctx: &Runs, handle: &RunHandle, ending: Ending) -> (Ending, bool) {
    match ctx.store.run_by_id(handle.id).await {
        Ok(Some(saved)) if saved.status.is_final() => {
            tracing::warn!(
                status = saved.status.as_str(),
                "the run was ended elsewhere; keeping what was saved"
            );
            let saved = Ending {
                status: saved.status,
                usage: dto::run_usage(&saved),
                error: saved.error,
                saved_output: Some(saved.output),
            };
            (saved, true)
        }
        Ok(Some(_)) => {
            tracing::info!("the run is no longer this instance's; outcome not saved");
            (ending, true)
        }
        Ok(None) => {
            // Its conversation was deleted while it streamed.
            tracing::info!("run was no longer in the store; outcome not saved");
            (ending, false)
        }
        Err(error) => {
            tracing::warn!(%error, "cannot read the run back");
            (ending, true)
        }
    }
}
