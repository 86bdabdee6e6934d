//! Calibration metrics: Brier score, expected calibration error
//! over 10 equal-width bins, the over- vs under-estimation split, AUROC, the
//! coverage of a lower quantile, and the pinball loss.

use serde::Serialize;

/// Mean squared error between predicted and labelled success probabilities.
pub fn brier(pred: &[f64], label: &[f64]) -> f64 {
    mean(pred.iter().zip(label).map(|(p, y)| (p - y) * (p - y)))
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { 0.0 } else { s / n as f64 }
}

pub const ECE_BINS: usize = 10;

/// Bin of a prediction among `ECE_BINS` equal-width bins of [0, 1]; 1.0
/// falls in the last bin.
pub fn bin_of(p: f64) -> usize {
    ((p * ECE_BINS as f64) as usize).min(ECE_BINS - 1)
}

/// Per bin: (count, mean prediction, mean label).
pub fn reliability(pred: &[f64], label: &[f64]) -> Vec<(usize, f64, f64)> {
    let mut bins = vec![(0usize, 0.0, 0.0); ECE_BINS];
    for (&p, &y) in pred.iter().zip(label) {
        let b = &mut bins[bin_of(p)];
        b.0 += 1;
        b.1 += p;
        b.2 += y;
    }
    bins.into_iter()
        .map(|(n, sp, sy)| if n == 0 { (0, 0.0, 0.0) } else { (n, sp / n as f64, sy / n as f64) })
        .collect()
}

/// Σ_b (n_b / N) |mean prediction_b − mean label_b|.
pub fn ece(pred: &[f64], label: &[f64]) -> f64 {
    let n = pred.len() as f64;
    reliability(pred, label).iter().map(|&(c, p, y)| c as f64 / n * (p - y).abs()).sum()
}

/// How a predictor errs: mean overestimation (prediction above the label),
/// mean underestimation, and the fraction of predictions above the label.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OverUnder {
    pub over: f64,
    pub under: f64,
    pub over_fraction: f64,
}

pub fn over_under(pred: &[f64], label: &[f64]) -> OverUnder {
    let diffs: Vec<f64> = pred.iter().zip(label).map(|(p, y)| p - y).collect();
    OverUnder {
        over: mean(diffs.iter().map(|d| d.max(0.0))),
        under: mean(diffs.iter().map(|d| (-d).max(0.0))),
        over_fraction: mean(diffs.iter().map(|&d| f64::from(u8::from(d > 0.0)))),
    }
}

/// Area under the ROC curve of `score` for the binary labels `positive`
/// (Mann-Whitney, ties counted half). `None` when one class is empty.
pub fn auroc(score: &[f64], positive: &[bool]) -> Option<f64> {
    let mut idx: Vec<usize> = (0..score.len()).collect();
    idx.sort_by(|&a, &b| score[a].total_cmp(&score[b]));
    // Average ranks over ties.
    let mut ranks = vec![0.0; score.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && score[idx[j + 1]] == score[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            ranks[k] = r;
        }
        i = j + 1;
    }
    let n_pos = positive.iter().filter(|&&p| p).count() as f64;
    let n_neg = positive.len() as f64 - n_pos;
    if n_pos == 0.0 || n_neg == 0.0 {
        return None;
    }
    let rank_sum: f64 = ranks.iter().zip(positive).filter(|(_, p)| **p).map(|(r, _)| r).sum();
    Some((rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg))
}

/// Fraction of labels at or above the predicted lower quantile, compared on
/// the labels' grid: Monte-Carlo labels are multiples of `step` (1 / N_MC),
/// and a sigmoid quantile never reaches 0 exactly, so without the half-step
/// tolerance a label of 0 (a prefix that is already wrong) could never be
/// covered however well calibrated the quantile.
pub fn coverage(lower: &[f64], label: &[f64], step: f64) -> f64 {
    mean(lower.iter().zip(label).map(|(q, y)| f64::from(u8::from(*y >= q - step / 2.0))))
}

/// ρ_β(y − ŷ) = max(β (y − ŷ), (β − 1)(y − ŷ)).
pub fn pinball(beta: f64, label: f64, pred: f64) -> f64 {
    let u = label - pred;
    (beta * u).max((beta - 1.0) * u)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn brier_is_the_mean_squared_error() {
        close(brier(&[0.9, 0.2, 0.5], &[1.0, 0.0, 0.25]), (0.01 + 0.04 + 0.0625) / 3.0);
    }

    #[test]
    fn ece_weights_each_bins_gap_by_its_share() {
        // Bin 0: preds 0.05, 0.05 (mean 0.05), labels 0, 0.5 (mean 0.25): gap 0.2, weight 2/4.
        // Bin 9: preds 0.95, 1.0 (mean 0.975), labels 1, 1: gap 0.025, weight 2/4.
        close(ece(&[0.05, 0.05, 0.95, 1.0], &[0.0, 0.5, 1.0, 1.0]), 0.5 * 0.2 + 0.5 * 0.025);
        assert_eq!(bin_of(0.1), 1);
        assert_eq!(bin_of(0.0999), 0);
        assert_eq!(bin_of(1.0), 9);
    }

    #[test]
    fn over_and_under_estimation_are_split() {
        let ou = over_under(&[0.8, 0.2, 0.5, 0.5], &[0.5, 0.4, 0.5, 0.0]);
        close(ou.over, (0.3 + 0.0 + 0.0 + 0.5) / 4.0);
        close(ou.under, 0.2 / 4.0);
        close(ou.over_fraction, 0.5);
    }

    #[test]
    fn auroc_counts_correctly_ordered_pairs_with_ties_half() {
        close(auroc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]).unwrap(), 0.75);
        close(auroc(&[0.5, 0.5], &[false, true]).unwrap(), 0.5);
        close(auroc(&[0.9, 0.1], &[true, false]).unwrap(), 1.0);
        assert_eq!(auroc(&[0.1, 0.2], &[true, true]), None);
    }

    #[test]
    fn coverage_counts_labels_at_or_above_the_lower_quantile() {
        close(coverage(&[0.2, 0.5, 0.9], &[0.2, 0.4, 1.0], 0.0), 2.0 / 3.0);
        // On a grid of eighths: 0.05 rounds to 0 and covers a label of 0; 0.07 does not.
        close(coverage(&[0.05, 0.07, 0.3], &[0.0, 0.0, 0.25], 0.125), 2.0 / 3.0);
    }

    #[test]
    fn pinball_loss_is_asymmetric_by_beta() {
        close(pinball(0.1, 1.0, 0.6), 0.1 * 0.4);
        close(pinball(0.1, 0.0, 0.6), 0.9 * 0.6);
        close(pinball(0.9, 1.0, 0.6), 0.9 * 0.4);
        close(pinball(0.5, 0.3, 0.3), 0.0);
    }
}
