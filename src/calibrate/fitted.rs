//! What the calibration stages hand each other: the labelled rows by
//! role, a PRM's predictions on them, and a fitted head with its report
//! entry. Both head trainers (`run` for heads on the policy's hidden
//! states, `model_prm` for separate PRMs) produce these.

use std::collections::HashMap;
use std::path::PathBuf;

use super::labels::LabelRow;
use crate::prm::ScoreItem;

/// The labelled prefixes: the fitting questions split into training and
/// validation (every row), and the calibration rows of the fitting and the
/// held-out questions (no final answers).
pub(crate) struct Rows<'a> {
    pub train: &'a [LabelRow],
    pub val: &'a [LabelRow],
    pub fit: &'a [LabelRow],
    pub eval: &'a [LabelRow],
}

/// A PRM's predictions on a set of prefixes.
pub(crate) struct Scored {
    pub q10: Vec<f64>,
    /// The mean the quantiles imply: the calibrated point estimate.
    pub mean: Vec<f64>,
    /// The uncalibrated P(good).
    pub raw: Vec<f64>,
}

impl Scored {
    /// From quantile rows `(n, 3)` and raw probabilities.
    pub fn new(quantiles: Vec<Vec<f32>>, raw: Vec<f32>) -> Self {
        let sorted: Vec<crate::prm::Quantiles> =
            quantiles.iter().map(|v| crate::prm::Quantiles::sorted([v[0], v[1], v[2]])).collect();
        Self {
            q10: sorted.iter().map(|q| q.q10 as f64).collect(),
            mean: sorted.iter().map(|q| q.mean() as f64).collect(),
            raw: raw.into_iter().map(f64::from).collect(),
        }
    }
}

/// What fitting wrote and how it scores the fitting and held-out rows.
pub(crate) struct Fitted {
    pub head_path: PathBuf,
    /// `report.json`'s `head` object.
    pub head: serde_json::Value,
    /// One line for `report.md`.
    pub summary: String,
    pub fit: Scored,
    pub eval: Scored,
}

/// What a separate PRM reads of each labelled prefix: its question's text
/// and its steps.
pub(crate) fn score_items<'a>(
    questions: &'a HashMap<String, String>,
    rows: &'a [LabelRow],
) -> anyhow::Result<Vec<ScoreItem<'a>>> {
    rows.iter()
        .map(|r| {
            let question = questions
                .get(&r.question_id)
                .ok_or_else(|| anyhow::anyhow!("label row of unknown question {}", r.question_id))?;
            Ok(ScoreItem { question, steps: &r.prefix, hidden: None, logprobs: &[] })
        })
        .collect()
}
