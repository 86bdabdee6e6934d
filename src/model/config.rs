//! Architecture hyper-parameters of a llama-family model, read from GGUF
//! metadata or an HF `config.json`.

use serde::Deserialize;

use super::ModelError;

/// The architectures ponder runs. Qwen2 is llama with biases on the q/k/v
/// projections; both share one forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// How RoPE pairs the dimensions of a head.
///
/// HF checkpoints (llama and qwen2) rotate dimension `i` with `i + d/2`. The
/// GGUF converter permutes llama's q/k rows so that llama.cpp can rotate
/// adjacent pairs `(2i, 2i+1)`; qwen2 GGUFs are not permuted. Using the wrong
/// one still runs but silently wrecks attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    Interleaved,
    HalfSplit,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden: usize,
    pub intermediate: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rms_eps: f64,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    /// Longest sequence (prompt + generated) the model was trained for.
    pub max_position: usize,
    pub tie_embeddings: bool,
}

impl ModelConfig {
    /// Floats of K (or of V) stored per token per layer.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    pub(crate) fn validate(&self) -> Result<(), ModelError> {
        let bad = |what: String| Err(ModelError::Config(what));
        if self.n_heads == 0 || self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "head counts: {} query heads must be a non-zero multiple of {} kv heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if self.hidden == 0 || self.vocab == 0 || self.n_layers == 0 {
            return bad("hidden size, vocabulary and layer count must be non-zero".into());
        }
        Ok(())
    }
}

/// The subset of an HF `config.json` ponder reads.
#[derive(Debug, Deserialize)]
pub(crate) struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_position")]
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_max_position() -> usize {
    2048
}

impl HfConfig {
    pub(crate) fn arch(&self) -> Result<Arch, ModelError> {
        let names: Vec<&str> = self.architectures.iter().map(String::as_str).collect();
        let model_type = self.model_type.as_deref().unwrap_or("");
        if names.contains(&"LlamaForCausalLM") || model_type == "llama" {
            Ok(Arch::Llama)
        } else if names.contains(&"Qwen2ForCausalLM") || model_type == "qwen2" {
            Ok(Arch::Qwen2)
        } else {
            Err(ModelError::Unsupported(format!(
                "architecture {:?} (model_type {model_type:?}); ponder runs LlamaForCausalLM and Qwen2ForCausalLM",
                self.architectures
            )))
        }
    }

    pub(crate) fn to_config(&self) -> Result<ModelConfig, ModelError> {
        if let Some(scaling) = &self.rope_scaling
            && !scaling.is_null()
        {
            return Err(ModelError::Unsupported(format!(
                "rope_scaling {scaling} (only unscaled RoPE is implemented)"
            )));
        }
        let arch = self.arch()?;
        let cfg = ModelConfig {
            arch,
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            n_layers: self.num_hidden_layers,
            n_heads: self.num_attention_heads,
            n_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            vocab: self.vocab_size,
            rms_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta as f32,
            rope_style: RopeStyle::HalfSplit,
            max_position: self.max_position_embeddings,
            // qwen2's config defaults to tied when the key is absent, llama's to untied;
            // the loader also checks whether `lm_head.weight` exists.
            tie_embeddings: self.tie_word_embeddings.unwrap_or(arch == Arch::Qwen2),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
