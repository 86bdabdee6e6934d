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
    /// What each RoPE frequency is divided by (`head_dim / 2` of them):
    /// Llama 3's long-context scaling, or linear scaling's one factor for
    /// all; `None` leaves the frequencies as `rope_theta` gives them.
    pub rope_freq_factors: Option<Vec<f32>>,
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
        if let Some(f) = &self.rope_freq_factors
            && (f.len() != self.head_dim / 2 || f.iter().any(|x| !(x.is_finite() && *x > 0.0)))
        {
            return bad(format!(
                "RoPE frequency factors: {} positive finite values needed (head_dim / 2), got {} ({:?}...)",
                self.head_dim / 2,
                f.len(),
                &f[..f.len().min(4)]
            ));
        }
        Ok(())
    }
}

/// The RoPE frequency factors of an HF `rope_scaling` object: `None` for
/// none (or `default`); Llama 3's per-frequency factors as HF's
/// `_compute_llama3_parameters` makes them; linear scaling's one factor.
/// Other kinds (dynamic, YaRN, LongRoPE) change attention beyond the
/// frequencies and are refused.
pub(crate) fn rope_freq_factors(
    scaling: &serde_json::Value,
    rope_theta: f32,
    head_dim: usize,
) -> Result<Option<Vec<f32>>, ModelError> {
    if scaling.is_null() {
        return Ok(None);
    }
    let kind =
        scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(|v| v.as_str()).unwrap_or("");
    let num = |key: &str| -> Result<f64, ModelError> {
        scaling.get(key).and_then(|v| v.as_f64()).filter(|x| x.is_finite() && *x > 0.0).ok_or_else(|| {
            ModelError::Config(format!("rope_scaling {scaling}: `{key}` must be a positive number"))
        })
    };
    let half = head_dim / 2;
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(vec![num("factor")? as f32; half])),
        "llama3" => {
            let (factor, low, high) = (num("factor")?, num("low_freq_factor")?, num("high_freq_factor")?);
            let original = num("original_max_position_embeddings")?;
            if high <= low {
                return Err(ModelError::Config(format!(
                    "rope_scaling {scaling}: high_freq_factor must exceed low_freq_factor"
                )));
            }
            let (low_wavelen, high_wavelen) = (original / low, original / high);
            let factors = (0..half)
                .map(|i| {
                    // Why f64 here: the table itself is built in f32 as candle's is,
                    // and only the factor comes from this.
                    let inv_freq = 1.0 / (rope_theta as f64).powf(2.0 * i as f64 / head_dim as f64);
                    let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
                    if wavelen < high_wavelen {
                        1.0
                    } else if wavelen > low_wavelen {
                        factor as f32
                    } else {
                        let smooth = (original / wavelen - low) / (high - low);
                        (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                    }
                })
                .collect();
            Ok(Some(factors))
        }
        other => Err(ModelError::Unsupported(format!(
            "rope_scaling {scaling} (kind {other:?}; ponder implements llama3 and linear)"
        ))),
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
        let arch = self.arch()?;
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let rope_freq_factors = match &self.rope_scaling {
            Some(scaling) => rope_freq_factors(scaling, self.rope_theta as f32, head_dim)?,
            None => None,
        };
        let cfg = ModelConfig {
            arch,
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            n_layers: self.num_hidden_layers,
            n_heads: self.num_attention_heads,
            n_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            vocab: self.vocab_size,
            rms_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta as f32,
            rope_style: RopeStyle::HalfSplit,
            rope_freq_factors,
            max_position: self.max_position_embeddings,
            // qwen2's config defaults to tied when the key is absent, llama's to untied;
            // the loader also checks whether `lm_head.weight` exists.
            tie_embeddings: self.tie_word_embeddings.unwrap_or(arch == Arch::Qwen2),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_rope_scaling_gives_hf_factors_and_other_kinds_are_refused() {
        // Llama-3.2-1B's: theta 500000, head_dim 64. HF's
        // _compute_llama3_parameters divides the 16 fastest frequencies by
        // nothing, the 13 slowest by 32, and blends the three between.
        let scaling = serde_json::json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let f = rope_freq_factors(&scaling, 500_000.0, 64).unwrap().unwrap();
        assert_eq!(f.len(), 32);
        assert!(f[..15].iter().all(|&x| x == 1.0) && f[19..].iter().all(|&x| x == 32.0), "{f:?}");
        for (got, want) in f[15..18].iter().zip([1.651329f32, 3.292262, 9.666729]) {
            assert!((got - want).abs() < 1e-4, "{f:?}");
        }
        let linear = serde_json::json!({"type": "linear", "factor": 4.0});
        assert_eq!(rope_freq_factors(&linear, 10_000.0, 8).unwrap(), Some(vec![4.0; 4]));
        assert_eq!(rope_freq_factors(&serde_json::json!({"rope_type": "default"}), 1e4, 8).unwrap(), None);
        assert_eq!(rope_freq_factors(&serde_json::Value::Null, 1e4, 8).unwrap(), None);
        let yarn = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        let e = rope_freq_factors(&yarn, 1e4, 8).unwrap_err().to_string();
        assert!(e.contains("yarn") && e.contains("llama3"), "{e}");
        let broken = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
        let e = rope_freq_factors(&broken, 1e4, 8).unwrap_err().to_string();
        assert!(e.contains("low_freq_factor"), "{e}");
    }
}
