//! The strategies (single sampling, best-of-N and beam search, fixed or
//! adaptive: the paper's IAS rule, Park et al. 2025, or the budget rules
//! that draw in rounds, [`super::rules`]) as plain code against [`Trajectories`].

use super::rules::{self, BudgetRule, Decision, Rounds, Seen, Stop};
use super::select::choose;
use super::{
    Accounting, Budget, Candidate, Candidates, Outcome, ReasoningError, ReasoningParams, Select, Strategy,
    Traj, Trajectories, ias,
};
use crate::prm::{PrmScore, Quantiles};

pub async fn run<B: Trajectories>(b: &B, p: &ReasoningParams) -> Result<Outcome, ReasoningError> {
    match p.strategy {
        Strategy::Single => single(b, p).await,
        Strategy::BestOfN => best_of_n(b, p).await,
        Strategy::Beam => beam(b, p).await,
    }
}

/// Extends until every trajectory has finished.
async fn to_the_end<B: Trajectories>(b: &B, ts: &[Traj]) -> Result<(), ReasoningError> {
    loop {
        let live: Vec<Traj> = ts.iter().copied().filter(|&t| !b.info(t).finished).collect();
        if live.is_empty() {
            return Ok(());
        }
        b.extend(&live).await?;
    }
}

fn candidate<B: Trajectories>(b: &B, p: &ReasoningParams, t: Traj, score: Option<PrmScore>) -> Candidate {
    let info = b.info(t);
    let score = sample_score(info.steps.len(), score);
    // A path a limit cut off (max_tokens, the context, beam search's step
    // cap) never gave its answer: the last number in its text is an
    // intermediate result. It casts no vote and is chosen only when no
    // path ended (as an empty answer is, in `choose`).
    let answer = if info.ended { p.answer.key(&info.text) } else { String::new() };
    Candidate {
        answer,
        text: info.text,
        score,
        tokens: info.tokens,
        steps: info.steps.len(),
        ended: info.ended,
    }
}

/// A finished sample's score as the rules read it. Why: a sample that ended
/// before its first step holds no step for the PRM to read, so its score is
/// the question's own estimate, and a model that stops at once on an easy
/// question would look confident with nothing said; it is a certain failure
/// instead. `ponder eval` replays read runs through this too.
pub fn sample_score(steps: usize, score: Option<PrmScore>) -> Option<PrmScore> {
    match score {
        Some(s) if steps == 0 => Some(PrmScore { quantiles: Quantiles::point(0.0), raw: s.raw.map(|_| 0.0) }),
        s => s,
    }
}

/// Per-request bookkeeping shared by the strategies.
struct Ledger {
    samples: usize,
    prm_evaluations: usize,
    start: Option<Quantiles>,
    stop: Stop,
    rounds: usize,
}

impl Ledger {
    fn new() -> Self {
        Self { samples: 0, prm_evaluations: 0, start: None, stop: Stop::Budget, rounds: 0 }
    }

    async fn score<B: Trajectories>(&mut self, b: &B, ts: &[Traj]) -> Result<Vec<PrmScore>, ReasoningError> {
        let s = b.score(ts).await?;
        self.prm_evaluations += ts.len();
        Ok(s)
    }

    /// The empty prefix's estimate (IAS takes its budget quantile as p).
    async fn start<B: Trajectories>(&mut self, b: &B, root: Traj) -> Result<Quantiles, ReasoningError> {
        let s = self.score(b, &[root]).await?[0];
        self.start = Some(s.quantiles);
        Ok(s.quantiles)
    }

    fn finish(
        self,
        b: &impl Trajectories,
        p: &ReasoningParams,
        finals: Vec<Candidate>,
        fixed_samples: usize,
        fixed_tokens: usize,
    ) -> Outcome {
        let answers = choose(&finals, p.select, p.n);
        let generated = b.generated_tokens();
        let fixed = fixed_tokens.max(generated);
        Outcome {
            accounting: Accounting {
                samples: self.samples,
                fixed_samples,
                tokens_generated: generated,
                fixed_tokens_estimate: fixed,
                tokens_saved: fixed - generated,
                prm_evaluations: self.prm_evaluations,
                start: self.start,
                selected: answers.first().and_then(|a| a.score).map(|s| s.quantiles),
                steps: answers.first().map_or(0, |a| a.steps),
                rule: match p.budget {
                    Budget::Adaptive => Some(p.rule),
                    Budget::Fixed => None,
                },
                stop: self.stop,
                rounds: self.rounds,
            },
            candidates: match p.candidates {
                Candidates::Return => finals,
                Candidates::Omit => Vec::new(),
            },
            answers,
        }
    }
}

/// `n` independent samples, no PRM.
async fn single<B: Trajectories>(b: &B, p: &ReasoningParams) -> Result<Outcome, ReasoningError> {
    let mut ledger = Ledger::new();
    let root = b.root();
    let ts = b.fork(root, p.n.max(1))?;
    b.release(&[root]);
    ledger.samples = ts.len();
    to_the_end(b, &ts).await?;
    let finals: Vec<Candidate> = ts.iter().map(|&t| candidate(b, p, t, None)).collect();
    let generated = b.generated_tokens();
    let mut params = *p;
    params.select = Select::Majority;
    let mut out = ledger.finish(b, &params, finals.clone(), ts.len(), generated);
    // Single sampling returns its samples in order, not a vote.
    out.answers = finals.into_iter().take(p.n.max(1)).collect();
    Ok(out)
}

/// Best-of-N: N_max samples (fixed), min(N_max, N_IAS(p)) with p from the
/// empty prefix (`ias`), or rounds of samples until the budget rule stops
/// (`sequential`, `give_up`, `vote`); then the answer by `select`.
async fn best_of_n<B: Trajectories>(b: &B, p: &ReasoningParams) -> Result<Outcome, ReasoningError> {
    let mut ledger = Ledger::new();
    let root = b.root();
    let adaptive = p.budget == Budget::Adaptive;
    let root_q = if adaptive && p.rule.needs_prm() { Some(ledger.start(b, root).await?) } else { None };
    let rule = p.rule_params();
    let in_rounds = adaptive && p.rule.in_rounds();
    let mut next = if !adaptive {
        p.max_samples.max(p.n)
    } else if in_rounds {
        rules::first_round(&rule, root_q.map(|q| q.at(p.budget_quantile) as f64), p.n)
    } else {
        let q = root_q.expect("ias reads the PRM: scored above");
        ias::samples(q.at(p.budget_quantile) as f64, p.confidence, p.max_samples).max(p.n)
    };
    let scored = p.select.needs_prm() || (in_rounds && p.rule.needs_prm());
    let mut rounds = Rounds::new(rule, root_q);
    let mut finals: Vec<Candidate> = Vec::new();
    loop {
        let best = choose(&finals, p.select, 1).first().and_then(|c| c.score).map(|s| s.quantiles);
        b.progress(ledger.samples + next, best.or(ledger.start));
        let ts = b.fork(root, next)?;
        ledger.samples += next;
        ledger.rounds += 1;
        to_the_end(b, &ts).await?;
        let scores = if scored { Some(ledger.score(b, &ts).await?) } else { None };
        finals.extend(ts.iter().enumerate().map(|(i, &t)| candidate(b, p, t, scores.as_ref().map(|s| s[i]))));
        // Finished samples free their caches before the next round.
        b.release(&ts);
        if !in_rounds {
            break;
        }
        let seen: Vec<Seen<'_>> = finals.iter().map(|c| Seen { answer: &c.answer, score: c.score }).collect();
        let selected = choose(&finals, p.select, 1).first().and_then(|c| c.score).map(|s| s.quantiles);
        match rounds.decide(&seen, ts.len(), selected) {
            Decision::Draw(k) => next = k,
            Decision::Stop(stop) => {
                ledger.stop = stop;
                break;
            }
        }
    }
    b.release(&[root]);
    let n = ledger.samples;
    // This request's own mean tokens per sample prices the samples it did not draw.
    let mean = b.generated_tokens() as f64 / n as f64;
    let fixed_tokens = (mean * p.max_samples.max(n) as f64).round() as usize;
    Ok(ledger.finish(b, p, finals, p.max_samples.max(n), fixed_tokens))
}

/// Beam search: generate `prune_every` steps on every live path, then score,
/// keep the best K paths by the median quantile and expand each into M
/// children; fixed K = K_max, M = M_max, or the IAS K and M rules. Under
/// `sequential` and `give_up` each pruning point also asks whether to stop
/// (a finished path confident enough ends the search; under `give_up`, so
/// does a search whose kept paths are not worth expanding). Under those
/// rules searches come in rounds: each is narrow (`round_size` initial
/// paths, at most N_IAS, and as many kept paths), and one that ends with no
/// confident answer is followed by another from the question while the
/// rule finds one worth its tokens and the fixed beam's cost allows.
async fn beam<B: Trajectories>(b: &B, p: &ReasoningParams) -> Result<Outcome, ReasoningError> {
    let mut ledger = Ledger::new();
    let root = b.root();
    let adaptive = p.budget == Budget::Adaptive;
    let root_q = if adaptive { Some(ledger.start(b, root).await?) } else { None };
    let first = match root_q {
        Some(q) => ias::samples(q.at(p.budget_quantile) as f64, p.confidence, p.max_samples),
        None => p.max_samples,
    }
    .max(p.n);
    let in_rounds = adaptive && matches!(p.rule, BudgetRule::Sequential | BudgetRule::GiveUp);
    // Why narrow: a wide first search is the whole fixed budget on a hard
    // question before any rule can look at a finished path.
    let (first, k_max) = if in_rounds {
        let n = first.min(p.round.max(p.n)).max(1);
        (n, n.min(p.beams))
    } else {
        (first, p.beams)
    };
    let mut prior = root_q.map(rules::SuccessPrior::new);
    let mut pool: Vec<Candidate> = Vec::new();
    let mut cost = BeamCost::new(p);
    let mut drawn = 0;
    loop {
        let before = (pool.len(), cost.path_steps);
        let end = beam_round(b, p, (root, first, k_max), &mut ledger, &mut cost, &mut pool).await?;
        drawn += first;
        ledger.stop = end;
        if !in_rounds || end != Stop::Budget {
            break;
        }
        // A search that ended with no confident answer: another from the
        // question, within N_max initial paths and (priced at this search's
        // path-steps) the fixed beam's, while it is worth it.
        let last = cost.path_steps - before.1;
        if drawn + first > p.max_samples || cost.path_steps + last > cost.fixed_path_steps {
            ledger.stop = Stop::Exhausted;
            break;
        }
        let held =
            choose(&pool, p.select, 1).first().and_then(|c| c.score).map_or(0.0, |s| s.quantiles.q50 as f64);
        if let (BudgetRule::GiveUp, Some(prior)) = (p.rule, prior.as_mut()) {
            for c in &pool[before.0..] {
                prior.observe(c.score.map_or(0.0, |s| s.quantiles.q50 as f64));
            }
            if rules::round_gain(prior, held, first) < p.give_up_gain {
                ledger.stop = Stop::GaveUp;
                break;
            }
        }
    }
    b.release(&[root]);
    let fixed_tokens = cost.fixed_tokens(b.generated_tokens());
    Ok(ledger.finish(b, p, pool, cost.fixed_samples, fixed_tokens))
}

/// One beam search from the question with `first` initial paths and at
/// most `k_max` kept paths, its finished paths added to `pool`. Returns how
/// it ended: `Budget` when it ran to the end, `Confident` or `GaveUp` when
/// a rule stopped it.
async fn beam_round<B: Trajectories>(
    b: &B,
    p: &ReasoningParams,
    (root, first, k_max): (Traj, usize, usize),
    ledger: &mut Ledger,
    cost: &mut BeamCost,
    pool: &mut Vec<Candidate>,
) -> Result<Stop, ReasoningError> {
    let adaptive = p.budget == Budget::Adaptive;
    let stops = adaptive && matches!(p.rule, BudgetRule::Sequential | BudgetRule::GiveUp);
    b.progress(first, ledger.start);
    let mut live = b.fork(root, first)?;
    ledger.samples += first;
    ledger.rounds += 1;
    cost.restart();
    while !live.is_empty() {
        for _ in 0..p.prune_every {
            if !cost.extend_once(b, &live).await? {
                break;
            }
        }
        // Finished paths leave for the pool, where they stay at no cost.
        let (done, open): (Vec<Traj>, Vec<Traj>) = live.iter().copied().partition(|&t| b.info(t).finished);
        if !done.is_empty() {
            let scores = ledger.score(b, &done).await?;
            pool.extend(done.iter().zip(scores).map(|(&t, s)| candidate(b, p, t, Some(s))));
            b.release(&done);
        }
        let held = choose(pool, p.select, 1).first().and_then(|c| c.score).map(|s| s.quantiles);
        if stops && held.is_some_and(|q| q.at(p.budget_quantile) as f64 >= p.confidence) {
            b.release(&open);
            return Ok(Stop::Confident);
        }
        if open.is_empty() || cost.depth >= p.max_steps {
            if !open.is_empty() {
                let scores = ledger.score(b, &open).await?;
                pool.extend(open.iter().zip(scores).map(|(&t, s)| candidate(b, p, t, Some(s))));
                b.release(&open);
            }
            return Ok(Stop::Budget);
        }
        let scores = ledger.score(b, &open).await?;
        let mut ranked: Vec<(Traj, PrmScore)> = open.iter().copied().zip(scores).collect();
        ranked.sort_by(|a, b| b.1.quantiles.q50.total_cmp(&a.1.quantiles.q50));
        let (k, m) = paths_and_children(p, &ranked, k_max);
        if adaptive && p.rule == BudgetRule::GiveUp {
            let kept: Vec<Quantiles> = ranked[..k].iter().map(|r| r.1.quantiles).collect();
            let held = held.map_or(0.0, |q| q.q50 as f64);
            if rules::beam_gain(&kept, held) < p.give_up_gain {
                let best = ranked[0].0;
                b.release(&ranked[1..].iter().map(|r| r.0).collect::<Vec<_>>());
                if pool.is_empty() {
                    // An answer is still owed: the best open path runs to the end alone.
                    while cost.extend_once(b, &[best]).await? {}
                    let score = ledger.score(b, &[best]).await?[0];
                    pool.push(candidate(b, p, best, Some(score)));
                }
                b.release(&[best]);
                return Ok(Stop::GaveUp);
            }
        }
        let mut next = Vec::with_capacity(k * m);
        for &(t, _) in &ranked[..k] {
            next.extend(b.fork(t, m)?);
        }
        b.release(&open);
        ledger.samples += k * m;
        cost.expanded(p);
        b.progress(next.len(), ranked.first().map(|r| r.1.quantiles));
        live = next;
    }
    Ok(Stop::Budget)
}

/// K paths to keep of `ranked` (best first) and M children for each: the
/// configured beam when fixed, the IAS rules on the paths' lower quantile
/// when adaptive.
fn paths_and_children(p: &ReasoningParams, ranked: &[(Traj, PrmScore)], k_max: usize) -> (usize, usize) {
    match p.budget {
        Budget::Fixed => (p.beams.min(ranked.len()), p.beam_width),
        Budget::Adaptive => {
            let mut lower: Vec<f64> = ranked.iter().map(|r| r.1.quantiles.q10 as f64).collect();
            lower.sort_by(|a, b| b.total_cmp(a));
            let k = ias::keep(&lower, p.confidence, k_max, p.beam_width);
            let s_min = ranked[..k].iter().map(|r| r.1.quantiles.q10 as f64).fold(1.0, f64::min);
            (k, ias::children(s_min, k, p.confidence, p.beam_width))
        }
    }
}

/// What beam search generated and what the fixed beam would have: N_max
/// paths until its first pruning point, K_max × M_max after each.
struct BeamCost {
    path_steps: usize,
    fixed_path_steps: usize,
    fixed_samples: usize,
    fixed_live: usize,
    depth: usize,
    rounds: usize,
}

impl BeamCost {
    fn new(p: &ReasoningParams) -> Self {
        Self {
            path_steps: 0,
            fixed_path_steps: 0,
            fixed_samples: p.max_samples,
            fixed_live: p.max_samples,
            depth: 0,
            rounds: 0,
        }
    }

    /// A new search from the question. The fixed beam searches once: later
    /// rounds add to what was generated, not to its estimate.
    fn restart(&mut self) {
        self.depth = 0;
        self.rounds += 1;
    }

    /// One step on every unfinished path of `live`; false when none was left.
    async fn extend_once<B: Trajectories>(&mut self, b: &B, live: &[Traj]) -> Result<bool, ReasoningError> {
        let extendable: Vec<Traj> = live.iter().copied().filter(|&t| !b.info(t).finished).collect();
        if extendable.is_empty() {
            return Ok(false);
        }
        b.extend(&extendable).await?;
        self.path_steps += extendable.len();
        if self.rounds <= 1 {
            self.fixed_path_steps += self.fixed_live;
        }
        self.depth += 1;
        Ok(true)
    }

    fn expanded(&mut self, p: &ReasoningParams) {
        if self.rounds <= 1 {
            self.fixed_samples += p.beams * p.beam_width;
            self.fixed_live = p.beams * p.beam_width;
        }
    }

    /// The fixed beam's tokens, priced at this request's tokens per path-step.
    fn fixed_tokens(&self, generated: usize) -> usize {
        let per_step = generated as f64 / self.path_steps.max(1) as f64;
        (per_step * self.fixed_path_steps as f64).round() as usize
    }
}

#[cfg(test)]
mod tests;
