//! Budget rules: when an adaptive request stops drawing samples. `ias` is
//! the paper's rule (one budget from the question's estimate); the others
//! go beyond it and draw in rounds, deciding after each round from what the
//! finished samples show (`docs/method.md` gives each formula and why).
//!
//! The decision logic is plain functions over scores and answers, shared by
//! the strategies (online) and `ponder eval --sweep` (replayed over one
//! fixed run), so that the sweep measures exactly what the server does.

use serde::{Deserialize, Serialize};

use super::ias;
use crate::prm::{PrmScore, Quantiles};

/// How an adaptive request sets its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum BudgetRule {
    /// The paper's rule: N = min(N_max, N_IAS(p; C)) from the question alone.
    Ias,
    /// Rounds of samples; stop once the selected answer's calibrated
    /// success probability reaches C.
    Sequential,
    /// `sequential`, and also stop (give up) once another round is expected
    /// to add less than `give_up_gain` to the chance of a right answer.
    GiveUp,
    /// No PRM: rounds of samples; stop once the leading answer is the
    /// majority with posterior probability C (Adaptive-Consistency).
    Vote,
}

impl BudgetRule {
    pub fn name(self) -> &'static str {
        match self {
            BudgetRule::Ias => "ias",
            BudgetRule::Sequential => "sequential",
            BudgetRule::GiveUp => "give_up",
            BudgetRule::Vote => "vote",
        }
    }

    /// Whether the rule reads PRM scores (all but `vote`).
    pub fn needs_prm(self) -> bool {
        !matches!(self, BudgetRule::Vote)
    }

    /// Whether samples are drawn in rounds.
    pub fn in_rounds(self) -> bool {
        !matches!(self, BudgetRule::Ias)
    }
}

/// Why an adaptive request stopped drawing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// It drew the budget it set at the start (`ias`, fixed budgets).
    Budget,
    /// The selected answer (or the vote) reached the confidence asked for.
    Confident,
    /// Another round was not worth it: the question looks hopeless.
    GaveUp,
    /// It reached N_max.
    Exhausted,
}

impl Stop {
    pub fn name(self) -> &'static str {
        match self {
            Stop::Budget => "budget",
            Stop::Confident => "confident",
            Stop::GaveUp => "gave_up",
            Stop::Exhausted => "exhausted",
        }
    }
}

/// The knobs of a rule, from the request (or the model's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RuleParams {
    pub rule: BudgetRule,
    /// C.
    pub confidence: f64,
    /// The quantile of an estimate taken as its probability.
    pub quantile: f64,
    /// Samples per round (the first round may be smaller, see [`first_round`]).
    pub round: usize,
    /// `give_up`: the least expected gain of another round worth drawing.
    pub give_up_gain: f64,
    /// `give_up` does not give up once a finished sample's raw PRM score
    /// exceeds this (1: never holds it back).
    pub give_up_plausible: f64,
    /// N_max.
    pub max_samples: usize,
}

/// The first round: N_IAS of the question's estimate when that is smaller
/// than a round (an easy question starts with one or two samples), at
/// least `min` (the answers asked for).
pub fn first_round(p: &RuleParams, root: Option<f64>, min: usize) -> usize {
    let round = p.round.min(p.max_samples).max(1);
    let n = match root {
        Some(x) if p.rule != BudgetRule::Vote => round.min(ias::samples(x, p.confidence, p.max_samples)),
        _ => round,
    };
    n.max(min).min(p.max_samples.max(min))
}

/// A success probability θ per sample of this question: ten equally likely
/// points of the question's estimated quantile function (linear between
/// q10, q50 and q90, flat outside them) at levels 0.05, 0.15, …, 0.95,
/// updated by every sample drawn. Ten points rather than the three
/// quantiles keep mass between q50 and q90, where a hard but solvable
/// question's rate (a few percent) usually lies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SuccessPrior {
    points: [f64; PRIOR_POINTS],
    weights: [f64; PRIOR_POINTS],
}

const PRIOR_POINTS: usize = 10;

impl SuccessPrior {
    pub fn new(q: Quantiles) -> Self {
        let points = std::array::from_fn(|i| q.at((i as f64 + 0.5) / PRIOR_POINTS as f64) as f64);
        Self { points, weights: [1.0 / PRIOR_POINTS as f64; PRIOR_POINTS] }
    }

    /// A sample the PRM judges right with probability `s`: each point is
    /// reweighted by that evidence's likelihood, s·θ + (1 − s)(1 − θ).
    pub fn observe(&mut self, s: f64) {
        let s = s.clamp(0.0, 1.0);
        for (w, &t) in self.weights.iter_mut().zip(&self.points) {
            *w *= s * t + (1.0 - s) * (1.0 - t);
        }
        let total: f64 = self.weights.iter().sum();
        if total > 0.0 && total.is_finite() {
            self.weights.iter_mut().for_each(|w| *w /= total);
        } else {
            // Evidence no point explains (θ exactly 0 or 1 against it): keep
            // the most pessimistic point, the one that explains failures.
            self.weights = [0.0; PRIOR_POINTS];
            self.weights[0] = 1.0;
        }
    }

    /// The chance that `r` more samples hold at least one right answer.
    pub fn hit(&self, r: usize) -> f64 {
        self.points
            .iter()
            .zip(&self.weights)
            .map(|(&t, &w)| w * (1.0 - (1.0 - t.clamp(0.0, 1.0)).powi(r as i32)))
            .sum()
    }

    pub fn mean(&self) -> f64 {
        self.points.iter().zip(&self.weights).map(|(t, w)| t * w).sum()
    }
}

/// The expected gain of one more round of `r` samples: the chance that the
/// answer in hand is wrong times the chance the round holds a right one.
pub fn round_gain(prior: &SuccessPrior, selected: f64, r: usize) -> f64 {
    (1.0 - selected.clamp(0.0, 1.0)) * prior.hit(r)
}

/// Beam search's gain of expanding the `kept` paths: the chance that the
/// answer in hand is wrong times the chance, by their upper quantiles, that
/// at least one kept path still leads to a right answer.
pub fn beam_gain(kept: &[Quantiles], held: f64) -> f64 {
    let none = kept.iter().fold(1.0, |acc, q| acc * (1.0 - (q.q90 as f64).clamp(0.0, 1.0)));
    (1.0 - held.clamp(0.0, 1.0)) * (1.0 - none)
}

/// Adaptive-Consistency's stopping statistic (Aggarwal et al. 2023, the
/// Beta criterion): with c1 votes for the leading answer and c2 for the
/// runner-up, the posterior probability that the leader's share is the
/// larger, P(X > 1/2) for X ~ Beta(c1 + 1, c2 + 1). For integer parameters
/// that is P(Binomial(c1 + c2 + 1, 1/2) ≤ c1).
pub fn majority_posterior(c1: usize, c2: usize) -> f64 {
    let n = c1 + c2 + 1;
    // Sum C(n, k) / 2^n for k ≤ c1 in logs: n can reach N_max + 1.
    let ln_half_n = n as f64 * 0.5f64.ln();
    let mut ln_choose = 0.0; // ln C(n, 0)
    let mut total = 0.0;
    for k in 0..=c1.min(n) {
        if k > 0 {
            ln_choose += ((n - k + 1) as f64).ln() - (k as f64).ln();
        }
        total += (ln_choose + ln_half_n).exp();
    }
    total.min(1.0)
}

/// What a rule decides after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Draw this many more samples.
    Draw(usize),
    Stop(Stop),
}

/// The state of a request drawing in rounds: what it has seen so far.
#[derive(Debug, Clone)]
pub struct Rounds {
    params: RuleParams,
    prior: Option<SuccessPrior>,
    drawn: usize,
    /// A finished sample's raw score has exceeded `give_up_plausible`.
    plausible: bool,
}

/// One finished sample as the rule sees it.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub answer: &'a str,
    /// The PRM's estimate that this answer is right, calibrated and raw
    /// (None without a PRM).
    pub score: Option<PrmScore>,
}

impl Rounds {
    /// `root`: the question's estimate (None without a PRM, or for `vote`).
    pub fn new(params: RuleParams, root: Option<Quantiles>) -> Self {
        Self { params, prior: root.map(SuccessPrior::new), drawn: 0, plausible: false }
    }

    pub fn params(&self) -> &RuleParams {
        &self.params
    }

    /// After a round: `all` holds every sample drawn so far, the new ones
    /// last (`new` of them), and `selected` the score of the answer the
    /// request would return now.
    pub fn decide(&mut self, all: &[Seen<'_>], new: usize, selected: Option<Quantiles>) -> Decision {
        let p = self.params;
        self.drawn = all.len();
        for s in &all[all.len().saturating_sub(new)..] {
            let Some(score) = s.score else { continue };
            if let Some(prior) = &mut self.prior {
                prior.observe(score.quantiles.at(0.5) as f64);
            }
            self.plausible |= score.raw.is_some_and(|r| r as f64 > p.give_up_plausible);
        }
        let left = p.max_samples.saturating_sub(self.drawn);
        let confident = match p.rule {
            BudgetRule::Ias => return Decision::Stop(Stop::Budget),
            BudgetRule::Vote => vote_confidence(all) >= p.confidence,
            BudgetRule::Sequential | BudgetRule::GiveUp => {
                selected.is_some_and(|q| q.at(p.quantile) as f64 >= p.confidence)
            }
        };
        if confident {
            return Decision::Stop(Stop::Confident);
        }
        if left == 0 {
            return Decision::Stop(Stop::Exhausted);
        }
        let next = p.round.max(1).min(left);
        // Why the raw score: calibration, fitted to labels that are mostly 0
        // on the hardest questions, pushes every wrong answer's estimate
        // there to about 0, while the raw score still tells a near miss
        // from a hopeless one (docs/method.md, `give_up`).
        if p.rule == BudgetRule::GiveUp
            && !self.plausible
            && let Some(prior) = &self.prior
        {
            let held = selected.map_or(0.0, |q| q.at(0.5) as f64);
            if round_gain(prior, held, next) < p.give_up_gain {
                return Decision::Stop(Stop::GaveUp);
            }
        }
        Decision::Draw(next)
    }
}

/// How many of `candidates` (in the order they were drawn) a request under
/// `params` draws, and why it stops: the rounds the strategy runs, replayed
/// over samples already drawn (`ponder eval --sweep`). Each round's answer
/// is chosen by `select`, as the request would return it.
pub fn replay(
    params: &RuleParams,
    root: Option<Quantiles>,
    candidates: &[super::Candidate],
    select: super::Select,
) -> (usize, Stop) {
    let cap = params.max_samples.min(candidates.len()).max(1);
    if params.rule == BudgetRule::Ias {
        let p = root.map_or(0.0, |q| q.at(params.quantile) as f64);
        return (ias::samples(p, params.confidence, cap), Stop::Budget);
    }
    let params = RuleParams { max_samples: cap, ..*params };
    let mut rounds = Rounds::new(params, root.filter(|_| params.rule.needs_prm()));
    let mut n = first_round(&params, root.map(|q| q.at(params.quantile) as f64), 1);
    let mut new = n;
    loop {
        let drawn = &candidates[..n];
        let seen: Vec<Seen<'_>> = drawn.iter().map(|c| Seen { answer: &c.answer, score: c.score }).collect();
        let selected =
            super::select::choose(drawn, select, 1).first().and_then(|c| c.score).map(|s| s.quantiles);
        match rounds.decide(&seen, new, selected) {
            Decision::Draw(k) => {
                new = k;
                n += k;
            }
            Decision::Stop(stop) => return (n, stop),
        }
    }
}

/// The majority posterior of the answers so far.
pub fn vote_confidence(all: &[Seen<'_>]) -> f64 {
    let mut counts: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    // An empty sample agrees with nothing: it is no answer.
    for s in all.iter().filter(|s| !s.answer.is_empty()) {
        *counts.entry(s.answer).or_default() += 1;
    }
    let mut c: Vec<usize> = counts.into_values().collect();
    c.sort_unstable_by(|a, b| b.cmp(a));
    match c.as_slice() {
        [] => 0.0,
        [c1] => majority_posterior(*c1, 0),
        [c1, c2, ..] => majority_posterior(*c1, *c2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(rule: BudgetRule) -> RuleParams {
        RuleParams {
            rule,
            confidence: 0.9,
            quantile: 0.1,
            round: 4,
            give_up_gain: 0.02,
            give_up_plausible: 1.0,
            max_samples: 64,
        }
    }

    fn seen(answer: &str, q: f32) -> Seen<'_> {
        Seen { answer, score: Some(PrmScore { quantiles: Quantiles::point(q), raw: None }) }
    }

    #[test]
    fn the_majority_posterior_matches_the_beta_integral() {
        // One vote: P(X > 1/2), X ~ Beta(2, 1) = 1 − 1/4.
        assert!((majority_posterior(1, 0) - 0.75).abs() < 1e-12);
        // Beta(3, 1): 1 − 1/8; Beta(5, 1): 1 − 1/32.
        assert!((majority_posterior(2, 0) - 0.875).abs() < 1e-12);
        assert!((majority_posterior(4, 0) - 31.0 / 32.0).abs() < 1e-12);
        // A tie is a coin flip.
        assert!((majority_posterior(3, 3) - 0.5).abs() < 1e-12);
        // Large counts stay finite and ordered.
        assert!(majority_posterior(40, 20) > majority_posterior(30, 20));
        assert!(majority_posterior(200, 10) <= 1.0);
    }

    #[test]
    fn an_easy_question_starts_with_its_ias_budget_and_a_hard_one_with_a_round() {
        let p = params(BudgetRule::Sequential);
        assert_eq!(first_round(&p, Some(0.95), 1), 1);
        assert_eq!(first_round(&p, Some(0.01), 1), 4);
        assert_eq!(first_round(&p, None, 1), 4);
        assert_eq!(first_round(&p, Some(0.95), 3), 3, "at least the answers asked for");
        let v = params(BudgetRule::Vote);
        assert_eq!(first_round(&v, Some(0.95), 1), 4, "vote ignores PRM estimates");
    }

    #[test]
    fn sequential_stops_on_a_confident_answer_and_draws_on_otherwise() {
        let mut r = Rounds::new(params(BudgetRule::Sequential), Some(Quantiles::point(0.5)));
        let round = [seen("3", 0.2), seen("4", 0.3)];
        assert_eq!(r.decide(&round, 2, Some(Quantiles::point(0.3))), Decision::Draw(4));
        let more = [seen("3", 0.2), seen("4", 0.3), seen("5", 0.95)];
        assert_eq!(r.decide(&more, 1, Some(Quantiles::point(0.95))), Decision::Stop(Stop::Confident));
    }

    #[test]
    fn give_up_stops_on_hopeless_scores_and_sequential_does_not() {
        let root = Quantiles { q10: 0.0, q50: 0.002, q90: 0.01 };
        let wrong: Vec<Seen<'_>> = (0..4).map(|_| seen("1", 0.01)).collect();
        let mut g = Rounds::new(params(BudgetRule::GiveUp), Some(root));
        assert_eq!(g.decide(&wrong, 4, Some(Quantiles::point(0.01))), Decision::Stop(Stop::GaveUp));
        let mut s = Rounds::new(params(BudgetRule::Sequential), Some(root));
        assert_eq!(s.decide(&wrong, 4, Some(Quantiles::point(0.01))), Decision::Draw(4));
        // A promising question is not given up.
        let mut g = Rounds::new(params(BudgetRule::GiveUp), Some(Quantiles { q10: 0.2, q50: 0.4, q90: 0.7 }));
        assert_eq!(g.decide(&wrong, 4, Some(Quantiles::point(0.01))), Decision::Draw(4));
    }

    #[test]
    fn give_up_does_not_give_up_once_a_wrong_answer_looks_plausible_to_the_raw_prm() {
        let root = Quantiles { q10: 0.0, q50: 0.002, q90: 0.01 };
        let p = RuleParams { give_up_plausible: 0.05, ..params(BudgetRule::GiveUp) };
        let scored = |raw: f32| Seen {
            answer: "1",
            score: Some(PrmScore { quantiles: Quantiles::point(0.01), raw: Some(raw) }),
        };
        let hopeless: Vec<Seen<'_>> = (0..4).map(|_| scored(0.01)).collect();
        let mut g = Rounds::new(p, Some(root));
        assert_eq!(g.decide(&hopeless, 4, Some(Quantiles::point(0.01))), Decision::Stop(Stop::GaveUp));
        let near_miss: Vec<Seen<'_>> = (0..4).map(|i| scored(if i == 2 { 0.2 } else { 0.01 })).collect();
        let mut g = Rounds::new(p, Some(root));
        assert_eq!(g.decide(&near_miss, 4, Some(Quantiles::point(0.01))), Decision::Draw(4));
        // Once seen, the near miss holds in later rounds, and N_max still ends the request.
        let more: Vec<Seen<'_>> = near_miss.iter().copied().chain((0..4).map(|_| scored(0.01))).collect();
        assert_eq!(g.decide(&more, 4, Some(Quantiles::point(0.01))), Decision::Draw(4));
        let mut capped = Rounds::new(RuleParams { max_samples: 4, ..p }, Some(root));
        assert_eq!(
            capped.decide(&near_miss, 4, Some(Quantiles::point(0.01))),
            Decision::Stop(Stop::Exhausted)
        );
    }

    #[test]
    fn rounds_never_pass_n_max() {
        let mut r = Rounds::new(RuleParams { max_samples: 6, ..params(BudgetRule::Sequential) }, None);
        let four: Vec<Seen<'_>> = (0..4).map(|_| seen("1", 0.1)).collect();
        assert_eq!(r.decide(&four, 4, Some(Quantiles::point(0.1))), Decision::Draw(2));
        let six: Vec<Seen<'_>> = (0..6).map(|_| seen("1", 0.1)).collect();
        assert_eq!(r.decide(&six, 2, Some(Quantiles::point(0.1))), Decision::Stop(Stop::Exhausted));
    }

    #[test]
    fn failures_move_the_prior_towards_its_lower_quantile() {
        let mut p = SuccessPrior::new(Quantiles { q10: 0.05, q50: 0.3, q90: 0.6 });
        let before = p.mean();
        for _ in 0..8 {
            p.observe(0.0);
        }
        assert!(p.mean() < before / 2.0, "{} -> {}", before, p.mean());
        assert!(p.hit(4) < SuccessPrior::new(Quantiles { q10: 0.05, q50: 0.3, q90: 0.6 }).hit(4));
        // Certain evidence against every point keeps the most pessimistic one.
        let mut certain = SuccessPrior::new(Quantiles::point(1.0));
        certain.observe(0.0);
        assert_eq!(certain.mean(), 1.0);
    }

    #[test]
    fn vote_stops_once_the_leader_is_clear() {
        let mut r = Rounds::new(RuleParams { confidence: 0.95, ..params(BudgetRule::Vote) }, None);
        let split = [Seen { answer: "1", score: None }, Seen { answer: "2", score: None }];
        assert_eq!(r.decide(&split, 2, None), Decision::Draw(4));
        let agree: Vec<Seen<'_>> = (0..5).map(|_| Seen { answer: "7", score: None }).collect();
        assert_eq!(r.decide(&agree, 5, None), Decision::Stop(Stop::Confident));
    }

    #[test]
    fn empty_answers_never_make_a_vote_confident() {
        let silent: Vec<Seen<'_>> = (0..9).map(|_| Seen { answer: "", score: None }).collect();
        assert_eq!(vote_confidence(&silent), 0.0);
        let mut mixed = silent.clone();
        mixed.push(Seen { answer: "7", score: None });
        assert_eq!(vote_confidence(&mixed), vote_confidence(&[Seen { answer: "7", score: None }]));
    }
}
