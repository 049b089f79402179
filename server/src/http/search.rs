//! `GET /api/search?q=&cursor=&limit=`: full-text search over the caller's conversation titles
//! and messages (SQLite FTS5, Postgres `tsvector`; see the `0008_search` migrations).

use axum::{Json, Router, extract::State, routing::get};
use wadi_protocol::{
    ErrorCode,
    api::{ConversationHit, Highlight, MessageHit, SearchResults},
};

use super::extract::{ApiQuery, PageQuery, decode_cursor, encode_cursor};
use crate::{
    auth::AuthUser,
    dto::UNTITLED,
    error::AppError,
    state::AppState,
    store::{HIT_END, HIT_START},
    util::datetime,
};

/// Longest query accepted, in characters, and most words used.
const MAX_QUERY_CHARS: usize = 256;
const MAX_WORDS: usize = 8;
/// Title matches shown above the messages.
const TITLE_HITS: u32 = 5;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/search", get(search))
}

#[derive(serde::Deserialize)]
struct SearchQuery {
    q: Option<String>,
}

async fn search(
    State(state): State<AppState>,
    user: AuthUser,
    page: PageQuery,
    ApiQuery(query): ApiQuery<SearchQuery>,
) -> Result<Json<SearchResults>, AppError> {
    let text = query.q.unwrap_or_default();
    if text.chars().count() > MAX_QUERY_CHARS {
        return Err(AppError::TooLarge(format!(
            "a search is at most {MAX_QUERY_CHARS} characters"
        )));
    }
    let words = words(&text);
    if words.len() > MAX_WORDS {
        return Err(AppError::TooLarge(format!(
            "a search is at most {MAX_WORDS} words"
        )));
    }
    if words.is_empty() {
        return Err(AppError::invalid(
            ErrorCode::InvalidRequest,
            "type a word to search for (q=)",
        ));
    }
    let offset = match page.cursor.as_deref() {
        Some(cursor) => decode_cursor("s", cursor)?
            .parse::<u32>()
            .map_err(|_| AppError::invalid(ErrorCode::InvalidRequest, "invalid cursor"))?,
        None => 0,
    };
    let conversations = if offset == 0 {
        state
            .store
            .search_titles(user.id, &words, TITLE_HITS)
            .await?
            .into_iter()
            .map(|row| ConversationHit {
                conversation_id: row.conversation_id.into(),
                title: highlights(&row.snippet, &words),
                updated_at: datetime(row.updated_at),
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut rows = state
        .store
        .search_messages(user.id, &words, page.limit + 1, offset)
        .await?;
    let next_cursor = (rows.len() > usize::try_from(page.limit).unwrap_or(usize::MAX)).then(|| {
        rows.truncate(usize::try_from(page.limit).unwrap_or(usize::MAX));
        encode_cursor("s", &(offset + page.limit).to_string())
    });
    let messages = rows
        .into_iter()
        .map(|row| MessageHit {
            conversation_id: row.conversation_id.into(),
            conversation_title: row.title.unwrap_or_else(|| UNTITLED.to_owned()),
            message_id: row.message_id.into(),
            role: row.role,
            snippet: highlights(&row.snippet, &words),
            created_at: datetime(row.created_at),
        })
        .collect();
    Ok(Json(SearchResults {
        conversations,
        messages,
        next_cursor,
    }))
}

/// The words of a query: runs of letters and digits, lowercased (64 characters each at most).
/// Nothing else reaches the database's query syntax.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(|word| word.chars().take(64).collect::<String>().to_lowercase())
        .collect()
}

/// A snippet marked with [`HIT_START`] and [`HIT_END`], as pieces. A piece is a hit only if it
/// starts like one of the query's `words` (its first three characters, or the whole word if
/// shorter: stemming may match `running` for `runs`): the markers are characters a message
/// may hold itself, and such a message must not make any text of its own look found.
pub fn highlights(snippet: &str, words: &[String]) -> Vec<Highlight> {
    let mut pieces: Vec<Highlight> = Vec::new();
    let mut push = |text: String, hit: bool| {
        let hit = hit && looks_found(&text, words);
        match pieces.last_mut() {
            Some(last) if last.hit == hit && !hit => last.text.push_str(&text),
            _ => pieces.push(Highlight { text, hit }),
        }
    };
    let mut text = String::new();
    let mut hit = false;
    for c in snippet.chars() {
        let boundary = (c == HIT_START && !hit) || (c == HIT_END && hit);
        if boundary {
            if !text.is_empty() {
                push(std::mem::take(&mut text), hit);
            }
            hit = !hit;
        } else if c != HIT_START && c != HIT_END {
            text.push(c);
        }
    }
    if !text.is_empty() {
        push(text, hit);
    }
    pieces
}

/// Whether `text` begins like one of `words` (lowercase).
fn looks_found(text: &str, words: &[String]) -> bool {
    let text = text.trim().to_lowercase();
    words.iter().any(|word| {
        let start: String = word.chars().take(3).collect();
        !start.is_empty() && text.starts_with(&start)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_become_plain_words() {
        assert_eq!(words("  Café, \"DROP\" -- x*  "), ["café", "drop", "x"]);
        assert_eq!(words("NEAR(a b) OR c:*"), ["near", "a", "b", "or", "c"]);
        assert!(words("*** ---").is_empty());
        assert_eq!(
            words(&"w ".repeat(20)).len(),
            20,
            "all counted: more is refused"
        );
    }

    /// Checks the pieces of `snippet` for a search of `words`, as (text, hit).
    fn assert_marked(snippet: &str, words: &[&str], expected: &[(&str, bool)]) {
        let words: Vec<String> = words.iter().map(|w| (*w).to_owned()).collect();
        let pieces = highlights(snippet, &words);
        let shown: Vec<(&str, bool)> = pieces.iter().map(|p| (p.text.as_str(), p.hit)).collect();
        assert_eq!(shown, expected, "{snippet:?}");
    }

    #[test]
    fn snippets_split_into_marked_pieces() {
        assert_marked(
            "…the \u{E000}quick\u{E001} brown \u{E000}fox\u{E001}",
            &["quick", "fox"],
            &[
                ("…the ", false),
                ("quick", true),
                (" brown ", false),
                ("fox", true),
            ],
        );
        // Stray markers never reach the text.
        assert_marked("a\u{E001}b", &["a"], &[("ab", false)]);
        // Markers a message holds itself make nothing look found that was not searched for;
        // a stemmed match still is.
        assert_marked(
            "\u{E000}before\u{E000}pink\u{E001}after and \u{E000}tail\u{E001} \u{E000}Running\u{E001}",
            &["before", "runs"],
            &[
                ("beforepink", true),
                ("after and tail ", false),
                ("Running", true),
            ],
        );
    }
}
