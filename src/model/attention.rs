//! Rotary embeddings and causal attention on plain slices, one sequence at a
//! time, so that sequences of different lengths share one batched forward pass.
//!
//! Each query row is computed by the same code whatever else is in the batch,
//! which keeps batched decoding bit-identical to decoding alone.

use super::config::{ModelConfig, RopeStyle};
use super::kv::HostCache;

/// Precomputed RoPE angles for positions `0..max_position`.
#[derive(Debug)]
pub(crate) struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    style: RopeStyle,
    max_position: usize,
}

impl Rope {
    pub(crate) fn new(cfg: &ModelConfig) -> Self {
        let half = cfg.head_dim / 2;
        // Same arithmetic as candle's tables (f32 powf, then position * inv_freq),
        // so that parity tests compare like with like.
        let inv_freq: Vec<f32> = (0..cfg.head_dim)
            .step_by(2)
            .enumerate()
            .map(|(k, i)| {
                let f = 1f32 / cfg.rope_theta.powf(i as f32 / cfg.head_dim as f32);
                cfg.rope_freq_factors.as_ref().map_or(f, |factors| f / factors[k])
            })
            .collect();
        let max_position = cfg.max_position;
        let mut cos = Vec::with_capacity(max_position * half);
        let mut sin = Vec::with_capacity(max_position * half);
        for pos in 0..max_position {
            for f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self { cos, sin, half, style: cfg.rope_style, max_position }
    }

    pub(crate) fn max_position(&self) -> usize {
        self.max_position
    }

    /// The cos and sin tables, `max_position` rows of `head_dim / 2`.
    pub(crate) fn tables(&self) -> (&[f32], &[f32], usize) {
        (&self.cos, &self.sin, self.half)
    }

    pub(crate) fn style(&self) -> RopeStyle {
        self.style
    }

    /// Rotates every head of one row (`n_heads * head_dim` floats) to `pos`.
    pub(crate) fn apply(&self, row: &mut [f32], pos: usize) {
        let half = self.half;
        let cos = &self.cos[pos * half..(pos + 1) * half];
        let sin = &self.sin[pos * half..(pos + 1) * half];
        for head in row.chunks_exact_mut(2 * half) {
            match self.style {
                RopeStyle::Interleaved => {
                    for i in 0..half {
                        let (a, b) = (head[2 * i], head[2 * i + 1]);
                        head[2 * i] = a * cos[i] - b * sin[i];
                        head[2 * i + 1] = a * sin[i] + b * cos[i];
                    }
                }
                RopeStyle::HalfSplit => {
                    let (lo, hi) = head.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (lo[i], hi[i]);
                        lo[i] = a * cos[i] - b * sin[i];
                        hi[i] = b * cos[i] + a * sin[i];
                    }
                }
            }
        }
    }
}

/// Eight independent partial sums (one 8-lane vector, or two 4-lane ones)
/// let the compiler vectorise without reassociating floats on its own, so
/// every build of this function sums in the same order and gives the same
/// bits. `chunks_exact` tells it each chunk holds eight floats: with indexed
/// loads the bounds checks kept this loop scalar, and it was the hottest
/// loop of a batched step.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ta.iter().zip(tb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    pub(crate) fn of(cfg: &ModelConfig) -> Self {
        Self { n_heads: cfg.n_heads, n_kv_heads: cfg.n_kv_heads, head_dim: cfg.head_dim }
    }
}

/// Causal attention for the `n` newest positions of one sequence in one layer.
///
/// `q` holds `n` rows of `n_heads * head_dim`; their keys and values must
/// already be appended to `cache`. Row `i` sits at position `len - n + i`
/// and attends to every position up to and including its own. Writes `n`
/// rows of `n_heads * head_dim` to `out`.
pub(crate) fn attend(
    shape: AttnShape,
    q: &[f32],
    cache: &HostCache,
    layer: usize,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU was just checked for every feature attend_avx2 enables.
        unsafe { attend_avx2(shape, q, cache, layer, out, scores) };
        return;
    }
    attend_portable(shape, q, cache, layer, out, scores);
}

/// [`attend_portable`] compiled with 8-lane vectors. Without a
/// `target-cpu` flag Rust builds for SSE2 only; the loops above sum in
/// eight lanes either way (no FMA is enabled: fused products would round
/// differently), so both builds give the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_avx2(
    shape: AttnShape,
    q: &[f32],
    cache: &HostCache,
    layer: usize,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    attend_portable(shape, q, cache, layer, out, scores);
}

#[inline(always)]
fn attend_portable(
    shape: AttnShape,
    q: &[f32],
    cache: &HostCache,
    layer: usize,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let AttnShape { n_heads, n_kv_heads, head_dim } = shape;
    let q_width = n_heads * head_dim;
    let kv_dim = n_kv_heads * head_dim;
    let group = n_heads / n_kv_heads;
    let n = q.len() / q_width;
    let total = cache.layer_len(layer);
    let scale = 1.0 / (head_dim as f32).sqrt();
    out.fill(0.0);
    for row in 0..n {
        let visible = total - n + row + 1;
        for h in 0..n_heads {
            let g = h / group;
            let qh = &q[row * q_width + h * head_dim..][..head_dim];
            scores.clear();
            let mut seen = 0;
            for (k, _) in cache.layer_runs(layer) {
                let take = (k.len() / kv_dim).min(visible - seen);
                for t in 0..take {
                    scores.push(dot(qh, &k[t * kv_dim + g * head_dim..][..head_dim]) * scale);
                }
                seen += take;
                if seen == visible {
                    break;
                }
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            let oh = &mut out[row * q_width + h * head_dim..][..head_dim];
            let mut t_abs = 0;
            for (_, v) in cache.layer_runs(layer) {
                let take = (v.len() / kv_dim).min(visible - t_abs);
                for t in 0..take {
                    let p = scores[t_abs + t] * inv;
                    let vt = &v[t * kv_dim + g * head_dim..][..head_dim];
                    for (o, x) in oh.iter_mut().zip(vt) {
                        *o += p * x;
                    }
                }
                t_abs += take;
                if t_abs == visible {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kv::KvMemory;
    use std::sync::Arc;

    fn naive(q: &[f32], k: &[f32], v: &[f32], d: usize) -> Vec<f32> {
        let t = k.len() / d;
        let s: Vec<f32> = (0..t)
            .map(|i| q.iter().zip(&k[i * d..][..d]).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt())
            .collect();
        let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f32 = e.iter().sum();
        (0..d).map(|j| (0..t).map(|i| e[i] / z * v[i * d + j]).sum()).collect()
    }

    #[test]
    fn rope_frequency_factors_divide_each_frequency() {
        let cfg = |factors: Option<Vec<f32>>| ModelConfig {
            arch: crate::model::config::Arch::Llama,
            hidden: 8,
            intermediate: 8,
            n_layers: 1,
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 8,
            vocab: 4,
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_style: RopeStyle::HalfSplit,
            rope_freq_factors: factors,
            max_position: 16,
            tie_embeddings: true,
        };
        let plain = Rope::new(&cfg(None));
        // Frequency k divided by 2^k: position 8 of the scaled table is,
        // for frequency k, position 8 / 2^k of the plain one.
        let scaled = Rope::new(&cfg(Some(vec![1.0, 2.0, 4.0, 8.0])));
        let (pc, ps, half) = plain.tables();
        let (sc, ss, _) = scaled.tables();
        for k in 0..half {
            let p = 8 >> k;
            assert!((sc[8 * half + k] - pc[p * half + k]).abs() < 1e-5, "cos of frequency {k}");
            assert!((ss[8 * half + k] - ps[p * half + k]).abs() < 1e-5, "sin of frequency {k}");
        }
    }

    #[test]
    fn attention_over_split_runs_matches_a_naive_softmax() {
        let d = 4;
        let shape = AttnShape { n_heads: 2, n_kv_heads: 1, head_dim: d };
        let mut cache = HostCache::new(1, d, Arc::new(KvMemory::default()));
        let k: Vec<f32> = (0..5 * d).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect();
        let v: Vec<f32> = (0..5 * d).map(|i| ((i * 3 % 13) as f32 - 6.0) / 6.0).collect();
        cache.append(0, &k[..3 * d], &v[..3 * d]);
        let _child = cache.fork();
        cache.append(0, &k[3 * d..], &v[3 * d..]);
        // Two query rows: positions 3 and 4.
        let q: Vec<f32> = (0..2 * 2 * d).map(|i| (i as f32 - 7.0) / 8.0).collect();
        let mut out = vec![0.0; q.len()];
        attend(shape, &q, &cache, 0, &mut out, &mut Vec::new());
        for row in 0..2 {
            let visible = 4 + row;
            for h in 0..2 {
                let qh = &q[(row * 2 + h) * d..][..d];
                let want = naive(qh, &k[..visible * d], &v[..visible * d], d);
                let got = &out[(row * 2 + h) * d..][..d];
                for (a, b) in want.iter().zip(got) {
                    assert!((a - b).abs() < 1e-5, "{want:?} vs {got:?}");
                }
            }
        }
    }
}
