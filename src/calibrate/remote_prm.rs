//! Calibrating a remote PRM (vLLM's pooling API, or another ponder's
//! `/pooling`): the server scores every labelled prefix, and a
//! [`QuantileMap`] of its P(good) is fitted on the fitting rows with the
//! pinball loss. The server gives a probability, not features, so there is
//! no head to train: the map is what calibrates it.

use std::collections::HashMap;
use std::path::Path;

use super::fitted::{Fitted, Rows, Scored, score_items};
use super::labels::LabelRow;
use crate::config::RemotePrmConfig;
use crate::prm::head::HeadOutput;
use crate::prm::quantile_map::QuantileMap;
use crate::prm::remote::RemotePrm;
use crate::prm::{BETAS, Scorer};

/// Prefixes per pooling call.
const CHUNK: usize = 32;

fn raw_scores(
    prm: &RemotePrm,
    questions: &HashMap<String, String>,
    rows: &[LabelRow],
) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(CHUNK) {
        let items = score_items(questions, chunk)?;
        let scores = prm.score(&items).map_err(|e| anyhow::anyhow!("{e}"))?;
        out.extend(scores.iter().map(|s| f64::from(s.raw.expect("a remote PRM gives its P(good)"))));
    }
    Ok(out)
}

/// Scores the rows on the server, fits the map on the fitting rows, writes
/// it to `map_path`, and scores the calibration rows with it.
pub(super) fn fit(
    config: &RemotePrmConfig,
    questions: &HashMap<String, String>,
    rows: &Rows<'_>,
    map_path: &Path,
    notes: String,
) -> anyhow::Result<Fitted> {
    let prm = RemotePrm::new(config, HeadOutput::Raw).map_err(|e| anyhow::anyhow!("{e}"))?;
    let fit_raw = raw_scores(&prm, questions, rows.fit)?;
    let eval_raw = raw_scores(&prm, questions, rows.eval)?;
    let labels: Vec<f64> = rows.fit.iter().map(|r| r.success).collect();
    let map = QuantileMap::fit(&fit_raw, &labels, notes);
    map.save(map_path).map_err(|e| anyhow::anyhow!("{}: {e}", map_path.display()))?;
    let identity = QuantileMap::identity();
    let pinball: Vec<serde_json::Value> = (0..BETAS.len())
        .map(|i| {
            serde_json::json!({"beta": BETAS[i], "raw": identity.pinball(i, &fit_raw, &labels),
                "fitted": map.pinball(i, &fit_raw, &labels)})
        })
        .collect();
    let scored = |raw: &[f64]| {
        let q = raw
            .iter()
            .map(|&p| {
                let q = map.apply(p as f32);
                vec![q.q10, q.q50, q.q90]
            })
            .collect();
        Scored::new(q, raw.iter().map(|&p| p as f32).collect())
    };
    Ok(Fitted {
        head_path: map_path.to_path_buf(),
        head: serde_json::json!({"kind": "remote_prm_quantile_map", "remote": config.remote, "model": config.model,
            "path": map_path.display().to_string(), "a": map.a, "b": map.b, "fit_pinball": pinball}),
        summary: format!(
            "a quantile map σ(a + b·logit p) of the remote PRM {:?} at {} (P(good) from its /pooling), fitted on {} prefixes",
            config.model,
            config.remote,
            fit_raw.len()
        ),
        fit: scored(&fit_raw),
        eval: scored(&eval_raw),
    })
}
