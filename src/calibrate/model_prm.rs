//! Calibrating a separate PRM (Qwen2.5-Math-PRM format): its 2-class head
//! becomes a quantile output layer trained with the pinball loss on the
//! PRM's own features of the labelled prefixes; the backbone and `score.0`
//! stay as they are (the reference also fine-tunes the backbone with LoRA,
//! rank 2; a merged adapter loads with `lora`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use super::fitted::{Fitted, Rows, Scored, score_items};
use super::labels::LabelRow;
use super::train::{self, Data, FitConfig};
use crate::config::ModelPrmConfig;
use crate::prm::model_prm::{HeadChoice, ModelPrm, ModelPrmOptions};

/// Prefixes per PRM forward pass.
const CHUNK: usize = 16;

/// `score.0`'s activations at each row's last step token.
fn features(
    prm: &ModelPrm,
    questions: &HashMap<String, String>,
    rows: &[LabelRow],
) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(CHUNK) {
        let items = score_items(questions, chunk)?;
        out.extend(prm.features(&items)?.to_vec2::<f32>()?);
    }
    Ok(out)
}

/// Trains the quantile layer from the converted 2-class head, saves it as a
/// head file the PRM loads (`head = { trained = … }`), and scores the
/// calibration rows with it and with the raw P(good).
pub(super) fn fit(
    config: &ModelPrmConfig,
    questions: &HashMap<String, String>,
    rows: &Rows<'_>,
    cfg: &FitConfig,
    head_path: &Path,
) -> anyhow::Result<Fitted> {
    // Whatever head the configuration names, training starts from the
    // checkpoint's own 2-class head.
    let opts = ModelPrmOptions { head: HeadChoice::TwoClass, lora: config.lora.clone() };
    let prm = ModelPrm::load(&config.model, &opts)
        .map_err(|e| anyhow::anyhow!("{}: {e}", config.model.display()))?;
    let data = |rows: &[LabelRow]| -> anyhow::Result<Data> {
        Ok(Data::new(&features(&prm, questions, rows)?, rows)?)
    };
    let (train_d, val_d, fit_d, eval_d) =
        (data(rows.train)?, data(rows.val)?, data(rows.fit)?, data(rows.eval)?);
    let (good_w, good_b) = prm.good_logit()?;
    let (quantile, before, after) = train::train_from_good_logit(&good_w, &good_b, &train_d, &val_d, cfg)?;
    let scores = |d: &Data| -> anyhow::Result<Scored> {
        let q = quantile.probabilities(&d.x)?.to_vec2::<f32>()?;
        let raw = candle_nn::ops::sigmoid(&d.x.matmul(&good_w.t()?)?.broadcast_add(&good_b)?)?;
        Ok(Scored::new(q, raw.flatten_all()?.to_vec1::<f32>()?))
    };
    let (fit, eval) = (scores(&fit_d)?, scores(&eval_d)?);
    let (w1, b1) = prm.first_layer();
    let (w2, b2) = quantile.output_layer();
    let tensors: HashMap<String, Tensor> = [
        ("score.0.weight", w1.clone()),
        ("score.0.bias", b1.clone()),
        ("score.2.weight", w2.clone()),
        ("score.2.bias", b2.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    candle_core::safetensors::save(&tensors, head_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", head_path.display()))?;
    Ok(Fitted {
        head_path: head_path.to_path_buf(),
        head: serde_json::json!({"kind": "model_prm", "model": config.model.display().to_string(),
            "path": head_path.display().to_string(), "converted_val_pinball": before, "quantile_val_pinball": after}),
        summary: format!(
            "the quantile layer of the PRM {} (from its 2-class head); validation pinball {before:.4} converted, {after:.4} trained",
            config.model.display()
        ),
        fit,
        eval,
    })
}
