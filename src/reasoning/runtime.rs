//! Runs strategies over the engine's sequences. Each request's strategy is
//! a future; [`Runtime::poll`] polls every future once, after which each
//! request wants some of its trajectories stepped ([`Runtime::demand`]).
//! The caller — the worker's scheduler, or an offline driver — decides how
//! many sequences each request may step ([`Grants`]), takes them with
//! [`Runtime::begin_step`], runs them through its own engine step with any
//! other sequences it has, and hands the updates back; the runtime then
//! serves PRM scores from the hidden states captured at step ends. The
//! runtime never calls the engine's step itself and never sees plain
//! requests.

use std::cell::{RefCell, RefMut};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use super::{Outcome, ReasoningError, ReasoningParams, Traj, TrajInfo, Trajectories, strategies};
use crate::engine::{
    Engine, EngineError, EosPolicy, FinishReason, HiddenCapture, Logprobs, SamplingParams, SeqOptions,
    SeqUpdate, Sequence, StopCriteria, child_seed,
};
use crate::prm::{PrmScore, Quantiles, ScoreItem, Scorer};

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
    id: TaskId,
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
    /// What the strategy last reported: its budget and best estimate.
    budget: usize,
    best: Option<Quantiles>,
    /// Extend calls completed (reasoning steps of the request as a whole).
    steps: usize,
    /// An extend call is outstanding.
    extending: bool,
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

    /// Part-way through its step (or its prompt): tokens generated or pending.
    fn started(slot: &Slot) -> bool {
        slot.seq.run_tokens() > 0 || !slot.seq.is_fed()
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
        if self.extending && !self.slots.values().any(|s| s.in_step) {
            self.extending = false;
            self.steps += 1;
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

impl Trajectories for TaskBackend {
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
            st.extending = true;
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

    fn progress(&self, budget: usize, best: Option<Quantiles>) {
        let mut st = self.st.borrow_mut();
        st.budget = budget;
        if let Some(b) = best
            && st.best.is_none_or(|cur| b.q50 > cur.q50)
        {
            st.best = Some(b);
        }
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

/// How many sequences each request may step in the next engine step.
#[derive(Debug, Clone)]
pub enum Grants {
    /// As many as each request wants (offline drivers with no running limit).
    Unlimited,
    /// At most this many for each listed request; unlisted ones step nothing.
    Limited(HashMap<TaskId, usize>),
}

impl Grants {
    fn of(&self, id: TaskId) -> usize {
        match self {
            Grants::Unlimited => usize::MAX,
            Grants::Limited(m) => m.get(&id).copied().unwrap_or(0),
        }
    }
}

/// Where a request stands, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskProgress {
    /// Trajectories drawn so far (forks).
    pub samples: usize,
    /// Trajectories alive (not yet released), the prompt's root excluded.
    pub live: usize,
    /// Samples the strategy means to draw (N_IAS or N_max; beam: its paths after the last pruning point).
    pub budget: usize,
    /// The best success-probability estimate seen so far.
    pub best: Option<Quantiles>,
    /// Tokens generated so far.
    pub tokens: usize,
    /// Extend calls completed: the request's reasoning steps.
    pub steps: usize,
}

/// The sequences of one engine step taken from the runtime; hand the
/// engine's updates back with [`RuntimeBatch::finish`].
pub struct RuntimeBatch<'a> {
    guards: Vec<RefMut<'a, TaskState>>,
    /// Per guard, the trajectories taken, in order.
    picked: Vec<Vec<Traj>>,
    prm: Option<Arc<dyn Scorer>>,
}

impl<'a> RuntimeBatch<'a> {
    /// The picked sequences, in a stable order that [`finish`](Self::finish) expects back.
    pub fn sequences(&mut self) -> Vec<&mut Sequence> {
        let mut out = Vec::new();
        for (state, picked) in self.guards.iter_mut().zip(&self.picked) {
            // Disjoint slots of one map: collect them by id, in the picked order.
            let mut by_id: HashMap<Traj, &mut Slot> =
                state.slots.iter_mut().filter(|(t, _)| picked.contains(t)).map(|(t, s)| (*t, s)).collect();
            for t in picked {
                let slot = by_id.remove(t).expect("picked trajectories exist");
                out.push(&mut slot.seq);
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.picked.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the engine's updates for [`sequences`](Self::sequences) (same
    /// order), records finished steps and serves score requests. Returns
    /// the tokens generated per request.
    pub fn finish(mut self, updates: &[SeqUpdate]) -> Vec<(TaskId, usize)> {
        let mut out = Vec::with_capacity(self.guards.len());
        let mut it = updates.iter();
        for (state, picked) in self.guards.iter_mut().zip(&self.picked) {
            let tokens = picked.iter().filter(|_| it.next().is_some_and(|u| u.token.is_some())).count();
            state.generated += tokens;
            out.push((state.id, tokens));
        }
        for state in self.guards.iter_mut() {
            state.after_step(self.prm.as_deref());
        }
        out
    }
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
        let id = self.next;
        self.next += 1;
        let state = Rc::new(RefCell::new(TaskState {
            id,
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
            budget: 0,
            best: None,
            steps: 0,
            extending: false,
        }));
        let backend = TaskBackend { st: state.clone() };
        let params = job.params;
        let future = Box::pin(async move { strategies::run(&backend, &params).await });
        self.tasks.push(Task { id, state, future });
        Ok(id)
    }

    /// Drops a request and every trajectory it holds: their caches go at
    /// once, and no PRM work is done for it any more.
    pub fn cancel(&mut self, id: TaskId) {
        self.tasks.retain(|t| t.id != id);
        self.done.retain(|(t, _)| *t != id);
    }

    pub fn is_idle(&self) -> bool {
        self.tasks.is_empty() && self.done.is_empty()
    }

    pub fn running(&self) -> usize {
        self.tasks.len()
    }

    /// Task ids in the order they were spawned.
    pub fn task_ids(&self) -> Vec<TaskId> {
        let mut ids: Vec<TaskId> = self.tasks.iter().map(|t| t.id).collect();
        ids.sort_unstable();
        ids
    }

    /// Sequences a request wants stepped now — its prompt while it is
    /// being prefilled, then every trajectory inside an extend call — and
    /// how many of those are part-way through their step.
    pub fn demand(&self, id: TaskId) -> (usize, usize) {
        let Some(task) = self.tasks.iter().find(|t| t.id == id) else { return (0, 0) };
        let st = task.state.borrow();
        let wanting = st.slots.values().filter(|s| TaskState::needs_step(s));
        let (mut wants, mut started) = (0, 0);
        for s in wanting {
            wants += 1;
            started += usize::from(TaskState::started(s));
        }
        (wants, started)
    }

    /// Live trajectories of a request.
    pub fn trajectories(&self, id: TaskId) -> usize {
        self.tasks.iter().find(|t| t.id == id).map_or(0, |t| t.state.borrow().slots.len())
    }

    /// Tokens generated so far by a request.
    pub fn generated(&self, id: TaskId) -> usize {
        self.tasks.iter().find(|t| t.id == id).map_or(0, |t| t.state.borrow().generated)
    }

    pub fn progress(&self, id: TaskId) -> Option<TaskProgress> {
        let task = self.tasks.iter().find(|t| t.id == id)?;
        let st = task.state.borrow();
        Some(TaskProgress {
            samples: st.forks as usize,
            live: st.slots.keys().filter(|&&t| t != 0).count(),
            budget: st.budget,
            best: st.best,
            tokens: st.generated,
            steps: st.steps,
        })
    }

    /// Requests that finished since the last call.
    pub fn take_finished(&mut self) -> Vec<(TaskId, Result<Outcome, ReasoningError>)> {
        std::mem::take(&mut self.done)
    }

    /// Polls every request once, so that each asks for its next step or scores.
    pub fn poll(&mut self) {
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

    /// Takes up to each request's grant of the sequences it wants stepped.
    /// A trajectory already part-way through its step goes first, so that
    /// a step once started finishes before another begins; then by age.
    pub fn begin_step(&mut self, grants: &Grants) -> RuntimeBatch<'_> {
        let mut guards = Vec::with_capacity(self.tasks.len());
        let mut picked = Vec::with_capacity(self.tasks.len());
        for task in &self.tasks {
            let grant = grants.of(task.id);
            let state = task.state.borrow_mut();
            let mut want: Vec<(bool, Traj)> = state
                .slots
                .iter()
                .filter(|(_, s)| TaskState::needs_step(s))
                .map(|(t, s)| (!TaskState::started(s), *t))
                .collect();
            want.sort_unstable();
            picked.push(want.into_iter().take(grant).map(|(_, t)| t).collect());
            guards.push(state);
        }
        RuntimeBatch { guards, picked, prm: self.prm.clone() }
    }
}
