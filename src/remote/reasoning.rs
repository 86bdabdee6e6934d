//! Reasoning strategies over a remote engine: [`RemoteTrajectories`]
//! implements the strategies' two calls with `/v1/completions`. "Extend
//! these trajectories by one step" sends one call per distinct prefix (the
//! prompt and the steps so far, as token ids) with `n` = the trajectories
//! sharing it and stop `"\n\n"`, so samples forked from one prefix are one
//! request the engine batches and prefix-caches; "score these prefixes"
//! asks the model's separate PRM. Seeds shift by the samples already drawn
//! (an engine gives child `i` of a call `seed + i`), so later rounds never
//! repeat earlier samples.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Semaphore, mpsc};

use super::upstream::{CompletionCall, CompletionChoice, Upstream, UpstreamError};
use crate::backend::{GenEvent, Progress, TokenMeter};
use crate::engine::SamplingParams;
use crate::metrics::ModelMetrics;
use crate::prm::{PrmScore, Quantiles, ScoreItem, Scorer};
use crate::reasoning::runtime::STEP_DELIMITER;
use crate::reasoning::{ReasoningError, ReasoningParams, Traj, TrajInfo, Trajectories};
use crate::tokenizer::{AddSpecial, Tokenizer};

/// One path: its generated tokens and text, split into steps.
#[derive(Debug, Clone, Default)]
struct Path {
    ids: Vec<u32>,
    text: String,
    steps: Vec<String>,
    finished: bool,
    ended: bool,
}

#[derive(Debug, Default)]
struct State {
    paths: HashMap<Traj, Path>,
    next: Traj,
    /// Trajectories forked so far (the samples drawn).
    forks: usize,
    /// Choices asked of the engine so far: the next call's seed offset.
    draws: u64,
    generated: usize,
    budget: usize,
    best: Option<Quantiles>,
    steps: usize,
}

/// What a remote reasoning request needs besides its state.
pub struct RemoteCtx {
    pub upstream: Upstream,
    pub tokenizer: Arc<Tokenizer>,
    pub prm: Option<Arc<dyn Scorer>>,
    /// Sequences in flight upstream, shared by the model's requests.
    pub running: Arc<Semaphore>,
    pub max_running: usize,
    pub mm: ModelMetrics,
    pub meter: TokenMeter,
    /// Where progress events go (the request's reply channel).
    pub events: mpsc::Sender<GenEvent>,
}

/// The trajectories of one reasoning request on a remote engine.
pub struct RemoteTrajectories {
    ctx: RemoteCtx,
    question: String,
    prompt: Vec<u32>,
    params: ReasoningParams,
    sampling: SamplingParams,
    st: Mutex<State>,
    /// The last upstream failure, for the request's 502/504.
    failure: Mutex<Option<UpstreamError>>,
}

impl RemoteTrajectories {
    pub fn new(
        ctx: RemoteCtx,
        question: String,
        prompt: Vec<u32>,
        params: ReasoningParams,
        sampling: SamplingParams,
    ) -> Self {
        let mut st = State { next: 1, ..State::default() };
        st.paths.insert(0, Path::default());
        Self { ctx, question, prompt, params, sampling, st: Mutex::new(st), failure: Mutex::new(None) }
    }

    /// The engine failure that ended the request, if one did.
    pub fn take_failure(&self) -> Option<UpstreamError> {
        self.failure.lock().expect("no panics while holding the failure lock").take()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().expect("no panics while holding the trajectories' lock")
    }

    fn finished(&self, p: &Path) -> bool {
        p.finished || p.steps.len() >= self.params.max_steps || p.ids.len() >= self.params.max_tokens
    }

    /// The calls of one extend: live trajectories grouped by their prefix.
    fn plan(&self, ts: &[Traj]) -> Vec<(Vec<Traj>, CompletionCall)> {
        let mut st = self.state();
        let mut groups: Vec<(Vec<u32>, Vec<Traj>)> = Vec::new();
        for &t in ts {
            let Some(p) = st.paths.get(&t).filter(|p| !self.finished(p)) else { continue };
            match groups.iter_mut().find(|(ids, _)| *ids == p.ids) {
                Some((_, members)) => members.push(t),
                None => groups.push((p.ids.clone(), vec![t])),
            }
        }
        let mut calls = Vec::with_capacity(groups.len());
        for (ids, members) in groups {
            let left = self.params.max_tokens.saturating_sub(ids.len());
            let max_tokens = self.params.max_step_tokens.min(left).max(1);
            let mut prompt = self.prompt.clone();
            prompt.extend_from_slice(&ids);
            // Engines that take fewer choices per call get several calls.
            for (offset, count) in self.ctx.upstream.split_n(members.len()) {
                let seed = self.sampling.seed.wrapping_add(st.draws);
                st.draws += count as u64;
                let model = self.ctx.upstream.model();
                let call = step_call(model, prompt.clone(), count, max_tokens, &self.sampling, seed);
                calls.push((members[offset..offset + count].to_vec(), call));
            }
        }
        calls
    }

    /// Appends one generated step to a path.
    fn apply(&self, p: &mut Path, c: CompletionChoice) -> usize {
        let step = read_step(c, &self.ctx.tokenizer);
        let trimmed = step.text.trim_end();
        if !trimmed.is_empty() {
            p.steps.push(trimmed.to_string());
        }
        p.text.push_str(&step.text);
        p.ids.extend_from_slice(&step.ids);
        match step.end {
            StepEnd::Delimiter => {}
            // A step cut at its length limit ends the path, as on the local engine.
            StepEnd::Length => p.finished = true,
            StepEnd::Answer => {
                p.finished = true;
                p.ended = true;
            }
        }
        step.ids.len()
    }

    async fn send_progress(&self) {
        let p = {
            let st = self.state();
            Progress {
                samples: st.forks,
                live: st.paths.keys().filter(|&&t| t != 0).count(),
                budget: st.budget,
                best: st.best,
                tokens: st.generated,
                steps: st.steps,
            }
        };
        let _ = self.ctx.events.send(GenEvent::Progress(p)).await;
    }
}

/// The call that extends one prefix (the prompt and its steps, as token
/// ids) by one step, `n` times: stop on the step delimiter and keep it.
pub fn step_call(
    model: &str,
    prompt: Vec<u32>,
    n: usize,
    max_tokens: usize,
    sampling: &SamplingParams,
    seed: u64,
) -> CompletionCall {
    CompletionCall {
        model: model.to_string(),
        prompt,
        n,
        max_tokens,
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        top_k: (sampling.top_k > 0).then_some(sampling.top_k),
        min_p: None,
        // Each step is a call of its own, so the engine counts repeats
        // within the step only.
        presence_penalty: sampling.penalties.presence,
        frequency_penalty: sampling.penalties.frequency,
        seed: seed & (i64::MAX as u64),
        stop: vec![STEP_DELIMITER.to_string()],
        logprobs: None,
        stream: false,
        stream_options: None,
        include_stop_str_in_output: true,
        return_token_ids: true,
        return_tokens: true,
        verbose: false,
    }
}

/// How a generated step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepEnd {
    /// On the step delimiter: the trajectory goes on.
    Delimiter,
    /// At the step's token limit.
    Length,
    /// On the end-of-generation token: the answer is complete.
    Answer,
}

/// One step as the engine generated it.
#[derive(Debug, Clone)]
pub struct Step {
    /// The text, ending with the delimiter when it stopped there (put back
    /// where the engine dropped it).
    pub text: String,
    pub ids: Vec<u32>,
    pub end: StepEnd,
}

/// Reads one choice of a [`step_call`].
pub fn read_step(c: CompletionChoice, tokenizer: &Tokenizer) -> Step {
    let on_delimiter = c.stopped_on(STEP_DELIMITER);
    let mut text = c.text;
    if on_delimiter && !text.ends_with(STEP_DELIMITER) {
        text.push_str(STEP_DELIMITER);
    }
    // Re-tokenized when the engine does not say which tokens it drew.
    let ids = match c.token_ids {
        Some(ids) if !ids.is_empty() || text.is_empty() => ids,
        _ => tokenizer.encode(&text, AddSpecial::No).unwrap_or_default(),
    };
    let end = match c.finish_reason.as_deref() {
        Some("length") => StepEnd::Length,
        _ if on_delimiter => StepEnd::Delimiter,
        Some(_) => StepEnd::Answer,
        // No finish reason: treated as a step that goes on.
        None => StepEnd::Delimiter,
    };
    Step { text, ids, end }
}

impl Trajectories for RemoteTrajectories {
    fn root(&self) -> Traj {
        0
    }

    fn fork(&self, t: Traj, k: usize) -> Result<Vec<Traj>, ReasoningError> {
        let mut st = self.state();
        let parent = st.paths.get(&t).cloned().ok_or(ReasoningError::UnknownTrajectory(t))?;
        let mut ids = Vec::with_capacity(k);
        for _ in 0..k {
            let id = st.next;
            st.next += 1;
            st.paths.insert(id, parent.clone());
            ids.push(id);
        }
        st.forks += k;
        Ok(ids)
    }

    fn release(&self, ts: &[Traj]) {
        let mut st = self.state();
        for t in ts {
            st.paths.remove(t);
        }
    }

    fn info(&self, t: Traj) -> TrajInfo {
        let st = self.state();
        let Some(p) = st.paths.get(&t) else {
            return TrajInfo { steps: vec![], text: String::new(), finished: true, ended: false, tokens: 0 };
        };
        TrajInfo {
            steps: p.steps.clone(),
            text: p.text.trim_end().to_string(),
            finished: self.finished(p),
            ended: p.ended,
            tokens: p.ids.len(),
        }
    }

    fn generated_tokens(&self) -> usize {
        self.state().generated
    }

    async fn extend(&self, ts: &[Traj]) -> Result<(), ReasoningError> {
        let calls = self.plan(ts);
        let sent = calls.iter().map(|(members, call)| async move {
            // At most the whole limit, or a call wider than it would wait forever.
            let want = members.len().min(self.ctx.max_running) as u32;
            let _slots = self.ctx.running.acquire_many(want).await.expect("the semaphore is never closed");
            self.ctx.upstream.complete(call).await
        });
        let answers = match futures::future::try_join_all(sent).await {
            Ok(a) => a,
            Err(e) => {
                *self.failure.lock().expect("no panics while holding the failure lock") = Some(e);
                return Err(ReasoningError::Remote);
            }
        };
        let mut checked = Vec::with_capacity(answers.len());
        for ((members, _), answer) in calls.into_iter().zip(answers) {
            match whole_answer(answer.choices, members.len()) {
                Ok(choices) => checked.push((members, choices)),
                Err(message) => {
                    let e = UpstreamError::Protocol { url: "completions".into(), message };
                    *self.failure.lock().expect("no panics while holding the failure lock") = Some(e);
                    return Err(ReasoningError::Remote);
                }
            }
        }
        {
            let mut st = self.state();
            for (members, choices) in checked {
                for (t, c) in members.into_iter().zip(choices) {
                    let Some(mut p) = st.paths.remove(&t) else { continue };
                    let new = self.apply(&mut p, c);
                    st.paths.insert(t, p);
                    st.generated += new;
                    self.ctx.meter.add(new);
                    self.ctx.mm.generated_tokens.inc_by(new as u64);
                }
            }
            st.steps += 1;
        }
        self.send_progress().await;
        Ok(())
    }

    async fn score(&self, ts: &[Traj]) -> Result<Vec<PrmScore>, ReasoningError> {
        let prm = self.ctx.prm.clone().ok_or(ReasoningError::NoPrm)?;
        let prefixes: Vec<Vec<String>> = {
            let st = self.state();
            ts.iter().map(|t| st.paths.get(t).map(|p| p.steps.clone()).unwrap_or_default()).collect()
        };
        let question = self.question.clone();
        // A separate PRM is a model forward pass: off the async threads.
        let scored = tokio::task::spawn_blocking(move || {
            let items: Vec<ScoreItem<'_>> = prefixes
                .iter()
                .map(|steps| ScoreItem { question: &question, steps, hidden: None, logprobs: &[] })
                .collect();
            prm.score(&items)
        })
        .await
        .map_err(|e| ReasoningError::Scoring(e.to_string()))?;
        Ok(scored?)
    }

    fn progress(&self, budget: usize, best: Option<Quantiles>) {
        let mut st = self.state();
        st.budget = budget;
        st.best = best;
    }
}

/// The choices of an answer to a call for `n`, in index order, each of
/// which moved its path on. An engine that ignores `n`, or sends a choice
/// with neither text nor a finish reason, would otherwise leave a path
/// unchanged and have the search ask for it again forever.
pub(super) fn whole_answer(
    mut choices: Vec<CompletionChoice>,
    n: usize,
) -> Result<Vec<CompletionChoice>, String> {
    choices.sort_by_key(|c| c.index);
    let indices: Vec<usize> = choices.iter().map(|c| c.index).collect();
    if indices != (0..n).collect::<Vec<_>>() {
        return Err(format!("asked for {n} choices, the engine answered indices {indices:?}"));
    }
    if let Some(c) = choices.iter().find(|c| c.text.is_empty() && c.finish_reason.is_none()) {
        return Err(format!("choice {} has neither text nor a finish_reason", c.index));
    }
    Ok(choices)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice(index: usize, text: &str, finish: Option<&str>) -> CompletionChoice {
        serde_json::from_value(serde_json::json!({"index": index, "text": text, "finish_reason": finish}))
            .expect("a choice")
    }

    #[test]
    fn an_answer_missing_a_choice_or_holding_one_that_moved_nothing_is_refused() {
        let ok = whole_answer(vec![choice(1, "b", None), choice(0, "", Some("stop"))], 2).expect("whole");
        assert_eq!(ok.iter().map(|c| c.index).collect::<Vec<_>>(), [0, 1]);
        let e = whole_answer(vec![choice(0, "a", Some("stop"))], 8).unwrap_err();
        assert!(e.contains("asked for 8 choices") && e.contains("[0]"), "{e}");
        assert!(whole_answer(vec![], 1).is_err());
        assert!(whole_answer(vec![choice(0, "a", None), choice(0, "b", None)], 2).is_err(), "an index twice");
        let e = whole_answer(vec![choice(0, "", None)], 1).unwrap_err();
        assert!(e.contains("neither text nor a finish_reason"), "{e}");
    }
}
