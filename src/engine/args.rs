//! The command-line arguments that name a model file and its weight
//! format, shared by every command that loads an engine.

use std::path::PathBuf;

use clap::Args;

use super::{Engine, EngineOptions};
use crate::model::WeightFormat;

/// Where the model is and how to hold its weights.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A GGUF file, an HF directory (config.json + *.safetensors), or a directory with one GGUF.
    #[arg(long)]
    pub model: PathBuf,
    /// Weight storage: auto (Q8_0 for quantized files, f32 otherwise), stored, q8_0, f32, f16, bf16.
    #[arg(long, value_enum, default_value_t = WeightFormat::Auto)]
    pub weights: WeightFormat,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<Engine> {
        let engine =
            Engine::load(&self.model, self.weights, &candle_core::Device::Cpu, EngineOptions::default())
                .map_err(|e| anyhow::anyhow!("loading {}: {e}", self.model.display()))?;
        Ok(engine)
    }
}
