//! Per-sequence key/value caches: an explicit value owned by each sequence,
//! with prefixes shared between forks and live bytes counted per model.
//!
//! A cache is a list of frozen segments (`Arc`, shared by every sequence
//! forked from the same parent) followed by a private tail that grows as the
//! sequence decodes. Forking freezes the tail into a new shared segment, so a
//! prompt prefilled once serves N samples without a copy; a segment's memory
//! is released when the last sequence holding it is dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes held by all KV caches of one model, for metrics and leak tests.
#[derive(Debug, Default)]
pub struct KvMemory {
    bytes: AtomicUsize,
}

impl KvMemory {
    pub fn live_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
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
        self.memory.bytes.fetch_sub(self.counted, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct KvCache {
    shared: Vec<Arc<Segment>>,
    tail: Segment,
    shared_len: usize,
    kv_dim: usize,
}

impl KvCache {
    pub fn new(n_layers: usize, kv_dim: usize, memory: Arc<KvMemory>) -> Self {
        assert!(n_layers > 0 && kv_dim > 0, "a KV cache needs layers and a kv width");
        Self { shared: Vec::new(), tail: Segment::new(n_layers, memory), shared_len: 0, kv_dim }
    }

    /// Positions cached (those of layer 0; layers differ only inside a forward pass).
    pub fn len(&self) -> usize {
        self.shared_len + self.tail.len(self.kv_dim)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        self.tail.memory.bytes.fetch_add(bytes, Ordering::Relaxed);
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
    pub fn fork(&mut self) -> KvCache {
        if !self.tail.k[0].is_empty() {
            let n_layers = self.tail.k.len();
            let memory = self.tail.memory.clone();
            let frozen = std::mem::replace(&mut self.tail, Segment::new(n_layers, memory));
            self.shared_len += frozen.len(self.kv_dim);
            self.shared.push(Arc::new(frozen));
        }
        KvCache {
            shared: self.shared.clone(),
            tail: Segment::new(self.tail.k.len(), self.tail.memory.clone()),
            shared_len: self.shared_len,
            kv_dim: self.kv_dim,
        }
    }

    /// Bytes this cache holds alone (its private tail).
    pub fn private_bytes(&self) -> usize {
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
        let mut parent = KvCache::new(2, 4, memory.clone());
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
        let mut parent = KvCache::new(1, 2, memory.clone());
        parent.append(0, &rows(5, 2, 0.0), &rows(5, 2, 0.0));
        let children: Vec<KvCache> = (0..4).map(|_| parent.fork()).collect();
        drop(parent);
        assert!(memory.live_bytes() > 0, "children still hold the prefix");
        drop(children);
        assert_eq!(memory.live_bytes(), 0);
    }
}
