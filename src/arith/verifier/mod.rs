//! `ponder arith train-prm`: a verifier PRM for ponder-arith in the
//! Qwen2.5-Math-PRM format (a llama backbone, a `score` head Linear → ReLU →
//! Linear(2) read at each `<extra_0>` that ends a step), trained from the
//! policy's own sampled trajectories on the train split.
//!
//! Its labels are those common PRMs are trained on (Math-Shepherd): a prefix
//! is good (1) if any of its N_MC Monte-Carlo continuations reaches the right
//! answer, else bad (0); a finished solution is good if its answer is right.
//! The loss is the binary cross-entropy of the 2-class head. Hard labels
//! call a prefix good when one continuation in N_MC succeeds, so this raw
//! PRM overestimates the success probability as the paper describes;
//! `ponder calibrate --prm-model` then fits its quantile head.
//!
//! The backbone starts from the policy's own weights (as Qwen2.5-Math-PRM
//! starts from Qwen2.5-Math-Instruct): it already reads the task's text and
//! numbers, and only has to learn to judge them.

pub mod data;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use clap::Args;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::model::{ArithConfig, TrainModel};
use super::task::{self, Split};
use crate::arith::vocab::PAD;
use crate::calibrate::labels::{self, LabelConfig, LabelRow, Source};
use crate::engine::{Engine, EngineOptions};
use crate::model::WeightFormat;
use crate::prm::model_prm::{STEP_TOKEN, StepFeatures};
use crate::prm::surprisal;
use crate::tokenizer::Tokenizer;
use data::{Batch, Example, Marks};

/// ChatML for the verifier: the system turn (Qwen2.5-Math-PRM's fixed
/// prompt) is left out, so the question and the steps read as the policy
/// saw them; `<extra_0>` ends every step.
pub const VERIFIER_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] != 'system' %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}";

#[derive(Debug, Clone, Args)]
pub struct TrainPrmArgs {
    /// The policy whose trajectories are judged (an HF checkpoint directory).
    #[arg(long, default_value = "models/ponder-arith")]
    pub policy: PathBuf,
    /// Output directory (a Qwen2.5-Math-PRM-format checkpoint).
    #[arg(long, default_value = "models/ponder-arith-verifier")]
    pub out: PathBuf,
    /// Train-split questions per level (six levels) the trajectories are drawn for.
    #[arg(long, default_value_t = 400)]
    pub per_level: usize,
    /// Trajectories per question (N_val).
    #[arg(long, default_value_t = 8)]
    pub n_val: usize,
    /// Continuations per prefix (N_MC) for the hard labels.
    #[arg(long, default_value_t = 8)]
    pub n_mc: usize,
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Questions labelled together.
    #[arg(long, default_value_t = 8)]
    pub concurrent: usize,
    /// The labels file (resumable; default OUT/labels_train.jsonl).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Optimiser steps on synthetic worked solutions alone, first.
    #[arg(long, default_value_t = 600)]
    pub pretrain_steps: usize,
    /// Optimiser steps after those, alternating the policy's trajectories and synthetic solutions.
    #[arg(long, default_value_t = 600)]
    pub steps: usize,
    /// Trajectories per step.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Synthetic solutions per step.
    #[arg(long, default_value_t = 64)]
    pub synthetic_batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 50)]
    pub warmup: usize,
    /// Validate every this many steps (on one question in ten, held out).
    #[arg(long, default_value_t = 100)]
    pub eval_every: usize,
}

/// The verifier's tokenizer: the policy's, with `<extra_0>` added as a
/// special token at the end of its vocabulary, and the verifier template.
pub fn write_tokenizer(policy: &Path, out: &Path) -> anyhow::Result<()> {
    let path = policy.join("tokenizer.json");
    let mut tok =
        tokenizers::Tokenizer::from_file(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    tok.add_special_tokens([tokenizers::AddedToken::from(STEP_TOKEN, true)])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tok.save(out.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfg = serde_json::json!({
        "chat_template": VERIFIER_CHAT_TEMPLATE,
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": false,
        "model_max_length": 1024,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "ponder_number_order": data::ORDER,
        "ponder_assistant_prefix": data::ASSISTANT_PREFIX,
    });
    std::fs::write(out.join("tokenizer_config.json"), serde_json::to_string_pretty(&cfg)?)?;
    Ok(())
}

/// The verifier being trained: the policy's backbone (its embedding grown
/// by the `<extra_0>` row) and the score head.
pub struct Verifier {
    pub backbone: TrainModel,
    head: [(String, Var); 4],
}

impl Verifier {
    /// From the policy's checkpoint: every backbone weight as trained, the
    /// new `<extra_0>` embedding a copy of the newline's (the step
    /// delimiter it stands in for), and a fresh score head.
    pub fn from_policy(policy: &Path, newline: u32, seed: u64, device: &Device) -> anyhow::Result<Self> {
        let hf: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(policy.join("config.json"))?)?;
        let get = |k: &str| {
            hf[k].as_u64().map(|v| v as usize).ok_or_else(|| anyhow::anyhow!("config.json: no {k}"))
        };
        let cfg = ArithConfig {
            vocab: get("vocab_size")? + 1,
            hidden: get("hidden_size")?,
            layers: get("num_hidden_layers")?,
            heads: get("num_attention_heads")?,
            intermediate: get("intermediate_size")?,
            max_position: get("max_position_embeddings")?,
            rope_theta: hf["rope_theta"].as_f64().unwrap_or(10_000.0) as f32,
            rms_eps: hf["rms_norm_eps"].as_f64().unwrap_or(1e-5),
        };
        let mut tensors = candle_core::safetensors::load(policy.join("model.safetensors"), device)?;
        let emb = tensors
            .remove("model.embed_tokens.weight")
            .ok_or_else(|| anyhow::anyhow!("{}: no model.embed_tokens.weight", policy.display()))?;
        let extra = emb.narrow(0, newline as usize, 1)?;
        tensors.insert("model.embed_tokens.weight".into(), Tensor::cat(&[&emb, &extra], 0)?);
        let params = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, Var::from_tensor(&t)?)))
            .collect::<candle_core::Result<_>>()?;
        let backbone = TrainModel::with_params(cfg, params, device)?;
        let h = cfg.hidden;
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0005_C07E);
        let mut normal = |shape: &[usize], std: f64| -> candle_core::Result<Var> {
            let dist = Normal::new(0.0, std).expect("a positive std is valid");
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|_| dist.sample(&mut rng) as f32).collect();
            Var::from_tensor(&Tensor::from_vec(data, shape, device)?)
        };
        // He initialisation for the ReLU layer; small outputs, so training
        // starts near P(good) = 1/2 everywhere.
        let head = [
            ("score.0.weight".to_string(), normal(&[h, h + surprisal::COUNT], (2.0 / h as f64).sqrt())?),
            ("score.0.bias".to_string(), Var::zeros(h, DType::F32, device)?),
            ("score.2.weight".to_string(), normal(&[2, h], 0.01)?),
            ("score.2.bias".to_string(), Var::zeros(2, DType::F32, device)?),
        ];
        Ok(Self { backbone, head })
    }

    pub fn vars(&self) -> Vec<Var> {
        let mut v = self.backbone.vars();
        v.extend(self.head.iter().map(|(_, var)| var.clone()));
        v
    }

    /// The two class logits `(tags, 2)` at the batch's step tags, and the
    /// LM logits `(positions, vocab)` at its LM positions (when it has any).
    /// The score head reads the hidden state and the surprisal features at
    /// each tag, exactly as [`crate::prm::model_prm::ModelPrm`] serves it;
    /// the surprisals are inputs (no gradient flows back through them).
    pub fn forward(&self, b: &Batch, examples: &[&Example]) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let (n, t) = b.ids.dims2()?;
        let h = self.backbone.config().hidden;
        let hidden = self.backbone.hidden(&b.ids)?.reshape((n * t, h))?;
        let logits = hidden.matmul(&self.backbone.embedding().t()?)?;
        let surprisal = self.surprisal_inputs(&logits.detach(), b, examples)?;
        let at = Tensor::cat(&[&hidden.index_select(&b.tag_rows, 0)?, &surprisal], 1)?;
        let [(_, w1), (_, b1), (_, w2), (_, b2)] = &self.head;
        let z = at.matmul(&w1.as_tensor().t()?)?.broadcast_add(b1.as_tensor())?.relu()?;
        let classes = z.matmul(&w2.as_tensor().t()?)?.broadcast_add(b2.as_tensor())?;
        let lm = match &b.lm_rows {
            Some((rows, _)) => Some(logits.index_select(rows, 0)?),
            None => None,
        };
        Ok((classes, lm))
    }

    /// The surprisal features `(tags, COUNT)` at the labelled tags of the batch.
    fn surprisal_inputs(
        &self,
        logits: &Tensor,
        b: &Batch,
        examples: &[&Example],
    ) -> candle_core::Result<Tensor> {
        let (n, t) = b.ids.dims2()?;
        let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        // The next token of every position (the last one's is padding, unused).
        let ids = b.ids.to_vec2::<u32>()?;
        let next: Vec<u32> = ids.iter().flat_map(|row| row[1..].iter().copied().chain([PAD])).collect();
        let picked = logp
            .gather(&Tensor::from_vec(next, (n * t, 1), logits.device())?, 1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut out = Vec::new();
        for (i, e) in examples.iter().enumerate() {
            // surprisal[k] is token k's, from the row before it.
            let s: Vec<f32> = std::iter::once(0.0)
                .chain(picked[i * t..i * t + e.ids.len() - 1].iter().map(|l| -l))
                .collect();
            let f = surprisal::features(&s, e.steps_start, &e.all_tags);
            for &(pos, _) in &e.tags {
                let j = e.all_tags.iter().position(|&a| a == pos).expect("labelled tags are tags");
                out.extend(f[j]);
            }
        }
        Tensor::from_vec(out, (b.labels.dim(0)?, surprisal::COUNT), logits.device())
    }

    /// The step tags' cross-entropy plus the result digits' next-token
    /// cross-entropy; also the first alone.
    pub fn loss(&self, b: &Batch, examples: &[&Example]) -> candle_core::Result<(Tensor, f64)> {
        let (classes, lm) = self.forward(b, examples)?;
        let tags = candle_nn::loss::cross_entropy(&classes, &b.labels)?;
        let tag_value = tags.to_scalar::<f32>()? as f64;
        let total = match (lm, &b.lm_rows) {
            (Some(logits), Some((_, targets))) => (tags + candle_nn::loss::cross_entropy(&logits, targets)?)?,
            _ => tags,
        };
        Ok((total, tag_value))
    }

    /// `model.safetensors` (backbone and `score.*`) and `config.json`.
    pub fn save(&self, out: &Path, eos: u32) -> anyhow::Result<()> {
        let mut tensors: HashMap<String, Tensor> =
            self.backbone.named_vars().iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        tensors.extend(self.head.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())));
        candle_core::safetensors::save(&tensors, out.join("model.safetensors"))?;
        let mut cfg = self.backbone.config().hf_config(eos, eos);
        cfg["architectures"] = serde_json::json!(["LlamaForProcessRewardModel"]);
        cfg["num_labels"] = serde_json::json!(2);
        cfg["ponder_step_features"] = serde_json::json!(StepFeatures::HiddenAndSurprisal);
        std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
        Ok(())
    }
}

/// Held-out figures: the tags' mean loss, and how often the best-scored
/// finished solution of a question is right, among the questions with at
/// least one right and one wrong (what best-of-N selection needs).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Validation {
    pub loss: f64,
    pub selection: f64,
    pub contested: usize,
    /// Synthetic step tags judged right.
    pub synthetic_accuracy: f64,
}

pub fn validate(model: &Verifier, val: &[Example], device: &Device) -> anyhow::Result<Validation> {
    let (mut loss_sum, mut tags) = (0.0, 0usize);
    // Per question: the best final P(good), whether that one is right, and
    // whether the question has a right and a wrong solution.
    let mut best: HashMap<&str, (f32, bool, bool, bool)> = HashMap::new();
    for chunk in val.chunks(64) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let b = data::batch(&refs, device)?;
        let (logits, _) = model.forward(&b, &refs)?;
        let count = b.labels.dim(0)?;
        loss_sum +=
            candle_nn::loss::cross_entropy(&logits, &b.labels)?.to_scalar::<f32>()? as f64 * count as f64;
        tags += count;
        let good = candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
        let labels = b.labels.to_vec1::<u32>()?;
        let mut at = 0;
        for e in chunk {
            at += e.tags.len();
            if !e.finished || e.tags.is_empty() {
                continue;
            }
            let (p, right) = (good[at - 1][1], labels[at - 1] == 1);
            let entry = best.entry(e.question_id.as_str()).or_insert((f32::MIN, false, false, false));
            if p > entry.0 {
                (entry.0, entry.1) = (p, right);
            }
            entry.2 |= right;
            entry.3 |= !right;
        }
    }
    let contested: Vec<_> = best.values().filter(|b| b.2 && b.3).collect();
    Ok(Validation {
        loss: loss_sum / tags.max(1) as f64,
        selection: contested.iter().filter(|b| b.1).count() as f64 / contested.len().max(1) as f64,
        contested: contested.len(),
        synthetic_accuracy: f64::NAN,
    })
}

/// One pass over the training sequences: batches of similar lengths (a
/// level-6 solution is three times as long as a level-1 one, and a batch
/// pads to its longest), in random order.
fn epoch(train: &[Example], batch: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..train.len()).collect();
    order.shuffle(rng);
    order.sort_by_key(|&i| train[i].ids.len());
    let mut batches: Vec<Vec<usize>> = order.chunks(batch.max(1)).map(<[usize]>::to_vec).collect();
    batches.shuffle(rng);
    batches
}

/// Linear warm-up, then cosine down to a twentieth.
fn lr_at(lr: f64, warmup: usize, steps: usize, step: usize) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
    lr * (0.05 + 0.95 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
}

/// The policy's MC labels on the train split (collected once, resumable).
fn train_labels(args: &TrainPrmArgs, problems: &[task::Problem]) -> anyhow::Result<Vec<LabelRow>> {
    let engine = Engine::load(&args.policy, WeightFormat::Auto, &Device::Cpu, EngineOptions::default())
        .map_err(|e| anyhow::anyhow!("loading {}: {e}", args.policy.display()))?;
    let cfg = LabelConfig {
        n_val: args.n_val,
        n_mc: args.n_mc,
        temperature: args.temperature,
        seed: args.seed,
        ..Default::default()
    };
    let path = args.labels.clone().unwrap_or_else(|| args.out.join("labels_train.jsonl"));
    labels::collect(&Source::Local(&engine), problems, &cfg, &path, args.concurrent)
}

/// Fresh synthetic sequences for one batch: train-split problems from
/// stream `stream`, of one level (`None`: every level alike), so that a
/// batch of one level pads little.
fn synthetic_batch(
    size: usize,
    stream: u64,
    level: Option<u8>,
    tok: &Tokenizer,
    marks: &Marks,
    rng: &mut ChaCha8Rng,
) -> anyhow::Result<Vec<Example>> {
    let per_level = if level.is_some() { size } else { size.div_ceil(6) };
    let mut problems = task::generate_seeded(Split::Train, per_level, stream)?;
    problems.retain(|p| level.is_none_or(|l| p.level == l));
    let mut out = data::synthetic(&problems, tok, marks, rng)?;
    out.shuffle(rng);
    out.truncate(size);
    Ok(out)
}

/// The share of synthetic step tags judged right (P(good) on the right
/// side of 1/2), and that share per level.
fn synthetic_accuracy(
    model: &Verifier,
    val: &[(u8, Example)],
    device: &Device,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let mut by_level = [(0usize, 0usize); 6];
    for chunk in val.chunks(128) {
        let refs: Vec<&Example> = chunk.iter().map(|(_, e)| e).collect();
        let b = data::batch(&refs, device)?;
        let (logits, _) = model.forward(&b, &refs)?;
        let guess = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let labels = b.labels.to_vec1::<u32>()?;
        let mut at = 0;
        for (level, e) in chunk {
            let n = e.tags.len();
            let right = guess[at..at + n].iter().zip(&labels[at..at + n]).filter(|(g, l)| g == l).count();
            let slot = &mut by_level[*level as usize - 1];
            (slot.0, slot.1) = (slot.0 + right, slot.1 + n);
            at += n;
        }
    }
    let (right, total) = by_level.iter().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let per_level = by_level.iter().map(|(r, t)| *r as f64 / (*t).max(1) as f64).collect();
    Ok((right as f64 / total.max(1) as f64, per_level))
}

/// What training reads: the verifier's tokenizer, the policy's labelled
/// trajectories split into training and held-out sequences, and held-out
/// synthetic solutions with their levels.
struct Prepared {
    tok: Tokenizer,
    marks: Marks,
    train: Vec<Example>,
    val: Vec<Example>,
    synthetic_val: Vec<(u8, Example)>,
    labelled_rows: usize,
    questions: usize,
    label_minutes: f64,
}

fn prepare(args: &TrainPrmArgs, rng: &mut ChaCha8Rng, start: Instant) -> anyhow::Result<Prepared> {
    std::fs::create_dir_all(&args.out)
        .map_err(|e| anyhow::anyhow!("--out {}: cannot create the directory: {e}", args.out.display()))?;
    let problems = task::generate(Split::Train, args.per_level)?;
    let rows = train_labels(args, &problems)?;
    let label_minutes = start.elapsed().as_secs_f64() / 60.0;
    write_tokenizer(&args.policy, &args.out)?;
    let tok = Tokenizer::from_hf_dir(&args.out)?;
    let marks = Marks::new(&tok)?;
    let questions: HashMap<String, String> =
        problems.iter().map(|p| (p.id.clone(), p.question.clone())).collect();
    let all = data::from_labels(&rows, &questions, &tok, &marks)?;
    // One question in ten is held out, chosen by hash so the split is stable.
    let (val, train): (Vec<Example>, Vec<Example>) =
        all.into_iter().partition(|e| labels::qhash(&e.question_id).is_multiple_of(10));
    anyhow::ensure!(!train.is_empty() && !val.is_empty(), "too few labelled questions to train and validate");
    // 100 held-out synthetic solutions per level, from a stream no batch uses.
    let synthetic_val: Vec<(u8, Example)> = {
        let problems = task::generate_seeded(Split::Train, 100, u64::MAX - 1)?;
        let examples = data::synthetic(&problems, &tok, &marks, rng)?;
        let mut val: Vec<(u8, Example)> = problems.iter().map(|p| p.level).zip(examples).collect();
        val.shuffle(rng);
        val
    };
    Ok(Prepared {
        tok,
        marks,
        train,
        val,
        synthetic_val,
        labelled_rows: rows.len(),
        questions: problems.len(),
        label_minutes,
    })
}

fn progress_bar(len: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} ETA {eta} {msg}")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    bar
}

/// The optimisation loop's state: where the next batches come from.
struct Batches<'a> {
    data: &'a Prepared,
    epoch: Vec<Vec<usize>>,
    stream: u64,
    owned: Vec<Example>,
}

impl<'a> Batches<'a> {
    /// The batch of step `step`: synthetic solutions alone for the first
    /// `pretrain` steps, then every other batch.
    fn next(
        &mut self,
        step: usize,
        args: &TrainPrmArgs,
        rng: &mut ChaCha8Rng,
    ) -> anyhow::Result<(bool, Vec<&Example>)> {
        let synthetic = step < args.pretrain_steps || (step - args.pretrain_steps) % 2 == 1;
        if synthetic {
            // Levels in turn; the longer solutions of higher levels hold more steps to learn from.
            let level = task::LEVELS.start() + (self.stream % 6) as u8;
            let d = self.data;
            self.owned =
                synthetic_batch(args.synthetic_batch, self.stream, Some(level), &d.tok, &d.marks, rng)?;
            self.stream += 1;
            return Ok((true, self.owned.iter().collect()));
        }
        if self.epoch.is_empty() {
            self.epoch = epoch(&self.data.train, args.batch, rng);
        }
        let picked = self.epoch.pop().expect("an epoch has at least one batch");
        Ok((false, picked.iter().map(|&i| &self.data.train[i]).collect()))
    }
}

/// Refuses flags no training could use, before anything is written.
fn check_args(args: &TrainPrmArgs) -> anyhow::Result<()> {
    let total_steps = args.pretrain_steps + args.steps;
    anyhow::ensure!(
        total_steps > args.warmup,
        "--pretrain-steps + --steps ({total_steps}) must exceed --warmup ({})",
        args.warmup
    );
    for (flag, v) in [
        ("--per-level", args.per_level),
        ("--batch", args.batch),
        ("--synthetic-batch", args.synthetic_batch),
        ("--n-val", args.n_val),
        ("--n-mc", args.n_mc),
    ] {
        anyhow::ensure!(v >= 1, "{flag} must be at least 1, got {v}");
    }
    // Monte-Carlo labels need sampled continuations, as `ponder calibrate`'s do.
    let hi = *crate::validation::TEMPERATURE_RANGE.end() as f32;
    anyhow::ensure!(
        args.temperature > 0.0 && args.temperature <= hi,
        "--temperature must be above 0 and at most {hi}, got {}",
        args.temperature
    );
    anyhow::ensure!(args.lr > 0.0 && args.lr.is_finite(), "--lr must be a positive number, got {}", args.lr);
    Ok(())
}

pub fn run(args: TrainPrmArgs) -> anyhow::Result<()> {
    check_args(&args)?;
    super::train::keep_freed_memory();
    let total_steps = args.pretrain_steps + args.steps;
    let start = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x7E41F);
    let data = prepare(&args, &mut rng, start)?;
    let device = Device::Cpu;
    let newline = data.tok.encode("\n", crate::tokenizer::AddSpecial::No)?;
    anyhow::ensure!(
        newline.len() == 1,
        "the policy's tokenizer splits a newline into {} tokens",
        newline.len()
    );
    let model = Verifier::from_policy(&args.policy, newline[0], args.seed, &device)?;
    let vars = model.vars();
    let mut opt =
        AdamW::new(vars.clone(), ParamsAdamW { lr: args.lr, weight_decay: 0.01, ..Default::default() })?;
    let mut log = std::fs::File::create(args.out.join("train_log.jsonl"))?;
    let bar = progress_bar(total_steps);
    let tags: usize = data.train.iter().map(|e| e.tags.len()).sum();
    bar.println(format!(
        "verifier: {} labelled rows of {} questions in {:.1} min; {} trajectories ({tags} step tags) to train, {} held out; {} synthetic steps first",
        data.labelled_rows,
        data.questions,
        data.label_minutes,
        data.train.len(),
        data.val.len(),
        args.pretrain_steps
    ));
    let mut batches = Batches { data: &data, epoch: Vec::new(), stream: 1, owned: Vec::new() };
    let (mut ema, mut last_val) = (None::<f64>, None);
    for step in 0..total_steps {
        let (synthetic, picked) = batches.next(step, &args, &mut rng)?;
        let (loss, tag_loss) = model.loss(&data::batch(&picked, &device)?, &picked)?;
        let value = loss.to_scalar::<f32>()? as f64;
        let mut grads = loss.backward()?;
        let norm = super::train::clip(&mut grads, &vars, 1.0)?;
        let lr = lr_at(args.lr, args.warmup, total_steps, step);
        opt.set_learning_rate(lr);
        opt.step(&grads)?;
        if !synthetic {
            ema = Some(ema.map_or(tag_loss, |e| 0.95 * e + 0.05 * tag_loss));
        }
        let mut entry = serde_json::json!({"step": step, "synthetic": synthetic, "loss": value, "tag_loss": tag_loss,
            "grad_norm": norm, "lr": lr, "secs": start.elapsed().as_secs_f64()});
        if (step + 1) % args.eval_every.max(1) == 0 || step + 1 == total_steps {
            let (synthetic, by_level) = synthetic_accuracy(&model, &data.synthetic_val, &device)?;
            let v = Validation { synthetic_accuracy: synthetic, ..validate(&model, &data.val, &device)? };
            entry["synthetic_accuracy_by_level"] = serde_json::to_value(by_level)?;
            entry["val"] = serde_json::to_value(v)?;
            last_val = Some(v);
        }
        writeln!(log, "{entry}")?;
        bar.set_message(match last_val {
            Some(v) => format!(
                "trajectory loss {:.4} | held out: loss {:.4}, selection {:.3}, synthetic steps {:.3}",
                ema.unwrap_or(f64::NAN),
                v.loss,
                v.selection,
                v.synthetic_accuracy
            ),
            None => format!("loss {value:.4}"),
        });
        bar.inc(1);
    }
    bar.finish();
    model.save(&args.out, data.tok.eos_id().unwrap_or(super::vocab::EOS))?;
    let minutes = start.elapsed().as_secs_f64() / 60.0;
    write_train_args(&args, &data, last_val, minutes)?;
    println!("wrote {} in {minutes:.1} minutes", args.out.display());
    Ok(())
}

/// `train_args.json`: the arguments, the data's sizes, the last held-out
/// validation and the minutes it took.
fn write_train_args(
    args: &TrainPrmArgs,
    data: &Prepared,
    last_val: Option<Validation>,
    minutes: f64,
) -> anyhow::Result<()> {
    std::fs::write(
        args.out.join("train_args.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "policy": args.policy, "per_level": args.per_level, "n_val": args.n_val, "n_mc": args.n_mc,
            "temperature": args.temperature, "seed": args.seed, "pretrain_steps": args.pretrain_steps,
            "steps": args.steps, "batch": args.batch, "synthetic_batch": args.synthetic_batch,
            "lr": args.lr, "warmup": args.warmup, "train_sequences": data.train.len(),
            "val_sequences": data.val.len(), "labelled_rows": data.labelled_rows, "validation": last_val,
            "minutes": {"labels": data.label_minutes, "total": minutes},
        }))?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arith::vocab;

    /// A tiny policy checkpoint with ponder-arith's tokenizer, and the
    /// verifier's tokenizer beside it.
    fn tiny_policy() -> (tempfile::TempDir, Tokenizer, u32) {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy");
        std::fs::create_dir_all(&policy).unwrap();
        let tok = vocab::build().unwrap();
        vocab::write_files(&policy, &tok).unwrap();
        let cfg = ArithConfig {
            vocab: vocab::vocab_size(),
            hidden: 16,
            layers: 1,
            heads: 2,
            intermediate: 32,
            max_position: 256,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
        };
        TrainModel::new(cfg, 1, &Device::Cpu).unwrap().save(&policy.join("model.safetensors")).unwrap();
        let hf = cfg.hf_config(vocab::EOS, vocab::EOS);
        std::fs::write(policy.join("config.json"), serde_json::to_string(&hf).unwrap()).unwrap();
        write_tokenizer(&policy, dir.path()).unwrap();
        let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
        let newline = tok.encode("\n", crate::tokenizer::AddSpecial::No).unwrap()[0];
        (dir, tok, newline)
    }

    #[test]
    fn every_weight_of_the_verifier_gets_a_gradient() {
        let (dir, tok, newline) = tiny_policy();
        let marks = Marks::new(&tok).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let model = Verifier::from_policy(&dir.path().join("policy"), newline, 0, &Device::Cpu).unwrap();
        let examples = synthetic_batch(6, 3, Some(4), &tok, &marks, &mut rng).unwrap();
        let refs: Vec<&Example> = examples.iter().collect();
        let b = data::batch(&refs, &Device::Cpu).unwrap();
        assert!(b.lm_rows.is_some(), "synthetic steps carry next-token targets");
        let (loss, tags) = model.loss(&b, &refs).unwrap();
        assert!(tags.is_finite() && tags > 0.0);
        let grads = loss.backward().unwrap();
        // The CPU kernels candle's model code uses have no backward pass
        // (zero gradients, no error): every variable must move.
        for v in model.vars() {
            let g = grads.get(v.as_tensor()).expect("every variable is in the graph");
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "a variable of shape {:?} got no gradient", v.as_tensor().dims());
        }
    }

    #[test]
    fn the_verifier_reads_what_the_served_prm_reads() {
        let (dir, tok, newline) = tiny_policy();
        let model = Verifier::from_policy(&dir.path().join("policy"), newline, 0, &Device::Cpu).unwrap();
        model.save(dir.path(), vocab::EOS).unwrap();
        let prm = crate::prm::model_prm::ModelPrm::load(
            dir.path(),
            &crate::prm::model_prm::ModelPrmOptions {
                head: crate::prm::model_prm::HeadChoice::TwoClass,
                lora: None,
            },
        )
        .unwrap();
        let marks = Marks::new(&tok).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let problems = task::generate_seeded(Split::Train, 1, 2).unwrap();
        let examples = data::synthetic(&problems, &tok, &marks, &mut rng).unwrap();
        for e in &examples {
            let b = data::batch(&[e], &Device::Cpu).unwrap();
            let (logits, _) = model.forward(&b, &[e]).unwrap();
            let trained = candle_nn::ops::softmax(&logits, D::Minus1).unwrap().to_vec2::<f32>().unwrap();
            let served = prm.step_probabilities(&e.ids).unwrap();
            assert_eq!(served.len(), trained.len());
            for (s, t) in served.iter().zip(&trained) {
                assert!((s - t[1]).abs() < 1e-4, "served {served:?} vs trained {trained:?}");
            }
        }
    }
}
