//! The sweep's points: the fixed best-of-N curve, pass@N, and each budget
//! rule's grid of knobs under each estimator, all replayed over one fixed
//! best-of-N_max run whose every candidate was kept.

use std::collections::{BTreeMap, HashSet};

use rayon::prelude::*;
use serde::Serialize;

use super::bootstrap::{Bootstrap, RESAMPLES, SEED};
use super::search::{Summary, summarize};
use crate::prm::head::HeadOutput;
use crate::prm::{PrmScore, Quantiles};
use crate::reasoning::rules::{self, BudgetRule, RuleParams};
use crate::reasoning::select::choose;
use crate::reasoning::{Candidate, Select};

/// The C of `ias`. The low ones reach down to the token counts of small
/// fixed budgets and the very high ones up to large ones, so the
/// estimators' curves overlap in tokens.
const IAS_CONFIDENCES: [f64; 13] =
    [0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999, 0.99999, 0.999999];
/// The C of `sequential` and `give_up`: the selected answer's calibrated
/// probability of being right, so values below 0.5 would stop on answers
/// more likely wrong than right.
const ROUND_CONFIDENCES: [f64; 12] = [0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999];
/// The C of `vote`: one unanimous vote already has posterior 0.75.
const VOTE_CONFIDENCES: [f64; 6] = [0.5, 0.75, 0.8, 0.9, 0.95, 0.99];
const ROUNDS: [usize; 4] = [1, 2, 4, 8];
const GIVE_UP_GAINS: [f64; 9] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2];
/// `give_up_plausible` below 1, with rounds of 1 and 2 only (the frontier's
/// rounds; every value doubles `give_up`'s grid).
const GIVE_UP_PLAUSIBLE: [f64; 4] = [0.01, 0.03, 0.1, 0.3];
/// Caps N_max of the adaptive grid, up to the run's own N_max.
const CAPS: [usize; 6] = [2, 4, 8, 16, 32, 64];

/// Where an adaptive point's estimates come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Estimator {
    /// No PRM at all (`vote`): answers only.
    #[serde(rename = "none")]
    NoPrm,
    /// The uncalibrated head's P(good), as a point, for the question and
    /// for every sample.
    Raw,
    /// The calibrated head's quantiles.
    Calibrated,
    /// The truth: the question's success rate over the fixed run's N_max
    /// samples, and 1 or 0 for each sample as its answer is right. What a
    /// perfect PRM would let each rule do; its curve bounds the others.
    Oracle,
}

impl Estimator {
    pub(super) fn name(self) -> &'static str {
        match self {
            Estimator::NoPrm => "none",
            Estimator::Raw => "raw",
            Estimator::Calibrated => "calibrated",
            Estimator::Oracle => "oracle",
        }
    }
}

/// One question of the fixed run: its id and level, the PRM's score of the
/// question alone, the candidates in the order they were drawn, and which
/// answers are correct.
pub(super) struct SweepQuestion {
    pub(super) id: String,
    pub(super) level: u8,
    pub(super) root: PrmScore,
    pub(super) candidates: Vec<Candidate>,
    pub(super) correct_answers: HashSet<String>,
}

/// One question as one estimator shows it to a rule: the question's
/// estimate and the samples' scores. Texts are dropped: rules and
/// selection read answers and scores only, and the views are copied per
/// estimator.
struct View {
    root: Option<Quantiles>,
    candidates: Vec<Candidate>,
}

impl SweepQuestion {
    fn success_rate(&self) -> f64 {
        let correct = self.candidates.iter().filter(|c| self.is_correct(c)).count();
        correct as f64 / self.candidates.len().max(1) as f64
    }

    fn is_correct(&self, c: &Candidate) -> bool {
        self.correct_answers.contains(&c.answer)
    }

    /// Whether one of the first `n` samples is right.
    fn pass(&self, n: usize) -> bool {
        self.candidates.iter().take(n).any(|c| self.is_correct(c))
    }

    fn view(&self, estimator: Estimator) -> View {
        let point = |p: f64| PrmScore { quantiles: Quantiles::point(p as f32), raw: Some(p as f32) };
        let score = |c: &Candidate| match estimator {
            Estimator::NoPrm => None,
            Estimator::Calibrated => c.score,
            Estimator::Raw => c.score.map(|s| view(s, HeadOutput::Raw)),
            Estimator::Oracle => Some(point(if self.is_correct(c) { 1.0 } else { 0.0 })),
        };
        let root = match estimator {
            Estimator::NoPrm => None,
            Estimator::Calibrated => Some(self.root),
            Estimator::Raw => Some(view(self.root, HeadOutput::Raw)),
            Estimator::Oracle => Some(point(self.success_rate())),
        };
        View {
            root: root.map(|r| r.quantiles),
            candidates: self
                .candidates
                .iter()
                .map(|c| Candidate { text: String::new(), score: score(c), ..c.clone() })
                .collect(),
        }
    }
}

/// As seen by `prm`: the calibrated quantiles, or the raw score as a point.
fn view(score: PrmScore, prm: HeadOutput) -> PrmScore {
    match (prm, score.raw) {
        (HeadOutput::Raw, Some(p)) => PrmScore { quantiles: Quantiles::point(p), raw: Some(p) },
        _ => score,
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Grid {
    pub(super) n_max: usize,
    pub(super) budget_quantile: f64,
    pub(super) select: Select,
}

/// The fixed budgets N = 1, 2, 4, …, N_max (N_max last even when it is not
/// a power of two).
pub(super) fn budgets(n_max: usize) -> Vec<usize> {
    let mut out: Vec<usize> =
        std::iter::successors(Some(1usize), |n| Some(n * 2)).take_while(|&n| n < n_max).collect();
    out.push(n_max.max(1));
    out
}

/// The caps of the grid below N_max, then N_max.
fn caps(n_max: usize) -> Vec<usize> {
    let mut caps: Vec<usize> = CAPS.iter().copied().filter(|&c| c < n_max).collect();
    caps.push(n_max);
    caps
}

/// One adaptive point: a rule's knobs and the estimator it reads.
#[derive(Debug, Clone, Copy)]
pub(super) struct Spec {
    pub(super) params: RuleParams,
    /// `NoPrm` for `vote`, which reads no PRM.
    pub(super) estimator: Estimator,
}

/// Every rule's grid. `give_up` runs at N_max only: it caps hard questions
/// itself, and its grid is already the largest.
pub(super) fn specs(grid: &Grid) -> Vec<Spec> {
    let base = |rule, confidence, round, max_samples| RuleParams {
        rule,
        confidence,
        quantile: grid.budget_quantile,
        round,
        give_up_gain: 0.0,
        give_up_plausible: 1.0,
        max_samples,
    };
    let mut rules = Vec::new();
    for cap in caps(grid.n_max) {
        rules.extend(IAS_CONFIDENCES.iter().map(|&c| base(BudgetRule::Ias, c, 1, cap)));
        for round in ROUNDS {
            rules.extend(ROUND_CONFIDENCES.iter().map(|&c| base(BudgetRule::Sequential, c, round, cap)));
            rules.extend(VOTE_CONFIDENCES.iter().map(|&c| base(BudgetRule::Vote, c, round, cap)));
        }
    }
    for round in ROUNDS {
        let plausible = if round <= 2 { &GIVE_UP_PLAUSIBLE[..] } else { &[] };
        for c in ROUND_CONFIDENCES {
            for &g in &GIVE_UP_GAINS {
                rules.extend(std::iter::once(1.0).chain(plausible.iter().copied()).map(|r| RuleParams {
                    give_up_gain: g,
                    give_up_plausible: r,
                    ..base(BudgetRule::GiveUp, c, round, grid.n_max)
                }));
            }
        }
    }
    let estimators = [Estimator::Raw, Estimator::Calibrated, Estimator::Oracle];
    rules
        .into_iter()
        .flat_map(|params| {
            let each: Vec<Estimator> =
                if params.rule.needs_prm() { estimators.to_vec() } else { vec![Estimator::NoPrm] };
            each.into_iter().map(move |estimator| Spec { params, estimator })
        })
        .collect()
}

fn label(spec: &Spec) -> String {
    let p = &spec.params;
    let mut s = p.rule.name().to_string();
    if spec.estimator != Estimator::NoPrm {
        s += &format!(" {}", spec.estimator.name());
    }
    s += &format!(" C={}", p.confidence);
    if p.rule.in_rounds() {
        s += &format!(" round={}", p.round);
    }
    if p.rule == BudgetRule::GiveUp {
        s += &format!(" gain={}", p.give_up_gain);
        if p.give_up_plausible < 1.0 {
            s += &format!(" plausible={}", p.give_up_plausible);
        }
    }
    s + &format!(" N_max={}", p.max_samples)
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct SweepPoint {
    pub(super) label: String,
    /// None for the fixed curve.
    pub(super) rule: Option<BudgetRule>,
    /// None for the fixed curve (`none` for `vote`).
    pub(super) estimator: Option<Estimator>,
    pub(super) confidence: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) round: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) give_up_gain: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) give_up_plausible: Option<f64>,
    /// N for the fixed curve, the cap N_max for adaptive points.
    pub(super) max_samples: usize,
    #[serde(flatten)]
    pub(super) summary: Summary,
    /// 95% bootstrap interval over questions.
    pub(super) accuracy_ci: [f64; 2],
    /// Mean generated tokens over those of fixed best-of-N_max.
    pub(super) tokens_vs_fixed_max: f64,
    /// Questions per reason the rule stopped.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(super) stops: BTreeMap<&'static str, usize>,
    /// Per question: samples drawn and whether the answer was right (what
    /// the tests check a point by).
    #[cfg(test)]
    #[serde(skip)]
    pub(super) samples: Vec<usize>,
    #[cfg(test)]
    #[serde(skip)]
    pub(super) correct: Vec<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct PassAt {
    pub(super) n: usize,
    pub(super) accuracy: f64,
    pub(super) accuracy_ci: [f64; 2],
    /// As the fixed curve's point at the same N: the same samples.
    pub(super) tokens_vs_fixed_max: f64,
}

/// One level of the questions at the full budget: where selection loses
/// against pass@N_max, and the level's share of the fixed run's tokens.
#[derive(Debug, Clone, Serialize)]
pub(super) struct LevelPoint {
    pub(super) level: u8,
    pub(super) questions: usize,
    /// Fixed best-of-N_max, as the sweep's `select` chooses.
    pub(super) fixed_accuracy: f64,
    pub(super) pass_accuracy: f64,
    pub(super) token_share: f64,
}

/// One question's outcome at a point: the answer chosen among its first
/// `samples` as the view scores them.
struct Outcome {
    samples: usize,
    correct: bool,
    stop: Option<rules::Stop>,
}

/// The fixed run's questions, each seen by every estimator, with the
/// resamples every interval shares.
pub(super) struct Sweep<'a> {
    questions: &'a [SweepQuestion],
    /// Per question, indexed by [`Sweep::index`].
    views: Vec<[View; 4]>,
    grid: Grid,
    bootstrap: Bootstrap,
    /// Mean tokens per question of fixed best-of-N_max.
    fixed_max_tokens: f64,
}

impl<'a> Sweep<'a> {
    pub(super) fn new(questions: &'a [SweepQuestion], grid: Grid) -> Self {
        let total: usize = questions.iter().flat_map(|q| &q.candidates).map(|c| c.tokens).sum();
        let views = questions
            .iter()
            .map(|q| {
                [Estimator::NoPrm, Estimator::Raw, Estimator::Calibrated, Estimator::Oracle]
                    .map(|e| q.view(e))
            })
            .collect();
        Self {
            questions,
            views,
            grid,
            bootstrap: Bootstrap::new(questions.len(), RESAMPLES, SEED),
            fixed_max_tokens: total as f64 / questions.len().max(1) as f64,
        }
    }

    fn index(estimator: Estimator) -> usize {
        match estimator {
            Estimator::NoPrm => 0,
            Estimator::Raw => 1,
            Estimator::Calibrated => 2,
            Estimator::Oracle => 3,
        }
    }

    fn tokens_vs_fixed_max(&self, mean_tokens: f64) -> f64 {
        mean_tokens / self.fixed_max_tokens.max(f64::MIN_POSITIVE)
    }

    /// The answer `select` chooses among the first `n` samples of question
    /// `q`, as `estimator` scores them.
    fn outcome(&self, q: usize, estimator: Estimator, n: usize, select: Select) -> Outcome {
        let view = &self.views[q][Self::index(estimator)];
        let n = n.clamp(1, view.candidates.len().max(1)).min(view.candidates.len());
        let best = choose(&view.candidates[..n], select, 1);
        Outcome {
            samples: n,
            correct: best.first().is_some_and(|c| self.questions[q].is_correct(c)),
            stop: None,
        }
    }

    /// The fixed curve: best-of-N over the first N samples, chosen with the
    /// calibrated scores by the sweep's `select`.
    pub(super) fn fixed_curve(&self) -> Vec<SweepPoint> {
        budgets(self.grid.n_max)
            .into_iter()
            .map(|n| {
                let outcomes: Vec<Outcome> = (0..self.questions.len())
                    .map(|q| self.outcome(q, Estimator::Calibrated, n, self.grid.select))
                    .collect();
                self.point(format!("fixed N={n}"), None, None, n, &outcomes, true)
            })
            .collect()
    }

    /// pass@N: a right answer among the first N samples (a perfect selector).
    pub(super) fn pass_at(&self, fixed: &[SweepPoint]) -> Vec<PassAt> {
        fixed
            .iter()
            .map(|f| {
                let correct: Vec<bool> = self.questions.iter().map(|q| q.pass(f.max_samples)).collect();
                PassAt {
                    n: f.max_samples,
                    accuracy: share(&correct),
                    accuracy_ci: self.bootstrap.interval(&correct),
                    tokens_vs_fixed_max: f.tokens_vs_fixed_max,
                }
            })
            .collect()
    }

    /// Fixed best-of-N_max against pass@N_max, level by level.
    pub(super) fn per_level(&self) -> Vec<LevelPoint> {
        let tokens = |q: &SweepQuestion| q.candidates.iter().map(|c| c.tokens).sum::<usize>();
        let all: usize = self.questions.iter().map(tokens).sum();
        let mut levels: Vec<u8> = self.questions.iter().map(|q| q.level).collect();
        levels.sort_unstable();
        levels.dedup();
        levels
            .into_iter()
            .map(|level| {
                let idx: Vec<usize> =
                    (0..self.questions.len()).filter(|&i| self.questions[i].level == level).collect();
                let n = idx.len().max(1) as f64;
                let fixed = idx
                    .iter()
                    .filter(|&&i| {
                        self.outcome(i, Estimator::Calibrated, self.grid.n_max, self.grid.select).correct
                    })
                    .count();
                let pass = idx.iter().filter(|&&i| self.questions[i].pass(self.grid.n_max)).count();
                let mine: usize = idx.iter().map(|&i| tokens(&self.questions[i])).sum();
                LevelPoint {
                    level,
                    questions: idx.len(),
                    fixed_accuracy: fixed as f64 / n,
                    pass_accuracy: pass as f64 / n,
                    token_share: mine as f64 / all.max(1) as f64,
                }
            })
            .collect()
    }

    /// Every point of every rule's grid (in parallel: they are independent).
    pub(super) fn rule_points(&self) -> Vec<SweepPoint> {
        specs(&self.grid).par_iter().map(|s| self.rule_point(s)).collect()
    }

    /// One rule point: each question replays the rule over its samples as
    /// the estimator scores them, then answers as the request would. The
    /// oracle chooses by its own scores with `prm_max`, that is a right
    /// answer once one is drawn; `vote` takes the majority answer.
    pub(super) fn rule_point(&self, spec: &Spec) -> SweepPoint {
        let select = match spec.estimator {
            Estimator::NoPrm => Select::Majority,
            Estimator::Oracle => Select::PrmMax,
            Estimator::Raw | Estimator::Calibrated => self.grid.select,
        };
        let view = Self::index(spec.estimator);
        let outcomes: Vec<Outcome> = (0..self.questions.len())
            .map(|q| {
                let v = &self.views[q][view];
                let (n, stop) = rules::replay(&spec.params, v.root, &v.candidates, select);
                Outcome { stop: Some(stop), ..self.outcome(q, spec.estimator, n, select) }
            })
            .collect();
        let p = &spec.params;
        let mut point = self.point(
            label(spec),
            Some(spec),
            Some(p.confidence),
            p.max_samples,
            &outcomes,
            p.rule.needs_prm(),
        );
        point.round = p.rule.in_rounds().then_some(p.round);
        point.give_up_gain = (p.rule == BudgetRule::GiveUp).then_some(p.give_up_gain);
        point.give_up_plausible = (p.rule == BudgetRule::GiveUp).then_some(p.give_up_plausible);
        point
    }

    /// A point from its questions' outcomes; `scored`: whether the PRM
    /// scored the question and each sample.
    fn point(
        &self,
        label: String,
        spec: Option<&Spec>,
        confidence: Option<f64>,
        max_samples: usize,
        outcomes: &[Outcome],
        scored: bool,
    ) -> SweepPoint {
        let rows: Vec<(u8, bool, usize, usize, usize, usize)> = outcomes
            .iter()
            .zip(self.questions)
            .map(|(o, q)| {
                let tokens = q.candidates[..o.samples].iter().map(|c| c.tokens).sum();
                let all = q.candidates.iter().map(|c| c.tokens).sum();
                (q.level, o.correct, o.samples, tokens, all, if scored { o.samples + 1 } else { 0 })
            })
            .collect();
        let summary = summarize(&rows);
        let correct: Vec<bool> = outcomes.iter().map(|o| o.correct).collect();
        let mut stops = BTreeMap::new();
        for stop in outcomes.iter().filter_map(|o| o.stop) {
            *stops.entry(stop.name()).or_default() += 1;
        }
        SweepPoint {
            label,
            rule: spec.map(|s| s.params.rule),
            estimator: spec.map(|s| s.estimator),
            confidence,
            round: None,
            give_up_gain: None,
            give_up_plausible: None,
            max_samples,
            accuracy_ci: self.bootstrap.interval(&correct),
            tokens_vs_fixed_max: self.tokens_vs_fixed_max(summary.mean_generated_tokens),
            summary,
            stops,
            #[cfg(test)]
            samples: outcomes.iter().map(|o| o.samples).collect(),
            #[cfg(test)]
            correct,
        }
    }
}

fn share(xs: &[bool]) -> f64 {
    xs.iter().filter(|&&x| x).count() as f64 / xs.len().max(1) as f64
}

#[cfg(test)]
pub(super) mod tests {
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
    pub(in crate::eval) fn questions() -> Vec<SweepQuestion> {
        let root = |q10: f32, raw: f32| PrmScore { quantiles: Quantiles::point(q10), raw: Some(raw) };
        let easy = SweepQuestion {
            id: "easy".into(),
            level: 1,
            root: root(0.9, 0.95),
            candidates: (0..8).map(|_| cand("2", 0.9, 0.9, 10)).collect(),
            correct_answers: HashSet::from(["2".to_string()]),
        };
        let mut hard: Vec<Candidate> = (0..8).map(|i| cand(&format!("{}", 10 + i), 0.1, 0.8, 30)).collect();
        hard[3] = cand("7", 0.6, 0.3, 30);
        let hard = SweepQuestion {
            id: "hard".into(),
            level: 2,
            root: root(0.05, 0.95),
            candidates: hard,
            correct_answers: HashSet::from(["7".to_string()]),
        };
        vec![easy, hard]
    }

    pub(in crate::eval) const GRID: Grid = Grid { n_max: 8, budget_quantile: 0.1, select: Select::PrmMax };

    fn spec(rule: BudgetRule, estimator: Estimator, confidence: f64, round: usize) -> Spec {
        let params = RuleParams {
            rule,
            confidence,
            quantile: 0.1,
            round,
            give_up_gain: 0.02,
            give_up_plausible: 1.0,
            max_samples: GRID.n_max,
        };
        Spec { params, estimator }
    }

    #[test]
    fn the_fixed_curve_takes_the_first_n_samples_of_each_question() {
        let qs = questions();
        let fixed = Sweep::new(&qs, GRID).fixed_curve();
        assert_eq!(fixed.iter().map(|p| p.max_samples).collect::<Vec<_>>(), [1, 2, 4, 8]);
        // Only N ≥ 4 reaches the hard question's one right answer.
        assert_eq!(fixed.iter().map(|p| p.summary.accuracy).collect::<Vec<_>>(), [0.5, 0.5, 1.0, 1.0]);
        assert_eq!(fixed[3].tokens_vs_fixed_max, 1.0);
        assert!((fixed[0].tokens_vs_fixed_max - 40.0 / 320.0).abs() < 1e-12);
        assert!(fixed.iter().all(|p| p.rule.is_none() && p.estimator.is_none()));
    }

    #[test]
    fn pass_at_n_counts_questions_with_a_right_answer_among_their_first_n_samples() {
        let mut qs = questions();
        // A third question the run never gets right.
        let mut never = questions().remove(1);
        never.correct_answers = HashSet::from(["99".to_string()]);
        qs.push(never);
        let sweep = Sweep::new(&qs, GRID);
        let pass = sweep.pass_at(&sweep.fixed_curve());
        assert_eq!(pass.iter().map(|p| p.n).collect::<Vec<_>>(), [1, 2, 4, 8]);
        let third = 1.0 / 3.0;
        let want = [third, third, 2.0 * third, 2.0 * third];
        assert!(pass.iter().zip(want).all(|(p, w)| (p.accuracy - w).abs() < 1e-12));
        assert!(pass.iter().all(|p| p.accuracy_ci[0] <= p.accuracy && p.accuracy <= p.accuracy_ci[1]));
    }

    #[test]
    fn a_sequential_point_stops_earlier_on_an_easy_question_than_on_a_hard_one() {
        let qs = questions();
        let p =
            Sweep::new(&qs, GRID).rule_point(&spec(BudgetRule::Sequential, Estimator::Calibrated, 0.8, 1));
        // The easy question's first sample is scored 0.9 ≥ C; the hard
        // question's best is 0.6, so it draws all 8.
        assert_eq!(p.samples, [1, 8]);
        assert_eq!(p.correct, [true, true]);
        assert_eq!(p.stops, BTreeMap::from([("confident", 1), ("exhausted", 1)]));
        assert_eq!((p.round, p.give_up_gain), (Some(1), None));
    }

    #[test]
    fn the_oracle_is_right_exactly_when_a_right_answer_is_among_its_samples() {
        let qs = questions();
        let sweep = Sweep::new(&qs, GRID);
        for s in specs(&GRID).iter().filter(|s| s.estimator == Estimator::Oracle) {
            let p = sweep.rule_point(s);
            let pass: Vec<bool> = qs.iter().zip(&p.samples).map(|(q, &n)| q.pass(n)).collect();
            assert_eq!(p.correct, pass, "{}", p.label);
        }
        // Stopping at the first right answer, sequential reaches pass@N_max
        // with fewer samples: 1 for the easy question, 4 for the hard one.
        let p = sweep.rule_point(&spec(BudgetRule::Sequential, Estimator::Oracle, 0.9, 1));
        let pass = sweep.pass_at(&sweep.fixed_curve());
        assert_eq!(p.summary.accuracy, pass.last().expect("pass@N_max").accuracy);
        assert_eq!(p.samples, [1, 4]);
    }

    #[test]
    fn vote_reads_no_prm_and_ias_budgets_come_from_the_estimate() {
        let qs = questions();
        let sweep = Sweep::new(&qs, GRID);
        let vote = sweep.rule_point(&spec(BudgetRule::Vote, Estimator::NoPrm, 0.8, 2));
        assert_eq!(vote.summary.mean_prm_evaluations, 0.0);
        // Two agreeing votes (posterior 7/8) stop the easy question; the
        // hard one's answers all differ.
        assert_eq!(vote.samples, [2, 8]);
        // Calibrated q10 0.05 at C 0.99 wants 90 samples: the cap; the raw
        // head's overconfident 0.95 asks for 2; the oracle's 1/8 wants 35.
        let ias = |e| sweep.rule_point(&spec(BudgetRule::Ias, e, 0.99, 1)).samples;
        assert_eq!(ias(Estimator::Calibrated)[1], 8);
        assert_eq!(ias(Estimator::Raw)[1], 2);
        assert_eq!(ias(Estimator::Oracle), [1, 8], "the easy question's p = 1 needs one sample");
    }

    #[test]
    fn the_grid_covers_every_rule_and_labels_each_point_uniquely() {
        let all = specs(&GRID);
        let labels: HashSet<String> = all.iter().map(label).collect();
        assert_eq!(labels.len(), all.len());
        for rule in [BudgetRule::Ias, BudgetRule::Sequential, BudgetRule::GiveUp, BudgetRule::Vote] {
            assert!(all.iter().any(|s| s.params.rule == rule), "{rule:?}");
        }
        assert!(all.iter().all(|s| s.params.max_samples <= GRID.n_max));
        assert!(all.iter().all(|s| (s.params.rule == BudgetRule::Vote) == (s.estimator == Estimator::NoPrm)));
        assert_eq!(budgets(6), [1, 2, 4, 6]);
        assert_eq!(budgets(1), [1]);
    }
}
