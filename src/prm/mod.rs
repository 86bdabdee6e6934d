//! Process reward models: for a question and a reasoning prefix (possibly
//! empty), the quantiles β ∈ {0.1, 0.5, 0.9} of the probability that the
//! policy, continuing from there, reaches a correct answer (Park et al. 2025), and
//! the uncalibrated score where there is one.
//!
//! - [`head::HeadPrm`]: a small head on the policy's own final hidden state
//!   at the end of each step (the near-free option: scoring costs almost
//!   nothing beyond generating; `--model ID=PATH` picks one up from
//!   `prm_head.safetensors` beside the model).
//! - [`model_prm::ModelPrm`]: a separate model in the Qwen2.5-Math-PRM
//!   format; ponder-arith's default PRM, its verifier, is one.
//! - [`remote::RemotePrm`]: such a model served elsewhere (vLLM's pooling
//!   API, or another ponder's `/pooling`), calibrated by a
//!   [`quantile_map::QuantileMap`] of its P(good).

pub mod config;
pub mod head;
pub mod model_prm;
pub mod quantile_map;
pub mod remote;
pub mod surprisal;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::WeightFormat;
pub use config::{ModelPrmConfig, PrmConfig};
use head::{HeadOutput, HeadPrm};
use model_prm::{HeadChoice, ModelPrm, ModelPrmOptions};

/// The quantile levels of every PRM output, ascending.
pub const BETAS: [f64; 3] = [0.1, 0.5, 0.9];

/// Success-probability quantiles, sorted so they never cross.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quantiles {
    pub q10: f32,
    pub q50: f32,
    pub q90: f32,
}

impl Quantiles {
    /// Sorts three quantile estimates (independent heads can cross).
    pub fn sorted(mut v: [f32; 3]) -> Self {
        v.sort_by(f32::total_cmp);
        Self { q10: v[0], q50: v[1], q90: v[2] }
    }

    /// All three equal (a point estimate).
    pub fn point(p: f32) -> Self {
        Self { q10: p, q50: p, q90: p }
    }

    /// The mean these quantiles imply (Swanson's rule, 0.3 / 0.4 / 0.3):
    /// the point estimate whose squared error the calibration report
    /// measures.
    pub fn mean(&self) -> f32 {
        0.3 * self.q10 + 0.4 * self.q50 + 0.3 * self.q90
    }

    /// The estimate at quantile level `beta` (0.1, 0.5 or 0.9; others
    /// interpolate linearly between them and clamp outside).
    pub fn at(&self, beta: f64) -> f32 {
        let (b, q) = (BETAS, [self.q10, self.q50, self.q90]);
        if beta <= b[0] {
            return q[0];
        }
        if beta >= b[2] {
            return q[2];
        }
        let i = if beta <= b[1] { 0 } else { 1 };
        let t = ((beta - b[i]) / (b[i + 1] - b[i])) as f32;
        q[i] + t * (q[i + 1] - q[i])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrmScore {
    pub quantiles: Quantiles,
    /// The uncalibrated PRM's P(good), where the PRM has one.
    pub raw: Option<f32>,
}

/// What a PRM may read about one prefix: the question and steps as text,
/// the policy's final hidden state at the prefix's last token and its
/// logprobs of the tokens it generated.
#[derive(Debug, Clone, Copy)]
pub struct ScoreItem<'a> {
    pub question: &'a str,
    pub steps: &'a [String],
    pub hidden: Option<&'a [f32]>,
    /// The policy's logprob of each generated token of the prefix (empty
    /// for the question alone).
    pub logprobs: &'a [f32],
}

/// The PRM interface: success-probability quantiles for a batch of prefixes.
pub trait Scorer: Send + Sync {
    fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<PrmScore>, PrmError>;
}

/// Loads the PRM a model's configuration names, answering with its
/// calibrated quantiles or its raw score, on the CPU. A head must read
/// hidden states of the policy's width (`policy_hidden`).
pub fn load(
    config: &PrmConfig,
    policy_hidden: usize,
    output: HeadOutput,
) -> Result<Arc<dyn Scorer>, PrmError> {
    load_on(config, policy_hidden, output, &candle_core::Device::Cpu, WeightFormat::Auto)
}

/// [`load`] on the policy's worker device: a head there (in f32), a
/// separate PRM's backbone there in `weights` (the policy's format).
pub fn load_on(
    config: &PrmConfig,
    policy_hidden: usize,
    output: HeadOutput,
    device: &candle_core::Device,
    weights: WeightFormat,
) -> Result<Arc<dyn Scorer>, PrmError> {
    match config {
        PrmConfig::Head(path) => {
            let head = HeadPrm::load(path)?.with_output(output)?.to_device(device)?;
            if head.hidden() != policy_hidden {
                return Err(PrmError::PolicyWidth { head: head.hidden(), policy: policy_hidden });
            }
            Ok(Arc::new(head))
        }
        PrmConfig::Model(m) => {
            let head = match output {
                HeadOutput::Raw => HeadChoice::TwoClass,
                HeadOutput::Calibrated => m.head.clone(),
            };
            let opts = ModelPrmOptions { head, lora: m.lora.clone() };
            Ok(Arc::new(ModelPrm::load_on(&m.model, &opts, device, weights)?))
        }
        PrmConfig::Remote(r) => Ok(Arc::new(remote::RemotePrm::new(r, output)?)),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PrmError {
    #[error("this PRM reads the policy's hidden state, which the caller did not give")]
    NoHiddenState,
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("PRM feature of width {got} does not fit a head for width {want}")]
    Width { got: usize, want: usize },
    #[error("the PRM's chat template left out the <extra_0> step markers")]
    NoStepToken,
    #[error("the PRM head reads hidden states of width {head}, the policy's are {policy}")]
    PolicyWidth { head: usize, policy: usize },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error("remote PRM: {0}")]
    Remote(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crossing_quantiles_are_sorted_and_interpolated() {
        let q = Quantiles::sorted([0.7, 0.2, 0.5]);
        assert_eq!((q.q10, q.q50, q.q90), (0.2, 0.5, 0.7));
        assert_eq!(q.at(0.1), 0.2);
        assert_eq!(q.at(0.05), 0.2);
        assert!((q.at(0.3) - 0.35).abs() < 1e-6);
        assert_eq!(q.at(0.95), 0.7);
        assert!((q.mean() - (0.06 + 0.2 + 0.21)).abs() < 1e-6);
    }
}
