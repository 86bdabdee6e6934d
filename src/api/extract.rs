//! A JSON body extractor whose every failure is an OpenAI-style 400 naming
//! the field (by its path) and what was wrong, a 413 for a body over
//! `limits.max_body_bytes`, or a 408 for one that stops arriving.

use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use super::AppState;
use super::error::ApiError;
use crate::validation::ValidationError;

pub struct JsonBody<T>(pub T);

/// Whether `T` is `e` or anywhere in its chain of sources (a body's error
/// comes wrapped by each layer it passed through).
fn caused_by<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |e| e.source()).any(|e| e.is::<T>())
}

fn invalid(param: Option<String>, message: String) -> ApiError {
    ApiError::Invalid(ValidationError { param, message, code: None })
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let limit = state.config.limits.max_body_bytes;
        let declared = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let too_big = |got: String| ApiError::BodyTooLarge { limit, got };
        if let Some(n) = declared.filter(|&n| n > limit) {
            return Err(too_big(format!("{n} bytes")));
        }
        let bytes = axum::body::to_bytes(req.into_body(), limit).await.map_err(|e| {
            // Only the limit is the client's size; anything else is a body
            // that broke off (a client that left, a malformed chunk).
            let e = e.into_inner();
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                too_big(format!("more than {limit} bytes"))
            } else if caused_by::<tower_http::timeout::TimeoutError>(&*e) {
                ApiError::BodyTimeout { secs: state.config.limits.body_timeout_secs }
            } else {
                invalid(None, format!("the request body could not be read in full: {e}"))
            }
        })?;
        // serde's derived structs also read an array of their fields in order.
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first.is_some_and(|&b| b != b'{') && serde_json::from_slice::<serde_json::Value>(&bytes).is_ok() {
            return Err(invalid(None, "request body must be a JSON object".to_string()));
        }
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        match serde_path_to_error::deserialize(de) {
            Ok(v) => Ok(JsonBody(v)),
            Err(e) => {
                let e = match e.inner().classify() {
                    // serde_json reports an enum given a number or `true` as
                    // a syntax error ("expected value"); read from a parsed
                    // value instead, the same mistake is a type error at
                    // its field.
                    serde_json::error::Category::Syntax => {
                        match serde_json::from_slice::<serde_json::Value>(&bytes) {
                            // Only a better message: a body the first parse refused
                            // (a duplicate key, say) is never served from here.
                            Ok(value) => serde_path_to_error::deserialize::<_, T>(value).err().unwrap_or(e),
                            Err(_) => e,
                        }
                    }
                    _ => e,
                };
                let path = e.path().to_string();
                let inner = e.into_inner();
                let text = inner.to_string();
                // serde reports a missing field at its parent's path.
                let missing = text.strip_prefix("missing field `").and_then(|r| r.split('`').next());
                let param = match missing {
                    Some(field) if path == "." => Some(field.to_string()),
                    Some(field) => Some(format!("{path}.{field}")),
                    None => (path != "." && !inner.is_syntax() && !inner.is_eof()).then_some(path),
                };
                let message = match inner.classify() {
                    serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                        format!("request body is not valid JSON: {inner}")
                    }
                    _ => match &param {
                        Some(p) => format!("{p}: {inner}"),
                        None => format!("request body: {inner}"),
                    },
                };
                Err(invalid(param, message))
            }
        }
    }
}
