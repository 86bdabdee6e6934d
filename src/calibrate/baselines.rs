//! Post-hoc calibration baselines fitted on (raw score, label) pairs: Platt
//! scaling, isotonic regression (pool-adjacent-violators) and histogram
//! binning. Labels are success fractions in [0, 1].

use serde::{Deserialize, Serialize};

use super::metrics::{ECE_BINS, bin_of};

fn logit(p: f64) -> f64 {
    let p = p.clamp(1e-6, 1.0 - 1e-6);
    (p / (1.0 - p)).ln()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// p = sigmoid(a · logit(s) + b); with b = 0 it is temperature scaling.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Platt {
    pub a: f64,
    pub b: f64,
}

impl Platt {
    /// Minimises the cross-entropy against soft labels by Newton's method,
    /// each step halved until the loss falls: scores saturated at 0 or 1
    /// (logits near ±14) make full Newton steps overshoot and diverge.
    pub fn fit(score: &[f64], label: &[f64]) -> Self {
        let loss = |a: f64, b: f64| -> f64 {
            score
                .iter()
                .zip(label)
                .map(|(&s, &y)| {
                    let z = a * logit(s) + b;
                    // −[y ln σ(z) + (1 − y) ln(1 − σ(z))], stably.
                    z.max(0.0) - y * z + (-z.abs()).exp().ln_1p()
                })
                .sum()
        };
        let (mut a, mut b) = (1.0, 0.0);
        let mut current = loss(a, b);
        for _ in 0..100 {
            let (mut ga, mut gb, mut haa, mut hab, mut hbb) = (0.0, 0.0, 0.0, 0.0, 0.0);
            for (&s, &y) in score.iter().zip(label) {
                let x = logit(s);
                let p = sigmoid(a * x + b);
                let w = p * (1.0 - p);
                ga += (p - y) * x;
                gb += p - y;
                haa += w * x * x;
                hab += w * x;
                hbb += w;
            }
            // A small ridge keeps the Hessian invertible on separable data.
            let (haa, hbb) = (haa + 1e-6, hbb + 1e-6);
            let det = haa * hbb - hab * hab;
            if det.abs() < 1e-12 {
                break;
            }
            let (da, db) = ((hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det);
            let mut t = 1.0;
            let mut next = loss(a - da, b - db);
            // A NaN loss counts as worse: halve the step on it too.
            let worse = |next: f64, current: f64| next.partial_cmp(&current).is_none_or(|o| o.is_gt());
            while worse(next, current) && t > 1e-6 {
                t /= 2.0;
                next = loss(a - t * da, b - t * db);
            }
            if worse(next, current) {
                break;
            }
            a -= t * da;
            b -= t * db;
            let converged = (t * da).abs() + (t * db).abs() < 1e-10;
            current = next;
            if converged {
                break;
            }
        }
        Self { a, b }
    }

    pub fn predict(&self, s: f64) -> f64 {
        sigmoid(self.a * logit(s) + self.b)
    }
}

/// A non-decreasing step function of the score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Isotonic {
    /// Upper score of each block and the block's value, ascending.
    pub blocks: Vec<(f64, f64)>,
}

impl Isotonic {
    pub fn fit(score: &[f64], label: &[f64]) -> Self {
        let mut idx: Vec<usize> = (0..score.len()).collect();
        idx.sort_by(|&a, &b| score[a].total_cmp(&score[b]));
        // (sum of labels, count, max score) per block.
        let mut blocks: Vec<(f64, f64, f64)> = Vec::new();
        for i in idx {
            // Equal scores must get one value, so they start in one block
            // (a score that saturates at 1.0 in f32 is common); otherwise
            // `predict` would give them the lowest of their blocks.
            match blocks.last_mut() {
                Some(last) if last.2 == score[i] => {
                    last.0 += label[i];
                    last.1 += 1.0;
                }
                _ => blocks.push((label[i], 1.0, score[i])),
            }
            while blocks.len() >= 2 {
                let n = blocks.len();
                let (s1, c1, _) = blocks[n - 2];
                let (s2, c2, m2) = blocks[n - 1];
                if s1 / c1 <= s2 / c2 {
                    break;
                }
                blocks.truncate(n - 2);
                blocks.push((s1 + s2, c1 + c2, m2));
            }
        }
        Self { blocks: blocks.into_iter().map(|(s, c, m)| (m, s / c)).collect() }
    }

    pub fn predict(&self, s: f64) -> f64 {
        match self.blocks.iter().find(|(upper, _)| s <= *upper) {
            Some(&(_, v)) => v,
            None => self.blocks.last().map_or(s, |b| b.1),
        }
    }
}

/// The mean label of the score's bin among 10 equal-width bins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub values: Vec<Option<f64>>,
}

impl Histogram {
    pub fn fit(score: &[f64], label: &[f64]) -> Self {
        let mut sums = vec![(0.0, 0usize); ECE_BINS];
        for (&s, &y) in score.iter().zip(label) {
            let b = &mut sums[bin_of(s)];
            b.0 += y;
            b.1 += 1;
        }
        Self { values: sums.into_iter().map(|(s, n)| (n > 0).then(|| s / n as f64)).collect() }
    }

    /// Empty bins keep the raw score.
    pub fn predict(&self, s: f64) -> f64 {
        self.values[bin_of(s)].unwrap_or(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platt_recovers_an_overconfident_scores_true_mapping() {
        // True probability sigmoid(0.5 logit(s) - 1): the raw score overestimates.
        let scores: Vec<f64> = (1..200).map(|i| i as f64 / 200.0).collect();
        let labels: Vec<f64> = scores.iter().map(|&s| sigmoid(0.5 * logit(s) - 1.0)).collect();
        let p = Platt::fit(&scores, &labels);
        assert!((p.a - 0.5).abs() < 1e-4 && (p.b + 1.0).abs() < 1e-4, "{p:?}");
    }

    #[test]
    fn platt_converges_on_scores_saturated_at_zero_and_one() {
        // A sharp PRM: most scores within 1e-7 of 0 or 1, labels often far from them.
        let mut scores = Vec::new();
        let mut labels = Vec::new();
        for i in 0..400 {
            let right = i % 3 != 0;
            scores.push(if right { 1.0 - 1e-8 } else { 1e-8 });
            labels.push(if right { 0.6 } else { 0.05 });
        }
        let p = Platt::fit(&scores, &labels);
        assert!(p.a.is_finite() && p.b.is_finite(), "{p:?}");
        assert!((p.predict(1.0) - 0.6).abs() < 0.01 && (p.predict(0.0) - 0.05).abs() < 0.01, "{p:?}");
    }

    #[test]
    fn isotonic_gives_tied_scores_their_mean_label() {
        let iso = Isotonic::fit(&[0.5, 0.5, 0.5, 0.5, 0.9], &[0.0, 1.0, 1.0, 1.0, 1.0]);
        assert_eq!(iso.predict(0.5), 0.75);
        assert_eq!(iso.predict(0.9), 1.0);
        // A tie that violates the order with the block below pools with it.
        let iso = Isotonic::fit(&[0.2, 0.5, 0.5], &[1.0, 0.0, 0.0]);
        assert!((iso.predict(0.5) - 1.0 / 3.0).abs() < 1e-12 && iso.predict(0.2) == iso.predict(0.5));
    }

    #[test]
    fn isotonic_pools_adjacent_violators() {
        let iso = Isotonic::fit(&[0.1, 0.2, 0.3, 0.4], &[0.0, 1.0, 0.0, 1.0]);
        // 0.2 and 0.3 violate the order and pool to 0.5.
        assert_eq!(iso.blocks, vec![(0.1, 0.0), (0.3, 0.5), (0.4, 1.0)]);
        assert_eq!(iso.predict(0.25), 0.5);
        assert_eq!(iso.predict(0.05), 0.0);
        assert_eq!(iso.predict(0.9), 1.0);
    }

    #[test]
    fn histogram_binning_predicts_the_bins_mean_label() {
        let h = Histogram::fit(&[0.05, 0.06, 0.55], &[0.0, 0.5, 1.0]);
        assert_eq!(h.predict(0.01), 0.25);
        assert_eq!(h.predict(0.51), 1.0);
        assert_eq!(h.predict(0.95), 0.95, "empty bins keep the score");
    }
}
