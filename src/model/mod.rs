//! Tensors and nothing else: model weights, the batched forward pass, and
//! per-sequence KV caches. Knows nothing of text, sampling or requests.

mod attention;
pub mod config;
mod device_attention;
pub mod kv;
mod kv_pool;
mod linear;
pub mod llama;
pub mod random;

use std::path::{Path, PathBuf};

pub use config::{Arch, ModelConfig, RopeStyle};
pub use kv::{KvCache, KvMemory};
pub use linear::WeightFormat;
pub use llama::{AttentionPath, BatchEntry, ForwardOutput, Llama};
pub use random::RandomShape;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("invalid model file: {0}")]
    Format(String),
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("model file lacks tensor {0}")]
    MissingTensor(String),
    #[error("sequence of {needed} tokens exceeds the model's context of {max}")]
    ContextOverflow { needed: usize, max: usize },
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error("forward pass over an empty batch or an entry without tokens")]
    EmptyBatch,
    #[error("a KV cache made by another model, or for another attention path, was fed to this one")]
    ForeignCache,
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io { path: path.to_path_buf(), source }
    }
}

/// Where a model's files are: a GGUF file, or an HF checkpoint directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Gguf(PathBuf),
    HfDir(PathBuf),
}

impl ModelSource {
    /// Accepts a `.gguf` file, an HF directory with `config.json`, or a
    /// directory holding exactly one `.gguf` file.
    pub fn detect(path: &Path) -> Result<Self, ModelError> {
        if path.is_file() {
            return Ok(ModelSource::Gguf(path.to_path_buf()));
        }
        if !path.is_dir() {
            return Err(ModelError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such model file or directory"),
            ));
        }
        if path.join("config.json").is_file() {
            return Ok(ModelSource::HfDir(path.to_path_buf()));
        }
        let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| ModelError::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        match ggufs.as_slice() {
            [one] => Ok(ModelSource::Gguf(one.clone())),
            [] => Err(ModelError::Format(format!(
                "{}: neither config.json nor a .gguf file in the directory",
                path.display()
            ))),
            _ => Err(ModelError::Format(format!(
                "{}: several .gguf files; name the one to load",
                path.display()
            ))),
        }
    }

    pub fn load(&self, format: WeightFormat, device: &candle_core::Device) -> Result<Llama, ModelError> {
        match self {
            ModelSource::Gguf(p) => Llama::from_gguf(p, format, device),
            ModelSource::HfDir(d) => Llama::from_safetensors(d, format, device),
        }
    }
}
