//! Per-sequence key/value caches: an explicit value owned by each sequence,
//! with prefixes shared between forks and live bytes counted per model.
//!
//! A model keeps its caches one of two ways, chosen once at load:
//!
//! - [`HostCache`] (the CPU f32 path): a list of frozen segments (`Arc`,
//!   shared by every sequence forked from the same parent) followed by a
//!   private tail that grows as the sequence decodes. Forking freezes the
//!   tail into a new shared segment, so a prompt prefilled once serves N
//!   samples without a copy; a segment's memory is released when the last
//!   sequence holding it is dropped.
//! - [`PagedCache`](super::kv_pool::PagedCache) (the device path): the
//!   sequence's table of blocks in its model's pool of device tensors.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::kv_pool::PagedCache;

/// Bytes held by all KV caches of one model, for metrics and leak tests.
#[derive(Debug, Default)]
pub struct KvMemory {
    bytes: AtomicUsize,
}

impl KvMemory {
    pub fn live_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn add(&self, bytes: usize) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn sub(&self, bytes: usize) {
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// One sequence's cached keys and values, kept the way its model keeps them.
#[derive(Debug)]
pub struct KvCache {
    store: Store,
}

#[derive(Debug)]
enum Store {
    Host(HostCache),
    Paged(PagedCache),
}

impl KvCache {
    pub(crate) fn host(cache: HostCache) -> Self {
        Self { store: Store::Host(cache) }
    }

    pub(crate) fn paged(cache: PagedCache) -> Self {
        Self { store: Store::Paged(cache) }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        match &self.store {
            Store::Host(c) => c.len(),
            Store::Paged(c) => c.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A new cache that shares every position of this one (no copy).
    pub fn fork(&mut self) -> KvCache {
        match &mut self.store {
            Store::Host(c) => KvCache::host(c.fork()),
            Store::Paged(c) => KvCache::paged(c.fork()),
        }
    }

    /// Bytes this cache holds alone (not shared with a fork).
    pub fn private_bytes(&self) -> usize {
        match &self.store {
            Store::Host(c) => c.private_bytes(),
            Store::Paged(c) => c.private_bytes(),
        }
    }

    pub(crate) fn as_host_mut(&mut self) -> Option<&mut HostCache> {
        match &mut self.store {
            Store::Host(c) => Some(c),
            Store::Paged(_) => None,
        }
    }

    pub(crate) fn as_paged_mut(&mut self) -> Option<&mut PagedCache> {
        match &mut self.store {
            Store::Paged(c) => Some(c),
            Store::Host(_) => None,
        }
    }
}

#[derive(Debug)]
struct Segment {
    /// Per layer: `len * kv_dim` floats, token-major.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    counted: usize,
    memory: Arc<KvMemory>,
}

impl Segment {
    fn new(n_layers: usize, memory: Arc<KvMemory>) -> Self {
        Self { k: vec![Vec::new(); n_layers], v: vec![Vec::new(); n_layers], counted: 0, memory }
    }

    fn len(&self, kv_dim: usize) -> usize {
        self.k[0].len() / kv_dim
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.memory.sub(self.counted);
    }
}

/// The host path's cache: shared frozen segments and a private tail.
#[derive(Debug)]
pub(crate) struct HostCache {
    shared: Vec<Arc<Segment>>,
    tail: Segment,
    shared_len: usize,
    kv_dim: usize,
}

impl HostCache {
    pub(crate) fn new(n_layers: usize, kv_dim: usize, memory: Arc<KvMemory>) -> Self {
        assert!(n_layers > 0 && kv_dim > 0, "a KV cache needs layers and a kv width");
        Self { shared: Vec::new(), tail: Segment::new(n_layers, memory), shared_len: 0, kv_dim }
    }

    /// Positions cached (those of layer 0; layers differ only inside a forward pass).
    pub(crate) fn len(&self) -> usize {
        self.shared_len + self.tail.len(self.kv_dim)
    }

    /// Positions cached in one layer, including rows appended during the
    /// forward pass in progress.
    pub(crate) fn layer_len(&self, layer: usize) -> usize {
        self.shared_len + self.tail.k[layer].len() / self.kv_dim
    }

    /// Appends `n` rows of keys and values (each `n * kv_dim` floats) to a layer.
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        debug_assert_eq!(k.len(), v.len());
        debug_assert_eq!(k.len() % self.kv_dim, 0);
        self.tail.k[layer].extend_from_slice(k);
        self.tail.v[layer].extend_from_slice(v);
        let bytes = 2 * std::mem::size_of_val(k);
        self.tail.counted += bytes;
        self.tail.memory.add(bytes);
    }

    /// The cached keys and values of one layer, as contiguous runs in position order.
    pub(crate) fn layer_runs(&self, layer: usize) -> impl Iterator<Item = (&[f32], &[f32])> {
        self.shared
            .iter()
            .map(move |s| (s.k[layer].as_slice(), s.v[layer].as_slice()))
            .chain(std::iter::once((self.tail.k[layer].as_slice(), self.tail.v[layer].as_slice())))
            .filter(|(k, _)| !k.is_empty())
    }

    /// A new cache that shares every position of this one. The private tail
    /// is frozen first, so both caches keep appending independently.
    pub(crate) fn fork(&mut self) -> HostCache {
        if !self.tail.k[0].is_empty() {
            let n_layers = self.tail.k.len();
            let memory = self.tail.memory.clone();
            let frozen = std::mem::replace(&mut self.tail, Segment::new(n_layers, memory));
            self.shared_len += frozen.len(self.kv_dim);
            self.shared.push(Arc::new(frozen));
        }
        HostCache {
            shared: self.shared.clone(),
            tail: Segment::new(self.tail.k.len(), self.tail.memory.clone()),
            shared_len: self.shared_len,
            kv_dim: self.kv_dim,
        }
    }

    /// Bytes this cache holds alone (its private tail).
    pub(crate) fn private_bytes(&self) -> usize {
        self.tail.counted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, kv_dim: usize, base: f32) -> Vec<f32> {
        (0..n * kv_dim).map(|i| base + i as f32).collect()
    }

    #[test]
    fn forked_caches_share_the_prefix_and_grow_apart() {
        let memory = Arc::new(KvMemory::default());
        let mut parent = HostCache::new(2, 4, memory.clone());
        for layer in 0..2 {
            parent.append(layer, &rows(3, 4, 0.0), &rows(3, 4, 100.0));
        }
        let prefix_bytes = memory.live_bytes();
        assert_eq!(prefix_bytes, 2 * 2 * 3 * 4 * 4);
        let mut child = parent.fork();
        assert_eq!(memory.live_bytes(), prefix_bytes, "a fork copies nothing");
        child.append(0, &rows(1, 4, 7.0), &rows(1, 4, 8.0));
        child.append(1, &rows(1, 4, 7.0), &rows(1, 4, 8.0));
        assert_eq!(child.len(), 4);
        assert_eq!(parent.len(), 3);
        let keys: Vec<f32> = child.layer_runs(0).flat_map(|(k, _)| k.iter().copied()).collect();
        assert_eq!(keys.len(), 16);
        assert_eq!(&keys[12..], &[7.0, 8.0, 9.0, 10.0]);
    }

    #[test]
    fn memory_is_released_when_the_last_holder_drops() {
        let memory = Arc::new(KvMemory::default());
        let mut parent = HostCache::new(1, 2, memory.clone());
        parent.append(0, &rows(5, 2, 0.0), &rows(5, 2, 0.0));
        let children: Vec<HostCache> = (0..4).map(|_| parent.fork()).collect();
        drop(parent);
        assert!(memory.live_bytes() > 0, "children still hold the prefix");
        drop(children);
        assert_eq!(memory.live_bytes(), 0);
    }
}
