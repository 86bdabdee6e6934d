//! `ponder arith train`: from a seed to ponder-arith's weights, with a
//! progress bar and a loss log. The same seed, step count and thread count
//! give the same weights.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use clap::Args;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::model::{ArithConfig, TrainModel};
use super::task::{self, Problem, Split};
use super::vocab;
use crate::tokenizer::{ChatMessage, ChatTemplate};

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Output directory (an HF checkpoint the engine loads).
    #[arg(long, default_value = "models/ponder-arith")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Optimiser steps.
    #[arg(long, default_value_t = 3000)]
    pub steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 24)]
    pub batch: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 200)]
    pub warmup: usize,
    #[arg(long, default_value_t = 128)]
    pub hidden: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 384)]
    pub intermediate: usize,
    /// Relative share of each level (1..=6) in the training data. Level 1
    /// is learnt quickly; the middle levels need the most steps.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,3,3,2")]
    pub level_weights: Vec<u32>,
    /// Also save the weights every this many steps under `checkpoints/` (0: never).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: usize,
}

impl TrainArgs {
    pub fn config(&self) -> ArithConfig {
        ArithConfig {
            vocab: vocab::vocab_size(),
            hidden: self.hidden,
            layers: self.layers,
            heads: self.heads,
            intermediate: self.intermediate,
            max_position: 1024,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
        }
    }
}

/// One training sequence: chat-formatted question and reference solution,
/// with the positions whose next token is part of the answer.
pub struct Example {
    pub ids: Vec<u32>,
    /// Index of the first answer token.
    pub answer_start: usize,
}

pub struct Encoder {
    tok: tokenizers::Tokenizer,
    template: ChatTemplate,
}

impl Encoder {
    pub fn new() -> anyhow::Result<Self> {
        Self::with_tokenizer(vocab::build().map_err(|e| anyhow::anyhow!("{e}"))?)
    }

    pub fn with_tokenizer(tok: tokenizers::Tokenizer) -> anyhow::Result<Self> {
        Ok(Self { tok, template: ChatTemplate::new(vocab::CHAT_TEMPLATE, "", "<|im_end|>")? })
    }

    pub fn prompt(&self, question: &str) -> anyhow::Result<Vec<u32>> {
        let text = self.template.render(&[ChatMessage::new("user", question)], true)?;
        Ok(self.tok.encode(text, false).map_err(|e| anyhow::anyhow!("{e}"))?.get_ids().to_vec())
    }

    pub fn example(&self, p: &Problem) -> anyhow::Result<Example> {
        let mut ids = self.prompt(&p.question)?;
        let answer_start = ids.len();
        let answer = self.tok.encode(p.solution(), false).map_err(|e| anyhow::anyhow!("{e}"))?;
        ids.extend_from_slice(answer.get_ids());
        ids.push(vocab::EOS);
        Ok(Example { ids, answer_start })
    }
}

/// (inputs, targets, loss mask) for a batch, right-padded.
pub fn batch_tensors(
    examples: &[&Example],
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor, Vec<u32>)> {
    let t = examples.iter().map(|e| e.ids.len() - 1).max().unwrap_or(1);
    let (mut input, mut target, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for e in examples {
        for i in 0..t {
            let inside = i + 1 < e.ids.len();
            input.push(if inside { e.ids[i] } else { vocab::PAD });
            target.push(if inside { e.ids[i + 1] } else { vocab::PAD });
            // Position i predicts token i+1: train only where that is answer text.
            mask.push(u32::from(inside && i + 1 >= e.answer_start));
        }
    }
    let b = examples.len();
    Ok((Tensor::from_vec(input, (b, t), device)?, Tensor::from_vec(target, (b, t), device)?, mask))
}

/// Batches for one pass over a freshly drawn pool: similar lengths together
/// (little padding), batch order shuffled.
fn next_batches(
    enc: &Encoder,
    rng: &mut ChaCha8Rng,
    stream: u64,
    batch: usize,
    weights: &[u32],
) -> anyhow::Result<Vec<Vec<Example>>> {
    let top = *weights.iter().max().expect("weights are validated non-empty");
    let total: u32 = weights.iter().sum();
    // Enough problems per level that about four batches survive the weighting.
    let per_level = (batch * 4 * top as usize).div_ceil(total as usize) + 1;
    let mut pool: Vec<Example> = Vec::new();
    for p in task::generate_seeded(Split::Train, per_level, stream)? {
        // Keep a level-l problem with probability weight_l / max weight.
        if rng.random_range(0..top) < weights[p.level as usize - 1] {
            pool.push(enc.example(&p)?);
        }
    }
    pool.shuffle(rng);
    pool.sort_by_key(|e| e.ids.len());
    let mut batches: Vec<Vec<Example>> = Vec::new();
    let mut it = pool.into_iter().peekable();
    while it.peek().is_some() {
        let chunk: Vec<Example> = it.by_ref().take(batch).collect();
        if chunk.len() == batch {
            batches.push(chunk);
        }
    }
    batches.shuffle(rng);
    Ok(batches)
}

fn lr_at(args: &TrainArgs, step: usize) -> f64 {
    if step < args.warmup {
        return args.lr * (step + 1) as f64 / args.warmup as f64;
    }
    let progress = (step - args.warmup) as f64 / (args.steps - args.warmup).max(1) as f64;
    // Cosine from lr down to a tenth of it.
    args.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
}

/// Scales gradients so their global norm is at most `max`.
pub(crate) fn clip(
    grads: &mut candle_core::backprop::GradStore,
    vars: &[candle_core::Var],
    max: f64,
) -> candle_core::Result<f64> {
    let mut sq = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = sq.sqrt();
    if norm > max {
        let s = max / norm;
        for v in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = (g * s)?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// Training allocates and frees the same large autograd buffers every step.
/// glibc serves blocks over its mmap threshold with fresh mappings and
/// returns them at once, so each step page-faults its buffers anew (a third
/// of a step went to the kernel); keeping freed memory in the heap instead
/// makes a step about 1.5x faster. Only the training commands call this.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; it is called before
    // training allocates, and glibc serialises it against other allocations.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// Refuses flags no training could use, before anything is written.
fn check_args(args: &TrainArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.steps > args.warmup,
        "--steps ({}) must exceed --warmup ({})",
        args.steps,
        args.warmup
    );
    for (flag, v) in [
        ("--batch", args.batch),
        ("--hidden", args.hidden),
        ("--layers", args.layers),
        ("--heads", args.heads),
        ("--intermediate", args.intermediate),
    ] {
        anyhow::ensure!(v >= 1, "{flag} must be at least 1, got {v}");
    }
    anyhow::ensure!(args.lr > 0.0 && args.lr.is_finite(), "--lr must be a positive number, got {}", args.lr);
    anyhow::ensure!(args.hidden.is_multiple_of(args.heads), "--hidden must be a multiple of --heads");
    anyhow::ensure!(
        args.level_weights.len() == 6 && args.level_weights.iter().any(|&w| w > 0),
        "--level-weights needs six weights, not all zero; got {:?}",
        args.level_weights
    );
    Ok(())
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    check_args(&args)?;
    keep_freed_memory();
    let device = Device::Cpu;
    let cfg = args.config();
    let model = TrainModel::new(cfg, args.seed, &device)?;
    std::fs::create_dir_all(&args.out)
        .map_err(|e| anyhow::anyhow!("--out {}: cannot create the directory: {e}", args.out.display()))?;
    let tokenizer = vocab::build().map_err(|e| anyhow::anyhow!("{e}"))?;
    vocab::write_files(&args.out, &tokenizer)?;
    let enc = Encoder::with_tokenizer(tokenizer)?;
    let vars = model.vars();
    let mut opt =
        AdamW::new(vars.clone(), ParamsAdamW { lr: args.lr, weight_decay: 0.01, ..Default::default() })?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0xA11CE);
    let mut log = std::fs::File::create(args.out.join("train_log.jsonl"))?;
    let bar = indicatif::ProgressBar::new(args.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} ETA {eta} {msg}")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    bar.println(format!(
        "ponder-arith: {} parameters, {} steps of {} sequences",
        cfg.parameters(),
        args.steps,
        args.batch
    ));
    let start = Instant::now();
    let (mut batches, mut stream) = (Vec::new(), 0u64);
    let mut ema = None::<f64>;
    for step in 0..args.steps {
        if batches.is_empty() {
            batches = next_batches(&enc, &mut rng, stream, args.batch, &args.level_weights)?;
            stream += 1;
        }
        let examples = batches.pop().expect("next_batches returns at least one batch");
        let refs: Vec<&Example> = examples.iter().collect();
        let (input, target, mask) = batch_tensors(&refs, &device)?;
        let loss = model.loss(&input, &target, &mask)?;
        let value = loss.to_scalar::<f32>()? as f64;
        let mut grads = loss.backward()?;
        let norm = clip(&mut grads, &vars, 1.0)?;
        let lr = lr_at(&args, step);
        opt.set_learning_rate(lr);
        opt.step(&grads)?;
        ema = Some(ema.map_or(value, |e| 0.98 * e + 0.02 * value));
        let secs = start.elapsed().as_secs_f64();
        writeln!(
            log,
            "{}",
            serde_json::json!({"step": step, "loss": value, "grad_norm": norm, "lr": lr, "secs": secs})
        )?;
        bar.set_message(format!("loss {:.4}", ema.unwrap_or(value)));
        bar.inc(1);
        if args.checkpoint_every > 0 && (step + 1) % args.checkpoint_every == 0 && step + 1 < args.steps {
            let dir = args.out.join("checkpoints");
            std::fs::create_dir_all(&dir)?;
            model.save(&dir.join(format!("step-{}.safetensors", step + 1)))?;
        }
    }
    bar.finish();
    write_outputs(&args, &model, cfg, start)
}

fn write_outputs(
    args: &TrainArgs,
    model: &TrainModel,
    cfg: ArithConfig,
    start: Instant,
) -> anyhow::Result<()> {
    model.save(&args.out.join("model.safetensors"))?;
    std::fs::write(
        args.out.join("config.json"),
        serde_json::to_string_pretty(&cfg.hf_config(vocab::EOS, vocab::EOS))?,
    )?;
    std::fs::write(
        args.out.join("train_args.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "seed": args.seed, "steps": args.steps, "batch": args.batch,
            "lr": args.lr, "warmup": args.warmup, "level_weights": args.level_weights,
            "config": cfg, "minutes": start.elapsed().as_secs_f64() / 60.0,
        }))?,
    )?;
    println!("wrote {} in {:.1} minutes", args.out.display(), start.elapsed().as_secs_f64() / 60.0);
    Ok(())
}
