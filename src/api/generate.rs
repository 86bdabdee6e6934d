//! `POST /v1/chat/completions` and `POST /v1/completions`: validate, admit,
//! hand the job to a worker, then answer with one JSON body or an SSE stream.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::AppState;
use super::convert::{chat_logprobs, completion_logprobs, ponder_info, usage};
use super::error::ApiError;
use super::extract::JsonBody;
use super::middleware::{SummaryCell, update};
use super::stream::{self, StreamCtx};
use crate::backend::{
    Delivery, EventStream, GenEvent, JobStats, ReasoningReport, Scheduled, TokenMeter, TokenOut,
};
use crate::engine::FinishReason;
use crate::metrics::Rejection;
use crate::validation::{self, Endpoint, Streaming, ValidRequest};
use crate::wire::{
    ChatChoice, ChatCompletion, ChatCompletionRequest, ChatMessageOut, Completion, CompletionChoice,
    CompletionRequest, PonderField, PonderInfo,
};

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub async fn chat(
    State(state): State<AppState>,
    Extension(summary): Extension<SummaryCell>,
    JsonBody(req): JsonBody<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    update(&summary, |s| s.model = Some(req.model.clone()));
    let info = state.model_info(&req.model)?;
    let model = req.model.clone();
    let valid = validation::chat(req, info.view(), state.request_limits(&model))?;
    run(state, valid, received, summary).await
}

pub async fn completions(
    State(state): State<AppState>,
    Extension(summary): Extension<SummaryCell>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    update(&summary, |s| s.model = Some(req.model.clone()));
    let info = state.model_info(&req.model)?;
    let model = req.model.clone();
    let valid = validation::completion(req, info.view(), state.request_limits(&model))?;
    run(state, valid, received, summary).await
}

async fn run(
    state: AppState,
    valid: ValidRequest,
    received: Instant,
    summary: SummaryCell,
) -> Result<Response, ApiError> {
    let backend = state.backend(&valid.model)?;
    if state.is_draining() {
        state.metrics.rejected(&valid.model, Rejection::Draining);
        return Err(ApiError::Draining);
    }
    let prefix = match valid.endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completion => "cmpl",
    };
    let id = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
    let meter = TokenMeter::default();
    update(&summary, |s| {
        s.completion_id = Some(id.clone());
        s.meter = Some(meter.clone());
        s.prompt_tokens = valid.generation.prompts.iter().map(Vec::len).sum();
    });
    let delivery = match valid.streaming {
        Streaming::On(_) => Delivery::Streamed,
        Streaming::Off => Delivery::Whole,
    };
    let scheduled =
        Scheduled { id: id.clone(), generation: valid.generation.clone(), received, meter, delivery };
    let mut events = backend.schedule(scheduled)?;
    update(&summary, |s| {
        s.prompt = Some(valid.prompt_text.clone());
        s.streamed = matches!(valid.streaming, Streaming::On(_));
    });
    let ctx = StreamCtx { id, created: unix_now(), valid, summary, abandon: state.abandon_watch() };
    match ctx.valid.streaming {
        Streaming::On(usage) => {
            // A request that fails before its first event (a remote
            // engine's 502/504, a worker that could not start it or went
            // away) gets the status a non-streamed one gets rather than a
            // 200 stream holding an error; the wait is short so keep-alives
            // still start in time.
            if let Ok(first) = tokio::time::timeout(FIRST_EVENT_WAIT, events.next()).await {
                match first {
                    Some(GenEvent::Upstream(f)) => return Err(f.into()),
                    Some(GenEvent::Failed) | None => {
                        return Err(ApiError::Internal(format!("worker failed request {}", ctx.id)));
                    }
                    Some(e) => events.put_back(e),
                }
            }
            Ok(stream::sse(ctx, usage, events))
        }
        Streaming::Off => collect(ctx, events).await,
    }
}

/// How long a stream waits for its first event before sending its head.
const FIRST_EVENT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Everything the worker sent for one request.
pub(crate) struct Collected {
    pub texts: Vec<String>,
    pub tokens: Vec<Vec<TokenOut>>,
    pub finish: Vec<Option<FinishReason>>,
    pub stats: JobStats,
    pub reasoning: Option<Box<ReasoningReport>>,
}

/// `x-ponder-*` headers with the same figures as the `ponder` object.
fn ponder_headers(p: &PonderInfo) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("x-ponder-strategy", p.strategy.name().to_string()),
        ("x-ponder-adaptive", p.adaptive.to_string()),
        ("x-ponder-stop-reason", p.stop_reason.name().to_string()),
        ("x-ponder-samples", p.samples.to_string()),
        ("x-ponder-fixed-samples", p.fixed_samples.to_string()),
        ("x-ponder-tokens-generated", p.tokens_generated.to_string()),
        ("x-ponder-fixed-tokens-estimate", p.fixed_tokens_estimate.to_string()),
        ("x-ponder-tokens-saved", p.tokens_saved.to_string()),
        ("x-ponder-prm-evaluations", p.prm_evaluations.to_string()),
        ("x-ponder-steps", p.steps.to_string()),
    ];
    let q = |q: crate::prm::Quantiles| format!("{:.4},{:.4},{:.4}", q.q10, q.q50, q.q90);
    if let Some(r) = p.budget_rule {
        h.push(("x-ponder-budget-rule", r.name().to_string()));
    }
    if let Some(s) = p.success_probability_start {
        h.push(("x-ponder-success-probability-start", q(s)));
    }
    if let Some(s) = p.success_probability_selected {
        h.push(("x-ponder-success-probability-selected", q(s)));
    }
    h
}

async fn collect(mut ctx: StreamCtx, mut events: EventStream) -> Result<Response, ApiError> {
    let choices = ctx.valid.generation.choices();
    let mut texts = vec![String::new(); choices];
    let mut tokens = vec![Vec::new(); choices];
    let mut finish = vec![None; choices];
    let mut reasoning = None;
    let stats = loop {
        let event = tokio::select! {
            e = events.next() => e,
            () = ctx.abandon.signalled() => {
                tracing::warn!(request = %ctx.id, "drain timeout: a request ended unfinished");
                return Err(ApiError::DrainTimeout);
            }
        };
        match event {
            Some(GenEvent::Progress(_)) => {}
            Some(GenEvent::Reasoning(r)) => reasoning = Some(r),
            Some(GenEvent::Delta { choice, text, tokens: t }) => {
                texts[choice].push_str(&text);
                tokens[choice].extend(t);
            }
            Some(GenEvent::Finished { choice, reason }) => finish[choice] = Some(reason),
            Some(GenEvent::Done(stats)) => break stats,
            Some(GenEvent::Failed) | None => {
                return Err(ApiError::Internal(format!("worker failed request {}", ctx.id)));
            }
            Some(GenEvent::Upstream(f)) => return Err(f.into()),
        }
    };
    update(&ctx.summary, |s| {
        s.prompt_tokens = stats.prompt_tokens;
        s.completion_tokens = stats.completion_tokens;
        s.queue_secs = Some(stats.queue_secs);
        s.ttft_secs = stats.ttft_secs;
    });
    if reasoning.is_some() {
        // One choice per distinct answer found, at most `n`; the others never started.
        let answered = finish.iter().take_while(|f| f.is_some()).count();
        texts.truncate(answered);
        tokens.truncate(answered);
        finish.truncate(answered);
    }
    let info = reasoning.as_deref().map(ponder_info);
    let c = Collected { texts, tokens, finish, stats, reasoning };
    // Serialised straight from the wire types, as stream chunks are, so
    // numbers print the same in both.
    let mut resp = match ctx.valid.endpoint {
        Endpoint::Chat => Json(chat_body(&ctx, c)).into_response(),
        Endpoint::Completion => Json(completion_body(&ctx, c)).into_response(),
    };
    let headers: Vec<(&'static str, String)> = info.as_ref().map(ponder_headers).unwrap_or_default();
    for (name, value) in headers {
        if let Ok(v) = axum::http::HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
    Ok(resp)
}

fn chat_body(ctx: &StreamCtx, c: Collected) -> ChatCompletion {
    let want_logprobs = ctx.valid.generation.logprobs.is_some();
    ChatCompletion {
        id: ctx.id.clone(),
        object: "chat.completion",
        created: ctx.created,
        model: ctx.valid.model.clone(),
        choices: c
            .texts
            .into_iter()
            .zip(c.tokens)
            .zip(c.finish)
            .enumerate()
            .map(|(index, ((content, tokens), finish))| ChatChoice {
                index,
                message: ChatMessageOut { role: "assistant", content },
                logprobs: want_logprobs.then(|| chat_logprobs(&tokens)),
                finish_reason: finish.map(FinishReason::openai),
            })
            .collect(),
        usage: usage(&c.stats, c.reasoning.as_deref()),
        ponder: c.reasoning.as_deref().map(ponder_info),
    }
}

/// The stop string that ended a choice.
pub(crate) fn stop_string(stops: &[String], f: FinishReason) -> Option<String> {
    match f {
        FinishReason::Stop { index } => stops.get(index).cloned(),
        _ => None,
    }
}

fn completion_body(ctx: &StreamCtx, c: Collected) -> Completion {
    let want_logprobs = ctx.valid.generation.logprobs.is_some();
    let want_ids = ctx.valid.generation.token_ids == crate::validation::TokenIds::Return;
    Completion {
        id: ctx.id.clone(),
        object: "text_completion",
        created: ctx.created,
        model: ctx.valid.model.clone(),
        choices: c
            .texts
            .into_iter()
            .zip(c.tokens)
            .zip(c.finish)
            .enumerate()
            .map(|(index, ((text, tokens), finish))| CompletionChoice {
                index,
                text,
                logprobs: want_logprobs.then(|| completion_logprobs(&tokens)),
                finish_reason: finish.map(FinishReason::openai),
                stop_reason: finish.and_then(|f| stop_string(&ctx.valid.generation.stop, f)),
                token_ids: want_ids.then(|| tokens.iter().map(|t| t.id).collect()),
            })
            .collect(),
        usage: Some(Some(usage(&c.stats, c.reasoning.as_deref()))),
        ponder: c.reasoning.as_deref().map(|r| PonderField::Done(ponder_info(r))),
    }
}
