//! The device path's attention: RoPE, KV writes into the pool and causal
//! attention as candle ops on the model's device, batched over the
//! sequences of a step. Everything that depends only on the batch (positions,
//! pool rows, masks) is built once per forward pass and shared by every
//! layer, so a decode step of 64 sequences costs the same few kernels per
//! layer as a step of one (on a GPU a launch costs ~5 µs; one set of small
//! kernels per sequence and layer would be launch-bound).
//!
//! Entries are grouped by how many tokens they feed (all decoding sequences
//! feed one and form one group; a prompt chunk of n tokens groups with
//! others of n). A group attends with batched matmuls over its sequences'
//! positions, gathered from the pool with one `index_select` and masked to
//! each sequence's length and causal order.

use candle_core::{DType, Device, Tensor};

use super::ModelError;
use super::attention::{AttnShape, Rope};
use super::config::RopeStyle;
use super::kv_pool::{KvPool, PagedCache, PoolTensors, WritePlan};

/// RoPE tables on the device, `(max_position, head_dim / 2)` in the
/// activation dtype, from the same f32 angles as the host path's.
#[derive(Debug)]
pub(crate) struct DeviceRope {
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
}

impl DeviceRope {
    pub(crate) fn new(rope: &Rope, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let (cos, sin, half) = rope.tables();
        let dims = (rope.max_position(), half);
        Ok(Self {
            cos: Tensor::from_slice(cos, dims, device)?.to_dtype(dtype)?,
            sin: Tensor::from_slice(sin, dims, device)?.to_dtype(dtype)?,
            style: rope.style(),
        })
    }

    /// Rotates `x` of shape `(rows, heads, 1, head_dim)`, row `r` to the
    /// position whose tables are `cos[r]`, `sin[r]` (`(rows, 1, head_dim / 2)`).
    fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(x, cos, sin),
            RopeStyle::HalfSplit => candle_nn::rotary_emb::rope(x, cos, sin),
        }
    }
}

/// Sequences of one batch that feed the same number of tokens.
#[derive(Debug)]
struct Group {
    /// First row of the group in the batch's rows.
    row0: usize,
    entries: usize,
    tokens: usize,
    /// The longest cache in the group after this step.
    len: usize,
    /// Pool rows `(entries * len)`: each entry's positions, padded with row 0.
    gather: Tensor,
    /// `(entries, tokens, 1, len)` f32: 0 where a query sees a key, -inf elsewhere.
    mask: Tensor,
}

/// What every layer of one forward pass shares.
#[derive(Debug)]
pub(crate) struct Step {
    rows: usize,
    cos: Tensor,
    sin: Tensor,
    /// `(n_kv_heads, rows, head_dim)`: the pool row each fed row's k/v goes to.
    write_index: Tensor,
    /// Copy on write: pool rows to read `(c)` and where to put them `(n_kv_heads, c, head_dim)`.
    copies: Option<(Tensor, Tensor)>,
    groups: Vec<Group>,
    capacity_blocks: usize,
}

/// `(n_kv_heads, rows.len(), head_dim)` u32: `rows[r]` at every `[h, r, d]`,
/// the index `scatter_set` along dim 1 wants.
fn scatter_index(rows: &[u32], shape: AttnShape, device: &Device) -> candle_core::Result<Tensor> {
    let mut idx = Vec::with_capacity(shape.n_kv_heads * rows.len() * shape.head_dim);
    for _ in 0..shape.n_kv_heads {
        for &r in rows {
            idx.extend(std::iter::repeat_n(r, shape.head_dim));
        }
    }
    Tensor::from_vec(idx, (shape.n_kv_heads, rows.len(), shape.head_dim), device)
}

impl Step {
    /// Reserves pool rows for each `(cache, tokens)` (in row order, entries
    /// feeding equal token counts next to each other) and builds what the
    /// layers share.
    pub(crate) fn prepare(
        pool: &KvPool,
        caches: &mut [(&mut PagedCache, usize)],
        rope: &DeviceRope,
        shape: AttnShape,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let mut plan = WritePlan::default();
        pool.reserve(caches, &mut plan);
        let mut positions = Vec::with_capacity(plan.write_rows.len());
        for (cache, n) in caches.iter() {
            positions.extend((cache.len()..cache.len() + n).map(|p| p as u32));
        }
        let rows = positions.len();
        let positions = Tensor::from_vec(positions, rows, device)?;
        let half = rope.cos.dim(1)?;
        let cos = rope.cos.index_select(&positions, 0)?.reshape((rows, 1, half))?;
        let sin = rope.sin.index_select(&positions, 0)?.reshape((rows, 1, half))?;
        let write_index = scatter_index(&plan.write_rows, shape, device)?;
        let copies = if plan.copies.is_empty() {
            None
        } else {
            let (from, to): (Vec<u32>, Vec<u32>) = plan.copies.iter().copied().unzip();
            let n = from.len();
            Some((Tensor::from_vec(from, n, device)?, scatter_index(&to, shape, device)?))
        };
        let mut groups = Vec::new();
        let (mut start, mut row0) = (0, 0);
        while start < caches.len() {
            let tokens = caches[start].1;
            let end = start + caches[start..].iter().take_while(|(_, n)| *n == tokens).count();
            groups.push(Self::group(&caches[start..end], row0, device)?);
            row0 += (end - start) * tokens;
            start = end;
        }
        Ok(Self { rows, cos, sin, write_index, copies, groups, capacity_blocks: plan.capacity_blocks })
    }

    fn group(caches: &[(&mut PagedCache, usize)], row0: usize, device: &Device) -> Result<Group, ModelError> {
        let tokens = caches[0].1;
        let len = caches.iter().map(|(c, n)| c.len() + n).max().unwrap_or(0);
        let mut gather = Vec::with_capacity(caches.len() * len);
        let mut mask = Vec::with_capacity(caches.len() * tokens * len);
        for (cache, n) in caches {
            let (pos0, total) = (cache.len(), cache.len() + n);
            cache.rows(total, &mut gather);
            // Padding reads pool row 0: always allocated, finite, and masked out.
            gather.extend(std::iter::repeat_n(0, len - total));
            for t in 0..*n {
                let visible = pos0 + t + 1;
                mask.extend((0..len).map(|j| if j < visible { 0f32 } else { f32::NEG_INFINITY }));
            }
        }
        let entries = caches.len();
        Ok(Group {
            row0,
            entries,
            tokens,
            len,
            gather: Tensor::from_vec(gather, entries * len, device)?,
            mask: Tensor::from_vec(mask, (entries, tokens, 1, len), device)?,
        })
    }

    /// Pool blocks the step's rows need the pool tensors to hold.
    pub(crate) fn capacity_blocks(&self) -> usize {
        self.capacity_blocks
    }
}

/// One layer's attention for every row of the step: rotates `q` and `k`
/// (`(rows, n_heads * head_dim)` and `(rows, kv_dim)`), writes `k` and `v`
/// to the pool, and returns `(rows, n_heads * head_dim)`.
pub(crate) fn attend(
    shape: AttnShape,
    layer: usize,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    rope: &DeviceRope,
    step: &Step,
    pool: &PoolTensors,
) -> Result<Tensor, ModelError> {
    let AttnShape { n_heads, n_kv_heads, head_dim } = shape;
    let rows = step.rows;
    let q = rope.apply(&q.reshape((rows, n_heads, 1, head_dim))?, &step.cos, &step.sin)?;
    // Scaling the queries (rows x width) is cheaper than the scores (rows x heads x len).
    let q = (q.reshape((rows, n_heads * head_dim))? * (1.0 / (head_dim as f64).sqrt()))?;
    let k = rope.apply(&k.reshape((rows, n_kv_heads, 1, head_dim))?, &step.cos, &step.sin)?;
    let head_major = |t: &Tensor| t.reshape((rows, n_kv_heads, head_dim))?.transpose(0, 1)?.contiguous();
    let (k, v) = (head_major(&k)?, head_major(v)?);
    let (pool_k, pool_v) = (&pool.k[layer], &pool.v[layer]);
    // Copies first: a copy reads a shared block that a later write may extend.
    if let Some((from, to)) = &step.copies {
        pool_k.scatter_set(to, &pool_k.index_select(from, 1)?, 1)?;
        pool_v.scatter_set(to, &pool_v.index_select(from, 1)?, 1)?;
    }
    pool_k.scatter_set(&step.write_index, &k, 1)?;
    pool_v.scatter_set(&step.write_index, &v, 1)?;
    let mut outs = Vec::with_capacity(step.groups.len());
    for g in &step.groups {
        let q = q.narrow(0, g.row0, g.entries * g.tokens)?;
        outs.push(attend_group(shape, &q, g, pool_k, pool_v)?);
    }
    Ok(if outs.len() == 1 { outs.remove(0) } else { Tensor::cat(&outs, 0)? })
}

/// Causal attention of one group's queries `(entries * tokens, n_heads *
/// head_dim)`, already scaled. GQA without repeating keys: the query heads
/// sharing a kv head are stacked as extra query rows of that head.
fn attend_group(
    shape: AttnShape,
    q: &Tensor,
    g: &Group,
    pool_k: &Tensor,
    pool_v: &Tensor,
) -> Result<Tensor, ModelError> {
    let AttnShape { n_heads, n_kv_heads, head_dim } = shape;
    let group = n_heads / n_kv_heads;
    let (b, t, l) = (g.entries, g.tokens, g.len);
    let q = q
        .reshape((b, t, n_kv_heads, group, head_dim))?
        .permute((2, 0, 1, 3, 4))?
        .contiguous()?
        .reshape((n_kv_heads, b, t * group, head_dim))?;
    let k = pool_k.index_select(&g.gather, 1)?.reshape((n_kv_heads, b, l, head_dim))?;
    let v = pool_v.index_select(&g.gather, 1)?.reshape((n_kv_heads, b, l, head_dim))?;
    let scores = q.matmul(&k.t()?)?;
    // Numeric trap: the mask's -inf and a softmax over thousands of
    // positions in f16/bf16 (sums of exps with 8-11 mantissa bits) lose the
    // small probabilities; scores and softmax run in f32, as flash attention's
    // accumulators do, and only the probabilities go back to the cache dtype.
    let scores =
        scores.to_dtype(DType::F32)?.reshape((n_kv_heads, b, t, group, l))?.broadcast_add(&g.mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(pool_v.dtype())?.reshape((
        n_kv_heads,
        b,
        t * group,
        l,
    ))?;
    let out = probs.matmul(&v)?;
    Ok(out
        .reshape((n_kv_heads, b, t, group, head_dim))?
        .permute((1, 2, 0, 3, 4))?
        .reshape((b * t, n_heads * head_dim))?)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::config::{Arch, ModelConfig};
    use crate::model::kv::{HostCache, KvMemory};
    use crate::model::kv_pool::PoolShape;

    fn cfg(style: RopeStyle) -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            hidden: 24,
            intermediate: 8,
            n_layers: 1,
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 4,
            vocab: 4,
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_style: style,
            rope_freq_factors: None,
            max_position: 64,
            tie_embeddings: true,
        }
    }

    fn values(n: usize, salt: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7 + salt * 13) % 23) as f32 - 11.0) / 9.0).collect()
    }

    /// Feeds `fed[i]` rows to sequence `i` (after `cached[i]` positions fed
    /// one at a time) through both paths and returns (host, device) outputs.
    fn both_paths(style: RopeStyle, cached: &[usize], fed: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let cfg = cfg(style);
        let shape = AttnShape::of(&cfg);
        let (q_w, kv_w) = (cfg.n_heads * cfg.head_dim, cfg.kv_dim());
        let rope = Rope::new(&cfg);
        let dev = Device::Cpu;
        let memory = Arc::new(KvMemory::default());
        let pool_shape = PoolShape { n_layers: 1, n_kv_heads: 2, head_dim: 4, dtype: DType::F32 };
        let pool = Arc::new(KvPool::new(pool_shape, dev.clone(), memory.clone()));
        let drope = DeviceRope::new(&rope, DType::F32, &dev).unwrap();
        let mut hosts: Vec<HostCache> =
            cached.iter().map(|_| HostCache::new(1, kv_w, memory.clone())).collect();
        let mut pageds: Vec<PagedCache> = cached.iter().map(|_| pool.new_cache()).collect();
        let mut feed = |counts: &[usize], salt: usize| -> (Vec<f32>, Vec<f32>) {
            let rows: usize = counts.iter().sum();
            let (q, k, v) =
                (values(rows * q_w, salt), values(rows * kv_w, salt + 1), values(rows * kv_w, salt + 2));
            let mut host_out = vec![0f32; rows * q_w];
            let (mut qh, mut kh) = (q.clone(), k.clone());
            let mut row = 0;
            for (c, &n) in hosts.iter_mut().zip(counts) {
                let pos0 = c.len();
                for i in 0..n {
                    rope.apply(&mut qh[(row + i) * q_w..][..q_w], pos0 + i);
                    rope.apply(&mut kh[(row + i) * kv_w..][..kv_w], pos0 + i);
                }
                c.append(0, &kh[row * kv_w..(row + n) * kv_w], &v[row * kv_w..(row + n) * kv_w]);
                let out = &mut host_out[row * q_w..(row + n) * q_w];
                super::super::attention::attend(
                    shape,
                    &qh[row * q_w..(row + n) * q_w],
                    c,
                    0,
                    out,
                    &mut Vec::new(),
                );
                row += n;
            }
            let mut entries: Vec<(&mut PagedCache, usize)> =
                pageds.iter_mut().zip(counts).filter(|(_, n)| **n > 0).map(|(c, &n)| (c, n)).collect();
            let step = Step::prepare(&pool, &mut entries, &drope, shape, &dev).unwrap();
            let tensors = pool.tensors(step.capacity_blocks()).unwrap();
            let t = |x: &[f32], w: usize| Tensor::from_slice(x, (rows, w), &dev).unwrap();
            let out =
                attend(shape, 0, (&t(&q, q_w), &t(&k, kv_w), &t(&v, kv_w)), &drope, &step, &tensors).unwrap();
            drop(tensors);
            for (c, n) in entries.iter_mut() {
                c.commit(*n);
            }
            (host_out, out.flatten_all().unwrap().to_vec1().unwrap())
        };
        for (i, &c) in cached.iter().enumerate() {
            for p in 0..c {
                let counts: Vec<usize> = (0..cached.len()).map(|j| usize::from(j == i)).collect();
                feed(&counts, 100 + i * 31 + p);
            }
        }
        feed(fed, 7)
    }

    #[test]
    fn batched_device_attention_over_sequences_of_different_lengths_matches_the_host_path() {
        // GQA (6 query heads on 2 kv heads), three decoding sequences of
        // different lengths and two prompt chunks of 3 tokens, both RoPE styles.
        for style in [RopeStyle::Interleaved, RopeStyle::HalfSplit] {
            let (host, device) = both_paths(style, &[5, 0, 17, 2, 0], &[1, 1, 1, 3, 3]);
            let worst = host.iter().zip(&device).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-5, "{style:?}: largest difference {worst}");
        }
    }
}
