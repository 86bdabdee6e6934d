//! A plain (non-reasoning) request inside the scheduler: one root sequence
//! per prompt until its prompt is prefilled, then `n` choices forked from it
//! sharing its cache, each streaming its text deltas.

use std::time::Instant;

use crate::backend::{GenEvent, JobStats, TokenOut, TokenPlace, TopToken};
use crate::engine::{
    Engine, EngineError, EosPolicy, FinishReason, HiddenCapture, Logprobs, SeqOptions, SeqUpdate, Sequence,
    StopCriteria, child_seed,
};
use crate::metrics::ModelMetrics;
use crate::validation::TokenIds;

use super::job::{Job, Outbox};

/// A plain request's sequences and what it has sent.
pub(crate) struct Plain {
    /// Per prompt: its sequence until the prompt is prefilled (then forked into choices).
    roots: Vec<Option<Sequence>>,
    /// Per choice (`prompt * n + j`): `None` before the fork and after it finished.
    choices: Vec<Option<Sequence>>,
    finished: usize,
    first_token: Option<Instant>,
    last_token: Vec<Option<Instant>>,
    pub(crate) completion_tokens: usize,
    /// What [`sequences`](Self::sequences) handed out for the current step.
    stepped: Vec<Stepped>,
    /// Per choice: its tokens whose text is not sent yet.
    held: Vec<HeldTokens>,
}

/// A choice's tokens waiting for their text: a token goes out with the
/// delta that carries its first byte, so that logprobs and `token_ids`
/// arrive beside their text (streamed or whole alike), and tokens wholly
/// inside a stop string are marked as such.
#[derive(Debug, Default)]
struct HeldTokens {
    /// Each token with the byte of the sequence's text where its own starts.
    tokens: std::collections::VecDeque<(usize, TokenOut)>,
    /// The sequence's decoded text so far, in bytes and in characters.
    bytes: usize,
    chars: usize,
}

impl HeldTokens {
    /// Records the token of a step after which the sequence's text is `text`.
    fn push(&mut self, text: &str, token: impl FnOnce(usize) -> TokenOut) {
        let (start, offset) = (self.bytes, self.chars);
        // Text only ever grows by whole characters (the decoder holds
        // partial ones back), so `start` is a char boundary.
        self.chars += text.get(start..).map_or(0, |new| new.chars().count());
        self.bytes = text.len();
        self.tokens.push_back((start, token(offset)));
    }

    /// The tokens whose text starts before `emitted` bytes; at a finish,
    /// the rest too (marked when a stop string took their text).
    fn release(&mut self, emitted: usize, finished: Option<FinishReason>) -> Vec<TokenOut> {
        let mut out = Vec::new();
        while let Some((start, _)) = self.tokens.front()
            && (*start < emitted || finished.is_some())
        {
            let (start, mut t) = self.tokens.pop_front().expect("front checked above");
            if matches!(finished, Some(FinishReason::Stop { .. })) && start >= emitted {
                t.place = TokenPlace::StopString;
            }
            out.push(t);
        }
        out
    }
}

#[derive(Debug, Clone, Copy)]
enum Stepped {
    Root,
    Choice(usize),
}

fn seq_options(job: &Job, seed: u64) -> SeqOptions {
    let r = &job.request;
    SeqOptions {
        sampling: r.sampling.with_seed(seed),
        stop: StopCriteria { max_tokens: r.max_tokens, stop: r.stop.clone(), eos: EosPolicy::Stop },
        logprobs: r.logprobs.map_or(Logprobs::None, Logprobs::Top),
        capture: HiddenCapture::Never,
    }
}

impl Plain {
    pub(crate) fn start(engine: &Engine, job: &Job) -> Result<Self, EngineError> {
        let mut roots = Vec::with_capacity(job.request.prompts.len());
        for prompt in &job.request.prompts {
            // The root samples only when n = 1 (it is choice 0 of its prompt).
            let opts = seq_options(job, child_seed(job.request.sampling.seed, 0));
            roots.push(Some(engine.start(prompt.clone(), opts)?));
        }
        let choices = job.request.choices();
        Ok(Self {
            roots,
            choices: (0..choices).map(|_| None).collect(),
            finished: 0,
            first_token: None,
            last_token: vec![None; choices],
            completion_tokens: 0,
            stepped: Vec::new(),
            held: (0..choices).map(|_| HeldTokens::default()).collect(),
        })
    }

    /// Sequences this request holds until it ends: every unfinished choice.
    pub(crate) fn unfinished(&self, job: &Job) -> usize {
        job.request.choices() - self.finished
    }

    /// Whether any choice has sent a token.
    pub(crate) fn has_first_token(&self) -> bool {
        self.first_token.is_some()
    }

    /// No token sent yet, and no prompt has more than `chunk` tokens left
    /// to feed: two engine steps give every choice its first token.
    pub(crate) fn first_token_within_chunk(&self, chunk: usize) -> bool {
        let left = |s: &Sequence| s.prompt_len().saturating_sub(s.cached_len());
        !self.has_first_token() && self.roots.iter().flatten().all(|s| left(s) <= chunk)
    }

    pub(crate) fn is_done(&self, job: &Job) -> bool {
        self.finished == job.request.choices()
    }

    /// Sequences that need this step, in a stable order [`apply`](Self::apply) expects back.
    pub(crate) fn sequences(&mut self) -> Vec<&mut Sequence> {
        self.stepped.clear();
        let mut out = Vec::new();
        for root in self.roots.iter_mut().flatten().filter(|s| s.needs_work()) {
            self.stepped.push(Stepped::Root);
            out.push(root);
        }
        for (c, choice) in self.choices.iter_mut().enumerate() {
            if let Some(seq) = choice.as_mut().filter(|s| s.needs_work()) {
                self.stepped.push(Stepped::Choice(c));
                out.push(seq);
            }
        }
        out
    }

    /// Applies one step's updates (in [`sequences`](Self::sequences) order):
    /// text deltas and finishes go to the outbox, finished choices free
    /// their caches at once. Returns the tokens generated.
    pub(crate) fn apply(
        &mut self,
        updates: &[SeqUpdate],
        job: &Job,
        engine: &Engine,
        metrics: &ModelMetrics,
        outbox: &mut Outbox,
    ) -> usize {
        let now = Instant::now();
        let mut tokens = 0;
        let stepped = std::mem::take(&mut self.stepped);
        for (update, slot) in updates.iter().zip(stepped) {
            metrics.prompt_tokens.inc_by(update.prefilled as u64);
            let Stepped::Choice(c) = slot else { continue };
            let seq = self.choices[c].as_ref().expect("a stepped choice exists");
            if update.token.is_some() {
                tokens += 1;
                self.completion_tokens += 1;
                metrics.generated_tokens.inc();
                if self.first_token.is_none() {
                    self.first_token = Some(now);
                    metrics.ttft.observe(now.duration_since(job.received).as_secs_f64());
                }
                if let Some(prev) = self.last_token[c].replace(now) {
                    metrics.itl.observe(now.duration_since(prev).as_secs_f64());
                }
            }
            let wants_ids = job.request.token_ids == TokenIds::Return;
            let tok = engine.tokenizer();
            let logprob = seq.logprobs().last().filter(|_| job.request.logprobs.is_some());
            if let Some(id) = update.token.filter(|_| logprob.is_some() || wants_ids) {
                self.held[c].push(&seq.text.text, |offset| TokenOut {
                    id,
                    text: tok.token_text(id),
                    bytes: tok.token_bytes(id),
                    // Ids only: no logprob was recorded, and none is shown.
                    logprob: logprob.map_or(f32::NAN, |lp| lp.logprob),
                    top: logprob.map_or_else(Vec::new, |lp| {
                        lp.top
                            .iter()
                            .map(|&(t, l)| TopToken {
                                text: tok.token_text(t),
                                bytes: tok.token_bytes(t),
                                logprob: l,
                            })
                            .collect()
                    }),
                    offset,
                    place: TokenPlace::Text,
                });
            }
            let token_out = self.held[c].release(seq.text.emitted, update.finished);
            if !update.delta.is_empty() || !token_out.is_empty() {
                outbox.push(GenEvent::Delta { choice: c, text: update.delta.clone(), tokens: token_out });
            }
            if let Some(reason) = update.finished {
                outbox.push(GenEvent::Finished { choice: c, reason });
                self.finished += 1;
                // Frees this choice's cache now, not when the request ends.
                self.choices[c] = None;
            }
        }
        tokens
    }

    /// Roots whose prompt is fully fed become their prompt's choices: the
    /// root itself when n = 1, else n forks sharing its cache.
    pub(crate) fn promote_prefilled_roots(&mut self, engine: &Engine, job: &Job) -> Result<(), EngineError> {
        let n = job.request.n;
        let seed = job.request.sampling.seed;
        for (p, slot) in self.roots.iter_mut().enumerate() {
            let ready = slot.as_ref().is_some_and(|s| s.cached_len() == s.prompt_len());
            if !ready {
                continue;
            }
            let mut root = slot.take().expect("checked above");
            if n == 1 {
                self.choices[p] = Some(root);
                continue;
            }
            let seeds: Vec<u64> = (0..n as u64).map(|j| child_seed(seed, j)).collect();
            for (j, child) in engine.fork(&mut root, &seeds)?.into_iter().enumerate() {
                self.choices[p * n + j] = Some(child);
            }
        }
        Ok(())
    }

    pub(crate) fn stats(&self, job: &Job, queue_secs: f64) -> JobStats {
        JobStats {
            prompt_tokens: job.request.prompts.iter().map(Vec::len).sum(),
            completion_tokens: self.completion_tokens,
            queue_secs,
            ttft_secs: self.first_token.map(|t| t.duration_since(job.received).as_secs_f64()),
        }
    }
}
