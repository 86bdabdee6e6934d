//! `POST /v1/chat/completions` and `POST /v1/completions`: validate, admit,
//! hand the job to a worker, then answer with one JSON body or an SSE stream.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use tokio::sync::mpsc;

use super::AppState;
use super::error::ApiError;
use super::extract::JsonBody;
use super::middleware::{SummaryCell, update};
use super::stream::{self, StreamCtx};
use crate::engine::FinishReason;
use crate::metrics::Rejection;
use crate::reasoning::{Budget, Candidates};
use crate::validation::{self, Endpoint, Streaming, ValidRequest};
use crate::wire::{
    CandidateOut, ChatChoice, ChatCompletion, ChatCompletionRequest, ChatLogprobs, ChatMessageOut,
    ChatTokenLogprob, Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, PonderInfo,
    TopLogprob, Usage,
};
use crate::worker::{GenEvent, Job, JobStats, ReasoningReport, TokenOut};

/// Events buffered between a worker and one response.
const EVENT_CHANNEL: usize = 64;

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
    let pool = state.ready_pool(&req.model)?;
    let engine = pool.engine().expect("a ready pool has an engine").clone();
    let model = req.model.clone();
    let valid = validation::chat(req, &engine, state.request_limits(&model))?;
    run(state, valid, received, summary).await
}

pub async fn completions(
    State(state): State<AppState>,
    Extension(summary): Extension<SummaryCell>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    update(&summary, |s| s.model = Some(req.model.clone()));
    let pool = state.ready_pool(&req.model)?;
    let engine = pool.engine().expect("a ready pool has an engine").clone();
    let model = req.model.clone();
    let valid = validation::completion(req, &engine, state.request_limits(&model))?;
    run(state, valid, received, summary).await
}

async fn run(
    state: AppState,
    valid: ValidRequest,
    received: Instant,
    summary: SummaryCell,
) -> Result<Response, ApiError> {
    let pool = state.ready_pool(&valid.model)?;
    if state.is_draining() {
        state.metrics.rejected(&valid.model, Rejection::Draining);
        return Err(ApiError::Draining);
    }
    let permit = pool.admit(valid.generation.sequences()).map_err(|_| {
        state.metrics.rejected(&valid.model, Rejection::QueueFull);
        ApiError::QueueFull { retry_after_secs: state.config.queue.retry_after_secs }
    })?;
    let prefix = match valid.endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completion => "cmpl",
    };
    let id = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
    let (tx, rx) = mpsc::channel(EVENT_CHANNEL);
    let job = Job {
        id: id.clone(),
        request: valid.generation.clone(),
        reply: tx,
        permit,
        received,
        admitted: Instant::now(),
    };
    pool.dispatch(job).map_err(|_| ApiError::Draining)?;
    update(&summary, |s| {
        s.prompt = Some(valid.prompt_text.clone());
        s.streamed = matches!(valid.streaming, Streaming::On(_));
    });
    let ctx = StreamCtx { id, created: unix_now(), valid, summary };
    match ctx.valid.streaming {
        Streaming::On(usage) => Ok(stream::sse(ctx, usage, rx)),
        Streaming::Off => collect(ctx, rx).await,
    }
}

/// Everything the worker sent for one request.
pub(crate) struct Collected {
    pub texts: Vec<String>,
    pub tokens: Vec<Vec<TokenOut>>,
    pub finish: Vec<Option<FinishReason>>,
    pub stats: JobStats,
    pub reasoning: Option<Box<ReasoningReport>>,
}

/// The `ponder` object of a reasoning request's response.
pub(crate) fn ponder_info(r: &ReasoningReport) -> PonderInfo {
    let a = &r.accounting;
    PonderInfo {
        strategy: r.params.strategy,
        adaptive: r.params.budget == Budget::Adaptive,
        select: r.params.select,
        samples: a.samples,
        fixed_samples: a.fixed_samples,
        tokens_generated: a.tokens_generated,
        fixed_tokens_estimate: a.fixed_tokens_estimate,
        tokens_saved: a.tokens_saved,
        prm_evaluations: a.prm_evaluations,
        success_probability_start: a.start,
        success_probability_selected: a.selected,
        steps: a.steps,
        candidates: (r.params.candidates == Candidates::Return).then(|| {
            r.candidates
                .iter()
                .map(|c| CandidateOut {
                    text: c.text.clone(),
                    answer: c.answer.clone(),
                    score: c.score.map(|s| s.quantiles),
                    tokens: c.tokens,
                    steps: c.steps,
                })
                .collect()
        }),
    }
}

/// Usage, with the generated tokens outside the returned answers as reasoning tokens.
pub(crate) fn usage(stats: &JobStats, reasoning: Option<&ReasoningReport>) -> Usage {
    let u = Usage::new(stats.prompt_tokens, stats.completion_tokens);
    match reasoning {
        Some(r) => u.with_reasoning(stats.completion_tokens.saturating_sub(r.answer_tokens)),
        None => u,
    }
}

/// `x-ponder-*` headers with the same figures as the `ponder` object.
fn ponder_headers(p: &PonderInfo) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("x-ponder-strategy", p.strategy.name().to_string()),
        ("x-ponder-adaptive", p.adaptive.to_string()),
        ("x-ponder-samples", p.samples.to_string()),
        ("x-ponder-fixed-samples", p.fixed_samples.to_string()),
        ("x-ponder-tokens-generated", p.tokens_generated.to_string()),
        ("x-ponder-fixed-tokens-estimate", p.fixed_tokens_estimate.to_string()),
        ("x-ponder-tokens-saved", p.tokens_saved.to_string()),
        ("x-ponder-prm-evaluations", p.prm_evaluations.to_string()),
        ("x-ponder-steps", p.steps.to_string()),
    ];
    let q = |q: crate::prm::Quantiles| format!("{:.4},{:.4},{:.4}", q.q10, q.q50, q.q90);
    if let Some(s) = p.success_probability_start {
        h.push(("x-ponder-success-probability-start", q(s)));
    }
    if let Some(s) = p.success_probability_selected {
        h.push(("x-ponder-success-probability-selected", q(s)));
    }
    h
}

async fn collect(ctx: StreamCtx, mut rx: mpsc::Receiver<GenEvent>) -> Result<Response, ApiError> {
    let choices = ctx.valid.generation.choices();
    let mut texts = vec![String::new(); choices];
    let mut tokens = vec![Vec::new(); choices];
    let mut finish = vec![None; choices];
    let mut reasoning = None;
    let stats = loop {
        match rx.recv().await {
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
        }
    };
    update(&ctx.summary, |s| {
        s.prompt_tokens = stats.prompt_tokens;
        s.completion_tokens = stats.completion_tokens;
        s.queue_secs = Some(stats.queue_secs);
        s.ttft_secs = stats.ttft_secs;
    });
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

pub(crate) fn chat_logprobs(tokens: &[TokenOut]) -> ChatLogprobs {
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|t| ChatTokenLogprob {
                token: t.text.clone(),
                logprob: t.logprob,
                bytes: t.text.as_bytes().to_vec(),
                top_logprobs: t
                    .top
                    .iter()
                    .map(|(s, l)| TopLogprob { token: s.clone(), logprob: *l, bytes: s.as_bytes().to_vec() })
                    .collect(),
            })
            .collect(),
    }
}

/// The completions logprobs layout; `offset` is where the first token's
/// text starts in the choice's text.
pub(crate) fn completion_logprobs(tokens: &[TokenOut], mut offset: usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for t in tokens {
        out.tokens.push(t.text.clone());
        out.token_logprobs.push(t.logprob);
        out.top_logprobs.push(t.top.iter().map(|(s, l)| (s.clone(), serde_json::json!(l))).collect());
        out.text_offset.push(offset);
        offset += t.text.len();
    }
    out
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

fn completion_body(ctx: &StreamCtx, c: Collected) -> Completion {
    let want_logprobs = ctx.valid.generation.logprobs.is_some();
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
                logprobs: want_logprobs.then(|| completion_logprobs(&tokens, 0)),
                finish_reason: finish.map(FinishReason::openai),
            })
            .collect(),
        usage: Some(Some(usage(&c.stats, c.reasoning.as_deref()))),
        ponder: c.reasoning.as_deref().map(ponder_info),
    }
}
