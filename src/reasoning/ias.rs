//! Instance-adaptive scaling (Park et al. 2025, arXiv 2506.09338): how many samples reach coverage C
//! given a success probability, and the beam-search K and M rules.

/// Probabilities are clamped to [ε, 1 − ε] before taking logarithms.
pub const EPSILON: f64 = 1e-4;

fn clamp(p: f64) -> f64 {
    p.clamp(EPSILON, 1.0 - EPSILON)
}

/// N_IAS(p; C) = ceil(ln(1 − C) / ln(1 − p')): the samples needed for at
/// least one success with probability C, each succeeding with p.
pub fn n_ias(p: f64, confidence: f64) -> u64 {
    let n = ((1.0 - confidence).ln() / (1.0 - clamp(p)).ln()).ceil();
    // A ratio of two negative logs is positive; huge values saturate.
    if n.is_finite() { n.max(1.0) as u64 } else { u64::MAX }
}

/// min(N_max, N_IAS), at least 1.
pub fn samples(p: f64, confidence: f64, max_samples: usize) -> usize {
    (n_ias(p, confidence).min(max_samples as u64) as usize).max(1)
}

/// Beams to keep at a pruning point: with the lower quantiles sorted
/// descending s(1) ≥ s(2) ≥ ..., the smallest k with k = K_max or
/// k · M_max ≥ N_IAS(s(k)). At most the number of paths.
pub fn keep(lower_desc: &[f64], confidence: f64, k_max: usize, m_max: usize) -> usize {
    let limit = k_max.min(lower_desc.len()).max(1);
    for k in 1..=limit {
        if k == limit || (k * m_max) as u64 >= n_ias(lower_desc[k - 1], confidence) {
            return k;
        }
    }
    limit
}

/// Children per kept beam: min(M_max, ceil(ln(1 − C) / (K · ln(1 − s_min')))),
/// s_min the lowest lower quantile among the kept paths. (The reference
/// divides by K_max; dividing by the kept K makes K · M reach coverage C.)
pub fn children(s_min: f64, kept: usize, confidence: f64, m_max: usize) -> usize {
    let m = ((1.0 - confidence).ln() / (kept as f64 * (1.0 - clamp(s_min)).ln())).ceil();
    let m = if m.is_finite() { m.max(1.0) as u64 } else { u64::MAX };
    (m.min(m_max as u64) as usize).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn n_ias_matches_the_design_table() {
        // The paper's table at C = 0.99: p = 0.9 → 2, 0.5 → 7, 0.2 → 21, 0.05 → 90.
        assert_eq!(n_ias(0.9, 0.99), 2);
        assert_eq!(n_ias(0.5, 0.99), 7);
        assert_eq!(n_ias(0.2, 0.99), 21);
        assert_eq!(n_ias(0.05, 0.99), 90);
        // p = 1 is clamped to 1 - ε: one sample; p = 0 to ε: ln(0.01)/ln(1 - 1e-4).
        assert_eq!(n_ias(1.0, 0.99), 1);
        assert_eq!(n_ias(0.0, 0.99), 46050);
        assert_eq!(n_ias(1e-9, 0.99), n_ias(0.0, 0.99), "below ε clamps to ε");
        assert_eq!(samples(0.0, 0.99, 64), 64, "capped at N_max");
        assert_eq!(samples(0.9, 0.99, 64), 2);
        assert_eq!(samples(0.999, 0.5, 64), 1);
    }

    #[test]
    fn n_ias_is_the_smallest_n_whose_coverage_reaches_c() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for _ in 0..2000 {
            let p: f64 = rng.random_range(0.001..0.999);
            let c: f64 = rng.random_range(0.5..0.999);
            let n = n_ias(p, c);
            let coverage = |n: u64| 1.0 - (1.0 - p).powf(n as f64);
            assert!(coverage(n) >= c - 1e-9, "p {p} c {c} n {n}");
            if n > 1 {
                assert!(coverage(n - 1) < c + 1e-9, "p {p} c {c}: {} already covers", n - 1);
            }
            // More confidence or less success never asks for fewer samples.
            assert!(n_ias(p, (c + 0.01).min(0.9999)) >= n);
            assert!(n_ias(p * 0.9, c) >= n);
        }
    }

    #[test]
    fn beam_keeps_one_path_when_the_best_is_nearly_certain() {
        // s(1) = 0.9: N_IAS = 2 ≤ 1 · 8.
        assert_eq!(keep(&[0.9, 0.5, 0.2], 0.99, 8, 8), 1);
        // s(1) = 0.3 (N_IAS 13 > 8), s(2) = 0.25 (N_IAS 17 > 16), s(3) = 0.2 (N_IAS 21 ≤ 24): k = 3.
        assert_eq!(keep(&[0.3, 0.25, 0.2, 0.1], 0.99, 8, 8), 3);
        // Hopeless paths: keep K_max, or every path when there are fewer.
        assert_eq!(keep(&[0.01; 20], 0.99, 8, 8), 8);
        assert_eq!(keep(&[0.01; 3], 0.99, 8, 8), 3);
    }

    #[test]
    fn beam_children_split_the_coverage_across_kept_paths() {
        // One kept path at s_min 0.5: ceil(ln 0.01 / ln 0.5) = 7.
        assert_eq!(children(0.5, 1, 0.99, 8), 7);
        // Three kept paths at s_min 0.2: ceil(4.605 / (3 · 0.2231)) = 7.
        assert_eq!(children(0.2, 3, 0.99, 8), 7);
        assert_eq!(children(0.0, 2, 0.99, 8), 8, "capped at M_max");
        assert_eq!(children(0.99, 4, 0.99, 8), 1);
    }
}
