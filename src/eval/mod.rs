//! `ponder eval`: a model on the arithmetic task (or any JSONL of
//! questions and answers) — per-sample accuracy and the spread of
//! per-question success, or best-of-N and beam search with a PRM, fixed or
//! adaptive, and a sweep replaying one run as the accuracy-vs-tokens
//! frontier of fixed budgets and every budget rule.

mod bootstrap;
mod frontier;
mod plot;
mod points;
mod samples;
mod search;
pub use search::step_offline;
mod sweep;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;

use crate::arith::task::{self, Split};
use crate::config::{Config, Overrides, PrmConfig};
use crate::engine::{Engine, EngineOptions};
use crate::model::WeightFormat;
use crate::prm::Scorer;
use crate::prm::head::HeadOutput;
use crate::reasoning::{BudgetRule, Select, Strategy};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A model id from the configuration, or a model path.
    #[arg(long)]
    pub model: String,
    /// Configuration file that lists model ids (defaults are built in).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Split::Test)]
    pub split: Split,
    /// Questions from a JSONL file of {question, answer[, level, id]} instead of a split.
    #[arg(long)]
    pub jsonl: Option<PathBuf>,
    /// Problems per level (six levels) of the split.
    #[arg(long, default_value_t = 50)]
    pub per_level: usize,
    /// single: independent samples each scored; best_of_n and beam: one answer per question.
    #[arg(long, value_enum, default_value_t = Strategy::Single)]
    pub strategy: Strategy,
    /// Samples per question (single).
    #[arg(long, default_value_t = 16)]
    pub samples: usize,
    /// Budget from the PRM (by `--budget-rule`) or fixed.
    #[arg(long, action = clap::ArgAction::Set, default_value_t = true)]
    pub adaptive: bool,
    /// N_max.
    #[arg(long, default_value_t = 64)]
    pub max_samples: usize,
    /// C [default: the one served for a model with a PRM: 0.9, beam search 0.99].
    #[arg(long)]
    pub confidence: Option<f64>,
    #[arg(long, default_value_t = 0.1)]
    pub budget_quantile: f64,
    /// How an adaptive budget is set (`--sweep` replays every rule instead);
    /// the default is the one served for a model with a PRM.
    #[arg(long = "budget-rule", value_enum, default_value_t = BudgetRule::GiveUp)]
    pub rule: BudgetRule,
    /// Samples per round (rules that draw in rounds); beam search: each search's initial and kept
    /// paths [default: the served one: 2, beam search 4].
    #[arg(long)]
    pub round_size: Option<usize>,
    /// give_up: the least expected gain of another round worth drawing [default: the served
    /// one: 0.05, beam search 0.01].
    #[arg(long)]
    pub give_up_gain: Option<f64>,
    /// give_up (best-of-N): no giving up once a finished sample's raw PRM score exceeds this
    /// (1: off) [default: the served one: 0.03].
    #[arg(long)]
    pub give_up_plausible: Option<f64>,
    /// M_max.
    #[arg(long, default_value_t = 8)]
    pub beam_width: usize,
    /// K_max.
    #[arg(long, default_value_t = 8)]
    pub beams: usize,
    #[arg(long, default_value_t = 1)]
    pub prune_every: usize,
    #[arg(long, value_enum, default_value_t = Select::PrmMax)]
    pub select: Select,
    /// Which head answers as the PRM: the calibrated quantiles or the raw score.
    #[arg(long, value_enum, default_value_t = HeadOutput::Calibrated)]
    pub prm: HeadOutput,
    /// The PRM head file (default: the model's configured `prm`, else MODEL_DIR/prm_head.safetensors).
    #[arg(long)]
    pub prm_path: Option<PathBuf>,
    /// Replay one best-of-N_max run as the fixed best-of-N curve, pass@N and every budget
    /// rule with the raw, calibrated and oracle estimates: accuracy against tokens.
    #[arg(long)]
    pub sweep: bool,
    /// With --sweep: write accuracy against tokens (the fixed curve, pass@N and each rule's
    /// frontier) as an SVG here.
    #[arg(long, value_name = "PATH")]
    pub plot: Option<PathBuf>,
    /// With --sweep: also write the fixed run itself here, one JSON line per question
    /// (its estimate alone, every candidate with its scores and whether it is right).
    #[arg(long, value_name = "PATH")]
    pub questions_out: Option<PathBuf>,
    /// With --sweep: replay a run written by --questions-out instead of generating one.
    #[arg(long, value_name = "PATH")]
    pub questions_in: Option<PathBuf>,
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tokens per sample.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Questions decoded together.
    #[arg(long, default_value_t = 8)]
    pub concurrent: usize,
    #[arg(long)]
    pub json: bool,
}

/// A question with its reference answer.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalProblem {
    pub id: String,
    /// 0 when the source has no levels.
    pub level: u8,
    pub question: String,
    pub answer: String,
}

impl EvalProblem {
    pub fn is_correct(&self, text: &str) -> bool {
        crate::reasoning::select::answer_key(text) == self.answer
    }
}

fn problems(args: &EvalArgs) -> anyhow::Result<Vec<EvalProblem>> {
    let Some(path) = &args.jsonl else {
        return Ok(task::generate(args.split, args.per_level)?
            .into_iter()
            .map(|p| EvalProblem {
                id: p.id,
                level: p.level,
                question: p.question,
                answer: p.answer.to_string(),
            })
            .collect());
    };
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
            let question = v["question"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("{}:{}: no \"question\" string", path.display(), i + 1))?;
            let answer = match &v["answer"] {
                serde_json::Value::String(s) => crate::reasoning::select::answer_key(s),
                serde_json::Value::Number(n) => n.to_string(),
                _ => anyhow::bail!("{}:{}: no \"answer\"", path.display(), i + 1),
            };
            Ok(EvalProblem {
                id: v["id"].as_str().map_or_else(|| format!("line-{}", i + 1), str::to_string),
                level: v["level"].as_u64().unwrap_or(0) as u8,
                question: question.to_string(),
                answer,
            })
        })
        .collect()
}

pub fn resolve(model: &str, config: Option<&Path>) -> anyhow::Result<(PathBuf, WeightFormat)> {
    resolve_entry(model, config).map(|(p, w, _)| (p, w))
}

/// Path, weight format and PRM of a model id (or a path taken as is).
pub(crate) fn resolve_entry(
    model: &str,
    config: Option<&Path>,
) -> anyhow::Result<(PathBuf, WeightFormat, Option<PrmConfig>)> {
    let cfg = Config::load(config, std::iter::empty(), &Overrides::default())?;
    Ok(match cfg.models.iter().find(|m| m.id == model) {
        Some(m) => (m.path.clone(), m.weights, m.prm.clone()),
        None => (PathBuf::from(model), WeightFormat::Auto, None),
    })
}

/// The PRM answering as `output`, for the policy `engine` runs.
pub(crate) fn load_prm(
    prm: &PrmConfig,
    engine: &Engine,
    output: HeadOutput,
) -> anyhow::Result<Arc<dyn Scorer>> {
    crate::prm::load(prm, engine.model().config().hidden, output).map_err(|e| anyhow::anyhow!("PRM: {e}"))
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.samples >= 1 && args.per_level >= 1, "--samples and --per-level must be at least 1");
    check_knobs(&args)?;
    let range = crate::validation::TEMPERATURE_RANGE;
    anyhow::ensure!(
        range.contains(&(args.temperature as f64)),
        "--temperature must be between {} and {}, got {}",
        range.start(),
        range.end(),
        args.temperature
    );
    anyhow::ensure!(args.max_tokens >= 1, "--max-tokens must be at least 1, got 0");
    anyhow::ensure!(
        (args.plot.is_none() && args.questions_out.is_none() && args.questions_in.is_none()) || args.sweep,
        "--plot, --questions-out and --questions-in belong to the sweep: add --sweep"
    );
    let (path, weights, configured_prm) = resolve_entry(&args.model, args.config.as_deref())?;
    let engine = Engine::load(&path, weights, &candle_core::Device::Cpu, EngineOptions::default())
        .map_err(|e| anyhow::anyhow!("loading {}: {e}", path.display()))?;
    let problems = problems(&args)?;
    if args.strategy == Strategy::Single && !args.sweep {
        return samples::run(&engine, &problems, &args);
    }
    let prm = args
        .prm_path
        .clone()
        .map(PrmConfig::Head)
        .or(configured_prm)
        .unwrap_or_else(|| PrmConfig::Head(path.join("prm_head.safetensors")));
    let engine = Arc::new(engine);
    if args.sweep {
        sweep::sweep(engine, &prm, &problems, &args)
    } else {
        search::run(engine, &prm, &problems, &args)
    }
}

/// The most sequences one question may hold at once in `ponder eval`
/// (N_max, the beam's paths, a round): far above the served default
/// (`queue.max_running`, 64), low enough that a mistyped flag fails at once
/// instead of exhausting memory.
pub const MAX_SEQUENCES: usize = 1024;

/// The reasoning flags against the ranges a request's `reasoning` object
/// meets in the server, the error naming the flag, its range and the value.
fn check_knobs(args: &EvalArgs) -> anyhow::Result<()> {
    let own = args.round_knobs(args.strategy);
    let values = crate::reasoning::knobs::KnobValues {
        max_samples: args.max_samples as i64,
        beam_width: args.beam_width as i64,
        beams: args.beams as i64,
        prune_every: args.prune_every as i64,
        confidence: own.confidence,
        budget_quantile: args.budget_quantile,
        round_size: own.round_size as i64,
        give_up_gain: own.give_up_gain,
        give_up_plausible: args.plausible(),
    };
    let naming = crate::reasoning::knobs::Naming::Flags;
    crate::reasoning::knobs::check(values, MAX_SEQUENCES)
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!(e.message(naming)))
}

/// The question source, for reports.
pub(crate) fn source_name(args: &EvalArgs) -> String {
    match &args.jsonl {
        Some(p) => p.display().to_string(),
        None => args.split.name().to_string(),
    }
}

impl EvalArgs {
    /// C, the round size and the gain floor as given, else the served
    /// defaults for `strategy`.
    pub(crate) fn round_knobs(&self, strategy: Strategy) -> crate::reasoning::knobs::RoundKnobs {
        let d = crate::config::ReasoningDefaults::default().round_knobs(strategy);
        crate::reasoning::knobs::RoundKnobs {
            confidence: self.confidence.unwrap_or(d.confidence),
            round_size: self.round_size.unwrap_or(d.round_size),
            give_up_gain: self.give_up_gain.unwrap_or(d.give_up_gain),
        }
    }

    /// `give_up_plausible` as given, else the served default.
    pub(crate) fn plausible(&self) -> f64 {
        self.give_up_plausible.unwrap_or(crate::config::ReasoningDefaults::default().give_up_plausible)
    }
}
