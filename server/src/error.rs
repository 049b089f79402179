//! The one error type of HTTP handlers. Each variant knows its status; the body is always
//! `{code, message}` and never carries internal details (those are logged).

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use wadi_protocol::{ErrorCode, api::ApiError};

/// An error's JSON body, `{code, message, requestId}`, quoting the current request's id.
pub fn error_body(code: ErrorCode, message: impl Into<String>) -> Json<ApiError> {
    Json(ApiError {
        code,
        message: message.into(),
        request_id: crate::http::request_log::request_id(),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The request is malformed or breaks a rule; nothing was written.
    #[error("{message}")]
    Invalid { code: ErrorCode, message: String },
    /// No valid access token.
    #[error("{message}")]
    Unauthorized { code: ErrorCode, message: String },
    /// Missing, or not the caller's: the two answer identically.
    #[error("not found")]
    NotFound,
    /// The request conflicts with current state (e.g. a run is already streaming).
    #[error("{message}")]
    Conflict { code: ErrorCode, message: String },
    /// The body or a field is over its size limit.
    #[error("{0}")]
    TooLarge(String),
    #[error("too many requests; slow down")]
    RateLimited,
    /// The server is shutting down and starts nothing new.
    #[error("the server is shutting down; try again in a moment")]
    ShuttingDown,
    /// Too busy to start anything more now; retry after the given time.
    #[error("the server is busy; try again in a moment")]
    Overloaded { retry_after: std::time::Duration },
    /// A dependency (database, model) is not available right now.
    #[error("{0}")]
    Unavailable(String),
    /// Anything unexpected. The message goes to the log only.
    #[error("internal error: {0}")]
    Internal(String),
}

impl AppError {
    pub fn invalid(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Invalid {
            code,
            message: message.into(),
        }
    }

    pub fn internal(error: impl std::fmt::Display) -> Self {
        Self::Internal(error.to_string())
    }

    pub fn status_code(&self) -> StatusCode {
        match self {
            Self::Invalid { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) | Self::ShuttingDown | Self::Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid { code, .. }
            | Self::Conflict { code, .. }
            | Self::Unauthorized { code, .. } => *code,
            Self::NotFound => ErrorCode::NotFound,
            Self::TooLarge(_) => ErrorCode::TooLarge,
            Self::RateLimited => ErrorCode::RateLimited,
            Self::ShuttingDown => ErrorCode::ShuttingDown,
            Self::Overloaded { .. } => ErrorCode::Overloaded,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Internal(_) => ErrorCode::InternalError,
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let retry_after = match &self {
            Self::Overloaded { retry_after } => Some(retry_after.as_secs().max(1)),
            _ => None,
        };
        let message = if status.is_server_error()
            && !matches!(self, Self::ShuttingDown | Self::Overloaded { .. })
        {
            tracing::error!(error = %self, "request failed");
            match self {
                Self::Unavailable(_) => {
                    "the server cannot reach its storage right now; nothing was saved, try again \
                     shortly"
                        .to_owned()
                }
                _ => "internal server error".to_owned(),
            }
        } else {
            self.to_string()
        };
        let mut response = (status, error_body(self.code(), message)).into_response();
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(seconds),
            );
        }
        response
    }
}

impl From<crate::store::StoreError> for AppError {
    fn from(error: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match error {
            StoreError::Conflict(_) => Self::Conflict {
                code: ErrorCode::InvalidRequest,
                message: "that already exists".into(),
            },
            // E.g. a partition: `unexpected response from SSLRequest`, a TLS stream cut short.
            error if error.is_unavailable() => Self::Unavailable(error.to_string()),
            other => Self::Internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[test]
    fn a_database_that_cannot_be_reached_is_unavailable_not_an_internal_error() {
        let unreachable = [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            // What a new connection through a partition met (seen in the outage test).
            sqlx::Error::Protocol("unexpected response from SSLRequest: 0x00".into()),
            sqlx::Error::WorkerCrashed,
        ];
        for error in unreachable {
            let shown = error.to_string();
            assert_eq!(
                AppError::from(StoreError::Database(error)).code(),
                ErrorCode::Unavailable,
                "{shown}"
            );
        }
        assert_eq!(
            AppError::from(StoreError::Database(sqlx::Error::RowNotFound)).code(),
            ErrorCode::InternalError
        );
    }
}
