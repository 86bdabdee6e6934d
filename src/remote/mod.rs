//! A model served by a remote OpenAI-compatible engine (vLLM, SGLang, TGI,
//! llama.cpp's server), behind the same [`Backend`] seam as the local
//! worker pool: ponder keeps the chat template, token counting, admission,
//! limits, logs and metrics; the engine generates. Each prompt of a request
//! becomes a `/v1/completions` call with the prompt as token ids and the
//! request's `n`, so the engine batches and caches prefixes as it does for
//! any client: streamed for a streaming client, one whole answer otherwise
//! (`relay_whole`). `max_n`, or `server = "llama_cpp"` (one choice per
//! call), splits the `n` choices over several calls with shifted seeds.
//! The engine's reachability is probed in the background and reported by
//! `/health`; a client that leaves closes its upstream connections, which
//! these engines take as an abort. Reasoning requests run the same
//! strategies as on the local engine, over
//! [`reasoning::RemoteTrajectories`], scored by the model's separate PRM
//! where it has one.

pub mod reasoning;
pub mod upstream;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{Semaphore, mpsc};

use crate::backend::{
    Backend, BackendStatus, Delivery, EventStream, GenEvent, JobStats, ModelInfo, ScheduleError, Scheduled,
    TokenDetail, TokenMeter, TokenOut, TokenPlace, TopToken,
};
use crate::config::{BackendConfig, ModelEntry, QueueConfig};
use crate::engine::FinishReason;
use crate::metrics::{Metrics, ModelMetrics};
use crate::prm::Scorer;
use crate::tokenizer::{AddSpecial, Tokenizer};
use crate::validation::GenerationRequest;
use crate::worker::{Admission, QueuePermit};
use reasoning::{RemoteCtx, RemoteTrajectories};
use upstream::{CompletionCall, StreamOptionsCall, Upstream, UpstreamError};

/// Events buffered between the relay task and one response.
const EVENT_CHANNEL: usize = 64;
/// Time between reachability probes.
const PROBE_EVERY: Duration = Duration::from_secs(5);

/// What the background probe last found.
struct Shared {
    status: Mutex<BackendStatus>,
    info: OnceLock<ModelInfo>,
    /// The model's separate PRM, once loaded (`None` inside: it has none).
    prm: OnceLock<Option<Arc<dyn Scorer>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("status", &self.status)
            .field("prm", &self.prm.get().map(|p| p.is_some()))
            .finish()
    }
}

/// One served model whose engine is remote.
#[derive(Debug)]
pub struct RemoteBackend {
    id: String,
    upstream: Upstream,
    shared: Arc<Shared>,
    admission: Admission,
    /// Sequences in flight upstream at once (`queue.max_running`).
    running: Arc<Semaphore>,
    max_running: usize,
    retry_after_secs: u64,
    metrics: Metrics,
    mm: ModelMetrics,
}

impl RemoteBackend {
    /// Loads the tokenizer and starts probing the engine; must run inside
    /// a tokio runtime.
    pub fn spawn(entry: &ModelEntry, queue: &QueueConfig, metrics: &Metrics) -> Arc<Self> {
        let BackendConfig::Openai(engine) = &entry.backend else {
            unreachable!("RemoteBackend::spawn is called for remote models only")
        };
        let shared = Arc::new(Shared {
            status: Mutex::new(BackendStatus::Loading),
            info: OnceLock::new(),
            prm: OnceLock::new(),
        });
        let backend = Arc::new(Self {
            id: entry.id.clone(),
            upstream: Upstream::new(engine),
            shared: shared.clone(),
            admission: Admission::new(queue.capacity + queue.max_running),
            running: Arc::new(Semaphore::new(queue.max_running)),
            max_running: queue.max_running,
            retry_after_secs: queue.retry_after_secs,
            metrics: metrics.clone(),
            mm: metrics.for_model(&entry.id, "remote"),
        });
        tokio::spawn(start(backend.upstream.clone(), entry.clone(), shared));
        backend
    }
}

/// A remote model's tokenizer, from its `tokenizer` path (a GGUF, a
/// `tokenizer.json` or an HF directory).
pub fn load_tokenizer(entry: &ModelEntry) -> Result<Arc<Tokenizer>, String> {
    let path = entry.tokenizer.as_ref().ok_or("a remote model needs `tokenizer`")?;
    let t = if path.is_dir() {
        Tokenizer::from_hf_dir(path)
    } else if path.extension().is_some_and(|e| e == "gguf") {
        Tokenizer::from_gguf_file(path)
    } else {
        Tokenizer::from_hf_dir(path.parent().unwrap_or(std::path::Path::new(".")))
    };
    t.map(Arc::new).map_err(|e| format!("tokenizer {}: {e}", path.display()))
}

/// A remote model's tokenizer and PRM, once loaded.
type Loaded = (Arc<Tokenizer>, Option<Arc<dyn Scorer>>);

/// Loads the tokenizer and the PRM, then probes the engine; a load that
/// fails marks the model failed, which stops start-up.
async fn start(upstream: Upstream, entry: ModelEntry, shared: Arc<Shared>) {
    let loaded = tokio::task::spawn_blocking({
        let entry = entry.clone();
        move || -> Result<Loaded, String> {
            let tokenizer = load_tokenizer(&entry)?;
            // A head on hidden states is refused by config validation: only separate PRMs here.
            let prm = match &entry.prm {
                None => None,
                Some(c) => Some(
                    crate::prm::load(c, 0, crate::prm::head::HeadOutput::Calibrated)
                        .map_err(|e| format!("PRM: {e}"))?,
                ),
            };
            Ok((tokenizer, prm))
        }
    })
    .await
    .unwrap_or_else(|e| Err(format!("loading panicked: {e}")));
    let (tokenizer, prm) = match loaded {
        Ok(l) => l,
        Err(e) => {
            let msg = format!("model {:?}: {e}", entry.id);
            tracing::error!("{msg}");
            *shared.status.lock().expect("no panics while holding the status lock") =
                BackendStatus::Failed(msg);
            return;
        }
    };
    let _ = shared.prm.set(prm);
    let detail = match &entry.backend {
        // llama.cpp's server reports its probabilities in a form not relayed.
        BackendConfig::Openai(r) if r.server == crate::config::EngineServer::LlamaCpp => {
            TokenDetail::TextOnly
        }
        _ => TokenDetail::Logprobs,
    };
    // With the length configured, requests are validated (and refused with
    // 502 while the engine is down) from the start.
    if let Some(context_length) = entry.context_length {
        let _ = shared.info.set(ModelInfo { tokenizer: tokenizer.clone(), context_length, detail });
    }
    probe_loop(upstream, entry.id, entry.context_length, (tokenizer, detail), shared).await;
}

/// Probes the engine every few seconds: `Ready` while it answers and
/// serves the model, `Unreachable` otherwise. The context length comes
/// from the config or the first answer that gives one.
async fn probe_loop(
    upstream: Upstream,
    id: String,
    configured: Option<usize>,
    (tokenizer, detail): (Arc<Tokenizer>, TokenDetail),
    shared: Arc<Shared>,
) {
    let mut announced = false;
    loop {
        let status = match upstream.probe().await {
            Ok(p) if !p.serves_model => BackendStatus::Unreachable(format!(
                "the engine does not serve a model named {:?} (backend.model)",
                upstream.model()
            )),
            Ok(p) => match configured.or(p.context_length) {
                Some(context_length) => {
                    let _ =
                        shared.info.set(ModelInfo { tokenizer: tokenizer.clone(), context_length, detail });
                    BackendStatus::Ready
                }
                // An engine still loading the model (another ponder) lists
                // it without a length: probe on, the model is not served yet.
                None => BackendStatus::Unreachable(format!(
                    "the engine serves {:?} but does not say its context length (yet); set `context_length` if it never does",
                    upstream.model()
                )),
            },
            Err(e) => BackendStatus::Unreachable(e.to_string()),
        };
        match &status {
            BackendStatus::Ready if !announced => {
                announced = true;
                tracing::info!(model = %id, engine = upstream.model(), "remote engine ready");
            }
            BackendStatus::Unreachable(why) => tracing::warn!(model = %id, %why, "remote engine unreachable"),
            _ => {}
        }
        let failed = matches!(status, BackendStatus::Failed(_));
        *shared.status.lock().expect("no panics while holding the status lock") = status;
        if failed {
            return;
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

impl Backend for RemoteBackend {
    fn status(&self) -> BackendStatus {
        self.shared.status.lock().expect("no panics while holding the status lock").clone()
    }

    fn model_info(&self) -> Option<ModelInfo> {
        self.shared.info.get().cloned()
    }

    fn schedule(&self, req: Scheduled) -> Result<EventStream, ScheduleError> {
        let permit = self.admission.admit(self.status(), &self.id, &self.metrics, self.retry_after_secs)?;
        let (tx, rx) = mpsc::channel(EVENT_CHANNEL);
        let tokenizer = self.model_info().expect("a ready remote model has its tokenizer").tokenizer;
        if let Some(params) = req.generation.reasoning {
            let ctx = RemoteCtx {
                upstream: self.upstream.clone(),
                tokenizer,
                prm: self.shared.prm.get().cloned().flatten(),
                running: self.running.clone(),
                max_running: self.max_running,
                mm: self.mm.clone(),
                meter: req.meter.clone(),
                events: tx.clone(),
            };
            tokio::spawn(run_reasoning(ctx, req, params, tx, permit));
            return Ok(EventStream::new(rx));
        }
        let relay = Relay {
            upstream: self.upstream.clone(),
            running: self.running.clone(),
            wants: req.generation.choices().min(self.max_running) as u32,
            mm: self.mm.clone(),
            tokenizer,
            _permit: permit,
        };
        tokio::spawn(relay.run(req, tx));
        Ok(EventStream::new(rx))
    }
}

/// Runs one reasoning request's strategy over the engine, then sends its
/// answers and accounting as the local scheduler does.
async fn run_reasoning(
    ctx: RemoteCtx,
    req: Scheduled,
    params: crate::reasoning::ReasoningParams,
    tx: mpsc::Sender<GenEvent>,
    _permit: QueuePermit,
) {
    let mm = ctx.mm.clone();
    let g = &req.generation;
    let queue_secs = req.received.elapsed().as_secs_f64();
    mm.prompt_tokens.inc_by(g.prompts[0].len() as u64);
    let trajectories =
        RemoteTrajectories::new(ctx, g.question.clone(), g.prompts[0].clone(), params, g.sampling);
    let outcome = tokio::select! {
        r = crate::reasoning::run(&trajectories, &params) => r,
        // The client left: dropping the strategy drops its calls, closing
        // their connections.
        _ = tx.closed() => {
            if req.meter.claim_cancel() {
                mm.cancelled.inc();
            }
            return;
        }
    };
    match outcome {
        Ok(outcome) => {
            mm.ttft.observe(req.received.elapsed().as_secs_f64());
            mm.reasoning.record(params.strategy.name(), &outcome.accounting, params.budget_quantile);
            for e in crate::backend::outcome_events(g, outcome, queue_secs, req.received) {
                if tx.send(e).await.is_err() {
                    return;
                }
            }
        }
        Err(e) => {
            let event = match trajectories.take_failure() {
                Some(up) => {
                    tracing::error!(request = %req.id, error = %up, "remote engine failed a reasoning step");
                    GenEvent::Upstream(up.failure())
                }
                None => {
                    tracing::error!(request = %req.id, error = %e, "reasoning failed");
                    GenEvent::Failed
                }
            };
            let _ = tx.send(event).await;
        }
    }
}

/// One plain request on its way through the engine.
struct Relay {
    upstream: Upstream,
    running: Arc<Semaphore>,
    wants: u32,
    mm: ModelMetrics,
    tokenizer: Arc<Tokenizer>,
    /// Held until the request ends: admission counts it.
    _permit: QueuePermit,
}

/// A choice's progress through the relay.
#[derive(Default, Clone)]
struct ChoiceState {
    tokens: usize,
    last: Option<Instant>,
    /// Characters of the choice's token texts so far (`text_offset`).
    chars: usize,
    /// Whether the engine sent the choice's finish reason.
    finished: bool,
}

impl Relay {
    async fn run(self, req: Scheduled, tx: mpsc::Sender<GenEvent>) {
        let meter = req.meter.clone();
        tokio::select! {
            r = self.relay(&req, &tx) => {
                if let Err(e) = r {
                    tracing::error!(request = %req.id, error = %e, "remote engine failed the request");
                    let _ = tx.send(GenEvent::Upstream(e.failure())).await;
                }
            }
            // The client left: dropping the relay closes the upstream
            // connections, and the engine aborts the generation.
            _ = tx.closed() => {
                if meter.claim_cancel() {
                    self.mm.cancelled.inc();
                }
            }
        }
    }

    async fn relay(&self, req: &Scheduled, tx: &mpsc::Sender<GenEvent>) -> Result<(), UpstreamError> {
        let g = &req.generation;
        let _slots = self.running.acquire_many(self.wants).await.expect("the semaphore is never closed");
        let admitted = Instant::now();
        let queue_secs = admitted.duration_since(req.received).as_secs_f64();
        self.mm.queue_duration.observe(queue_secs);
        self.mm.running.add(i64::from(self.wants));
        let _running = RunningGuard { mm: self.mm.clone(), n: i64::from(self.wants) };
        if req.delivery == Delivery::Whole {
            return self.relay_whole(req, tx, queue_secs).await;
        }
        for prompt in &g.prompts {
            self.mm.prompt_tokens.inc_by(prompt.len() as u64);
        }
        let parts = parts(&self.upstream, g, Delivery::Streamed);
        let mut streams = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let s = self.upstream.stream(&part.call).await?;
            streams.push(s.map(move |c| (i, c)).boxed());
        }
        let mut merged = futures::stream::select_all(streams);
        let mut choices = vec![ChoiceState::default(); g.choices()];
        let mut usage = vec![None; parts.len()];
        let mut first_token = None;
        while let Some((i, chunk)) = merged.next().await {
            let chunk = chunk?;
            if let Some(u) = chunk.usage {
                usage[i] = Some(u.completion_tokens);
            }
            for c in chunk.choices {
                let part = &parts[i];
                let Some(state) = choices.get_mut(part.first + c.index).filter(|_| c.index < part.call.n)
                else {
                    return Err(UpstreamError::Protocol {
                        url: "completions".into(),
                        message: format!("choice index {} is beyond n = {}", c.index, part.call.n),
                    });
                };
                let choice = part.first + c.index;
                let tokens = self.token_outs(c.logprobs.as_ref(), g.logprobs.is_some(), &mut state.chars);
                let new = if c.logprobs.is_some() {
                    c.logprobs.as_ref().map_or(0, |l| l.tokens.len())
                } else {
                    usize::from(!c.text.is_empty())
                };
                if new > 0 {
                    let now = Instant::now();
                    first_token.get_or_insert_with(|| {
                        self.mm.ttft.observe(now.duration_since(req.received).as_secs_f64());
                        now
                    });
                    if let Some(prev) = state.last.replace(now) {
                        self.mm.itl.observe(now.duration_since(prev).as_secs_f64());
                    }
                    state.tokens += new;
                    req.meter.add(new);
                    self.mm.generated_tokens.inc_by(new as u64);
                }
                let reason = c.finish_reason.as_deref().map(|r| finish_reason(r, c.stop_string(), &g.stop));
                state.finished |= reason.is_some();
                if (!c.text.is_empty() || !tokens.is_empty())
                    && tx.send(GenEvent::Delta { choice, text: c.text, tokens }).await.is_err()
                {
                    return Ok(());
                }
                if let Some(reason) = reason
                    && tx.send(GenEvent::Finished { choice, reason }).await.is_err()
                {
                    return Ok(());
                }
            }
        }
        // Every choice must have ended: one the engine left out would reach
        // the client with no finish reason.
        if let Some(i) = choices.iter().position(|c| !c.finished) {
            return Err(UpstreamError::Protocol {
                url: "completions".into(),
                message: format!("the engine's streams ended without finishing choice {i}"),
            });
        }
        let spans: Vec<(usize, usize)> = parts.iter().map(|p| (p.first, p.call.n)).collect();
        let completion_tokens = settle_counts(&choices, &spans, &usage, &req.meter, &self.mm);
        let stats = JobStats {
            prompt_tokens: g.prompts.iter().map(Vec::len).sum(),
            completion_tokens,
            queue_secs,
            ttft_secs: first_token.map(|t| t.duration_since(req.received).as_secs_f64()),
        };
        let _ = tx.send(GenEvent::Done(stats)).await;
        Ok(())
    }

    /// A client that reads the whole answer gets it from one whole answer
    /// of the engine per prompt: no chunk per token on either side.
    async fn relay_whole(
        &self,
        req: &Scheduled,
        tx: &mpsc::Sender<GenEvent>,
        queue_secs: f64,
    ) -> Result<(), UpstreamError> {
        let g = &req.generation;
        for prompt in &g.prompts {
            self.mm.prompt_tokens.inc_by(prompt.len() as u64);
        }
        let parts = parts(&self.upstream, g, Delivery::Whole);
        let answers =
            futures::future::try_join_all(parts.iter().map(|p| self.upstream.complete(&p.call))).await?;
        let now = Instant::now();
        self.mm.ttft.observe(now.duration_since(req.received).as_secs_f64());
        let mut completion_tokens = 0;
        let mut events = Vec::new();
        for (part, answer) in parts.iter().zip(answers) {
            let tokens = answer.usage.map(|u| u.completion_tokens).unwrap_or_else(|| {
                answer
                    .choices
                    .iter()
                    .map(|c| self.tokenizer.encode(&c.text, AddSpecial::No).map_or(0, |t| t.len()))
                    .sum()
            });
            completion_tokens += tokens;
            req.meter.add(tokens);
            self.mm.generated_tokens.inc_by(tokens as u64);
            // Every choice asked for, once: a missing one would reach the
            // client as empty text with no finish reason.
            let choices = reasoning::whole_answer(answer.choices, part.call.n)
                .map_err(|message| UpstreamError::Protocol { url: "completions".into(), message })?;
            for c in choices {
                let choice = part.first + c.index;
                let tokens = self.token_outs(c.logprobs.as_ref(), g.logprobs.is_some(), &mut 0);
                let reason =
                    finish_reason(c.finish_reason.as_deref().unwrap_or("stop"), c.stop_string(), &g.stop);
                events.push(GenEvent::Delta { choice, text: c.text, tokens });
                events.push(GenEvent::Finished { choice, reason });
            }
        }
        events.push(GenEvent::Done(JobStats {
            prompt_tokens: g.prompts.iter().map(Vec::len).sum(),
            completion_tokens,
            queue_secs,
            ttft_secs: Some(now.duration_since(req.received).as_secs_f64()),
        }));
        for e in events {
            if tx.send(e).await.is_err() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// The engine's tokens as ponder's, `offset` counting the characters of
    /// the choice's token texts so far. Their bytes are those of the
    /// engine's token text (its completions answer carries no others).
    fn token_outs(
        &self,
        lp: Option<&upstream::ChunkLogprobs>,
        wanted: bool,
        offset: &mut usize,
    ) -> Vec<TokenOut> {
        let Some(lp) = lp.filter(|_| wanted) else { return Vec::new() };
        lp.tokens
            .iter()
            .enumerate()
            .map(|(k, text)| {
                let at = *offset;
                *offset += text.chars().count();
                TokenOut {
                    id: self.tokenizer.token_id(text).unwrap_or(0),
                    text: text.clone(),
                    bytes: text.as_bytes().to_vec(),
                    logprob: lp.token_logprobs.get(k).copied().flatten().unwrap_or(f32::NEG_INFINITY),
                    top: lp
                        .top_logprobs
                        .get(k)
                        .and_then(Option::as_ref)
                        .map(|m| {
                            m.iter()
                                .map(|(t, v)| TopToken {
                                    text: t.clone(),
                                    bytes: t.as_bytes().to_vec(),
                                    logprob: v.as_f64().unwrap_or(f64::NEG_INFINITY) as f32,
                                })
                                .collect::<Vec<_>>()
                        })
                        .map(|mut top| {
                            // A JSON object has no order: most likely first, as the local engine sends them.
                            top.sort_by(|a, b| b.logprob.total_cmp(&a.logprob));
                            top
                        })
                        .unwrap_or_default(),
                    offset: at,
                    place: TokenPlace::Text,
                }
            })
            .collect()
    }
}

/// The engine's own count (its `usage`) is the truth where it sent one:
/// chunks can carry several tokens. Adds what the chunk count missed to the
/// meter and the metric; returns the request's completion tokens.
fn settle_counts(
    choices: &[ChoiceState],
    spans: &[(usize, usize)],
    usage: &[Option<usize>],
    meter: &TokenMeter,
    mm: &ModelMetrics,
) -> usize {
    let mut total = 0;
    for (&(first, n), u) in spans.iter().zip(usage) {
        let counted: usize = choices[first..first + n].iter().map(|c| c.tokens).sum();
        let real = u.unwrap_or(counted).max(counted);
        if real > counted {
            meter.add(real - counted);
            mm.generated_tokens.inc_by((real - counted) as u64);
        }
        total += real;
    }
    total
}

/// Keeps `ponder_running_sequences` true however the relay ends.
struct RunningGuard {
    mm: ModelMetrics,
    n: i64,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.mm.running.sub(self.n);
    }
}

/// One upstream call of a plain request: some of one prompt's choices.
struct Part {
    /// The request's choice index of the call's choice 0.
    first: usize,
    call: CompletionCall,
}

/// The calls of a plain request: each prompt's `n` choices, split where the
/// engine takes fewer per call (seeds shifted by the choices before, as an
/// engine shifts them within one call).
fn parts(upstream: &Upstream, g: &GenerationRequest, delivery: Delivery) -> Vec<Part> {
    let mut out = Vec::new();
    for (p, prompt) in g.prompts.iter().enumerate() {
        for (offset, count) in upstream.split_n(g.n) {
            let mut call = call(upstream.model(), g, prompt, count, offset as u64);
            if delivery == Delivery::Whole {
                call.stream = false;
                call.stream_options = None;
            }
            out.push(Part { first: p * g.n + offset, call });
        }
    }
    out
}

/// The upstream call for `n` choices of one prompt of a plain request.
fn call(model: &str, g: &GenerationRequest, prompt: &[u32], n: usize, seed_offset: u64) -> CompletionCall {
    CompletionCall {
        model: model.to_string(),
        prompt: prompt.to_vec(),
        n,
        max_tokens: g.max_tokens,
        temperature: g.sampling.temperature,
        top_p: g.sampling.top_p,
        top_k: (g.sampling.top_k > 0).then_some(g.sampling.top_k),
        min_p: None,
        presence_penalty: g.sampling.penalties.presence,
        frequency_penalty: g.sampling.penalties.frequency,
        // Engines read the seed as a signed 64-bit integer (ponder's own API too).
        seed: g.sampling.seed.wrapping_add(seed_offset) & (i64::MAX as u64),
        stop: g.stop.clone(),
        logprobs: g.logprobs,
        stream: true,
        stream_options: Some(StreamOptionsCall { include_usage: true }),
        include_stop_str_in_output: false,
        return_token_ids: false,
        return_tokens: false,
        verbose: false,
    }
}

/// OpenAI's finish reason as ponder's: `stop` is the request's stop string
/// that the engine names (vLLM's `stop_reason`, llama.cpp's
/// `stopping_word`), or the end-of-generation token.
fn finish_reason(reason: &str, stop_string: Option<&str>, stops: &[String]) -> FinishReason {
    match reason {
        "length" => FinishReason::Length,
        _ => match stop_string.and_then(|s| stops.iter().position(|x| x == s)) {
            Some(index) => FinishReason::Stop { index },
            None => FinishReason::Eos,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_reasons_name_the_matched_stop_string_when_the_engine_does() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(finish_reason("stop", Some("END"), &stops), FinishReason::Stop { index: 1 });
        assert_eq!(finish_reason("stop", None, &stops), FinishReason::Eos);
        assert_eq!(finish_reason("stop", Some("other"), &stops), FinishReason::Eos);
        assert_eq!(finish_reason("length", None, &stops), FinishReason::Length);
    }

    #[test]
    fn penalties_go_to_the_engine_under_openais_names_and_are_left_out_when_off() {
        let mut g = GenerationRequest {
            prompts: vec![vec![1, 2]],
            n: 1,
            sampling: crate::engine::SamplingParams::sampled(0.7, 1),
            stop: vec![],
            max_tokens: 4,
            logprobs: None,
            token_ids: crate::validation::TokenIds::Omit,
            question: String::new(),
            reasoning: None,
        };
        let body =
            |g: &GenerationRequest| serde_json::to_value(call("m", g, &[1, 2], 1, 0)).expect("serialises");
        let plain = body(&g);
        assert!(
            plain.get("presence_penalty").is_none() && plain.get("frequency_penalty").is_none(),
            "{plain}"
        );
        g.sampling.penalties = crate::engine::Penalties { presence: 0.5, frequency: -1.0 };
        let v = body(&g);
        assert_eq!(
            (v["presence_penalty"].as_f64(), v["frequency_penalty"].as_f64()),
            (Some(0.5), Some(-1.0))
        );
    }

    #[test]
    fn the_engines_usage_corrects_a_chunk_count_that_missed_tokens() {
        let mm = Metrics::new().for_model("m", "remote");
        let meter = TokenMeter::default();
        let choices = [
            ChoiceState { tokens: 3, ..Default::default() },
            ChoiceState { tokens: 2, ..Default::default() },
        ];
        // Five chunks seen, seven tokens generated (speculative decoding).
        assert_eq!(settle_counts(&choices, &[(0, 2)], &[Some(7)], &meter, &mm), 7);
        assert_eq!(meter.get(), 2, "only the missed tokens are added");
        assert_eq!(settle_counts(&choices, &[(0, 2)], &[None], &TokenMeter::default(), &mm), 5);
        // Choices split over two calls, each with its own usage.
        assert_eq!(
            settle_counts(&choices, &[(0, 1), (1, 1)], &[Some(4), None], &TokenMeter::default(), &mm),
            6
        );
    }
}
