//! The one API error type, and the one place that maps errors to HTTP
//! status and OpenAI's error JSON. 5xx bodies are generic; details go to logs.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::backend::ScheduleError;
use crate::validation::ValidationError;
use crate::wire::{ErrorBody, ErrorDetail};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("the model {0:?} does not exist")]
    ModelNotFound(String),
    #[error("the PRM {model:?} is not served")]
    PrmNotFound { model: String, served: Vec<String> },
    #[error("request body over {limit} bytes")]
    BodyTooLarge { limit: usize, got: String },
    #[error("the request body stopped arriving")]
    BodyTimeout { secs: usize },
    #[error("no such route")]
    NoRoute,
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("queue full")]
    QueueFull { retry_after_secs: u64 },
    #[error("model {0:?} is still loading")]
    Loading(String),
    #[error("the server is shutting down")]
    Draining,
    #[error("the server shut down before the request finished")]
    DrainTimeout,
    #[error("model {0:?} is restarting")]
    Restarting(String),
    #[error("model {0:?} failed to load")]
    Failed(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("the model's engine is unreachable: {0}")]
    Unreachable(String),
    #[error("the model's engine failed the request")]
    BadGateway,
    #[error("the model's engine timed out")]
    GatewayTimeout,
}

impl From<crate::backend::UpstreamFailure> for ApiError {
    fn from(f: crate::backend::UpstreamFailure) -> Self {
        match f {
            crate::backend::UpstreamFailure::BadGateway => ApiError::BadGateway,
            crate::backend::UpstreamFailure::Timeout => ApiError::GatewayTimeout,
        }
    }
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
            ApiError::PrmNotFound { model, served } => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model".into()),
                Some("model_not_found"),
                match served.as_slice() {
                    [] => format!("The PRM `{model}` is not served: this server lists no [[prms]]."),
                    ids => format!("The PRM `{model}` is not served; this server's [[prms]] are: {}.", ids.join(", ")),
                },
            ),
            ApiError::BodyTooLarge { limit, got } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                None,
                Some("request_too_large"),
                format!("The request body must be at most {limit} bytes (limits.max_body_bytes), got {got}."),
            ),
            ApiError::BodyTimeout { secs } => (
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                None,
                Some("request_timeout"),
                format!(
                    "The request body stopped arriving: nothing came for {secs} s (limits.body_timeout_secs)."
                ),
            ),
            ApiError::NoRoute => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                None,
                Some("not_found"),
                "No such route; GET /openapi.yaml lists the API.".into(),
            ),
            ApiError::MethodNotAllowed { method, path } => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                None,
                Some("method_not_allowed"),
                format!("{method} is not allowed on {path}; the Allow header lists what is."),
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
            ApiError::Restarting(m) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("model_restarting"),
                format!(
                    "The model `{m}` is restarting after a failure; retry shortly (GET /health says when)."
                ),
            ),
            ApiError::Failed(m) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("model_failed"),
                format!("The model `{m}` failed to load and is not being retried; GET /health says why."),
            ),
            ApiError::Draining => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("shutting_down"),
                "The server is shutting down and accepts no new requests.".into(),
            ),
            ApiError::DrainTimeout => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("shutting_down"),
                "The server shut down before this request finished (server.drain_timeout_secs ran out); retry it."
                    .into(),
            ),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                None,
                "The server failed to complete the request.".into(),
            ),
            ApiError::Unreachable(m) => (
                StatusCode::BAD_GATEWAY,
                "server_error",
                None,
                Some("engine_unreachable"),
                format!("The engine serving `{m}` is unreachable; GET /health says when it is back."),
            ),
            ApiError::BadGateway => (
                StatusCode::BAD_GATEWAY,
                "server_error",
                None,
                Some("engine_error"),
                "The model's engine failed to complete the request.".into(),
            ),
            ApiError::GatewayTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                None,
                Some("engine_timeout"),
                "The model's engine did not answer in time.".into(),
            ),
        }
    }

    /// OpenAI's error object, for bodies and for errors inside a stream.
    pub fn body(&self) -> ErrorBody {
        let (_, kind, param, code, message) = self.parts();
        ErrorBody { error: ErrorDetail { message, kind, param, code } }
    }
}

impl From<ScheduleError> for ApiError {
    fn from(e: ScheduleError) -> Self {
        match e {
            ScheduleError::QueueFull { retry_after_secs } => ApiError::QueueFull { retry_after_secs },
            ScheduleError::Loading(m) => ApiError::Loading(m),
            ScheduleError::Restarting(m) => ApiError::Restarting(m),
            // Why it failed was logged when it did, and /health shows it.
            ScheduleError::Failed { model, .. } => ApiError::Failed(model),
            ScheduleError::Closed => ApiError::Draining,
            ScheduleError::Unreachable { model, .. } => ApiError::Unreachable(model),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "request failed");
        }
        let (status, ..) = self.parts();
        let mut resp = (status, Json(self.body())).into_response();
        match self {
            ApiError::QueueFull { retry_after_secs } => {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            ApiError::Restarting(_) => {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1u64));
            }
            _ => {}
        }
        resp
    }
}
