//! One trajectory: its tokens, its KV cache, its sampler and stop state.
//! Dropping a sequence frees its cache (shared prefixes when the last
//! holder goes).

use crate::model::KvCache;
use crate::tokenizer::TextStream;

use super::sampling::{Sampler, SamplingParams};

/// Whether the model's end-of-generation tokens stop the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EosPolicy {
    #[default]
    Stop,
    /// Generate through EOS (benchmarks that need an exact token count).
    Ignore,
}

/// When a run of generation ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopCriteria {
    /// Tokens this run may generate.
    pub max_tokens: usize,
    /// Strings that end the run; matched on decoded text, across tokens.
    pub stop: Vec<String>,
    pub eos: EosPolicy,
}

impl StopCriteria {
    pub fn max_tokens(max_tokens: usize) -> Self {
        Self { max_tokens, stop: Vec::new(), eos: EosPolicy::Stop }
    }
}

/// How many per-token logprobs to record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Logprobs {
    #[default]
    None,
    /// The chosen token's logprob and this many alternatives (0..=20).
    Top(usize),
}

/// Whether a sequence that stops is fed its last token once more so that
/// the hidden state at that token (a PRM's input) is computed. The logits
/// of that pass are kept, so resuming costs nothing extra.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HiddenCapture {
    #[default]
    Never,
    AtStop,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SeqOptions {
    pub sampling: SamplingParams,
    pub stop: StopCriteria,
    pub logprobs: Logprobs,
    pub capture: HiddenCapture,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token.
    Eos,
    /// Stop string `index` of the run's criteria.
    Stop { index: usize },
    /// The run's `max_tokens`.
    Length,
    /// The model's context is full.
    ContextFull,
}

impl FinishReason {
    /// OpenAI's `finish_reason`.
    pub fn openai(self) -> &'static str {
        match self {
            FinishReason::Eos | FinishReason::Stop { .. } => "stop",
            FinishReason::Length | FinishReason::ContextFull => "length",
        }
    }

    /// Whether generation can go on after this stop.
    pub fn is_resumable(self) -> bool {
        matches!(self, FinishReason::Stop { .. } | FinishReason::Length)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Decoded text of a sequence and how much of it was already handed out.
#[derive(Debug, Clone, Default)]
pub(crate) struct TextState {
    pub(crate) stream: TextStream,
    pub(crate) text: String,
    /// Bytes of `text` returned as deltas so far.
    pub(crate) emitted: usize,
    /// Start of the current run's text.
    pub(crate) run_start: usize,
    /// End of the current run's text once a stop string cut it.
    pub(crate) run_end: Option<usize>,
}

#[derive(Debug)]
pub struct Sequence {
    pub(crate) id: u64,
    pub(crate) cache: KvCache,
    pub(crate) tokens: Vec<u32>,
    pub(crate) prompt_len: usize,
    /// Tokens not yet fed to the model (a prompt, or the last sampled token).
    pub(crate) pending: Vec<u32>,
    /// Next-token logits after the last fed token; `None` while tokens are pending.
    pub(crate) logits: Option<Vec<f32>>,
    /// Final hidden state at the last fed token.
    pub(crate) hidden: Option<Vec<f32>>,
    pub(crate) sampler: Sampler,
    pub(crate) opts: SeqOptions,
    pub(crate) run_tokens: usize,
    pub(crate) text: TextState,
    pub(crate) finish: Option<FinishReason>,
    pub(crate) logprobs: Vec<TokenLogprob>,
}

impl Sequence {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Prompt and generated tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// All generated text so far (stop strings excluded where a run ended on one).
    pub fn text(&self) -> &str {
        &self.text.text[..self.text.run_end.unwrap_or(self.text.text.len())]
    }

    /// Text of the current (or just finished) run.
    pub fn run_text(&self) -> &str {
        let end = self.text.run_end.unwrap_or(self.text.text.len());
        &self.text.text[self.text.run_start.min(end)..end]
    }

    /// Tokens generated in the current run.
    pub fn run_tokens(&self) -> usize {
        self.run_tokens
    }

    pub fn finish(&self) -> Option<FinishReason> {
        self.finish
    }

    pub fn is_running(&self) -> bool {
        self.finish.is_none()
    }

    /// Final hidden state (after the last norm) at the last token fed to the
    /// model: the last prompt token after prefill, a step's last token after
    /// a stop with [`HiddenCapture::AtStop`].
    pub fn hidden(&self) -> Option<&[f32]> {
        self.hidden.as_deref()
    }

    pub fn logprobs(&self) -> &[TokenLogprob] {
        &self.logprobs
    }

    pub fn options(&self) -> &SeqOptions {
        &self.opts
    }

    /// Positions held in the KV cache.
    pub fn cached_len(&self) -> usize {
        self.cache.len()
    }

    /// Every token is fed: the hidden state and logits are current.
    pub fn is_fed(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether the next `step` would feed tokens or sample.
    pub fn needs_work(&self) -> bool {
        self.finish.is_none() || self.wants_capture()
    }

    pub(crate) fn wants_capture(&self) -> bool {
        self.finish.is_some()
            && self.opts.capture == HiddenCapture::AtStop
            && !self.pending.is_empty()
            && self.finish != Some(FinishReason::ContextFull)
    }

    /// Starts a new run after a resumable stop, with new criteria; the text
    /// after the previous stop string belongs to the new run.
    pub fn resume(&mut self, stop: StopCriteria) {
        if let Some(end) = self.text.run_end.take() {
            let matched = match self.finish {
                Some(FinishReason::Stop { index }) => self.opts.stop.stop.get(index).map_or(0, String::len),
                _ => 0,
            };
            self.text.run_start = (end + matched).min(self.text.text.len());
            self.text.emitted = self.text.emitted.max(self.text.run_start);
        } else {
            self.text.run_start = self.text.text.len();
            self.text.emitted = self.text.text.len();
        }
        self.opts.stop = stop;
        self.run_tokens = 0;
        self.finish = None;
    }
}
