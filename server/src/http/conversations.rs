//! `/api/conversations`: a user's conversations and their messages. Another user's conversation
//! answers 404 exactly like a missing one.

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use uuid::Uuid;
use wadi_protocol::{
    ErrorCode,
    api::{self, CreateConversation, Page, SendMessage, UpdateConversation},
};

use super::{
    dto,
    extract::{ApiJson, IdPath, PageQuery, decode_cursor, encode_cursor},
};
use crate::{
    auth::AuthUser,
    error::AppError,
    state::AppState,
    store::{ConversationCursor, ConversationRecord},
    util::now_millis,
};

/// Longest title accepted, in characters.
const MAX_TITLE_CHARS: usize = 200;
/// Longest `clientMessageId` accepted, in characters.
const MAX_CLIENT_MESSAGE_ID_CHARS: usize = 128;
/// Length of a title derived from the first message, in characters.
const DERIVED_TITLE_CHARS: usize = 60;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/conversations", get(list).post(create))
        .route(
            "/api/conversations/{id}",
            get(fetch).patch(rename).delete(remove),
        )
        .route(
            "/api/conversations/{id}/messages",
            get(list_messages).post(send_message),
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

fn parse_conversation_cursor(cursor: &str) -> Result<ConversationCursor, AppError> {
    let fields = decode_cursor("c", cursor)?;
    let bad = || AppError::invalid(ErrorCode::InvalidRequest, "invalid cursor");
    let (updated_at, id) = fields.split_once(':').ok_or_else(bad)?;
    Ok(ConversationCursor {
        updated_at: updated_at.parse().map_err(|_| bad())?,
        id: Uuid::parse_str(id).map_err(|_| bad())?,
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
    let title = title.trim();
    if title.is_empty() {
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
    let now = now_millis();
    let record = ConversationRecord {
        id: Uuid::now_v7(),
        owner_id: user.id,
        title,
        created_at: now,
        updated_at: now,
    };
    state.store.create_conversation(&record).await?;
    Ok((StatusCode::CREATED, Json(dto::conversation(&record))).into_response())
}

/// The caller's conversation, or 404.
pub async fn owned_conversation(
    state: &AppState,
    user: &AuthUser,
    id: Uuid,
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
    IdPath(id): IdPath,
) -> Result<Json<api::Conversation>, AppError> {
    let record = owned_conversation(&state, &user, id).await?;
    Ok(Json(dto::conversation(&record)))
}

async fn rename(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath,
    ApiJson(body): ApiJson<UpdateConversation>,
) -> Result<Json<api::Conversation>, AppError> {
    let title = check_title(&body.title)?;
    if !state
        .store
        .rename_conversation(id, user.id, &title, now_millis())
        .await?
    {
        return Err(AppError::NotFound);
    }
    let record = owned_conversation(&state, &user, id).await?;
    Ok(Json(dto::conversation(&record)))
}

async fn remove(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath,
) -> Result<StatusCode, AppError> {
    if state.store.delete_conversation(id, user.id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(AppError::NotFound)
    }
}

async fn list_messages(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath,
    page: PageQuery,
) -> Result<Json<Page<api::Message>>, AppError> {
    owned_conversation(&state, &user, id).await?;
    let after = match page.cursor.as_deref() {
        Some(cursor) => Some(
            Uuid::parse_str(&decode_cursor("m", cursor)?)
                .map_err(|_| AppError::invalid(ErrorCode::InvalidRequest, "invalid cursor"))?,
        ),
        None => None,
    };
    let mut rows = state.store.list_messages(id, after, page.limit + 1).await?;
    let next_cursor = next_page(&mut rows, page.limit, |last| {
        encode_cursor("m", &last.message.id.to_string())
    });
    let items = rows.iter().map(dto::message).collect::<Result<_, _>>()?;
    Ok(Json(Page { items, next_cursor }))
}

/// Checks a message's content and client id; the same rules hold on the WebSocket.
pub fn check_message(
    content: &str,
    client_message_id: Option<&str>,
    max_content_bytes: usize,
) -> Result<(), AppError> {
    if content.trim().is_empty() {
        return Err(AppError::invalid(
            ErrorCode::EmptyContent,
            "message content must not be empty",
        ));
    }
    if content.len() > max_content_bytes {
        return Err(AppError::TooLarge(format!(
            "message content must be at most {max_content_bytes} bytes"
        )));
    }
    if let Some(id) = client_message_id
        && (id.is_empty() || id.chars().count() > MAX_CLIENT_MESSAGE_ID_CHARS)
    {
        return Err(AppError::invalid(
            ErrorCode::InvalidMessage,
            format!("clientMessageId must be 1 to {MAX_CLIENT_MESSAGE_ID_CHARS} characters"),
        ));
    }
    Ok(())
}

/// The title a conversation gets from its first message: the start of its first line.
pub fn derive_title(content: &str) -> String {
    let line = content
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or_default();
    if line.chars().count() <= DERIVED_TITLE_CHARS {
        line.to_owned()
    } else {
        let cut: String = line.chars().take(DERIVED_TITLE_CHARS - 1).collect();
        format!("{}…", cut.trim_end())
    }
}

async fn send_message(
    State(state): State<AppState>,
    user: AuthUser,
    IdPath(id): IdPath,
    ApiJson(body): ApiJson<SendMessage>,
) -> Result<Response, AppError> {
    check_message(
        &body.content,
        body.client_message_id.as_deref(),
        state.config.max_content_bytes,
    )?;
    owned_conversation(&state, &user, id).await?;
    let sent = crate::runs::send(&state, &user, id, body.content, body.client_message_id).await?;
    let status = if sent.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(sent.response()?)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_come_from_the_first_line() {
        assert_eq!(derive_title("\n  Hello there  \nsecond"), "Hello there");
        let long = "word ".repeat(30);
        let title = derive_title(&long);
        assert!(title.ends_with('…'));
        assert!(title.chars().count() <= DERIVED_TITLE_CHARS);
    }

    #[test]
    fn pages_keep_one_extra_row_as_the_signal_for_more() {
        let mut rows = vec![1, 2, 3];
        assert_eq!(next_page(&mut rows, 2, |n| n.to_string()), Some("2".into()));
        assert_eq!(rows, vec![1, 2]);
        let mut rows = vec![1, 2];
        assert_eq!(next_page(&mut rows, 2, |n| n.to_string()), None);
    }
}
