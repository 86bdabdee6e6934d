//! best-of-N and beam search through the reasoning runtime (the server's
//! code path, without HTTP), and the sweep: the fixed best-of-N curve beside
//! adaptive runs with the raw and the calibrated PRM.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use super::{EvalArgs, EvalProblem, load_prm, source_name};
use crate::engine::{Engine, SamplingParams};
use crate::model::BatchEntry;
use crate::prm::head::{HeadOutput, HeadPrm};
use crate::prm::{PrmScore, Quantiles, Scorer};
use crate::reasoning::runtime::{ReasoningJob, Runtime};
use crate::reasoning::select::choose;
use crate::reasoning::{Budget, Candidate, Candidates, Outcome, ReasoningParams, Select, Strategy, ias};
use crate::tokenizer::{AddSpecial, ChatMessage};

fn params(args: &EvalArgs, strategy: Strategy, budget: Budget, candidates: Candidates) -> ReasoningParams {
    ReasoningParams {
        strategy,
        budget,
        max_samples: args.max_samples,
        confidence: args.confidence,
        budget_quantile: args.budget_quantile,
        beam_width: args.beam_width,
        beams: args.beams,
        prune_every: args.prune_every,
        select: args.select,
        candidates,
        n: 1,
        max_tokens: args.max_tokens,
        max_step_tokens: args.max_tokens.min(128),
        max_steps: 20,
    }
}

fn prompt(engine: &Engine, question: &str) -> anyhow::Result<Vec<u32>> {
    let tok = engine.tokenizer();
    let text = tok.apply_chat_template(&[ChatMessage::new("user", question)])?;
    Ok(tok.encode(&text, AddSpecial::No)?)
}

fn seed(args: &EvalArgs, id: &str) -> u64 {
    args.seed
        ^ id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Every problem through `p`, `concurrent` requests at a time sharing the
/// engine's batched steps. Outcomes in problem order.
fn run_all(
    engine: &Arc<Engine>,
    prm: Arc<dyn Scorer>,
    problems: &[EvalProblem],
    p: ReasoningParams,
    args: &EvalArgs,
) -> anyhow::Result<Vec<Outcome>> {
    let mut rt = Runtime::new(engine.clone(), Some(prm));
    let mut out: Vec<Option<Outcome>> = vec![None; problems.len()];
    let mut owner = BTreeMap::new();
    let mut next = 0;
    let bar = indicatif::ProgressBar::new(problems.len() as u64);
    bar.set_message(format!("{} {:?}", p.strategy.name(), p.budget));
    while next < problems.len() || !rt.is_idle() {
        while next < problems.len() && rt.running() < args.concurrent.max(1) {
            let q = &problems[next];
            let job = ReasoningJob {
                question: q.question.clone(),
                prompt: prompt(engine, &q.question)?,
                params: p,
                sampling: SamplingParams {
                    temperature: args.temperature,
                    top_p: 1.0,
                    top_k: 0,
                    seed: seed(args, &q.id),
                },
            };
            owner.insert(rt.spawn(job)?, next);
            next += 1;
        }
        rt.step(Vec::new())?;
        for (task, result) in rt.take_finished() {
            out[owner[&task]] = Some(result?);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(out.into_iter().map(|o| o.expect("every task finished")).collect())
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub questions: usize,
    pub accuracy: f64,
    pub mean_samples: f64,
    pub mean_generated_tokens: f64,
    /// Tokens generated over the fixed-budget estimate, all questions together.
    pub budget_fraction: f64,
    pub mean_prm_evaluations: f64,
}

fn summarize(rows: &[(u8, bool, usize, usize, usize, usize)]) -> Summary {
    let n = rows.len().max(1) as f64;
    let fixed: usize = rows.iter().map(|r| r.4).sum();
    let used: usize = rows.iter().map(|r| r.3).sum();
    Summary {
        questions: rows.len(),
        accuracy: rows.iter().filter(|r| r.1).count() as f64 / n,
        mean_samples: rows.iter().map(|r| r.2).sum::<usize>() as f64 / n,
        mean_generated_tokens: used as f64 / n,
        budget_fraction: if fixed == 0 { 1.0 } else { used as f64 / fixed as f64 },
        mean_prm_evaluations: rows.iter().map(|r| r.5).sum::<usize>() as f64 / n,
    }
}

#[derive(Debug, Serialize)]
struct LevelSummary {
    level: u8,
    #[serde(flatten)]
    summary: Summary,
}

#[derive(Debug, Serialize)]
struct SearchReport {
    model: String,
    source: String,
    strategy: Strategy,
    adaptive: bool,
    select: Select,
    prm: HeadOutput,
    confidence: f64,
    max_samples: usize,
    #[serde(flatten)]
    overall: Summary,
    per_level: Vec<LevelSummary>,
}

pub fn run(
    engine: Arc<Engine>,
    prm_path: &Path,
    problems: &[EvalProblem],
    args: &EvalArgs,
) -> anyhow::Result<()> {
    let prm: Arc<dyn Scorer> = Arc::new(load_prm(prm_path, args.prm)?);
    let budget = if args.adaptive { Budget::Adaptive } else { Budget::Fixed };
    let outcomes =
        run_all(&engine, prm, problems, params(args, args.strategy, budget, Candidates::Omit), args)?;
    let rows: Vec<(u8, bool, usize, usize, usize, usize)> = problems
        .iter()
        .zip(&outcomes)
        .map(|(q, o)| {
            let a = &o.accounting;
            let correct = o.answers.first().is_some_and(|c| q.is_correct(&c.text));
            (q.level, correct, a.samples, a.tokens_generated, a.fixed_tokens_estimate, a.prm_evaluations)
        })
        .collect();
    let mut levels: Vec<u8> = rows.iter().map(|r| r.0).collect();
    levels.sort_unstable();
    levels.dedup();
    let report = SearchReport {
        model: args.model.clone(),
        source: source_name(args),
        strategy: args.strategy,
        adaptive: args.adaptive,
        select: args.select,
        prm: args.prm,
        confidence: args.confidence,
        max_samples: args.max_samples,
        overall: summarize(&rows),
        per_level: levels
            .into_iter()
            .map(|l| LevelSummary {
                level: l,
                summary: summarize(&rows.iter().copied().filter(|r| r.0 == l).collect::<Vec<_>>()),
            })
            .collect(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "{} on {}: {} {} (select {}, PRM {:?}, C {}, N_max {})",
        report.model,
        report.source,
        report.strategy.name(),
        if report.adaptive { "adaptive" } else { "fixed" },
        report.select.name(),
        report.prm,
        report.confidence,
        report.max_samples
    );
    println!("level  questions  accuracy  samples  tokens  budget");
    let line = |name: String, s: &Summary| {
        println!(
            "{name:>5}  {:>9}  {:>7.1}%  {:>7.1}  {:>6.0}  {:>5.1}%",
            s.questions,
            s.accuracy * 100.0,
            s.mean_samples,
            s.mean_generated_tokens,
            s.budget_fraction * 100.0
        )
    };
    for l in &report.per_level {
        line(l.level.to_string(), &l.summary);
    }
    line("all".into(), &report.overall);
    Ok(())
}

/// PRM scores of every question alone (the empty prefix), from the hidden
/// state at the last prompt token.
fn root_scores(engine: &Engine, heads: &HeadPrm, problems: &[EvalProblem]) -> anyhow::Result<Vec<PrmScore>> {
    let model = engine.model();
    let mut out = Vec::with_capacity(problems.len());
    for chunk in problems.chunks(32) {
        let prompts: Vec<Vec<u32>> =
            chunk.iter().map(|q| prompt(engine, &q.question)).collect::<Result<_, _>>()?;
        let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
        let mut batch: Vec<BatchEntry<'_>> =
            prompts.iter().zip(caches.iter_mut()).map(|(p, c)| BatchEntry { tokens: p, cache: c }).collect();
        let hidden = model.forward(&mut batch)?.hidden.to_vec2::<f32>()?;
        // Nothing generated yet: the confidence features are those of no tokens.
        let features: Vec<Vec<f32>> =
            hidden.iter().map(|h| crate::prm::head::feature_vector(h, &[])).collect();
        let refs: Vec<&[f32]> = features.iter().map(Vec::as_slice).collect();
        out.extend(heads.score(&refs)?);
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
struct SweepPoint {
    label: String,
    prm: Option<HeadOutput>,
    confidence: Option<f64>,
    fixed_n: Option<usize>,
    #[serde(flatten)]
    summary: Summary,
    /// Mean generated tokens over those of fixed best-of-N_max.
    tokens_vs_fixed_max: f64,
}

/// As seen by `prm`: the calibrated quantiles, or the raw score as a point.
fn view(score: PrmScore, prm: HeadOutput) -> PrmScore {
    match (prm, score.raw) {
        (HeadOutput::Raw, Some(p)) => PrmScore { quantiles: Quantiles::point(p), raw: Some(p) },
        _ => score,
    }
}

/// One fixed best-of-N_max run with every candidate kept; the fixed curve
/// and the adaptive points take its first N samples, which are exactly the
/// samples (same seeds) a run drawing N would generate.
/// The C of the sweep's adaptive runs: the low ones reach down to the
/// token counts of small fixed budgets, so the raw and the calibrated PRM
/// can be compared at equal tokens.
const SWEEP_CONFIDENCES: [f64; 10] = [0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999];

pub fn sweep(
    engine: Arc<Engine>,
    prm_path: &Path,
    problems: &[EvalProblem],
    args: &EvalArgs,
) -> anyhow::Result<()> {
    let heads = load_prm(prm_path, HeadOutput::Calibrated)?;
    anyhow::ensure!(heads.raw.is_some(), "{}: the sweep needs the raw head too", prm_path.display());
    let roots = root_scores(&engine, &heads, problems)?;
    let mut p = params(args, Strategy::BestOfN, Budget::Fixed, Candidates::Return);
    p.select = Select::PrmMax;
    let outcomes = run_all(&engine, Arc::new(heads), problems, p, args)?;
    let cands: Vec<&Vec<Candidate>> = outcomes.iter().map(|o| &o.candidates).collect();
    let n_max = args.max_samples;
    // Per question: (level, correct, samples, tokens, fixed tokens, prm evaluations) for the first n samples.
    let point = |q: usize, n: usize, prm: HeadOutput| -> (u8, bool, usize, usize, usize, usize) {
        let first: Vec<Candidate> = cands[q][..n]
            .iter()
            .map(|c| Candidate { score: c.score.map(|s| view(s, prm)), ..c.clone() })
            .collect();
        let best = choose(&first, Select::PrmMax, 1);
        let tokens: usize = first.iter().map(|c| c.tokens).sum();
        let all: usize = cands[q].iter().map(|c| c.tokens).sum();
        let correct = best.first().is_some_and(|c| problems[q].is_correct(&c.text));
        (problems[q].level, correct, n, tokens, all, n + 1)
    };
    let fixed_max_tokens: f64 = cands.iter().map(|c| c.iter().map(|x| x.tokens).sum::<usize>()).sum::<usize>()
        as f64
        / problems.len().max(1) as f64;
    let mut points = Vec::new();
    let mut n = 1;
    while n <= n_max {
        let rows: Vec<_> = (0..problems.len()).map(|q| point(q, n, HeadOutput::Calibrated)).collect();
        let s = summarize(&rows);
        points.push(SweepPoint {
            label: format!("fixed N={n}"),
            prm: None,
            confidence: None,
            fixed_n: Some(n),
            tokens_vs_fixed_max: s.mean_generated_tokens / fixed_max_tokens,
            summary: s,
        });
        n = if n == n_max { n_max + 1 } else { (n * 2).min(n_max) };
    }
    for prm in [HeadOutput::Raw, HeadOutput::Calibrated] {
        for c in SWEEP_CONFIDENCES {
            let rows: Vec<_> = (0..problems.len())
                .map(|q| {
                    let p0 = view(roots[q], prm).quantiles.at(args.budget_quantile) as f64;
                    point(q, ias::samples(p0, c, n_max), prm)
                })
                .collect();
            let s = summarize(&rows);
            points.push(SweepPoint {
                label: format!("adaptive {prm:?} C={c}"),
                prm: Some(prm),
                confidence: Some(c),
                fixed_n: None,
                tokens_vs_fixed_max: s.mean_generated_tokens / fixed_max_tokens,
                summary: s,
            });
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({"model": args.model, "source": source_name(args), "max_samples": n_max,
                "budget_quantile": args.budget_quantile, "temperature": args.temperature, "points": points})
        );
        return Ok(());
    }
    println!("{} on {} ({} questions, N_max {n_max})", args.model, source_name(args), problems.len());
    println!("{:<28} {:>9} {:>9} {:>9} {:>12}", "run", "accuracy", "samples", "tokens", "vs fixed-max");
    for p in &points {
        println!(
            "{:<28} {:>8.1}% {:>9.1} {:>9.0} {:>11.1}%",
            p.label,
            p.summary.accuracy * 100.0,
            p.summary.mean_samples,
            p.summary.mean_generated_tokens,
            p.tokens_vs_fixed_max * 100.0
        );
    }
    Ok(())
}
