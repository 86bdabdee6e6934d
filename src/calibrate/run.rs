//! `ponder calibrate`: Monte-Carlo labels on the calibration split and on
//! held-out questions, the raw and quantile PRM heads, the baselines, and
//! the report — one command, resumable at the label stage.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use super::baselines::{Histogram, Isotonic, Platt};
use super::labels::{self, LabelConfig, LabelRow};
use super::report::{self, MethodReport, Predictions};
use super::train::{self, Data, FitConfig};
use crate::arith::task::{self, Split};
use crate::engine::{Engine, EngineOptions};
use crate::prm::head::HeadPrm;

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
    /// Where the trained heads go (default: MODEL_DIR/prm_head.safetensors).
    #[arg(long)]
    head: Option<PathBuf>,
}

fn by_question(rows: &[LabelRow]) -> (Vec<LabelRow>, Vec<LabelRow>) {
    // One question in five validates, chosen by hash so the split is stable.
    rows.iter().cloned().partition(|r| {
        r.question_id.bytes().fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)) % 5 != 0
    })
}

pub fn run(args: CalibrateArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let (path, weights) = crate::eval::resolve(&args.model, args.config.as_deref())?;
    anyhow::ensure!(path.is_dir(), "{}: calibration writes beside an HF model directory", path.display());
    let out = args.out.clone().unwrap_or_else(|| path.join("calibration"));
    let head_path = args.head.clone().unwrap_or_else(|| path.join("prm_head.safetensors"));
    std::fs::create_dir_all(&out)?;
    let engine = Engine::load(&path, weights, &candle_core::Device::Cpu, EngineOptions::default())?;
    let fit_problems = task::generate(args.split, args.per_level);
    let eval_problems = task::generate(args.eval_split, args.eval_per_level);
    let fit_rows = collect_labels(&args, &engine, &fit_problems, args.split, &out)?;
    let eval_rows = collect_labels(&args, &engine, &eval_problems, args.eval_split, &out)?;
    let label_minutes = started.elapsed().as_secs_f64() / 60.0;

    // Heads learn from every row; calibration is fitted and reported on
    // prefixes without the final answer (DESIGN §1).
    let (train_rows, val_rows) = by_question(&fit_rows);
    let fit_rows: Vec<LabelRow> = fit_rows.into_iter().filter(|r| !r.final_answer).collect();
    let eval_rows: Vec<LabelRow> = eval_rows.into_iter().filter(|r| !r.final_answer).collect();
    anyhow::ensure!(
        !train_rows.is_empty() && !val_rows.is_empty(),
        "too few questions to split for validation"
    );
    let model = engine.model();
    let data =
        |rows: &[LabelRow]| -> anyhow::Result<Data> { Ok(Data::new(&train::features(model, rows)?, rows)?) };
    let (train_d, val_d, fit_d, eval_d) =
        (data(&train_rows)?, data(&val_rows)?, data(&fit_rows)?, data(&eval_rows)?);
    let fit_cfg = FitConfig { units: args.units, seed: args.seed, ..Default::default() };
    let (raw, quantile, raw_val, q_val) = train::train_heads(&train_d, &val_d, &fit_cfg)?;
    let prm = HeadPrm { quantile, raw: Some(raw), output: crate::prm::head::HeadOutput::Calibrated };
    prm.save(
        &head_path,
        &format!(
            "trained by `ponder calibrate` on {} {} questions ({} prefixes), N_val {}, N_MC {}",
            fit_problems.len(),
            args.split.name(),
            fit_rows.len(),
            args.n_val,
            args.n_mc
        ),
    )?;

    let (methods, baselines) = evaluate(&prm, (&fit_d, &fit_rows), (&eval_d, &eval_rows), args.n_mc)?;
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    let context = vec![
        ("model".to_string(), path.display().to_string()),
        (
            "labels".to_string(),
            format!(
                "{} prefixes of {} {} questions to fit, {} prefixes of {} {} questions held out; N_val {}, N_MC {}, max prefix {}, temperature {}",
                fit_rows.len(),
                fit_problems.len(),
                args.split.name(),
                eval_rows.len(),
                eval_problems.len(),
                args.eval_split.name(),
                args.n_val,
                args.n_mc,
                args.max_prefix,
                args.temperature
            ),
        ),
        (
            "heads".to_string(),
            format!(
                "{} ReLU units; raw head validation BCE {raw_val:.4}, quantile head validation pinball {q_val:.4}",
                args.units
            ),
        ),
        ("minutes".to_string(), format!("{label_minutes:.1} labelling, {minutes:.1} in all")),
    ];
    let json = serde_json::json!({
        "model": path.display().to_string(),
        "fit_split": args.split, "eval_split": args.eval_split,
        "fit_prefixes": fit_rows.len(), "eval_prefixes": eval_rows.len(),
        "fit_questions": fit_problems.len(), "eval_questions": eval_problems.len(),
        "n_val": args.n_val, "n_mc": args.n_mc, "max_prefix": args.max_prefix, "temperature": args.temperature,
        "head": {"path": head_path.display().to_string(), "units": args.units, "raw_val_bce": raw_val, "quantile_val_pinball": q_val},
        "baselines": baselines,
        "good_threshold": report::GOOD_THRESHOLD,
        "minutes": {"labels": label_minutes, "total": minutes},
        "methods": methods,
    });
    write_report(&out, &json, &context, &methods)?;
    println!("wrote {} and {} in {minutes:.1} minutes", out.display(), head_path.display());
    Ok(())
}

/// Fits the baselines on the raw scores of the fitting prefixes and scores
/// every method on the held-out ones.
fn evaluate(
    prm: &HeadPrm,
    (fit_d, fit_rows): (&Data, &[LabelRow]),
    (eval_d, eval_rows): (&Data, &[LabelRow]),
    n_mc: usize,
) -> anyhow::Result<(BTreeMap<String, MethodReport>, serde_json::Value)> {
    let scores = |d: &Data| -> anyhow::Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
        let q = prm.quantile.probabilities(&d.x)?.to_vec2::<f32>()?;
        let r = prm
            .raw
            .as_ref()
            .expect("calibrate trains both heads")
            .probabilities(&d.x)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut q10 = Vec::new();
        let mut point = Vec::new();
        for v in q {
            let s = crate::prm::Quantiles::sorted([v[0], v[1], v[2]]);
            q10.push(s.q10 as f64);
            point.push(s.mean() as f64);
        }
        Ok((q10, point, r.into_iter().map(f64::from).collect()))
    };
    let (_, _, fit_raw) = scores(fit_d)?;
    let fit_label: Vec<f64> = fit_rows.iter().map(|r| r.success).collect();
    let platt = Platt::fit(&fit_raw, &fit_label);
    let iso = Isotonic::fit(&fit_raw, &fit_label);
    let hist = Histogram::fit(&fit_raw, &fit_label);

    let (q10, mean, raw_p) = scores(eval_d)?;
    let label: Vec<f64> = eval_rows.iter().map(|r| r.success).collect();
    let levels: Vec<u8> = eval_rows.iter().map(|r| r.level).collect();
    let preds = [
        Predictions { name: "calibrated", point: mean, q10: Some(q10) },
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
    Ok((methods, baselines))
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
