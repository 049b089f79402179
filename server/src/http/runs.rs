//! `/api/runs`: a run's state, its events as Server-Sent Events (for clients that cannot use
//! WebSocket), and stop. Each works on any instance, whichever drives the run.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post},
};
use futures_util::StreamExt;
use serde::Deserialize;
use wadi_protocol::{ErrorCode, api};

use super::extract::{ApiQuery, IdPath};
use crate::{
    auth::AuthUser,
    dto,
    error::AppError,
    ids::RunId,
    runs::{FrameKind, RunHandle, Runs},
    state::AppState,
    store::RunRecord,
};

/// How long `POST /stop` waits for the run to save before answering.
const STOP_WAIT: Duration = Duration::from_secs(10);

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/runs/{id}", get(fetch))
        .route("/api/runs/{id}/events", get(events))
        .route("/api/runs/{id}/stop", post(stop))
}

async fn owned_run(runs: &Runs, user: &AuthUser, id: RunId) -> Result<RunRecord, AppError> {
    runs.store.run(id, user.id).await?.ok_or(AppError::NotFound)
}

async fn owned_handle(
    runs: &Arc<Runs>,
    user: &AuthUser,
    id: RunId,
) -> Result<Arc<RunHandle>, AppError> {
    runs.find(id, user.id).await?.ok_or(AppError::NotFound)
}

async fn fetch(
    State(runs): State<Arc<Runs>>,
    user: AuthUser,
    IdPath(id): IdPath<RunId>,
) -> Result<Json<api::Run>, AppError> {
    let mut run = owned_run(&runs, &user, id).await?;
    // While it streams, the store holds the last checkpoint; a handle here holds every chunk.
    if let Some(handle) = runs.hub.get(id).filter(|handle| !handle.is_finished()) {
        let (output, seq) = handle.snapshot();
        if i64::try_from(seq).unwrap_or(i64::MAX) >= run.last_seq {
            run.output = output;
            run.last_seq = i64::try_from(seq).unwrap_or(i64::MAX);
        }
    }
    Ok(Json(dto::run(&run)))
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default, rename = "afterSeq")]
    after_seq: Option<u64>,
}

/// `GET /api/runs/{id}/events`: `chunk` events with `id:` = seq, then `complete`. Resumes after
/// the `Last-Event-ID` header (what browsers send on reconnect) or `?afterSeq=`.
async fn events(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath<RunId>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Response, AppError> {
    let last_event_id = match headers.get("last-event-id") {
        // Empty: no event seen yet (as EventSource does by not sending it).
        None => None,
        Some(value) if value.as_bytes().trim_ascii().is_empty() => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    AppError::invalid(ErrorCode::InvalidRequest, "Last-Event-ID must be a seq")
                })?,
        ),
    };
    let after_seq = last_event_id.or(query.after_seq).unwrap_or(0);
    let handle = owned_handle(&state.runs, &user, id).await?;
    let Some(counted) = state
        .clients
        .open_sse(user.id, state.config.sockets.max_sse_per_user)
    else {
        state.metrics.refused_connection("sse");
        return Err(AppError::RateLimited);
    };
    let metrics = state.metrics.clone();
    let events = handle.follow(after_seq, false).map(move |frame| {
        // Counted while the stream lives.
        let _counted = &counted;
        metrics.bytes_sent.inc_by(frame.text.len() as u64);
        let event = match frame.kind {
            FrameKind::Chunk { seq } => {
                metrics.chunks_sent.inc();
                Event::default().event("chunk").id(seq.to_string())
            }
            FrameKind::Complete => Event::default().event("complete"),
            FrameKind::Error => Event::default().event("error"),
            FrameKind::Start => Event::default().event("message"),
        };
        Ok::<_, Infallible>(event.data(frame.text.as_str()))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// `POST /api/runs/{id}/stop`: stops the run (cancelling the model request on whichever
/// instance drives it), waits for it to save, and answers with the stopped run.
async fn stop(
    State(runs): State<Arc<Runs>>,
    user: AuthUser,
    IdPath(id): IdPath<RunId>,
) -> Result<(StatusCode, Json<api::Run>), AppError> {
    let handle = owned_handle(&runs, &user, id).await?;
    runs.stop(&handle, user.id).await?;
    // A live owner that missed the stop message finds the stop in the store at its next beat.
    let wait = runs.settings.stop_landing().min(STOP_WAIT);
    let _ = tokio::time::timeout(wait, handle.finished()).await;
    // The store says how it ended (a mirror here may learn of it later). Not ended in time (its
    // instance does not answer): the stop is recorded, and the run ends `stopped` when that
    // instance answers or is reaped.
    let run = owned_run(&runs, &user, id).await?;
    let status = if run.status.is_final() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(dto::run(&run))))
}
