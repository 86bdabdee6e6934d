//! `ponder generate`: a quick look at a model from the command line.

use std::io::Write;
use std::time::Instant;

use clap::Args;

use super::ModelArgs;
use crate::engine::{
    EosPolicy, HiddenCapture, Logprobs, Penalties, SamplingParams, SeqOptions, StopCriteria, child_seed,
};
use crate::tokenizer::{AddSpecial, ChatMessage};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Number of completions, forked from one prefill.
    #[arg(short = 'n', long, default_value_t = 1)]
    n: usize,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

/// Forks of one prefill `generate` runs at once; each holds its own KV cache.
const MAX_N: usize = 1024;

/// The same ranges a request's sampling fields meet on the server.
fn check(args: &GenerateArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=MAX_N).contains(&args.n), "-n must be between 1 and {MAX_N}, got {}", args.n);
    anyhow::ensure!(args.max_tokens >= 1, "--max-tokens must be at least 1, got {}", args.max_tokens);
    let (lo, hi) = (crate::validation::TEMPERATURE_RANGE.start(), crate::validation::TEMPERATURE_RANGE.end());
    anyhow::ensure!(
        crate::validation::TEMPERATURE_RANGE.contains(&(args.temperature as f64)),
        "--temperature must be between {lo} and {hi}, got {}",
        args.temperature
    );
    anyhow::ensure!(
        args.top_p > 0.0 && args.top_p <= 1.0,
        "--top-p must be above 0 and at most 1, got {}",
        args.top_p
    );
    anyhow::ensure!(args.stop.iter().all(|s| !s.is_empty()), "--stop must not be an empty string");
    Ok(())
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    check(&args)?;
    let t_load = Instant::now();
    let engine = args.model.load()?;
    eprintln!("loaded {} in {:.2}s", args.model.model.display(), t_load.elapsed().as_secs_f64());
    let tok = engine.tokenizer();
    let prompt = if args.chat {
        let text = tok.apply_chat_template(&[ChatMessage::new("user", args.prompt.clone())])?;
        tok.encode(&text, AddSpecial::No)?
    } else {
        tok.encode(&args.prompt, AddSpecial::Yes)?
    };
    let opts = SeqOptions {
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            penalties: Penalties::NONE,
        },
        stop: StopCriteria { max_tokens: args.max_tokens, stop: args.stop.clone(), eos: EosPolicy::Stop },
        logprobs: Logprobs::None,
        capture: HiddenCapture::Never,
    };
    let mut root = engine.start(prompt, opts)?;
    let prompt_len = root.prompt_len();
    let t_prefill = Instant::now();
    while root.cached_len() < prompt_len {
        engine.step(&mut [&mut root])?;
    }
    let prefill_s = t_prefill.elapsed().as_secs_f64();
    let mut seqs = if args.n == 1 {
        vec![root]
    } else {
        let seeds: Vec<u64> = (0..args.n as u64).map(|i| child_seed(args.seed, i)).collect();
        engine.fork(&mut root, &seeds)?
    };
    let stream_out = args.n == 1;
    let t_decode = Instant::now();
    let mut stdout = std::io::stdout().lock();
    while seqs.iter().any(|s| s.is_running()) {
        let mut live: Vec<&mut _> = seqs.iter_mut().filter(|s| s.is_running()).collect();
        let updates = engine.step(&mut live)?;
        if stream_out {
            for u in &updates {
                write!(stdout, "{}", u.delta)?;
            }
            stdout.flush()?;
        }
    }
    let decode_s = t_decode.elapsed().as_secs_f64();
    if stream_out {
        writeln!(stdout)?;
    } else {
        for (i, s) in seqs.iter().enumerate() {
            writeln!(
                stdout,
                "--- completion {i} ({} tokens, {})\n{}",
                s.generated().len(),
                s.finish().map_or("unfinished", |f| f.openai()),
                s.text()
            )?;
        }
    }
    let generated: usize = seqs.iter().map(|s| s.generated().len()).sum();
    eprintln!(
        "prompt {prompt_len} tokens in {prefill_s:.2}s ({:.1} tok/s); generated {generated} tokens in {decode_s:.2}s ({:.1} tok/s over {} sequence(s))",
        prompt_len as f64 / prefill_s,
        generated as f64 / decode_s,
        args.n
    );
    Ok(())
}
