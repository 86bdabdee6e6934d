//! How a model's configuration names its PRM: a head file on the policy's
//! hidden states, or a separate PRM model with its head and adapter.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A model's PRM, as the configuration names it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum PrmConfig {
    /// `prm = "…/prm_head.safetensors"`: a head written by `ponder
    /// calibrate` that reads this model's own hidden states.
    Head(PathBuf),
    /// `prm = { model = "dir", head = "converted", lora = "dir" }`: a
    /// separate PRM in the Qwen2.5-Math-PRM format.
    Model(ModelPrmConfig),
}

/// A separate PRM model and how its steps are scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrmConfig {
    /// The checkpoint directory (`config.json`, safetensors, `tokenizer.json`).
    pub model: PathBuf,
    /// `"two_class"` (its own P(good)), `"converted"` (three quantile
    /// outputs that start as P(good)) or `{ trained = "head.safetensors" }`.
    #[serde(default)]
    pub head: super::model_prm::HeadChoice,
    /// A PEFT LoRA adapter directory merged into the backbone at load.
    #[serde(default)]
    pub lora: Option<PathBuf>,
}

impl PrmConfig {
    /// Every file this PRM reads, for the start-up check.
    pub fn paths(&self) -> Vec<&Path> {
        match self {
            Self::Head(p) => vec![p],
            Self::Model(m) => {
                let mut v: Vec<&Path> = vec![&m.model];
                v.extend(m.lora.as_deref());
                if let super::model_prm::HeadChoice::Trained(p) = &m.head {
                    v.push(p);
                }
                v
            }
        }
    }
}

// By hand rather than `untagged`, so that a mistyped table keeps serde's
// message (which field, what was expected) instead of "did not match any
// variant".
impl<'de> Deserialize<'de> for PrmConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = PrmConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a PRM head path, or a table { model = \"dir\", head, lora }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PrmConfig, E> {
                Ok(PrmConfig::Head(v.into()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<PrmConfig, A::Error> {
                ModelPrmConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(PrmConfig::Model)
            }
        }
        d.deserialize_any(Visit)
    }
}
