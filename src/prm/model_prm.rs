//! A separate PRM in the Qwen2.5-Math-PRM format: a llama-family backbone
//! (qwen2 in Qwen2.5-Math-PRM's `Qwen2ForProcessRewardModel`, llama in
//! ponder-arith's verifier, `LlamaForProcessRewardModel`) whose `score`
//! head (Linear → ReLU → Linear(2)) reads the final hidden state at each
//! `<extra_0>` token that ends a step, in the chat format of its model
//! card; P(good) is softmax index 1. A checkpoint may also have the head
//! read the PRM's own surprisal over the prefix's step tokens
//! (`"ponder_step_features": "hidden_and_surprisal"` in `config.json`) and
//! read numbers least significant digit first (`"ponder_number_order"` in
//! `tokenizer_config.json`), as ponder-arith's verifier does.
//!
//! The 2-class head can be turned into a 3-quantile head whose every output
//! starts as P(good) (each row `w_good − w_bad`, bias `b_good − b_bad`,
//! sigmoid), a trained quantile head can replace it, and a LoRA adapter can
//! be merged into the backbone at load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::{PrmError, PrmScore, Quantiles, surprisal};
use crate::model::{Llama, WeightFormat};
use crate::tokenizer::{AddSpecial, ChatMessage, Tokenizer};

pub const STEP_TOKEN: &str = "<extra_0>";
/// The system prompt of Qwen2.5-Math-PRM's model card.
pub const SYSTEM_PROMPT: &str = "Please reason step by step, and put your final answer within \\boxed{}.";

/// Which head scores steps.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadChoice {
    /// The checkpoint's own 2-class head: a point estimate.
    TwoClass,
    /// The 2-class head converted to three quantile outputs (all equal to
    /// P(good) until trained).
    #[default]
    Converted,
    /// A trained quantile head from a safetensors file (`score.2.*` with 3
    /// rows, and optionally `score.0.*`).
    Trained(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPrmOptions {
    pub head: HeadChoice,
    /// A PEFT LoRA adapter directory (`adapter_config.json`,
    /// `adapter_model.safetensors`) merged into the backbone at load.
    pub lora: Option<PathBuf>,
}

#[derive(Debug)]
pub struct ModelPrm {
    backbone: Llama,
    tokenizer: Tokenizer,
    fc1: (Tensor, Tensor),
    /// The checkpoint's 2-class output layer (P(good), the raw score).
    classes: (Tensor, Tensor),
    /// The 3-quantile output layer, when one is used.
    quantiles: Option<(Tensor, Tensor)>,
    step_token: u32,
    order: NumberOrder,
    step_features: StepFeatures,
    /// The token ids that open the assistant turn (where steps begin), for
    /// surprisal features.
    assistant_marker: Vec<u32>,
}

/// Which step tags a pass scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TagPick {
    All,
    Last,
}

/// What the score head reads at a step tag: `"ponder_step_features"` in
/// the checkpoint's `config.json`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepFeatures {
    /// The final hidden state (Qwen2.5-Math-PRM).
    #[default]
    Hidden,
    /// That and the PRM's surprisal at the prefix's step tokens
    /// ([`surprisal`]); the assistant turn opens with the tokens of
    /// `"ponder_assistant_prefix"` in `tokenizer_config.json`.
    HiddenAndSurprisal,
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> PrmError {
    PrmError::File { path: path.display().to_string(), message: e.to_string() }
}

#[derive(Deserialize)]
struct LoraConfig {
    r: usize,
    lora_alpha: f64,
}

/// W += (alpha / r) B A for every adapted module, in f32 on `device`.
fn merge_lora(tensors: &mut HashMap<String, Tensor>, dir: &Path, device: &Device) -> Result<usize, PrmError> {
    let cfg_path = dir.join("adapter_config.json");
    let cfg: LoraConfig =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).map_err(|e| file_err(&cfg_path, e))?)
            .map_err(|e| file_err(&cfg_path, e))?;
    let weights = dir.join("adapter_model.safetensors");
    let adapter = candle_core::safetensors::load(&weights, device).map_err(|e| file_err(&weights, e))?;
    let scale = cfg.lora_alpha / cfg.r as f64;
    let mut merged = 0;
    for (name, a) in &adapter {
        let Some(module) = name.strip_suffix(".lora_A.weight") else { continue };
        let b = adapter
            .get(&format!("{module}.lora_B.weight"))
            .ok_or_else(|| file_err(&weights, format!("{module} has lora_A but no lora_B")))?;
        let base = module.strip_prefix("base_model.model.").unwrap_or(module);
        let key = format!("{base}.weight");
        let w = tensors.get(&key).ok_or_else(|| file_err(&weights, format!("the backbone has no {key}")))?;
        let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
        let updated = (w.to_dtype(DType::F32)? + delta)?;
        tensors.insert(key, updated);
        merged += 1;
    }
    Ok(merged)
}

/// How a PRM reads the numbers of its input: as written, or with every run
/// of digits reversed (least significant digit first), set by
/// `"ponder_number_order": "least_significant_first"` in its
/// `tokenizer_config.json`. Small transformers check sums and products far
/// more reliably in that order, where each result digit depends on the
/// operand digits at the same offset and a carry from the digit before it
/// (Lee et al. 2023, "Teaching Arithmetic to Small Transformers").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NumberOrder {
    #[default]
    AsWritten,
    LeastSignificantFirst,
}

impl NumberOrder {
    /// Reads the setting beside a checkpoint's tokenizer (absent: as written).
    pub fn from_dir(dir: &Path) -> Result<Self, PrmError> {
        let path = dir.join("tokenizer_config.json");
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(Self::AsWritten) };
        let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| file_err(&path, e))?;
        match cfg.get("ponder_number_order") {
            None => Ok(Self::AsWritten),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| file_err(&path, format!("ponder_number_order: {e}"))),
        }
    }

    /// `text` as the PRM reads it.
    pub fn apply(self, text: &str) -> std::borrow::Cow<'_, str> {
        match self {
            Self::AsWritten => text.into(),
            Self::LeastSignificantFirst => {
                let mut out = String::with_capacity(text.len());
                let mut run = String::new();
                for ch in text.chars() {
                    if ch.is_ascii_digit() {
                        run.push(ch);
                    } else {
                        out.extend(run.chars().rev());
                        run.clear();
                        out.push(ch);
                    }
                }
                out.extend(run.chars().rev());
                out.into()
            }
        }
    }
}

/// A PRM's input for `question` and `steps` with `tokenizer` and its chat
/// template: system, user question, and the steps joined and ended by
/// `<extra_0>` as the assistant turn (a lone `<extra_0>` for the question
/// alone), numbers in `order`. Training a PRM encodes with this too, so
/// that it learns on exactly the ids it is served with.
pub fn encode_with(
    tokenizer: &Tokenizer,
    order: NumberOrder,
    question: &str,
    steps: &[String],
) -> Result<Vec<u32>, PrmError> {
    let mut answer = steps.iter().map(|s| order.apply(s)).collect::<Vec<_>>().join(STEP_TOKEN);
    answer.push_str(STEP_TOKEN);
    let messages = [
        ChatMessage::new("system", SYSTEM_PROMPT),
        ChatMessage::new("user", order.apply(question)),
        ChatMessage::new("assistant", answer),
    ];
    let template = tokenizer.chat_template().ok_or(crate::tokenizer::TokenizerError::NoChatTemplate)?;
    let text = template.render(&messages, false)?;
    Ok(tokenizer.encode(&text, AddSpecial::No)?)
}

/// `"ponder_step_features"` from `config.json` and, for surprisal
/// features, the assistant turn's opening tokens.
fn read_step_features(dir: &Path, tokenizer: &Tokenizer) -> Result<(StepFeatures, Vec<u32>), PrmError> {
    let read = |name: &str| -> Result<serde_json::Value, PrmError> {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| file_err(&path, e)),
            Err(_) => Ok(serde_json::Value::Null),
        }
    };
    let features: StepFeatures = match read("config.json")?.get("ponder_step_features") {
        None => StepFeatures::Hidden,
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| file_err(dir, format!("ponder_step_features: {e}")))?,
    };
    let marker = match read("tokenizer_config.json")?.get("ponder_assistant_prefix").and_then(|v| v.as_str())
    {
        Some(prefix) if features == StepFeatures::HiddenAndSurprisal => {
            tokenizer.encode(prefix, AddSpecial::No)?
        }
        _ => Vec::new(),
    };
    Ok((features, marker))
}

impl ModelPrm {
    /// Loads a PRM checkpoint on the CPU, its backbone in f32.
    pub fn load(dir: &Path, opts: &ModelPrmOptions) -> Result<Self, PrmError> {
        Self::load_on(dir, opts, &Device::Cpu, WeightFormat::Auto)
    }

    /// Loads a PRM checkpoint on `device`, its backbone's weights in
    /// `weights` (bf16 for `auto` on a GPU) on the device path there. The
    /// score head runs on the device too, in f32: it is two small matmuls
    /// over a few rows, and its calibrated outputs should not move with the
    /// backbone's dtype.
    pub fn load_on(
        dir: &Path,
        opts: &ModelPrmOptions,
        device: &Device,
        weights: WeightFormat,
    ) -> Result<Self, PrmError> {
        let device = device.clone();
        let cfg = Llama::hf_config(dir)?;
        let cfg_hidden = cfg.hidden;
        let mut tensors = HashMap::new();
        for f in Llama::safetensors_files(dir)? {
            // As stored: the backbone's tensors are converted once, to its own dtype, as they are read.
            tensors.extend(candle_core::safetensors::load(&f, &device).map_err(|e| file_err(&f, e))?);
        }
        if let Some(lora) = &opts.lora {
            merge_lora(&mut tensors, lora, &device)?;
        }
        let take = |name: &str, t: &HashMap<String, Tensor>| -> Result<Tensor, PrmError> {
            let found = t.get(name).ok_or_else(|| {
                file_err(dir, format!("no tensor {name}: not a Qwen2.5-Math-PRM checkpoint"))
            })?;
            Ok(found.to_dtype(DType::F32)?)
        };
        let fc1 = (take("score.0.weight", &tensors)?, take("score.0.bias", &tensors)?);
        let classes = (take("score.2.weight", &tensors)?, take("score.2.bias", &tensors)?);
        if classes.0.dim(0)? != 2 {
            return Err(file_err(
                dir,
                format!("score.2.weight has {} rows, a 2-class head has 2", classes.0.dim(0)?),
            ));
        }
        let (fc1, quantiles) = match &opts.head {
            HeadChoice::TwoClass => (fc1, None),
            HeadChoice::Converted => {
                let (w, b) = &classes;
                let dw = (w.i(1)? - w.i(0)?)?.unsqueeze(0)?.repeat((3, 1))?;
                let db = (b.i(1)? - b.i(0)?)?.unsqueeze(0)?.repeat(3)?;
                (fc1, Some((dw, db)))
            }
            HeadChoice::Trained(path) => trained_head(path, fc1, &device)?,
        };
        let vb =
            VarBuilder::from_tensors(tensors, weights.resolve(false, &device).activation_dtype(), &device);
        let backbone = Llama::from_varbuilder(cfg, &vb, weights, &device)?;
        let tokenizer = Tokenizer::from_hf_dir(dir)?;
        let step_token = tokenizer
            .token_id(STEP_TOKEN)
            .ok_or_else(|| file_err(dir, format!("the tokenizer has no {STEP_TOKEN}")))?;
        let order = NumberOrder::from_dir(dir)?;
        let (step_features, assistant_marker) = read_step_features(dir, &tokenizer)?;
        let want = cfg_hidden + if step_features == StepFeatures::Hidden { 0 } else { surprisal::COUNT };
        if fc1.0.dim(1)? != want {
            return Err(file_err(
                dir,
                format!("score.0.weight reads {} inputs; this PRM's step features are {want}", fc1.0.dim(1)?),
            ));
        }
        Ok(Self {
            backbone,
            tokenizer,
            fc1,
            classes,
            quantiles,
            step_token,
            order,
            step_features,
            assistant_marker,
        })
    }

    /// The prompt tokens: system, user question, and the steps joined and
    /// ended by `<extra_0>` as the assistant turn. With no steps the
    /// assistant turn is a lone `<extra_0>`, which scores the question alone.
    pub fn encode(&self, question: &str, steps: &[String]) -> Result<Vec<u32>, PrmError> {
        encode_with(&self.tokenizer, self.order, question, steps)
    }

    /// The PRM's tokenizer (what `/pooling` inputs are read with).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Longest input it scores, in tokens (its `max_position_embeddings`).
    pub fn context_length(&self) -> usize {
        self.backbone.max_position()
    }

    /// The 2-class head's P(good) at every `<extra_0>` of an already
    /// formatted input, as vLLM's pooling runner answers `token_classify`.
    pub fn step_probabilities(&self, ids: &[u32]) -> Result<Vec<f32>, PrmError> {
        let at = self.tag_inputs(&[ids], TagPick::All)?;
        let logits = self.relu_layer(&at)?.matmul(&self.classes.0.t()?)?.broadcast_add(&self.classes.1)?;
        Ok(candle_nn::ops::softmax(&logits, D::Minus1)?.i((.., 1))?.to_vec1::<f32>()?)
    }

    /// One score per step (the question alone when `steps` is empty).
    pub fn step_scores(&self, question: &str, steps: &[String]) -> Result<Vec<PrmScore>, PrmError> {
        let ids = self.encode(question, steps)?;
        let at = self.tag_inputs(&[&ids], TagPick::All)?;
        self.head_of_features(&self.relu_layer(&at)?)
    }

    /// What `score.0` reads at the chosen step tags of `seqs`, all in one
    /// forward pass: the final hidden states `(rows, hidden)`, and for a PRM
    /// that reads its own surprisal, [`surprisal::COUNT`] more columns.
    fn tag_inputs(&self, seqs: &[&[u32]], pick: TagPick) -> Result<Tensor, PrmError> {
        let tags: Vec<Vec<usize>> = seqs
            .iter()
            .map(|ids| {
                ids.iter().enumerate().filter(|(_, t)| **t == self.step_token).map(|(i, _)| i).collect()
            })
            .collect();
        if tags.iter().any(Vec::is_empty) {
            return Err(PrmError::NoStepToken);
        }
        let hidden = self.backbone.hidden_states_batch(seqs)?;
        let (mut rows, mut extra) = (Vec::new(), Vec::new());
        let mut offset = 0;
        for (ids, tags) in seqs.iter().zip(&tags) {
            let chosen: &[usize] = match pick {
                TagPick::All => tags,
                TagPick::Last => &tags[tags.len() - 1..],
            };
            rows.extend(chosen.iter().map(|&t| (offset + t) as u32));
            if self.step_features == StepFeatures::HiddenAndSurprisal {
                let own = hidden.narrow(0, offset, ids.len())?;
                let f = self.surprisal_features(ids, &own, tags)?;
                extra.extend(f[f.len() - chosen.len()..].iter().flatten().copied());
            }
            offset += ids.len();
        }
        let at = hidden.index_select(&Tensor::new(rows.as_slice(), hidden.device())?, 0)?;
        if self.step_features == StepFeatures::Hidden {
            return Ok(at);
        }
        let extra = Tensor::from_vec(extra, (rows.len(), surprisal::COUNT), hidden.device())?;
        Ok(Tensor::cat(&[&at, &extra], 1)?)
    }

    /// Surprisal features at every tag of one sequence from its hidden states.
    fn surprisal_features(
        &self,
        ids: &[u32],
        hidden: &Tensor,
        tags: &[usize],
    ) -> Result<Vec<[f32; surprisal::COUNT]>, PrmError> {
        let n = ids.len();
        let logp =
            candle_nn::ops::log_softmax(&self.backbone.lm_logits(&hidden.narrow(0, 0, n - 1)?)?, D::Minus1)?;
        let next = Tensor::new(&ids[1..], hidden.device())?.unsqueeze(1)?;
        let picked = logp.gather(&next, 1)?.flatten_all()?.to_vec1::<f32>()?;
        // surprisal[i] is token i's: nothing predicts the first token.
        let s: Vec<f32> = std::iter::once(0.0).chain(picked.iter().map(|l| -l)).collect();
        let start = surprisal::steps_start(ids, &self.assistant_marker, tags[0]);
        Ok(surprisal::features(&s, start, tags))
    }

    /// `score.0` and its ReLU: the features the output layer reads.
    fn relu_layer(&self, at: &Tensor) -> Result<Tensor, PrmError> {
        Ok(at.matmul(&self.fc1.0.t()?)?.broadcast_add(&self.fc1.1)?.relu()?)
    }

    fn head_of_features(&self, z: &Tensor) -> Result<Vec<PrmScore>, PrmError> {
        let logits = z.matmul(&self.classes.0.t()?)?.broadcast_add(&self.classes.1)?;
        let good = candle_nn::ops::softmax(&logits, D::Minus1)?.i((.., 1))?.to_vec1::<f32>()?;
        let quantiles = match &self.quantiles {
            Some((w, b)) => {
                Some(candle_nn::ops::sigmoid(&z.matmul(&w.t()?)?.broadcast_add(b)?)?.to_vec2::<f32>()?)
            }
            None => None,
        };
        Ok(good
            .iter()
            .enumerate()
            .map(|(i, &p)| PrmScore {
                quantiles: match &quantiles {
                    Some(q) => Quantiles::sorted([q[i][0], q[i][1], q[i][2]]),
                    None => Quantiles::point(p),
                },
                raw: Some(p),
            })
            .collect())
    }

    /// The features the output layer reads, `(items, units)`: `score.0`'s
    /// ReLU activations at each prefix's last step token, all prefixes in
    /// one forward pass. Calibration trains a quantile output layer on them.
    pub fn features(&self, items: &[super::ScoreItem<'_>]) -> Result<Tensor, PrmError> {
        if items.is_empty() {
            return Err(PrmError::Model(crate::model::ModelError::EmptyBatch));
        }
        let encoded: Vec<Vec<u32>> =
            items.iter().map(|i| self.encode(i.question, i.steps)).collect::<Result<_, _>>()?;
        let seqs: Vec<&[u32]> = encoded.iter().map(Vec::as_slice).collect();
        // Each prefix ends with its last step's <extra_0>: the row to score.
        self.relu_layer(&self.tag_inputs(&seqs, TagPick::Last)?)
    }

    /// The 2-class output layer as one logit of P(good): weight `(1, units)`
    /// = w_good − w_bad and bias `(1)` = b_good − b_bad (softmax index 1 of
    /// two logits is the sigmoid of their difference).
    pub fn good_logit(&self) -> Result<(Tensor, Tensor), PrmError> {
        let (w, b) = &self.classes;
        Ok(((w.i(1)? - w.i(0)?)?.unsqueeze(0)?, (b.i(1)? - b.i(0)?)?.unsqueeze(0)?))
    }

    /// The `score.0` layer, saved beside a trained output layer so that the
    /// file is a whole head.
    pub fn first_layer(&self) -> (&Tensor, &Tensor) {
        (&self.fc1.0, &self.fc1.1)
    }
}

/// A quantile head trained by `ponder calibrate`: its 3-row output layer,
/// and its own first layer where it retrained one (else the checkpoint's).
fn trained_head(path: &Path, fc1: (Tensor, Tensor), device: &Device) -> Result<HeadLayers, PrmError> {
    let t = candle_core::safetensors::load(path, device).map_err(|e| file_err(path, e))?;
    let get = |name: &str| -> Result<Tensor, PrmError> {
        Ok(t.get(name).ok_or_else(|| file_err(path, format!("no {name}")))?.to_dtype(DType::F32)?)
    };
    let (w, b) = (get("score.2.weight")?, get("score.2.bias")?);
    if w.dim(0)? != 3 {
        return Err(file_err(path, format!("score.2.weight has {} rows, a quantile head has 3", w.dim(0)?)));
    }
    let fc1 = match (t.get("score.0.weight"), t.get("score.0.bias")) {
        (Some(w1), Some(b1)) => (w1.to_dtype(DType::F32)?, b1.to_dtype(DType::F32)?),
        _ => fc1,
    };
    Ok((fc1, Some((w, b))))
}

/// A head's first layer (weight, bias) and, for a quantile head, its output layer.
type HeadLayers = ((Tensor, Tensor), Option<(Tensor, Tensor)>);

impl super::Scorer for ModelPrm {
    /// Each prefix's last score: its last step's (the question's when
    /// empty). All prefixes go through the backbone in one forward pass.
    /// A prefix longer than the PRM's context, which it cannot read, scores
    /// as a certain failure (and is logged): the policy's context may be
    /// longer than the PRM's, and failing the request would throw away
    /// every sample already drawn.
    fn score(&self, items: &[super::ScoreItem<'_>]) -> Result<Vec<PrmScore>, PrmError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let encoded: Vec<Vec<u32>> =
            items.iter().map(|i| self.encode(i.question, i.steps)).collect::<Result<_, _>>()?;
        let limit = self.context_length();
        let readable: Vec<usize> = (0..encoded.len()).filter(|&k| encoded[k].len() <= limit).collect();
        if readable.len() < encoded.len() {
            let longest = encoded.iter().map(Vec::len).max().unwrap_or(0);
            tracing::warn!(
                prefixes = encoded.len() - readable.len(),
                longest,
                context = limit,
                "prefixes longer than the PRM's context score as failures"
            );
        }
        let mut out = vec![PrmScore { quantiles: Quantiles::point(0.0), raw: Some(0.0) }; encoded.len()];
        if !readable.is_empty() {
            let seqs: Vec<&[u32]> = readable.iter().map(|&k| encoded[k].as_slice()).collect();
            let z = self.relu_layer(&self.tag_inputs(&seqs, TagPick::Last)?)?;
            for (k, score) in readable.into_iter().zip(self.head_of_features(&z)?) {
                out[k] = score;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::NumberOrder;

    #[test]
    fn least_significant_first_reverses_every_run_of_digits_and_nothing_else() {
        let o = NumberOrder::LeastSignificantFirst;
        assert_eq!(o.apply("465 + 41 = 506"), "564 + 14 = 605");
        assert_eq!(o.apply("(12 - 3) * 40?"), "(21 - 3) * 04?");
        assert_eq!(o.apply("The answer is 1200."), "The answer is 0021.");
        assert_eq!(o.apply("no digits"), "no digits");
        assert_eq!(NumberOrder::AsWritten.apply("465"), "465");
    }
}
