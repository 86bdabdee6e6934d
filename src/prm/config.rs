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
    /// `prm = { remote = "http://host:8001", format = "vllm_pooling",
    /// model = "name" }`: a Qwen2.5-Math-PRM-format PRM served elsewhere
    /// (vLLM's pooling runner, or another ponder).
    Remote(RemotePrmConfig),
}

/// How a remote PRM is asked for step scores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolingFormat {
    /// `POST /pooling` with `task = "token_classify"`: `[p_bad, p_good]`
    /// per `<extra_0>` step tag.
    #[default]
    VllmPooling,
}

/// A PRM behind an HTTP endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemotePrmConfig {
    /// The server's base URL (`http://host:port`; `/pooling` is appended).
    pub remote: String,
    #[serde(default)]
    pub format: PoolingFormat,
    /// The server's name for the PRM.
    pub model: String,
    /// Longest wait for one scoring call, in seconds.
    #[serde(default = "default_prm_timeout")]
    pub timeout_secs: u64,
    /// A quantile map written by `ponder calibrate` (its
    /// `prm_quantile_map.json`); without one, P(good) is a point estimate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<PathBuf>,
}

fn default_prm_timeout() -> u64 {
    120
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
            Self::Remote(r) => r.calibration.iter().map(PathBuf::as_path).collect(),
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
                f.write_str("a PRM head path, a table { model = \"dir\", head, lora }, or { remote = \"url\", model }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PrmConfig, E> {
                Ok(PrmConfig::Head(v.into()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<PrmConfig, A::Error> {
                use serde::de::Error;
                // Read once, then parsed as the table its keys name.
                let table = toml::Table::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                let value = toml::Value::Table(table);
                let remote = value.as_table().is_some_and(|t| t.contains_key("remote"));
                if remote {
                    value.try_into().map(PrmConfig::Remote).map_err(|e| A::Error::custom(e.message()))
                } else {
                    value.try_into().map(PrmConfig::Model).map_err(|e| A::Error::custom(e.message()))
                }
            }
        }
        d.deserialize_any(Visit)
    }
}
