//! The reasoning knobs in one place: their per-model defaults (the
//! `[models.reasoning]` table) and their ranges. Request validation (wire
//! value, else the model's default) and configuration loading (the defaults
//! alone) apply the same [`check`], so a default that every request would
//! fail on stops start-up instead.

use serde::{Deserialize, Serialize};

use super::rules::BudgetRule;
use super::select::AnswerFormat;
use super::{Select, Strategy};

/// Per-model defaults of the `reasoning` request object.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReasoningDefaults {
    pub strategy: Strategy,
    /// N_max.
    pub max_samples: usize,
    /// C.
    pub confidence: f64,
    pub budget_quantile: f64,
    /// The adaptive budget rule. A model without a PRM uses `vote` when its
    /// configured rule needs a PRM (as the built-in default does).
    pub budget_rule: BudgetRule,
    /// Samples per round of the rules that draw in rounds.
    pub round_size: usize,
    /// `give_up`: the least expected gain of another round worth drawing.
    pub give_up_gain: f64,
    /// `give_up` (best-of-N): no giving up once a finished sample's raw PRM
    /// score exceeds this; 1 turns the check off.
    pub give_up_plausible: f64,
    /// C for beam search (whose rounds are whole searches, each narrow).
    pub beam_confidence: f64,
    /// Initial (and most kept) paths of each of beam search's rounds.
    pub beam_round_size: usize,
    /// `give_up`'s gain floor for beam search.
    pub beam_give_up_gain: f64,
    /// M_max.
    pub beam_width: usize,
    /// K_max.
    pub beams: usize,
    pub prune_every: usize,
    /// A model without a PRM selects by `majority` when this needs a PRM.
    pub select: Select,
    /// How answers are read for voting and for telling candidates apart.
    pub answer: AnswerFormat,
    /// Tokens per reasoning step.
    pub max_step_tokens: usize,
    /// Steps per trajectory.
    pub max_steps: usize,
}

impl Default for ReasoningDefaults {
    fn default() -> Self {
        Self {
            strategy: Strategy::BestOfN,
            max_samples: 64,
            // give_up at C 0.9, rounds of 2, a gain floor of 0.05 and no
            // giving up past a raw score of 0.03: the cheapest point among
            // C ≥ 0.9 within a point of fixed best-of-64 on all 1500 of
            // ponder-arith's calib questions and on each of their two
            // sweeps (docs/method.md).
            confidence: 0.9,
            budget_quantile: 0.1,
            budget_rule: BudgetRule::GiveUp,
            round_size: 2,
            give_up_gain: 0.05,
            give_up_plausible: 0.03,
            // Beam search's own: give_up at C 0.99 in rounds of 4 is the
            // cheapest beam setting within a point of fixed best-of-64 on
            // the same calib split.
            beam_confidence: 0.99,
            beam_round_size: 4,
            beam_give_up_gain: 0.01,
            beam_width: 8,
            beams: 8,
            prune_every: 1,
            select: Select::PrmMax,
            answer: AnswerFormat::Text,
            max_step_tokens: 128,
            max_steps: 20,
        }
    }
}

/// The knobs whose defaults depend on the strategy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundKnobs {
    pub confidence: f64,
    pub round_size: usize,
    pub give_up_gain: f64,
}

impl ReasoningDefaults {
    /// C, the round size and the gain floor for `strategy`: beam search has
    /// its own (its rounds are whole searches, each narrow, and its give-up
    /// tests read the kept paths).
    pub fn round_knobs(&self, strategy: Strategy) -> RoundKnobs {
        match strategy {
            Strategy::Beam => RoundKnobs {
                confidence: self.beam_confidence,
                round_size: self.beam_round_size,
                give_up_gain: self.beam_give_up_gain,
            },
            _ => RoundKnobs {
                confidence: self.confidence,
                round_size: self.round_size,
                give_up_gain: self.give_up_gain,
            },
        }
    }
}

/// The sizes and levels a request (or a model's defaults) asks for, before
/// their ranges are checked. Integers are `i64` so that a negative request
/// value is reported as given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnobValues {
    pub max_samples: i64,
    pub beam_width: i64,
    pub beams: i64,
    pub prune_every: i64,
    pub confidence: f64,
    pub budget_quantile: f64,
    pub round_size: i64,
    pub give_up_gain: f64,
    pub give_up_plausible: f64,
}

impl From<&ReasoningDefaults> for KnobValues {
    fn from(d: &ReasoningDefaults) -> Self {
        Self {
            max_samples: d.max_samples as i64,
            beam_width: d.beam_width as i64,
            beams: d.beams as i64,
            prune_every: d.prune_every as i64,
            confidence: d.confidence,
            budget_quantile: d.budget_quantile,
            round_size: d.round_size as i64,
            give_up_gain: d.give_up_gain,
            give_up_plausible: d.give_up_plausible,
        }
    }
}

/// The same values, in range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckedKnobs {
    pub max_samples: usize,
    pub beam_width: usize,
    pub beams: usize,
    pub prune_every: usize,
    pub confidence: f64,
    pub budget_quantile: f64,
    pub round_size: usize,
    pub give_up_gain: f64,
    pub give_up_plausible: f64,
}

/// A reasoning knob, by the name it has in a request's `reasoning` object
/// and in the `[models.reasoning]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Knob {
    MaxSamples,
    BeamWidth,
    Beams,
    PruneEvery,
    Confidence,
    BudgetQuantile,
    RoundSize,
    GiveUpGain,
    GiveUpPlausible,
    BeamConfidence,
    BeamRoundSize,
    BeamGiveUpGain,
    MaxStepTokens,
    MaxSteps,
}

impl Knob {
    pub fn name(self) -> &'static str {
        match self {
            Knob::MaxSamples => "max_samples",
            Knob::BeamWidth => "beam_width",
            Knob::Beams => "beams",
            Knob::PruneEvery => "prune_every",
            Knob::Confidence => "confidence",
            Knob::BudgetQuantile => "budget_quantile",
            Knob::RoundSize => "round_size",
            Knob::GiveUpGain => "give_up_gain",
            Knob::GiveUpPlausible => "give_up_plausible",
            Knob::BeamConfidence => "beam_confidence",
            Knob::BeamRoundSize => "beam_round_size",
            Knob::BeamGiveUpGain => "beam_give_up_gain",
            Knob::MaxStepTokens => "max_step_tokens",
            Knob::MaxSteps => "max_steps",
        }
    }
}

/// Who reads a [`KnobError`]: a request or config (`reasoning.round_size`,
/// the limit is a worker's `queue.max_running`) or `ponder eval`'s command
/// line (`--round-size`, the limit is its own per question).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    Request,
    Flags,
}

impl Naming {
    fn knob(self, k: Knob) -> String {
        match self {
            Naming::Request => format!("reasoning.{}", k.name()),
            Naming::Flags => format!("--{}", k.name().replace('_', "-")),
        }
    }

    fn who_runs(self) -> &'static str {
        match self {
            Naming::Request => "a worker runs at once (queue.max_running)",
            Naming::Flags => "`ponder eval` runs for one question",
        }
    }
}

/// What is wrong with the knob's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KnobProblem {
    /// Outside `range` (in words: "between 1 and 64"); `got` as given.
    Range { range: String, got: String },
    /// `beams` × `beam_width` paths exceed the sequences that run at once.
    TooManyPaths { paths: usize, limit: usize },
}

/// A knob out of range: which one, and what its limit and given value are.
/// Its `Display` is the request's wording; [`KnobError::message`] words it
/// for another reader.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.message(Naming::Request))]
pub struct KnobError {
    pub knob: Knob,
    pub problem: KnobProblem,
}

impl KnobError {
    fn range(knob: Knob, range: impl Into<String>, got: impl ToString) -> Self {
        KnobError { knob, problem: KnobProblem::Range { range: range.into(), got: got.to_string() } }
    }

    /// `reasoning.<knob>`: the field a request's error names.
    pub fn key(&self) -> String {
        Naming::Request.knob(self.knob)
    }

    /// The error in `naming`'s words, naming the limit and the value given.
    pub fn message(&self, naming: Naming) -> String {
        let name = naming.knob(self.knob);
        match &self.problem {
            KnobProblem::Range { range, got } => format!("{name} must be {range}, got {got}"),
            KnobProblem::TooManyPaths { paths, limit } => format!(
                "{} x {} = {paths} paths exceeds the {limit} sequences {}",
                naming.knob(Knob::Beams),
                naming.knob(Knob::BeamWidth),
                naming.who_runs()
            ),
        }
    }
}

/// Largest `prune_every`: a pruning point at least every this many steps.
pub const MAX_PRUNE_EVERY: i64 = 100;

fn int(knob: Knob, v: i64, lo: i64, hi: i64) -> Result<usize, KnobError> {
    if v < lo || v > hi {
        return Err(KnobError::range(knob, format!("between {lo} and {hi}"), v));
    }
    Ok(v as usize)
}

/// Checks every knob against its range; `max_sequences` is the running
/// limit of one worker, which bounds N_max and the beam's paths.
pub fn check(v: KnobValues, max_sequences: usize) -> Result<CheckedKnobs, KnobError> {
    let cap = max_sequences as i64;
    let max_samples = int(Knob::MaxSamples, v.max_samples, 1, cap)?;
    let beam_width = int(Knob::BeamWidth, v.beam_width, 1, cap)?;
    let beams = int(Knob::Beams, v.beams, 1, cap)?;
    let prune_every = int(Knob::PruneEvery, v.prune_every, 1, MAX_PRUNE_EVERY)?;
    let round_size = int(Knob::RoundSize, v.round_size, 1, cap)?;
    if !(0.0..1.0).contains(&v.give_up_gain) {
        return Err(KnobError::range(Knob::GiveUpGain, "at least 0 and less than 1", v.give_up_gain));
    }
    if !(0.0..=1.0).contains(&v.give_up_plausible) {
        return Err(KnobError::range(Knob::GiveUpPlausible, "between 0 and 1", v.give_up_plausible));
    }
    if beams * beam_width > max_sequences {
        let problem = KnobProblem::TooManyPaths { paths: beams * beam_width, limit: max_sequences };
        return Err(KnobError { knob: Knob::Beams, problem });
    }
    if !(v.confidence > 0.0 && v.confidence < 1.0) {
        return Err(KnobError::range(Knob::Confidence, "greater than 0 and less than 1", v.confidence));
    }
    if !(0.1..=0.9).contains(&v.budget_quantile) {
        return Err(KnobError::range(Knob::BudgetQuantile, "between 0.1 and 0.9", v.budget_quantile));
    }
    Ok(CheckedKnobs {
        max_samples,
        beam_width,
        beams,
        prune_every,
        confidence: v.confidence,
        budget_quantile: v.budget_quantile,
        round_size,
        give_up_gain: v.give_up_gain,
        give_up_plausible: v.give_up_plausible,
    })
}

/// The checks that only a model's defaults need (a request cannot set these).
pub fn check_defaults(d: &ReasoningDefaults, max_sequences: usize) -> Result<(), KnobError> {
    check(d.into(), max_sequences)?;
    // Beam search's C, round size and gain floor, under their own keys.
    let beam = KnobValues {
        confidence: d.beam_confidence,
        round_size: d.beam_round_size as i64,
        give_up_gain: d.beam_give_up_gain,
        ..d.into()
    };
    check(beam, max_sequences).map_err(|e| KnobError {
        knob: match e.knob {
            Knob::Confidence => Knob::BeamConfidence,
            Knob::RoundSize => Knob::BeamRoundSize,
            Knob::GiveUpGain => Knob::BeamGiveUpGain,
            k => k,
        },
        ..e
    })?;
    for (knob, v) in [(Knob::MaxStepTokens, d.max_step_tokens), (Knob::MaxSteps, d.max_steps)] {
        if v == 0 {
            return Err(KnobError::range(knob, "at least 1", v));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_defaults_pass_their_own_checks() {
        check_defaults(&ReasoningDefaults::default(), 64).unwrap();
    }

    #[test]
    fn an_out_of_range_knob_is_named_with_its_limit_and_value() {
        let d = ReasoningDefaults { max_samples: 100, ..Default::default() };
        let e = check_defaults(&d, 64).unwrap_err();
        assert_eq!(e.key(), "reasoning.max_samples");
        assert!(e.to_string().contains("between 1 and 64, got 100"), "{e}");
        let d = ReasoningDefaults { budget_quantile: 0.05, ..Default::default() };
        assert_eq!(check_defaults(&d, 64).unwrap_err().key(), "reasoning.budget_quantile");
        let d = ReasoningDefaults { beams: 16, ..Default::default() };
        assert!(check_defaults(&d, 64).unwrap_err().to_string().contains("128 paths"));
        let d = ReasoningDefaults { max_steps: 0, ..Default::default() };
        assert_eq!(check_defaults(&d, 64).unwrap_err().key(), "reasoning.max_steps");
        let d = ReasoningDefaults { round_size: 0, ..Default::default() };
        assert!(
            check_defaults(&d, 64)
                .unwrap_err()
                .to_string()
                .contains("round_size must be between 1 and 64, got 0")
        );
        let d = ReasoningDefaults { give_up_gain: 1.5, ..Default::default() };
        assert_eq!(check_defaults(&d, 64).unwrap_err().key(), "reasoning.give_up_gain");
        let d = ReasoningDefaults { beam_confidence: 1.0, ..Default::default() };
        let e = check_defaults(&d, 64).unwrap_err();
        assert_eq!(e.key(), "reasoning.beam_confidence");
        assert!(
            e.to_string().contains("beam_confidence must be greater than 0 and less than 1, got 1"),
            "{e}"
        );
        let d = ReasoningDefaults { beam_round_size: 0, ..Default::default() };
        assert_eq!(check_defaults(&d, 64).unwrap_err().key(), "reasoning.beam_round_size");
        let d = ReasoningDefaults { beam_give_up_gain: 1.0, ..Default::default() };
        assert_eq!(check_defaults(&d, 64).unwrap_err().key(), "reasoning.beam_give_up_gain");
    }

    #[test]
    fn an_error_words_the_knob_and_the_running_limit_for_its_reader() {
        let v = KnobValues::from(&ReasoningDefaults { beams: 16, ..Default::default() });
        let e = check(v, 64).unwrap_err();
        assert_eq!(
            e.message(Naming::Flags),
            "--beams x --beam-width = 128 paths exceeds the 64 sequences `ponder eval` runs for one question"
        );
        assert!(e.to_string().starts_with("reasoning.beams x reasoning.beam_width = 128 paths"), "{e}");
        let v = KnobValues::from(&ReasoningDefaults { round_size: 0, ..Default::default() });
        assert_eq!(
            check(v, 64).unwrap_err().message(Naming::Flags),
            "--round-size must be between 1 and 64, got 0"
        );
    }
}
