//! Per-sequence token choice: presence and frequency penalties, then greedy
//! at temperature 0, else temperature, top-k and top-p with the sequence's
//! own seeded RNG, so a sequence draws the same tokens whatever shares its
//! batch. Also per-token logprobs (of the model's own distribution).

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Temperatures below this sample greedily.
pub const GREEDY_BELOW: f32 = 1e-5;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 keeps every token.
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    pub seed: u64,
    pub penalties: Penalties,
}

/// OpenAI's repetition penalties over the tokens the sequence generated:
/// each logit is lowered by `frequency` times the token's count so far and
/// by `presence` once it has appeared (vLLM's reading: output tokens only,
/// before temperature, greedy included).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Penalties {
    pub presence: f32,
    pub frequency: f32,
}

impl Penalties {
    pub const NONE: Penalties = Penalties { presence: 0.0, frequency: 0.0 };

    pub fn is_none(&self) -> bool {
        *self == Self::NONE
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0, penalties: Penalties::NONE }
    }

    /// Temperature sampling over the whole vocabulary, without penalties.
    pub fn sampled(temperature: f32, seed: u64) -> Self {
        Self { temperature, top_p: 1.0, top_k: 0, seed, penalties: Penalties::NONE }
    }

    pub fn with_seed(self, seed: u64) -> Self {
        Self { seed, ..self }
    }
}

/// Derives the seed of child `index` of a sequence seeded `seed`, so that
/// `n` samples of one request are distinct yet reproducible.
pub fn child_seed(seed: u64, index: u64) -> u64 {
    // SplitMix64 finaliser over (seed, index): well mixed and cheap.
    let mut z = seed ^ index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Candidate buffer reused across steps.
    candidates: Vec<(u32, f32)>,
    /// How often each token was drawn, kept only when penalties are on.
    counts: HashMap<u32, u32>,
    /// The logits with penalties applied, reused across steps.
    penalised: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            candidates: Vec::new(),
            counts: HashMap::new(),
            penalised: Vec::new(),
        }
    }

    /// A sampler for a child sequence: its own seed, and the tokens the
    /// parent drew still count towards the penalties.
    pub fn child(&self, seed: u64) -> Self {
        let mut child = Self::new(SamplingParams { seed, ..self.params });
        child.counts = self.counts.clone();
        child
    }

    pub fn params(&self) -> SamplingParams {
        self.params
    }

    /// Picks the next token from raw logits, penalties applied.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.penalties.is_none() {
            return self.sample_from(logits);
        }
        let Penalties { presence, frequency } = self.params.penalties;
        let mut penalised = std::mem::take(&mut self.penalised);
        penalised.clear();
        penalised.extend_from_slice(logits);
        for (&t, &n) in &self.counts {
            if let Some(l) = penalised.get_mut(t as usize) {
                *l -= frequency * n as f32 + presence;
            }
        }
        let token = self.sample_from(&penalised);
        self.penalised = penalised;
        *self.counts.entry(token).or_default() += 1;
        token
    }

    fn sample_from(&mut self, logits: &[f32]) -> u32 {
        // Why the floor: 1/T overflows f32 below about 3e-39, and well
        // before that the top token takes all the mass; vLLM treats
        // T < 1e-5 as greedy too.
        if self.params.temperature < GREEDY_BELOW {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp())));
        let by_weight_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = self.params.top_k;
        if k > 0 && k < c.len() {
            c.select_nth_unstable_by(k - 1, by_weight_desc);
            c.truncate(k);
        }
        if self.params.top_p < 1.0 {
            c.sort_unstable_by(by_weight_desc);
            let total: f32 = c.iter().map(|x| x.1).sum();
            let mut mass = 0.0;
            let mut keep = c.len();
            for (i, x) in c.iter().enumerate() {
                mass += x.1 / total;
                if mass >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
        }
        let total: f32 = c.iter().map(|x| x.1).sum();
        // One draw per sampled token keeps the RNG stream aligned across runs.
        let mut u = self.rng.random::<f32>() * total;
        if !(total.is_finite() && total > 0.0) {
            // Non-finite logits (a NaN anywhere makes every weight NaN).
            return argmax(logits);
        }
        for &(id, w) in c.iter() {
            if u < w {
                return id;
            }
            u -= w;
        }
        // Rounding in the f32 sum can leave u just past the last weight:
        // the answer is then the last token that had any mass, never one
        // top-k or top-p already left with none.
        c.iter().rev().find(|x| x.1 > 0.0).map_or_else(|| argmax(logits), |x| x.0)
    }
}

/// Lowest index among the largest values.
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-probability of `token` under the model's distribution (temperature
/// 1, unfiltered), and the `top` most likely tokens with theirs.
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let chosen = logits[token as usize] - lse;
    if top == 0 {
        return (chosen, Vec::new());
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit_desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    let top = top.min(idx.len());
    idx.select_nth_unstable_by(top - 1, by_logit_desc);
    idx.truncate(top);
    idx.sort_unstable_by(by_logit_desc);
    (chosen, idx.into_iter().map(|i| (i, logits[i as usize] - lse)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_p, top_k, seed, penalties: Penalties::NONE }
    }

    #[test]
    fn temperature_zero_is_argmax_with_ties_to_the_lowest_id() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 1.0, 0, seed));
            (0..40).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_only_the_nucleus() {
        let logits = [0.0, 5.0, 4.9, -3.0];
        let mut s = Sampler::new(params(1.0, 1.0, 1, 3));
        assert!((0..20).all(|_| s.sample(&logits) == 1));
        // Tokens 1 and 2 hold ~99.6% of the mass: top_p 0.9 never draws 0 or 3.
        let mut s = Sampler::new(params(1.0, 0.9, 0, 3));
        let drawn: Vec<u32> = (0..200).map(|_| s.sample(&logits)).collect();
        assert!(drawn.iter().all(|&t| t == 1 || t == 2));
        assert!(drawn.contains(&1) && drawn.contains(&2));
    }

    #[test]
    fn a_vanishing_temperature_is_greedy_and_non_finite_logits_fall_back_to_argmax() {
        for t in [1e-40f32, 1e-6] {
            let mut s = Sampler::new(params(t, 1.0, 0, 3));
            assert_eq!(s.sample(&[1.0, 5.0, 2.0, 0.5]), 1, "T {t}");
            let mut s = Sampler::new(params(t, 1.0, 2, 3));
            assert_eq!(s.sample(&[1.0, 5.0, 2.0, 0.5]), 1, "T {t}, top-k 2");
        }
        let mut s = Sampler::new(params(0.7, 1.0, 0, 3));
        assert_eq!(s.sample(&[1.0, f32::NAN, 4.0, 0.5]), 2, "argmax skips NaN");
        assert_eq!(s.sample(&[f32::NEG_INFINITY; 3]), 0);
    }

    #[test]
    fn penalties_lower_drawn_tokens_by_count_and_presence_and_children_inherit_the_counts() {
        let logits = [2.0f32, 1.5, 0.0];
        let greedy = |presence, frequency| SamplingParams {
            penalties: Penalties { presence, frequency },
            ..SamplingParams::greedy()
        };
        // Frequency 0.3: token 0 leads by 0.5, so it is drawn twice (2.0,
        // 1.7), then token 1 (1.5 > 1.4), then 0 again (1.4 > 1.2).
        let mut s = Sampler::new(greedy(0.0, 0.3));
        let drawn: Vec<u32> = (0..4).map(|_| s.sample(&logits)).collect();
        assert_eq!(drawn, [0, 0, 1, 0]);
        // Presence 0.6: once each of 0 and 1 has appeared, 0 leads again.
        let mut s = Sampler::new(greedy(0.6, 0.0));
        let drawn: Vec<u32> = (0..4).map(|_| s.sample(&logits)).collect();
        assert_eq!(drawn, [0, 1, 0, 0]);
        let mut child = s.child(9);
        assert_eq!(child.sample(&logits), 0, "the parent's tokens still count");
        // A negative penalty encourages repeats.
        let mut s = Sampler::new(greedy(-1.0, 0.0));
        assert_eq!(s.sample(&[1.5, 1.0]), 0);
        assert_eq!(s.sample(&[1.4, 1.5]), 0);
        let mut off = Sampler::new(SamplingParams::greedy());
        assert_eq!((0..3).map(|_| off.sample(&logits)).collect::<Vec<_>>(), [0, 0, 0]);
    }

    #[test]
    fn sampling_follows_the_softmax_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // probabilities 1/4, 3/4
        let mut s = Sampler::new(params(1.0, 1.0, 0, 11));
        let ones = (0..4000).filter(|_| s.sample(&logits) == 1).count();
        assert!((2800..3200).contains(&ones), "{ones}");
    }

    #[test]
    fn logprobs_are_log_softmax_with_the_top_alternatives_in_order() {
        let logits = [1.0f32, 2.0, 3.0];
        let (lp, top) = logprobs(&logits, 0, 2);
        let z = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln();
        assert!((lp - (1.0 - z)).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
        assert!((top[0].1 - (3.0 - z)).abs() < 1e-6);
    }

    #[test]
    fn child_seeds_differ_from_each_other_and_from_the_parent() {
        let seeds: Vec<u64> = (0..8).map(|i| child_seed(42, i)).collect();
        let mut uniq = seeds.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), 8);
        assert!(!seeds.contains(&42));
    }
}
