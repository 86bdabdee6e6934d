//! `ponder eval --sweep`: one fixed best-of-N_max run, replayed as the fixed
//! best-of-N curve and as IAS runs with the raw PRM, the calibrated PRM and
//! an oracle that knows each question's success rate, over a grid of C and
//! N_max; then the best accuracy each reaches within equal token budgets.

use std::collections::HashSet;
use std::sync::Arc;

use serde::Serialize;

use super::search::{Summary, params, prompt, run_all, summarize};
use super::{EvalArgs, EvalProblem, load_prm, source_name};
use crate::config::PrmConfig;
use crate::engine::Engine;
use crate::model::BatchEntry;
use crate::prm::head::HeadOutput;
use crate::prm::{PrmScore, Quantiles, ScoreItem, Scorer};
use crate::reasoning::select::choose;
use crate::reasoning::{Budget, Candidate, Candidates, Select, Strategy, ias};

/// The C of the sweep's adaptive runs. The low ones reach down to the token
/// counts of small fixed budgets and the very high ones up to large ones, so
/// the estimators' curves overlap in tokens.
const CONFIDENCES: [f64; 13] =
    [0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999, 0.99999, 0.999999];
/// The C values the comparison names; printed in the main table.
const HEADLINE_CONFIDENCES: [f64; 3] = [0.9, 0.95, 0.99];
/// Caps N_max of the adaptive grid, up to the run's own N_max.
const CAPS: [usize; 6] = [2, 4, 8, 16, 32, 64];

/// Where an adaptive point's success probability p comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Estimator {
    /// The uncalibrated head's P(good) of the question alone.
    Raw,
    /// The calibrated head's lower quantile (`budget_quantile`) of the question alone.
    Calibrated,
    /// The question's own success rate over the fixed run's N_max samples:
    /// the budget IAS would set if p were known. A calibrated lower quantile
    /// allows for what it cannot see and sits below p for most questions,
    /// so under the IAS rule this is about the least a PRM can ask for
    /// without losing its coverage.
    Oracle,
}

/// One question of the fixed run: its level, the PRM's score of the question
/// alone, the candidates in the order they were drawn, and which answers are
/// correct.
pub(super) struct SweepQuestion {
    level: u8,
    root: PrmScore,
    candidates: Vec<Candidate>,
    correct_answers: HashSet<String>,
}

impl SweepQuestion {
    fn success_rate(&self) -> f64 {
        let correct = self.candidates.iter().filter(|c| self.correct_answers.contains(&c.answer)).count();
        correct as f64 / self.candidates.len().max(1) as f64
    }

    /// (level, correct, samples, tokens, fixed tokens, PRM evaluations) of
    /// best-of-`n` over the first `n` candidates, each scored as `prm` sees
    /// it, the answer chosen by `select`.
    fn first(&self, n: usize, prm: HeadOutput, select: Select) -> (u8, bool, usize, usize, usize, usize) {
        let n = n.clamp(1, self.candidates.len().max(1)).min(self.candidates.len());
        let first: Vec<Candidate> = self.candidates[..n]
            .iter()
            .map(|c| Candidate { score: c.score.map(|s| view(s, prm)), ..c.clone() })
            .collect();
        let best = choose(&first, select, 1);
        let correct = best.first().is_some_and(|c| self.correct_answers.contains(&c.answer));
        let tokens = first.iter().map(|c| c.tokens).sum();
        let all = self.candidates.iter().map(|c| c.tokens).sum();
        (self.level, correct, n, tokens, all, n + 1)
    }

    /// The samples IAS draws for this question.
    fn budget(&self, estimator: Estimator, budget_quantile: f64, confidence: f64, cap: usize) -> usize {
        let p = match estimator {
            Estimator::Raw => view(self.root, HeadOutput::Raw).quantiles.at(budget_quantile) as f64,
            Estimator::Calibrated => self.root.quantiles.at(budget_quantile) as f64,
            Estimator::Oracle => self.success_rate(),
        };
        ias::samples(p, confidence, cap)
    }
}

/// As seen by `prm`: the calibrated quantiles, or the raw score as a point.
fn view(score: PrmScore, prm: HeadOutput) -> PrmScore {
    match (prm, score.raw) {
        (HeadOutput::Raw, Some(p)) => PrmScore { quantiles: Quantiles::point(p), raw: Some(p) },
        _ => score,
    }
}

#[derive(Debug, Clone, Serialize)]
struct SweepPoint {
    label: String,
    /// None for the fixed curve.
    estimator: Option<Estimator>,
    confidence: Option<f64>,
    /// N for the fixed curve, the cap N_max for adaptive points.
    max_samples: usize,
    #[serde(flatten)]
    summary: Summary,
    /// Mean generated tokens over those of fixed best-of-N_max.
    tokens_vs_fixed_max: f64,
}

/// At one token budget, the best accuracy each run family reaches without
/// spending more (None: no point of that family is that cheap).
#[derive(Debug, Clone, Serialize)]
struct EqualTokens {
    tokens_vs_fixed_max: f64,
    fixed: Option<f64>,
    raw: Option<f64>,
    calibrated: Option<f64>,
    oracle: Option<f64>,
}

struct Grid {
    n_max: usize,
    budget_quantile: f64,
    select: Select,
}

/// The fixed run's questions, replayed under one selection rule.
struct Replay<'a> {
    questions: &'a [SweepQuestion],
    select: Select,
    /// Mean tokens per question of fixed best-of-N_max.
    fixed_max_tokens: f64,
}

impl Replay<'_> {
    fn point(
        &self,
        label: String,
        estimator: Option<Estimator>,
        confidence: Option<f64>,
        max_samples: usize,
        samples_of: impl Fn(&SweepQuestion) -> usize,
    ) -> SweepPoint {
        // The answer is chosen by the PRM the budget came from; the oracle
        // and the fixed curve choose with the calibrated head.
        let prm = if estimator == Some(Estimator::Raw) { HeadOutput::Raw } else { HeadOutput::Calibrated };
        let rows: Vec<_> = self.questions.iter().map(|q| q.first(samples_of(q), prm, self.select)).collect();
        let summary = summarize(&rows);
        SweepPoint {
            label,
            estimator,
            confidence,
            max_samples,
            tokens_vs_fixed_max: summary.mean_generated_tokens / self.fixed_max_tokens.max(f64::MIN_POSITIVE),
            summary,
        }
    }
}

/// The fixed curve (N = 1, 2, 4, …, N_max) and every estimator over the
/// grid of C and caps.
fn sweep_points(questions: &[SweepQuestion], grid: &Grid) -> Vec<SweepPoint> {
    let Grid { n_max, budget_quantile, select } = *grid;
    let total: usize = questions.iter().map(|q| q.candidates.iter().map(|c| c.tokens).sum::<usize>()).sum();
    let replay = Replay { questions, select, fixed_max_tokens: total as f64 / questions.len().max(1) as f64 };
    let mut points = Vec::new();
    let mut n = 1;
    while n <= n_max {
        points.push(replay.point(format!("fixed N={n}"), None, None, n, |_| n));
        n = if n == n_max { n_max + 1 } else { (n * 2).min(n_max) };
    }
    let mut caps: Vec<usize> = CAPS.iter().copied().filter(|&c| c < n_max).collect();
    caps.push(n_max);
    for estimator in [Estimator::Raw, Estimator::Calibrated, Estimator::Oracle] {
        for &cap in &caps {
            for c in CONFIDENCES {
                let label = format!("adaptive {estimator:?} C={c} N_max={cap}");
                points.push(replay.point(label, Some(estimator), Some(c), cap, |q| {
                    q.budget(estimator, budget_quantile, c, cap)
                }));
            }
        }
    }
    points
}

/// For each budget of the fixed curve, the best accuracy of each family
/// among its points that spend at most that many tokens.
fn equal_tokens(points: &[SweepPoint]) -> Vec<EqualTokens> {
    let best = |family: Option<Estimator>, budget: f64| {
        points
            .iter()
            .filter(|p| p.estimator == family && p.tokens_vs_fixed_max <= budget + 1e-9)
            .map(|p| p.summary.accuracy)
            .max_by(f64::total_cmp)
    };
    points
        .iter()
        .filter(|p| p.estimator.is_none())
        .map(|f| {
            let b = f.tokens_vs_fixed_max;
            EqualTokens {
                tokens_vs_fixed_max: b,
                fixed: best(None, b),
                raw: best(Some(Estimator::Raw), b),
                calibrated: best(Some(Estimator::Calibrated), b),
                oracle: best(Some(Estimator::Oracle), b),
            }
        })
        .collect()
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

fn pct(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |a| format!("{:.1}%", a * 100.0))
}

/// One fixed best-of-N_max run with every candidate kept; every point takes
/// the first N of a question's samples, which are exactly the samples (same
/// seeds) a run drawing N would generate.
pub fn sweep(
    engine: Arc<Engine>,
    prm: &PrmConfig,
    problems: &[EvalProblem],
    args: &EvalArgs,
) -> anyhow::Result<()> {
    let prm = load_prm(prm, &engine, HeadOutput::Calibrated)?;
    let roots = root_scores(&engine, prm.as_ref(), problems)?;
    anyhow::ensure!(roots.iter().all(|r| r.raw.is_some()), "the sweep needs a PRM with a raw score too");
    let p = params(args, Strategy::BestOfN, Budget::Fixed, Candidates::Return);
    let outcomes = run_all(&engine, prm, problems, p, args)?;
    let questions: Vec<SweepQuestion> = problems
        .iter()
        .zip(roots)
        .zip(outcomes)
        .map(|((q, root), o)| SweepQuestion {
            level: q.level,
            root,
            correct_answers: o
                .candidates
                .iter()
                .filter(|c| q.is_correct(&c.text))
                .map(|c| c.answer.clone())
                .collect(),
            candidates: o.candidates,
        })
        .collect();
    let n_max = args.max_samples;
    let points =
        sweep_points(&questions, &Grid { n_max, budget_quantile: args.budget_quantile, select: args.select });
    let equal = equal_tokens(&points);
    if args.json {
        println!(
            "{}",
            serde_json::json!({"model": args.model, "source": source_name(args), "max_samples": n_max,
                "select": args.select, "budget_quantile": args.budget_quantile, "temperature": args.temperature,
                "points": points, "equal_tokens": equal})
        );
        return Ok(());
    }
    println!(
        "{} on {} ({} questions, N_max {n_max}, select {})",
        args.model,
        source_name(args),
        problems.len(),
        args.select.name()
    );
    println!("{:<40} {:>9} {:>9} {:>9} {:>12}", "run", "accuracy", "samples", "tokens", "vs fixed-max");
    let headline = |p: &SweepPoint| {
        p.estimator.is_none()
            || (p.max_samples == n_max && p.confidence.is_some_and(|c| HEADLINE_CONFIDENCES.contains(&c)))
    };
    for p in points.iter().filter(|p| headline(p)) {
        println!(
            "{:<40} {:>8.1}% {:>9.1} {:>9.0} {:>11.1}%",
            p.label,
            p.summary.accuracy * 100.0,
            p.summary.mean_samples,
            p.summary.mean_generated_tokens,
            p.tokens_vs_fixed_max * 100.0
        );
    }
    println!(
        "\nbest accuracy within a token budget (every C and N_max of the grid; --json lists each point)"
    );
    println!("{:>12} {:>9} {:>9} {:>11} {:>9}", "tokens", "fixed", "raw", "calibrated", "oracle");
    for e in &equal {
        println!(
            "{:>11.1}% {:>9} {:>9} {:>11} {:>9}",
            e.tokens_vs_fixed_max * 100.0,
            pct(e.fixed),
            pct(e.raw),
            pct(e.calibrated),
            pct(e.oracle)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(answer: &str, q: f32, raw: f32, tokens: usize) -> Candidate {
        Candidate {
            text: format!("The answer is {answer}."),
            answer: answer.into(),
            score: Some(PrmScore { quantiles: Quantiles::point(q), raw: Some(raw) }),
            tokens,
            steps: 1,
            ended: true,
        }
    }

    /// An easy question (every sample right, root q10 0.9) and a hard one
    /// (one right answer, at the 4th sample, root q10 0.05).
    fn questions() -> Vec<SweepQuestion> {
        let root = |q10: f32, raw: f32| PrmScore {
            quantiles: Quantiles { q10, q50: q10, q90: q10 },
            raw: Some(raw),
        };
        let easy = SweepQuestion {
            level: 1,
            root: root(0.9, 0.95),
            candidates: (0..8).map(|_| cand("2", 0.9, 0.9, 10)).collect(),
            correct_answers: HashSet::from(["2".to_string()]),
        };
        let mut hard: Vec<Candidate> = (0..8).map(|i| cand(&format!("{}", 10 + i), 0.1, 0.8, 30)).collect();
        hard[3] = cand("7", 0.6, 0.3, 30);
        let hard = SweepQuestion {
            level: 2,
            root: root(0.05, 0.95),
            candidates: hard,
            correct_answers: HashSet::from(["7".to_string()]),
        };
        vec![easy, hard]
    }

    #[test]
    fn the_fixed_curve_takes_the_first_n_samples_of_each_question() {
        let points =
            sweep_points(&questions(), &Grid { n_max: 8, budget_quantile: 0.1, select: Select::PrmMax });
        let fixed: Vec<_> = points.iter().filter(|p| p.estimator.is_none()).collect();
        assert_eq!(fixed.iter().map(|p| p.max_samples).collect::<Vec<_>>(), [1, 2, 4, 8]);
        // Only N ≥ 4 reaches the hard question's one right answer.
        assert_eq!(fixed.iter().map(|p| p.summary.accuracy).collect::<Vec<_>>(), [0.5, 0.5, 1.0, 1.0]);
        assert_eq!(fixed[3].tokens_vs_fixed_max, 1.0);
        assert!((fixed[0].tokens_vs_fixed_max - 40.0 / 320.0).abs() < 1e-12);
    }

    #[test]
    fn estimators_set_budgets_from_their_own_probability() {
        let qs = questions();
        // Calibrated q10 0.05 at C 0.99 wants 90 samples: the cap.
        assert_eq!(qs[1].budget(Estimator::Calibrated, 0.1, 0.99, 8), 8);
        // The raw head's overconfident 0.95 asks for 2.
        assert_eq!(qs[1].budget(Estimator::Raw, 0.1, 0.99, 8), 2);
        // The oracle's 1/8: ceil(ln 0.01 / ln 0.875) = 35, capped.
        assert_eq!(qs[1].budget(Estimator::Oracle, 0.1, 0.99, 8), 8);
        assert_eq!(qs[0].budget(Estimator::Oracle, 0.1, 0.99, 8), 1);
    }

    #[test]
    fn equal_token_budgets_compare_each_family_at_its_best_affordable_point() {
        let points =
            sweep_points(&questions(), &Grid { n_max: 8, budget_quantile: 0.1, select: Select::PrmMax });
        let equal = equal_tokens(&points);
        assert_eq!(equal.len(), 4);
        // At the full budget every family reaches the hard question's answer.
        let full = equal.last().expect("four budgets");
        assert_eq!((full.fixed, full.calibrated, full.oracle), (Some(1.0), Some(1.0), Some(1.0)));
        // The raw head's overconfident root score stops the hard question
        // early, and its ranking picks a wrong answer however many it draws.
        assert!(equal.iter().all(|e| e.raw.is_none_or(|a| a == 0.5)));
        // Nothing adaptive with the calibrated head is as cheap as one sample
        // per question; the oracle is (p = 1/8 asks for one sample at C 0.1).
        assert_eq!((equal[0].calibrated, equal[0].oracle), (None, Some(0.5)));
    }
}
