//! `/api/conversations`: a user's conversations and their messages. Another user's conversation
//! answers 404 exactly like a missing one.

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use wadi_protocol::{
    ConversationChange, ErrorCode,
    api::{self, CreateConversation, Page, PathPage, SendMessage, UpdateConversation},
};

use super::extract::{ApiJson, ApiQuery, IdPath, IdsPath, PageQuery, decode_cursor, encode_cursor};
use crate::{
    auth::AuthUser,
    content::{check_message, check_no_nul, is_blank, one_line},
    dto,
    error::AppError,
    ids::{ConversationId, MessageId},
    runs::Placement,
    state::AppState,
    store::{ConversationCursor, ConversationRecord},
    util::now_millis,
};

/// Longest title accepted, in characters.
const MAX_TITLE_CHARS: usize = 200;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/conversations", get(list).post(create))
        .route("/api/models", get(models))
        .route(
            "/api/conversations/{id}",
            get(fetch).patch(rename).delete(remove),
        )
        .route(
            "/api/conversations/{id}/messages",
            get(list_messages).post(send_message),
        )
        .route("/api/conversations/{id}/path", get(path))
        .route("/api/conversations/{id}/export", get(export))
        .route(
            "/api/conversations/{id}/messages/{message_id}/regenerate",
            axum::routing::post(regenerate),
        )
}

async fn list(
    State(state): State<AppState>,
    user: AuthUser,
    page: PageQuery,
) -> Result<Json<Page<api::Conversation>>, AppError> {
    let cursor = page
        .cursor
        .as_deref()
        .map(parse_conversation_cursor)
        .transpose()?;
    let mut rows = state
        .store
        .list_conversations(user.id, cursor, page.limit + 1)
        .await?;
    let next_cursor = next_page(&mut rows, page.limit, |last| {
        encode_cursor("c", &format!("{}:{}", last.updated_at, last.id))
    });
    Ok(Json(Page {
        items: rows.iter().map(dto::conversation).collect(),
        next_cursor,
    }))
}

/// A conversations page cursor (`?cursor=` of `GET /api/conversations`).
pub fn parse_conversation_cursor(cursor: &str) -> Result<ConversationCursor, AppError> {
    let fields = decode_cursor("c", cursor)?;
    let bad = || AppError::invalid(ErrorCode::InvalidRequest, "invalid cursor");
    let (updated_at, id) = fields.split_once(':').ok_or_else(bad)?;
    Ok(ConversationCursor {
        updated_at: updated_at.parse().map_err(|_| bad())?,
        id: id.parse().map_err(|_| bad())?,
    })
}

/// Trims a page fetched with one extra row to `limit` and returns the cursor of its last item
/// when there is more to come.
fn next_page<T>(rows: &mut Vec<T>, limit: u32, cursor: impl Fn(&T) -> String) -> Option<String> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(cursor)
    } else {
        None
    }
}

fn check_title(title: &str) -> Result<String, AppError> {
    check_no_nul("title", title)?;
    let title = one_line(title);
    let title = title.as_str();
    if is_blank(title) {
        return Err(AppError::invalid(
            ErrorCode::InvalidMessage,
            "title must not be empty",
        ));
    }
    if title.chars().count() > MAX_TITLE_CHARS {
        return Err(AppError::TooLarge(format!(
            "title must be at most {MAX_TITLE_CHARS} characters"
        )));
    }
    Ok(title.to_owned())
}

async fn create(
    State(state): State<AppState>,
    user: AuthUser,
    ApiJson(body): ApiJson<CreateConversation>,
) -> Result<Response, AppError> {
    let title = body.title.as_deref().map(check_title).transpose()?;
    let model = check_model(&state, body.model.as_deref()).await?;
    let system_prompt = check_system_prompt(&state, body.system_prompt.as_deref())?;
    if !state.conversation_limiter.allows(user.id).await {
        return Err(AppError::RateLimited);
    }
    let now = now_millis();
    let record = ConversationRecord {
        id: ConversationId::new(),
        owner_id: user.id,
        title,
        created_at: now,
        updated_at: now,
        model: model.filter(|m| !m.is_empty()),
        system_prompt: system_prompt.filter(|p| !p.is_empty()),
    };
    state.store.create_conversation(&record).await?;
    let created = dto::conversation(&record);
    state.runs.conversation_changed(
        user.id,
        record.id,
        ConversationChange::Created,
        Some(created.title.clone()),
    );
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// The caller's conversation, or 404.
pub async fn owned_conversation(
    state: &AppState,
    user: &AuthUser,
    id: ConversationId,
) -> Result<ConversationRecord, AppError> {
    state
        .store
        .conversation(id, user.id)
        .await?
        .ok_or(AppError::NotFound)
}

async fn fetch(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath<ConversationId>,
) -> Result<Json<api::Conversation>, AppError> {
    let record = owned_conversation(&state, &user, id).await?;
    Ok(Json(dto::conversation(&record)))
}

/// `PATCH /api/conversations/{id}`: its title, model and system prompt (what is given).
async fn rename(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath<ConversationId>,
    ApiJson(body): ApiJson<UpdateConversation>,
) -> Result<Json<api::Conversation>, AppError> {
    if body.title.is_none() && body.model.is_none() && body.system_prompt.is_none() {
        return Err(AppError::invalid(
            ErrorCode::InvalidMessage,
            "give a title, model or systemPrompt to change",
        ));
    }
    let title = body.title.as_deref().map(check_title).transpose()?;
    let model = check_model(&state, body.model.as_deref()).await?;
    let system_prompt = check_system_prompt(&state, body.system_prompt.as_deref())?;
    owned_conversation(&state, &user, id).await?;
    let now = now_millis();
    if let Some(title) = &title
        && !state
            .store
            .rename_conversation(id, user.id, title, now)
            .await?
    {
        return Err(AppError::NotFound);
    }
    if (model.is_some() || system_prompt.is_some())
        && !state
            .store
            .set_conversation_settings(id, user.id, model.as_deref(), system_prompt.as_deref(), now)
            .await?
    {
        return Err(AppError::NotFound);
    }
    let record = owned_conversation(&state, &user, id).await?;
    let updated = dto::conversation(&record);
    state.runs.conversation_changed(
        user.id,
        id,
        ConversationChange::Updated,
        Some(updated.title.clone()),
    );
    Ok(Json(updated))
}

/// A model the operator allows (an empty one: back to the default).
async fn check_model(state: &AppState, model: Option<&str>) -> Result<Option<String>, AppError> {
    let Some(model) = model.map(str::trim) else {
        return Ok(None);
    };
    if !model.is_empty() {
        state.models.check(model).await?;
    }
    Ok(Some(model.to_owned()))
}

/// A system prompt no longer than a message may be (an empty one: back to the default).
fn check_system_prompt(state: &AppState, prompt: Option<&str>) -> Result<Option<String>, AppError> {
    let Some(prompt) = prompt else {
        return Ok(None);
    };
    check_no_nul("the system prompt", prompt)?;
    let limit = state.config.runs.max_content_bytes;
    if prompt.len() > limit {
        return Err(AppError::TooLarge(format!(
            "the system prompt must be at most {limit} bytes"
        )));
    }
    Ok(Some(prompt.trim().to_owned()))
}

/// `GET /api/models`.
async fn models(State(state): State<AppState>, _user: AuthUser) -> Json<api::ModelList> {
    Json(api::ModelList {
        models: state.models.models().await,
        default: state.models.default_model().to_owned(),
    })
}

async fn remove(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath<ConversationId>,
) -> Result<StatusCode, AppError> {
    // Read before the delete, which takes the run's row with it.
    let streaming = state.store.active_run(id).await?;
    if state.store.delete_conversation(id, user.id).await? {
        if let Some(run) = streaming.filter(|run| run.owner_id == user.id) {
            // Told in the background: a slow Redis must not hold up the answer.
            state.runs.cancel_deleted(&run);
        }
        state
            .runs
            .conversation_changed(user.id, id, ConversationChange::Deleted, None);
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(AppError::NotFound)
    }
}

/// The messages of the path to the conversation's newest message, oldest first, paged forward
/// (what clients read before conversations had branches; the app reads `/path`).
async fn list_messages(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath<ConversationId>,
    page: PageQuery,
) -> Result<Json<Page<api::Message>>, AppError> {
    owned_conversation(&state, &user, id).await?;
    let after = match page.cursor.as_deref() {
        Some(cursor) => {
            let after = parse_message_cursor("m", cursor)?;
            // A cursor of another conversation's list (or made up) is refused, not an empty page.
            if state.store.message(id, after).await?.is_none() {
                return Err(AppError::invalid(
                    ErrorCode::InvalidRequest,
                    "invalid cursor",
                ));
            }
            Some(after)
        }
        None => None,
    };
    let Some(leaf) = state.store.newest_leaf(id, None).await? else {
        return Ok(Json(Page {
            items: Vec::new(),
            next_cursor: None,
        }));
    };
    // Along a path, ids grow (a message is always newer than the one it follows).
    let mut rows: Vec<_> = state
        .store
        .path(id, leaf, u32::MAX)
        .await?
        .into_iter()
        .filter(|row| after.is_none_or(|after| row.message.id > after))
        .take(usize::try_from(page.limit).unwrap_or(usize::MAX) + 1)
        .collect();
    let next_cursor = next_page(&mut rows, page.limit, |last| {
        encode_cursor("m", &last.message.id.to_string())
    });
    let items = rows.iter().map(dto::message).collect();
    Ok(Json(Page { items, next_cursor }))
}

#[derive(serde::Deserialize)]
struct PathQuery {
    through: Option<String>,
}

/// `GET /api/conversations/{id}/path?through=&cursor=&limit=`: the newest page of the path
/// through `through` (to its newest descendant; the conversation's newest message without it),
/// or with `cursor` (and no `through`), the page before the one that gave it.
async fn path(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath<ConversationId>,
    page: PageQuery,
    ApiQuery(query): ApiQuery<PathQuery>,
) -> Result<Json<PathPage>, AppError> {
    owned_conversation(&state, &user, id).await?;
    let empty = || {
        Json(PathPage {
            items: Vec::new(),
            older_cursor: None,
        })
    };
    let start = match page.cursor.as_deref() {
        Some(_)
            if query
                .through
                .as_deref()
                .is_some_and(|through| !through.is_empty()) =>
        {
            return Err(AppError::invalid(
                ErrorCode::InvalidRequest,
                "give through or cursor, not both: a cursor goes on along the branch of the page \
                 that gave it",
            ));
        }
        Some(cursor) => {
            let oldest = parse_message_cursor("p", cursor)?;
            let message =
                state.store.message(id, oldest).await?.ok_or_else(|| {
                    AppError::invalid(ErrorCode::InvalidRequest, "invalid cursor")
                })?;
            message.parent_id
        }
        None => branch_leaf(&state, id, query.through.as_deref()).await?,
    };
    let Some(start) = start else {
        return Ok(empty());
    };
    let mut rows = state.store.path(id, start, page.limit + 1).await?;
    let limit = usize::try_from(page.limit).unwrap_or(usize::MAX);
    let older_cursor = if rows.len() > limit {
        rows.remove(0);
        rows.first()
            .map(|oldest| encode_cursor("p", &oldest.message.id.to_string()))
    } else {
        None
    };
    Ok(Json(PathPage {
        items: rows.iter().map(dto::message).collect(),
        older_cursor,
    }))
}

/// The last message of the branch through `through` (an id, or empty or absent for the newest
/// message of the conversation); `None` for a conversation without messages. A `through` that
/// is not a message of the conversation is not found.
async fn branch_leaf(
    state: &AppState,
    id: ConversationId,
    through: Option<&str>,
) -> Result<Option<MessageId>, AppError> {
    let through = through
        .filter(|text| !text.is_empty())
        .map(|text| {
            text.parse::<MessageId>()
                .map_err(|_| AppError::invalid(ErrorCode::InvalidRequest, "through is not an id"))
        })
        .transpose()?;
    let leaf = state.store.newest_leaf(id, through).await?;
    if leaf.is_none() && through.is_some() {
        return Err(AppError::NotFound);
    }
    Ok(leaf)
}

#[derive(serde::Deserialize)]
struct ExportQuery {
    format: Option<String>,
    through: Option<String>,
}

/// `GET /api/conversations/{id}/export?format=markdown|json`: Markdown is the branch shown
/// (through `through`, else to the newest message), for people; JSON is every message of every
/// branch, for programs. Both as a download.
async fn export(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath<ConversationId>,
    ApiQuery(query): ApiQuery<ExportQuery>,
) -> Result<Response, AppError> {
    let conversation = owned_conversation(&state, &user, id).await?;
    let conversation = dto::conversation(&conversation);
    let name = file_name(&conversation.title);
    match query.format.as_deref().unwrap_or("markdown") {
        "json" => {
            let messages = state.store.all_messages(id).await?;
            let body = api::ConversationExport {
                conversation,
                messages: messages.iter().map(dto::message).collect(),
                exported_at: crate::util::datetime(now_millis()),
            };
            Ok(download(
                "application/json",
                &format!("{name}.json"),
                serde_json::to_string_pretty(&body).map_err(AppError::internal)?,
            ))
        }
        "markdown" | "md" => {
            let rows = match branch_leaf(&state, id, query.through.as_deref()).await? {
                Some(leaf) => state.store.path(id, leaf, u32::MAX).await?,
                None => Vec::new(),
            };
            let messages: Vec<api::Message> = rows.iter().map(dto::message).collect();
            Ok(download(
                "text/markdown; charset=utf-8",
                &format!("{name}.md"),
                crate::content::markdown_export(&conversation, &messages),
            ))
        }
        other => Err(AppError::invalid(
            ErrorCode::InvalidRequest,
            format!("unknown export format {other:?} (markdown or json)"),
        )),
    }
}

/// A file name from a title: letters, digits and dashes, at most 60 characters.
fn file_name(title: &str) -> String {
    let mut name = String::new();
    for c in title.chars() {
        if c.is_ascii_alphanumeric() {
            name.push(c.to_ascii_lowercase());
        } else if !name.ends_with('-') && !name.is_empty() {
            name.push('-');
        }
        if name.len() >= 60 {
            break;
        }
    }
    let name = name.trim_end_matches('-');
    if name.is_empty() {
        "conversation".to_owned()
    } else {
        name.to_owned()
    }
}

fn download(content_type: &'static str, file_name: &str, body: String) -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, content_type.to_owned()),
            (
                axum::http::header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file_name}\""),
            ),
        ],
        body,
    )
        .into_response()
}

fn parse_message_cursor(kind: &str, cursor: &str) -> Result<MessageId, AppError> {
    decode_cursor(kind, cursor)?
        .parse::<MessageId>()
        .map_err(|_| AppError::invalid(ErrorCode::InvalidRequest, "invalid cursor"))
}

/// `POST /api/conversations/{id}/messages/{messageId}/regenerate`: another answer to a user
/// message (`201` with the message and the new run).
async fn regenerate(
    State(state): State<AppState>,
    user: AuthUser,
    IdsPath(id, message_id): IdsPath<ConversationId, MessageId>,
) -> Result<Response, AppError> {
    owned_conversation(&state, &user, id).await?;
    let sent = state.runs.regenerate(user.id, id, message_id).await?;
    Ok((StatusCode::CREATED, Json(sent.response())).into_response())
}

async fn send_message(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath<ConversationId>,
    ApiJson(body): ApiJson<SendMessage>,
) -> Result<Response, AppError> {
    check_message(
        &body.content,
        body.client_message_id.as_deref(),
        state.config.runs.max_content_bytes,
    )?;
    let placement = Placement::from_request(body.parent_id, body.edit_of)?;
    owned_conversation(&state, &user, id).await?;
    let sent = state
        .runs
        .send(user.id, id, body.content, body.client_message_id, placement)
        .await?;
    let status = if sent.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(sent.response())).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_keep_one_extra_row_as_the_signal_for_more() {
        let mut rows = vec![1, 2, 3];
        assert_eq!(next_page(&mut rows, 2, |n| n.to_string()), Some("2".into()));
        assert_eq!(rows, vec![1, 2]);
        let mut rows = vec![1, 2];
        assert_eq!(next_page(&mut rows, 2, |n| n.to_string()), None);
    }
}
