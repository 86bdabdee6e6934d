//! Runs strategies on the engine. Each request's strategy is a future; a
//! `step` polls every future once, then serves what they asked for — one
//! engine step over every trajectory that is extending (together with any
//! other sequences the caller passes, such as plain requests), and PRM
//! scores from the hidden states the engine captured at step ends.

use std::cell::{RefCell, RefMut};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use super::{Backend, Outcome, ReasoningError, ReasoningParams, Traj, TrajInfo, strategies};
use crate::engine::{
    Engine, EngineError, EosPolicy, FinishReason, HiddenCapture, Logprobs, SamplingParams, SeqOptions,
    SeqUpdate, Sequence, StopCriteria, child_seed,
};
use crate::prm::{PrmScore, ScoreItem, Scorer};

pub const STEP_DELIMITER: &str = "\n\n";

/// One reasoning request for the runtime.
#[derive(Debug, Clone)]
pub struct ReasoningJob {
    pub question: String,
    pub prompt: Vec<u32>,
    pub params: ReasoningParams,
    pub sampling: SamplingParams,
}

pub type TaskId = u64;

struct Slot {
    seq: Sequence,
    steps: Vec<String>,
    /// Generating a step for the current extend call.
    in_step: bool,
}

struct TaskState {
    engine: Arc<Engine>,
    question: String,
    params: ReasoningParams,
    sampling: SamplingParams,
    slots: HashMap<Traj, Slot>,
    next: Traj,
    forks: u64,
    generated: usize,
    score_request: Option<Vec<Traj>>,
    score_result: Option<Result<Vec<PrmScore>, ReasoningError>>,
}

impl TaskState {
    fn step_criteria(&self, used: usize) -> StopCriteria {
        let left = self.params.max_tokens.saturating_sub(used);
        StopCriteria {
            max_tokens: self.params.max_step_tokens.min(left).max(1),
            stop: vec![STEP_DELIMITER.to_string()],
            eos: EosPolicy::Stop,
        }
    }

    fn finished(&self, slot: &Slot) -> bool {
        match slot.seq.finish() {
            None => false,
            // A step that ended on the delimiter can go on, within the limits.
            Some(FinishReason::Stop { .. }) => {
                slot.steps.len() >= self.params.max_steps
                    || slot.seq.generated().len() >= self.params.max_tokens
            }
            Some(_) => true,
        }
    }

    fn needs_step(slot: &Slot) -> bool {
        !slot.seq.is_fed() || (slot.in_step && slot.seq.needs_work())
    }

    /// Records finished steps and serves a pending score request.
    fn after_step(&mut self, prm: Option<&dyn Scorer>) {
        for slot in self.slots.values_mut() {
            if slot.in_step && !slot.seq.needs_work() {
                slot.in_step = false;
                let text = slot.seq.run_text().trim_end().to_string();
                if !text.is_empty() {
                    slot.steps.push(text);
                }
            }
        }
        let ready = self
            .score_request
            .as_ref()
            .is_some_and(|ts| ts.iter().all(|t| self.slots.get(t).is_none_or(|s| s.seq.is_fed())));
        if !ready {
            return;
        }
        let ts = self.score_request.take().expect("checked above");
        let result = match prm {
            None => Err(ReasoningError::NoPrm),
            Some(prm) => ts
                .iter()
                .map(|t| self.slots.get(t).ok_or(ReasoningError::UnknownTrajectory(*t)))
                .collect::<Result<Vec<&Slot>, _>>()
                .and_then(|slots| {
                    let logprobs: Vec<Vec<f32>> =
                        slots.iter().map(|s| s.seq.logprobs().iter().map(|l| l.logprob).collect()).collect();
                    let items: Vec<ScoreItem<'_>> = slots
                        .iter()
                        .zip(&logprobs)
                        .map(|(s, lp)| ScoreItem {
                            question: &self.question,
                            steps: &s.steps,
                            hidden: s.seq.hidden(),
                            logprobs: lp,
                        })
                        .collect();
                    prm.score(&items).map_err(ReasoningError::from)
                }),
        };
        self.score_result = Some(result);
    }
}

/// The backend a strategy sees: handles into its request's state.
struct TaskBackend {
    st: Rc<RefCell<TaskState>>,
}

/// Resolves when `done` says so; the runtime polls it once per step.
struct Until<F: FnMut() -> Option<T>, T>(F);

impl<F: FnMut() -> Option<T> + Unpin, T> Future for Until<F, T> {
    type Output = T;
    fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<T> {
        match (self.0)() {
            Some(v) => Poll::Ready(v),
            None => Poll::Pending,
        }
    }
}

impl Backend for TaskBackend {
    fn root(&self) -> Traj {
        0
    }

    fn fork(&self, t: Traj, k: usize) -> Result<Vec<Traj>, ReasoningError> {
        let mut st = self.st.borrow_mut();
        let base = st.sampling.seed;
        let seeds: Vec<u64> = (0..k as u64).map(|i| child_seed(base, st.forks + i)).collect();
        st.forks += k as u64;
        let engine = st.engine.clone();
        let parent = st.slots.get_mut(&t).ok_or(ReasoningError::UnknownTrajectory(t))?;
        let steps = parent.steps.clone();
        let children = engine.fork(&mut parent.seq, &seeds)?;
        let mut ids = Vec::with_capacity(k);
        for seq in children {
            let id = st.next;
            st.next += 1;
            st.slots.insert(id, Slot { seq, steps: steps.clone(), in_step: false });
            ids.push(id);
        }
        Ok(ids)
    }

    fn release(&self, ts: &[Traj]) {
        let mut st = self.st.borrow_mut();
        for t in ts {
            st.slots.remove(t);
        }
    }

    fn info(&self, t: Traj) -> TrajInfo {
        let st = self.st.borrow();
        let Some(slot) = st.slots.get(&t) else {
            return TrajInfo { steps: vec![], text: String::new(), finished: true, ended: false, tokens: 0 };
        };
        TrajInfo {
            steps: slot.steps.clone(),
            text: slot.seq.text().trim_end().to_string(),
            finished: st.finished(slot),
            ended: slot.seq.finish() == Some(FinishReason::Eos),
            tokens: slot.seq.generated().len(),
        }
    }

    fn generated_tokens(&self) -> usize {
        self.st.borrow().generated
    }

    fn extend(&self, ts: &[Traj]) -> impl Future<Output = Result<(), ReasoningError>> {
        {
            let mut st = self.st.borrow_mut();
            let ids: Vec<Traj> = ts.to_vec();
            for t in ids {
                let Some(slot) = st.slots.get(&t) else { continue };
                if st.finished(slot) {
                    continue;
                }
                let criteria = st.step_criteria(slot.seq.generated().len());
                let slot = st.slots.get_mut(&t).expect("looked up above");
                if slot.seq.finish().is_some() {
                    slot.seq.resume(criteria);
                } else {
                    // A fresh fork still runs under its parent's criteria: give it a step's.
                    slot.seq.resume(criteria);
                }
                slot.in_step = true;
            }
        }
        let st = self.st.clone();
        Until(move || {
            let st = st.borrow();
            (!st.slots.values().any(|s| s.in_step)).then_some(Ok(()))
        })
    }

    fn score(&self, ts: &[Traj]) -> impl Future<Output = Result<Vec<PrmScore>, ReasoningError>> {
        {
            let mut st = self.st.borrow_mut();
            st.score_result = None;
            st.score_request = Some(ts.to_vec());
        }
        let st = self.st.clone();
        Until(move || st.borrow_mut().score_result.take())
    }
}

struct Task {
    id: TaskId,
    state: Rc<RefCell<TaskState>>,
    future: Pin<Box<dyn Future<Output = Result<Outcome, ReasoningError>>>>,
}

/// Every reasoning request of one worker.
pub struct Runtime {
    engine: Arc<Engine>,
    prm: Option<Arc<dyn Scorer>>,
    tasks: Vec<Task>,
    done: Vec<(TaskId, Result<Outcome, ReasoningError>)>,
    next: TaskId,
}

/// What one step did.
#[derive(Debug, Default)]
pub struct StepReport {
    /// Updates of the caller's own sequences, in the order given.
    pub updates: Vec<SeqUpdate>,
    /// Tokens generated by reasoning trajectories.
    pub reasoning_tokens: usize,
    /// Sequences in the engine step (the caller's and reasoning ones).
    pub batch: usize,
}

impl Runtime {
    pub fn new(engine: Arc<Engine>, prm: Option<Arc<dyn Scorer>>) -> Self {
        Self { engine, prm, tasks: Vec::new(), done: Vec::new(), next: 1 }
    }

    pub fn has_prm(&self) -> bool {
        self.prm.is_some()
    }

    /// Starts a request; its prompt is prefilled by the next steps.
    pub fn spawn(&mut self, job: ReasoningJob) -> Result<TaskId, EngineError> {
        let opts = SeqOptions {
            sampling: job.sampling,
            stop: StopCriteria { max_tokens: 1, stop: vec![STEP_DELIMITER.into()], eos: EosPolicy::Stop },
            // The chosen tokens' logprobs are PRM features.
            logprobs: Logprobs::Top(0),
            capture: HiddenCapture::AtStop,
        };
        let root = self.engine.start(job.prompt, opts)?;
        let mut slots = HashMap::new();
        slots.insert(0, Slot { seq: root, steps: Vec::new(), in_step: false });
        let state = Rc::new(RefCell::new(TaskState {
            engine: self.engine.clone(),
            question: job.question,
            params: job.params,
            sampling: job.sampling,
            slots,
            next: 1,
            forks: 0,
            generated: 0,
            score_request: None,
            score_result: None,
        }));
        let backend = TaskBackend { st: state.clone() };
        let params = job.params;
        let future = Box::pin(async move { strategies::run(&backend, &params).await });
        let id = self.next;
        self.next += 1;
        self.tasks.push(Task { id, state, future });
        Ok(id)
    }

    /// Drops a request and every trajectory it holds.
    pub fn cancel(&mut self, id: TaskId) {
        self.tasks.retain(|t| t.id != id);
    }

    pub fn is_idle(&self) -> bool {
        self.tasks.is_empty() && self.done.is_empty()
    }

    pub fn running(&self) -> usize {
        self.tasks.len()
    }

    /// Live trajectories of a request (for admission and metrics).
    pub fn trajectories(&self, id: TaskId) -> usize {
        self.tasks.iter().find(|t| t.id == id).map_or(0, |t| t.state.borrow().slots.len())
    }

    /// Tokens generated so far by a request.
    pub fn generated(&self, id: TaskId) -> usize {
        self.tasks.iter().find(|t| t.id == id).map_or(0, |t| t.state.borrow().generated)
    }

    /// Requests that finished since the last call.
    pub fn take_finished(&mut self) -> Vec<(TaskId, Result<Outcome, ReasoningError>)> {
        std::mem::take(&mut self.done)
    }

    fn poll_tasks(&mut self) {
        let mut cx = Context::from_waker(Waker::noop());
        let mut i = 0;
        while i < self.tasks.len() {
            let t = &mut self.tasks[i];
            // A request starts once its prompt is prefilled.
            let started = t.state.borrow().slots.get(&0).is_none_or(|r| r.seq.is_fed());
            if started && let Poll::Ready(result) = t.future.as_mut().poll(&mut cx) {
                let task = self.tasks.swap_remove(i);
                self.done.push((task.id, result));
                continue;
            }
            i += 1;
        }
    }

    /// Polls every request, then runs one engine step over `plain` and
    /// every trajectory that is extending or prefilling, and serves scores.
    pub fn step(&mut self, plain: Vec<&mut Sequence>) -> Result<StepReport, EngineError> {
        self.poll_tasks();
        let prm = self.prm.clone();
        let mut guards: Vec<RefMut<'_, TaskState>> =
            self.tasks.iter().map(|t| t.state.borrow_mut()).collect();
        let n_plain = plain.len();
        let mut owners: Vec<usize> = Vec::new();
        let mut refs: Vec<&mut Sequence> = plain.into_iter().collect();
        for (g, state) in guards.iter_mut().enumerate() {
            for slot in state.slots.values_mut() {
                if TaskState::needs_step(slot) {
                    refs.push(&mut slot.seq);
                    owners.push(g);
                }
            }
        }
        let mut report = StepReport { batch: refs.len(), ..Default::default() };
        if !refs.is_empty() {
            let result = self.engine.step(&mut refs);
            drop(refs);
            let mut updates = result?;
            for (u, &g) in updates[n_plain..].iter().zip(&owners) {
                if u.token.is_some() {
                    guards[g].generated += 1;
                    report.reasoning_tokens += 1;
                }
            }
            updates.truncate(n_plain);
            report.updates = updates;
        }
        for state in guards.iter_mut() {
            state.after_step(prm.as_deref());
        }
        drop(guards);
        // Let requests whose scores just arrived ask for their next step now.
        self.poll_tasks();
        Ok(report)
    }
}
