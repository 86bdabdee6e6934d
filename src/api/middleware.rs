//! Cross-cutting request handling: request ids (the client's `x-request-id`
//! when it sends a valid one), metrics and the one log
//! line per request, and API-key checks. The log line and the
//! `ponder_http_requests_total` entry are recorded when the response body
//! ends, so streams are measured to their last byte; a request whose client
//! left before the response was written in full — its handler dropped
//! while it waited, or its body dropped part-way — is recorded with status
//! 499 (client closed request) and the tokens it did generate.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::ApiError;
use crate::backend::TokenMeter;
use crate::config::PromptLogging;
use crate::metrics::Metrics;

/// The request's id, also sent back as `x-request-id`.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// What a handler learns about a request, for its log line.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub model: Option<String>,
    /// The response's id (`chatcmpl-…`, `cmpl-…`), which the backend's own
    /// log lines name: it ties them to this request's line.
    pub completion_id: Option<String>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub queue_secs: Option<f64>,
    pub ttft_secs: Option<f64>,
    pub prompt: Option<String>,
    pub streamed: bool,
    /// Tokens generated so far, as the backend counts them.
    pub meter: Option<TokenMeter>,
}

/// The status logged for a request whose client left before its response
/// was written (nginx's "client closed request").
pub const CLIENT_CLOSED: u16 = 499;

/// Shared between the handler (or its stream) and the log line.
pub type SummaryCell = Arc<Mutex<Summary>>;

pub fn update(cell: &SummaryCell, f: impl FnOnce(&mut Summary)) {
    f(&mut cell.lock().expect("no panics while holding the summary lock"));
}

struct Finish {
    metrics: Metrics,
    route: String,
    status: u16,
    id: String,
    start: Instant,
    summary: SummaryCell,
    log_prompts: PromptLogging,
    completed: bool,
}

impl Drop for Finish {
    fn drop(&mut self) {
        let secs = self.start.elapsed().as_secs_f64();
        let status = if self.completed { self.status } else { CLIENT_CLOSED };
        self.metrics.http_request(&self.route, status, secs);
        let mut summary = self.summary.lock().map(|s| s.clone()).unwrap_or_default();
        let meter = summary.meter.take();
        // A scheduled request whose answer never reached its client is
        // cancelled, also when the worker had finished it already.
        if status == CLIENT_CLOSED
            && let (Some(m), Some(model)) = (&meter, &summary.model)
            && m.claim_cancel()
        {
            self.metrics.cancelled(model);
        }
        let line = LogLine {
            id: std::mem::take(&mut self.id),
            route: std::mem::take(&mut self.route),
            status,
            sent_status: self.status,
            secs,
            completed: self.completed,
            prompt: match self.log_prompts {
                PromptLogging::On => summary.prompt.take(),
                PromptLogging::Off => None,
            },
            summary,
        };
        // What was generated counts as spent, also when nobody read it: the
        // line waits until the backend has let go of the request (at most
        // one more step after a client left), so its count is final.
        match meter {
            Some(m) => m.when_released(move |tokens| line.emit(tokens)),
            None => line.emit(0),
        }
    }
}

/// The one log line of a request, written once its token count is final.
struct LogLine {
    id: String,
    route: String,
    status: u16,
    sent_status: u16,
    secs: f64,
    completed: bool,
    prompt: Option<String>,
    summary: Summary,
}

impl LogLine {
    fn emit(self, metered: usize) {
        let s = &self.summary;
        tracing::info!(
            target: "ponder::request",
            id = %self.id,
            route = %self.route,
            status = self.status,
            sent_status = self.sent_status,
            model = s.model.as_deref().unwrap_or("-"),
            completion_id = s.completion_id.as_deref(),
            prompt_tokens = s.prompt_tokens,
            completion_tokens = s.completion_tokens.max(metered),
            queue_ms = s.queue_secs.map(|x| (x * 1e3).round()),
            ttft_ms = s.ttft_secs.map(|x| (x * 1e3).round()),
            total_ms = (self.secs * 1e3).round(),
            stream = s.streamed,
            body = if self.completed { "complete" } else { "aborted" },
            prompt = self.prompt.as_deref(),
            "request"
        );
    }
}

/// A response body that reports the request when it ends or is dropped.
struct Tracked {
    inner: Body,
    finish: Option<Finish>,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        // hyper stops polling a body that reports its end, so check both.
        if (matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream())
            && let Some(mut f) = self.finish.take()
        {
            f.completed = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

pub async fn track(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let route =
        req.extensions().get::<MatchedPath>().map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let given = crate::validation::request_id(req.headers().get("x-request-id").map(|h| h.as_bytes()));
    let (id, refused) = match given {
        Ok(Some(id)) => (id, None),
        Ok(None) => (uuid::Uuid::new_v4().simple().to_string(), None),
        Err(e) => (uuid::Uuid::new_v4().simple().to_string(), Some(ApiError::from(e))),
    };
    let summary = SummaryCell::default();
    req.extensions_mut().insert(RequestId(id.clone()));
    req.extensions_mut().insert(summary.clone());
    // Made before the handler runs: if the client leaves while the handler
    // waits (hyper then drops this future), dropping it logs a 499.
    let mut finish = Finish {
        metrics: state.metrics.clone(),
        route,
        status: CLIENT_CLOSED,
        id: id.clone(),
        start: Instant::now(),
        summary,
        log_prompts: state.config.logging.prompts,
        completed: false,
    };
    let mut resp = match refused {
        Some(e) => e.into_response(),
        None => next.run(req).await,
    };
    resp.headers_mut().insert(
        "x-request-id",
        HeaderValue::from_str(&id).expect("a uuid or a checked client id is a valid header value"),
    );
    finish.status = resp.status().as_u16();
    resp.map(|inner| {
        // hyper may never poll a body that is empty from the start.
        finish.completed = http_body::Body::is_end_stream(&inner);
        Body::new(Tracked { inner, finish: Some(finish) })
    })
}

/// Whether `Authorization: Bearer <key>` holds one of the keys, compared in
/// constant time.
fn authorized(keys: &[String], header: Option<&HeaderValue>) -> bool {
    // The scheme is case-insensitive (RFC 7235): `bearer` is `Bearer`.
    let Some(given) = header
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key)
    else {
        return false;
    };
    // Check every key so timing does not reveal which one matched.
    keys.iter().fold(false, |ok, k| ok | bool::from(k.as_bytes().ct_eq(given.trim().as_bytes())))
}

pub async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let keys = &state.config.server.api_keys;
    if keys.is_empty() || authorized(keys, req.headers().get(header::AUTHORIZATION)) {
        next.run(req).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_configured_bearer_key_is_authorized_whatever_the_schemes_case() {
        let keys = vec!["alpha".to_string(), "beta-key".to_string()];
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert!(authorized(&keys, Some(&h("Bearer beta-key"))));
        assert!(authorized(&keys, Some(&h("bearer beta-key"))), "the scheme is case-insensitive");
        assert!(authorized(&keys, Some(&h("BEARER alpha"))));
        assert!(!authorized(&keys, Some(&h("Bearer beta"))));
        assert!(!authorized(&keys, Some(&h("beta-key"))));
        assert!(!authorized(&keys, Some(&h("Basic alpha"))));
        assert!(!authorized(&keys, None));
    }
}
