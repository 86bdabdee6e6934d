//! Llama-family models of published shapes with random weights, generated
//! on the model's device: what `ponder bench engine --random-shape`
//! measures where a checkpoint cannot travel (a GPU machine that receives
//! no file over 64 MiB). The numbers they produce mean nothing; their cost
//! per token is that of the real model.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use super::config::{Arch, ModelConfig, RopeStyle};
use super::{Llama, ModelError, WeightFormat};

/// A shape to build: the published configs of Qwen2.5-1.5B and -7B, and a
/// tiny one for checks on a CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum RandomShape {
    #[value(name = "qwen2.5-1.5b")]
    #[serde(rename = "qwen2.5-1.5b")]
    Qwen25_1_5b,
    #[value(name = "qwen2.5-7b")]
    #[serde(rename = "qwen2.5-7b")]
    Qwen25_7b,
    #[value(name = "tiny")]
    #[serde(rename = "tiny")]
    Tiny,
}

impl RandomShape {
    pub fn config(self) -> ModelConfig {
        // (hidden, intermediate, layers, heads, kv heads, vocab, tied) from
        // the checkpoints' config.json (7B's vocabulary is 152064, not 1.5B's 151936).
        let (hidden, intermediate, n_layers, n_heads, n_kv_heads, vocab, tie) = match self {
            RandomShape::Qwen25_1_5b => (1536, 8960, 28, 12, 2, 151_936, true),
            RandomShape::Qwen25_7b => (3584, 18_944, 28, 28, 4, 152_064, false),
            RandomShape::Tiny => (64, 160, 2, 4, 2, 1000, true),
        };
        ModelConfig {
            arch: Arch::Qwen2,
            hidden,
            intermediate,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim: hidden / n_heads,
            vocab,
            rms_eps: 1e-6,
            rope_theta: 1_000_000.0,
            rope_style: RopeStyle::HalfSplit,
            rope_freq_factors: None,
            max_position: 32_768,
            tie_embeddings: tie,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RandomShape::Qwen25_1_5b => "qwen2.5-1.5b",
            RandomShape::Qwen25_7b => "qwen2.5-7b",
            RandomShape::Tiny => "tiny",
        }
    }
}

/// Tensors made up on request: norms of ones, zero biases, N(0, 0.02)
/// matrices (a trained model's scale, so activations stay finite).
struct RandomTensors {
    tied: bool,
}

impl SimpleBackend for RandomTensors {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(s, DType::F32, dev)?
        } else if name.ends_with(".bias") {
            Tensor::zeros(s, DType::F32, dev)?
        } else {
            // Drawn in f32 (CUDA's generator makes no half types), one tensor at a time.
            Tensor::randn(0f32, 0.02, s, dev)?
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights are made to a shape; {name} was asked for without one")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        !(self.tied && name == "lm_head.weight")
    }
}

/// A model of `shape` with random weights in `format`, built on `device`.
pub fn random_llama(shape: RandomShape, format: WeightFormat, device: &Device) -> Result<Llama, ModelError> {
    let cfg = shape.config();
    let dtype = format.resolve(false, device).activation_dtype();
    let backend: Box<dyn SimpleBackend> = Box::new(RandomTensors { tied: cfg.tie_embeddings });
    let vb = VarBuilder::from_backend(backend, dtype, device.clone());
    Llama::from_varbuilder(cfg, &vb, format, device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AttentionPath, BatchEntry};

    #[test]
    fn the_published_shapes_have_their_checkpoints_sizes() {
        let params = |cfg: &ModelConfig| {
            let (h, i, kv, q) = (cfg.hidden, cfg.intermediate, cfg.kv_dim(), cfg.n_heads * cfg.head_dim);
            let layer = h * q + q + 2 * (h * kv + kv) + q * h + 3 * h * i + 2 * h;
            let head = if cfg.tie_embeddings { 0 } else { cfg.vocab * h };
            cfg.n_layers * layer + cfg.vocab * h + head + h
        };
        // The model cards: 1.54B and 7.61B parameters.
        assert_eq!(params(&RandomShape::Qwen25_1_5b.config()) / 10_000_000, 154);
        assert_eq!(params(&RandomShape::Qwen25_7b.config()) / 10_000_000, 761);
        assert_eq!(RandomShape::Qwen25_7b.config().head_dim, 128);
    }

    #[test]
    fn a_random_model_runs_a_forward_pass_with_finite_logits() {
        let model = random_llama(RandomShape::Tiny, WeightFormat::Bf16, &Device::Cpu).unwrap();
        assert_eq!((model.attention(), model.dtype()), (AttentionPath::Device, DType::BF16));
        let mut cache = model.new_cache();
        let out = model.forward(&mut [BatchEntry { tokens: &[1, 2, 3], cache: &mut cache }]).unwrap();
        let logits = out.logits.to_vec2::<f32>().unwrap();
        assert_eq!(logits[0].len(), 1000);
        assert!(logits[0].iter().all(|x| x.is_finite()) && logits[0].iter().any(|&x| x != 0.0));
    }
}
