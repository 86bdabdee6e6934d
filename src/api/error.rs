//! The one API error type, and the one place that maps errors to HTTP
//! status and OpenAI's error JSON. 5xx bodies are generic; details go to logs.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::validation::ValidationError;
use crate::wire::{ErrorBody, ErrorDetail};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("the model {0:?} does not exist")]
    ModelNotFound(String),
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("queue full")]
    QueueFull { retry_after_secs: u64 },
    #[error("model {0:?} is still loading")]
    Loading(String),
    #[error("the server is shutting down")]
    Draining,
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, Option<String>, Option<&'static str>, String) {
        match self {
            ApiError::Invalid(e) => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", e.param.clone(), e.code, e.message.clone())
            }
            ApiError::ModelNotFound(m) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model".into()),
                Some("model_not_found"),
                format!("The model `{m}` does not exist; GET /v1/models lists the served models."),
            ),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
                "Missing or invalid API key: send `Authorization: Bearer <key>`.".into(),
            ),
            ApiError::QueueFull { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                None,
                Some("queue_full"),
                "The server's queue is full; retry after the time in Retry-After.".into(),
            ),
            ApiError::Loading(m) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("model_loading"),
                format!("The model `{m}` is still loading; GET /health answers 200 once it is ready."),
            ),
            ApiError::Draining => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("shutting_down"),
                "The server is shutting down and accepts no new requests.".into(),
            ),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                None,
                "The server failed to complete the request.".into(),
            ),
        }
    }

    /// OpenAI's error object, for bodies and for errors inside a stream.
    pub fn body(&self) -> ErrorBody {
        let (_, kind, param, code, message) = self.parts();
        ErrorBody { error: ErrorDetail { message, kind, param, code } }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "request failed");
        }
        let (status, ..) = self.parts();
        let mut resp = (status, Json(self.body())).into_response();
        if let ApiError::QueueFull { retry_after_secs } = self {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        resp
    }
}
