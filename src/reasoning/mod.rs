//! Per-request reasoning: single sampling, best-of-N and beam search, fixed
//! or instance-adaptive (IAS, Park et al. 2025: the budget follows a calibrated
//! PRM's estimate of the question's success probability), written as plain async code against two
//! calls — "extend these trajectories by one step" and "score these
//! prefixes" ([`Trajectories`]) — so the strategies read like the method and are
//! tested with a fake engine and scorer. The [`runtime`] runs them on the
//! engine, batching the steps of every request together.

pub mod ias;
pub mod knobs;
pub mod rules;
pub mod runtime;
pub mod select;
pub mod strategies;

use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::prm::{PrmScore, Quantiles};

pub use rules::{BudgetRule, Stop};
pub use strategies::run;

/// A trajectory handle, valid within one request.
pub type Traj = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Strategy {
    Single,
    BestOfN,
    Beam,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Single => "single",
            Strategy::BestOfN => "best_of_n",
            Strategy::Beam => "beam",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Select {
    /// The best final-step PRM score (median quantile).
    PrmMax,
    /// PRM-weighted vote over extracted answers.
    PrmVote,
    /// The most frequent extracted answer.
    Majority,
}

impl Select {
    pub fn name(self) -> &'static str {
        match self {
            Select::PrmMax => "prm_max",
            Select::PrmVote => "prm_vote",
            Select::Majority => "majority",
        }
    }

    pub fn needs_prm(self) -> bool {
        !matches!(self, Select::Majority)
    }
}

/// Whether the budget follows the PRM's estimate (IAS) or is fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    Fixed,
    Adaptive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Candidates {
    Omit,
    Return,
}

/// Validated reasoning parameters of one request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ReasoningParams {
    pub strategy: Strategy,
    pub budget: Budget,
    /// N_max: samples of best-of-N, initial samples of beam search.
    pub max_samples: usize,
    /// C: the coverage IAS aims for.
    pub confidence: f64,
    /// The quantile of the PRM's estimate IAS takes as p (and the rules
    /// take as an answer's success probability).
    pub budget_quantile: f64,
    /// How an adaptive budget is set.
    pub rule: BudgetRule,
    /// Samples per round (rules that draw in rounds).
    pub round: usize,
    /// `give_up`: the least expected gain of another round worth drawing.
    pub give_up_gain: f64,
    /// `give_up` (best-of-N): a raw PRM score of a finished sample above
    /// this keeps the request from giving up.
    pub give_up_plausible: f64,
    /// M_max: children per kept beam.
    pub beam_width: usize,
    /// K_max: beams kept at a pruning point.
    pub beams: usize,
    pub prune_every: usize,
    pub select: Select,
    /// How answers are read for voting and for telling candidates apart.
    pub answer: select::AnswerFormat,
    pub candidates: Candidates,
    /// Distinct answers to return.
    pub n: usize,
    /// Tokens per trajectory, all steps together.
    pub max_tokens: usize,
    pub max_step_tokens: usize,
    pub max_steps: usize,
}

impl ReasoningParams {
    /// The budget rule's knobs.
    pub fn rule_params(&self) -> rules::RuleParams {
        rules::RuleParams {
            rule: self.rule,
            confidence: self.confidence,
            quantile: self.budget_quantile,
            round: self.round,
            give_up_gain: self.give_up_gain,
            give_up_plausible: self.give_up_plausible,
            max_samples: self.max_samples,
        }
    }
}

/// What a trajectory holds so far.
#[derive(Debug, Clone, PartialEq)]
pub struct TrajInfo {
    pub steps: Vec<String>,
    pub text: String,
    /// No further step can be generated (EOS, a limit).
    pub finished: bool,
    /// Ended by the model (EOS) rather than a limit.
    pub ended: bool,
    pub tokens: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ReasoningError {
    #[error("reasoning needs a PRM and the model has none")]
    NoPrm,
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Prm(#[from] crate::prm::PrmError),
    #[error("unknown trajectory {0}")]
    UnknownTrajectory(Traj),
    /// A remote engine failed a step; its backend keeps the details.
    #[error("the remote engine failed a step")]
    Remote,
    #[error("PRM scoring did not finish: {0}")]
    Scoring(String),
}

/// The two calls strategies make, plus bookkeeping on trajectory handles.
pub trait Trajectories {
    /// The prompt alone (the empty prefix).
    fn root(&self) -> Traj;
    /// `k` children sharing `t`'s prefix.
    fn fork(&self, t: Traj, k: usize) -> Result<Vec<Traj>, ReasoningError>;
    /// Frees trajectories (their caches go at once).
    fn release(&self, ts: &[Traj]);
    fn info(&self, t: Traj) -> TrajInfo;
    /// Tokens generated so far by every trajectory of the request.
    fn generated_tokens(&self) -> usize;
    /// Extends every unfinished trajectory in `ts` by one step.
    fn extend(&self, ts: &[Traj]) -> impl Future<Output = Result<(), ReasoningError>>;
    /// PRM scores of the trajectories' current prefixes.
    fn score(&self, ts: &[Traj]) -> impl Future<Output = Result<Vec<PrmScore>, ReasoningError>>;
    /// Tells whoever watches the request (a streaming client) the budget the
    /// strategy has settled on and the best estimate so far.
    fn progress(&self, _budget: usize, _best: Option<Quantiles>) {}
}

/// One finished (or abandoned) path.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    pub text: String,
    pub answer: String,
    pub score: Option<PrmScore>,
    pub tokens: usize,
    pub steps: usize,
    /// Ended by the model (EOS) rather than a limit.
    pub ended: bool,
}

impl Candidate {
    /// Whether the path stated an answer: it neither said nothing nor was
    /// cut off by a limit before its answer (both leave `answer` empty).
    pub fn has_answer(&self) -> bool {
        !self.answer.is_empty()
    }
}

/// Compute spent and saved, against what the fixed-budget run would spend.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Accounting {
    pub samples: usize,
    pub fixed_samples: usize,
    pub tokens_generated: usize,
    pub fixed_tokens_estimate: usize,
    pub tokens_saved: usize,
    pub prm_evaluations: usize,
    /// Success-probability quantiles of the empty prefix (when scored).
    pub start: Option<Quantiles>,
    /// Of the selected answer (when scored).
    pub selected: Option<Quantiles>,
    /// Steps of the selected answer.
    pub steps: usize,
    /// The rule that set the budget (None for a fixed budget).
    pub rule: Option<BudgetRule>,
    /// Why the request stopped drawing.
    pub stop: Stop,
    /// Rounds of samples (best-of-N) or searches (beam) it went through.
    pub rounds: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    /// The selected answers, best first, distinct.
    pub answers: Vec<Candidate>,
    /// Every final candidate, when asked for.
    pub candidates: Vec<Candidate>,
    pub accounting: Accounting,
}
