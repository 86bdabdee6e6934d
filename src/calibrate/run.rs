//! `ponder calibrate`: Monte-Carlo labels on the calibration split and on
//! held-out questions (through the local engine or the model's remote one),
//! the raw and quantile PRM heads (or a remote PRM's quantile map), the
//! baselines, and the report — one command, resumable at the label stage.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;

use super::baselines::{Histogram, Isotonic, Platt};
use super::fitted::{Fitted, Rows, Scored};
use super::labels::{self, LabelConfig, LabelRow, Source};
use super::remote_labels::RemoteLabeler;
use super::report::{self, MethodReport, Predictions};
use super::train::{self, Data, FitConfig};
use crate::arith::task::{self, Split};
use crate::config::{
    BackendConfig, Config, ModelEntry, ModelPrmConfig, Overrides, PrmConfig, RemotePrmConfig,
};
use crate::engine::{Engine, EngineOptions};
use crate::model::Llama;
use crate::prm::head::HeadPrm;
use crate::prm::model_prm::HeadChoice;

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// A model id from the configuration, or a model path (an HF directory).
    /// A configured model on a remote engine is labelled through that
    /// engine; a remote PRM gets a quantile map of its P(good).
    #[arg(long)]
    model: String,
    #[arg(long)]
    config: Option<PathBuf>,
    /// Questions the heads and baselines are fitted on.
    #[arg(long, value_enum, default_value_t = Split::Calib)]
    split: Split,
    /// Held-out questions the report is computed on.
    #[arg(long, value_enum, default_value_t = Split::Test)]
    eval_split: Split,
    #[arg(long, default_value_t = 200)]
    per_level: usize,
    #[arg(long, default_value_t = 50)]
    eval_per_level: usize,
    /// Trajectories per question (N_val).
    #[arg(long, default_value_t = 8)]
    n_val: usize,
    /// Continuations per prefix (N_MC).
    #[arg(long, default_value_t = 8)]
    n_mc: usize,
    #[arg(long, default_value_t = 20)]
    max_prefix: usize,
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Questions labelled together.
    #[arg(long, default_value_t = 8)]
    concurrent: usize,
    /// Units of the heads' hidden ReLU layer (0: linear heads).
    #[arg(long, default_value_t = 64)]
    units: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Directory for labels and the report (default: MODEL_DIR/calibration,
    /// or calibration/MODEL_ID for a remote model).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where the Monte-Carlo labels are read from and appended to
    /// (`labels_<split>.jsonl`; default: OUT). Labels belong to the policy:
    /// calibrating another PRM for the same policy can reuse them.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Where the trained heads go (default: MODEL_DIR/prm_head.safetensors
    /// for a head PRM, OUT/prm_quantile_head.safetensors for a model PRM,
    /// OUT/prm_quantile_map.json for a remote PRM).
    #[arg(long)]
    head: Option<PathBuf>,
    /// Calibrate this separate PRM (a Qwen2.5-Math-PRM-format directory)
    /// instead of the model's configured PRM or a head on its hidden states.
    #[arg(long)]
    prm_model: Option<PathBuf>,
}

fn by_question(rows: &[LabelRow]) -> (Vec<LabelRow>, Vec<LabelRow>) {
    // One question in five validates, chosen by hash so the split is stable.
    rows.iter().cloned().partition(|r| {
        r.question_id.bytes().fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)) % 5 != 0
    })
}

/// What the labelled prefixes are scored with.
enum Target {
    /// A head on the policy's hidden states, trained here from scratch.
    Head,
    /// A separate PRM whose 2-class head becomes a trained quantile head.
    Model(ModelPrmConfig),
    /// A PRM served elsewhere, calibrated by a quantile map of its P(good).
    Remote(RemotePrmConfig),
}

/// The model to calibrate: a configured entry, or a model path.
fn resolve(args: &CalibrateArgs) -> anyhow::Result<ModelEntry> {
    let cfg = Config::load(args.config.as_deref(), std::iter::empty(), &Overrides::default())?;
    Ok(match cfg.models.into_iter().find(|m| m.id == args.model) {
        Some(m) => m,
        None => ModelEntry {
            id: args.model.clone(),
            path: PathBuf::from(&args.model),
            ..Config::default().models[0].clone()
        },
    })
}

/// Where the policy runs for the labels.
enum Policy {
    Local(Box<Engine>),
    Remote(RemoteLabeler),
}

/// What the labelled prefixes will be scored with.
fn target(args: &CalibrateArgs, entry: &ModelEntry) -> Target {
    match (&args.prm_model, entry.prm.clone()) {
        (Some(dir), _) => {
            Target::Model(ModelPrmConfig { model: dir.clone(), head: HeadChoice::Converted, lora: None })
        }
        (None, Some(PrmConfig::Model(m))) => Target::Model(m),
        (None, Some(PrmConfig::Remote(r))) => Target::Remote(RemotePrmConfig { calibration: None, ..r }),
        (None, _) => Target::Head,
    }
}

/// The policy, the default output directory, and the model as the report
/// names it.
fn policy(entry: &ModelEntry, target: &Target) -> anyhow::Result<(Policy, PathBuf, PathBuf)> {
    match &entry.backend {
        BackendConfig::Local => {
            let path = &entry.path;
            anyhow::ensure!(
                path.is_dir(),
                "{}: calibration writes beside an HF model directory",
                path.display()
            );
            let engine =
                Engine::load(path, entry.weights, &candle_core::Device::Cpu, EngineOptions::default())?;
            Ok((Policy::Local(Box::new(engine)), path.join("calibration"), path.clone()))
        }
        BackendConfig::Openai(engine) => {
            anyhow::ensure!(
                !matches!(target, Target::Head),
                "model {:?} runs on a remote engine, which gives no hidden states for a PRM head: configure a separate PRM (prm = {{ model = ... }} or {{ remote = ... }}) or pass --prm-model",
                entry.id
            );
            let tokenizer = crate::remote::load_tokenizer(entry).map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok((
                Policy::Remote(RemoteLabeler::new(engine, tokenizer)?),
                PathBuf::from("calibration").join(&entry.id),
                PathBuf::from(format!("{} at {}", engine.model, engine.url)),
            ))
        }
    }
}

/// The widest hidden layer a calibration head may have.
const MAX_UNITS: usize = 4096;

/// Refuses flags that would label nothing or fit on nothing, before any
/// file is written.
fn check_args(args: &CalibrateArgs) -> anyhow::Result<()> {
    for (flag, v) in [
        ("--per-level", args.per_level),
        ("--eval-per-level", args.eval_per_level),
        ("--n-val", args.n_val),
        ("--n-mc", args.n_mc),
        ("--max-prefix", args.max_prefix),
        ("--concurrent", args.concurrent),
    ] {
        anyhow::ensure!(v >= 1, "{flag} must be at least 1, got {v}");
    }
    // The report is on held-out questions: the same split would be in-sample.
    anyhow::ensure!(
        args.split != args.eval_split,
        "--eval-split must differ from --split (the report is on held-out questions), got {} for both",
        args.split.name()
    );
    // Monte-Carlo labels need sampled continuations: greedy ones are all the same.
    let (lo, hi) = (0.0, *crate::validation::TEMPERATURE_RANGE.end() as f32);
    anyhow::ensure!(
        args.temperature > lo && args.temperature <= hi,
        "--temperature must be above 0 (labels need sampled continuations) and at most {hi}, got {}",
        args.temperature
    );
    // A head wider than this would not fit beside the model on the machines ponder serves from.
    anyhow::ensure!(args.units <= MAX_UNITS, "--units must be at most {MAX_UNITS}, got {}", args.units);
    // The head is written last, after an hour of labels: a folder it cannot
    // be written to is found now.
    if let Some(head) = &args.head {
        // The nearest folder that exists: the rest is created with --out's.
        let dir = head
            .ancestors()
            .skip(1)
            .map(|d| if d.as_os_str().is_empty() { std::path::Path::new(".") } else { d })
            .find(|d| d.is_dir())
            .unwrap_or(std::path::Path::new("."));
        let probe = dir.join(format!(".ponder-write-check-{}", std::process::id()));
        std::fs::write(&probe, b"").map_err(|e| {
            anyhow::anyhow!("--head {}: cannot write in {}: {e}", head.display(), dir.display())
        })?;
        let _ = std::fs::remove_file(&probe);
    }
    Ok(())
}

pub fn run(args: CalibrateArgs) -> anyhow::Result<()> {
    check_args(&args)?;
    let started = Instant::now();
    let entry = resolve(&args)?;
    let target = target(&args, &entry);
    let (policy, out, path) = policy(&entry, &target)?;
    let out = args.out.clone().unwrap_or(out);
    std::fs::create_dir_all(&out)
        .map_err(|e| anyhow::anyhow!("output directory {}: cannot create it: {e}", out.display()))?;
    let source = match &policy {
        Policy::Local(engine) => Source::Local(engine),
        Policy::Remote(labeler) => Source::Remote(labeler),
    };
    let fit_problems = task::generate(args.split, args.per_level)?;
    let eval_problems = task::generate(args.eval_split, args.eval_per_level)?;
    let labels_dir = args.labels.clone().unwrap_or_else(|| out.clone());
    std::fs::create_dir_all(&labels_dir)
        .map_err(|e| anyhow::anyhow!("labels directory {}: cannot create it: {e}", labels_dir.display()))?;
    if let Some(dir) =
        args.head.as_deref().and_then(std::path::Path::parent).filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("--head's folder {}: cannot create it: {e}", dir.display()))?;
    }
    let fit_rows = collect_labels(&args, &source, &fit_problems, args.split, &labels_dir)?;
    let eval_rows = collect_labels(&args, &source, &eval_problems, args.eval_split, &labels_dir)?;
    let label_minutes = started.elapsed().as_secs_f64() / 60.0;

    // Heads learn from every row; calibration is fitted and reported on
    // prefixes without the final answer (as the paper's reference does).
    let (train_rows, val_rows) = by_question(&fit_rows);
    let fit_rows: Vec<LabelRow> = fit_rows.into_iter().filter(|r| !r.final_answer).collect();
    let eval_rows: Vec<LabelRow> = eval_rows.into_iter().filter(|r| !r.final_answer).collect();
    anyhow::ensure!(
        !train_rows.is_empty() && !val_rows.is_empty(),
        "too few questions to split for validation"
    );
    let notes = format!(
        "trained by `ponder calibrate` on {} {} questions ({} prefixes), N_val {}, N_MC {}",
        fit_problems.len(),
        args.split.name(),
        fit_rows.len(),
        args.n_val,
        args.n_mc
    );
    let rows = Rows { train: &train_rows, val: &val_rows, fit: &fit_rows, eval: &eval_rows };
    let questions = || -> HashMap<String, String> {
        fit_problems.iter().chain(&eval_problems).map(|p| (p.id.clone(), p.question.clone())).collect()
    };
    let fitted = match (&target, &policy) {
        (Target::Head, Policy::Local(engine)) => {
            let head_path = args.head.clone().unwrap_or_else(|| path.join("prm_head.safetensors"));
            fit_head(engine.model(), &rows, &args, &head_path, &notes)?
        }
        (Target::Head, Policy::Remote(_)) => {
            unreachable!("refused above: a remote policy has no hidden states")
        }
        (Target::Model(m), _) => {
            let head_path = args.head.clone().unwrap_or_else(|| out.join("prm_quantile_head.safetensors"));
            super::model_prm::fit(m, &questions(), &rows, &args.fit_config(), &head_path)?
        }
        (Target::Remote(r), _) => {
            let map_path = args.head.clone().unwrap_or_else(|| out.join("prm_quantile_map.json"));
            super::remote_prm::fit(r, &questions(), &rows, &map_path, notes.clone())?
        }
    };
    let (methods, baselines) = evaluate(&fitted.fit, &fit_rows, &fitted.eval, &eval_rows, args.n_mc);
    let facts = Facts {
        args: &args,
        path: &path,
        questions: (fit_problems.len(), eval_problems.len()),
        rows: &rows,
        minutes: (label_minutes, started.elapsed().as_secs_f64() / 60.0),
    };
    let (context, json) = facts.describe(&fitted, &methods, baselines);
    let minutes = facts.minutes.1;
    write_report(&out, &json, &context, &methods)?;
    println!("wrote {} and {} in {minutes:.1} minutes", out.display(), fitted.head_path.display());
    print_serve_line(&target, &fitted.head_path);
    Ok(())
}

/// How to serve what was written.
fn print_serve_line(target: &Target, written: &Path) {
    match target {
        Target::Model(m) => println!(
            "serve it with: prm = {{ model = {:?}, head = {{ trained = {:?} }} }}",
            m.model.display().to_string(),
            written.display().to_string()
        ),
        Target::Remote(r) => println!(
            "serve it with: prm = {{ remote = {:?}, model = {:?}, calibration = {:?} }}",
            r.remote,
            r.model,
            written.display().to_string()
        ),
        Target::Head => {}
    }
}

/// What a run did, for the report.
struct Facts<'a> {
    args: &'a CalibrateArgs,
    path: &'a Path,
    /// Fitting and held-out questions.
    questions: (usize, usize),
    rows: &'a Rows<'a>,
    /// Labelling, and the whole run.
    minutes: (f64, f64),
}

impl Facts<'_> {
    /// `report.md`'s context lines and `report.json`.
    fn describe(
        &self,
        fitted: &Fitted,
        methods: &BTreeMap<String, MethodReport>,
        baselines: serde_json::Value,
    ) -> (Vec<(String, String)>, serde_json::Value) {
        let (args, (fit_rows, eval_rows)) = (self.args, (self.rows.fit, self.rows.eval));
        // Labels are fractions of N_MC: the share at exactly 0 and 1 bounds
        // what the q10 coverage of any sigmoid head can be.
        let share = |v: f64| {
            eval_rows.iter().filter(|r| r.success == v).count() as f64 / eval_rows.len().max(1) as f64
        };
        let (zero, one) = (share(0.0), share(1.0));
        let context = vec![
            ("model".to_string(), self.path.display().to_string()),
            (
                "labels".to_string(),
                format!(
                    "{} prefixes of {} {} questions to fit, {} prefixes of {} {} questions held out; N_val {}, N_MC {}, max prefix {}, temperature {}",
                    fit_rows.len(),
                    self.questions.0,
                    args.split.name(),
                    eval_rows.len(),
                    self.questions.1,
                    args.eval_split.name(),
                    args.n_val,
                    args.n_mc,
                    args.max_prefix,
                    args.temperature
                ),
            ),
            (
                "held-out labels".to_string(),
                format!(
                    "{:.1}% exactly 0 and {:.1}% exactly 1; a sigmoid quantile is never 0, so its strict q10 coverage is at most {:.3}",
                    zero * 100.0,
                    one * 100.0,
                    1.0 - zero
                ),
            ),
            ("heads".to_string(), fitted.summary.clone()),
            ("minutes".to_string(), format!("{:.1} labelling, {:.1} in all", self.minutes.0, self.minutes.1)),
        ];
        let json = serde_json::json!({
            "model": self.path.display().to_string(),
            "fit_split": args.split, "eval_split": args.eval_split,
            "fit_prefixes": fit_rows.len(), "eval_prefixes": eval_rows.len(),
            "fit_questions": self.questions.0, "eval_questions": self.questions.1,
            "eval_label_share": {"zero": zero, "one": one},
            "n_val": args.n_val, "n_mc": args.n_mc, "max_prefix": args.max_prefix, "temperature": args.temperature,
            "head": fitted.head,
            "baselines": baselines,
            "good_threshold": report::GOOD_THRESHOLD,
            "minutes": {"labels": self.minutes.0, "total": self.minutes.1},
            "methods": methods,
        });
        (context, json)
    }
}

impl CalibrateArgs {
    fn fit_config(&self) -> FitConfig {
        FitConfig { units: self.units, seed: self.seed, ..Default::default() }
    }
}

/// The raw head (hard labels) and the quantile head started from it, on the
/// policy's own hidden states and logprobs.
fn fit_head(
    model: &Llama,
    rows: &Rows<'_>,
    args: &CalibrateArgs,
    head_path: &Path,
    notes: &str,
) -> anyhow::Result<Fitted> {
    let data =
        |rows: &[LabelRow]| -> anyhow::Result<Data> { Ok(Data::new(&train::features(model, rows)?, rows)?) };
    let (train_d, val_d, fit_d, eval_d) =
        (data(rows.train)?, data(rows.val)?, data(rows.fit)?, data(rows.eval)?);
    let (raw, quantile, raw_val, q_val) = train::train_heads(&train_d, &val_d, &args.fit_config())?;
    let scores = |d: &Data| -> anyhow::Result<Scored> {
        let q = quantile.probabilities(&d.x)?.to_vec2::<f32>()?;
        let r = raw.probabilities(&d.x)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Scored::new(q, r))
    };
    let (fit, eval) = (scores(&fit_d)?, scores(&eval_d)?);
    let prm = HeadPrm { quantile, raw: Some(raw), output: crate::prm::head::HeadOutput::Calibrated };
    prm.save(head_path, notes)?;
    Ok(Fitted {
        head_path: head_path.to_path_buf(),
        head: serde_json::json!({"kind": "head", "path": head_path.display().to_string(), "units": args.units,
            "raw_val_bce": raw_val, "quantile_val_pinball": q_val}),
        summary: format!(
            "a head on the policy's hidden states, {} ReLU units; raw head validation BCE {raw_val:.4}, quantile head validation pinball {q_val:.4}",
            args.units
        ),
        fit,
        eval,
    })
}

/// Fits the baselines on the raw scores of the fitting prefixes and scores
/// every method on the held-out ones.
fn evaluate(
    fit: &Scored,
    fit_rows: &[LabelRow],
    eval: &Scored,
    eval_rows: &[LabelRow],
    n_mc: usize,
) -> (BTreeMap<String, MethodReport>, serde_json::Value) {
    let fit_label: Vec<f64> = fit_rows.iter().map(|r| r.success).collect();
    let platt = Platt::fit(&fit.raw, &fit_label);
    let iso = Isotonic::fit(&fit.raw, &fit_label);
    let hist = Histogram::fit(&fit.raw, &fit_label);

    let label: Vec<f64> = eval_rows.iter().map(|r| r.success).collect();
    let levels: Vec<u8> = eval_rows.iter().map(|r| r.level).collect();
    let raw_p = &eval.raw;
    let preds = [
        Predictions { name: "calibrated", point: eval.mean.clone(), q10: Some(eval.q10.clone()) },
        Predictions { name: "raw", point: raw_p.clone(), q10: None },
        Predictions { name: "platt", point: raw_p.iter().map(|&s| platt.predict(s)).collect(), q10: None },
        Predictions { name: "isotonic", point: raw_p.iter().map(|&s| iso.predict(s)).collect(), q10: None },
        Predictions { name: "histogram", point: raw_p.iter().map(|&s| hist.predict(s)).collect(), q10: None },
    ];
    let methods = preds
        .iter()
        .map(|p| (p.name.to_string(), report::method_report(p, &label, &levels, 1.0 / n_mc as f64)))
        .collect();
    let baselines =
        serde_json::json!({"platt": platt, "isotonic_blocks": iso.blocks.len(), "histogram": hist.values});
    (methods, baselines)
}

/// `report.json`, `report.md`, `reliability.svg`, and a summary on stdout.
fn write_report(
    out: &std::path::Path,
    json: &serde_json::Value,
    context: &[(String, String)],
    methods: &BTreeMap<String, MethodReport>,
) -> anyhow::Result<()> {
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(json)?)?;
    std::fs::write(out.join("report.md"), report::markdown("PRM calibration report", context, methods))?;
    report::reliability_svg(&out.join("reliability.svg"), methods)?;
    println!("{:<11} {:>7} {:>7} {:>7} {:>9} {:>9}", "method", "Brier", "ECE", "AUROC", "q10 cov", "on grid");
    for (name, m) in methods {
        let o = &m.overall;
        println!(
            "{name:<11} {:>7.4} {:>7.4} {:>7} {:>9} {:>9}",
            o.brier,
            o.ece,
            o.auroc.map_or("-".into(), |a| format!("{a:.3}")),
            o.q10_coverage.map_or("-".into(), |c| format!("{c:.3}")),
            o.q10_coverage_grid.map_or("-".into(), |c| format!("{c:.3}"))
        );
    }
    Ok(())
}

/// The Monte-Carlo labels of `problems`, resumed from (and appended to)
/// `labels_<split>.jsonl` under `out`.
fn collect_labels(
    args: &CalibrateArgs,
    source: &Source<'_>,
    problems: &[task::Problem],
    split: Split,
    out: &std::path::Path,
) -> anyhow::Result<Vec<LabelRow>> {
    let cfg = LabelConfig {
        n_val: args.n_val,
        n_mc: args.n_mc,
        max_prefix: args.max_prefix,
        temperature: args.temperature,
        seed: args.seed,
        ..Default::default()
    };
    labels::collect(
        source,
        problems,
        &cfg,
        &out.join(format!("labels_{}.jsonl", split.name())),
        args.concurrent,
    )
}
