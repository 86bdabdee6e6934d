//! The `ponder` command line: argument parsing and dispatch to the
//! subcommands. Each subcommand lives in its own module.

mod generate;
mod serve;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

pub use crate::engine::ModelArgs;

#[derive(Debug, Parser)]
#[command(name = "ponder", version, about = "An inference server that thinks as hard as each question needs")]
pub struct Cli {
    /// Compute threads (candle's pool). On 2-vCPU machines 1 is often fastest.
    #[arg(long, global = true, env = "PONDER_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the configured models over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Generate completions for one prompt and report tokens/s.
    Generate(generate::GenerateArgs),
    /// Measure performance.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Accuracy on the arithmetic task: per level, and the spread of per-question success.
    Eval(Box<crate::eval::EvalArgs>),
    /// Calibrate a model's PRM head: Monte-Carlo labels, quantile head, baselines, report.
    Calibrate(crate::calibrate::run::CalibrateArgs),
    /// The ponder-arith task and model: train it, export splits.
    #[command(subcommand)]
    Arith(ArithCommand),
}

#[derive(Debug, Subcommand)]
enum ArithCommand {
    /// Train ponder-arith from a seed (writes an HF checkpoint).
    Train(crate::arith::train::TrainArgs),
    /// Train a verifier PRM for ponder-arith from the policy's own sampled trajectories.
    TrainPrm(crate::arith::verifier::TrainPrmArgs),
    /// Write a split as JSONL: {id, level, question, answer} per line.
    Export(ExportArgs),
}

#[derive(Debug, Args)]
struct ExportArgs {
    #[arg(long, value_enum)]
    split: crate::arith::task::Split,
    /// Problems per level (six levels).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    per_level: u64,
    /// 0: the questions `ponder eval --split` reads. N > 0: questions of the
    /// same split from another seed, none of them among stream 0's at the
    /// same --per-level (new questions to check a result on).
    #[arg(long, default_value_t = 0)]
    stream: u64,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Prefill, single-sequence decode, forked decode, and candle's own model as a baseline.
    Engine(crate::bench::engine::EngineBenchArgs),
    /// Load `ponder serve` (started as a second process) over loopback: throughput, p50/p99 latency.
    Server(crate::bench::server::ServerBenchArgs),
    /// Best-of-N reasoning (adaptive and fixed) on ponder-arith over loopback, and plain TTFT beside it.
    Reasoning(crate::bench::reasoning::ReasoningBenchArgs),
    /// A mixed load (reasoning, plain, abandoned requests) for some minutes: RSS, statuses, cancellations.
    Soak(crate::bench::soak::SoakBenchArgs),
}

/// Sets the compute thread count before any pool starts.
pub(crate) fn set_threads(threads: usize) {
    // SAFETY: called from `main` before any runtime or pool thread exists,
    // so no concurrent environment access can race with this write. candle
    // sizes its pools from RAYON_NUM_THREADS when they first start.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.max(1).to_string()) };
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Only commands that print and talk to no server or child: a bench or
    // a calibration over HTTP must not die on a peer's closed socket, and
    // a bench killed by the signal would leave its `ponder serve` running.
    if matches!(cli.command, Command::Eval(_) | Command::Arith(_) | Command::Generate(_)) {
        end_quietly_on_a_closed_pipe();
    }
    if let Some(t) = cli.threads {
        set_threads(t);
    }
    let result = match cli.command {
        Command::Serve(args) => serve::run(args, cli.threads),
        Command::Generate(args) => generate::run(args),
        Command::Bench(BenchCommand::Engine(args)) => crate::bench::engine::run(args),
        Command::Bench(BenchCommand::Server(args)) => crate::bench::server::run(args),
        Command::Bench(BenchCommand::Reasoning(args)) => crate::bench::reasoning::run(args),
        Command::Bench(BenchCommand::Soak(args)) => crate::bench::soak::run(args),
        Command::Eval(args) => crate::eval::run(*args),
        Command::Calibrate(args) => crate::calibrate::run::run(args),
        Command::Arith(ArithCommand::Train(args)) => crate::arith::train::run(args),
        Command::Arith(ArithCommand::TrainPrm(args)) => crate::arith::verifier::run(args),
        Command::Arith(ArithCommand::Export(a)) => {
            let problems = match a.stream {
                0 => crate::arith::task::generate(a.split, a.per_level as usize),
                n => crate::arith::task::generate_unseen(a.split, a.per_level as usize, n),
            };
            problems.map_err(anyhow::Error::from).and_then(|p| {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                out.write_all(crate::arith::task::to_jsonl(&p).as_bytes())
                    .and_then(|()| out.flush())
                    .map_err(|e| anyhow::anyhow!("writing the questions to stdout: {e}"))
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Rust ignores SIGPIPE, so `ponder eval … | head` would panic in `println!`
/// once `head` closes the pipe; a command-line tool should end quietly, as
/// `cat` does.
fn end_quietly_on_a_closed_pipe() {
    // SAFETY: restores one signal's default disposition; called before any
    // thread starts, and no handler of ours is replaced.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
