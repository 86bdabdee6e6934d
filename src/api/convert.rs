//! Worker events to wire types, shared by whole-body responses and SSE
//! chunks so that both print the same figures.

use crate::backend::{JobStats, ReasoningReport, TokenOut, TokenPlace};
use crate::reasoning::{Budget, Candidates, Stop};
use crate::wire::{
    CandidateOut, ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, PonderInfo, TopLogprob, Usage,
};

/// The `ponder` object of a reasoning request's response.
pub(crate) fn ponder_info(r: &ReasoningReport) -> PonderInfo {
    let a = &r.accounting;
    PonderInfo {
        strategy: r.params.strategy,
        adaptive: r.params.budget == Budget::Adaptive,
        budget_rule: a.rule,
        stop_reason: a.stop,
        gave_up: a.stop == Stop::GaveUp,
        rounds: a.rounds,
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

pub(crate) fn chat_logprobs(tokens: &[TokenOut]) -> ChatLogprobs {
    ChatLogprobs {
        content: in_text(tokens)
            .map(|t| ChatTokenLogprob {
                token: t.text.clone(),
                logprob: t.logprob,
                bytes: t.bytes.clone(),
                top_logprobs: t
                    .top
                    .iter()
                    .map(|a| TopLogprob { token: a.text.clone(), logprob: a.logprob, bytes: a.bytes.clone() })
                    .collect(),
            })
            .collect(),
    }
}

/// The completions logprobs layout, `text_offset` in characters of the
/// choice's text (as vLLM and OpenAI count them).
pub(crate) fn completion_logprobs(tokens: &[TokenOut]) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for t in in_text(tokens) {
        out.tokens.push(t.text.clone());
        out.token_logprobs.push(t.logprob);
        out.top_logprobs.push(t.top.iter().map(|a| (a.text.clone(), serde_json::json!(a.logprob))).collect());
        out.text_offset.push(t.offset);
    }
    out
}

/// The tokens whose text is in the returned text.
fn in_text(tokens: &[TokenOut]) -> impl Iterator<Item = &TokenOut> {
    tokens.iter().filter(|t| t.place == TokenPlace::Text)
}
