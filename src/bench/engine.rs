//! `ponder bench engine`: prefill and decode rates of ponder's engine on one
//! model (a file, or random weights of a published shape built on the
//! device), forked decoding of n trajectories from one prompt, the
//! memory-bandwidth floor of a decode step, and candle's own model
//! implementation on the same file as the baseline.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::Args;
use serde::Serialize;

use crate::device::DeviceKind;
use crate::engine::{
    Engine, EngineOptions, EosPolicy, HiddenCapture, Logprobs, SamplingParams, SeqOptions, StopCriteria,
    child_seed,
};
use crate::model::{Arch, AttentionPath, ModelSource, RandomShape, WeightFormat, random};
use crate::tokenizer::{AddSpecial, Tokenizer};

#[derive(Debug, Args)]
pub struct EngineBenchArgs {
    /// A GGUF file, an HF directory (config.json + *.safetensors), or a directory with one GGUF.
    #[arg(long, required_unless_present = "random_shape", conflicts_with = "random_shape")]
    model: Option<PathBuf>,
    /// Random weights of a published shape (qwen2.5-1.5b, qwen2.5-7b; tiny for checks),
    /// generated on the device instead of read from a file.
    #[arg(long, value_enum)]
    random_shape: Option<RandomShape>,
    /// Weight storage: auto (Q8_0 for quantized files and f32 otherwise on the CPU, bf16 on a GPU),
    /// stored, q8_0, f32, f16, bf16.
    #[arg(long, value_enum, default_value_t = WeightFormat::Auto)]
    weights: WeightFormat,
    /// Where the engine runs: "cpu" or "cuda:N".
    #[arg(long, default_value = "cpu")]
    device: DeviceKind,
    /// Attention path: auto (host for CPU f32, device otherwise), host, device.
    #[arg(long, value_enum, default_value_t = AttentionPath::Auto)]
    attention: AttentionPath,
    /// Trajectories forked from one prompt.
    #[arg(long, default_value_t = 16)]
    n: usize,
    /// Tokens decoded per sequence.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    /// Skip candle's baseline model.
    #[arg(long)]
    no_baseline: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
pub struct EngineBenchReport {
    pub model: String,
    pub weights: String,
    pub device: String,
    /// "host" or "device".
    pub attention: String,
    /// Activations and KV cache.
    pub dtype: String,
    pub threads: String,
    pub prompt_tokens: usize,
    pub tokens: usize,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub forked_decode_tok_s: f64,
    pub forked_n: usize,
    /// forked / single-sequence decode rate.
    pub forked_speedup: f64,
    pub baseline: String,
    pub baseline_prefill_tok_s: Option<f64>,
    pub baseline_decode_tok_s: Option<f64>,
    pub floor: BandwidthFloor,
}

/// What a decode step must read, over how fast the device copies memory:
/// the rate no implementation can beat at this context length.
#[derive(Debug, Serialize)]
pub struct BandwidthFloor {
    /// Weight bytes a step reads (every projection and the output head).
    pub weight_bytes: usize,
    /// KV bytes one sequence's step reads, at the mean context of the decode runs.
    pub kv_bytes_per_seq: usize,
    /// Measured device-to-device copy rate (bytes read + written per second).
    pub copy_bytes_s: f64,
    /// Single-sequence decode floor: copy rate / (weights + one KV).
    pub decode_tok_s: f64,
    /// The measured single-sequence decode over its floor.
    pub decode_fraction: f64,
    /// Floor for n forks: n / ((weights + n KV) / copy rate).
    pub forked_decode_tok_s: f64,
    pub forked_fraction: f64,
}

const FILLER: &str = "The quick brown fox jumps over the lazy dog. In 1969, 3 astronauts flew 384,400 km \
to the Moon; the trip took about 3 days. Water boils at 100 degrees Celsius at sea level. ";

fn prompt_ids(engine: &Engine, n: usize, random_weights: bool) -> anyhow::Result<Vec<u32>> {
    if random_weights {
        // The numbered tokenizer reads no text; any ids do for random weights.
        let vocab = engine.model().config().vocab as u64;
        return Ok((0..n as u64).map(|i| ((i * 7919 + 13) % vocab) as u32).collect());
    }
    let tok = engine.tokenizer();
    let mut text = String::new();
    let mut ids = Vec::new();
    while ids.len() < n {
        text.push_str(FILLER);
        ids = tok.encode(&text, AddSpecial::Yes)?;
    }
    ids.truncate(n);
    Ok(ids)
}

fn options(tokens: usize, seed: u64) -> SeqOptions {
    SeqOptions {
        sampling: SamplingParams::sampled(0.7, seed),
        stop: StopCriteria { max_tokens: tokens, stop: Vec::new(), eos: EosPolicy::Ignore },
        logprobs: Logprobs::None,
        capture: HiddenCapture::Never,
    }
}

/// Seconds to decode `tokens` steps for `n` sequences forked from one
/// prefilled prompt (n = 1: the prompt's own sequence).
fn decode_rate(engine: &Engine, prompt: &[u32], n: usize, tokens: usize) -> anyhow::Result<f64> {
    let mut root = engine.start(prompt.to_vec(), options(tokens, 1))?;
    while root.cached_len() < prompt.len() {
        engine.step(&mut [&mut root])?;
    }
    let mut seqs = if n == 1 {
        vec![root]
    } else {
        let seeds: Vec<u64> = (0..n as u64).map(|i| child_seed(1, i)).collect();
        engine.fork(&mut root, &seeds)?
    };
    let t = Instant::now();
    let mut generated = 0;
    while seqs.iter().any(|s| s.is_running()) {
        let mut live: Vec<&mut _> = seqs.iter_mut().filter(|s| s.is_running()).collect();
        generated += engine.step(&mut live)?.iter().filter(|u| u.token.is_some()).count();
    }
    Ok(generated as f64 / t.elapsed().as_secs_f64())
}

fn prefill_rate(engine: &Engine, prompt: &[u32]) -> anyhow::Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let mut seq = engine.start(prompt.to_vec(), options(1, 0))?;
        let t = Instant::now();
        while seq.cached_len() < prompt.len() {
            engine.step(&mut [&mut seq])?;
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(prompt.len() as f64 / best)
}

/// candle_transformers' own implementation of the same file: (name, prefill tok/s, decode tok/s).
fn baseline(path: &Path, prompt: &[u32], tokens: usize) -> anyhow::Result<(String, f64, f64)> {
    use candle_transformers::models::{quantized_llama, quantized_qwen2};
    let dev = Device::Cpu;
    let source = ModelSource::detect(path)?;
    let ModelSource::Gguf(file) = source else {
        anyhow::bail!("the candle baseline is measured on GGUF files");
    };
    let mut f = std::fs::File::open(&file)?;
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f)?;
    let arch = ct.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned();
    enum M {
        Llama(quantized_llama::ModelWeights),
        Qwen2(quantized_qwen2::ModelWeights),
    }
    let (name, mut m) = match arch.as_deref() {
        Some("qwen2") => {
            ("candle quantized_qwen2", M::Qwen2(quantized_qwen2::ModelWeights::from_gguf(ct, &mut f, &dev)?))
        }
        _ => {
            ("candle quantized_llama", M::Llama(quantized_llama::ModelWeights::from_gguf(ct, &mut f, &dev)?))
        }
    };
    let mut fwd = |ids: &[u32], pos: usize| -> anyhow::Result<Vec<f32>> {
        let x = Tensor::new(ids, &dev)?.unsqueeze(0)?;
        let logits = match &mut m {
            M::Llama(m) => m.forward(&x, pos)?,
            M::Qwen2(m) => m.forward(&x, pos)?,
        };
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    };
    // Best of three, as ponder's own prefill is measured (a forward pass at
    // position 0 starts candle's caches afresh).
    let mut best = f64::MAX;
    let mut logits = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        logits = fwd(prompt, 0)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let prefill = prompt.len() as f64 / best;
    let t = Instant::now();
    for i in 0..tokens {
        let next = crate::engine::sampling::argmax(&logits);
        logits = fwd(&[next], prompt.len() + i)?;
    }
    let decode = tokens as f64 / t.elapsed().as_secs_f64();
    Ok((name.to_string(), prefill, decode))
}

/// Device-to-device copy rate of `device`, bytes read plus written per
/// second: the best of five copies of a buffer far larger than any cache.
fn copy_rate(device: &Device) -> anyhow::Result<f64> {
    let elems = if device.is_cpu() { 16 << 20 } else { 256 << 20 };
    // Not zeros: a zeroed buffer on the CPU can be the kernel's one shared
    // zero page, which stays in cache and reads far faster than memory.
    let src = Tensor::ones(elems, DType::F32, device)?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        device.synchronize()?;
        let t = Instant::now();
        let copy = src.copy()?;
        device.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
        drop(copy);
    }
    Ok(2.0 * (elems * 4) as f64 / best)
}

fn load(args: &EngineBenchArgs, device: &Device) -> anyhow::Result<Engine> {
    let opts = EngineOptions { attention: args.attention, ..EngineOptions::default() };
    match (&args.model, args.random_shape) {
        (_, Some(shape)) => {
            let model = random::random_llama(shape, args.weights, device)?.with_attention(args.attention)?;
            let tokenizer = Tokenizer::numbered(model.config().vocab)?;
            Ok(Engine::new(model, tokenizer, opts))
        }
        (Some(path), None) => Engine::load(path, args.weights, device, opts)
            .map_err(|e| anyhow::anyhow!("loading {}: {e}", path.display())),
        (None, None) => anyhow::bail!("--model or --random-shape names the model"),
    }
}

fn floor(
    engine: &Engine,
    device: &Device,
    args: &EngineBenchArgs,
    rates: (f64, f64),
) -> anyhow::Result<BandwidthFloor> {
    let model = engine.model();
    let cfg = model.config();
    let weight_bytes = model.weight_bytes();
    let mean_len = args.prompt_tokens + args.tokens / 2;
    let kv_bytes_per_seq = 2 * cfg.n_layers * cfg.kv_dim() * model.dtype().size_in_bytes() * mean_len;
    let copy_bytes_s = copy_rate(device)?;
    let decode = copy_bytes_s / (weight_bytes + kv_bytes_per_seq) as f64;
    let n = args.n as f64;
    let forked = n * copy_bytes_s / (weight_bytes as f64 + n * kv_bytes_per_seq as f64);
    Ok(BandwidthFloor {
        weight_bytes,
        kv_bytes_per_seq,
        copy_bytes_s,
        decode_tok_s: decode,
        decode_fraction: rates.0 / decode,
        forked_decode_tok_s: forked,
        forked_fraction: rates.1 / forked,
    })
}

pub fn run(args: EngineBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.n >= 1 && args.tokens >= 1 && args.prompt_tokens >= 1,
        "--n, --tokens and --prompt-tokens must be at least 1"
    );
    let device = args.device.open().map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let engine = load(&args, &device)?;
    let prompt = prompt_ids(&engine, args.prompt_tokens, args.random_shape.is_some())?;
    // Warm-up: a GPU loads kernels and sets up cuBLAS on first use.
    decode_rate(&engine, &prompt, 2, 2)?;
    let prefill_tok_s = prefill_rate(&engine, &prompt)?;
    let decode_tok_s = decode_rate(&engine, &prompt, 1, args.tokens)?;
    let forked_decode_tok_s = decode_rate(&engine, &prompt, args.n, args.tokens)?;
    let floor = floor(&engine, &device, &args, (decode_tok_s, forked_decode_tok_s))?;
    let arch = engine.model().config().arch;
    let (attention, dtype) = (engine.model().attention(), engine.model().dtype());
    drop(engine);
    let file = args.model.as_ref().filter(|_| device.is_cpu());
    let (baseline, baseline_prefill_tok_s, baseline_decode_tok_s) = match file {
        Some(path) if !args.no_baseline => {
            let (name, p, d) = baseline(path, &prompt, args.tokens)?;
            (format!("{name} ({}, weights as stored)", Arch::name(arch)), Some(p), Some(d))
        }
        _ => ("none".to_string(), None, None),
    };
    let model = match (&args.model, args.random_shape) {
        (_, Some(shape)) => format!("random {}", shape.name()),
        (Some(path), None) => path.display().to_string(),
        (None, None) => unreachable!("load() refused a run without a model"),
    };
    let report = EngineBenchReport {
        model,
        weights: args.weights.name().to_string(),
        device: args.device.to_string(),
        attention: format!("{attention:?}").to_lowercase(),
        dtype: format!("{dtype:?}").to_lowercase(),
        threads: candle_core::utils::get_num_threads().to_string(),
        prompt_tokens: prompt.len(),
        tokens: args.tokens,
        prefill_tok_s,
        decode_tok_s,
        forked_decode_tok_s,
        forked_n: args.n,
        forked_speedup: forked_decode_tok_s / decode_tok_s,
        baseline,
        baseline_prefill_tok_s,
        baseline_decode_tok_s,
        floor,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(report: &EngineBenchReport) {
    println!(
        "model            {} (weights {}, {} on {}, {} attention, threads {})",
        report.model, report.weights, report.dtype, report.device, report.attention, report.threads
    );
    println!("prefill          {:8.1} tok/s  ({} tokens)", report.prefill_tok_s, report.prompt_tokens);
    println!("decode, 1 seq    {:8.1} tok/s  ({} tokens)", report.decode_tok_s, report.tokens);
    println!(
        "decode, {:2} forked {:7.1} tok/s  ({:.2}x single)",
        report.forked_n, report.forked_decode_tok_s, report.forked_speedup
    );
    let f = &report.floor;
    println!(
        "bandwidth floor  {:8.1} tok/s single ({:.0}% reached), {:.1} tok/s forked ({:.0}%); {:.1} GB/s copy, {:.1} MB weights",
        f.decode_tok_s,
        100.0 * f.decode_fraction,
        f.forked_decode_tok_s,
        100.0 * f.forked_fraction,
        f.copy_bytes_s / 1e9,
        f.weight_bytes as f64 / 1e6
    );
    if let (Some(p), Some(d)) = (report.baseline_prefill_tok_s, report.baseline_decode_tok_s) {
        println!("baseline         {}: prefill {p:.1} tok/s, decode {d:.1} tok/s", report.baseline);
    }
}
