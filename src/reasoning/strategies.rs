//! The strategies (single sampling, best-of-N and beam search, fixed or
//! instance-adaptive as in Park et al. 2025) as plain code against [`Trajectories`].

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
    Candidate {
        answer: p.answer.key(&info.text),
        text: info.text,
        score,
        tokens: info.tokens,
        steps: info.steps.len(),
        ended: info.ended,
    }
}

/// Per-request bookkeeping shared by the strategies.
struct Ledger {
    samples: usize,
    prm_evaluations: usize,
    start: Option<Quantiles>,
}

impl Ledger {
    fn new() -> Self {
        Self { samples: 0, prm_evaluations: 0, start: None }
    }

    async fn score<B: Trajectories>(&mut self, b: &B, ts: &[Traj]) -> Result<Vec<PrmScore>, ReasoningError> {
        let s = b.score(ts).await?;
        self.prm_evaluations += ts.len();
        Ok(s)
    }

    /// p for IAS: the budget quantile of the empty prefix's estimate.
    async fn start<B: Trajectories>(
        &mut self,
        b: &B,
        root: Traj,
        p: &ReasoningParams,
    ) -> Result<f64, ReasoningError> {
        let s = self.score(b, &[root]).await?[0];
        self.start = Some(s.quantiles);
        Ok(s.quantiles.at(p.budget_quantile) as f64)
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

/// N samples to the end, N = N_max or min(N_max, N_IAS(p)) with p from the
/// empty prefix; then the answer by `select`.
async fn best_of_n<B: Trajectories>(b: &B, p: &ReasoningParams) -> Result<Outcome, ReasoningError> {
    let mut ledger = Ledger::new();
    let root = b.root();
    let n = match p.budget {
        Budget::Adaptive => ias::samples(ledger.start(b, root, p).await?, p.confidence, p.max_samples),
        Budget::Fixed => p.max_samples,
    }
    .max(p.n);
    b.progress(n, ledger.start);
    let ts = b.fork(root, n)?;
    b.release(&[root]);
    ledger.samples = n;
    to_the_end(b, &ts).await?;
    let scores = if p.select.needs_prm() { Some(ledger.score(b, &ts).await?) } else { None };
    let finals: Vec<Candidate> =
        ts.iter().enumerate().map(|(i, &t)| candidate(b, p, t, scores.as_ref().map(|s| s[i]))).collect();
    // This request's own mean tokens per sample prices the samples it did not draw.
    let mean = b.generated_tokens() as f64 / n as f64;
    let fixed_tokens = (mean * p.max_samples.max(n) as f64).round() as usize;
    Ok(ledger.finish(b, p, finals, p.max_samples.max(n), fixed_tokens))
}

/// Beam search: generate `prune_every` steps on every live path, then score,
/// keep the best K paths by the median quantile and expand each into M
/// children; fixed K = K_max, M = M_max, or the IAS K and M rules.
async fn beam<B: Trajectories>(b: &B, p: &ReasoningParams) -> Result<Outcome, ReasoningError> {
    let mut ledger = Ledger::new();
    let root = b.root();
    let first = match p.budget {
        Budget::Adaptive => ias::samples(ledger.start(b, root, p).await?, p.confidence, p.max_samples),
        Budget::Fixed => p.max_samples,
    }
    .max(p.n);
    b.progress(first, ledger.start);
    let mut live = b.fork(root, first)?;
    b.release(&[root]);
    ledger.samples = first;
    let mut pool: Vec<Candidate> = Vec::new();
    // Path-steps generated, and what the fixed beam would generate: N_max
    // paths until its first pruning point, K_max × M_max after each.
    let (mut path_steps, mut fixed_path_steps, mut fixed_samples) = (0usize, 0usize, p.max_samples);
    let mut fixed_live = p.max_samples;
    let mut depth = 0;
    while !live.is_empty() {
        for _ in 0..p.prune_every {
            let extendable: Vec<Traj> = live.iter().copied().filter(|&t| !b.info(t).finished).collect();
            if extendable.is_empty() {
                break;
            }
            b.extend(&extendable).await?;
            path_steps += extendable.len();
            fixed_path_steps += fixed_live;
            depth += 1;
        }
        // Finished paths leave for the pool, where they stay at no cost.
        let (done, open): (Vec<Traj>, Vec<Traj>) = live.iter().copied().partition(|&t| b.info(t).finished);
        if !done.is_empty() {
            let scores = ledger.score(b, &done).await?;
            pool.extend(done.iter().zip(scores).map(|(&t, s)| candidate(b, p, t, Some(s))));
            b.release(&done);
        }
        if open.is_empty() || depth >= p.max_steps {
            if !open.is_empty() {
                let scores = ledger.score(b, &open).await?;
                pool.extend(open.iter().zip(scores).map(|(&t, s)| candidate(b, p, t, Some(s))));
                b.release(&open);
            }
            break;
        }
        let scores = ledger.score(b, &open).await?;
        let mut ranked: Vec<(Traj, PrmScore)> = open.iter().copied().zip(scores).collect();
        ranked.sort_by(|a, b| b.1.quantiles.q50.total_cmp(&a.1.quantiles.q50));
        let (k, m) = match p.budget {
            Budget::Fixed => (p.beams.min(ranked.len()), p.beam_width),
            Budget::Adaptive => {
                let mut lower: Vec<f64> = ranked.iter().map(|r| r.1.quantiles.q10 as f64).collect();
                lower.sort_by(|a, b| b.total_cmp(a));
                let k = ias::keep(&lower, p.confidence, p.beams, p.beam_width);
                let s_min = ranked[..k].iter().map(|r| r.1.quantiles.q10 as f64).fold(1.0, f64::min);
                (k, ias::children(s_min, k, p.confidence, p.beam_width))
            }
        };
        let mut next = Vec::with_capacity(k * m);
        for &(t, _) in &ranked[..k] {
            next.extend(b.fork(t, m)?);
        }
        b.release(&open);
        ledger.samples += k * m;
        fixed_samples += p.beams * p.beam_width;
        fixed_live = p.beams * p.beam_width;
        b.progress(next.len(), ranked.first().map(|r| r.1.quantiles));
        live = next;
    }
    let per_step = b.generated_tokens() as f64 / path_steps.max(1) as f64;
    let fixed_tokens = (per_step * fixed_path_steps as f64).round() as usize;
    Ok(ledger.finish(b, p, pool, fixed_samples, fixed_tokens))
}

#[cfg(test)]
mod tests;
