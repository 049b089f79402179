//! Extractors that turn every kind of bad input into a JSON `{code, message}` error instead of
//! axum's plain-text rejections.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Path, Query, Request},
    http::{StatusCode, request::Parts},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, de::DeserializeOwned};
use uuid::Uuid;
use wadi_protocol::ErrorCode;

use crate::error::AppError;

/// A JSON body: `invalid_json` for bad syntax, `invalid_message` for a missing or mistyped
/// field or a body that is not an object, `too_large` (413) past the body limit. Unknown
/// fields are ignored; an empty body is `{}`.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = AppError;

    async fn from_request(request: Request, state: &S) -> Result<Self, AppError> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    AppError::TooLarge("the request body is too large".into())
                } else {
                    AppError::invalid(ErrorCode::InvalidJson, rejection.body_text())
                }
            })?;
        // Checked as a whole: serde checks only the strings it keeps, and a field it skips
        // may hold anything.
        if std::str::from_utf8(&bytes).is_err() {
            return Err(AppError::invalid(
                ErrorCode::InvalidUtf8,
                "the request body is not UTF-8",
            ));
        }
        let bytes = match bytes.iter().find(|byte| !byte.is_ascii_whitespace()) {
            // An empty body is an object without fields (creating a conversation needs none).
            None => Bytes::from_static(b"{}"),
            Some(b'{') => bytes,
            // Every body is an object: serde would also take an array of the fields in order.
            Some(_) if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok() => {
                return Err(AppError::invalid(
                    ErrorCode::InvalidMessage,
                    "invalid request body: expected a JSON object",
                ));
            }
            Some(_) => bytes,
        };
        serde_json::from_slice(&bytes).map(Self).map_err(|error| {
            use serde_json::error::Category;
            let code = match error.classify() {
                Category::Data => ErrorCode::InvalidMessage,
                Category::Syntax | Category::Eof | Category::Io => ErrorCode::InvalidJson,
            };
            AppError::invalid(code, format!("invalid request body: {error}"))
        })
    }
}

/// A UUID path segment (`{id}`) as a typed id: `invalid_request` if it is not one.
pub struct IdPath<T>(pub T);

impl<S: Send + Sync, T: From<Uuid>> FromRequestParts<S> for IdPath<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| AppError::invalid(ErrorCode::InvalidRequest, "missing id"))?;
        Uuid::parse_str(&raw)
            .map(|id| Self(T::from(id)))
            .map_err(|_| {
                AppError::invalid(ErrorCode::InvalidRequest, format!("{raw:?} is not an id"))
            })
    }
}

/// Two UUID path segments (`{id}/…/{message_id}`) as typed ids.
pub struct IdsPath<A, B>(pub A, pub B);

impl<S: Send + Sync, A: From<Uuid>, B: From<Uuid>> FromRequestParts<S> for IdsPath<A, B> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        let Path((first, second)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(|_| AppError::invalid(ErrorCode::InvalidRequest, "missing id"))?;
        let parse = |raw: &str| {
            Uuid::parse_str(raw).map_err(|_| {
                AppError::invalid(ErrorCode::InvalidRequest, format!("{raw:?} is not an id"))
            })
        };
        Ok(Self(A::from(parse(&first)?), B::from(parse(&second)?)))
    }
}

/// A query string: `invalid_request` if it does not parse (a repeated key, a mistyped value).
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        let Query(query) = Query::<T>::from_request_parts(parts, state)
            .await
            .map_err(|e| AppError::invalid(ErrorCode::InvalidRequest, e.body_text()))?;
        Ok(Self(query))
    }
}

/// `?cursor=…&limit=…` of a paginated list.
pub struct PageQuery {
    pub cursor: Option<String>,
    pub limit: u32,
}

pub const DEFAULT_PAGE: u32 = 50;
pub const MAX_PAGE: u32 = 100;

impl<S: Send + Sync> FromRequestParts<S> for PageQuery {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        #[derive(Deserialize)]
        struct Raw {
            cursor: Option<String>,
            limit: Option<String>,
        }
        let ApiQuery(raw) = ApiQuery::<Raw>::from_request_parts(parts, state).await?;
        let limit = match raw.limit {
            None => DEFAULT_PAGE,
            Some(text) => match text.parse::<u32>() {
                Ok(limit @ 1..=MAX_PAGE) => limit,
                _ => {
                    return Err(AppError::invalid(
                        ErrorCode::InvalidRequest,
                        format!("limit must be a number from 1 to {MAX_PAGE}"),
                    ));
                }
            },
        };
        Ok(Self {
            cursor: raw.cursor.filter(|cursor| !cursor.is_empty()),
            limit,
        })
    }
}

/// Opaque cursors: base64url of `kind:fields`, so a cursor from one list is refused by another.
pub fn encode_cursor(kind: &str, fields: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{kind}:{fields}"))
}

/// The fields of a cursor of `kind`, or `invalid_request`.
pub fn decode_cursor(kind: &str, cursor: &str) -> Result<String, AppError> {
    let bad = || AppError::invalid(ErrorCode::InvalidRequest, "invalid cursor");
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let fields = text
        .strip_prefix(kind)
        .and_then(|rest| rest.strip_prefix(':'))
        .ok_or_else(bad)?;
    Ok(fields.to_owned())
}

/// The `Content-Length` a request declares, if any.
pub fn declared_length(request: &Request) -> Option<usize> {
    request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Middleware: a request whose declared `Content-Length` is over `limit` is answered `413
/// too_large` at once, before its body is read. (Bodies without a length are cut off at the limit
/// by the body extractors.)
pub async fn reject_declared_oversized(
    axum::extract::State(limit): axum::extract::State<usize>,
    request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if declared_length(&request).is_some_and(|length| length > limit) {
        return AppError::TooLarge("the request body is too large".into()).into_response();
    }
    next.run(request).await
}
