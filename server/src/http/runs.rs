//! `/api/runs`: a run's state, its events as Server-Sent Events (for clients that cannot use
//! WebSocket), and stop.

use std::{convert::Infallible, time::Duration};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::HeaderMap,
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post},
};
use futures_util::{Stream, StreamExt, stream};
use serde::Deserialize;
use wadi_protocol::{ErrorCode, RunStatus, ServerMessage, api};

use super::{dto, extract::IdPath};
use crate::{auth::AuthUser, error::AppError, state::AppState, store::RunRecord};

/// How long `POST /stop` waits for the run to save before answering.
const STOP_WAIT: Duration = Duration::from_secs(10);

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/runs/{id}", get(fetch))
        .route("/api/runs/{id}/events", get(events))
        .route("/api/runs/{id}/stop", post(stop))
}

async fn owned_run(
    state: &AppState,
    user: &AuthUser,
    id: uuid::Uuid,
) -> Result<RunRecord, AppError> {
    state
        .store
        .run(id, user.id)
        .await?
        .ok_or(AppError::NotFound)
}

async fn fetch(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath,
) -> Result<Json<api::Run>, AppError> {
    let mut run = owned_run(&state, &user, id).await?;
    // While it streams, the store holds the last flush; memory holds every chunk.
    if let Some(handle) = state.hub.get(id).filter(|handle| !handle.is_finished()) {
        let (output, seq) = handle.snapshot();
        run.output = output;
        run.last_seq = i64::try_from(seq).unwrap_or(i64::MAX);
    }
    Ok(Json(dto::run(&run)?))
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
    IdPath(id): IdPath,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, AppError> {
    let Query(query) =
        query.map_err(|e| AppError::invalid(ErrorCode::InvalidRequest, e.body_text()))?;
    let last_event_id = match headers.get("last-event-id") {
        None => None,
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
    let run = owned_run(&state, &user, id).await?;
    let frames: std::pin::Pin<Box<dyn Stream<Item = ServerMessage> + Send>> =
        match state.hub.get(id) {
            Some(handle) => Box::pin(handle.follow(after_seq, false)),
            None => Box::pin(stream::iter([dto::complete_frame(&run)])),
        };
    let metrics = state.metrics.clone();
    let events = frames.map(move |frame| {
        let data = frame.encode();
        metrics.bytes_sent.inc_by(data.len() as u64);
        let event = match &frame {
            ServerMessage::Chunk { seq, .. } => {
                metrics.chunks_sent.inc();
                Event::default().event("chunk").id(seq.to_string())
            }
            ServerMessage::Complete { .. } => Event::default().event("complete"),
            ServerMessage::Error { .. } => Event::default().event("error"),
            _ => Event::default().event("message"),
        };
        Ok::<_, Infallible>(event.data(data))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// `POST /api/runs/{id}/stop`: stops the run (cancelling the model request), waits for it to
/// save, and answers with the stopped run.
async fn stop(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath,
) -> Result<Json<api::Run>, AppError> {
    owned_run(&state, &user, id).await?;
    let handle = state
        .hub
        .get(id)
        .filter(|handle| !handle.is_finished())
        .ok_or_else(|| AppError::Conflict {
            code: ErrorCode::NoActiveRun,
            message: "the run is not streaming".into(),
        })?;
    handle.stop(RunStatus::Stopped);
    if tokio::time::timeout(STOP_WAIT, handle.finished())
        .await
        .is_err()
    {
        return Err(AppError::Unavailable("the run did not stop in time".into()));
    }
    let run = owned_run(&state, &user, id).await?;
    Ok(Json(dto::run(&run)?))
}
