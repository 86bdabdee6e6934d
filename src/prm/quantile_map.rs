//! A calibrated quantile map for a PRM that gives only its P(good): three
//! curves q_β(p) = σ(a_β + b_β · logit p), β ∈ {0.1, 0.5, 0.9}, fitted by
//! `ponder calibrate` with the pinball loss on Monte-Carlo success labels.
//! A remote PRM (vLLM's pooling API) returns a probability, not features, so
//! the map reads that scalar alone; it is the quantile analogue of Platt
//! scaling, and with b_β ≥ 0 each curve keeps the PRM's ranking.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{BETAS, PrmError, Quantiles};

/// Probabilities are clamped this far from 0 and 1 before the logit: a PRM
/// that answers exactly 0 or 1 would otherwise give ±∞.
const EPS: f64 = 1e-6;

/// The fitted curves, as `prm_quantile_map.json` holds them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantileMap {
    /// Always "logit_linear_quantiles": the file names its form.
    pub kind: String,
    pub betas: [f64; 3],
    /// Intercepts a_β.
    pub a: [f64; 3],
    /// Slopes b_β (≥ 0).
    pub b: [f64; 3],
    /// How it was fitted (split, prefixes, PRM), for whoever reads the file.
    #[serde(default)]
    pub notes: String,
}

const KIND: &str = "logit_linear_quantiles";

fn logit(p: f64) -> f64 {
    let p = p.clamp(EPS, 1.0 - EPS);
    (p / (1.0 - p)).ln()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl QuantileMap {
    /// The map that returns P(good) at every level (before fitting).
    pub fn identity() -> Self {
        Self { kind: KIND.into(), betas: BETAS, a: [0.0; 3], b: [1.0; 3], notes: String::new() }
    }

    /// The calibrated quantiles of a raw P(good).
    pub fn apply(&self, p: f32) -> Quantiles {
        let x = logit(f64::from(p));
        let q = |i: usize| sigmoid(self.a[i] + self.b[i] * x) as f32;
        Quantiles::sorted([q(0), q(1), q(2)])
    }

    /// Fits each level's curve to `(raw, label)` pairs by minimising the
    /// pinball loss with Adam, from the identity.
    pub fn fit(raw: &[f64], labels: &[f64], notes: String) -> Self {
        let xs: Vec<f64> = raw.iter().map(|&p| logit(p)).collect();
        let mut map = Self { notes, ..Self::identity() };
        for (i, &beta) in BETAS.iter().enumerate() {
            let (a, b) = fit_level(&xs, labels, beta);
            map.a[i] = a;
            map.b[i] = b;
        }
        map
    }

    /// The mean pinball loss of level `i` on `(raw, label)` pairs.
    pub fn pinball(&self, i: usize, raw: &[f64], labels: &[f64]) -> f64 {
        let n = raw.len().max(1) as f64;
        raw.iter()
            .zip(labels)
            .map(|(&p, &y)| pinball(self.betas[i], y - sigmoid(self.a[i] + self.b[i] * logit(p))))
            .sum::<f64>()
            / n
    }

    pub fn load(path: &Path) -> Result<Self, PrmError> {
        let file = |message: String| PrmError::File { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
        let map: Self = serde_json::from_str(&text).map_err(|e| file(e.to_string()))?;
        if map.kind != KIND || map.betas != BETAS {
            return Err(file(format!("not a quantile map (kind {:?}, betas {:?})", map.kind, map.betas)));
        }
        if map.a.iter().chain(&map.b).any(|v| !v.is_finite()) {
            return Err(file("a coefficient is not finite".into()));
        }
        Ok(map)
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).expect("a map of numbers and strings serializes");
        std::fs::write(path, text + "\n")
    }
}

fn pinball(beta: f64, residual: f64) -> f64 {
    if residual >= 0.0 { beta * residual } else { (beta - 1.0) * residual }
}

/// Adam on (a, b) of σ(a + b·x) for the β-quantile; b is kept ≥ 0 so the
/// curve never reverses the PRM's order. Returns the best point seen (the
/// subgradient steps can overshoot), so the fit is never worse than the
/// identity it starts from.
fn fit_level(xs: &[f64], ys: &[f64], beta: f64) -> (f64, f64) {
    const STEPS: usize = 3000;
    const LR: f64 = 0.02;
    let (b1, b2, eps) = (0.9, 0.999, 1e-8);
    let (mut a, mut b) = (0.0f64, 1.0f64);
    let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
    let n = xs.len().max(1) as f64;
    let mut best = (f64::INFINITY, a, b);
    for t in 1..=STEPS {
        let mut g = [0.0f64; 2];
        let mut loss = 0.0;
        for (&x, &y) in xs.iter().zip(ys) {
            let q = sigmoid(a + b * x);
            loss += pinball(beta, y - q) / n;
            // The pinball loss's subgradient in q, through the sigmoid.
            let dq = if y > q { -beta } else { 1.0 - beta };
            let d = dq * q * (1.0 - q);
            g[0] += d / n;
            g[1] += d * x / n;
        }
        if loss < best.0 {
            best = (loss, a, b);
        }
        for k in 0..2 {
            m[k] = b1 * m[k] + (1.0 - b1) * g[k];
            v[k] = b2 * v[k] + (1.0 - b2) * g[k] * g[k];
            let mh = m[k] / (1.0 - b1.powi(t as i32));
            let vh = v[k] / (1.0 - b2.powi(t as i32));
            let step = LR * mh / (vh.sqrt() + eps);
            if k == 0 {
                a -= step;
            } else {
                b = (b - step).max(0.0);
            }
        }
    }
    (best.1, best.2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PRM that overestimates: true success is p², it says p.
    fn overconfident(n: usize) -> (Vec<f64>, Vec<f64>) {
        let mut raw = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let p = (i as f64 + 0.5) / n as f64;
            raw.push(p);
            // Labels as N_MC = 8 fractions: k of 8 succeed, k spread around 8p².
            let k = ((8.0 * p * p) + ((i * 7 % 5) as f64 - 2.0) * 0.6).round().clamp(0.0, 8.0);
            labels.push(k / 8.0);
        }
        (raw, labels)
    }

    #[test]
    fn the_fitted_map_pulls_an_overconfident_prm_down_and_keeps_its_quantiles_ordered() {
        let (raw, labels) = overconfident(400);
        let map = QuantileMap::fit(&raw, &labels, "test".into());
        for i in 0..3 {
            let identity = QuantileMap::identity().pinball(i, &raw, &labels);
            assert!(map.pinball(i, &raw, &labels) < identity, "level {i} improves on the raw score");
        }
        let q = map.apply(0.5);
        assert!(q.q10 <= q.q50 && q.q50 <= q.q90);
        assert!(q.q50 < 0.4, "the median at raw 0.5 sits near the true 0.25: {q:?}");
        // Coverage on the fitting data is near each level.
        let below =
            raw.iter().zip(&labels).filter(|&(&p, &y)| y < f64::from(map.apply(p as f32).q90)).count();
        let share = below as f64 / raw.len() as f64;
        assert!((0.75..=0.98).contains(&share), "q90 covers {share}");
    }

    #[test]
    fn a_saved_map_loads_and_a_file_of_another_kind_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("map.json");
        let map = QuantileMap { a: [-1.0, 0.0, 1.0], b: [0.5, 1.0, 1.5], ..QuantileMap::identity() };
        map.save(&path).unwrap();
        assert_eq!(QuantileMap::load(&path).unwrap(), map);
        std::fs::write(
            &path,
            r#"{"kind": "isotonic", "betas": [0.1, 0.5, 0.9], "a": [0,0,0], "b": [1,1,1]}"#,
        )
        .unwrap();
        assert!(QuantileMap::load(&path).unwrap_err().to_string().contains("not a quantile map"));
    }
}
