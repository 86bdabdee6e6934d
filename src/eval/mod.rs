//! `ponder eval`: a model on the arithmetic task (or any JSONL of
//! questions and answers) — per-sample accuracy and the spread of
//! per-question success, or best-of-N and beam search with a PRM, fixed or
//! adaptive, and a sweep replaying one run as the accuracy-vs-tokens
//! frontier of fixed budgets and every budget rule.

mod bootstrap;
mod flags;
mod frontier;
mod output;
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
use crate::config::{Config, Overrides, PrmConfig, ReasoningDefaults};
use crate::engine::{Engine, EngineOptions};
use crate::model::WeightFormat;
use crate::prm::Scorer;
use crate::prm::head::HeadOutput;
use crate::reasoning::{BudgetRule, Select, Strategy};

/// The flags. Those whose use depends on the strategy are options, so that
/// a flag given where nothing reads it is an error rather than ignored
/// (clap's conflicts never count a default); their defaults are in
/// [`EvalArgs`]' accessors.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A model id from the configuration, or a model path. The reasoning flags left out take
    /// a configured model's `[models.reasoning]`, and a path's the built-in defaults (given
    /// below).
    #[arg(long)]
    pub model: String,
    /// Configuration file that lists model ids (defaults are built in).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Split::Test)]
    pub split: Split,
    /// Questions from a JSONL file of {question, answer[, level, id]} instead of a split.
    #[arg(long, conflicts_with_all = ["split", "per_level"])]
    pub jsonl: Option<PathBuf>,
    /// Problems per level (six levels) of the split.
    #[arg(long, default_value_t = 50)]
    pub per_level: usize,
    /// single: independent samples each scored; best_of_n and beam: one answer per question
    /// [default: single; with --sweep, best_of_n].
    #[arg(long, value_enum)]
    pub strategy: Option<Strategy>,
    /// Samples per question (single) [default: 16].
    #[arg(long)]
    pub samples: Option<usize>,
    /// Budget from the PRM (by `--budget-rule`) or fixed [default: true].
    #[arg(long, action = clap::ArgAction::Set)]
    pub adaptive: Option<bool>,
    /// N_max [default: the model's, built in 64; with --questions-in, the run's samples per question].
    #[arg(long)]
    pub max_samples: Option<usize>,
    /// C [default: the model's; built in 0.9, beam search 0.99].
    #[arg(long)]
    pub confidence: Option<f64>,
    /// The quantile of the PRM's estimate the rules read [default: the model's; built in 0.1].
    #[arg(long)]
    pub budget_quantile: Option<f64>,
    /// How an adaptive budget is set (`--sweep` replays every rule instead)
    /// [default: the model's; built in give_up; vote for a model without a PRM].
    #[arg(long = "budget-rule", value_enum)]
    pub rule: Option<BudgetRule>,
    /// Samples per round (rules that draw in rounds); beam search: each search's initial and kept
    /// paths [default: the model's; built in 2, beam search 4].
    #[arg(long)]
    pub round_size: Option<usize>,
    /// give_up: the least expected gain of another round worth drawing [default: the model's;
    /// built in 0.05, beam search 0.01].
    #[arg(long)]
    pub give_up_gain: Option<f64>,
    /// give_up (best-of-N): no giving up once a finished sample's raw PRM score exceeds this
    /// (1: off) [default: the model's; built in 0.03].
    #[arg(long)]
    pub give_up_plausible: Option<f64>,
    /// M_max (beam) [default: the model's; built in 8].
    #[arg(long)]
    pub beam_width: Option<usize>,
    /// K_max (beam) [default: the model's; built in 8].
    #[arg(long)]
    pub beams: Option<usize>,
    /// Steps between prunings (beam) [default: the model's; built in 1].
    #[arg(long)]
    pub prune_every: Option<usize>,
    /// The answer chosen among the samples [default: the model's; built in prm_max;
    /// majority for a model without a PRM].
    #[arg(long, value_enum)]
    pub select: Option<Select>,
    /// Which head answers as the PRM: the calibrated quantiles or the raw score
    /// [default: calibrated].
    #[arg(long, value_enum)]
    pub prm: Option<HeadOutput>,
    /// The PRM head file (default: the model's configured `prm`, else MODEL_DIR/prm_head.safetensors
    /// when the model is a directory holding one).
    #[arg(long)]
    pub prm_path: Option<PathBuf>,
    /// Replay one best-of-N_max run as the fixed best-of-N curve, pass@N and every budget
    /// rule with the raw, calibrated and oracle estimates: accuracy against tokens.
    #[arg(long, conflicts_with_all = [
        "samples", "adaptive", "confidence", "rule", "round_size", "give_up_gain",
        "give_up_plausible", "beam_width", "beams", "prune_every", "prm",
    ])]
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
    #[arg(long, value_name = "PATH", conflicts_with_all = [
        "split", "jsonl", "per_level", "temperature", "seed", "samples", "adaptive",
        "max_tokens", "concurrent", "prm_path",
    ])]
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
    /// The model's served reasoning defaults, which the flags left out take:
    /// its `[models.reasoning]` when `--model` is a configured id, else the
    /// built-in ones. Set by [`run`] from the configuration.
    #[arg(skip)]
    pub defaults: ReasoningDefaults,
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

    /// A candidate is right when it stated an answer and that answer is
    /// this problem's: a path cut off before its answer is wrong even when
    /// the last number it wrote happens to match.
    pub fn is_right(&self, c: &crate::reasoning::Candidate) -> bool {
        c.has_answer() && self.is_correct(&c.text)
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
    let problems = parse_problems(path, &text)?;
    // Every figure is a share of the questions: none would print NaN.
    anyhow::ensure!(!problems.is_empty(), "no questions in {} (--jsonl)", path.display());
    Ok(problems)
}

/// A numeric `answer` as answers are keyed: an integral float (`42.0`) as
/// the integer, since a model's `42` is keyed `"42"`.
fn number_answer(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if n.as_i64().is_none() && f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 => {
            format!("{}", f as i64)
        }
        _ => n.to_string(),
    }
}

/// The questions of a JSONL file's `text`, blank lines skipped.
fn parse_problems(path: &Path, text: &str) -> anyhow::Result<Vec<EvalProblem>> {
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
                serde_json::Value::Number(n) => number_answer(n),
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

/// What the configuration says of a model id; a path not listed there is
/// taken as is, with the built-in reasoning defaults (the server's rule for
/// `--model ID=PATH`).
pub(crate) struct Entry {
    pub(crate) path: PathBuf,
    pub(crate) weights: WeightFormat,
    pub(crate) prm: Option<PrmConfig>,
    pub(crate) reasoning: ReasoningDefaults,
}

/// Reads only the configuration file: no model is loaded.
pub(crate) fn resolve_entry(model: &str, config: Option<&Path>) -> anyhow::Result<Entry> {
    let cfg = Config::load(config, std::iter::empty(), &Overrides::default())?;
    Ok(match cfg.models.iter().find(|m| m.id == model) {
        Some(m) => {
            Entry { path: m.path.clone(), weights: m.weights, prm: m.prm.clone(), reasoning: m.reasoning }
        }
        None => Entry {
            path: PathBuf::from(model),
            weights: WeightFormat::Auto,
            prm: None,
            reasoning: ReasoningDefaults::default(),
        },
    })
}

/// The PRM `ponder eval` uses: `--prm-path`, else the model's configured
/// one, else a head `ponder calibrate` wrote beside a model directory — the
/// server's rule for `--model ID=PATH` (a GGUF file has nothing beside it
/// to look in). None: the model has no PRM.
fn model_prm(prm_path: Option<&Path>, model: &Path, configured: Option<PrmConfig>) -> Option<PrmConfig> {
    prm_path
        .map(|p| PrmConfig::Head(p.to_path_buf()))
        .or(configured)
        .or_else(|| Some(model.join("prm_head.safetensors")).filter(|p| p.is_file()).map(PrmConfig::Head))
}

/// The PRM answering as `output`, for the policy `engine` runs.
pub(crate) fn load_prm(
    prm: &PrmConfig,
    engine: &Engine,
    output: HeadOutput,
) -> anyhow::Result<Arc<dyn Scorer>> {
    crate::prm::load(prm, engine.model().config().hidden, output).map_err(|e| anyhow::anyhow!("PRM: {e}"))
}

/// Every flag is checked, and every output file opened, before a model is
/// loaded or a question read: a mistake fails at once, not after the run.
pub fn run(mut args: EvalArgs) -> anyhow::Result<()> {
    flags::check(&args)?;
    let entry = resolve_entry(&args.model, args.config.as_deref())?;
    // The flags left out take the model's served defaults.
    args.defaults = entry.reasoning;
    check_knobs(&args)?;
    let outputs = output::SweepOutputs::open(&args)?;
    if let Some(path) = &args.questions_in {
        // Nothing to generate: the run is in the file.
        return sweep::replay(path, outputs, &args);
    }
    let Entry { path, weights, prm: configured_prm, .. } = entry;
    let prm = model_prm(args.prm_path.as_deref(), &path, configured_prm);
    let choice = flags::choose(&args, prm.is_some())?;
    let problems = problems(&args)?;
    let engine = Engine::load(&path, weights, &candle_core::Device::Cpu, EngineOptions::default())
        .map_err(|e| anyhow::anyhow!("loading {}: {e}", path.display()))?;
    if choice.strategy == Strategy::Single {
        return samples::run(&engine, &problems, &args);
    }
    let engine = Arc::new(engine);
    if args.sweep {
        // flags::choose has refused a sweep without a PRM already.
        let prm = prm.ok_or_else(|| anyhow::anyhow!("--sweep needs a PRM"))?;
        return sweep::sweep(engine, &prm, choice.select, &problems, &args, outputs);
    }
    search::run(engine, prm.as_ref(), &choice, &problems, &args)
}

/// The most sequences one question may hold at once in `ponder eval`
/// (N_max, the beam's paths, a round, single's samples): far above the
/// served default (`queue.max_running`, 64), low enough that a mistyped
/// flag fails at once instead of exhausting memory.
pub const MAX_SEQUENCES: usize = 1024;

/// The reasoning flags against the ranges a request's `reasoning` object
/// meets in the server, the error naming the flag, its range and the value.
fn check_knobs(args: &EvalArgs) -> anyhow::Result<()> {
    let own = args.round_knobs(args.strategy());
    let values = crate::reasoning::knobs::KnobValues {
        max_samples: args.max_samples() as i64,
        beam_width: args.beam_width() as i64,
        beams: args.beams() as i64,
        prune_every: args.prune_every() as i64,
        confidence: own.confidence,
        budget_quantile: args.budget_quantile(),
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
    match (&args.questions_in, &args.jsonl) {
        (Some(p), _) | (None, Some(p)) => p.display().to_string(),
        (None, None) => args.split.name().to_string(),
    }
}

/// The flags left out take the model's served defaults (`self.defaults`).
impl EvalArgs {
    /// What runs: `--sweep` replays best-of-N.
    pub(crate) fn strategy(&self) -> Strategy {
        match self.strategy {
            _ if self.sweep => Strategy::BestOfN,
            Some(s) => s,
            None => Strategy::Single,
        }
    }

    pub(crate) fn samples(&self) -> usize {
        self.samples.unwrap_or(16)
    }

    pub(crate) fn adaptive(&self) -> bool {
        self.adaptive.unwrap_or(true)
    }

    pub(crate) fn max_samples(&self) -> usize {
        self.max_samples.unwrap_or(self.defaults.max_samples)
    }

    pub(crate) fn budget_quantile(&self) -> f64 {
        self.budget_quantile.unwrap_or(self.defaults.budget_quantile)
    }

    pub(crate) fn beam_width(&self) -> usize {
        self.beam_width.unwrap_or(self.defaults.beam_width)
    }

    pub(crate) fn beams(&self) -> usize {
        self.beams.unwrap_or(self.defaults.beams)
    }

    pub(crate) fn prune_every(&self) -> usize {
        self.prune_every.unwrap_or(self.defaults.prune_every)
    }

    pub(crate) fn prm_output(&self) -> HeadOutput {
        self.prm.unwrap_or_default()
    }

    /// C, the round size and the gain floor as given, else the served
    /// defaults for `strategy`.
    pub(crate) fn round_knobs(&self, strategy: Strategy) -> crate::reasoning::knobs::RoundKnobs {
        let d = self.defaults.round_knobs(strategy);
        crate::reasoning::knobs::RoundKnobs {
            confidence: self.confidence.unwrap_or(d.confidence),
            round_size: self.round_size.unwrap_or(d.round_size),
            give_up_gain: self.give_up_gain.unwrap_or(d.give_up_gain),
        }
    }

    /// `give_up_plausible` as given, else the served default.
    pub(crate) fn plausible(&self) -> f64 {
        self.give_up_plausible.unwrap_or(self.defaults.give_up_plausible)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_jsonl_file_is_an_error_naming_it_not_a_nan_accuracy() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            eval: EvalArgs,
        }
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("empty.jsonl");
        std::fs::write(&path, "\n  \n").expect("written");
        let args = Cli::parse_from(["ponder", "--model", "m", "--jsonl", path.to_str().expect("utf-8")]).eval;
        let e = problems(&args).expect_err("no questions").to_string();
        assert_eq!(e, format!("no questions in {} (--jsonl)", path.display()));
    }

    #[test]
    fn a_jsonl_answer_written_as_an_integral_float_matches_the_models_integer() {
        let text = "{\"question\": \"6 * 7?\", \"answer\": 42.0}\n{\"question\": \"q\", \"answer\": 2.5}\n\
                    {\"question\": \"r\", \"answer\": -3}\n{\"question\": \"s\", \"answer\": \"The answer is 8.\"}";
        let ps = parse_problems(Path::new("q.jsonl"), text).expect("four questions");
        let answers: Vec<&str> = ps.iter().map(|p| p.answer.as_str()).collect();
        assert_eq!(answers, ["42", "2.5", "-3", "8"]);
        assert!(ps[0].is_correct("6 * 7 = 42\n\nThe answer is 42."));
    }

    #[test]
    fn a_candidate_cut_off_before_its_answer_is_wrong_even_when_its_last_number_matches() {
        let p = EvalProblem { id: "q".into(), level: 1, question: "9 + 2?".into(), answer: "11".into() };
        let cut = crate::reasoning::Candidate {
            text: "9 + 2 = 11".into(),
            answer: String::new(),
            score: None,
            tokens: 7,
            steps: 1,
            ended: false,
        };
        assert!(p.is_correct(&cut.text) && !p.is_right(&cut));
        let stated = crate::reasoning::Candidate { answer: "11".into(), ended: true, ..cut };
        assert!(p.is_right(&stated));
    }

    #[test]
    fn a_prm_head_is_looked_for_beside_a_model_directory_only_when_there_is_one() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let gguf = dir.path().join("model.gguf");
        std::fs::write(&gguf, b"").expect("written");
        assert_eq!(model_prm(None, &gguf, None), None, "a GGUF file has no directory to look in");
        assert_eq!(model_prm(None, dir.path(), None), None, "no head beside the model");
        let head = dir.path().join("prm_head.safetensors");
        std::fs::write(&head, b"").expect("written");
        assert_eq!(model_prm(None, dir.path(), None), Some(PrmConfig::Head(head.clone())));
        let given = PathBuf::from("other.safetensors");
        assert_eq!(model_prm(Some(&given), &gguf, None), Some(PrmConfig::Head(given)));
    }
}
