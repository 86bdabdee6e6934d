//! The device path's KV storage: per layer, one pool tensor of keys and one
//! of values on the model's device, `(n_kv_heads, capacity, head_dim)` in
//! the activation dtype, cut into blocks of [`BLOCK`] positions. A sequence's
//! cache is a [`PagedCache`]: its own table of blocks, owned by the sequence
//! like any other cache; the pool is only the memory those tables point into.
//!
//! Forks share blocks through reference counts, so a prompt prefilled once
//! serves N samples without a copy. Only a partly filled last block is
//! copied, and only when a sequence is about to write into it while another
//! still holds it (copy on write, done in the forward pass, batched per
//! layer). A block returns to the free list when its last holder drops, and
//! [`KvMemory`] counts the blocks held, so live bytes return to zero when
//! every sequence is gone. The pool tensors only ever grow (by doubling,
//! copying once), so their capacity is the high-water mark of live blocks.
//!
//! Heads come first in the pool so that gathering a batch's positions with
//! one `index_select` yields `(n_kv_heads, batch, len, head_dim)`, the layout
//! batched matmuls read without another copy.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use candle_core::{DType, Device, Tensor};

use super::ModelError;
use super::kv::KvMemory;

/// Positions per block: small enough that a fork's copied partial block is
/// cheap, large enough that block tables stay short.
pub(crate) const BLOCK: usize = 16;

/// Blocks the pool tensors hold at first use.
const INITIAL_BLOCKS: usize = 16;

/// What one pool stores per position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolShape {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
}

impl PoolShape {
    /// Bytes of one block across every layer, keys and values.
    fn block_bytes(&self) -> usize {
        self.n_layers * 2 * self.n_kv_heads * BLOCK * self.head_dim * self.dtype.size_in_bytes()
    }
}

/// Reference counts of the blocks handed out, and the free list.
#[derive(Debug, Default)]
struct Blocks {
    refs: Vec<u32>,
    free: Vec<u32>,
}

/// The pool tensors of every layer.
#[derive(Debug)]
pub(crate) struct PoolTensors {
    pub(crate) k: Vec<Tensor>,
    pub(crate) v: Vec<Tensor>,
    blocks: usize,
}

#[derive(Debug)]
pub(crate) struct KvPool {
    shape: PoolShape,
    device: Device,
    blocks: Mutex<Blocks>,
    tensors: Mutex<PoolTensors>,
    memory: Arc<KvMemory>,
}

/// A poisoned lock means a panic elsewhere while it was held; the counts
/// are updated one statement at a time, so they are still consistent.
fn relock<'a, T>(r: Result<MutexGuard<'a, T>, PoisonError<MutexGuard<'a, T>>>) -> MutexGuard<'a, T> {
    r.unwrap_or_else(PoisonError::into_inner)
}

impl KvPool {
    pub(crate) fn new(shape: PoolShape, device: Device, memory: Arc<KvMemory>) -> Self {
        let tensors = PoolTensors { k: Vec::new(), v: Vec::new(), blocks: 0 };
        Self { shape, device, blocks: Mutex::default(), tensors: Mutex::new(tensors), memory }
    }

    /// An empty cache drawing on this pool.
    pub(crate) fn new_cache(self: &Arc<Self>) -> PagedCache {
        PagedCache { pool: self.clone(), blocks: Vec::new(), len: 0 }
    }

    fn block_bytes(&self) -> usize {
        self.shape.block_bytes()
    }

    fn alloc(&self, blocks: &mut Blocks) -> u32 {
        self.memory.add(self.block_bytes());
        match blocks.free.pop() {
            Some(id) => {
                blocks.refs[id as usize] = 1;
                id
            }
            None => {
                blocks.refs.push(1);
                (blocks.refs.len() - 1) as u32
            }
        }
    }

    fn release(&self, blocks: &mut Blocks, id: u32) {
        let r = &mut blocks.refs[id as usize];
        *r -= 1;
        if *r == 0 {
            blocks.free.push(id);
            self.memory.sub(self.block_bytes());
        }
    }

    /// Reserves pool rows for `n` new positions of each cache (blocks for
    /// positions not yet covered, and a private copy of a shared partly
    /// filled last block). Appends the pool row of every new position to
    /// `plan.write_rows`, cache by cache, and the copies to `plan.copies`.
    /// The caches' lengths change only in [`PagedCache::commit`].
    pub(crate) fn reserve(&self, caches: &mut [(&mut PagedCache, usize)], plan: &mut WritePlan) {
        let mut blocks = relock(self.blocks.lock());
        for (cache, n) in caches.iter_mut() {
            let pos0 = cache.len;
            let partial = pos0 % BLOCK;
            if partial > 0 {
                let last = pos0 / BLOCK;
                let old = cache.blocks[last];
                if blocks.refs[old as usize] > 1 {
                    let new = self.alloc(&mut blocks);
                    for i in 0..partial {
                        plan.copies.push((row(old, i), row(new, i)));
                    }
                    self.release(&mut blocks, old);
                    cache.blocks[last] = new;
                }
            }
            for p in pos0..pos0 + *n {
                // A failed pass may have left blocks beyond `len`; they are reused.
                if cache.blocks.len() <= p / BLOCK {
                    let id = self.alloc(&mut blocks);
                    cache.blocks.push(id);
                }
                plan.write_rows.push(row(cache.blocks[p / BLOCK], p % BLOCK));
            }
        }
        plan.capacity_blocks = blocks.refs.len();
    }

    /// The pool tensors, grown to hold every block handed out so far; held
    /// for a whole forward pass.
    pub(crate) fn tensors(&self, capacity_blocks: usize) -> Result<MutexGuard<'_, PoolTensors>, ModelError> {
        let mut guard = relock(self.tensors.lock());
        let have = guard.blocks;
        if have < capacity_blocks.max(1) {
            let blocks = capacity_blocks.max(2 * have).max(INITIAL_BLOCKS);
            let dims = (self.shape.n_kv_heads, blocks * BLOCK, self.shape.head_dim);
            let mut grown = PoolTensors { k: Vec::new(), v: Vec::new(), blocks };
            for layer in 0..self.shape.n_layers {
                let (k, v) = (
                    Tensor::zeros(dims, self.shape.dtype, &self.device)?,
                    Tensor::zeros(dims, self.shape.dtype, &self.device)?,
                );
                if have > 0 {
                    k.slice_set(&guard.k[layer], 1, 0)?;
                    v.slice_set(&guard.v[layer], 1, 0)?;
                }
                grown.k.push(k);
                grown.v.push(v);
            }
            *guard = grown;
        }
        Ok(guard)
    }

    /// Bytes the pool tensors take on the device (the capacity, not the
    /// live blocks [`KvMemory`] counts).
    pub(crate) fn capacity_bytes(&self) -> usize {
        relock(self.tensors.lock()).blocks * self.block_bytes()
    }
}

/// The pool row of position `offset` of block `block`.
fn row(block: u32, offset: usize) -> u32 {
    block * BLOCK as u32 + offset as u32
}

/// Where one forward pass writes: filled by [`KvPool::reserve`].
#[derive(Debug, Default)]
pub(crate) struct WritePlan {
    /// The pool row of every fed position, in row order.
    pub(crate) write_rows: Vec<u32>,
    /// `(from, to)` pool rows copied before a layer's writes.
    pub(crate) copies: Vec<(u32, u32)>,
    pub(crate) capacity_blocks: usize,
}

/// One sequence's cache on the device path: its table of pool blocks.
#[derive(Debug)]
pub(crate) struct PagedCache {
    pool: Arc<KvPool>,
    blocks: Vec<u32>,
    len: usize,
}

impl PagedCache {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn pool(&self) -> &Arc<KvPool> {
        &self.pool
    }

    /// Pool rows of positions `0..upto` (reserved by [`KvPool::reserve`]).
    pub(crate) fn rows(&self, upto: usize, out: &mut Vec<u32>) {
        out.extend((0..upto).map(|p| row(self.blocks[p / BLOCK], p % BLOCK)));
    }

    /// Counts `n` positions written by a finished forward pass.
    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.blocks.len() * BLOCK >= self.len);
    }

    pub(crate) fn fork(&mut self) -> PagedCache {
        let mut blocks = relock(self.pool.blocks.lock());
        for &id in &self.blocks {
            blocks.refs[id as usize] += 1;
        }
        PagedCache { pool: self.pool.clone(), blocks: self.blocks.clone(), len: self.len }
    }

    pub(crate) fn private_bytes(&self) -> usize {
        let blocks = relock(self.pool.blocks.lock());
        self.blocks.iter().filter(|&&id| blocks.refs[id as usize] == 1).count() * self.pool.block_bytes()
    }
}

impl Drop for PagedCache {
    fn drop(&mut self) {
        let mut blocks = relock(self.pool.blocks.lock());
        for &id in &self.blocks {
            self.pool.release(&mut blocks, id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Arc<KvPool> {
        let shape = PoolShape { n_layers: 2, n_kv_heads: 1, head_dim: 2, dtype: DType::F32 };
        Arc::new(KvPool::new(shape, Device::Cpu, Arc::new(KvMemory::default())))
    }

    fn reserve(pool: &KvPool, cache: &mut PagedCache, n: usize) -> WritePlan {
        let mut plan = WritePlan::default();
        pool.reserve(&mut [(cache, n)], &mut plan);
        cache.commit(n);
        plan
    }

    #[test]
    fn forks_share_full_blocks_and_copy_a_shared_partial_block_only_when_writing_into_it() {
        let pool = pool();
        let block_bytes = pool.block_bytes();
        let mut parent = pool.new_cache();
        let plan = reserve(&pool, &mut parent, BLOCK + 3);
        assert_eq!(plan.write_rows, (0..(BLOCK + 3) as u32).collect::<Vec<_>>());
        assert_eq!(pool.memory.live_bytes(), 2 * block_bytes);
        let mut child = parent.fork();
        assert_eq!(pool.memory.live_bytes(), 2 * block_bytes, "a fork copies nothing");
        let plan = reserve(&pool, &mut child, 1);
        // The child's partial block is copied (3 rows) and it writes position BLOCK + 3 there.
        let fresh = 2 * BLOCK as u32;
        assert_eq!(plan.copies, (0..3).map(|i| (BLOCK as u32 + i, fresh + i)).collect::<Vec<_>>());
        assert_eq!(plan.write_rows, vec![fresh + 3]);
        // The parent is now the partial block's only holder: it writes in place.
        let plan = reserve(&pool, &mut parent, 1);
        assert!(plan.copies.is_empty());
        assert_eq!(plan.write_rows, vec![BLOCK as u32 + 3]);
        assert_eq!(pool.memory.live_bytes(), 3 * block_bytes);
        assert_eq!(child.private_bytes(), block_bytes);
        drop(parent);
        assert_eq!(pool.memory.live_bytes(), 2 * block_bytes, "the child keeps the shared block");
        drop(child);
        assert_eq!(pool.memory.live_bytes(), 0);
    }

    #[test]
    fn the_pool_tensors_grow_and_keep_what_was_written() {
        let pool = pool();
        let mut cache = pool.new_cache();
        let plan = reserve(&pool, &mut cache, 2);
        {
            let t = pool.tensors(plan.capacity_blocks).unwrap();
            let src = Tensor::new(&[[[1f32, 2.], [3., 4.]]], &Device::Cpu).unwrap();
            t.k[1].slice_set(&src, 1, 0).unwrap();
        }
        let t = pool.tensors(10 * INITIAL_BLOCKS).unwrap();
        assert_eq!(t.blocks, 10 * INITIAL_BLOCKS);
        let kept = t.k[1].narrow(1, 0, 2).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(kept, vec![1., 2., 3., 4.]);
    }
}
