//! The trainable llama used to train ponder-arith: the same architecture
//! the engine runs (HF llama, tied embeddings, half-split RoPE), built only
//! from differentiable candle ops (candle's fused CPU kernels have
//! no backward pass, so `rms_norm_slow`, `rope_slow` and
//! `candle_nn::ops::softmax` stand in for them).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{D, DType, Device, Result, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ArithConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub max_position: usize,
    pub rope_theta: f32,
    pub rms_eps: f64,
}

impl ArithConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    pub fn parameters(&self) -> usize {
        let per_layer = 4 * self.hidden * self.hidden + 3 * self.hidden * self.intermediate + 2 * self.hidden;
        self.vocab * self.hidden + self.layers * per_layer + self.hidden
    }

    /// The HF `config.json` the engine loads.
    pub fn hf_config(&self, bos: u32, eos: u32) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads,
            "vocab_size": self.vocab,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position,
            "tie_word_embeddings": true,
            "hidden_act": "silu",
            "bos_token_id": bos,
            "eos_token_id": eos,
            "torch_dtype": "float32",
        })
    }
}

/// Parameters by their HF names, and RoPE tables.
pub struct TrainModel {
    cfg: ArithConfig,
    params: BTreeMap<String, Var>,
    cos: Tensor,
    sin: Tensor,
}

fn layer_names(i: usize) -> [String; 9] {
    let p = format!("model.layers.{i}");
    [
        format!("{p}.input_layernorm.weight"),
        format!("{p}.self_attn.q_proj.weight"),
        format!("{p}.self_attn.k_proj.weight"),
        format!("{p}.self_attn.v_proj.weight"),
        format!("{p}.self_attn.o_proj.weight"),
        format!("{p}.post_attention_layernorm.weight"),
        format!("{p}.mlp.gate_proj.weight"),
        format!("{p}.mlp.up_proj.weight"),
        format!("{p}.mlp.down_proj.weight"),
    ]
}

impl TrainModel {
    /// Fresh weights drawn from `seed`: N(0, 0.02), residual outputs scaled
    /// by 1/sqrt(2 layers) (GPT-2), norms at 1.
    pub fn new(cfg: ArithConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = BTreeMap::new();
        let mut normal = |name: String, shape: (usize, usize), std: f64| -> Result<()> {
            let dist = Normal::new(0.0, std).expect("a positive std is valid");
            let data: Vec<f32> = (0..shape.0 * shape.1).map(|_| dist.sample(&mut rng) as f32).collect();
            params.insert(name, Var::from_tensor(&Tensor::from_vec(data, shape, device)?)?);
            Ok(())
        };
        let (h, i) = (cfg.hidden, cfg.intermediate);
        let resid = 0.02 / (2.0 * cfg.layers as f64).sqrt();
        normal("model.embed_tokens.weight".into(), (cfg.vocab, h), 0.02)?;
        let mut ones = Vec::new();
        for l in 0..cfg.layers {
            let [n1, q, k, v, o, n2, g, u, d] = layer_names(l);
            normal(q, (h, h), 0.02)?;
            normal(k, (h, h), 0.02)?;
            normal(v, (h, h), 0.02)?;
            normal(o, (h, h), resid)?;
            normal(g, (i, h), 0.02)?;
            normal(u, (i, h), 0.02)?;
            normal(d, (h, i), resid)?;
            ones.extend([n1, n2]);
        }
        ones.push("model.norm.weight".into());
        for name in ones {
            params.insert(name, Var::ones(h, DType::F32, device)?);
        }
        Self::with_params(cfg, params, device)
    }

    pub(crate) fn with_params(
        cfg: ArithConfig,
        params: BTreeMap<String, Var>,
        device: &Device,
    ) -> Result<Self> {
        let hd = cfg.head_dim();
        let inv: Vec<f32> =
            (0..hd).step_by(2).map(|i| 1f32 / cfg.rope_theta.powf(i as f32 / hd as f32)).collect();
        let mut angles = Vec::with_capacity(cfg.max_position * hd / 2);
        for pos in 0..cfg.max_position {
            angles.extend(inv.iter().map(|f| pos as f32 * f));
        }
        let angles = Tensor::from_vec(angles, (cfg.max_position, hd / 2), device)?;
        Ok(Self { cfg, params, cos: angles.cos()?, sin: angles.sin()? })
    }

    pub fn config(&self) -> &ArithConfig {
        &self.cfg
    }

    /// The token embedding (tied to the LM head).
    pub fn embedding(&self) -> &Tensor {
        self.p("model.embed_tokens.weight")
    }

    pub fn vars(&self) -> Vec<Var> {
        self.params.values().cloned().collect()
    }

    pub fn named_vars(&self) -> &BTreeMap<String, Var> {
        &self.params
    }

    fn p(&self, name: &str) -> &Tensor {
        self.params.get(name).expect("every parameter name is created in new()").as_tensor()
    }

    /// Logits `(batch, time, vocab)` for token ids `(batch, time)`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let emb = self.p("model.embed_tokens.weight");
        self.hidden(ids)?.broadcast_matmul(&emb.t()?)
    }

    /// Final hidden states `(batch, time, hidden)` (after the last norm) for
    /// token ids `(batch, time)`: what the LM head and a PRM's score head read.
    pub fn hidden(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (h, nh, hd) = (self.cfg.hidden, self.cfg.heads, self.cfg.head_dim());
        let eps = self.cfg.rms_eps as f32;
        let emb = self.p("model.embed_tokens.weight");
        let mut x = emb.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, h))?;
        let mask: Vec<f32> =
            (0..t).flat_map(|i| (0..t).map(move |j| if j > i { -1e9 } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (1, 1, t, t), ids.device())?;
        let (cos, sin) = (self.cos.narrow(0, 0, t)?, self.sin.narrow(0, 0, t)?);
        let heads =
            |y: Tensor| -> Result<Tensor> { y.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous() };
        let scale = 1.0 / (hd as f64).sqrt();
        for l in 0..self.cfg.layers {
            let [n1, q, k, v, o, n2, g, u, d] = layer_names(l);
            let hn = candle_nn::ops::rms_norm_slow(&x, self.p(&n1), eps)?;
            let qh = candle_nn::rotary_emb::rope_slow(
                &heads(hn.broadcast_matmul(&self.p(&q).t()?)?)?,
                &cos,
                &sin,
            )?;
            let kh = candle_nn::rotary_emb::rope_slow(
                &heads(hn.broadcast_matmul(&self.p(&k).t()?)?)?,
                &cos,
                &sin,
            )?;
            let vh = heads(hn.broadcast_matmul(&self.p(&v).t()?)?)?;
            let att = (qh.matmul(&kh.t()?)? * scale)?.broadcast_add(&mask)?;
            let att = candle_nn::ops::softmax(&att, D::Minus1)?.matmul(&vh)?;
            let att = att.transpose(1, 2)?.reshape((b, t, h))?;
            x = (x + att.broadcast_matmul(&self.p(&o).t()?)?)?;
            let hn = candle_nn::ops::rms_norm_slow(&x, self.p(&n2), eps)?;
            let gate = candle_nn::ops::silu(&hn.broadcast_matmul(&self.p(&g).t()?)?)?;
            let up = hn.broadcast_matmul(&self.p(&u).t()?)?;
            x = (x + (gate * up)?.broadcast_matmul(&self.p(&d).t()?)?)?;
        }
        candle_nn::ops::rms_norm_slow(&x, self.p("model.norm.weight"), eps)
    }

    /// Mean cross-entropy of the positions where `mask` is 1: `targets[b, i]`
    /// is the token after position i.
    pub fn loss(&self, ids: &Tensor, targets: &Tensor, mask: &[u32]) -> Result<Tensor> {
        let logits = self.forward(ids)?;
        let v = self.cfg.vocab;
        let flat = logits.reshape(((), v))?;
        let picked: Vec<u32> =
            mask.iter().enumerate().filter(|(_, m)| **m == 1).map(|(i, _)| i as u32).collect();
        let idx = Tensor::new(picked.as_slice(), ids.device())?;
        let chosen = flat.index_select(&idx, 0)?;
        let tgt = targets.flatten_all()?.index_select(&idx, 0)?;
        candle_nn::loss::cross_entropy(&chosen, &tgt)
    }

    /// Writes `model.safetensors` with HF names (tied embeddings: no lm_head).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: std::collections::HashMap<String, Tensor> =
            self.params.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        candle_core::safetensors::save(&tensors, path)
    }

    /// Loads weights written by [`TrainModel::save`] (to resume or to test).
    pub fn load(cfg: ArithConfig, path: &Path, device: &Device) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, device)?;
        let mut params = BTreeMap::new();
        for (k, t) in tensors {
            params.insert(k, Var::from_tensor(&t)?);
        }
        Self::with_params(cfg, params, device)
    }
}
