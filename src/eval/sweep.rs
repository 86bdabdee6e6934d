//! `ponder eval --sweep`: one fixed best-of-N_max run with every candidate
//! kept, replayed as the accuracy-vs-tokens frontier — the fixed best-of-N
//! curve and pass@N; each budget rule (`ias`, `sequential`, `give_up`,
//! `vote`) over a grid of its knobs with the raw PRM, the calibrated PRM and
//! an oracle; each family's Pareto frontier; and the best accuracy each
//! family reaches within the fixed curve's token budgets. Every accuracy
//! carries a 95% bootstrap interval over questions.

use std::sync::Arc;

use serde::Serialize;

use super::bootstrap::{RESAMPLES, SEED};
use super::flags::Choice;
use super::frontier::{EqualTokens, Family, Frontier, equal_tokens, family_name, frontiers};
use super::output::SweepOutputs;
use super::points::{Estimator, Grid, LevelPoint, PassAt, Sweep, SweepPoint, SweepQuestion};
use super::search::{params, prompt, run_all};
use super::{EvalArgs, EvalProblem, load_prm, plot, source_name};
use crate::config::PrmConfig;
use crate::engine::Engine;
use crate::model::BatchEntry;
use crate::prm::head::HeadOutput;
use crate::prm::{PrmScore, ScoreItem, Scorer};
use crate::reasoning::rules::BudgetRule;
use crate::reasoning::{Candidate, Candidates, Select, Strategy};

/// Everything the sweep reports; `--json` prints it whole.
#[derive(Debug, Serialize)]
struct Report {
    model: String,
    source: String,
    questions: usize,
    max_samples: usize,
    select: Select,
    budget_quantile: f64,
    /// Null for a replay (`--questions-in`).
    temperature: Option<f32>,
    bootstrap_resamples: usize,
    bootstrap_seed: u64,
    /// The fixed curve, then every rule's grid.
    points: Vec<SweepPoint>,
    pass_at: Vec<PassAt>,
    /// Fixed best-of-N_max and pass@N_max per level.
    per_level: Vec<LevelPoint>,
    equal_tokens: Vec<EqualTokens>,
    frontier: Vec<Frontier>,
}

/// PRM scores of every question alone (the empty prefix; a head reads the
/// hidden state at the last prompt token).
fn root_scores(engine: &Engine, prm: &dyn Scorer, problems: &[EvalProblem]) -> anyhow::Result<Vec<PrmScore>> {
    let model = engine.model();
    let mut out = Vec::with_capacity(problems.len());
    for chunk in problems.chunks(32) {
        let prompts: Vec<Vec<u32>> =
            chunk.iter().map(|q| prompt(engine, &q.question)).collect::<Result<_, _>>()?;
        let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
        let mut batch: Vec<BatchEntry<'_>> =
            prompts.iter().zip(caches.iter_mut()).map(|(p, c)| BatchEntry { tokens: p, cache: c }).collect();
        let hidden = model.forward(&mut batch)?.hidden.to_vec2::<f32>()?;
        // Nothing generated yet: no steps and no logprobs.
        let items: Vec<ScoreItem<'_>> = chunk
            .iter()
            .zip(&hidden)
            .map(|(q, h)| ScoreItem { question: &q.question, steps: &[], hidden: Some(h), logprobs: &[] })
            .collect();
        out.extend(prm.score(&items)?);
    }
    Ok(out)
}

/// The fixed best-of-N_max run with every candidate kept, and each
/// question's score alone.
fn fixed_run(
    engine: Arc<Engine>,
    prm: &PrmConfig,
    select: Select,
    problems: &[EvalProblem],
    args: &EvalArgs,
) -> anyhow::Result<Vec<SweepQuestion>> {
    let prm = load_prm(prm, &engine, HeadOutput::Calibrated)?;
    let roots = root_scores(&engine, prm.as_ref(), problems)?;
    anyhow::ensure!(roots.iter().all(|r| r.raw.is_some()), "the sweep needs a PRM with a raw score too");
    let rule = args.defaults.budget_rule;
    let fixed = Choice { strategy: Strategy::BestOfN, adaptive: false, rule, select };
    let outcomes = run_all(&engine, Some(prm), problems, params(args, &fixed, Candidates::Return), args)?;
    Ok(problems
        .iter()
        .zip(roots)
        .zip(outcomes)
        .map(|((q, root), o)| SweepQuestion {
            id: q.id.clone(),
            level: q.level,
            root,
            correct_answers: o
                .candidates
                .iter()
                .filter(|c| q.is_right(c))
                .map(|c| c.answer.clone())
                .collect(),
            candidates: o.candidates,
        })
        .collect())
}

/// `--questions-out`: the fixed run itself, one JSON line per question
/// (its estimate alone and every candidate with its text, scores and whether
/// it is right), for analyses the sweep does not make.
fn questions_jsonl(questions: &[SweepQuestion]) -> String {
    let mut out = String::new();
    for q in questions {
        let candidates: Vec<serde_json::Value> = q
            .candidates
            .iter()
            .map(|c| {
                serde_json::json!({"answer": c.answer, "correct": q.correct_answers.contains(&c.answer),
                    "tokens": c.tokens, "steps": c.steps, "score": c.score, "text": c.text})
            })
            .collect();
        let line =
            serde_json::json!({"id": q.id, "level": q.level, "root": q.root, "candidates": candidates});
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

/// `--questions-in`: a fixed run written by `--questions-out`, replayed
/// without generating. Texts and ids are kept, so that `--questions-out`
/// writes the run back whole.
fn read_questions(path: &std::path::Path) -> anyhow::Result<Vec<SweepQuestion>> {
    #[derive(serde::Deserialize)]
    struct Row {
        answer: String,
        correct: bool,
        tokens: usize,
        steps: usize,
        score: Option<PrmScore>,
        #[serde(default)]
        text: String,
    }
    #[derive(serde::Deserialize)]
    struct Line {
        id: Option<String>,
        level: u8,
        root: PrmScore,
        candidates: Vec<Row>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let questions = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            let q: Line =
                serde_json::from_str(l).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
            anyhow::ensure!(!q.candidates.is_empty(), "{}:{}: no candidates", path.display(), i + 1);
            Ok(SweepQuestion {
                id: q.id.unwrap_or_else(|| format!("line-{}", i + 1)),
                level: q.level,
                root: q.root,
                correct_answers: q
                    .candidates
                    .iter()
                    .filter(|c| c.correct)
                    .map(|c| c.answer.clone())
                    .collect(),
                candidates: q
                    .candidates
                    .into_iter()
                    .map(|c| Candidate {
                        text: c.text,
                        answer: c.answer,
                        score: crate::reasoning::strategies::sample_score(c.steps, c.score),
                        tokens: c.tokens,
                        steps: c.steps,
                        ended: true,
                    })
                    .collect(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!questions.is_empty(), "no questions in {} (--questions-in)", path.display());
    Ok(questions)
}

/// N_max of a replay: `--max-samples` when given, which may not exceed the
/// samples every question of the run has, else those samples. Each
/// question keeps its first N_max: exactly what a best-of-N_max run draws
/// (same seeds), so tokens and pass@N_max are that run's too.
fn replay_n_max(
    questions: &mut [SweepQuestion],
    given: Option<usize>,
    path: &std::path::Path,
) -> anyhow::Result<usize> {
    let run = questions.iter().map(|q| q.candidates.len()).min().unwrap_or(0);
    let n_max = given.unwrap_or(run);
    anyhow::ensure!(
        n_max <= run,
        "--max-samples {n_max} is more than the run in {} holds: {run} samples per question{}; give at most {run}",
        path.display(),
        if questions.iter().any(|q| q.candidates.len() != run) { " (its smallest)" } else { "" }
    );
    for q in questions.iter_mut() {
        q.candidates.truncate(n_max);
    }
    Ok(n_max)
}

fn report(questions: &[SweepQuestion], grid: Grid, args: &EvalArgs) -> Report {
    let sweep = Sweep::new(questions, grid);
    let fixed = sweep.fixed_curve();
    let pass_at = sweep.pass_at(&fixed);
    let rules = sweep.rule_points();
    let equal_tokens = equal_tokens(&fixed, &rules);
    let frontier = frontiers(&rules);
    Report {
        model: args.model.clone(),
        source: source_name(args),
        questions: questions.len(),
        max_samples: grid.n_max,
        select: grid.select,
        budget_quantile: grid.budget_quantile,
        // A replayed run does not record the temperature it was drawn at.
        temperature: args.questions_in.is_none().then_some(args.temperature),
        bootstrap_resamples: RESAMPLES,
        bootstrap_seed: SEED,
        points: fixed.into_iter().chain(rules).collect(),
        pass_at,
        per_level: sweep.per_level(),
        equal_tokens,
        frontier,
    }
}

/// One fixed best-of-N_max run with every candidate kept; every point takes
/// the first N of a question's samples, which are exactly the samples (same
/// seeds) a run drawing N would generate.
pub(super) fn sweep(
    engine: Arc<Engine>,
    prm: &PrmConfig,
    select: Select,
    problems: &[EvalProblem],
    args: &EvalArgs,
    outputs: SweepOutputs,
) -> anyhow::Result<()> {
    let questions = fixed_run(engine, prm, select, problems, args)?;
    let grid = Grid { n_max: args.max_samples(), budget_quantile: args.budget_quantile(), select };
    finish(&questions, grid, args, outputs)
}

/// `--questions-in`: the sweep over a run written before.
pub(super) fn replay(path: &std::path::Path, outputs: SweepOutputs, args: &EvalArgs) -> anyhow::Result<()> {
    let mut questions = read_questions(path)?;
    let n_max = replay_n_max(&mut questions, args.max_samples, path)?;
    let select = args.select.unwrap_or(args.defaults.select);
    let grid = Grid { n_max, budget_quantile: args.budget_quantile(), select };
    finish(&questions, grid, args, outputs)
}

/// The run written (first: it cost the most), the report, the plot.
fn finish(
    questions: &[SweepQuestion],
    grid: Grid,
    args: &EvalArgs,
    outputs: SweepOutputs,
) -> anyhow::Result<()> {
    if let Some(out) = outputs.questions {
        out.write(questions_jsonl(questions).as_bytes())?;
    }
    let report = report(questions, grid, args);
    if let Some(out) = outputs.plot {
        let fixed: Vec<SweepPoint> = report.points.iter().filter(|p| p.rule.is_none()).cloned().collect();
        let title = format!(
            "{} on {}: {} questions, N_max {}",
            report.model, report.source, report.questions, report.max_samples
        );
        let data =
            plot::PlotData { title, fixed: &fixed, pass_at: &report.pass_at, frontiers: &report.frontier };
        out.write(plot::svg(&data)?.as_bytes())?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn with_ci(accuracy: f64, [lo, hi]: [f64; 2]) -> String {
    format!("{} [{:.1}, {:.1}]", pct(accuracy), lo * 100.0, hi * 100.0)
}

/// The equal-token table's columns: each rule with the calibrated PRM,
/// `vote`, then each PRM rule with the raw one.
const COLUMNS: [(&str, Family); 7] = [
    ("ias", (BudgetRule::Ias, Estimator::Calibrated)),
    ("sequential", (BudgetRule::Sequential, Estimator::Calibrated)),
    ("give_up", (BudgetRule::GiveUp, Estimator::Calibrated)),
    ("vote", (BudgetRule::Vote, Estimator::NoPrm)),
    ("ias raw", (BudgetRule::Ias, Estimator::Raw)),
    ("seq raw", (BudgetRule::Sequential, Estimator::Raw)),
    ("giveup raw", (BudgetRule::GiveUp, Estimator::Raw)),
];

fn print_report(r: &Report) {
    println!(
        "{} on {} ({} questions, N_max {}, select {}; [95% bootstrap interval over questions])",
        r.model,
        r.source,
        r.questions,
        r.max_samples,
        r.select.name()
    );
    println!(
        "{:>5} {:>21} {:>21} {:>8} {:>9} {:>8}",
        "N", "fixed best-of-N", "pass@N", "samples", "tokens", "vs max"
    );
    for (p, pass) in r.points.iter().filter(|p| p.rule.is_none()).zip(&r.pass_at) {
        println!(
            "{:>5} {:>21} {:>21} {:>8.1} {:>9.0} {:>7.1}%",
            p.max_samples,
            with_ci(p.summary.accuracy, p.accuracy_ci),
            with_ci(pass.accuracy, pass.accuracy_ci),
            p.summary.mean_samples,
            p.summary.mean_generated_tokens,
            p.tokens_vs_fixed_max * 100.0
        );
    }
    println!(
        "\n{:>5} {:>9} {:>14} {:>12} {:>12}",
        "level", "questions", "fixed N_max", "pass@N_max", "token share"
    );
    for l in &r.per_level {
        println!(
            "{:>5} {:>9} {:>14} {:>12} {:>12}",
            l.level,
            l.questions,
            pct(l.fixed_accuracy),
            pct(l.pass_accuracy),
            pct(l.token_share)
        );
    }
    println!(
        "\nbest accuracy within the tokens of fixed best-of-N, calibrated PRM unless raw \
         (each rule's whole grid; --json names each point, its interval and the frontiers)"
    );
    print!("{:>5} {:>7} {:>7}", "N", "tokens", "fixed");
    COLUMNS.iter().for_each(|(name, _)| print!(" {name:>10}"));
    println!();
    for e in &r.equal_tokens {
        print!("{:>5} {:>6.1}% {:>7}", e.n, e.tokens_vs_fixed_max * 100.0, pct(e.fixed.accuracy));
        for (_, family) in COLUMNS {
            let best = e.best.get(&family_name(family)).and_then(|b| b.as_ref());
            print!(" {:>10}", best.map_or_else(|| "-".into(), |b| pct(b.accuracy)));
        }
        println!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::points::tests::{GRID, questions};

    fn args() -> EvalArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            eval: EvalArgs,
        }
        Cli::parse_from(["ponder", "--model", "m", "--sweep", "--max-samples", "8"]).eval
    }

    /// `questions()` written as `--questions-out` writes them, in a file.
    fn written() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("q.jsonl");
        std::fs::write(&path, questions_jsonl(&questions())).expect("written");
        (dir, path)
    }

    #[test]
    fn a_replayed_run_keeps_its_ids_and_texts_and_is_written_back_unchanged() {
        let (_dir, path) = written();
        let read = read_questions(&path).expect("the run reads back");
        assert_eq!(read.iter().map(|q| q.id.as_str()).collect::<Vec<_>>(), ["easy", "hard"]);
        assert_eq!(read[1].candidates[3].text, "The answer is 7.");
        assert!(read.iter().flat_map(|q| &q.candidates).all(|c| !c.text.is_empty()));
        assert_eq!(questions_jsonl(&read), std::fs::read_to_string(&path).expect("read"));
    }

    #[test]
    fn a_replay_takes_the_runs_samples_unless_max_samples_asks_for_fewer_and_refuses_more() {
        let (_dir, path) = written();
        let mut qs = read_questions(&path).expect("read");
        assert_eq!(replay_n_max(&mut qs, None, &path).expect("the run's 8"), 8);
        assert_eq!(replay_n_max(&mut qs, Some(4), &path).expect("fewer"), 4);
        assert!(qs.iter().all(|q| q.candidates.len() == 4), "the first 4 samples of each question");
        let mut qs = read_questions(&path).expect("read");
        let e = replay_n_max(&mut qs, Some(128), &path).expect_err("more than the run has").to_string();
        assert!(
            e.contains("--max-samples 128 is more than the run in") && e.contains("8 samples per question"),
            "{e}"
        );
    }

    #[test]
    fn an_empty_run_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("empty.jsonl");
        std::fs::write(&path, "\n").expect("written");
        let e = read_questions(&path).map(|_| ()).expect_err("no questions").to_string();
        assert!(e.contains("no questions in") && e.contains("empty.jsonl"), "{e}");
    }

    #[test]
    fn the_report_holds_the_fixed_curve_every_rule_and_the_tables_in_its_json() {
        let r = report(&questions(), GRID, &args());
        let v = serde_json::to_value(&r).expect("the report serializes");
        let points = v["points"].as_array().expect("points");
        let fixed: Vec<_> = points.iter().filter(|p| p["estimator"].is_null()).collect();
        assert_eq!(
            fixed.iter().map(|p| p["max_samples"].as_u64()).collect::<Vec<_>>(),
            [1, 2, 4, 8].map(Some)
        );
        assert!(fixed.iter().all(|p| p["rule"].is_null() && p["confidence"].is_null()));
        for rule in ["ias", "sequential", "give_up", "vote"] {
            let p = points.iter().find(|p| p["rule"] == rule).expect("every rule has points");
            for key in
                ["label", "confidence", "max_samples", "accuracy", "mean_samples", "mean_generated_tokens"]
            {
                assert!(!p[key].is_null(), "{rule}: {key}");
            }
            assert_eq!(p["accuracy_ci"].as_array().map(Vec::len), Some(2));
            assert!(p["tokens_vs_fixed_max"].as_f64().is_some_and(|t| t <= 1.0 + 1e-9));
        }
        assert!(points.iter().filter(|p| p["rule"] == "vote").all(|p| p["estimator"] == "none"));
        let give_up: Vec<&serde_json::Value> = points.iter().filter(|p| p["rule"] == "give_up").collect();
        assert!(give_up.iter().all(|p| p["give_up_gain"].is_number() && p["give_up_plausible"].is_number()));
        assert!(give_up.iter().any(|p| p["label"].as_str().is_some_and(|l| l.contains(" plausible=0.03"))));
        assert!(points.iter().filter(|p| p["rule"] != "give_up").all(|p| p["give_up_plausible"].is_null()));
        assert_eq!(v["pass_at"].as_array().map(Vec::len), Some(4));
        assert_eq!(v["pass_at"][0]["accuracy"], 0.5);
        assert_eq!(v["equal_tokens"].as_array().map(Vec::len), Some(4));
        assert!(v["equal_tokens"][3]["best"]["sequential/calibrated"]["label"].is_string());
        assert!(v["frontier"].as_array().is_some_and(|f| f.len() == 10));
    }
}
