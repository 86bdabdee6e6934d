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
    /// C for beam search (whose rounds are whole searches, each narrow).
    pub beam_confidence: f64,
    /// Initial (and most kept) paths of each of beam search's rounds.
    pub beam_round_size: usize,
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
            // give_up at C 0.9, rounds of 2 and a gain floor of 0.01: the
            // cheapest point within a point of fixed best-of-64 on
            // ponder-arith's calib split among C ≥ 0.9 (docs/method.md).
            confidence: 0.9,
            budget_quantile: 0.1,
            budget_rule: BudgetRule::GiveUp,
            round_size: 2,
            give_up_gain: 0.01,
            // Beam search's own: give_up at C 0.99 in rounds of 4 is the
            // cheapest beam setting within a point of fixed best-of-64 on
            // the same calib split.
            beam_confidence: 0.99,
            beam_round_size: 4,
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

impl ReasoningDefaults {
    /// C and the round size for `strategy`: beam search has its own (its
    /// rounds are whole searches, each narrow).
    pub fn confidence_and_round(&self, strategy: Strategy) -> (f64, usize) {
        match strategy {
            Strategy::Beam => (self.beam_confidence, self.beam_round_size),
            _ => (self.confidence, self.round_size),
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
}

/// A knob out of range: which one (`reasoning.<knob>`), and a message that
/// names the limit and the value given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct KnobError {
    pub key: String,
    pub message: String,
}

fn int(key: &str, v: i64, lo: i64, hi: i64) -> Result<usize, KnobError> {
    if v < lo || v > hi {
        return Err(KnobError {
            key: format!("reasoning.{key}"),
            message: format!("reasoning.{key} must be between {lo} and {hi}, got {v}"),
        });
    }
    Ok(v as usize)
}

/// Largest `prune_every`: a pruning point at least every this many steps.
pub const MAX_PRUNE_EVERY: i64 = 100;

/// Checks every knob against its range; `max_sequences` is the running
/// limit of one worker, which bounds N_max and the beam's paths.
pub fn check(v: KnobValues, max_sequences: usize) -> Result<CheckedKnobs, KnobError> {
    let cap = max_sequences as i64;
    let max_samples = int("max_samples", v.max_samples, 1, cap)?;
    let beam_width = int("beam_width", v.beam_width, 1, cap)?;
    let beams = int("beams", v.beams, 1, cap)?;
    let prune_every = int("prune_every", v.prune_every, 1, MAX_PRUNE_EVERY)?;
    let round_size = int("round_size", v.round_size, 1, cap)?;
    if !(0.0..1.0).contains(&v.give_up_gain) {
        return Err(KnobError {
            key: "reasoning.give_up_gain".into(),
            message: format!(
                "reasoning.give_up_gain must be at least 0 and less than 1, got {}",
                v.give_up_gain
            ),
        });
    }
    if beams * beam_width > max_sequences {
        return Err(KnobError {
            key: "reasoning.beams".into(),
            message: format!(
                "reasoning.beams x reasoning.beam_width = {} paths exceeds the {max_sequences} sequences a worker runs at once (queue.max_running)",
                beams * beam_width
            ),
        });
    }
    if !(v.confidence > 0.0 && v.confidence < 1.0) {
        return Err(KnobError {
            key: "reasoning.confidence".into(),
            message: format!(
                "reasoning.confidence must be greater than 0 and less than 1, got {}",
                v.confidence
            ),
        });
    }
    if !(0.1..=0.9).contains(&v.budget_quantile) {
        return Err(KnobError {
            key: "reasoning.budget_quantile".into(),
            message: format!(
                "reasoning.budget_quantile must be between 0.1 and 0.9, got {}",
                v.budget_quantile
            ),
        });
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
    })
}

/// The checks that only a model's defaults need (a request cannot set these).
pub fn check_defaults(d: &ReasoningDefaults, max_sequences: usize) -> Result<(), KnobError> {
    check(d.into(), max_sequences)?;
    // Beam search's C and round size, under their own keys.
    let beam = KnobValues { confidence: d.beam_confidence, round_size: d.beam_round_size as i64, ..d.into() };
    check(beam, max_sequences).map_err(|e| {
        let rename = |s: &str| {
            s.replace("reasoning.confidence", "reasoning.beam_confidence")
                .replace("reasoning.round_size", "reasoning.beam_round_size")
        };
        KnobError { key: rename(&e.key), message: rename(&e.message) }
    })?;
    for (key, v) in [("max_step_tokens", d.max_step_tokens), ("max_steps", d.max_steps)] {
        if v == 0 {
            return Err(KnobError {
                key: format!("reasoning.{key}"),
                message: format!("reasoning.{key} must be at least 1, got 0"),
            });
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
        assert_eq!(e.key, "reasoning.max_samples");
        assert!(e.message.contains("between 1 and 64, got 100"), "{e}");
        let d = ReasoningDefaults { budget_quantile: 0.05, ..Default::default() };
        assert_eq!(check_defaults(&d, 64).unwrap_err().key, "reasoning.budget_quantile");
        let d = ReasoningDefaults { beams: 16, ..Default::default() };
        assert!(check_defaults(&d, 64).unwrap_err().message.contains("128 paths"));
        let d = ReasoningDefaults { max_steps: 0, ..Default::default() };
        assert_eq!(check_defaults(&d, 64).unwrap_err().key, "reasoning.max_steps");
        let d = ReasoningDefaults { round_size: 0, ..Default::default() };
        assert!(
            check_defaults(&d, 64)
                .unwrap_err()
                .message
                .contains("round_size must be between 1 and 64, got 0")
        );
        let d = ReasoningDefaults { give_up_gain: 1.5, ..Default::default() };
        assert_eq!(check_defaults(&d, 64).unwrap_err().key, "reasoning.give_up_gain");
        let d = ReasoningDefaults { beam_confidence: 1.0, ..Default::default() };
        let e = check_defaults(&d, 64).unwrap_err();
        assert_eq!(e.key, "reasoning.beam_confidence");
        assert!(e.message.contains("beam_confidence must be greater than 0 and less than 1, got 1"), "{e}");
        let d = ReasoningDefaults { beam_round_size: 0, ..Default::default() };
        assert_eq!(check_defaults(&d, 64).unwrap_err().key, "reasoning.beam_round_size");
    }
}
