//! The REST API (`/api`), typed with the protocol crate's bodies. Every call returns
//! `Result<T, ApiError>`; the caller decides what to show.

use gloo_net::http::{Request, RequestBuilder, Response};
use serde::{Serialize, de::DeserializeOwned};
use uuid::Uuid;
use wadi_protocol::{
    ErrorCode,
    api::{
        ApiError as ErrorBody, ClientConfig, Conversation, CreateConversation, ModelList, Page,
        PathPage, Run, SearchResults, SendMessage, SentMessage, UpdateConversation,
    },
};

use crate::auth::Auth;

/// Messages per page of history: a conversation opens with its newest page, and older ones load
/// as the user scrolls up.
const PATH_PAGE: u32 = 100;

#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// The session is gone (signed out, or the refresh failed).
    SignedOut,
    /// The server answered with an error.
    Http {
        status: u16,
        code: Option<ErrorCode>,
        message: String,
    },
    /// The request did not get an answer.
    Network(String),
}

impl ApiError {
    /// Words for people.
    pub fn describe(&self) -> String {
        match self {
            Self::SignedOut => "Your session ended. Sign in again.".into(),
            Self::Http {
                code: Some(code),
                message,
                ..
            } => crate::store::chat::human_error(*code, message),
            Self::Http {
                status, message, ..
            } => format!("The server said no ({status}): {message}"),
            Self::Network(_) => "Cannot reach the server. Check your connection and retry.".into(),
        }
    }
}

/// `GET /api/config` (no session needed).
pub async fn config() -> Result<ClientConfig, ApiError> {
    let response = Request::get("/api/config")
        .send()
        .await
        .map_err(|e| ApiError::Network(e.to_string()))?;
    decode(response).await
}

async fn decode<T: DeserializeOwned>(response: Response) -> Result<T, ApiError> {
    let status = response.status();
    if (200..300).contains(&status) {
        return response
            .json()
            .await
            .map_err(|e| ApiError::Network(format!("unreadable answer: {e}")));
    }
    Err(error_of(response).await)
}

async fn error_of(response: Response) -> ApiError {
    let status = response.status();
    match response.json::<ErrorBody>().await {
        Ok(body) => ApiError::Http {
            status,
            code: Some(body.code),
            message: body.message,
        },
        Err(_) => ApiError::Http {
            status,
            code: None,
            message: response.status_text(),
        },
    }
}

/// An authenticated client for `/api`.
#[derive(Clone)]
pub struct Api {
    pub auth: Auth,
}

impl Api {
    async fn authorized(&self, builder: RequestBuilder) -> Result<RequestBuilder, ApiError> {
        let token = self
            .auth
            .valid_token()
            .await
            .map_err(|_| ApiError::SignedOut)?;
        Ok(builder.header("Authorization", &format!("Bearer {token}")))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let request = self.authorized(Request::get(path)).await?;
        let response = request
            .send()
            .await
            .map_err(|e| ApiError::Network(e.to_string()))?;
        self.check_session(&response);
        decode(response).await
    }

    async fn send_json<B: Serialize, T: DeserializeOwned>(
        &self,
        builder: RequestBuilder,
        body: &B,
    ) -> Result<T, ApiError> {
        let request = self
            .authorized(builder)
            .await?
            .json(body)
            .map_err(|e| ApiError::Network(e.to_string()))?;
        let response = request
            .send()
            .await
            .map_err(|e| ApiError::Network(e.to_string()))?;
        self.check_session(&response);
        decode(response).await
    }

    /// A 401 means the token was refused although we thought it valid: the session is dead.
    fn check_session(&self, response: &Response) {
        if response.status() == 401 {
            self.auth.expire();
        }
    }

    pub async fn conversations(
        &self,
        cursor: Option<&str>,
    ) -> Result<Page<Conversation>, ApiError> {
        let path = match cursor {
            Some(cursor) => format!("/api/conversations?limit=30&cursor={cursor}"),
            None => "/api/conversations?limit=30".to_owned(),
        };
        self.get(&path).await
    }

    pub async fn create_conversation(&self) -> Result<Conversation, ApiError> {
        self.send_json(
            Request::post("/api/conversations"),
            &CreateConversation::default(),
        )
        .await
    }

    pub async fn rename(&self, id: Uuid, title: String) -> Result<Conversation, ApiError> {
        self.send_json(
            Request::patch(&format!("/api/conversations/{id}")),
            &UpdateConversation {
                title: Some(title),
                ..UpdateConversation::default()
            },
        )
        .await
    }

    /// Changes a conversation's model and/or system prompt (`""`: back to the default).
    pub async fn update(
        &self,
        id: Uuid,
        update: UpdateConversation,
    ) -> Result<Conversation, ApiError> {
        self.send_json(Request::patch(&format!("/api/conversations/{id}")), &update)
            .await
    }

    /// Full-text search over the user's titles and messages (`cursor`: the next page).
    pub async fn search(
        &self,
        query: &str,
        cursor: Option<&str>,
    ) -> Result<SearchResults, ApiError> {
        let mut path = format!(
            "/api/search?limit=20&q={}",
            String::from(js_sys::encode_uri_component(query))
        );
        if let Some(cursor) = cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        self.get(&path).await
    }

    /// The models a conversation may use.
    pub async fn models(&self) -> Result<ModelList, ApiError> {
        self.get("/api/models").await
    }

    pub async fn delete(&self, id: Uuid) -> Result<(), ApiError> {
        let request = self
            .authorized(Request::delete(&format!("/api/conversations/{id}")))
            .await?;
        let response = request
            .send()
            .await
            .map_err(|e| ApiError::Network(e.to_string()))?;
        if response.ok() {
            Ok(())
        } else {
            Err(error_of(response).await)
        }
    }

    pub async fn conversation(&self, id: Uuid) -> Result<Conversation, ApiError> {
        self.get(&format!("/api/conversations/{id}")).await
    }

    /// One page of the branch shown, oldest first: the newest messages of the path through
    /// `through` (the newest message without it), or with `cursor` the page before it. Its
    /// `older_cursor` asks for the page before that.
    pub async fn path_page(
        &self,
        id: Uuid,
        through: Option<Uuid>,
        cursor: Option<&str>,
    ) -> Result<PathPage, ApiError> {
        let mut path = format!("/api/conversations/{id}/path?limit={PATH_PAGE}");
        match (cursor, through) {
            (Some(cursor), _) => path.push_str(&format!("&cursor={cursor}")),
            (None, Some(through)) => path.push_str(&format!("&through={through}")),
            (None, None) => {}
        }
        self.get(&path).await
    }

    /// The REST fallback for sending when the socket cannot connect.
    pub async fn send_message(
        &self,
        id: Uuid,
        message: SendMessage,
    ) -> Result<SentMessage, ApiError> {
        self.send_json(
            Request::post(&format!("/api/conversations/{id}/messages")),
            &message,
        )
        .await
    }

    /// The conversation as a file (`markdown`: the branch through `through`; `json`: every
    /// branch): its name and text.
    pub async fn export(
        &self,
        id: Uuid,
        format: &str,
        through: Option<Uuid>,
    ) -> Result<(String, String), ApiError> {
        let mut path = format!("/api/conversations/{id}/export?format={format}");
        if let Some(through) = through {
            path.push_str(&format!("&through={through}"));
        }
        let request = self.authorized(Request::get(&path)).await?;
        let response = request
            .send()
            .await
            .map_err(|e| ApiError::Network(e.to_string()))?;
        self.check_session(&response);
        if !(200..300).contains(&response.status()) {
            return Err(error_of(response).await);
        }
        let name = response
            .headers()
            .get("content-disposition")
            .and_then(|value| {
                value
                    .split("filename=\"")
                    .nth(1)
                    .and_then(|rest| rest.split('"').next())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| format!("conversation.{format}"));
        let text = response
            .text()
            .await
            .map_err(|e| ApiError::Network(format!("unreadable answer: {e}")))?;
        Ok((name, text))
    }

    /// The REST fallback for `regenerate`.
    pub async fn regenerate(&self, id: Uuid, message_id: Uuid) -> Result<SentMessage, ApiError> {
        self.send_json(
            Request::post(&format!(
                "/api/conversations/{id}/messages/{message_id}/regenerate"
            )),
            &serde_json::json!({}),
        )
        .await
    }

    pub async fn stop_run(&self, run_id: Uuid) -> Result<Run, ApiError> {
        self.send_json(
            Request::post(&format!("/api/runs/{run_id}/stop")),
            &serde_json::json!({}),
        )
        .await
    }
}
