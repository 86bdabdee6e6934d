//! `ponder bench engine`: prefill and decode rates of ponder's engine on one
//! model, forked decoding of n trajectories from one prompt, and candle's own
//! model implementation on the same file as the baseline.

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use clap::Args;
use serde::Serialize;

use crate::engine::ModelArgs;
use crate::engine::{
    Engine, EosPolicy, HiddenCapture, Logprobs, SamplingParams, SeqOptions, StopCriteria, child_seed,
};
use crate::model::{Arch, ModelSource};
use crate::tokenizer::AddSpecial;

#[derive(Debug, Args)]
pub struct EngineBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
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
}

const FILLER: &str = "The quick brown fox jumps over the lazy dog. In 1969, 3 astronauts flew 384,400 km \
to the Moon; the trip took about 3 days. Water boils at 100 degrees Celsius at sea level. ";

fn prompt_ids(engine: &Engine, n: usize) -> anyhow::Result<Vec<u32>> {
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
        sampling: SamplingParams { temperature: 0.7, top_p: 1.0, top_k: 0, seed },
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
    let t = Instant::now();
    let mut logits = fwd(prompt, 0)?;
    let prefill = prompt.len() as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..tokens {
        let next = crate::engine::sampling::argmax(&logits);
        logits = fwd(&[next], prompt.len() + i)?;
    }
    let decode = tokens as f64 / t.elapsed().as_secs_f64();
    Ok((name.to_string(), prefill, decode))
}

pub fn run(args: EngineBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.n >= 1 && args.tokens >= 1 && args.prompt_tokens >= 1,
        "--n, --tokens and --prompt-tokens must be at least 1"
    );
    let engine = args.model.load()?;
    let prompt = prompt_ids(&engine, args.prompt_tokens)?;
    let prefill_tok_s = prefill_rate(&engine, &prompt)?;
    let decode_tok_s = decode_rate(&engine, &prompt, 1, args.tokens)?;
    let forked_decode_tok_s = decode_rate(&engine, &prompt, args.n, args.tokens)?;
    let arch = engine.model().config().arch;
    drop(engine);
    let (baseline, baseline_prefill_tok_s, baseline_decode_tok_s) = if args.no_baseline {
        ("none".to_string(), None, None)
    } else {
        let (name, p, d) = baseline(&args.model.model, &prompt, args.tokens)?;
        (format!("{name} ({}, weights as stored)", Arch::name(arch)), Some(p), Some(d))
    };
    let report = EngineBenchReport {
        model: args.model.model.display().to_string(),
        weights: format!("{:?}", args.model.weights).to_lowercase(),
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
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "model            {} (weights {}, threads {})",
            report.model, report.weights, report.threads
        );
        println!("prefill          {:8.1} tok/s  ({} tokens)", report.prefill_tok_s, report.prompt_tokens);
        println!("decode, 1 seq    {:8.1} tok/s  ({} tokens)", report.decode_tok_s, report.tokens);
        println!(
            "decode, {:2} forked {:7.1} tok/s  ({:.2}x single)",
            report.forked_n, report.forked_decode_tok_s, report.forked_speedup
        );
        if let (Some(p), Some(d)) = (report.baseline_prefill_tok_s, report.baseline_decode_tok_s) {
            println!("baseline         {}: prefill {p:.1} tok/s, decode {d:.1} tok/s", report.baseline);
        }
    }
    Ok(())
}
