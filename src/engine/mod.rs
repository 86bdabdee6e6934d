//! Generation: sequences with explicit KV caches, forked from shared
//! prefixes and decoded together, one token per sequence per `step`, with
//! per-sequence sampling and stop conditions. Knows nothing of HTTP.

mod args;
pub use args::ModelArgs;
pub mod sampling;
pub mod sequence;
pub mod stop;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::model::{AttentionPath, BatchEntry, Llama, ModelError, ModelSource, WeightFormat};
use crate::tokenizer::{Tokenizer, TokenizerError};

pub use sampling::{Penalties, SamplingParams, child_seed};
pub use sequence::{
    EosPolicy, FinishReason, HiddenCapture, Logprobs, SeqOptions, Sequence, StopCriteria, TokenLogprob,
};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("prompt is empty")]
    EmptyPrompt,
    #[error("prompt of {tokens} tokens leaves no room in the model's context of {max}")]
    PromptTooLong { tokens: usize, max: usize },
    #[error("cannot fork a sequence that has tokens waiting to be fed")]
    ForkBeforeFeed,
}

/// What one `step` did to one sequence.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeqUpdate {
    /// The token sampled in this step, if the sequence was sampled.
    pub token: Option<u32>,
    /// Text that became final in this step (partial stop-string matches are held back).
    pub delta: String,
    /// Set when the run ended in this step.
    pub finished: Option<FinishReason>,
    /// Prompt tokens fed in this step (prefill progress).
    pub prefilled: usize,
}

/// Engine-wide settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Most prompt tokens of one sequence fed in one step; longer prompts are
    /// prefilled over several steps so that decoding sequences keep moving.
    pub prefill_chunk: usize,
    /// Where the model attends (`Auto`: the host path for CPU f32 models).
    pub attention: AttentionPath,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self { prefill_chunk: 512, attention: AttentionPath::Auto }
    }
}

/// A model with its tokenizer; sequences are owned by the caller.
#[derive(Debug)]
pub struct Engine {
    model: Llama,
    tokenizer: Arc<Tokenizer>,
    opts: EngineOptions,
    next_id: AtomicU64,
}

impl Engine {
    pub fn new(model: Llama, tokenizer: Tokenizer, opts: EngineOptions) -> Self {
        Self { model, tokenizer: Arc::new(tokenizer), opts, next_id: AtomicU64::new(1) }
    }

    /// Loads weights and tokenizer from a GGUF file or an HF directory.
    pub fn load(
        path: &Path,
        format: WeightFormat,
        device: &Device,
        opts: EngineOptions,
    ) -> Result<Self, EngineError> {
        let source = ModelSource::detect(path)?;
        let tokenizer = match &source {
            ModelSource::Gguf(p) => Tokenizer::from_gguf_file(p)?,
            ModelSource::HfDir(d) => Tokenizer::from_hf_dir(d)?,
        };
        let model = source.load(format, device)?.with_attention(opts.attention)?;
        Ok(Self::new(model, tokenizer, opts))
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// Most prompt tokens of one sequence a `step` feeds.
    pub fn prefill_chunk(&self) -> usize {
        self.opts.prefill_chunk.max(1)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The tokenizer, shared (validation holds it without the weights).
    pub fn shared_tokenizer(&self) -> Arc<Tokenizer> {
        self.tokenizer.clone()
    }

    /// A sequence for `prompt`; the prompt is fed by the next `step`s.
    pub fn start(&self, prompt: Vec<u32>, opts: SeqOptions) -> Result<Sequence, EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let max = self.model.max_position();
        if prompt.len() >= max {
            return Err(EngineError::PromptTooLong { tokens: prompt.len(), max });
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= self.model.config().vocab) {
            return Err(ModelError::TokenOutOfRange { token: bad, vocab: self.model.config().vocab }.into());
        }
        Ok(Sequence {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            cache: self.model.new_cache(),
            prompt_len: prompt.len(),
            pending: prompt.clone(),
            tokens: prompt,
            logits: None,
            hidden: None,
            sampler: sampling::Sampler::new(opts.sampling),
            opts,
            run_tokens: 0,
            text: Default::default(),
            finish: None,
            logprobs: Vec::new(),
        })
    }

    /// `seeds.len()` children of `parent` that share its cached prefix (no
    /// copy: the parent's private cache is frozen into a shared segment) and
    /// its next-token logits, each sampling with its own seed.
    pub fn fork(&self, parent: &mut Sequence, seeds: &[u64]) -> Result<Vec<Sequence>, EngineError> {
        if !parent.pending.is_empty() {
            return Err(EngineError::ForkBeforeFeed);
        }
        Ok(seeds
            .iter()
            .map(|&seed| {
                let mut opts = parent.opts.clone();
                opts.sampling.seed = seed;
                let sampler = parent.sampler.child(seed);
                Sequence {
                    id: self.next_id.fetch_add(1, Ordering::Relaxed),
                    cache: parent.cache.fork(),
                    tokens: parent.tokens.clone(),
                    prompt_len: parent.prompt_len,
                    pending: Vec::new(),
                    logits: parent.logits.clone(),
                    hidden: parent.hidden.clone(),
                    sampler,
                    opts,
                    run_tokens: parent.run_tokens,
                    text: parent.text.clone(),
                    finish: parent.finish,
                    logprobs: parent.logprobs.clone(),
                }
            })
            .collect())
    }

    /// One decoding step over `seqs`: every running sequence with logits
    /// samples one token and checks its stop conditions; then one batched
    /// forward pass feeds every sampled token, prompt chunk and (for
    /// sequences that stopped with [`HiddenCapture::AtStop`]) final token.
    pub fn step(&self, seqs: &mut [&mut Sequence]) -> Result<Vec<SeqUpdate>, EngineError> {
        let mut updates = vec![SeqUpdate::default(); seqs.len()];
        let samples = |s: &Sequence| s.finish.is_none() && s.pending.is_empty();
        let sampling = seqs.iter().filter(|s| samples(s)).count();
        // Each draw reads a whole vocabulary (Qwen2.5's is 152k: ~0.5 ms);
        // 64 of them in a row would take longer than a GPU's forward pass.
        // Sequences draw from their own RNGs, so threads change no token.
        let draws: Vec<Option<u32>> =
            if sampling >= 2 && sampling * self.model.config().vocab >= PARALLEL_DRAW_FLOATS {
                seqs.par_iter_mut().map(|s| samples(s).then(|| draw(s))).collect()
            } else {
                seqs.iter_mut().map(|s| samples(s).then(|| draw(s))).collect()
            };
        for ((seq, update), token) in seqs.iter_mut().zip(updates.iter_mut()).zip(draws) {
            if let Some(token) = token {
                self.sample_one(seq, token, update)?;
            }
        }
        self.feed(seqs, &mut updates)?;
        Ok(updates)
    }

    /// Takes a drawn token: its text, stop conditions and update.
    fn sample_one(&self, seq: &mut Sequence, token: u32, update: &mut SeqUpdate) -> Result<(), EngineError> {
        seq.tokens.push(token);
        seq.pending.push(token);
        seq.run_tokens += 1;
        update.token = Some(token);

        let eos = seq.opts.stop.eos == EosPolicy::Stop && self.tokenizer.end_of_generation().contains(&token);
        let before = seq.text.text.len();
        if !eos && let Some(piece) = seq.text.stream.push(&self.tokenizer, token)? {
            seq.text.text.push_str(&piece);
        }
        // A run's first token also searches what the token that ended the
        // previous run left after its stop string.
        let start = seq.text.run_start;
        let new_from = if seq.run_tokens == 1 { start } else { before.max(start) };
        let stop_hit = stop::find_stop(&seq.text.text, start, new_from, &seq.opts.stop.stop);
        let finish = if eos {
            Some(FinishReason::Eos)
        } else if let Some(m) = stop_hit {
            seq.text.run_end = Some(m.start);
            Some(FinishReason::Stop { index: m.index })
        } else if seq.run_tokens >= seq.opts.stop.max_tokens {
            Some(FinishReason::Length)
        } else if seq.tokens.len() >= self.model.max_position() {
            Some(FinishReason::ContextFull)
        } else {
            None
        };
        let text = &seq.text.text;
        let ready = match finish {
            Some(_) => seq.text.run_end.unwrap_or(text.len()),
            None => text.len() - stop::partial_stop_len(&text[seq.text.run_start..], &seq.opts.stop.stop),
        };
        if ready > seq.text.emitted {
            update.delta = text[seq.text.emitted..ready].to_string();
            seq.text.emitted = ready;
        }
        seq.finish = finish;
        update.finished = finish;
        Ok(())
    }

    fn feed(&self, seqs: &mut [&mut Sequence], updates: &mut [SeqUpdate]) -> Result<(), EngineError> {
        let chunk = self.prefill_chunk();
        let mut fed: Vec<(usize, usize)> = Vec::new();
        let mut entries: Vec<BatchEntry<'_>> = Vec::new();
        for (i, seq) in seqs.iter_mut().enumerate() {
            let wanted = seq.finish.is_none() || seq.wants_capture();
            if !wanted || seq.pending.is_empty() {
                continue;
            }
            let n = seq.pending.len().min(chunk);
            fed.push((i, n));
            let seq: &mut Sequence = seq;
            entries.push(BatchEntry { tokens: &seq.pending[..n], cache: &mut seq.cache });
        }
        if entries.is_empty() {
            return Ok(());
        }
        let out = self.model.forward(&mut entries)?;
        drop(entries);
        // A row needs logits once its sequence has fed every pending token.
        let wants_logits: Vec<bool> = fed.iter().map(|&(i, n)| seqs[i].pending.len() == n).collect();
        let mut hidden = out.hidden.to_vec2::<f32>().map_err(ModelError::from)?.into_iter();
        let mut logits = pull_rows(&out.logits, &wants_logits)?.into_iter();
        for (&(i, n), &wants) in fed.iter().zip(&wants_logits) {
            let seq = &mut seqs[i];
            let was_prompt = seq.cache.len() - n < seq.prompt_len;
            if was_prompt {
                updates[i].prefilled = n;
            }
            seq.pending.drain(..n);
            seq.hidden = hidden.next();
            if wants {
                seq.logits = logits.next();
            }
        }
        Ok(())
    }
}

/// Logit values a step's draws read together past which they run on
/// several threads (below it, spawning costs more than it saves).
const PARALLEL_DRAW_FLOATS: usize = 1 << 20;

/// The vocabulary-sized part of sampling: the next token from the
/// sequence's logits, and its logprobs when asked for.
fn draw(seq: &mut Sequence) -> u32 {
    let logits = seq.logits.take().expect("a fed sequence without pending tokens holds logits");
    let token = seq.sampler.sample(&logits);
    if let Logprobs::Top(n) = seq.opts.logprobs {
        let (logprob, top) = sampling::logprobs(&logits, token, n);
        seq.logprobs.push(TokenLogprob { logprob, top });
    }
    token
}

/// The rows of `(rows, vocab)` logits marked in `wanted`, in one transfer
/// from the device (a copy per row on the host). Sampling stays on the host:
/// each sequence draws from its own seeded RNG with its own temperature,
/// top-k and top-p, and may ask for logprobs, so its distribution is read
/// whole; a vocabulary's worth of f32 per sequence is a small transfer next
/// to the weights a step reads.
fn pull_rows(logits: &Tensor, wanted: &[bool]) -> Result<Vec<Vec<f32>>, ModelError> {
    if wanted.iter().all(|&w| w) {
        return Ok(logits.to_vec2::<f32>()?);
    }
    let rows: Vec<u32> = (0..wanted.len() as u32).filter(|&r| wanted[r as usize]).collect();
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let picked = logits.index_select(&Tensor::new(rows.as_slice(), logits.device())?, 0)?;
    Ok(picked.to_vec2::<f32>()?)
}
