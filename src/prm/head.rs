//! The head PRM: a small network on the policy model's own final hidden
//! state (after the last norm) and its confidence in the tokens it wrote.
//! Features ([`feature_vector`]): the hidden state at the last token of the
//! prefix's last reasoning step (the token that completes the step
//! delimiter, or EOS); for the empty prefix, at the last prompt token; then
//! two numbers from the logprobs of the prefix's generated tokens: the
//! lowest one and how many fell below ln ½. The hidden state says how hard
//! the question is; the logprobs say where sampling took a turn the policy
//! itself found unlikely, the usual way an arithmetic step goes wrong. Both
//! come with generation, so scoring a trajectory costs nothing beyond
//! generating it.
//!
//! Two heads share the file: `quantile.*` (3 sigmoid outputs, the β = 0.1,
//! 0.5, 0.9 quantiles, trained with the pinball loss on Monte-Carlo labels)
//! and `raw.*` (one sigmoid output trained on hard labels with a binary
//! loss: the uncalibrated PRM that calibration is measured against).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{PrmError, PrmScore, Quantiles};

/// Shape of a head: `hidden` inputs, an optional ReLU layer, `outputs` sigmoids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadShape {
    pub hidden: usize,
    /// Units of the ReLU layer; 0 makes the head linear.
    pub units: usize,
    pub outputs: usize,
}

/// Weights of one head (trainable when built from `Var`s).
#[derive(Debug, Clone)]
pub struct Head {
    pub shape: HeadShape,
    fc1: Option<(Tensor, Tensor)>,
    out_w: Tensor,
    out_b: Tensor,
}

fn var(t: Tensor, vars: &mut Vec<Var>) -> candle_core::Result<Tensor> {
    let v = Var::from_tensor(&t)?;
    let t = v.as_tensor().clone();
    vars.push(v);
    Ok(t)
}

impl Head {
    /// Small random weights (seeded), as trainable variables.
    pub fn init(shape: HeadShape, seed: u64, device: &Device) -> candle_core::Result<(Self, Vec<Var>)> {
        use rand::SeedableRng;
        use rand_distr::{Distribution, Normal};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut vars = Vec::new();
        let mut normal = |rows: usize, cols: usize, std: f64| -> candle_core::Result<Tensor> {
            let dist = Normal::new(0.0, std).expect("std is positive");
            let data: Vec<f32> = (0..rows * cols).map(|_| dist.sample(&mut rng) as f32).collect();
            Tensor::from_vec(data, (rows, cols), device)
        };
        let (fc1, width) = if shape.units > 0 {
            let w = var(normal(shape.units, shape.hidden, (2.0 / shape.hidden as f64).sqrt())?, &mut vars)?;
            let b = var(Tensor::zeros(shape.units, DType::F32, device)?, &mut vars)?;
            (Some((w, b)), shape.units)
        } else {
            (None, shape.hidden)
        };
        let out_w = var(normal(shape.outputs, width, 0.01)?, &mut vars)?;
        let out_b = var(Tensor::zeros(shape.outputs, DType::F32, device)?, &mut vars)?;
        Ok((Self { shape, fc1, out_w, out_b }, vars))
    }

    /// A fixed linear head `sigmoid(x wᵀ + b)` with weight `(outputs, hidden)`.
    pub fn linear(out_w: Tensor, out_b: Tensor) -> candle_core::Result<Self> {
        let (outputs, hidden) = out_w.dims2()?;
        Ok(Self { shape: HeadShape { hidden, units: 0, outputs }, fc1: None, out_w, out_b })
    }

    /// The output layer's weight `(outputs, width)` and bias.
    pub fn output_layer(&self) -> (&Tensor, &Tensor) {
        (&self.out_w, &self.out_b)
    }

    /// A quantile head whose three outputs all equal this one-output head
    /// (as in the paper's reference: training starts from the uncalibrated PRM).
    pub fn to_quantile_init(&self) -> candle_core::Result<(Self, Vec<Var>)> {
        assert_eq!(self.shape.outputs, 1, "conversion starts from a one-output head");
        let mut vars = Vec::new();
        let fc1 = match &self.fc1 {
            Some((w, b)) => Some((var(w.copy()?, &mut vars)?, var(b.copy()?, &mut vars)?)),
            None => None,
        };
        let out_w = var(self.out_w.repeat((3, 1))?, &mut vars)?;
        let out_b = var(self.out_b.repeat(3)?, &mut vars)?;
        Ok((Self { shape: HeadShape { outputs: 3, ..self.shape }, fc1, out_w, out_b }, vars))
    }

    /// The same function of raw features `x` as this head has of
    /// standardised ones `(x − mean) / std`: training sees inputs of unit
    /// scale (the hidden state's coordinates differ by orders of magnitude),
    /// the saved head reads features as they come.
    pub fn fold_standardization(&self, mean: &Tensor, std: &Tensor) -> candle_core::Result<Self> {
        let fold = |w: &Tensor, b: &Tensor| -> candle_core::Result<(Tensor, Tensor)> {
            let w2 = w.broadcast_div(&std.unsqueeze(0)?)?;
            let shift = w2.matmul(&mean.unsqueeze(1)?)?.squeeze(1)?;
            Ok((w2, (b - shift)?))
        };
        let mut out = self.clone();
        match &self.fc1 {
            Some((w, b)) => out.fc1 = Some(fold(w, b)?),
            None => (out.out_w, out.out_b) = fold(&self.out_w, &self.out_b)?,
        }
        Ok(out)
    }

    /// The same head with its weights on `device`.
    pub fn to_device(&self, device: &Device) -> candle_core::Result<Self> {
        let fc1 = match &self.fc1 {
            Some((w, b)) => Some((w.to_device(device)?, b.to_device(device)?)),
            None => None,
        };
        let (out_w, out_b) = (self.out_w.to_device(device)?, self.out_b.to_device(device)?);
        Ok(Self { shape: self.shape, fc1, out_w, out_b })
    }

    /// Logits `(n, outputs)` for features `(n, hidden)`.
    pub fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = match &self.fc1 {
            Some((w, b)) => x.matmul(&w.t()?)?.broadcast_add(b)?.relu()?,
            None => x.clone(),
        };
        x.matmul(&self.out_w.t()?)?.broadcast_add(&self.out_b)
    }

    pub fn probabilities(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::sigmoid(&self.logits(x)?)
    }

    fn tensors(&self, prefix: &str, out: &mut HashMap<String, Tensor>) {
        if let Some((w, b)) = &self.fc1 {
            out.insert(format!("{prefix}.fc1.weight"), w.clone());
            out.insert(format!("{prefix}.fc1.bias"), b.clone());
        }
        out.insert(format!("{prefix}.out.weight"), self.out_w.clone());
        out.insert(format!("{prefix}.out.bias"), self.out_b.clone());
    }

    fn from_tensors(prefix: &str, t: &HashMap<String, Tensor>) -> Option<Self> {
        let out_w = t.get(&format!("{prefix}.out.weight"))?.clone();
        let out_b = t.get(&format!("{prefix}.out.bias"))?.clone();
        let fc1 = match (t.get(&format!("{prefix}.fc1.weight")), t.get(&format!("{prefix}.fc1.bias"))) {
            (Some(w), Some(b)) => Some((w.clone(), b.clone())),
            _ => None,
        };
        let (outputs, width) = out_w.dims2().ok()?;
        let (units, hidden) = match &fc1 {
            Some((w, _)) => w.dims2().ok()?,
            None => (0, width),
        };
        Some(Self { shape: HeadShape { hidden, units, outputs }, fc1, out_w, out_b })
    }
}

/// What the sidecar JSON says about a head file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadInfo {
    pub feature: String,
    pub hidden: usize,
    pub quantiles: Vec<f64>,
    #[serde(default)]
    pub notes: String,
}

pub const FEATURE: &str = "final hidden state (after the last norm) at the last token of each step \
                           (the last prompt token for the empty prefix), then the lowest logprob of the \
                           prefix's generated tokens / 5 (clamped to -4, 0 when none) and \
                           ln(1 + the number of them below ln 0.5)";

/// Inputs a head reads beyond the hidden state.
pub const CONFIDENCE_FEATURES: usize = 2;

/// A head's input: the hidden state, then the confidence features of the
/// prefix's generated tokens (`logprobs`: the policy's logprob of each).
pub fn feature_vector(hidden: &[f32], logprobs: &[f32]) -> Vec<f32> {
    // Scaled to about the hidden state's range; the clamp keeps one
    // near-impossible token (logprob -30 under top-k=0 sampling) from
    // dominating the ReLU layer.
    let lowest = logprobs.iter().copied().fold(0f32, f32::min).max(-20.0) / 5.0;
    let unlikely = logprobs.iter().filter(|&&l| l < -std::f32::consts::LN_2).count() as f32;
    let mut f = Vec::with_capacity(hidden.len() + CONFIDENCE_FEATURES);
    f.extend_from_slice(hidden);
    f.push(lowest);
    f.push(unlikely.ln_1p());
    f
}

/// Which output answers as the PRM's quantiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum HeadOutput {
    /// The calibrated quantile head.
    #[default]
    Calibrated,
    /// The uncalibrated head, its P(good) taken as every quantile.
    Raw,
}

/// The quantile head and (optionally) its raw counterpart.
#[derive(Debug, Clone)]
pub struct HeadPrm {
    pub quantile: Head,
    pub raw: Option<Head>,
    pub output: HeadOutput,
}

impl HeadPrm {
    /// The width of the hidden state it reads.
    pub fn hidden(&self) -> usize {
        self.inputs().saturating_sub(CONFIDENCE_FEATURES)
    }

    /// The width of its input, [`feature_vector`]'s length.
    pub fn inputs(&self) -> usize {
        self.quantile.shape.hidden
    }

    /// Scores a batch of feature vectors.
    pub fn score(&self, features: &[&[f32]]) -> Result<Vec<PrmScore>, PrmError> {
        if features.is_empty() {
            return Ok(Vec::new());
        }
        let h = self.inputs();
        if let Some(bad) = features.iter().find(|f| f.len() != h) {
            return Err(PrmError::Width { got: bad.len(), want: h });
        }
        let flat: Vec<f32> = features.iter().flat_map(|f| f.iter().copied()).collect();
        let x = Tensor::from_vec(flat, (features.len(), h), self.quantile.out_w.device())?;
        let q = self.quantile.probabilities(&x)?.to_vec2::<f32>()?;
        let raw = match &self.raw {
            Some(r) => Some(r.probabilities(&x)?.squeeze(D::Minus1)?.to_vec1::<f32>()?),
            None => None,
        };
        Ok(q.into_iter()
            .enumerate()
            .map(|(i, v)| {
                let raw = raw.as_ref().map(|r| r[i]);
                let quantiles = match (self.output, raw) {
                    (HeadOutput::Raw, Some(p)) => Quantiles::point(p),
                    _ => Quantiles::sorted([v[0], v[1], v[2]]),
                };
                PrmScore { quantiles, raw }
            })
            .collect())
    }

    pub fn save(&self, path: &Path, notes: &str) -> Result<(), PrmError> {
        let mut t = HashMap::new();
        self.quantile.tensors("quantile", &mut t);
        if let Some(r) = &self.raw {
            r.tensors("raw", &mut t);
        }
        candle_core::safetensors::save(&t, path)?;
        let info = HeadInfo {
            feature: FEATURE.into(),
            hidden: self.hidden(),
            quantiles: super::BETAS.to_vec(),
            notes: notes.to_string(),
        };
        let sidecar = path.with_extension("json");
        std::fs::write(&sidecar, serde_json::to_string_pretty(&info).expect("HeadInfo serialises"))
            .map_err(|e| PrmError::File { path: sidecar.display().to_string(), message: e.to_string() })
    }

    pub fn load(path: &Path) -> Result<Self, PrmError> {
        let err = |message: String| PrmError::File { path: path.display().to_string(), message };
        let t = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| err(e.to_string()))?;
        let quantile =
            Head::from_tensors("quantile", &t).ok_or_else(|| err("no quantile.out.* tensors".into()))?;
        if quantile.shape.outputs != 3 {
            return Err(err(format!("quantile head has {} outputs, not 3", quantile.shape.outputs)));
        }
        if quantile.shape.hidden <= CONFIDENCE_FEATURES {
            return Err(err(format!("quantile head reads {} inputs, too few", quantile.shape.hidden)));
        }
        let raw = Head::from_tensors("raw", &t);
        Ok(Self { quantile, raw, output: HeadOutput::Calibrated })
    }

    /// The same heads on `device`. They stay in f32 whatever the policy's
    /// dtype: they read f32 features (the hidden state and two logprob
    /// statistics) a few rows at a time, and were calibrated in f32.
    pub fn to_device(self, device: &Device) -> Result<Self, PrmError> {
        let raw = match &self.raw {
            Some(r) => Some(r.to_device(device)?),
            None => None,
        };
        Ok(Self { quantile: self.quantile.to_device(device)?, raw, output: self.output })
    }

    /// The same heads answering with the raw output.
    pub fn with_output(mut self, output: HeadOutput) -> Result<Self, PrmError> {
        if output == HeadOutput::Raw && self.raw.is_none() {
            return Err(PrmError::File { path: "prm head".into(), message: "has no raw head".into() });
        }
        self.output = output;
        Ok(self)
    }
}

impl super::Scorer for HeadPrm {
    fn score(&self, items: &[super::ScoreItem<'_>]) -> Result<Vec<PrmScore>, PrmError> {
        let features: Vec<Vec<f32>> = items
            .iter()
            .map(|i| i.hidden.map(|h| feature_vector(h, i.logprobs)).ok_or(PrmError::NoHiddenState))
            .collect::<Result<_, _>>()?;
        let refs: Vec<&[f32]> = features.iter().map(Vec::as_slice).collect();
        HeadPrm::score(self, &refs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_converted_head_starts_with_three_outputs_equal_to_the_raw_probability() {
        let dev = Device::Cpu;
        for units in [0, 8] {
            let (raw, _) = Head::init(HeadShape { hidden: 5, units, outputs: 1 }, 3, &dev).unwrap();
            let (q, vars) = raw.to_quantile_init().unwrap();
            assert_eq!(vars.len(), if units > 0 { 4 } else { 2 });
            let x = Tensor::randn(0f32, 1.0, (4, 5), &dev).unwrap();
            let p_raw = raw.probabilities(&x).unwrap().to_vec2::<f32>().unwrap();
            let p_q = q.probabilities(&x).unwrap().to_vec2::<f32>().unwrap();
            for (r, qs) in p_raw.iter().zip(&p_q) {
                assert!(qs.iter().all(|v| (v - r[0]).abs() < 1e-7), "{r:?} {qs:?}");
            }
        }
    }

    #[test]
    fn a_saved_head_loads_and_scores_sorted_quantiles() {
        let dev = Device::Cpu;
        let (raw, _) = Head::init(HeadShape { hidden: 4, units: 0, outputs: 1 }, 1, &dev).unwrap();
        let (quantile, _) = Head::init(HeadShape { hidden: 4, units: 6, outputs: 3 }, 2, &dev).unwrap();
        let prm = HeadPrm { quantile, raw: Some(raw), output: HeadOutput::Calibrated };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prm_head.safetensors");
        prm.save(&path, "test").unwrap();
        let back = HeadPrm::load(&path).unwrap();
        let f = [0.5f32, -1.0, 2.0, 0.1];
        let (a, b) = (prm.score(&[&f]).unwrap(), back.score(&[&f]).unwrap());
        assert_eq!(a, b);
        let q = a[0].quantiles;
        assert!(q.q10 <= q.q50 && q.q50 <= q.q90);
        assert!(a[0].raw.is_some());
        assert!(matches!(back.score(&[&[1.0, 2.0]]), Err(PrmError::Width { got: 2, want: 4 })));
        let info: HeadInfo =
            serde_json::from_str(&std::fs::read_to_string(path.with_extension("json")).unwrap()).unwrap();
        assert_eq!(info.hidden, 4 - CONFIDENCE_FEATURES);
    }

    #[test]
    fn a_folded_head_reads_raw_features_as_the_trained_one_read_standardised_ones() {
        let dev = Device::Cpu;
        for units in [0, 5] {
            let (h, _) = Head::init(HeadShape { hidden: 3, units, outputs: 2 }, 4, &dev).unwrap();
            let x = Tensor::new(&[[1.0f32, -2.0, 30.0], [0.5, 4.0, -10.0]], &dev).unwrap();
            let (mean, std) = (
                Tensor::new(&[0.5f32, 1.0, 10.0], &dev).unwrap(),
                Tensor::new(&[2.0f32, 0.5, 20.0], &dev).unwrap(),
            );
            let z = x.broadcast_sub(&mean).unwrap().broadcast_div(&std).unwrap();
            let want = h.logits(&z).unwrap().to_vec2::<f32>().unwrap();
            let got =
                h.fold_standardization(&mean, &std).unwrap().logits(&x).unwrap().to_vec2::<f32>().unwrap();
            for (a, b) in want.iter().flatten().zip(got.iter().flatten()) {
                assert!((a - b).abs() < 1e-5, "{want:?} {got:?}");
            }
        }
    }

    #[test]
    fn confidence_features_are_the_lowest_logprob_and_the_count_of_unlikely_tokens() {
        assert_eq!(feature_vector(&[1.0, 2.0], &[]), vec![1.0, 2.0, 0.0, 0.0]);
        let f = feature_vector(&[0.5], &[-0.1, -2.5, -1.0, -0.2]);
        assert_eq!(f[..2], [0.5, -0.5]);
        assert!((f[2] - 3f32.ln()).abs() < 1e-6, "two tokens below ln 1/2: {f:?}");
        assert_eq!(feature_vector(&[], &[-50.0])[0], -4.0, "clamped");
    }
}
