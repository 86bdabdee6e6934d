//! What travels between the HTTP side and a worker: a validated generation
//! request with its reply channel, and the events sent back.

use std::time::Instant;

use tokio::sync::mpsc;

use crate::engine::{FinishReason, SamplingParams};
use crate::reasoning::{Accounting, Candidate, ReasoningParams};

use super::admission::SeqPermit;

/// A generation the worker runs: `n` choices for each prompt.
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
    /// The question as text (what a text-reading PRM scores).
    pub question: String,
    /// Search with a PRM instead of plain sampling.
    pub reasoning: Option<ReasoningParams>,
}

impl GenerationRequest {
    /// Sequences this request may occupy at once: one per choice, or the
    /// most trajectories its reasoning strategy can hold.
    pub fn sequences(&self) -> usize {
        match &self.reasoning {
            Some(r) => r.max_samples.max(r.beams * r.beam_width).max(self.n),
            None => self.prompts.len() * self.n,
        }
    }

    /// Choices the response holds.
    pub fn choices(&self) -> usize {
        self.prompts.len() * self.n
    }
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

/// An admitted request on its way to a worker.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub request: GenerationRequest,
    pub reply: mpsc::Sender<GenEvent>,
    pub permit: SeqPermit,
    /// When the HTTP request arrived.
    pub received: Instant,
    /// When admission accepted it.
    pub admitted: Instant,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenOut {
    pub id: u32,
    /// The token's text (lossy where a token holds part of a character).
    pub text: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobStats {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub queue_secs: f64,
    pub ttft_secs: Option<f64>,
}

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
    /// A reasoning request's accounting, sent before `Done`.
    Reasoning(Box<ReasoningReport>),
    /// Every choice finished.
    Done(JobStats),
    /// The worker could not complete the request; details are in its log.
    Failed,
}

/// Events waiting for room in a reply channel. Consecutive deltas of one
/// choice merge, so a slow reader costs memory bounded by the request's own
/// output, never blocking the worker.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    events: std::collections::VecDeque<GenEvent>,
}

/// Whether the client still listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    Open,
    Closed,
}

impl Outbox {
    pub(crate) fn push(&mut self, event: GenEvent) {
        if let (
            Some(GenEvent::Delta { choice: last, text, tokens }),
            GenEvent::Delta { choice, text: t2, tokens: k2 },
        ) = (self.events.back_mut(), &event)
            && last == choice
        {
            text.push_str(t2);
            tokens.extend(k2.iter().cloned());
            return;
        }
        self.events.push_back(event);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Sends what the channel has room for.
    pub(crate) fn flush(&mut self, tx: &mpsc::Sender<GenEvent>) -> Delivery {
        while let Some(ev) = self.events.pop_front() {
            match tx.try_send(ev) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    self.events.push_front(ev);
                    return Delivery::Open;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Delivery::Closed,
            }
        }
        if tx.is_closed() { Delivery::Closed } else { Delivery::Open }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(choice: usize, text: &str) -> GenEvent {
        GenEvent::Delta { choice, text: text.into(), tokens: vec![] }
    }

    #[test]
    fn a_full_channel_keeps_events_merged_in_order_until_there_is_room() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut out = Outbox::default();
        out.push(delta(0, "a"));
        out.push(delta(1, "x"));
        out.push(delta(1, "y"));
        assert_eq!(out.flush(&tx), Delivery::Open);
        assert_eq!(rx.try_recv().unwrap(), delta(0, "a"));
        assert_eq!(out.flush(&tx), Delivery::Open);
        assert_eq!(rx.try_recv().unwrap(), delta(1, "xy"));
        assert!(out.is_empty());
        drop(rx);
        out.push(delta(0, "z"));
        assert_eq!(out.flush(&tx), Delivery::Closed);
    }
}
