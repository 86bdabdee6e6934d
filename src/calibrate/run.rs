//! `ponder calibrate`: Monte-Carlo labels on the calibration split and on
//! held-out questions, the raw and quantile PRM heads, the baselines, and
//! the report — one command, resumable at the label stage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;

use super::baselines::{Histogram, Isotonic, Platt};
use super::fitted::{Fitted, Rows, Scored};
use super::labels::{self, LabelConfig, LabelRow};
use super::report::{self, MethodReport, Predictions};
use super::train::{self, Data, FitConfig};
use crate::arith::task::{self, Split};
use crate::config::{ModelPrmConfig, PrmConfig};
use crate::engine::{Engine, EngineOptions};
use crate::model::Llama;
use crate::prm::head::HeadPrm;
use crate::prm::model_prm::HeadChoice;

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// A model id from the configuration, or a model path (an HF directory).
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
    /// Directory for labels and the report (default: MODEL_DIR/calibration).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where the trained heads go (default: MODEL_DIR/prm_head.safetensors
    /// for a head PRM, OUT/prm_quantile_head.safetensors for a model PRM).
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
}

pub fn run(args: CalibrateArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let (path, weights, configured) = crate::eval::resolve_entry(&args.model, args.config.as_deref())?;
    let target = match (&args.prm_model, configured) {
        (Some(dir), _) => {
            Target::Model(ModelPrmConfig { model: dir.clone(), head: HeadChoice::Converted, lora: None })
        }
        (None, Some(PrmConfig::Model(m))) => Target::Model(m),
        (None, Some(PrmConfig::Remote(r))) => anyhow::bail!(
            "model {:?} scores with the remote PRM at {}; calibrating a remote PRM is not supported yet (pass --prm-model DIR for a local copy)",
            args.model,
            r.remote
        ),
        (None, _) => Target::Head,
    };
    anyhow::ensure!(path.is_dir(), "{}: calibration writes beside an HF model directory", path.display());
    let out = args.out.clone().unwrap_or_else(|| path.join("calibration"));
    std::fs::create_dir_all(&out)?;
    let engine = Engine::load(&path, weights, &candle_core::Device::Cpu, EngineOptions::default())?;
    let fit_problems = task::generate(args.split, args.per_level);
    let eval_problems = task::generate(args.eval_split, args.eval_per_level);
    let fit_rows = collect_labels(&args, &engine, &fit_problems, args.split, &out)?;
    let eval_rows = collect_labels(&args, &engine, &eval_problems, args.eval_split, &out)?;
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
    let fitted = match &target {
        Target::Head => {
            let head_path = args.head.clone().unwrap_or_else(|| path.join("prm_head.safetensors"));
            fit_head(engine.model(), &rows, &args, &head_path, &notes)?
        }
        Target::Model(m) => {
            let head_path = args.head.clone().unwrap_or_else(|| out.join("prm_quantile_head.safetensors"));
            let questions =
                fit_problems.iter().chain(&eval_problems).map(|p| (p.id.clone(), p.question.clone()));
            super::model_prm::fit(m, &questions.collect(), &rows, &args.fit_config(), &head_path)?
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
    if let Target::Model(m) = &target {
        println!(
            "serve it with: prm = {{ model = {:?}, head = {{ trained = {:?} }} }}",
            m.model.display().to_string(),
            fitted.head_path.display().to_string()
        );
    }
    Ok(())
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
    engine: &Engine,
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
        engine,
        problems,
        &cfg,
        &out.join(format!("labels_{}.jsonl", split.name())),
        args.concurrent,
    )
}
