//! Training the PRM heads on labelled prefixes: the raw head on hard labels
//! with a binary loss, then the quantile head (initialised from the raw one)
//! with the pinball loss, both full-batch AdamW with early stopping on a
//! validation split of the questions.

use candle_core::{D, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use crate::model::{BatchEntry, Llama};
use crate::prm::BETAS;
use crate::prm::head::{Head, HeadShape};

use super::labels::LabelRow;

/// PRM features of labelled rows ([`crate::prm::head::feature_vector`]): the
/// final hidden state at each row's last token, computed in batches, and the
/// confidence features of its logprobs.
pub fn features(model: &Llama, rows: &[LabelRow]) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(32) {
        let mut caches: Vec<_> = chunk.iter().map(|_| model.new_cache()).collect();
        let mut batch: Vec<BatchEntry<'_>> = chunk
            .iter()
            .zip(caches.iter_mut())
            .map(|(r, c)| BatchEntry { tokens: &r.tokens, cache: c })
            .collect();
        let fwd = model.forward(&mut batch)?;
        let hidden = fwd.hidden.to_vec2::<f32>()?;
        out.extend(hidden.iter().zip(chunk).map(|(h, r)| crate::prm::head::feature_vector(h, &r.logprobs)));
    }
    Ok(out)
}

/// Mean pinball loss over samples and the three quantiles:
/// ρ_β(y − ŷ) = max(β (y − ŷ), (β − 1)(y − ŷ)).
pub fn pinball_loss(pred: &Tensor, label: &Tensor) -> candle_core::Result<Tensor> {
    let betas =
        Tensor::new(&[BETAS[0] as f32, BETAS[1] as f32, BETAS[2] as f32], pred.device())?.unsqueeze(0)?;
    let u = label.unsqueeze(1)?.broadcast_sub(pred)?;
    let a = u.broadcast_mul(&betas)?;
    let b = u.broadcast_mul(&(betas - 1.0)?)?;
    a.maximum(&b)?.mean_all()
}

/// Binary cross-entropy of logits against labels in [0, 1], computed stably.
pub fn bce_with_logits(logits: &Tensor, label: &Tensor) -> candle_core::Result<Tensor> {
    // max(x, 0) - x y + log(1 + exp(-|x|))
    let x = logits.squeeze(D::Minus1)?;
    let relu = x.relu()?;
    let soft = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    ((relu - (&x * label)?)? + soft)?.mean_all()
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitConfig {
    pub units: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub max_epochs: usize,
    pub patience: usize,
    pub seed: u64,
}

impl Default for FitConfig {
    fn default() -> Self {
        Self { units: 64, lr: 3e-3, weight_decay: 1e-2, max_epochs: 3000, patience: 150, seed: 0 }
    }
}

/// Features and labels as tensors.
pub struct Data {
    pub x: Tensor,
    pub soft: Tensor,
    pub hard: Tensor,
}

impl Data {
    pub fn new(features: &[Vec<f32>], rows: &[LabelRow]) -> candle_core::Result<Self> {
        let h = features.first().map_or(0, Vec::len);
        let flat: Vec<f32> = features.iter().flatten().copied().collect();
        let dev = Device::Cpu;
        Ok(Self {
            x: Tensor::from_vec(flat, (features.len(), h), &dev)?,
            soft: Tensor::from_vec(
                rows.iter().map(|r| r.success as f32).collect::<Vec<_>>(),
                rows.len(),
                &dev,
            )?,
            hard: Tensor::from_vec(
                rows.iter().map(|r| r.hard() as f32).collect::<Vec<_>>(),
                rows.len(),
                &dev,
            )?,
        })
    }
}

/// Training and validation data scaled by the training features' mean and
/// standard deviation (the hidden state's coordinates differ by orders of
/// magnitude); heads trained on them are folded back with
/// [`Head::fold_standardization`].
struct Standardized {
    mean: Tensor,
    std: Tensor,
    train: Data,
    val: Data,
}

impl Standardized {
    fn new(train: &Data, val: &Data) -> candle_core::Result<Self> {
        let mean = train.x.mean(0)?;
        let std = (train.x.broadcast_sub(&mean)?.sqr()?.mean(0)? + 1e-6)?.sqrt()?;
        let scale = |d: &Data| -> candle_core::Result<Data> {
            Ok(Data {
                x: d.x.broadcast_sub(&mean)?.broadcast_div(&std)?,
                soft: d.soft.clone(),
                hard: d.hard.clone(),
            })
        };
        let (train, val) = (scale(train)?, scale(val)?);
        Ok(Self { mean, std, train, val })
    }
}

/// Full-batch AdamW on `loss` until the validation loss stops improving;
/// returns the best validation loss and restores the best weights, the
/// starting ones included (a head converted from a PRM's own may already
/// be better than anything training finds).
fn fit(
    head: &Head,
    vars: &[Var],
    cfg: &FitConfig,
    loss: impl Fn(&Head, &Data) -> candle_core::Result<Tensor>,
    train: &Data,
    val: &Data,
) -> candle_core::Result<f64> {
    let mut opt = AdamW::new(
        vars.to_vec(),
        ParamsAdamW { lr: cfg.lr, weight_decay: cfg.weight_decay, ..Default::default() },
    )?;
    let start = loss(head, val)?.to_scalar::<f32>()? as f64;
    let mut best =
        (start, vars.iter().map(|v| v.as_tensor().copy()).collect::<candle_core::Result<Vec<_>>>()?);
    let mut since = 0;
    for _ in 0..cfg.max_epochs {
        opt.backward_step(&loss(head, train)?)?;
        let v = loss(head, val)?.to_scalar::<f32>()? as f64;
        if v < best.0 - 1e-6 {
            best = (v, vars.iter().map(|v| v.as_tensor().copy()).collect::<candle_core::Result<Vec<_>>>()?);
            since = 0;
        } else {
            since += 1;
            if since > cfg.patience {
                break;
            }
        }
    }
    for (var, t) in vars.iter().zip(&best.1) {
        var.set(t)?;
    }
    Ok(best.0)
}

/// The raw head (hard labels, binary loss) and the calibrated quantile head
/// (pinball loss, starting from the raw head), with their validation losses.
pub fn train_heads(train: &Data, val: &Data, cfg: &FitConfig) -> candle_core::Result<(Head, Head, f64, f64)> {
    let hidden = train.x.dim(1)?;
    // Train on standardised features, then fold the scaling into the heads.
    let Standardized { mean, std, train, val } = Standardized::new(train, val)?;
    let (raw, raw_vars) =
        Head::init(HeadShape { hidden, units: cfg.units, outputs: 1 }, cfg.seed, &Device::Cpu)?;
    let raw_val = fit(&raw, &raw_vars, cfg, |h, d| bce_with_logits(&h.logits(&d.x)?, &d.hard), &train, &val)?;
    let (quantile, q_vars) = raw.to_quantile_init()?;
    let q_val =
        fit(&quantile, &q_vars, cfg, |h, d| pinball_loss(&h.probabilities(&d.x)?, &d.soft), &train, &val)?;
    Ok((raw.fold_standardization(&mean, &std)?, quantile.fold_standardization(&mean, &std)?, raw_val, q_val))
}

/// The quantile output layer of a model PRM, trained with the pinball loss
/// on the PRM's own features and started, as the paper's reference does, from its
/// 2-class head: every output begins as the logit of P(good) (`good_w`
/// `(1, units)`, `good_b` `(1)`). Returns the trained head (in the
/// features' own scale) and its validation pinball loss before and after.
pub fn train_from_good_logit(
    good_w: &Tensor,
    good_b: &Tensor,
    train: &Data,
    val: &Data,
    cfg: &FitConfig,
) -> candle_core::Result<(Head, f64, f64)> {
    // Train on standardised features x' = (x − mean) / std; the same
    // function of x' has weight w ⊙ std and bias b + w · mean.
    let Standardized { mean, std, train, val } = Standardized::new(train, val)?;
    let w = good_w.broadcast_mul(&std.unsqueeze(0)?)?;
    let b = (good_b + good_w.matmul(&mean.unsqueeze(1)?)?.squeeze(1)?)?;
    let (quantile, vars) = Head::linear(w, b)?.to_quantile_init()?;
    let loss = |h: &Head, d: &Data| pinball_loss(&h.probabilities(&d.x)?, &d.soft);
    let before = loss(&quantile, &val)?.to_scalar::<f32>()? as f64;
    let after = fit(&quantile, &vars, cfg, loss, &train, &val)?;
    Ok((quantile.fold_standardization(&mean, &std)?, before, after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibrate::metrics::pinball;

    #[test]
    fn pinball_loss_matches_the_formula_and_its_gradient() {
        let dev = Device::Cpu;
        let pred = Var::new(&[[0.2f32, 0.5, 0.9], [0.6, 0.6, 0.6]], &dev).unwrap();
        let label = Tensor::new(&[0.5f32, 0.0], &dev).unwrap();
        let loss = pinball_loss(pred.as_tensor(), &label).unwrap();
        let want: f64 = [(0.5, [0.2, 0.5, 0.9]), (0.0, [0.6, 0.6, 0.6])]
            .iter()
            .flat_map(|(y, ps)| BETAS.iter().zip(ps).map(move |(b, p)| pinball(*b, *y, *p)))
            .sum::<f64>()
            / 6.0;
        assert!((loss.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-6);
        // d/dŷ = -β/6 where the label is above the prediction, (1-β)/6 where below.
        let g = loss.backward().unwrap().get(pred.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        let want_g =
            [[-0.1 / 6.0, 0.0, (1.0 - 0.9) / 6.0], [(1.0 - 0.1) / 6.0, 0.5 / 6.0, (1.0 - 0.9) / 6.0]];
        for (r, w) in g.iter().zip(want_g) {
            for (a, b) in r.iter().zip(w) {
                // The tie at ŷ = y (row 0, β = 0.5) may take either side's slope.
                if b != 0.0 {
                    assert!((*a as f64 - b).abs() < 1e-6, "{g:?}");
                }
            }
        }
    }

    #[test]
    fn bce_with_logits_equals_the_textbook_formula() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[2.0f32], [-1.0], [0.0]], &dev).unwrap();
        let y = Tensor::new(&[1.0f32, 0.0, 0.5], &dev).unwrap();
        let got = bce_with_logits(&logits, &y).unwrap().to_scalar::<f32>().unwrap() as f64;
        let s = |x: f64| 1.0 / (1.0 + (-x).exp());
        let want = -((s(2.0)).ln() + (1.0 - s(-1.0)).ln() + 0.5 * (s(0.0).ln() + (1.0 - s(0.0)).ln())) / 3.0;
        assert!((got - want).abs() < 1e-6, "{got} {want}");
    }

    #[test]
    fn a_model_prm_head_starts_as_its_p_good_and_its_training_lowers_the_pinball_loss() {
        let dev = Device::Cpu;
        let rows = noisy_rows(200);
        let x: Vec<Vec<f32>> = (0..200).map(|i| vec![(i % 5) as f32, 3.0 + (i % 3) as f32]).collect();
        let d = Data::new(&x, &rows).unwrap();
        let (w, b) = (Tensor::new(&[[0.4f32, -0.2]], &dev).unwrap(), Tensor::new(&[0.1f32], &dev).unwrap());
        let good = candle_nn::ops::sigmoid(&d.x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap())
            .unwrap()
            .squeeze(1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // No training: the standardisation round trip keeps the identity.
        let frozen = FitConfig { max_epochs: 0, ..Default::default() };
        let (q, before, after) = train_from_good_logit(&w, &b, &d, &d, &frozen).unwrap();
        assert_eq!(before, after);
        let p = q.probabilities(&d.x).unwrap().to_vec2::<f32>().unwrap();
        for (row, g) in p.iter().zip(&good) {
            assert!(row.iter().all(|v| (v - g).abs() < 1e-5), "{row:?} vs {g}");
        }
        let cfg = FitConfig { lr: 5e-2, max_epochs: 300, ..Default::default() };
        let (_, before, after) = train_from_good_logit(&w, &b, &d, &d, &cfg).unwrap();
        assert!(after < before - 1e-3, "{before} -> {after}");
        // Steps so large that every epoch is worse: the head it started
        // from is kept, and the loss reported is that head's.
        let wild = FitConfig { lr: 1e4, max_epochs: 5, patience: 5, ..Default::default() };
        let (q, before, after) = train_from_good_logit(&w, &b, &d, &d, &wild).unwrap();
        assert_eq!(before, after);
        let p = q.probabilities(&d.x).unwrap().to_vec2::<f32>().unwrap();
        assert!(p.iter().zip(&good).all(|(row, g)| row.iter().all(|v| (v - g).abs() < 1e-5)));
    }

    fn noisy_rows(n: usize) -> Vec<LabelRow> {
        (0..n)
            .map(|i| LabelRow {
                question_id: format!("q{i}"),
                split: crate::arith::task::Split::Calib,
                level: 1,
                k: 0,
                prefix: vec![],
                tokens: vec![],
                prompt_len: 0,
                logprobs: vec![],
                success: ((i * 37) % 101) as f64 / 100.0,
                correct: (i * 37) % 101 / 13,
                n_mc: 8,
                final_answer: false,
            })
            .collect()
    }

    #[test]
    fn quantile_heads_learn_the_spread_of_noisy_labels() {
        // Labels uniform on [0, 1] regardless of the feature: the fitted
        // quantiles approach 0.1, 0.5 and 0.9.
        let n = 400;
        let x: Vec<Vec<f32>> = (0..n).map(|i| vec![1.0, (i % 7) as f32 / 7.0]).collect();
        let rows = noisy_rows(n);
        let d = Data::new(&x, &rows).unwrap();
        let cfg = FitConfig { units: 0, lr: 5e-2, max_epochs: 1500, patience: 1500, ..Default::default() };
        let (_, q, _, _) = train_heads(&d, &d, &cfg).unwrap();
        let p = q.probabilities(&d.x).unwrap().mean(0).unwrap().to_vec1::<f32>().unwrap();
        let mut p = p.clone();
        p.sort_by(f32::total_cmp);
        for (got, want) in p.iter().zip([0.1f32, 0.5, 0.9]) {
            assert!((got - want).abs() < 0.06, "{p:?}");
        }
    }
}
