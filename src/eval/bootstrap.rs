//! 95% bootstrap intervals over questions: how far an accuracy measured on
//! a few hundred questions could move on another draw of questions.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Resamples of the questions; 1000 puts the 2.5% and 97.5% percentiles
/// within about a point of their limits at the sweep's sizes.
pub(super) const RESAMPLES: usize = 1000;
/// A fixed seed: the same run reports the same intervals.
pub(super) const SEED: u64 = 0x0b00_7572_a900;

/// One set of resamples (question indices drawn with replacement), drawn
/// once and shared by every point of a sweep: the points' intervals then
/// come from the same resampled question sets, and drawing them once keeps
/// the bootstrap at one pass over the indices per point.
pub(super) struct Bootstrap {
    questions: usize,
    /// `RESAMPLES` rows of `questions` indices each.
    draws: Vec<u32>,
}

impl Bootstrap {
    pub(super) fn new(questions: usize, resamples: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let draws = if questions == 0 {
            Vec::new()
        } else {
            (0..resamples * questions).map(|_| rng.random_range(0..questions) as u32).collect()
        };
        Self { questions, draws }
    }

    /// The percentile interval [2.5%, 97.5%] of the share of `correct`
    /// (one entry per question, in the order the resamples index).
    pub(super) fn interval(&self, correct: &[bool]) -> [f64; 2] {
        assert_eq!(correct.len(), self.questions, "one outcome per question the resamples were drawn for");
        if self.questions == 0 {
            return [0.0, 0.0];
        }
        let n = self.questions as f64;
        let mut shares: Vec<f64> = self
            .draws
            .chunks_exact(self.questions)
            .map(|row| row.iter().filter(|&&i| correct[i as usize]).count() as f64 / n)
            .collect();
        shares.sort_by(f64::total_cmp);
        [percentile(&shares, 0.025), percentile(&shares, 0.975)]
    }
}

/// The `q` percentile of sorted `xs`, interpolated between neighbours.
fn percentile(xs: &[f64], q: f64) -> f64 {
    let at = q * (xs.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    xs[lo] + (xs[hi] - xs[lo]) * (at - lo as f64)
}

/// The 95% interval of one accuracy, with the sweep's resamples and seed.
#[cfg(test)]
pub(super) fn interval(correct: &[bool]) -> [f64; 2] {
    Bootstrap::new(correct.len(), RESAMPLES, SEED).interval(correct)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bootstrap_interval_covers_the_mean_of_hand_made_data() {
        let correct: Vec<bool> = (0..100).map(|i| i % 10 < 7).collect();
        let [lo, hi] = interval(&correct);
        assert!(lo < 0.7 && 0.7 < hi, "[{lo}, {hi}]");
        // The normal approximation: 1.96 · sqrt(0.7 · 0.3 / 100) ≈ 0.090.
        let half = (hi - lo) / 2.0;
        assert!((half - 0.0898).abs() < 0.015, "half-width {half}");
        assert_eq!(interval(&correct), [lo, hi], "a fixed seed gives the same interval");
    }

    #[test]
    fn all_right_or_all_wrong_data_has_a_point_interval() {
        assert_eq!(interval(&[true; 50]), [1.0, 1.0]);
        assert_eq!(interval(&[false; 50]), [0.0, 0.0]);
        assert_eq!(interval(&[]), [0.0, 0.0]);
    }

    #[test]
    fn points_sharing_the_resamples_get_ordered_intervals() {
        // A point right on a superset of another's questions is at least as
        // accurate on every resample, so both of its limits are higher.
        let b = Bootstrap::new(60, RESAMPLES, SEED);
        let fewer: Vec<bool> = (0..60).map(|i| i % 3 == 0).collect();
        let more: Vec<bool> = (0..60).map(|i| i % 3 != 2).collect();
        let (f, m) = (b.interval(&fewer), b.interval(&more));
        assert!(f[0] <= m[0] && f[1] <= m[1], "{f:?} {m:?}");
    }
}
