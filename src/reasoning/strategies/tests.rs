//! The strategies against a fake engine and scorer.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::{Future, ready};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::super::*;
use crate::prm::{PrmScore, Quantiles};
use crate::reasoning::rules::{BudgetRule, Stop};

const STEPS: usize = 3;
const TOKENS_PER_STEP: usize = 10;

struct FakeTraj {
    steps: Vec<String>,
    correct: bool,
}

/// Solutions take `STEPS` steps and end with 42 (right) or 13 (wrong);
/// a sample from the question is right with probability `p`, children
/// inherit their parent's fate. The PRM sees the fate (a perfect ranker)
/// and says `root` for the question alone.
struct Fake {
    st: RefCell<State>,
}

struct State {
    trajs: HashMap<Traj, FakeTraj>,
    next: Traj,
    generated: usize,
    p: f64,
    root: Quantiles,
    /// What the PRM says of a path bound to be wrong, calibrated and raw.
    wrong: Quantiles,
    wrong_raw: Option<f32>,
    rng: ChaCha8Rng,
    extend_calls: Vec<usize>,
    score_calls: Vec<usize>,
    forks: Vec<usize>,
    /// The sizes of the forks from the question itself.
    root_forks: Vec<usize>,
    /// Every sample ends at once, before its first step.
    silent: bool,
    /// Wrong samples are cut off by a limit one step before their answer.
    cut_wrong: bool,
}

impl Fake {
    fn new(p: f64, root: Quantiles) -> Self {
        let mut trajs = HashMap::new();
        trajs.insert(0, FakeTraj { steps: vec![], correct: false });
        Self {
            st: RefCell::new(State {
                trajs,
                next: 1,
                generated: 0,
                p,
                root,
                wrong: Quantiles::sorted([0.02, 0.1, 0.2]),
                wrong_raw: None,
                rng: ChaCha8Rng::seed_from_u64(7),
                extend_calls: vec![],
                score_calls: vec![],
                forks: vec![],
                root_forks: vec![],
                silent: false,
                cut_wrong: false,
            }),
        }
    }

    fn with_wrong_scores(self, q: Quantiles) -> Self {
        self.st.borrow_mut().wrong = q;
        self
    }

    fn with_wrong_raw(self, raw: f32) -> Self {
        self.st.borrow_mut().wrong_raw = Some(raw);
        self
    }

    fn silent(self) -> Self {
        self.st.borrow_mut().silent = true;
        self
    }

    fn cut_wrong(self) -> Self {
        self.st.borrow_mut().cut_wrong = true;
        self
    }

    fn live(&self) -> usize {
        self.st.borrow().trajs.len()
    }
}

impl Trajectories for Fake {
    fn root(&self) -> Traj {
        0
    }

    fn fork(&self, t: Traj, k: usize) -> Result<Vec<Traj>, ReasoningError> {
        let mut st = self.st.borrow_mut();
        st.forks.push(k);
        if t == 0 {
            st.root_forks.push(k);
        }
        let (steps, inherited) = {
            let parent = st.trajs.get(&t).ok_or(ReasoningError::UnknownTrajectory(t))?;
            (parent.steps.clone(), parent.correct)
        };
        let mut out = Vec::new();
        for _ in 0..k {
            let p = st.p;
            let correct = if t == 0 { st.rng.random_bool(p) } else { inherited };
            let id = st.next;
            st.next += 1;
            st.trajs.insert(id, FakeTraj { steps: steps.clone(), correct });
            out.push(id);
        }
        Ok(out)
    }

    fn release(&self, ts: &[Traj]) {
        let mut st = self.st.borrow_mut();
        for t in ts {
            st.trajs.remove(t);
        }
    }

    fn info(&self, t: Traj) -> TrajInfo {
        let st = self.st.borrow();
        let tr = &st.trajs[&t];
        let cut = st.cut_wrong && !tr.correct && tr.steps.len() == STEPS;
        let done = tr.steps.len() == STEPS + 1 || (st.silent && t != 0);
        TrajInfo {
            text: tr.steps.join("\n\n"),
            finished: done || cut,
            ended: done,
            tokens: tr.steps.len() * TOKENS_PER_STEP,
            steps: tr.steps.clone(),
        }
    }

    fn generated_tokens(&self) -> usize {
        self.st.borrow().generated
    }

    fn extend(&self, ts: &[Traj]) -> impl Future<Output = Result<(), ReasoningError>> {
        let mut st = self.st.borrow_mut();
        st.extend_calls.push(ts.len());
        for t in ts {
            let tr = st.trajs.get_mut(t).expect("live trajectory");
            let k = tr.steps.len();
            let step = if k < STEPS {
                format!("step {k}")
            } else if tr.correct {
                "The answer is 42.".into()
            } else {
                // Wrong answers differ from each other, as a policy's slips do.
                format!("The answer is {}.", 100 + *t % 50)
            };
            tr.steps.push(step);
            st.generated += TOKENS_PER_STEP;
        }
        ready(Ok(()))
    }

    fn score(&self, ts: &[Traj]) -> impl Future<Output = Result<Vec<PrmScore>, ReasoningError>> {
        let mut st = self.st.borrow_mut();
        st.score_calls.push(ts.len());
        let out = ts
            .iter()
            .map(|t| {
                // With no step to read, a PRM scores the question alone.
                if *t == 0 || st.trajs[t].steps.is_empty() {
                    PrmScore { quantiles: st.root, raw: None }
                } else if st.trajs[t].correct {
                    PrmScore { quantiles: Quantiles::sorted([0.8, 0.9, 0.95]), raw: None }
                } else {
                    PrmScore { quantiles: st.wrong, raw: st.wrong_raw }
                }
            })
            .collect();
        ready(Ok(out))
    }
}

fn params(strategy: Strategy, budget: Budget) -> ReasoningParams {
    ReasoningParams {
        strategy,
        budget,
        max_samples: 64,
        confidence: 0.99,
        budget_quantile: 0.1,
        rule: BudgetRule::Ias,
        round: 4,
        give_up_gain: 0.02,
        give_up_plausible: 1.0,
        beam_width: 8,
        beams: 8,
        prune_every: 1,
        select: Select::PrmMax,
        answer: select::AnswerFormat::LastNumber,
        candidates: Candidates::Return,
        n: 1,
        max_tokens: 1000,
        max_step_tokens: 100,
        max_steps: 20,
    }
}

fn run_fake(fake: &Fake, p: &ReasoningParams) -> Outcome {
    futures::executor::block_on(run(fake, p)).unwrap()
}

#[test]
fn adaptive_best_of_n_draws_n_ias_of_the_lower_quantile_and_prices_the_rest() {
    // q10 = 0.5 at C = 0.99: N_IAS = 7.
    let fake = Fake::new(0.5, Quantiles::sorted([0.5, 0.6, 0.7]));
    let out = run_fake(&fake, &params(Strategy::BestOfN, Budget::Adaptive));
    let a = out.accounting;
    assert_eq!((a.samples, a.fixed_samples), (7, 64));
    assert_eq!(a.prm_evaluations, 1 + 7);
    let per_sample = (STEPS + 1) * TOKENS_PER_STEP;
    assert_eq!(a.tokens_generated, 7 * per_sample);
    assert_eq!(a.fixed_tokens_estimate, 64 * per_sample);
    assert_eq!(a.tokens_saved, 57 * per_sample);
    assert_eq!(a.start, Some(Quantiles::sorted([0.5, 0.6, 0.7])));
    // All samples advance together, one step per call.
    assert_eq!(fake.st.borrow().extend_calls, vec![7; STEPS + 1]);
    assert_eq!(out.candidates.len(), 7);
}

#[test]
fn best_of_n_picks_a_right_answer_when_any_sample_has_one() {
    let fake = Fake::new(0.2, Quantiles::sorted([0.2, 0.2, 0.2]));
    let out = run_fake(&fake, &params(Strategy::BestOfN, Budget::Adaptive));
    assert_eq!(out.accounting.samples, 21);
    assert!(out.candidates.iter().any(|c| c.answer == "42"));
    assert_eq!(out.answers[0].answer, "42");
    assert_eq!(out.accounting.selected.unwrap().q50, 0.9);
    assert_eq!(out.accounting.steps, STEPS + 1);
}

#[test]
fn fixed_best_of_n_always_draws_n_max_and_saves_nothing() {
    let fake = Fake::new(0.99, Quantiles::sorted([0.99, 0.99, 0.99]));
    let a = run_fake(&fake, &params(Strategy::BestOfN, Budget::Fixed)).accounting;
    assert_eq!((a.samples, a.tokens_saved, a.prm_evaluations), (64, 0, 64));
    assert_eq!(a.start, None, "a fixed budget needs no start score");
}

#[test]
fn an_easy_question_gets_one_or_two_samples_and_a_hard_one_the_cap() {
    let easy = run_fake(
        &Fake::new(0.99, Quantiles::sorted([0.95, 0.97, 0.99])),
        &params(Strategy::BestOfN, Budget::Adaptive),
    );
    let hard = run_fake(
        &Fake::new(0.01, Quantiles::sorted([0.001, 0.01, 0.02])),
        &params(Strategy::BestOfN, Budget::Adaptive),
    );
    assert!(easy.accounting.samples <= 2);
    assert_eq!(hard.accounting.samples, 64);
}

#[test]
fn fixed_beam_keeps_k_max_paths_and_expands_each_into_m_max() {
    let fake = Fake::new(0.3, Quantiles::sorted([0.3, 0.3, 0.3]));
    let mut p = params(Strategy::Beam, Budget::Fixed);
    p.max_samples = 16;
    p.beams = 4;
    p.beam_width = 4;
    let out = run_fake(&fake, &p);
    let st = fake.st.borrow();
    // 16 initial samples, then at each of the STEPS pruning points 4 kept paths × 4 children.
    assert_eq!(st.forks[0], 16);
    assert!(st.forks[1..].iter().all(|&m| m == 4));
    assert_eq!(st.forks.len(), 1 + STEPS * 4);
    assert_eq!(st.extend_calls, vec![16; STEPS + 1]);
    assert_eq!(out.answers[0].answer, "42");
    assert_eq!(out.accounting.samples, 16 + STEPS * 16);
    assert_eq!(out.accounting.fixed_samples, out.accounting.samples);
    drop(st);
    assert_eq!(fake.live(), 0, "every path was released");
}

#[test]
fn adaptive_beam_narrows_to_one_confident_path() {
    // The question looks easy (q10 0.92: 2 samples); once a right path is
    // found its q10 of 0.8 keeps K = 1 beam with M = 3 children.
    let fake = Fake::new(0.9, Quantiles::sorted([0.92, 0.95, 0.99]));
    let out = run_fake(&fake, &params(Strategy::Beam, Budget::Adaptive));
    let st = fake.st.borrow();
    assert_eq!(st.forks[0], 2);
    assert!(st.forks[1..].iter().all(|&m| m == ias::children(0.8, 1, 0.99, 8)), "{:?}", st.forks);
    assert_eq!(out.answers[0].answer, "42");
    assert!(out.accounting.tokens_saved > 0);
}

#[test]
fn selection_returns_n_distinct_answers() {
    let fake = Fake::new(0.5, Quantiles::sorted([0.1, 0.1, 0.1]));
    let mut p = params(Strategy::BestOfN, Budget::Fixed);
    p.n = 2;
    let out = run_fake(&fake, &p);
    assert_eq!(out.answers.len(), 2);
    assert_ne!(out.answers[0].answer, out.answers[1].answer);
}

#[test]
fn a_sample_that_says_nothing_is_never_a_confident_answer() {
    // The model ends every sample at once; the PRM, given no step, repeats
    // its confident estimate of the question alone.
    let fake = Fake::new(0.5, Quantiles::sorted([0.95, 0.97, 0.99])).silent();
    let mut p = with_rule(Strategy::BestOfN, BudgetRule::Sequential, 0.9);
    p.max_samples = 8;
    let out = run_fake(&fake, &p);
    assert_eq!(out.accounting.stop, Stop::Exhausted);
    assert_eq!(out.accounting.samples, 8);
    assert_eq!(out.answers.len(), 1);
    assert_eq!(out.answers[0].text, "");
    assert!(out.answers[0].score.is_some_and(|s| s.quantiles.q50 == 0.0), "{:?}", out.answers[0].score);
}

#[test]
fn a_sample_cut_off_by_a_limit_casts_no_vote_and_is_chosen_only_when_nothing_ended() {
    // Wrong samples stop at "step 2" (their last number) without answering;
    // they outnumber the right ones, so counting that number as their
    // answer would outvote 42.
    let fake = Fake::new(0.3, Quantiles::point(0.5)).cut_wrong();
    let mut p = with_rule(Strategy::BestOfN, BudgetRule::Vote, 0.95);
    p.select = Select::Majority;
    p.max_samples = 16;
    let out = run_fake(&fake, &p);
    assert_eq!(out.answers[0].answer, "42");
    assert!(out.answers[0].ended);
    let cut: Vec<&Candidate> = out.candidates.iter().filter(|c| !c.ended).collect();
    assert!(!cut.is_empty() && cut.iter().all(|c| c.answer.is_empty() && c.text.ends_with("step 2")));

    let fake = Fake::new(0.0, Quantiles::point(0.5)).cut_wrong();
    let out = run_fake(&fake, &p);
    assert_eq!(out.accounting.samples, 16, "no vote, so never confident");
    assert_eq!(out.answers.len(), 1, "an answer is still owed");
    assert!(!out.answers[0].ended && out.answers[0].text.ends_with("step 2"));
}

#[test]
fn the_fixed_beam_estimate_counts_n_max_paths_then_k_max_times_m_max_per_expansion() {
    // 16 initial samples, K_max 2 × M_max 4 = 8 paths after each pruning point.
    let fake = Fake::new(0.3, Quantiles::sorted([0.3, 0.3, 0.3]));
    let mut p = params(Strategy::Beam, Budget::Fixed);
    p.max_samples = 16;
    p.beams = 2;
    p.beam_width = 4;
    let a = run_fake(&fake, &p).accounting;
    // Path-steps: 16 in the first step, then 8 in each of the STEPS later ones.
    let path_steps = 16 + STEPS * 8;
    assert_eq!(a.tokens_generated, path_steps * TOKENS_PER_STEP);
    assert_eq!(a.fixed_tokens_estimate, path_steps * TOKENS_PER_STEP, "the fixed run is this run");
    assert_eq!(a.tokens_saved, 0);
}

fn with_rule(strategy: Strategy, rule: BudgetRule, confidence: f64) -> ReasoningParams {
    ReasoningParams { rule, confidence, ..params(strategy, Budget::Adaptive) }
}

#[test]
fn sequential_stops_after_the_first_round_that_holds_a_confident_answer() {
    // Right answers score q10 0.8: confident at C 0.75.
    let fake = Fake::new(0.3, Quantiles::sorted([0.3, 0.4, 0.5]));
    let out = run_fake(&fake, &with_rule(Strategy::BestOfN, BudgetRule::Sequential, 0.75));
    let a = out.accounting;
    assert_eq!(a.stop, Stop::Confident);
    assert_eq!(out.answers[0].answer, "42");
    // Only the last round holds a right answer: it stopped as soon as one came.
    let forks = fake.st.borrow().forks.clone();
    let last = *forks.last().expect("at least one round");
    let before = &out.candidates[..out.candidates.len() - last];
    assert!(before.iter().all(|c| c.answer != "42"), "{forks:?}");
    assert_eq!(a.samples, forks.iter().sum::<usize>());
    assert_eq!(a.rounds, forks.len());
    assert!(a.samples < 64 && a.tokens_saved > 0);
}

#[test]
fn give_up_stops_a_hopeless_question_after_one_round_and_sequential_does_not() {
    let hopeless = Quantiles::sorted([0.0, 0.002, 0.01]);
    let gave_up = run_fake(&Fake::new(0.0, hopeless), &with_rule(Strategy::BestOfN, BudgetRule::GiveUp, 0.9));
    assert_eq!(gave_up.accounting.stop, Stop::GaveUp);
    assert_eq!(gave_up.accounting.samples, 4, "one round");
    assert_eq!(gave_up.answers.len(), 1, "it still answers");
    let kept_on =
        run_fake(&Fake::new(0.0, hopeless), &with_rule(Strategy::BestOfN, BudgetRule::Sequential, 0.9));
    assert_eq!((kept_on.accounting.stop, kept_on.accounting.samples), (Stop::Exhausted, 64));
}

#[test]
fn give_up_keeps_drawing_while_a_wrong_answer_looks_plausible_to_the_raw_prm() {
    let hopeless = Quantiles::sorted([0.0, 0.002, 0.01]);
    let wrong = Quantiles::sorted([0.0, 0.001, 0.01]);
    let p =
        ReasoningParams { give_up_plausible: 0.1, ..with_rule(Strategy::BestOfN, BudgetRule::GiveUp, 0.9) };
    let far = Fake::new(0.0, hopeless).with_wrong_scores(wrong).with_wrong_raw(0.05);
    let out = run_fake(&far, &p);
    assert_eq!((out.accounting.stop, out.accounting.samples), (Stop::GaveUp, 4), "one round");
    let near = Fake::new(0.0, hopeless).with_wrong_scores(wrong).with_wrong_raw(0.3);
    let out = run_fake(&near, &p);
    assert_eq!((out.accounting.stop, out.accounting.samples), (Stop::Exhausted, 64), "never past N_max");
}

#[test]
fn no_rule_draws_more_than_n_max() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for rule in [BudgetRule::Ias, BudgetRule::Sequential, BudgetRule::GiveUp, BudgetRule::Vote] {
        for _ in 0..20 {
            let p = rng.random_range(0.0..1.0);
            let q = rng.random_range(0.0..1.0f32);
            let mut params = with_rule(Strategy::BestOfN, rule, rng.random_range(0.5..0.999));
            params.max_samples = rng.random_range(1..12);
            params.round = rng.random_range(1..5);
            params.select = if rule == BudgetRule::Vote { Select::Majority } else { Select::PrmMax };
            let out = run_fake(&Fake::new(p, Quantiles::sorted([q * 0.5, q, q.max(0.9)])), &params);
            assert!(
                out.accounting.samples <= params.max_samples,
                "{rule:?} drew {} of {}",
                out.accounting.samples,
                params.max_samples
            );
            assert_eq!(out.candidates.len(), out.accounting.samples);
        }
    }
}

#[test]
fn vote_needs_no_prm_and_stops_once_the_majority_is_clear() {
    let fake = Fake::new(0.95, Quantiles::point(0.5));
    let mut p = with_rule(Strategy::BestOfN, BudgetRule::Vote, 0.95);
    p.select = Select::Majority;
    p.round = 1;
    let out = run_fake(&fake, &p);
    assert!(fake.st.borrow().score_calls.is_empty(), "no PRM call");
    assert_eq!(out.accounting.stop, Stop::Confident);
    assert_eq!(out.answers[0].answer, "42");
    // Four agreeing votes reach P(Beta(5, 1) > 1/2) = 31/32 > 0.95; a stray
    // wrong one costs a few more.
    assert!((4..=10).contains(&out.accounting.samples), "{}", out.accounting.samples);
    assert_eq!(out.accounting.start, None);
}

#[test]
fn beam_gives_up_on_hopeless_paths_and_finishes_one_alone() {
    let fake = Fake::new(0.0, Quantiles::sorted([0.0, 0.002, 0.01]))
        .with_wrong_scores(Quantiles::sorted([0.0, 0.001, 0.002]));
    let mut p = with_rule(Strategy::Beam, BudgetRule::GiveUp, 0.9);
    p.max_samples = 16;
    let out = run_fake(&fake, &p);
    let st = fake.st.borrow();
    assert_eq!(out.accounting.stop, Stop::GaveUp);
    // The first search's 4 paths (a round) take one step; then only the
    // best one goes on, step by step.
    assert_eq!(st.extend_calls, [vec![4], vec![1; STEPS]].concat());
    assert_eq!(out.answers.len(), 1);
    assert!(out.accounting.tokens_saved > out.accounting.tokens_generated);
    drop(st);
    assert_eq!(fake.live(), 0, "every path was released");
}

#[test]
fn sequential_beam_stops_once_a_finished_path_is_confident() {
    // Right paths score q10 0.8: confident at C 0.75, so one search suffices.
    let fake = Fake::new(0.9, Quantiles::sorted([0.3, 0.4, 0.5]));
    let out = run_fake(&fake, &with_rule(Strategy::Beam, BudgetRule::Sequential, 0.75));
    let st = fake.st.borrow();
    assert_eq!(out.accounting.stop, Stop::Confident);
    assert_eq!(out.answers[0].answer, "42");
    assert_eq!(st.root_forks.len(), 1, "one search from the question: {:?}", st.root_forks);
    assert!(out.accounting.tokens_saved > 0);
}

#[test]
fn a_beam_search_without_a_confident_answer_is_followed_by_narrow_ones_within_the_fixed_cost() {
    // Every path is wrong but not hopeless (q10 0.3): no search ends
    // confident, so searches follow one another while their initial paths
    // fit within N_max, and the request ends exhausted.
    let fake = Fake::new(0.0, Quantiles::sorted([0.5, 0.6, 0.7]))
        .with_wrong_scores(Quantiles::sorted([0.3, 0.4, 0.5]));
    let mut p = with_rule(Strategy::Beam, BudgetRule::Sequential, 0.9);
    p.max_samples = 16;
    let out = run_fake(&fake, &p);
    let st = fake.st.borrow();
    let first = ias::samples(0.5, 0.9, 16);
    assert!(st.root_forks.len() > 1, "{:?}", st.root_forks);
    assert!(st.root_forks.iter().all(|&k| k == first), "{:?}", st.root_forks);
    assert!(st.root_forks.iter().sum::<usize>() <= 16, "{:?}", st.root_forks);
    assert_eq!(st.root_forks.len(), 16 / first);
    // Each search is narrow: at most `first` kept paths of M_max children.
    assert!(st.extend_calls.iter().all(|&n| n <= first * p.beam_width), "{:?}", st.extend_calls);
    assert!(out.accounting.tokens_generated <= out.accounting.fixed_tokens_estimate);
    assert_eq!(out.accounting.stop, Stop::Exhausted);
    drop(st);
    assert_eq!(fake.live(), 0, "every path was released");
}
