//! Parse, don't validate: OpenAI wire requests become [`ValidRequest`]s
//! (token ids, resolved defaults, checked limits) or a [`ValidationError`]
//! that names the field, the limit and the value given.

use crate::config::Limits;
use crate::engine::{Penalties, SamplingParams};
use crate::reasoning::knobs::{self, KnobValues, ReasoningDefaults};
use crate::reasoning::{Budget, BudgetRule, Candidates, ReasoningParams, Select, Strategy};
use crate::tokenizer::{AddSpecial, ChatMessage, Tokenizer, TokenizerError};
use crate::wire::{
    ChatCompletionRequest, CompletionRequest, ContentWire, Integral, PromptWire, ReasoningWire, StopWire,
    StreamOptions,
};

mod openai;

/// What validation reads of the served model.
#[derive(Debug, Clone, Copy)]
pub struct ModelView<'a> {
    pub tokenizer: &'a Tokenizer,
    pub context_length: usize,
    pub detail: TokenDetail,
}

/// What a backend returns about each token beside the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenDetail {
    /// Logprobs and token ids (ponder's own engine).
    Full,
    /// Logprobs, but no trustworthy ids: an engine's completions answer
    /// names its tokens by text.
    Logprobs,
    /// Neither (llama.cpp's server).
    TextOnly,
}

/// A generation the backend runs: `n` choices for each prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    /// Token ids of each prompt (a completions request may send several).
    pub prompts: Vec<Vec<u32>>,
    pub n: usize,
    /// Choice `j` of a prompt samples with `child_seed(sampling.seed, j)`.
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub max_tokens: usize,
    /// Logprob alternatives per token; `None` records no logprobs.
    pub logprobs: Option<usize>,
    /// Whether choices carry their token ids (vLLM's `return_token_ids`).
    pub token_ids: TokenIds,
    /// The question as text (what a text-reading PRM scores).
    pub question: String,
    /// Search with a PRM instead of plain sampling.
    pub reasoning: Option<ReasoningParams>,
}

impl GenerationRequest {
    /// Sequences the request needs to start: one per choice, or the one
    /// prompt a reasoning request scores before it knows its budget.
    pub fn initial_sequences(&self) -> usize {
        match &self.reasoning {
            Some(_) => 1,
            None => self.prompts.len() * self.n,
        }
    }

    /// Choices the response holds.
    pub fn choices(&self) -> usize {
        self.prompts.len() * self.n
    }
}

/// Whether a completion's choices carry the ids of their tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenIds {
    Omit,
    Return,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    /// The offending field, as OpenAI's `param`.
    pub param: Option<String>,
    pub message: String,
    pub code: Option<&'static str>,
}

impl ValidationError {
    fn new(param: &str, message: impl Into<String>) -> Self {
        Self { param: Some(param.to_string()), message: message.into(), code: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// Whether a streamed response ends with a usage chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageChunk {
    Omit,
    Send,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Streaming {
    Off,
    On(UsageChunk),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub model: String,
    pub endpoint: Endpoint,
    pub generation: GenerationRequest,
    pub streaming: Streaming,
    /// The prompt as text (for logs that are allowed to show it).
    pub prompt_text: String,
}

/// Limits and defaults that do not come from the request.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits<'a> {
    pub limits: &'a Limits,
    /// Sequences one worker runs at once: a request needing more never runs.
    pub max_sequences: usize,
    /// The model's defaults for the `reasoning` object.
    pub reasoning: &'a ReasoningDefaults,
    /// Whether the model has a PRM (without one, only `vote` and `majority` run).
    pub has_prm: bool,
    /// The model's id, for error messages.
    pub model: &'a str,
}

fn in_range_i(param: &str, v: i64, lo: i64, hi: i64) -> Result<usize, ValidationError> {
    if v < lo || v > hi {
        return Err(ValidationError::new(param, format!("{param} must be between {lo} and {hi}, got {v}")));
    }
    Ok(v as usize)
}

/// The sampling fields both endpoints share.
struct Common<'a> {
    max_tokens: Option<i64>,
    max_tokens_param: &'static str,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    /// Range-checked with OpenAI's other fields (`openai::check_common`).
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    n: Option<i64>,
    seed: Option<i64>,
    stop: &'a Option<StopWire>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    logprobs: Option<usize>,
    token_ids: TokenIds,
    reasoning: Option<&'a ReasoningWire>,
}

/// What a request asks of the search, the model's defaults filled in.
#[derive(Clone, Copy)]
struct SearchChoice {
    strategy: Strategy,
    rule: BudgetRule,
    select: Select,
    adaptive: bool,
}

/// Fills the strategy, rule, selection and budget kind from the model's
/// defaults. A model without a PRM falls back from defaults that need one
/// (the built-in ones do) to those that do not; [`check_choice`] then gives
/// 400 to a request that names them.
fn choose(w: &ReasoningWire, rl: &RequestLimits<'_>) -> SearchChoice {
    let d = rl.reasoning;
    let strategy = w.strategy.unwrap_or(d.strategy);
    let rule = match w.budget_rule {
        Some(r) => r,
        None if d.budget_rule.needs_prm() && !rl.has_prm => BudgetRule::Vote,
        // A vote has nothing to count in a beam search; the paper's rule is
        // the one every PRM-scored search understands.
        None if strategy == Strategy::Beam && !d.budget_rule.needs_prm() => BudgetRule::Ias,
        None => d.budget_rule,
    };
    let select = match w.select {
        Some(s) => s,
        None if d.select.needs_prm() && !rl.has_prm => Select::Majority,
        None => d.select,
    };
    // Naming a rule asks for an adaptive budget.
    let adaptive = w.adaptive.unwrap_or(
        strategy != Strategy::Single && (rl.has_prm || !rule.needs_prm() || w.budget_rule.is_some()),
    );
    SearchChoice { strategy, rule, select, adaptive }
}

/// Refuses a combination the model or the strategy cannot serve, naming
/// the field that asked for it.
fn check_choice(c: &SearchChoice, w: &ReasoningWire, rl: &RequestLimits<'_>) -> Result<(), ValidationError> {
    let SearchChoice { strategy, rule, select, adaptive } = *c;
    let no_prm = |param: &str, what: &str| {
        ValidationError::new(
            param,
            format!(
                "{what} needs a PRM and model {:?} has none (configure `prm` for it, or use another model)",
                rl.model
            ),
        )
    };
    if adaptive && rule.needs_prm() && !rl.has_prm {
        let param = if w.budget_rule.is_some() { "reasoning.budget_rule" } else { "reasoning.adaptive" };
        return Err(no_prm(param, &format!("the {:?} budget rule", rule.name())));
    }
    if !adaptive && w.budget_rule.is_some() {
        return Err(ValidationError::new(
            "reasoning.budget_rule",
            "a budget rule sets an adaptive budget, and this request's budget is fixed (adaptive false, or the single strategy); drop budget_rule or set adaptive true",
        ));
    }
    if adaptive && strategy == Strategy::Single {
        return Err(ValidationError::new(
            "reasoning.adaptive",
            "the single strategy has no budget to adapt; use best_of_n or beam",
        ));
    }
    if strategy == Strategy::Beam && !rl.has_prm {
        return Err(no_prm("reasoning.strategy", "beam search"));
    }
    if adaptive && strategy == Strategy::Beam && rule == BudgetRule::Vote {
        return Err(ValidationError::new(
            "reasoning.budget_rule",
            "the \"vote\" budget rule applies to best_of_n; beam search takes \"ias\", \"sequential\" or \"give_up\"",
        ));
    }
    // The single strategy selects nothing, but naming a PRM selection on a
    // model without one is refused all the same.
    if (strategy != Strategy::Single || w.select.is_some()) && select.needs_prm() && !rl.has_prm {
        return Err(no_prm("reasoning.select", &format!("select {:?}", select.name())));
    }
    Ok(())
}

fn reasoning_params(
    w: &ReasoningWire,
    rl: RequestLimits<'_>,
    n: usize,
    max_tokens: usize,
) -> Result<ReasoningParams, ValidationError> {
    let d = rl.reasoning;
    let choice = choose(w, &rl);
    check_choice(&choice, w, &rl)?;
    let SearchChoice { strategy, rule, select, adaptive } = choice;
    let own = d.round_knobs(strategy);
    let checked = knobs::check(
        KnobValues {
            max_samples: w.max_samples.unwrap_or(d.max_samples as i64),
            beam_width: w.beam_width.unwrap_or(d.beam_width as i64),
            beams: w.beams.unwrap_or(d.beams as i64),
            prune_every: w.prune_every.unwrap_or(d.prune_every as i64),
            confidence: w.confidence.unwrap_or(own.confidence),
            budget_quantile: w.budget_quantile.unwrap_or(d.budget_quantile),
            round_size: w.round_size.unwrap_or(own.round_size as i64),
            give_up_gain: w.give_up_gain.unwrap_or(own.give_up_gain),
            give_up_plausible: w.give_up_plausible.unwrap_or(d.give_up_plausible),
        },
        rl.max_sequences,
    )
    .map_err(|e| ValidationError::new(&e.key(), e.to_string()))?;
    // Each step is at least one token, so neither can usefully pass max_tokens.
    let limit = rl.limits.max_tokens as i64;
    let max_step_tokens = match w.max_step_tokens {
        Some(v) => in_range_i("reasoning.max_step_tokens", v, 1, limit)?,
        None => d.max_step_tokens,
    };
    let max_steps = match w.max_steps {
        Some(v) => in_range_i("reasoning.max_steps", v, 1, limit)?,
        None => d.max_steps,
    };
    let max_samples = checked.max_samples;
    if n > max_samples {
        return Err(ValidationError::new(
            "n",
            format!("n ({n}) must not exceed reasoning.max_samples ({max_samples})"),
        ));
    }
    Ok(ReasoningParams {
        strategy,
        budget: if adaptive { Budget::Adaptive } else { Budget::Fixed },
        max_samples,
        confidence: checked.confidence,
        budget_quantile: checked.budget_quantile,
        rule,
        round: checked.round_size,
        give_up_gain: checked.give_up_gain,
        give_up_plausible: checked.give_up_plausible,
        beam_width: checked.beam_width,
        beams: checked.beams,
        prune_every: checked.prune_every,
        select,
        answer: d.answer,
        candidates: if w.return_candidates.unwrap_or(false) { Candidates::Return } else { Candidates::Omit },
        n,
        max_tokens,
        max_step_tokens: max_step_tokens.min(max_tokens),
        max_steps,
    })
}

/// The temperatures a request may ask for (OpenAI's range); `ponder eval` takes the same.
pub const TEMPERATURE_RANGE: std::ops::RangeInclusive<f64> = 0.0..=2.0;

fn sampling(c: &Common<'_>) -> Result<SamplingParams, ValidationError> {
    let temperature = c.temperature.unwrap_or(1.0);
    if !TEMPERATURE_RANGE.contains(&temperature) {
        return Err(ValidationError::new(
            "temperature",
            format!(
                "temperature must be between {} and {}, got {temperature}",
                TEMPERATURE_RANGE.start(),
                TEMPERATURE_RANGE.end()
            ),
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ValidationError::new(
            "top_p",
            format!("top_p must be greater than 0 and at most 1, got {top_p}"),
        ));
    }
    let top_k = match c.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k > 0 => k as usize,
        k => return Err(ValidationError::new("top_k", format!("top_k must be -1, 0 or positive, got {k}"))),
    };
    // Without a seed each request draws its own, as OpenAI does.
    let seed = c.seed.map(|s| s as u64).unwrap_or_else(rand::random);
    let penalties = Penalties {
        presence: c.presence_penalty.unwrap_or(0.0) as f32,
        frequency: c.frequency_penalty.unwrap_or(0.0) as f32,
    };
    Ok(SamplingParams { temperature: temperature as f32, top_p: top_p as f32, top_k, seed, penalties })
}

fn stops(stop: &Option<StopWire>, limits: &Limits) -> Result<Vec<String>, ValidationError> {
    let list = match stop {
        None => Vec::new(),
        Some(StopWire::One(s)) => vec![s.clone()],
        Some(StopWire::Many(v)) => v.clone(),
    };
    if list.len() > limits.max_stop {
        return Err(ValidationError::new(
            "stop",
            format!("stop may hold at most {} strings, got {}", limits.max_stop, list.len()),
        ));
    }
    for s in &list {
        let chars = s.chars().count();
        if chars == 0 || chars > limits.max_stop_chars {
            return Err(ValidationError::new(
                "stop",
                format!("each stop string must have 1 to {} characters, got {chars}", limits.max_stop_chars),
            ));
        }
    }
    Ok(list)
}

#[allow(clippy::too_many_arguments)]
fn build(
    endpoint: Endpoint,
    model: String,
    prompts: Vec<Vec<u32>>,
    prompt_param: &str,
    prompt_text: String,
    question: String,
    c: Common<'_>,
    view: ModelView<'_>,
    rl: RequestLimits<'_>,
) -> Result<ValidRequest, ValidationError> {
    let limits = rl.limits;
    let n = in_range_i("n", c.n.unwrap_or(1), 1, limits.max_n as i64)?;
    if c.reasoning.is_none() && prompts.len() * n > rl.max_sequences {
        return Err(ValidationError::new(
            "n",
            format!(
                "{} prompts x n = {} sequences exceeds the {} a worker runs at once",
                prompts.len(),
                prompts.len() * n,
                rl.max_sequences
            ),
        ));
    }
    check_detail(&c, view.detail)?;
    let max_tokens = checked_max_tokens(&prompts, prompt_param, &c, view.context_length, limits)?;
    let reasoning = match c.reasoning {
        None => None,
        Some(w) => {
            if prompts.len() > 1 {
                return Err(ValidationError::new(prompt_param, "reasoning takes one prompt per request"));
            }
            if c.logprobs.is_some() {
                return Err(ValidationError::new("logprobs", "logprobs are not available with reasoning"));
            }
            if c.token_ids == TokenIds::Return {
                return Err(ValidationError::new(
                    "return_token_ids",
                    "token ids are not available with reasoning: answers are chosen as text",
                ));
            }
            if c.stop.as_ref().is_some_and(|s| !matches!(s, StopWire::Many(v) if v.is_empty())) {
                return Err(ValidationError::new(
                    "stop",
                    "reasoning steps end at blank lines; stop strings are not available with reasoning",
                ));
            }
            Some(reasoning_params(w, rl, n, max_tokens)?)
        }
    };
    let streaming = match (c.stream.unwrap_or(false), c.stream_options) {
        (false, _) => Streaming::Off,
        (true, Some(StreamOptions { include_usage: Some(true) })) => Streaming::On(UsageChunk::Send),
        (true, _) => Streaming::On(UsageChunk::Omit),
    };
    Ok(ValidRequest {
        model,
        endpoint,
        generation: GenerationRequest {
            prompts,
            n,
            sampling: sampling(&c)?,
            stop: stops(c.stop, limits)?,
            max_tokens,
            logprobs: c.logprobs,
            token_ids: c.token_ids,
            question,
            reasoning,
        },
        streaming,
        prompt_text,
    })
}

/// `max_tokens` (the model's default when absent), after checking that
/// every prompt is non-empty and that prompt and completion fit the context.
fn checked_max_tokens(
    prompts: &[Vec<u32>],
    prompt_param: &str,
    c: &Common<'_>,
    context: usize,
    limits: &Limits,
) -> Result<usize, ValidationError> {
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        let param = if prompts.len() > 1 { format!("{prompt_param}[{i}]") } else { prompt_param.to_string() };
        return Err(ValidationError::new(&param, format!("{prompt_param} must not be empty")));
    }
    if longest > limits.max_prompt_tokens {
        return Err(ValidationError::new(
            prompt_param,
            format!(
                "{prompt_param} has {longest} tokens, more than the limit of {}",
                limits.max_prompt_tokens
            ),
        ));
    }
    let room = context.saturating_sub(longest);
    let max_tokens = match c.max_tokens {
        Some(m) => in_range_i(c.max_tokens_param, m, 1, limits.max_tokens as i64)?,
        None => limits.default_max_tokens.min(room),
    };
    if longest + max_tokens > context || max_tokens == 0 {
        let message = match c.max_tokens {
            Some(_) => format!(
                "this model's context is {context} tokens; the prompt has {longest} and {} = {max_tokens} asks for {} in all",
                c.max_tokens_param,
                longest + max_tokens
            ),
            // No max_tokens given: the default shrank to the room left, which is none.
            None => format!(
                "this model's context is {context} tokens and the prompt has {longest}, which leaves no room for even one generated token"
            ),
        };
        return Err(ValidationError {
            param: Some(if c.max_tokens.is_some() { c.max_tokens_param } else { prompt_param }.to_string()),
            message,
            code: Some("context_length_exceeded"),
        });
    }
    Ok(max_tokens)
}

/// Refuses token details the model's engine does not return, rather than
/// answering with empty or made-up ones.
fn check_detail(c: &Common<'_>, detail: TokenDetail) -> Result<(), ValidationError> {
    if c.token_ids == TokenIds::Return && detail != TokenDetail::Full {
        return Err(ValidationError::new(
            "return_token_ids",
            "token ids are not available for this model: its remote engine's answer names tokens by text",
        ));
    }
    if c.logprobs.is_some() && detail == TokenDetail::TextOnly {
        return Err(ValidationError::new(
            "logprobs",
            "logprobs are not available for this model: its engine (llama.cpp's server) does not return them in a form ponder relays",
        ));
    }
    Ok(())
}

fn template_error(e: TokenizerError) -> ValidationError {
    match e {
        TokenizerError::NoChatTemplate | TokenizerError::Template(_) => {
            ValidationError { param: Some("messages".into()), message: e.to_string(), code: None }
        }
        other => ValidationError { param: None, message: other.to_string(), code: None },
    }
}

/// Longest `x-request-id` a client may send.
pub const MAX_REQUEST_ID: usize = 128;

/// A client-chosen request id (the `x-request-id` header), kept so that a
/// request can be followed from the client through proxies into ponder's
/// log: 1 to [`MAX_REQUEST_ID`] visible ASCII characters. `None` when the
/// header is absent; ponder then makes one.
pub fn request_id(header: Option<&[u8]>) -> Result<Option<String>, ValidationError> {
    let Some(bytes) = header else { return Ok(None) };
    if bytes.is_empty() || bytes.len() > MAX_REQUEST_ID || !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(ValidationError::new(
            "x-request-id",
            format!(
                "header `x-request-id` must be 1 to {MAX_REQUEST_ID} visible ASCII characters without spaces; got {} bytes: {:?}",
                bytes.len(),
                String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
            ),
        ));
    }
    Ok(Some(String::from_utf8(bytes.to_vec()).expect("visible ASCII is UTF-8")))
}

pub fn chat(
    req: ChatCompletionRequest,
    model: ModelView<'_>,
    rl: RequestLimits<'_>,
) -> Result<ValidRequest, ValidationError> {
    if req.messages.is_empty() {
        return Err(ValidationError::new("messages", "messages must hold at least one message"));
    }
    openai::check_chat(&req)?;
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ValidationError::new(
                    &format!("messages[{i}].role"),
                    format!("role must be system, developer, user or assistant, got {other:?}"),
                ));
            }
        };
        let content = match &m.content {
            // OpenAI's assistant turns may carry tool calls instead of text;
            // every other turn has content.
            None if role == "assistant" => String::new(),
            None => {
                return Err(ValidationError::new(
                    &format!("messages[{i}].content"),
                    format!("a {} message needs content (a string or text parts)", m.role),
                ));
            }
            Some(ContentWire::Text(t)) => t.clone(),
            Some(ContentWire::Parts(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(ValidationError::new(
                                &format!("messages[{i}].content[{j}]"),
                                format!("only text content parts are supported, got type {kind:?}"),
                            ));
                        }
                    }
                }
                text
            }
        };
        messages.push(ChatMessage::new(role, content));
    }
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (false, None) => None,
        (false, Some(_)) => {
            return Err(ValidationError::new("top_logprobs", "top_logprobs needs logprobs set to true"));
        }
        (true, top) => {
            Some(in_range_i("top_logprobs", top.unwrap_or(0), 0, rl.limits.max_top_logprobs as i64)?)
        }
    };
    let tok = model.tokenizer;
    let text = tok.apply_chat_template(&messages).map_err(template_error)?;
    let ids = tok.encode(&text, AddSpecial::No).map_err(template_error)?;
    let (max_tokens, max_tokens_param) = match (req.max_completion_tokens, req.max_tokens) {
        (Some(m), _) => (Some(m), "max_completion_tokens"),
        (None, m) => (m, "max_tokens"),
    };
    let c = Common {
        max_tokens,
        max_tokens_param,
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        n: req.n,
        seed: req.seed,
        stop: &req.stop,
        stream: req.stream,
        stream_options: req.stream_options,
        logprobs,
        token_ids: TokenIds::Omit,
        reasoning: req.reasoning.as_ref(),
    };
    let question =
        messages.iter().rev().find(|m| m.role == "user").map_or_else(String::new, |m| m.content.clone());
    build(Endpoint::Chat, req.model.clone(), vec![ids], "messages", text, question, c, model, rl)
}

/// The prompts' token ids and texts: text is tokenized, token ids are
/// checked against the vocabulary and decoded (for a text-reading PRM).
fn completion_prompts(
    prompt: &PromptWire,
    tok: &Tokenizer,
    add_special: AddSpecial,
) -> Result<(Vec<Vec<u32>>, Vec<String>), ValidationError> {
    let empty = || ValidationError::new("prompt", "prompt must hold at least one string or token id");
    let from_ids = |i: usize, ids: &[Integral]| -> Result<(Vec<u32>, String), ValidationError> {
        let vocab = tok.vocab_size() as i64;
        let param = format!("prompt[{i}]");
        if ids.is_empty() {
            return Err(ValidationError::new(&param, "a token-id prompt must hold at least one token"));
        }
        let ids = ids
            .iter()
            .enumerate()
            .map(|(j, &Integral(t))| {
                if (0..vocab).contains(&t) {
                    Ok(t as u32)
                } else {
                    Err(ValidationError::new(
                        &param,
                        format!(
                            "token id {t} at position {j} is outside the vocabulary (0 to {})",
                            vocab - 1
                        ),
                    ))
                }
            })
            .collect::<Result<Vec<u32>, _>>()?;
        let text = tok.decode_all(&ids).map_err(|e| ValidationError::new(&param, e.to_string()))?;
        Ok((ids, text))
    };
    let encode = |t: &String| {
        tok.encode(t, add_special)
            .map(|ids| (ids, t.clone()))
            .map_err(|e| ValidationError::new("prompt", e.to_string()))
    };
    let pairs: Vec<(Vec<u32>, String)> = match prompt {
        PromptWire::One(s) => vec![encode(s)?],
        PromptWire::Many(v) if v.is_empty() => return Err(empty()),
        PromptWire::Many(v) => v.iter().map(encode).collect::<Result<_, _>>()?,
        PromptWire::Tokens(ids) => vec![from_ids(0, ids)?],
        PromptWire::ManyTokens(v) if v.is_empty() => return Err(empty()),
        PromptWire::ManyTokens(v) => {
            v.iter().enumerate().map(|(i, ids)| from_ids(i, ids)).collect::<Result<_, _>>()?
        }
    };
    Ok(pairs.into_iter().unzip())
}

pub fn completion(
    req: CompletionRequest,
    model: ModelView<'_>,
    rl: RequestLimits<'_>,
) -> Result<ValidRequest, ValidationError> {
    openai::check_completion(&req)?;
    let tok = model.tokenizer;
    let (prompts, texts) = completion_prompts(&req.prompt, tok, AddSpecial::Yes)?;
    let logprobs = match req.logprobs {
        None => None,
        Some(k) => Some(in_range_i("logprobs", k, 0, rl.limits.max_top_logprobs as i64)?),
    };
    let c = Common {
        max_tokens: req.max_tokens,
        max_tokens_param: "max_tokens",
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        n: req.n,
        seed: req.seed,
        stop: &req.stop,
        stream: req.stream,
        stream_options: req.stream_options,
        logprobs,
        token_ids: if req.return_token_ids == Some(true) { TokenIds::Return } else { TokenIds::Omit },
        reasoning: req.reasoning.as_ref(),
    };
    let prompt_text = texts.join("\n");
    // The PRM reads the question as a chat user's message; a prompt that
    // already wraps it in the model's template would put the template's
    // markup in front of the PRM as part of the question.
    let question = match req.reasoning {
        Some(_) => tok.user_turn(&prompt_text).unwrap_or_else(|| prompt_text.clone()),
        None => prompt_text.clone(),
    };
    build(Endpoint::Completion, req.model.clone(), prompts, "prompt", prompt_text, question, c, model, rl)
}

/// A `/pooling` request: the PRM's name and each input's token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidPooling {
    pub model: String,
    pub inputs: Vec<Vec<u32>>,
}

/// Tasks `/pooling` answers: vLLM's current and older names for per-token
/// classification.
const POOLING_TASKS: [&str; 2] = ["token_classify", "reward"];

pub fn pooling(
    req: crate::wire::PoolingRequest,
    tok: &Tokenizer,
    context_length: usize,
    limits: &Limits,
) -> Result<ValidPooling, ValidationError> {
    if let Some(task) = req.task.as_deref().filter(|t| !POOLING_TASKS.contains(t)) {
        return Err(ValidationError::new(
            "task",
            format!("task must be one of {POOLING_TASKS:?} (a PRM's per-step scores); got {task:?}"),
        ));
    }
    // Inputs come formatted by the client, template and tags included.
    let (inputs, _) = completion_prompts(&req.input, tok, AddSpecial::No).map_err(|e| ValidationError {
        // The shared prompt checks name `prompt`; this request's field is `input`.
        param: e.param.map(|p| p.replacen("prompt", "input", 1)),
        message: e.message.replace("prompt", "input"),
        ..e
    })?;
    if let Some((i, ids)) = inputs.iter().enumerate().find(|(_, ids)| ids.len() > limits.max_prompt_tokens) {
        return Err(ValidationError::new(
            &format!("input[{i}]"),
            format!(
                "input {i} is {} tokens; the limit is limits.max_prompt_tokens = {}",
                ids.len(),
                limits.max_prompt_tokens
            ),
        ));
    }
    if let Some((i, ids)) = inputs.iter().enumerate().find(|(_, ids)| ids.len() > context_length) {
        return Err(ValidationError {
            param: Some(format!("input[{i}]")),
            message: format!("input {i} is {} tokens; the PRM's context is {context_length}", ids.len()),
            code: Some("context_length_exceeded"),
        });
    }
    Ok(ValidPooling { model: req.model, inputs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;

    fn params(w: ReasoningWire) -> ReasoningParams {
        let (limits, defaults) = (Limits::default(), ReasoningDefaults::default());
        let rl = RequestLimits {
            limits: &limits,
            max_sequences: 256,
            reasoning: &defaults,
            has_prm: true,
            model: "m",
        };
        reasoning_params(&w, rl, 1, 64).expect("a valid request")
    }

    #[test]
    fn beam_search_takes_its_own_default_confidence_round_size_and_gain_floor() {
        let d = ReasoningDefaults::default();
        let beam = params(ReasoningWire { strategy: Some(Strategy::Beam), ..Default::default() });
        assert_eq!(
            (beam.confidence, beam.round, beam.give_up_gain),
            (d.beam_confidence, d.beam_round_size, d.beam_give_up_gain)
        );
        let best_of_n = params(ReasoningWire { strategy: Some(Strategy::BestOfN), ..Default::default() });
        assert_eq!(
            (best_of_n.confidence, best_of_n.round, best_of_n.give_up_gain),
            (d.confidence, d.round_size, d.give_up_gain)
        );
        // A request's own values apply to either strategy.
        let named = params(ReasoningWire {
            strategy: Some(Strategy::Beam),
            confidence: Some(0.5),
            round_size: Some(3),
            give_up_gain: Some(0.2),
            ..Default::default()
        });
        assert_eq!((named.confidence, named.round, named.give_up_gain), (0.5, 3, 0.2));
    }
}
