//! `POST /pooling` in vLLM's wire format, for the separate PRMs a server
//! lists under `[[prms]]`: `[p_bad, p_good]` at each `<extra_0>` step tag of
//! each input, so that another ponder (a `prm = { remote = … }` model) can
//! score with a PRM running here.

use axum::Json;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use super::extract::JsonBody;
use super::middleware::{SummaryCell, update};
use crate::prm::PrmError;
use crate::validation::{self, ValidationError};
use crate::wire::{PoolingItem, PoolingRequest, PoolingResponse, PoolingUsage};

pub async fn pooling(
    State(state): State<AppState>,
    Extension(summary): Extension<SummaryCell>,
    JsonBody(req): JsonBody<PoolingRequest>,
) -> Result<Response, ApiError> {
    update(&summary, |s| s.model = Some(req.model.clone()));
    let prm = state.prms.get(&req.model).cloned().ok_or_else(|| ApiError::PrmNotFound {
        model: req.model.clone(),
        served: state.config.prms.iter().map(|p| p.id.clone()).collect(),
    })?;
    let valid = validation::pooling(req, prm.tokenizer(), prm.context_length(), &state.config.limits)?;
    let prompt_tokens: usize = valid.inputs.iter().map(Vec::len).sum();
    update(&summary, |s| s.prompt_tokens = prompt_tokens);
    let inputs = valid.inputs;
    // A forward pass per input: off the async threads.
    let scored = tokio::task::spawn_blocking(move || {
        inputs.iter().map(|ids| prm.step_probabilities(ids)).collect::<Vec<_>>()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("pooling task: {e}")))?;
    let mut data = Vec::with_capacity(scored.len());
    for (index, s) in scored.into_iter().enumerate() {
        let probs = match s {
            Ok(p) => p,
            Err(PrmError::NoStepToken) => {
                return Err(ValidationError {
                    param: Some(format!("input[{index}]")),
                    message: format!(
                        "input {index} holds no {} step tag: nothing to score",
                        crate::prm::model_prm::STEP_TOKEN
                    ),
                    code: None,
                }
                .into());
            }
            Err(e) => return Err(ApiError::Internal(format!("PRM {}: {e}", valid.model))),
        };
        data.push(PoolingItem {
            index,
            object: "pooling",
            data: probs.iter().map(|&p| [1.0 - p, p]).collect(),
        });
    }
    let body = PoolingResponse {
        id: format!("pool-{}", uuid::Uuid::new_v4().simple()),
        object: "list",
        created: super::generate::unix_now(),
        model: valid.model,
        data,
        usage: PoolingUsage { prompt_tokens, total_tokens: prompt_tokens },
    };
    Ok(Json(body).into_response())
}
