//! Settings, parsed once at start-up: built-in defaults, then the TOML file,
//! then `PONDER_*` environment variables, then command-line flags. Nothing
//! else in the crate reads the environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::device::DeviceKind;
use crate::model::WeightFormat;
pub use crate::prm::config::{ModelPrmConfig, PoolingFormat, PrmConfig, RemotePrmConfig};
pub use crate::reasoning::knobs::ReasoningDefaults;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("model {id:?}: {path} does not exist{hint}")]
    MissingModel { id: String, path: String, hint: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: Limits,
    pub queue: QueueConfig,
    pub logging: LoggingConfig,
    pub models: Vec<ModelEntry>,
    /// Separate PRMs served on `POST /pooling` (vLLM's format), for other
    /// ponder replicas to score with.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prms: Vec<ServedPrm>,
}

/// A PRM in the Qwen2.5-Math-PRM format, served on `/pooling`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServedPrm {
    /// The `model` name clients send.
    pub id: String,
    /// Its checkpoint directory.
    pub model: PathBuf,
    /// A PEFT LoRA adapter merged in at load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricsAuth {
    /// `/metrics` answers without a key.
    Open,
    /// `/metrics` needs a key like the API routes.
    Protected,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Accepted `Authorization: Bearer` keys; empty means no auth.
    pub api_keys: Vec<String>,
    pub metrics_auth: MetricsAuth,
    /// After SIGTERM/SIGINT, how long in-flight requests may take to finish.
    pub drain_timeout_secs: u64,
    /// Compute threads for the model kernels; 0 lets candle decide.
    pub threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            api_keys: Vec::new(),
            metrics_auth: MetricsAuth::Open,
            drain_timeout_secs: 30,
            threads: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Longest wait for the next part of a request body, in seconds: a
    /// client that stops sending mid-body gets 408 instead of holding its
    /// connection.
    pub body_timeout_secs: usize,
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens: usize,
    /// `max_tokens` when a request gives none (capped by the context left).
    pub default_max_tokens: usize,
    pub max_n: usize,
    pub max_stop: usize,
    pub max_stop_chars: usize,
    pub max_top_logprobs: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            body_timeout_secs: 30,
            max_prompt_tokens: 4096,
            max_tokens: 4096,
            default_max_tokens: 256,
            max_n: 16,
            max_stop: 4,
            max_stop_chars: 64,
            max_top_logprobs: 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Requests that may wait per model beyond `max_running` (a request
    /// counts once, whatever its `n` or budget): `capacity + max_running`
    /// may be in flight; past that, requests get 429 at once.
    pub capacity: usize,
    /// Sequences one worker decodes together.
    pub max_running: usize,
    /// `Retry-After` seconds sent with 429.
    pub retry_after_secs: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self { capacity: 64, max_running: 64, retry_after_secs: 1 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptLogging {
    Off,
    On,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    pub format: LogFormat,
    /// A tracing filter, e.g. "info" or "ponder=debug".
    pub level: String,
    /// Whether request log lines carry the prompt text.
    pub prompts: PromptLogging,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self { format: LogFormat::Text, level: "info".into(), prompts: PromptLogging::Off }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// The `model` name clients send.
    pub id: String,
    /// GGUF file, HF directory, or directory with one GGUF (local models).
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub path: PathBuf,
    /// Where generation runs: this process's engine, or a remote
    /// OpenAI-compatible engine (vLLM, SGLang, TGI, llama.cpp).
    #[serde(default, skip_serializing_if = "BackendConfig::is_local")]
    pub backend: BackendConfig,
    /// A remote model's tokenizer (a GGUF, a `tokenizer.json` or an HF
    /// directory), from which ponder renders the chat template and counts tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
    /// A remote model's context length; when absent, read from the engine's
    /// `/v1/models`: `max_model_len` (vLLM, ponder), else llama.cpp's
    /// `meta.n_ctx` (one slot's context), else its `meta.n_ctx_train`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<usize>,
    #[serde(default)]
    pub weights: WeightFormat,
    /// One worker per device.
    #[serde(default = "default_devices")]
    pub devices: Vec<DeviceKind>,
    #[serde(default = "default_prefill_chunk")]
    pub prefill_chunk: usize,
    /// The command that fetches the model, named when its file is missing.
    #[serde(default)]
    pub fetch: Option<String>,
    /// The model's PRM: a head on its hidden states (a path), or a separate
    /// PRM model (a table); without one, adaptive best-of-N falls back to
    /// `vote` and `majority`, and beam search or a named rule or selection
    /// that needs a PRM is refused (400).
    #[serde(default)]
    pub prm: Option<PrmConfig>,
    /// Defaults of the request's `reasoning` object for this model.
    #[serde(default)]
    pub reasoning: ReasoningDefaults,
}

impl ModelEntry {
    /// The backend's own settings: a local model needs its path; a remote
    /// one an http URL, a model name, a timeout, a tokenizer and no head PRM.
    fn check_backend(&self) -> Result<(), String> {
        let id = &self.id;
        let r = match &self.backend {
            BackendConfig::Local if path_is_empty(&self.path) => {
                return Err(format!("model {id:?}: `path` is required for a local model"));
            }
            BackendConfig::Local => return Ok(()),
            BackendConfig::Openai(r) => r,
        };
        check_url(&r.url)
            .map_err(|why| format!("model {id:?}: backend.url {why} ending in /v1; got {:?}", r.url))?;
        if r.max_n == Some(0) {
            return Err(format!("model {id:?}: backend.max_n must be at least 1"));
        }
        if r.model.is_empty() || r.timeout_secs == 0 {
            return Err(format!("model {id:?}: backend.model and backend.timeout_secs must be non-empty"));
        }
        if self.tokenizer.is_none() {
            return Err(format!(
                "model {id:?}: a remote model needs `tokenizer` (a GGUF, a tokenizer.json or an HF directory)"
            ));
        }
        if matches!(self.prm, Some(PrmConfig::Head(_))) {
            return Err(format!(
                "model {id:?}: a PRM head reads the policy's hidden states, which a remote engine does not return; use a separate PRM"
            ));
        }
        Ok(())
    }
}

/// Most requests in flight per model (`queue.capacity + queue.max_running`).
pub const MAX_IN_FLIGHT: usize = 1 << 20;

/// An engine's or PRM's URL: plain http (the HTTP client has no TLS), and no
/// `user:password@`, which would travel into error messages, logs and the
/// open `/health` (engine keys go in `api_key_env`).
fn check_url(url: &str) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err("must be an http:// URL (https is not supported; put a TLS proxy in front)".into());
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.contains('@') {
        return Err(
            "must not hold credentials (user:password@); give the engine's key with api_key_env".into()
        );
    }
    if authority.is_empty() {
        return Err("names no host".into());
    }
    Ok(())
}

fn path_is_empty(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

/// Where a model's generation runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackendConfig {
    /// ponder's own engine, on the model's `devices`.
    #[default]
    Local,
    /// An engine that speaks OpenAI's `/v1/completions`.
    Openai(RemoteEngine),
}

impl BackendConfig {
    pub fn is_local(&self) -> bool {
        matches!(self, BackendConfig::Local)
    }
}

/// A remote OpenAI-compatible engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteEngine {
    /// Base URL up to and including `/v1`, e.g. `http://host:8000/v1`.
    pub url: String,
    /// The engine's name for the model (vLLM's `--served-model-name`).
    pub model: String,
    /// Environment variable holding the engine's API key, sent as a bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// Longest wait for the engine's next bytes (a response head or a
    /// streamed chunk) before the request fails with 504.
    #[serde(default = "default_remote_timeout")]
    pub timeout_secs: u64,
    /// Which server it is: what a request asks beyond OpenAI's fields, and
    /// how the answer names its tokens and the stop string it met.
    #[serde(default)]
    pub server: EngineServer,
    /// Most choices one call asks for; more are split over calls with
    /// shifted seeds. Default: unlimited for vLLM, 1 for llama.cpp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_n: Option<usize>,
    /// The key read from `api_key_env` at start-up; never printed.
    #[serde(skip)]
    pub api_key: Option<String>,
}

impl RemoteEngine {
    /// Choices per upstream call.
    pub fn choices_per_call(&self) -> usize {
        self.max_n.unwrap_or(match self.server {
            EngineServer::Vllm => usize::MAX,
            // Its answer to n > 1 carries the first choice's usage and
            // stop details only, so each choice is a call of its own.
            EngineServer::LlamaCpp => 1,
        })
    }
}

/// The server behind a remote backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineServer {
    /// vLLM, and servers that speak its extensions (SGLang, ponder):
    /// `include_stop_str_in_output`, `return_token_ids`, `stop_reason`.
    #[default]
    Vllm,
    /// llama.cpp's `llama-server`: `return_tokens` and `verbose`, whose
    /// `__verbose` object gives the tokens and the stopping word.
    LlamaCpp,
}

fn default_remote_timeout() -> u64 {
    600
}

fn default_devices() -> Vec<DeviceKind> {
    vec![DeviceKind::Cpu]
}

fn default_prefill_chunk() -> usize {
    512
}

pub const DEFAULT_MODEL_ID: &str = "smollm2-135m-instruct";
pub const DEFAULT_MODEL_PATH: &str = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const ARITH_MODEL_ID: &str = "ponder-arith";
pub const ARITH_MODEL_PATH: &str = "models/ponder-arith";
/// ponder-arith's verifier PRM (`ponder arith train-prm`) and its
/// calibrated quantile head (`ponder calibrate --prm-model`).
pub const ARITH_VERIFIER_PATH: &str = "models/ponder-arith-verifier";
pub const ARITH_VERIFIER_HEAD_PATH: &str =
    "models/ponder-arith-verifier/calibration/prm_quantile_head.safetensors";

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            limits: Limits::default(),
            queue: QueueConfig::default(),
            logging: LoggingConfig::default(),
            prms: Vec::new(),
            models: vec![
                ModelEntry {
                    id: DEFAULT_MODEL_ID.into(),
                    path: DEFAULT_MODEL_PATH.into(),
                    backend: BackendConfig::Local,
                    tokenizer: None,
                    context_length: None,
                    weights: WeightFormat::Auto,
                    devices: default_devices(),
                    prefill_chunk: default_prefill_chunk(),
                    fetch: Some("make models".into()),
                    prm: None,
                    // No PRM: adaptive budgets come from the vote.
                    reasoning: ReasoningDefaults {
                        confidence: 0.95,
                        budget_rule: crate::reasoning::BudgetRule::Vote,
                        select: crate::reasoning::Select::Majority,
                        ..ReasoningDefaults::default()
                    },
                },
                ModelEntry {
                    id: ARITH_MODEL_ID.into(),
                    path: ARITH_MODEL_PATH.into(),
                    backend: BackendConfig::Local,
                    tokenizer: None,
                    context_length: None,
                    weights: WeightFormat::Auto,
                    devices: default_devices(),
                    prefill_chunk: default_prefill_chunk(),
                    fetch: Some(
                        "git checkout models/ponder-arith (it is committed), or `ponder arith train`".into(),
                    ),
                    prm: Some(PrmConfig::Model(ModelPrmConfig {
                        model: ARITH_VERIFIER_PATH.into(),
                        head: crate::prm::model_prm::HeadChoice::Trained(ARITH_VERIFIER_HEAD_PATH.into()),
                        lora: None,
                    })),
                    reasoning: ReasoningDefaults {
                        max_step_tokens: 64,
                        answer: crate::reasoning::select::AnswerFormat::LastNumber,
                        ..ReasoningDefaults::default()
                    },
                },
            ],
        }
    }
}

/// Command-line overrides, applied last.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub api_keys: Vec<String>,
    /// `id=path` pairs that replace the configured models.
    pub models: Vec<(String, PathBuf)>,
    pub log_format: Option<LogFormat>,
    pub threads: Option<usize>,
}

const ENV_PREFIX: &str = "PONDER_";
const SECTIONS: [&str; 4] = ["server", "limits", "queue", "logging"];

impl Config {
    /// Defaults, then `file` (if any), then `env` (`PONDER_<SECTION>_<KEY>`),
    /// then `overrides`; validated.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut table =
            toml::Table::try_from(Config::default()).expect("the default config serialises to TOML");
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            let from_file: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::File {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            merge(&mut table, from_file);
        }
        let all_env: BTreeMap<String, String> = env.into_iter().collect();
        for (var, value) in all_env.iter().filter(|(k, _)| k.starts_with(ENV_PREFIX)) {
            apply_env(&mut table, var, value)?;
        }
        let mut cfg: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| located(e, file, &all_env))?;
        cfg.apply(overrides);
        cfg.validate()?;
        cfg.resolve_api_keys(&all_env)?;
        Ok(cfg)
    }

    fn apply(&mut self, o: &Overrides) {
        if let Some(h) = &o.host {
            self.server.host = h.clone();
        }
        if let Some(p) = o.port {
            self.server.port = p;
        }
        if !o.api_keys.is_empty() {
            self.server.api_keys = o.api_keys.clone();
        }
        if let Some(f) = o.log_format {
            self.logging.format = f;
        }
        if let Some(t) = o.threads {
            self.server.threads = t;
        }
        if !o.models.is_empty() {
            self.models = o
                .models
                .iter()
                .map(|(id, path)| ModelEntry {
                    id: id.clone(),
                    path: path.clone(),
                    backend: BackendConfig::Local,
                    tokenizer: None,
                    context_length: None,
                    weights: WeightFormat::Auto,
                    devices: default_devices(),
                    prefill_chunk: default_prefill_chunk(),
                    fetch: None,
                    // A head written by `ponder calibrate` beside the model is picked up.
                    prm: Some(path.join("prm_head.safetensors")).filter(|p| p.is_file()).map(PrmConfig::Head),
                    reasoning: ReasoningDefaults::default(),
                })
                .collect();
        }
    }

    /// Reads each remote engine's key from the variable its `api_key_env` names.
    fn resolve_api_keys(&mut self, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        for m in &mut self.models {
            if let BackendConfig::Openai(r) = &mut m.backend
                && let Some(var) = &r.api_key_env
            {
                let key = env.get(var).filter(|k| !k.is_empty()).ok_or_else(|| ConfigError::Env {
                    var: var.clone(),
                    message: format!("named by model {:?}'s backend.api_key_env, but unset or empty", m.id),
                })?;
                r.api_key = Some(key.clone());
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.models.is_empty() && self.prms.is_empty() {
            return bad("no models (and no prms) configured".into());
        }
        if let Some(p) = self.prms.iter().find(|p| p.id.is_empty()) {
            return bad(format!("a [[prms]] entry ({}) has an empty id", p.model.display()));
        }
        // First: the models' checks below read these limits.
        let l = &self.limits;
        let nonzero = [
            ("limits.max_body_bytes", l.max_body_bytes),
            ("limits.body_timeout_secs", l.body_timeout_secs),
            ("limits.max_prompt_tokens", l.max_prompt_tokens),
            ("limits.max_tokens", l.max_tokens),
            ("limits.default_max_tokens", l.default_max_tokens),
            ("limits.max_n", l.max_n),
            ("queue.max_running", self.queue.max_running),
        ];
        if let Some((name, _)) = nonzero.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be at least 1"));
        }
        let mut ids: Vec<&str> = self.models.iter().map(|m| m.id.as_str()).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return bad(format!("model id {:?} is configured twice", w[0]));
        }
        for m in &self.models {
            if m.id.is_empty() || m.devices.is_empty() || m.prefill_chunk == 0 {
                return bad(format!("model {:?}: id, devices and prefill_chunk must be non-empty", m.id));
            }
            if let Some(Err(why)) = m.devices.iter().map(DeviceKind::supported).find(Result::is_err) {
                return bad(format!("model {:?}: devices: {why}", m.id));
            }
            m.check_backend().map_err(ConfigError::Invalid)?;
            if let Some(PrmConfig::Remote(p)) = &m.prm {
                check_url(&p.remote).map_err(|why| {
                    ConfigError::Invalid(format!("model {:?}: prm.remote {why}; got {:?}", m.id, p.remote))
                })?;
            }
            if m.context_length == Some(0) {
                return bad(format!("model {:?}: context_length must be at least 1", m.id));
            }
            // The same ranges a request's values meet: a default no request could use stops start-up.
            crate::reasoning::knobs::check_defaults(&m.reasoning, self.queue.max_running)
                .map_err(|e| ConfigError::Invalid(format!("model {:?}: [models.reasoning] {e}", m.id)))?;
        }
        if l.max_n > self.queue.max_running {
            return bad(format!(
                "limits.max_n ({}) exceeds queue.max_running ({}): such a request could never run",
                l.max_n, self.queue.max_running
            ));
        }
        let mut directives = self.logging.level.split(',').map(str::trim).filter(|d| !d.is_empty());
        if let Some(d) = directives.find(|d| !names_a_level(d)) {
            return bad(format!(
                "logging.level {:?}: directive {d:?} names no level; write a level (\"info\") or target=level (\"ponder=debug\")",
                self.logging.level
            ));
        }
        if self.server.api_keys.iter().any(|k| k.is_empty()) {
            return bad("server.api_keys holds an empty key".into());
        }
        if l.default_max_tokens > l.max_tokens {
            return bad(format!(
                "limits.default_max_tokens ({}) exceeds limits.max_tokens ({})",
                l.default_max_tokens, l.max_tokens
            ));
        }
        // Admission counts permits in a semaphore, whose limit is far above
        // any real queue; a huge value meant as "unbounded" would panic there.
        let in_flight = self.queue.capacity.saturating_add(self.queue.max_running);
        if in_flight > MAX_IN_FLIGHT {
            return bad(format!(
                "queue.capacity + queue.max_running must be at most {MAX_IN_FLIGHT}, got {in_flight}"
            ));
        }
        Ok(())
    }

    /// Stops start-up when a model's files are missing, naming the path and
    /// the command that fetches them.
    pub fn check_model_files(&self) -> Result<(), ConfigError> {
        if let Some(p) = self.prms.iter().find(|p| !p.model.exists()) {
            return Err(ConfigError::MissingModel {
                id: p.id.clone(),
                path: p.model.display().to_string(),
                hint: " (a [[prms]] entry)".into(),
            });
        }
        for m in &self.models {
            if let Some(prm) = m.prm.iter().flat_map(PrmConfig::paths).find(|p| !p.exists()) {
                let hint = match m.prm {
                    Some(PrmConfig::Head(_)) => "; `ponder calibrate` writes a PRM head",
                    _ => " (named by the model's `prm` table)",
                };
                return Err(ConfigError::MissingModel {
                    id: m.id.clone(),
                    path: prm.display().to_string(),
                    hint: hint.into(),
                });
            }
            if let Some(t) = m.tokenizer.as_ref().filter(|t| !t.exists()) {
                return Err(ConfigError::MissingModel {
                    id: m.id.clone(),
                    path: t.display().to_string(),
                    hint: " (the model's `tokenizer`)".into(),
                });
            }
            if m.backend.is_local() && !m.path.exists() {
                let hint = m.fetch.as_ref().map(|f| format!("; fetch it with `{f}`")).unwrap_or_default();
                return Err(ConfigError::MissingModel {
                    id: m.id.clone(),
                    path: m.path.display().to_string(),
                    hint,
                });
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML, API keys redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.server.api_keys = shown.server.api_keys.iter().map(|_| "<redacted>".to_string()).collect();
        toml::to_string_pretty(&shown).expect("the config serialises to TOML")
    }
}

/// Whether a tracing directive sets a level. A bare word that is not a level
/// is a target at every level, so `level = "nonsense"` would log nothing of
/// ponder's without a word.
fn names_a_level(directive: &str) -> bool {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    directive.contains('=') || LEVELS.iter().any(|l| directive.eq_ignore_ascii_case(l))
}

/// A type error in the merged settings, told by where the value came from:
/// the variable that set the key, else the file, naming the key either way.
fn located(
    e: serde_path_to_error::Error<toml::de::Error>,
    file: Option<&Path>,
    env: &BTreeMap<String, String>,
) -> ConfigError {
    let key = e.path().to_string();
    let message = match key.as_str() {
        "." => e.inner().message().to_string(),
        _ => format!("{key}: {}", e.inner().message()),
    };
    let var = format!("{ENV_PREFIX}{}", key.replace('.', "_").to_ascii_uppercase());
    match (env.contains_key(&var), file) {
        (true, _) => ConfigError::Env { var, message },
        (false, Some(path)) => ConfigError::File { path: path.display().to_string(), message },
        (false, None) => ConfigError::Invalid(message),
    }
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// `PONDER_QUEUE_CAPACITY=8` sets `queue.capacity`; list settings take
/// comma-separated values (`PONDER_SERVER_API_KEYS=k1,k2`).
fn apply_env(table: &mut toml::Table, var: &str, value: &str) -> Result<(), ConfigError> {
    let err = |message: String| ConfigError::Env { var: var.to_string(), message };
    let rest = var[ENV_PREFIX.len()..].to_ascii_lowercase();
    let Some(section) = SECTIONS.iter().find(|s| rest.starts_with(&format!("{s}_"))) else {
        // Other PONDER_* variables (PONDER_CONFIG, PONDER_THREADS) are CLI flags' env names.
        return Ok(());
    };
    let key = &rest[section.len() + 1..];
    let sec = table.get_mut(*section).and_then(|s| s.as_table_mut()).expect("every section has defaults");
    let current = sec.get(key).ok_or_else(|| err(format!("{section} has no setting {key:?}")))?;
    let parsed = match current {
        toml::Value::Array(_) => {
            let items: Vec<toml::Value> = value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.into()))
                .collect();
            // An empty list here would replace the file's: for
            // PONDER_SERVER_API_KEYS, a compose `${KEYS}` left unset would
            // turn authentication off. Fail closed instead.
            if items.is_empty() {
                return Err(err(
                    "is set but lists nothing; unset it to keep the file's value, or list comma-separated values"
                        .into(),
                ));
            }
            toml::Value::Array(items)
        }
        toml::Value::String(_) => toml::Value::String(value.into()),
        toml::Value::Integer(_) => {
            toml::Value::Integer(value.parse().map_err(|_| err(format!("{value:?} is not an integer")))?)
        }
        toml::Value::Float(_) => {
            toml::Value::Float(value.parse().map_err(|_| err(format!("{value:?} is not a number")))?)
        }
        toml::Value::Boolean(_) => {
            toml::Value::Boolean(value.parse().map_err(|_| err(format!("{value:?} is not true or false")))?)
        }
        _ => return Err(err("this setting cannot be set from the environment".into())),
    };
    sec.insert(key.to_string(), parsed);
    Ok(())
}

#[cfg(test)]
mod tests;
