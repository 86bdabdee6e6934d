//! The HTTP surface: OpenAI-compatible routes, auth, errors in OpenAI's
//! JSON, SSE streaming, health, metrics, `/pooling` and the OpenAPI
//! document. Knows nothing of models beyond the [`Backend`]s it hands
//! requests to (local worker pools or remote engines) and the
//! [`ModelPrm`]s it serves on `/pooling`.

mod convert;
mod error;
mod extract;
mod generate;
pub mod middleware;
mod pooling;
mod stream;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};

pub use error::ApiError;

use crate::backend::{Backend, BackendStatus, ModelInfo, ScheduleError};
use crate::config::{Config, MetricsAuth};
use crate::metrics::{Metrics, Rejection};
use crate::prm::model_prm::ModelPrm;
use crate::reasoning::knobs::ReasoningDefaults;
use crate::validation::RequestLimits;
use crate::wire::{ModelCard, ModelList};

/// Every route the server answers, as (method, path). The router is built
/// from this table, and a test checks that `openapi.yaml` documents exactly
/// these.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    // A wildcard: engines' model ids often hold a slash (`Qwen/Qwen2.5-7B`),
    // which OpenAI's clients send as is.
    ("GET", "/v1/models/{*model}"),
    ("POST", "/pooling"),
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/openapi.yaml"),
];

/// The OpenAPI document, served as is.
pub const OPENAPI_YAML: &str = include_str!("../../openapi.yaml");

/// A request's view of [`AppState::abandon_in_flight`].
pub(crate) struct Abandon(tokio::sync::watch::Receiver<bool>);

impl Abandon {
    /// Resolves once the server abandons requests in flight; never, if the
    /// state is gone first (then nothing is left to abandon them).
    pub(crate) async fn signalled(&mut self) {
        if self.0.wait_for(|&a| a).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub metrics: Metrics,
    pub models: Arc<BTreeMap<String, Arc<dyn Backend>>>,
    /// The PRMs served on `/pooling`.
    pub prms: Arc<BTreeMap<String, Arc<ModelPrm>>>,
    draining: Arc<AtomicBool>,
    /// Set once the drain timeout has run out: requests still in flight
    /// answer 503 instead of having their connection cut.
    abandon: Arc<tokio::sync::watch::Sender<bool>>,
    started: u64,
    /// Reasoning defaults for a model the configuration does not list.
    fallback_reasoning: ReasoningDefaults,
}

impl AppState {
    pub fn new(config: Arc<Config>, metrics: Metrics, models: BTreeMap<String, Arc<dyn Backend>>) -> Self {
        Self {
            config,
            metrics,
            models: Arc::new(models),
            prms: Arc::new(BTreeMap::new()),
            draining: Arc::new(AtomicBool::new(false)),
            abandon: Arc::new(tokio::sync::watch::Sender::new(false)),
            started: generate::unix_now(),
            fallback_reasoning: ReasoningDefaults::default(),
        }
    }

    /// Serves these PRMs on `/pooling`.
    pub fn with_prms(mut self, prms: BTreeMap<String, Arc<ModelPrm>>) -> Self {
        self.prms = Arc::new(prms);
        self
    }

    /// New requests get 503 from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The drain timeout ran out: every request still in flight answers 503
    /// (a stream ends with an error event) and lets its job go.
    pub fn abandon_in_flight(&self) {
        self.abandon.send_replace(true);
    }

    /// What a request in flight watches for [`AppState::abandon_in_flight`].
    pub(crate) fn abandon_watch(&self) -> Abandon {
        Abandon(self.abandon.subscribe())
    }

    fn request_limits<'a>(&'a self, model: &'a str) -> RequestLimits<'a> {
        let entry = self.config.models.iter().find(|m| m.id == model);
        RequestLimits {
            limits: &self.config.limits,
            max_sequences: self.config.queue.max_running,
            reasoning: entry.map_or(&self.fallback_reasoning, |e| &e.reasoning),
            has_prm: entry.is_some_and(|e| e.prm.is_some()),
            model,
        }
    }

    /// The backend serving `model`.
    fn backend(&self, model: &str) -> Result<Arc<dyn Backend>, ApiError> {
        self.models.get(model).cloned().ok_or_else(|| ApiError::ModelNotFound(model.to_string()))
    }

    /// What validation needs of `model`, once it can serve. A model that
    /// is restarting or failed is refused before validation; one loading on
    /// some devices, or whose remote engine is down, validates the request
    /// first when it knows its tokenizer, and the backend refuses it then.
    fn model_info(&self, model: &str) -> Result<ModelInfo, ApiError> {
        let backend = self.backend(model)?;
        let (refusal, why) = match (backend.status(), backend.model_info()) {
            (status @ (BackendStatus::Restarting | BackendStatus::Failed(_)), _) => {
                status.refusal(model).expect("a restarting or failed backend refuses requests")
            }
            (_, Some(info)) => return Ok(info),
            // Never ready yet: there is no tokenizer to validate with.
            (_, None) => (ScheduleError::Loading(model.to_string()), Rejection::Loading),
        };
        self.metrics.rejected(model, why);
        Err(refusal.into())
    }
}

async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        // Config order, so that clients taking the first model get the
        // configured default.
        data: state.config.models.iter().filter_map(|m| model_card(&state, &m.id)).collect(),
    })
}

/// `GET /v1/models/{model}` (OpenAI's `models.retrieve`): the card
/// `/v1/models` lists for that id.
async fn retrieve_model(
    State(state): State<AppState>,
    axum::extract::Path(model): axum::extract::Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    model_card(&state, &model).map(Json).ok_or(ApiError::ModelNotFound(model))
}

fn model_card(state: &AppState, id: &str) -> Option<ModelCard> {
    let backend = state.models.get(id)?;
    Some(ModelCard {
        id: id.to_string(),
        object: "model",
        created: state.started,
        owned_by: "ponder",
        max_model_len: backend.model_info().map(|i| i.context_length),
    })
}

async fn health(State(state): State<AppState>) -> Response {
    let models: BTreeMap<&str, String> = state
        .models
        .iter()
        .map(|(id, p)| {
            let s = match p.status() {
                BackendStatus::Loading => "loading".to_string(),
                BackendStatus::Ready => "ready".to_string(),
                BackendStatus::Restarting => "restarting".to_string(),
                BackendStatus::Failed(e) => format!("failed: {e}"),
                BackendStatus::Unreachable(e) => format!("unreachable: {e}"),
            };
            (id.as_str(), s)
        })
        .collect();
    let statuses: Vec<BackendStatus> = state.models.values().map(|p| p.status()).collect();
    let any = |f: fn(&BackendStatus) -> bool| statuses.iter().any(f);
    // The most lasting state first: a failed model stays failed.
    let status = if state.is_draining() {
        "draining"
    } else if statuses.iter().all(|s| *s == BackendStatus::Ready) {
        "ok"
    } else if any(|s| matches!(s, BackendStatus::Failed(_))) {
        "failed"
    } else if any(|s| *s == BackendStatus::Restarting) {
        "restarting"
    } else if any(|s| matches!(s, BackendStatus::Unreachable(_))) {
        "unreachable"
    } else {
        "loading"
    };
    let code = if status == "ok" { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(serde_json::json!({ "status": status, "models": models }))).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let ready = state.models.values().filter(|p| p.status() == BackendStatus::Ready).count();
    state.metrics.set_models_ready(ready);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
        .into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI_YAML).into_response()
}

async fn not_found() -> ApiError {
    ApiError::NoRoute
}

/// A known route asked with another method. (axum adds the `Allow` header
/// to this response.)
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed { method: method.to_string(), path: uri.path().to_string() }
}

fn handler(method: &str, path: &str) -> MethodRouter<AppState> {
    match (method, path) {
        ("POST", "/v1/chat/completions") => post(generate::chat),
        ("POST", "/v1/completions") => post(generate::completions),
        ("GET", "/v1/models") => get(list_models),
        ("GET", "/v1/models/{*model}") => get(retrieve_model),
        ("POST", "/pooling") => post(pooling::pooling),
        ("GET", "/health") => get(health),
        ("GET", "/metrics") => get(metrics),
        ("GET", "/openapi.yaml") => get(openapi),
        _ => unreachable!("ROUTES lists only routes with handlers"),
    }
}

/// Whether a route needs an API key when keys are configured.
fn needs_key(path: &str, metrics_auth: MetricsAuth) -> bool {
    match path {
        "/health" | "/openapi.yaml" => false,
        "/metrics" => metrics_auth == MetricsAuth::Protected,
        _ => true,
    }
}

/// The application, without a socket: tests call it with `oneshot`.
pub fn router(state: AppState) -> Router {
    let mut open = Router::new();
    let mut keyed = Router::new();
    for &(method, path) in ROUTES {
        if needs_key(path, state.config.server.metrics_auth) {
            keyed = keyed.route(path, handler(method, path));
        } else {
            open = open.route(path, handler(method, path));
        }
    }
    let keyed =
        keyed.route_layer(axum::middleware::from_fn_with_state(state.clone(), middleware::require_key));
    let body_timeout = std::time::Duration::from_secs(state.config.limits.body_timeout_secs as u64);
    open.merge(keyed)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), middleware::track))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(body_timeout))
        .with_state(state)
}
