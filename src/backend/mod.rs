//! The one seam between HTTP and generation: a [`Backend`] takes a
//! validated request and answers with a stream of [`GenEvent`]s, or refuses
//! it at once. The local worker pool ([`crate::worker::ModelPool`]), a remote
//! OpenAI-compatible engine ([`crate::remote::RemoteBackend`]) and the test
//! [`fake::FakeBackend`] implement it; the API layer knows nothing else
//! about how text is generated.

pub mod fake;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;

use crate::engine::FinishReason;
use crate::metrics::Rejection;
use crate::reasoning::{Accounting, Candidate, ReasoningParams};
use crate::tokenizer::Tokenizer;
pub use crate::validation::TokenDetail;
use crate::validation::{GenerationRequest, ModelView};

/// What validation needs to know about a served model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub tokenizer: Arc<Tokenizer>,
    /// Prompt plus generated tokens must fit in this many positions.
    pub context_length: usize,
    pub detail: TokenDetail,
}

impl ModelInfo {
    pub fn view(&self) -> ModelView<'_> {
        ModelView { tokenizer: &self.tokenizer, context_length: self.context_length, detail: self.detail }
    }
}

/// Whether a backend can take requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendStatus {
    Loading,
    Ready,
    /// A worker failed and is reloading its model; requests are refused until it is back.
    Restarting,
    /// Loading failed for good; the message says why.
    Failed(String),
    /// A remote engine does not answer; the message says how it failed.
    Unreachable(String),
}

impl BackendStatus {
    /// Why a backend in this state takes no new request, with the reason
    /// the refusal is counted under; `None` when it is ready.
    pub fn refusal(self, model: &str) -> Option<(ScheduleError, Rejection)> {
        let model = model.to_string();
        match self {
            BackendStatus::Ready => None,
            BackendStatus::Loading => Some((ScheduleError::Loading(model), Rejection::Loading)),
            BackendStatus::Restarting => Some((ScheduleError::Restarting(model), Rejection::Restarting)),
            BackendStatus::Failed(why) => Some((ScheduleError::Failed { model, why }, Rejection::Failed)),
            BackendStatus::Unreachable(why) => {
                Some((ScheduleError::Unreachable { model, why }, Rejection::Unreachable))
            }
        }
    }
}

/// Why a backend refused a request before generating anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("the request queue is full")]
    QueueFull { retry_after_secs: u64 },
    #[error("model {0:?} is still loading")]
    Loading(String),
    #[error("model {0:?} is restarting after a worker failure")]
    Restarting(String),
    /// Loading (or reloading after a failure) failed; nothing retries it.
    #[error("model {model:?} failed to load and is not retried: {why}")]
    Failed { model: String, why: String },
    #[error("the backend accepts no new requests")]
    Closed,
    /// A remote engine is not reachable now.
    #[error("model {model:?}: the engine is unreachable: {why}")]
    Unreachable { model: String, why: String },
}

/// How a remote engine failed a request that it had been sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// Connection refused or reset, a 5xx, or an answer ponder cannot read.
    BadGateway,
    /// No bytes within the engine's timeout.
    Timeout,
}

/// One request handed to a backend.
#[derive(Debug, Clone)]
pub struct Scheduled {
    pub id: String,
    pub generation: GenerationRequest,
    /// When the HTTP request arrived (for queue time and TTFT).
    pub received: Instant,
    /// Counts the tokens generated for the request as they are, so that a
    /// request whose client left is logged with what it did spend.
    pub meter: TokenMeter,
    /// How the client takes the answer; a remote backend asks its engine
    /// for a whole answer when the client does, saving a chunk per token.
    pub delivery: Delivery,
}

/// Whether the client reads the answer as it is generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Streamed,
    Whole,
}

/// Tokens generated for one request so far, shared by the backend (which
/// adds) and the HTTP side (which reads, also after the client left).
#[derive(Debug, Clone, Default)]
pub struct TokenMeter(Arc<MeterInner>);

type Released = Box<dyn FnOnce(usize) + Send>;

#[derive(Default)]
struct MeterInner {
    tokens: AtomicUsize,
    /// Counted as cancelled already (by the backend or the HTTP side).
    cancelled: std::sync::atomic::AtomicBool,
    released: Mutex<Option<Released>>,
}

impl std::fmt::Debug for MeterInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenMeter").field("tokens", &self.tokens).finish()
    }
}

impl Drop for MeterInner {
    fn drop(&mut self) {
        let run = self.released.get_mut().ok().and_then(Option::take);
        if let Some(run) = run {
            run(*self.tokens.get_mut());
        }
    }
}

impl TokenMeter {
    pub fn add(&self, tokens: usize) {
        self.0.tokens.fetch_add(tokens, Ordering::Relaxed);
    }

    pub fn get(&self) -> usize {
        self.0.tokens.load(Ordering::Relaxed)
    }

    /// True for the first caller only: whoever notices first that the
    /// client left — the backend at its next step, or the HTTP side when a
    /// response could not be written — counts the cancellation, so that it
    /// is counted exactly once.
    pub fn claim_cancel(&self) -> bool {
        !self.0.cancelled.swap(true, Ordering::AcqRel)
    }

    /// Runs `f` with the final count once no clone of this meter is left,
    /// that is once the backend has let go of the request too (at once if
    /// it already has).
    pub fn when_released(self, f: impl FnOnce(usize) + Send + 'static) {
        *self.0.released.lock().expect("no panics while holding the meter's lock") = Some(Box::new(f));
    }
}

/// The seam, as TGI's `Backend::schedule`: everything that generates text
/// for the API implements it.
pub trait Backend: Send + Sync + std::fmt::Debug {
    fn status(&self) -> BackendStatus;
    /// The model's tokenizer and limits, once loaded.
    fn model_info(&self) -> Option<ModelInfo>;
    /// Admits the request or refuses it at once; the events follow on the
    /// stream. Dropping the stream cancels the request.
    fn schedule(&self, request: Scheduled) -> Result<EventStream, ScheduleError>;
}

/// One generated token, sent with the text it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOut {
    pub id: u32,
    /// The token's text (lossy where a token holds part of a character).
    pub text: String,
    /// Its raw bytes (OpenAI's `bytes`: part of a character for such a token).
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<TopToken>,
    /// Characters of the choice's text before this token's (completions'
    /// `text_offset`).
    pub offset: usize,
    pub place: TokenPlace,
}

/// An alternative to a generated token, with its logprob.
#[derive(Debug, Clone, PartialEq)]
pub struct TopToken {
    pub text: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// Where a generated token's text went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenPlace {
    /// Into the choice's text (at least one of its bytes).
    Text,
    /// Wholly into the stop string that ended the choice, which is not
    /// returned: the token keeps its id (`token_ids`) but has no logprob
    /// entry, so that logprobs cover exactly the returned text.
    StopString,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobStats {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub queue_secs: f64,
    pub ttft_secs: Option<f64>,
}

/// What a reasoning request spent, saved and considered.
#[derive(Debug, Clone, PartialEq)]
pub struct ReasoningReport {
    pub params: ReasoningParams,
    pub accounting: Accounting,
    pub candidates: Vec<Candidate>,
    /// Tokens of the returned answers (the rest are reasoning tokens).
    pub answer_tokens: usize,
}

/// Where a running reasoning request stands, sent after each reasoning step.
pub use crate::reasoning::runtime::TaskProgress as Progress;

#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// New text of one choice, with its tokens when logprobs were asked for.
    Delta {
        choice: usize,
        text: String,
        tokens: Vec<TokenOut>,
    },
    Finished {
        choice: usize,
        reason: FinishReason,
    },
    /// A reasoning request is still searching.
    Progress(Progress),
    /// A reasoning request's accounting, sent before `Done`.
    Reasoning(Box<ReasoningReport>),
    /// Every choice finished.
    Done(JobStats),
    /// The backend could not complete the request; details are in its log.
    Failed,
    /// A remote engine failed the request; details are in the log.
    Upstream(UpstreamFailure),
}

/// The events of one request. Dropping it tells the backend the client left.
#[derive(Debug)]
pub struct EventStream {
    rx: mpsc::Receiver<GenEvent>,
    /// An event looked at and put back.
    pending: Option<GenEvent>,
}

impl EventStream {
    pub fn new(rx: mpsc::Receiver<GenEvent>) -> Self {
        Self { rx, pending: None }
    }

    /// Puts an event back; the next [`EventStream::next`] returns it.
    pub fn put_back(&mut self, event: GenEvent) {
        self.pending = Some(event);
    }

    /// The next event; `None` when the backend dropped the request without
    /// finishing it (a failed worker).
    pub async fn next(&mut self) -> Option<GenEvent> {
        if let Some(e) = self.pending.take() {
            return Some(e);
        }
        self.rx.recv().await
    }
}

/// The events that end a reasoning request: each selected answer as one
/// delta and its finish, the accounting, and the totals. With fewer
/// distinct answers than `n`, fewer choices are sent.
pub fn outcome_events(
    request: &GenerationRequest,
    outcome: crate::reasoning::Outcome,
    queue_secs: f64,
    received: Instant,
) -> Vec<GenEvent> {
    let crate::reasoning::Outcome { answers, candidates, accounting } = outcome;
    let answer_tokens: usize = answers.iter().map(|a| a.tokens).sum();
    let mut out = Vec::new();
    for (choice, a) in answers.iter().enumerate() {
        out.push(GenEvent::Delta { choice, text: a.text.clone(), tokens: Vec::new() });
        let reason = if a.ended { FinishReason::Eos } else { FinishReason::Length };
        out.push(GenEvent::Finished { choice, reason });
    }
    let params = request.reasoning.expect("outcome events are for reasoning requests");
    out.push(GenEvent::Reasoning(Box::new(ReasoningReport {
        params,
        accounting,
        candidates,
        answer_tokens,
    })));
    out.push(GenEvent::Done(JobStats {
        prompt_tokens: request.prompts[0].len(),
        completion_tokens: accounting.tokens_generated,
        queue_secs,
        ttft_secs: Some(received.elapsed().as_secs_f64()),
    }));
    out
}
