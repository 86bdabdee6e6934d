//! best-of-N and beam search through the reasoning runtime (the server's
//! code path, without HTTP), with accuracy and compute per level.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use super::flags::Choice;
use super::{EvalArgs, EvalProblem, load_prm, source_name};
use crate::config::PrmConfig;
use crate::engine::{Engine, EngineError, SamplingParams};
use crate::prm::Scorer;
use crate::prm::head::HeadOutput;
use crate::reasoning::runtime::{Grants, ReasoningJob, Runtime};
use crate::reasoning::{Budget, Candidates, Outcome, ReasoningParams, Select, Strategy};
use crate::tokenizer::{AddSpecial, ChatMessage};

pub(super) fn params(args: &EvalArgs, c: &Choice, candidates: Candidates) -> ReasoningParams {
    let own = args.round_knobs(c.strategy);
    ReasoningParams {
        strategy: c.strategy,
        budget: if c.adaptive { Budget::Adaptive } else { Budget::Fixed },
        max_samples: args.max_samples(),
        confidence: own.confidence,
        budget_quantile: args.budget_quantile(),
        rule: c.rule,
        round: own.round_size,
        give_up_gain: own.give_up_gain,
        give_up_plausible: args.plausible(),
        beam_width: args.beam_width(),
        beams: args.beams(),
        prune_every: args.prune_every(),
        select: c.select,
        answer: crate::reasoning::select::AnswerFormat::LastNumber,
        candidates,
        n: 1,
        max_tokens: args.max_tokens,
        max_step_tokens: args.max_tokens.min(128),
        max_steps: 20,
    }
}

pub(super) fn prompt(engine: &Engine, question: &str) -> anyhow::Result<Vec<u32>> {
    let tok = engine.tokenizer();
    let text = tok.apply_chat_template(&[ChatMessage::new("user", question)])?;
    Ok(tok.encode(&text, AddSpecial::No)?)
}

fn seed(args: &EvalArgs, id: &str) -> u64 {
    args.seed
        ^ id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// One engine step over every trajectory the runtime wants stepped, with
/// no running limit: the offline drivers' loop (`ponder eval`, tests). The
/// server's scheduler builds its own steps, with plain requests beside.
/// Returns the sequences stepped.
pub fn step_offline(rt: &mut Runtime, engine: &Engine) -> Result<usize, EngineError> {
    rt.poll();
    let mut batch = rt.begin_step(&Grants::Unlimited);
    let stepped = batch.len();
    let updates = if stepped == 0 {
        Vec::new()
    } else {
        let mut refs = batch.sequences();
        engine.step(&mut refs)?
    };
    batch.finish(&updates);
    rt.poll();
    Ok(stepped)
}

/// Every problem through `p`, `concurrent` requests at a time sharing the
/// engine's batched steps (without a PRM as the server runs a model that
/// has none). Outcomes in problem order.
pub(super) fn run_all(
    engine: &Arc<Engine>,
    prm: Option<Arc<dyn Scorer>>,
    problems: &[EvalProblem],
    p: ReasoningParams,
    args: &EvalArgs,
) -> anyhow::Result<Vec<Outcome>> {
    let mut rt = Runtime::new(engine.clone(), prm);
    let mut out: Vec<Option<Outcome>> = vec![None; problems.len()];
    let mut owner = BTreeMap::new();
    let mut next = 0;
    let bar = indicatif::ProgressBar::new(problems.len() as u64);
    bar.set_message(format!("{} {:?}", p.strategy.name(), p.budget));
    while next < problems.len() || !rt.is_idle() {
        while next < problems.len() && rt.running() < args.concurrent {
            let q = &problems[next];
            let job = ReasoningJob {
                question: q.question.clone(),
                prompt: prompt(engine, &q.question)?,
                params: p,
                sampling: SamplingParams::sampled(args.temperature, seed(args, &q.id)),
            };
            owner.insert(rt.spawn(job)?, next);
            next += 1;
        }
        step_offline(&mut rt, engine)?;
        for (task, result) in rt.take_finished() {
            out[owner[&task]] = Some(result?);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    out.into_iter()
        .zip(problems)
        .map(|(o, q)| o.ok_or_else(|| anyhow::anyhow!("question {} never finished", q.id)))
        .collect()
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

pub(super) fn summarize(rows: &[(u8, bool, usize, usize, usize, usize)]) -> Summary {
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
    /// Null for a model without a PRM.
    prm: Option<HeadOutput>,
    confidence: f64,
    round_size: usize,
    give_up_gain: f64,
    give_up_plausible: f64,
    max_samples: usize,
    /// The rule of adaptive runs (null for fixed ones).
    budget_rule: Option<crate::reasoning::BudgetRule>,
    #[serde(flatten)]
    overall: Summary,
    per_level: Vec<LevelSummary>,
    /// Each question: whether it was answered right, what it spent, why it stopped.
    questions: Vec<QuestionResult>,
}

#[derive(Debug, Serialize)]
struct QuestionResult {
    id: String,
    level: u8,
    correct: bool,
    answer: String,
    samples: usize,
    tokens: usize,
    stop: crate::reasoning::Stop,
    rounds: usize,
}

pub(super) fn run(
    engine: Arc<Engine>,
    prm: Option<&PrmConfig>,
    choice: &Choice,
    problems: &[EvalProblem],
    args: &EvalArgs,
) -> anyhow::Result<()> {
    let scorer = prm.map(|prm| load_prm(prm, &engine, args.prm_output())).transpose()?;
    let outcomes = run_all(&engine, scorer, problems, params(args, choice, Candidates::Omit), args)?;
    let rows: Vec<(u8, bool, usize, usize, usize, usize)> = problems
        .iter()
        .zip(&outcomes)
        .map(|(q, o)| {
            let a = &o.accounting;
            let correct = o.answers.first().is_some_and(|c| q.is_right(c));
            (q.level, correct, a.samples, a.tokens_generated, a.fixed_tokens_estimate, a.prm_evaluations)
        })
        .collect();
    let questions = problems
        .iter()
        .zip(&outcomes)
        .zip(&rows)
        .map(|((q, o), r)| QuestionResult {
            id: q.id.clone(),
            level: q.level,
            correct: r.1,
            answer: o.answers.first().map_or_else(String::new, |c| c.answer.clone()),
            samples: o.accounting.samples,
            tokens: o.accounting.tokens_generated,
            stop: o.accounting.stop,
            rounds: o.accounting.rounds,
        })
        .collect();
    let mut levels: Vec<u8> = rows.iter().map(|r| r.0).collect();
    levels.sort_unstable();
    levels.dedup();
    let own = args.round_knobs(choice.strategy);
    let report = SearchReport {
        model: args.model.clone(),
        source: source_name(args),
        strategy: choice.strategy,
        adaptive: choice.adaptive,
        select: choice.select,
        prm: prm.map(|_| args.prm_output()),
        confidence: own.confidence,
        round_size: own.round_size,
        give_up_gain: own.give_up_gain,
        give_up_plausible: args.plausible(),
        max_samples: args.max_samples(),
        budget_rule: choice.adaptive.then_some(choice.rule),
        overall: summarize(&rows),
        per_level: levels
            .into_iter()
            .map(|l| LevelSummary {
                level: l,
                summary: summarize(&rows.iter().copied().filter(|r| r.0 == l).collect::<Vec<_>>()),
            })
            .collect(),
        questions,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// The PRM head's name as `--prm` spells it.
fn head_name(h: HeadOutput) -> &'static str {
    match h {
        HeadOutput::Calibrated => "calibrated",
        HeadOutput::Raw => "raw",
    }
}

/// The report as a table per level, for a reader at a terminal.
fn print_table(report: &SearchReport) {
    let budget = match report.budget_rule {
        Some(rule) => format!("adaptive by {} at C {}", rule.name(), report.confidence),
        None => "fixed".into(),
    };
    println!(
        "{} on {}: {} {budget} (select {}, PRM {}, N_max {})",
        report.model,
        report.source,
        report.strategy.name(),
        report.select.name(),
        report.prm.map_or("none", head_name),
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
}
