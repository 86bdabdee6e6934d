//! The llama-family decoder (llama, qwen2) over a batch of sequences of
//! different lengths, each with its own KV cache. One constructor per weight
//! format: [`Llama::from_gguf`] and [`Llama::from_safetensors`].
//!
//! Weight matmuls run once over every fed row. Attention takes one of two
//! paths, chosen once per model at load ([`AttentionPath`]): the host path
//! (CPU f32) pulls each sequence's q/k/v rows to plain slices and attends
//! there, bit-identical whatever shares the batch; the device path
//! (`device_attention`) keeps activations and KV caches on the model's
//! device, in its activation dtype, and attends with batched candle ops.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::quantized::{GgmlDType, gguf_file};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::ModelError;
use super::attention::{self, AttnShape, Rope};
use super::config::{Arch, HfConfig, ModelConfig, RopeStyle};
use super::device_attention::{self, DeviceRope, Step};
use super::kv::{HostCache, KvCache, KvMemory};
use super::kv_pool::{KvPool, PagedCache, PoolShape, PoolTensors};
use super::linear::{Linear, Storage, WeightFormat};

/// Where a model's attention and KV caches run. Chosen once, before the
/// model makes its first cache.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum AttentionPath {
    /// The host path for CPU models with f32 activations, the device path otherwise.
    #[default]
    Auto,
    /// Per sequence on host f32 slices (CPU, f32 activations only).
    Host,
    /// Batched candle ops on the model's device over a pool of device KV blocks.
    Device,
}

/// The chosen path and what it needs.
#[derive(Debug)]
enum AttnImpl {
    Host,
    Device(DevicePath),
}

#[derive(Debug)]
struct DevicePath {
    pool: Arc<KvPool>,
    rope: DeviceRope,
}

#[derive(Debug)]
struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    span: tracing::Span,
}

/// One sequence's share of a batched forward pass: the tokens to feed (one
/// when decoding, many when prefilling) and the cache they extend.
pub struct BatchEntry<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// Outputs at the last fed token of each entry, in batch order.
#[derive(Debug)]
pub struct ForwardOutput {
    /// `(entries, vocab)` f32.
    pub logits: Tensor,
    /// `(entries, hidden)` f32: the final hidden state after the last norm.
    pub hidden: Tensor,
}

#[derive(Debug)]
pub struct Llama {
    cfg: ModelConfig,
    /// `(vocab, hidden)` in the activation dtype.
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    rope: Rope,
    device: Device,
    /// The dtype of the residual stream, norms and KV caches.
    dtype: DType,
    path: AttnImpl,
    /// Set by the first `new_cache`: from then on the path is fixed.
    made_caches: AtomicBool,
    kv_memory: Arc<KvMemory>,
    span: tracing::Span,
}

/// Reads GGUF metadata of the model's own architecture prefix.
struct GgufMeta<'a> {
    ct: &'a gguf_file::Content,
    arch: &'a str,
}

impl GgufMeta<'_> {
    fn get(&self, key: &str) -> Result<&gguf_file::Value, ModelError> {
        let full = format!("{}.{key}", self.arch);
        self.ct.metadata.get(&full).ok_or_else(|| ModelError::Config(format!("GGUF metadata lacks {full}")))
    }
    fn usize(&self, key: &str) -> Result<usize, ModelError> {
        let v = self.get(key)?;
        Ok(v.to_u64().or_else(|_| v.to_u32().map(u64::from))? as usize)
    }
    fn opt_usize(&self, key: &str) -> Option<usize> {
        self.usize(key).ok()
    }
    fn f32(&self, key: &str) -> Option<f32> {
        self.get(key).ok().and_then(|v| v.to_f32().ok())
    }
}

/// The GGUF tensor of Llama 3's RoPE frequency factors.
const ROPE_FREQS: &str = "rope_freqs.weight";

impl Llama {
    /// Loads a GGUF file of the `llama` or `qwen2` architecture.
    pub fn from_gguf(path: &Path, format: WeightFormat, device: &Device) -> Result<Self, ModelError> {
        let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        let ct = gguf_file::Content::read(&mut file)
            .map_err(|e| ModelError::Format(format!("{}: not a readable GGUF file: {e}", path.display())))?;
        let mut cfg = gguf_config(&ct)?;
        if ct.tensor_infos.contains_key(ROPE_FREQS) {
            // Llama 3's long-context factors: what each frequency is divided by.
            let factors = ct
                .tensor(&mut file, ROPE_FREQS, &Device::Cpu)?
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let linear = cfg.rope_freq_factors.take();
            cfg.rope_freq_factors = Some(match linear {
                Some(l) if l.len() == factors.len() => factors.iter().zip(l).map(|(a, b)| a * b).collect(),
                _ => factors,
            });
        }
        let has_output = !cfg.tie_embeddings;
        cfg.validate()?;
        let quantized = ct.tensor_infos.values().any(|t| {
            !matches!(
                t.ggml_dtype,
                candle_core::quantized::GgmlDType::F32
                    | candle_core::quantized::GgmlDType::F16
                    | candle_core::quantized::GgmlDType::BF16
            )
        });
        let storage = format.resolve(quantized, device);
        refuse_types_without_cuda_kernels(&ct, storage, device)?;
        let mut get = |name: &str| {
            ct.tensor(&mut file, name, device).map_err(|e| {
                if ct.tensor_infos.contains_key(name) {
                    ModelError::Candle(e)
                } else {
                    ModelError::MissingTensor(name.to_string())
                }
            })
        };
        let embed = get("token_embd.weight")?.dequantize(device)?;
        let lm_head_q = if has_output { get("output.weight")? } else { get("token_embd.weight")? };
        let lm_head = Linear::from_qtensor(lm_head_q, storage, None)?;
        let norm = get("output_norm.weight")?.dequantize(device)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("blk.{i}");
            let mut lin = |name: &str, bias: bool| -> Result<Linear, ModelError> {
                let w = get(&format!("{p}.{name}.weight"))?;
                let b = if bias { Some(get(&format!("{p}.{name}.bias"))?.dequantize(device)?) } else { None };
                Ok(Linear::from_qtensor(w, storage, b)?)
            };
            let qkv_bias = cfg.arch == Arch::Qwen2;
            let (q, k, v) = (lin("attn_q", qkv_bias)?, lin("attn_k", qkv_bias)?, lin("attn_v", qkv_bias)?);
            let (o, gate, up, down) = (
                lin("attn_output", false)?,
                lin("ffn_gate", false)?,
                lin("ffn_up", false)?,
                lin("ffn_down", false)?,
            );
            layers.push(Layer {
                attn_norm: get(&format!("{p}.attn_norm.weight"))?.dequantize(device)?,
                ffn_norm: get(&format!("{p}.ffn_norm.weight"))?.dequantize(device)?,
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
                span: tracing::span!(tracing::Level::TRACE, "layer", index = i),
            });
        }
        Self::assemble(cfg, embed, layers, norm, lm_head, storage, device)
    }

    /// Loads an HF checkpoint directory (`config.json` and `*.safetensors`)
    /// of `LlamaForCausalLM` or `Qwen2ForCausalLM`, in f32, f16 or bf16.
    pub fn from_safetensors(dir: &Path, format: WeightFormat, device: &Device) -> Result<Self, ModelError> {
        let cfg = Self::hf_config(dir)?;
        let files = safetensors_files(dir)?;
        // Tensors arrive in the dtype the weights end up in (bf16 stays bf16
        // on a GPU instead of passing through f32 there).
        let dtype = format.resolve(false, device).activation_dtype();
        // SAFETY: the files are mapped read-only and not modified while loaded.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device)? };
        Self::from_varbuilder(cfg, &vb, format, device)
    }

    /// The architecture of an HF checkpoint directory, from its `config.json`.
    pub fn hf_config(dir: &Path) -> Result<ModelConfig, ModelError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
        let hf: HfConfig = serde_json::from_str(&text)
            .map_err(|e| ModelError::Format(format!("{}: {e}", config_path.display())))?;
        hf.to_config()
    }

    /// The safetensors files of an HF checkpoint directory.
    pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
        safetensors_files(dir)
    }

    /// Builds the model from HF-named tensors (a checkpoint, or tensors a
    /// caller has changed, e.g. with a LoRA adapter merged in).
    pub fn from_varbuilder(
        mut cfg: ModelConfig,
        vb: &VarBuilder,
        format: WeightFormat,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let vb = vb.clone();
        let storage = format.resolve(false, device);
        let need = |vb: &VarBuilder, shape: (usize, usize), name: &str| -> Result<Tensor, ModelError> {
            if vb.contains_tensor(name) {
                Ok(vb.get(shape, name)?)
            } else {
                Err(ModelError::MissingTensor(name.to_string()))
            }
        };
        let vec = |vb: &VarBuilder, n: usize, name: &str| -> Result<Tensor, ModelError> {
            if vb.contains_tensor(name) {
                Ok(vb.get(n, name)?)
            } else {
                Err(ModelError::MissingTensor(name.to_string()))
            }
        };
        let (h, kv, q_width) = (cfg.hidden, cfg.kv_dim(), cfg.n_heads * cfg.head_dim);
        let embed = need(&vb, (cfg.vocab, h), "model.embed_tokens.weight")?;
        let has_head = vb.contains_tensor("lm_head.weight");
        cfg.tie_embeddings = !has_head;
        let head_w = if has_head { need(&vb, (cfg.vocab, h), "lm_head.weight")? } else { embed.clone() };
        let lm_head = Linear::from_dense(head_w, storage, None)?;
        let norm = vec(&vb, h, "model.norm.weight")?;
        let bias = cfg.arch == Arch::Qwen2;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("model.layers.{i}");
            let lin = |name: &str, shape: (usize, usize), with_bias: bool| -> Result<Linear, ModelError> {
                let w = need(&vb, shape, &format!("{p}.{name}.weight"))?;
                let b = if with_bias { Some(vec(&vb, shape.0, &format!("{p}.{name}.bias"))?) } else { None };
                Ok(Linear::from_dense(w, storage, b)?)
            };
            layers.push(Layer {
                attn_norm: vec(&vb, h, &format!("{p}.input_layernorm.weight"))?,
                ffn_norm: vec(&vb, h, &format!("{p}.post_attention_layernorm.weight"))?,
                q: lin("self_attn.q_proj", (q_width, h), bias)?,
                k: lin("self_attn.k_proj", (kv, h), bias)?,
                v: lin("self_attn.v_proj", (kv, h), bias)?,
                o: lin("self_attn.o_proj", (h, q_width), false)?,
                gate: lin("mlp.gate_proj", (cfg.intermediate, h), false)?,
                up: lin("mlp.up_proj", (cfg.intermediate, h), false)?,
                down: lin("mlp.down_proj", (h, cfg.intermediate), false)?,
                span: tracing::span!(tracing::Level::TRACE, "layer", index = i),
            });
        }
        Self::assemble(cfg, embed, layers, norm, lm_head, storage, device)
    }

    fn assemble(
        cfg: ModelConfig,
        embed: Tensor,
        mut layers: Vec<Layer>,
        norm: Tensor,
        lm_head: Linear,
        storage: Storage,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let (vocab, hidden) = embed.dims2()?;
        if vocab != cfg.vocab || hidden != cfg.hidden {
            return Err(ModelError::Config(format!(
                "token embedding is {vocab}x{hidden}, config says {}x{}",
                cfg.vocab, cfg.hidden
            )));
        }
        let dtype = storage.activation_dtype();
        // rms_norm wants its weight in the dtype of the rows it scales.
        for layer in &mut layers {
            layer.attn_norm = layer.attn_norm.to_dtype(dtype)?;
            layer.ffn_norm = layer.ffn_norm.to_dtype(dtype)?;
        }
        let model = Self {
            rope: Rope::new(&cfg),
            embed: embed.to_dtype(dtype)?,
            norm: norm.to_dtype(dtype)?,
            cfg,
            layers,
            lm_head,
            device: device.clone(),
            dtype,
            path: AttnImpl::Host,
            made_caches: AtomicBool::new(false),
            kv_memory: Arc::new(KvMemory::default()),
            span: tracing::span!(tracing::Level::TRACE, "model"),
        };
        model.with_attention(AttentionPath::Auto)
    }

    /// The same model with its attention on `path`. Only before the model
    /// has made a cache: a cache belongs to the path that made it.
    pub fn with_attention(mut self, path: AttentionPath) -> Result<Self, ModelError> {
        if self.made_caches.load(Ordering::Relaxed) {
            return Err(ModelError::Config(
                "the attention path is chosen before the model makes a cache".into(),
            ));
        }
        let host_fits = self.device.is_cpu() && self.dtype == DType::F32;
        let on_device = match path {
            AttentionPath::Auto => !host_fits,
            AttentionPath::Device => true,
            AttentionPath::Host if host_fits => false,
            AttentionPath::Host => {
                return Err(ModelError::Unsupported(format!(
                    "the host attention path runs f32 activations on the CPU; this model has {:?} on {:?}",
                    self.dtype,
                    self.device.location()
                )));
            }
        };
        self.path = if on_device {
            let shape = PoolShape {
                n_layers: self.cfg.n_layers,
                n_kv_heads: self.cfg.n_kv_heads,
                head_dim: self.cfg.head_dim,
                dtype: self.dtype,
            };
            AttnImpl::Device(DevicePath {
                pool: Arc::new(KvPool::new(shape, self.device.clone(), self.kv_memory.clone())),
                rope: DeviceRope::new(&self.rope, self.dtype, &self.device)?,
            })
        } else {
            AttnImpl::Host
        };
        Ok(self)
    }

    /// The attention path this model runs (never `Auto`).
    pub fn attention(&self) -> AttentionPath {
        match self.path {
            AttnImpl::Host => AttentionPath::Host,
            AttnImpl::Device(_) => AttentionPath::Device,
        }
    }

    /// The dtype of activations and KV caches.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes of weights one decode step reads: every projection, the norms
    /// and the output head (the embedding table only at the fed rows, left out).
    pub fn weight_bytes(&self) -> usize {
        let vec = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down].iter().map(|lin| lin.bytes()).sum::<usize>()
                    + vec(&l.attn_norm)
                    + vec(&l.ffn_norm)
            })
            .sum();
        layers + vec(&self.norm) + self.lm_head.bytes()
    }

    /// Bytes the device path's KV pool takes on the device (its high-water
    /// mark; live bytes are [`Self::kv_memory`]). 0 on the host path.
    pub fn kv_pool_bytes(&self) -> usize {
        match &self.path {
            AttnImpl::Host => 0,
            AttnImpl::Device(d) => d.pool.capacity_bytes(),
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> KvCache {
        self.made_caches.store(true, Ordering::Relaxed);
        match &self.path {
            AttnImpl::Host => {
                KvCache::host(HostCache::new(self.cfg.n_layers, self.cfg.kv_dim(), self.kv_memory.clone()))
            }
            AttnImpl::Device(d) => KvCache::paged(d.pool.new_cache()),
        }
    }

    /// Bytes held by all live caches of this model.
    pub fn kv_memory(&self) -> &Arc<KvMemory> {
        &self.kv_memory
    }

    /// Longest sequence the model accepts (prompt plus generated tokens).
    pub fn max_position(&self) -> usize {
        self.rope.max_position()
    }

    /// Feeds each entry's tokens after its cached positions, appends their
    /// keys and values to its cache, and returns logits and hidden state at
    /// each entry's last token. Weight matmuls run once over all rows.
    pub fn forward(&self, batch: &mut [BatchEntry<'_>]) -> Result<ForwardOutput, ModelError> {
        let _enter = self.span.enter();
        if batch.is_empty() {
            return Err(ModelError::EmptyBatch);
        }
        for entry in batch.iter() {
            self.check_tokens(entry.tokens, entry.cache.len())?;
        }
        let order = self.row_order(batch);
        let mut ids = Vec::new();
        let mut last_rows = vec![0u32; batch.len()];
        for &i in &order {
            ids.extend_from_slice(batch[i].tokens);
            last_rows[i] = (ids.len() - 1) as u32;
        }
        let x = self.rows(&ids, batch, &order)?;
        let last = Tensor::new(last_rows.as_slice(), &self.device)?;
        let x = x.index_select(&last, 0)?;
        let hidden = candle_nn::ops::rms_norm(&x, &self.norm, self.cfg.rms_eps as f32)?;
        let logits = self.lm_head.forward(&hidden)?;
        // The engine samples on the host in f32 (no-ops on the host path).
        Ok(ForwardOutput { logits: logits.to_dtype(DType::F32)?, hidden: hidden.to_dtype(DType::F32)? })
    }

    /// Refuses an empty entry, one that overflows the context after
    /// `cached` positions, and tokens outside the vocabulary.
    fn check_tokens(&self, tokens: &[u32], cached: usize) -> Result<(), ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::EmptyBatch);
        }
        let needed = cached + tokens.len();
        if needed > self.max_position() {
            return Err(ModelError::ContextOverflow { needed, max: self.max_position() });
        }
        match tokens.iter().find(|&&t| t as usize >= self.cfg.vocab) {
            Some(&bad) => Err(ModelError::TokenOutOfRange { token: bad, vocab: self.cfg.vocab }),
            None => Ok(()),
        }
    }

    /// The order the entries' rows are fed in: as given on the host path;
    /// on the device path sorted (stably) by how many tokens each feeds, so
    /// that entries feeding equal counts attend as one batched group.
    fn row_order(&self, batch: &[BatchEntry<'_>]) -> Vec<usize> {
        let mut order: Vec<usize> = (0..batch.len()).collect();
        if let AttnImpl::Device(_) = self.path {
            order.sort_by_key(|&i| batch[i].tokens.len());
        }
        order
    }

    /// The residual stream of every fed row, before the final norm, with
    /// the entries' rows in `order`.
    fn rows(&self, ids: &[u32], batch: &mut [BatchEntry<'_>], order: &[usize]) -> Result<Tensor, ModelError> {
        let ids = Tensor::new(ids, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        match &self.path {
            AttnImpl::Host => {
                let mut caches = batch
                    .iter_mut()
                    .map(|e| Ok((e.cache.as_host_mut().ok_or(ModelError::ForeignCache)?, e.tokens.len())))
                    .collect::<Result<Vec<_>, ModelError>>()?;
                let mut scratch = Scratch::default();
                for (index, layer) in self.layers.iter().enumerate() {
                    x = self.layer_forward(layer, index, &x, &mut caches, &mut scratch)?;
                }
            }
            AttnImpl::Device(dev) => {
                let mut slots: Vec<Option<(&mut PagedCache, usize)>> = batch
                    .iter_mut()
                    .map(|e| {
                        let n = e.tokens.len();
                        e.cache.as_paged_mut().filter(|c| Arc::ptr_eq(c.pool(), &dev.pool)).map(|c| (c, n))
                    })
                    .collect();
                let mut caches = order
                    .iter()
                    .map(|&i| slots[i].take().ok_or(ModelError::ForeignCache))
                    .collect::<Result<Vec<_>, ModelError>>()?;
                let step =
                    Step::prepare(&dev.pool, &mut caches, &dev.rope, AttnShape::of(&self.cfg), &self.device)?;
                let pool = dev.pool.tensors(step.capacity_blocks())?;
                for (index, layer) in self.layers.iter().enumerate() {
                    x = self.device_layer_forward(layer, index, &x, dev, &step, &pool)?;
                }
                drop(pool);
                for (cache, n) in caches.iter_mut() {
                    cache.commit(*n);
                }
            }
        }
        Ok(x)
    }

    /// Final hidden states `(tokens, hidden)` f32 (after the last norm) at
    /// every position of one sequence fed from scratch: what a reward head
    /// on the backbone reads.
    pub fn hidden_states(&self, tokens: &[u32]) -> Result<Tensor, ModelError> {
        self.hidden_states_batch(&[tokens])
    }

    /// [`Self::hidden_states`] of several sequences in one forward pass: the
    /// rows of each sequence in turn, `(total tokens, hidden)`. Sequences of
    /// different lengths share the weight matmuls; each attends only to itself.
    pub fn hidden_states_batch(&self, seqs: &[&[u32]]) -> Result<Tensor, ModelError> {
        for tokens in seqs {
            self.check_tokens(tokens, 0)?;
        }
        if seqs.is_empty() {
            return Err(ModelError::EmptyBatch);
        }
        let mut caches: Vec<KvCache> = seqs.iter().map(|_| self.new_cache()).collect();
        let mut batch: Vec<BatchEntry<'_>> =
            seqs.iter().zip(caches.iter_mut()).map(|(tokens, cache)| BatchEntry { tokens, cache }).collect();
        let order = self.row_order(&batch);
        let ids: Vec<u32> = order.iter().flat_map(|&i| seqs[i].iter().copied()).collect();
        let mut x = self.rows(&ids, &mut batch, &order)?;
        if order.iter().enumerate().any(|(k, &i)| k != i) {
            // Back to the callers' order: sequence i's rows start where `order` put them.
            let mut start = vec![0u32; seqs.len()];
            let mut row = 0u32;
            for &i in &order {
                start[i] = row;
                row += seqs[i].len() as u32;
            }
            let back: Vec<u32> =
                (0..seqs.len()).flat_map(|i| start[i]..start[i] + seqs[i].len() as u32).collect();
            x = x.index_select(&Tensor::new(back.as_slice(), &self.device)?, 0)?;
        }
        let hidden = candle_nn::ops::rms_norm(&x, &self.norm, self.cfg.rms_eps as f32)?;
        Ok(hidden.to_dtype(DType::F32)?)
    }

    /// Next-token logits `(rows, vocab)`, in f32, of final hidden states
    /// `(rows, hidden)` as [`Self::hidden_states_batch`] returns them.
    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor, ModelError> {
        let logits = self.lm_head.forward(&hidden.to_dtype(self.dtype())?)?;
        Ok(logits.to_dtype(DType::F32)?)
    }

    fn layer_forward(
        &self,
        layer: &Layer,
        index: usize,
        x: &Tensor,
        batch: &mut [(&mut HostCache, usize)],
        scratch: &mut Scratch,
    ) -> Result<Tensor, ModelError> {
        let _enter = layer.span.enter();
        let eps = self.cfg.rms_eps as f32;
        let rows = x.dim(0)?;
        let h = candle_nn::ops::rms_norm(x, &layer.attn_norm, eps)?;
        let mut q = layer.q.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
        let mut k = layer.k.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
        let v = layer.v.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
        let q_width = self.cfg.n_heads * self.cfg.head_dim;
        let kv_dim = self.cfg.kv_dim();
        let shape = AttnShape::of(&self.cfg);
        let mut out = vec![0f32; rows * q_width];
        let mut row = 0;
        for (cache, n) in batch.iter_mut() {
            let n = *n;
            let pos0 = cache.layer_len(index);
            let qs = &mut q[row * q_width..(row + n) * q_width];
            let ks = &mut k[row * kv_dim..(row + n) * kv_dim];
            for i in 0..n {
                self.rope.apply(&mut qs[i * q_width..(i + 1) * q_width], pos0 + i);
                self.rope.apply(&mut ks[i * kv_dim..(i + 1) * kv_dim], pos0 + i);
            }
            cache.append(index, ks, &v[row * kv_dim..(row + n) * kv_dim]);
            attention::attend(
                shape,
                qs,
                cache,
                index,
                &mut out[row * q_width..(row + n) * q_width],
                &mut scratch.scores,
            );
            row += n;
        }
        let attn = Tensor::from_vec(out, (rows, q_width), &self.device)?;
        self.output_and_mlp(layer, x, &attn)
    }

    /// The device path's layer: the same projections, with RoPE, the KV
    /// writes and attention as batched device ops.
    fn device_layer_forward(
        &self,
        layer: &Layer,
        index: usize,
        x: &Tensor,
        dev: &DevicePath,
        step: &Step,
        pool: &PoolTensors,
    ) -> Result<Tensor, ModelError> {
        let _enter = layer.span.enter();
        // Numeric trap: in f16 a square overflows past |x| = 256. candle's
        // rms_norm (CPU and CUDA) sums the squares in f32, so the norms run
        // in the activation dtype.
        let h = candle_nn::ops::rms_norm(x, &layer.attn_norm, self.cfg.rms_eps as f32)?;
        let q = layer.q.forward(&h)?;
        let k = layer.k.forward(&h)?;
        let v = layer.v.forward(&h)?;
        let shape = AttnShape::of(&self.cfg);
        let attn = device_attention::attend(shape, index, (&q, &k, &v), &dev.rope, step, pool)?;
        self.output_and_mlp(layer, x, &attn)
    }

    /// The attention output projection, the MLP and both residual adds.
    fn output_and_mlp(&self, layer: &Layer, x: &Tensor, attn: &Tensor) -> Result<Tensor, ModelError> {
        let x = (x + layer.o.forward(attn)?)?;
        let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, self.cfg.rms_eps as f32)?;
        let act = (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
        Ok((x + layer.down.forward(&act)?)?)
    }
}

#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
}

/// `weights = "stored"` on a GPU runs the file's own types through candle's
/// CUDA kernels: there are matmuls for Q4_0..Q8_0 and Q2K..Q6K, none for the
/// 8-bit intermediate types.
/// The model's shape from a GGUF file's metadata (`{arch}.*` keys), with
/// the vocabulary from the embedding when the metadata omits it.
fn gguf_config(ct: &gguf_file::Content) -> Result<ModelConfig, ModelError> {
    let arch_name =
        ct.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    let arch = match arch_name.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => {
            return Err(ModelError::Unsupported(format!(
                "GGUF architecture {other:?}; ponder runs llama and qwen2"
            )));
        }
    };
    let meta = GgufMeta { ct, arch: &arch_name };
    let hidden = meta.usize("embedding_length")?;
    let n_heads = meta.usize("attention.head_count")?;
    let head_dim = meta.opt_usize("attention.key_length").unwrap_or(hidden / n_heads.max(1));
    if let Some(rope_dim) = meta.opt_usize("rope.dimension_count")
        && rope_dim != head_dim
    {
        return Err(ModelError::Unsupported(format!(
            "partial rotary embeddings (rope dim {rope_dim} of head dim {head_dim})"
        )));
    }
    let has_output = ct.tensor_infos.contains_key("output.weight");
    let vocab = match meta.opt_usize("vocab_size") {
        Some(v) => v,
        None => ct
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?
            .shape
            .dims()[0],
    };
    let cfg = ModelConfig {
        arch,
        hidden,
        intermediate: meta.usize("feed_forward_length")?,
        n_layers: meta.usize("block_count")?,
        n_heads,
        n_kv_heads: meta.opt_usize("attention.head_count_kv").unwrap_or(n_heads),
        head_dim,
        vocab,
        rms_eps: meta.f32("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f64,
        rope_theta: meta.f32("rope.freq_base").unwrap_or(10_000.0),
        rope_style: match arch {
            Arch::Llama => RopeStyle::Interleaved,
            Arch::Qwen2 => RopeStyle::HalfSplit,
        },
        rope_freq_factors: gguf_rope_scaling(&meta, head_dim)?,
        max_position: meta.opt_usize("context_length").unwrap_or(4096),
        tie_embeddings: !has_output,
    };
    Ok(cfg)
}

/// Linear RoPE scaling from the metadata (`rope.scaling.type`); kinds that
/// change attention beyond the frequencies (YaRN) are refused. Llama 3's
/// per-frequency factors come as the `rope_freqs.weight` tensor instead.
fn gguf_rope_scaling(meta: &GgufMeta<'_>, head_dim: usize) -> Result<Option<Vec<f32>>, ModelError> {
    let kind = meta.get("rope.scaling.type").ok().and_then(|v| v.to_string().ok()).cloned();
    match kind.as_deref() {
        None | Some("none") => Ok(None),
        Some("linear") => match meta.f32("rope.scaling.factor") {
            Some(1.0) => Ok(None),
            Some(f) => Ok(Some(vec![f; head_dim / 2])),
            None => Err(ModelError::Config("linear rope scaling without rope.scaling.factor".into())),
        },
        Some(other) => Err(ModelError::Unsupported(format!(
            "GGUF rope.scaling.type {other:?} (ponder implements linear and Llama 3's rope_freqs)"
        ))),
    }
}

fn refuse_types_without_cuda_kernels(
    ct: &gguf_file::Content,
    storage: Storage,
    device: &Device,
) -> Result<(), ModelError> {
    if storage != Storage::Stored || device.is_cpu() {
        return Ok(());
    }
    match ct.tensor_infos.iter().find(|(_, t)| matches!(t.ggml_dtype, GgmlDType::Q8K | GgmlDType::Q8_1)) {
        Some((name, t)) => Err(ModelError::Unsupported(format!(
            "weights = \"stored\" on a GPU: {name} is {:?}, which candle has no CUDA matmul for; use weights = \"bf16\" or \"q8_0\"",
            t.ggml_dtype
        ))),
        None => Ok(()),
    }
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let parsed: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Format(format!("{}: {e}", index.display())))?;
        let map: HashMap<String, String> = parsed
            .get("weight_map")
            .and_then(|m| serde_json::from_value(m.clone()).ok())
            .ok_or_else(|| ModelError::Format(format!("{}: no weight_map", index.display())))?;
        let mut files: Vec<PathBuf> = map.values().map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        // Only the checkpoint's own shards: a PRM head or an adapter may sit beside them.
        .filter(|p| {
            p.extension().is_some_and(|x| x == "safetensors")
                && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("model"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::Format(format!("{}: no model*.safetensors files", dir.display())));
    }
    Ok(files)
}
