//! One worker's private state, driven one `step` at a time. Requests wait in
//! FIFO order; a request starts when the sequences it needs at once fit
//! under the running limit (`n` choices for a plain request, its prompt for
//! a reasoning one). Before every engine step [`allocate`] decides how many
//! sequences each running request may step: what it wants now, shared
//! max-min fairly, with what it no longer uses handed back at once. Plain
//! and reasoning requests are two kinds of task here; this scheduler alone
//! calls the engine's step, and the reasoning runtime only sees its own
//! requests. Tests drive it directly.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::backend::GenEvent;
use crate::engine::{Engine, EngineError, Sequence};
use crate::metrics::ModelMetrics;
use crate::prm::Scorer;
use crate::reasoning::runtime::{Grants, ReasoningJob, Runtime, TaskId};

use super::admission::{Claim, allocate, keep, reserve_for};
use super::job::{Delivery, Job, Outbox};
use super::plain::Plain;

/// Why a step failed; the worker fails its requests and restarts.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("injected model error at step {0}")]
    Injected(u64),
}

/// Which requests an engine step takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// Plain requests one prefill chunk or less from their first token.
    Fresh,
    /// Everyone, within their shares.
    All,
}

/// A fault the test hook can inject into a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Panic,
    ModelError,
}

/// Called with the index of every step that has work; a test-only way to
/// make a worker fail (see [`super::WorkerOptions::fault`]).
pub type FaultHook = Arc<dyn Fn(u64) -> Option<Fault> + Send + Sync>;

enum Kind {
    Plain(Box<Plain>),
    Reasoning { task: TaskId, last: Option<(usize, usize, usize)> },
}

/// A started request.
struct Task {
    job: Job,
    kind: Kind,
    /// Sequences it may step (its share of the running limit).
    held: usize,
    queue_secs: f64,
    outbox: Outbox,
    /// Every event of the response is queued; only delivery is left.
    complete: bool,
}

/// What one step did, for the worker loop and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Sequences fed or sampled in this step.
    pub batch: usize,
    pub tokens: usize,
    pub cancelled: usize,
    pub completed: usize,
}

/// Runs its callback when dropped while the thread panics, or after
/// [`fail`](Self::fail): the worker pool marks the worker as restarting
/// before any of its requests' reply channels close (so a client that gets
/// the 500 finds /health at 503).
pub struct FailureGuard {
    failed: bool,
    on_failure: Option<Box<dyn FnOnce() + Send>>,
}

impl FailureGuard {
    pub fn new(on_failure: impl FnOnce() + Send + 'static) -> Self {
        Self { failed: false, on_failure: Some(Box::new(on_failure)) }
    }

    pub fn fail(&mut self) {
        self.failed = true;
    }
}

impl Drop for FailureGuard {
    fn drop(&mut self) {
        if (self.failed || std::thread::panicking())
            && let Some(f) = self.on_failure.take()
        {
            f();
        }
    }
}

pub struct Scheduler {
    /// First, so that it is dropped before the requests below.
    guard: Option<FailureGuard>,
    engine: Arc<Engine>,
    metrics: ModelMetrics,
    max_running: usize,
    waiting: VecDeque<Job>,
    tasks: Vec<Task>,
    runtime: Runtime,
    fault: Option<FaultHook>,
    steps: u64,
}

impl Scheduler {
    pub fn new(
        engine: Arc<Engine>,
        metrics: ModelMetrics,
        max_running: usize,
        prm: Option<Arc<dyn Scorer>>,
    ) -> Self {
        Self {
            guard: None,
            runtime: Runtime::new(engine.clone(), prm),
            engine,
            metrics,
            max_running,
            waiting: VecDeque::new(),
            tasks: Vec::new(),
            fault: None,
            steps: 0,
        }
    }

    pub fn with_fault_hook(mut self, hook: Option<FaultHook>) -> Self {
        self.fault = hook;
        self
    }

    pub fn with_failure_guard(mut self, guard: FailureGuard) -> Self {
        self.guard = Some(guard);
        self
    }

    /// The worker gives up on this scheduler (a step failed): its guard fires when it is dropped.
    pub fn fail(&mut self) {
        if let Some(g) = &mut self.guard {
            g.fail();
        }
    }

    pub fn submit(&mut self, job: Job) {
        self.waiting.push_back(job);
        self.update_gauges();
    }

    /// Nothing waiting, running or left to deliver.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.tasks.is_empty()
    }

    /// Whether a step would run the model (rather than only deliver events).
    pub fn has_compute(&self) -> bool {
        !self.waiting.is_empty() || self.tasks.iter().any(|t| !t.complete)
    }

    pub fn waiting_requests(&self) -> usize {
        self.waiting.len()
    }

    pub fn waiting_sequences(&self) -> usize {
        self.waiting.iter().map(|j| j.request.initial_sequences()).sum()
    }

    /// Sequences the running requests may step (their shares of the limit).
    pub fn running_sequences(&self) -> usize {
        self.tasks.iter().filter(|t| !t.complete).map(|t| t.held).sum()
    }

    /// Running requests (started, not yet complete).
    pub fn running_requests(&self) -> usize {
        self.tasks.iter().filter(|t| !t.complete).count()
    }

    /// One engine step over every sequence the running requests may step.
    /// An error means the engine failed: the caller fails the worker.
    pub fn step(&mut self) -> Result<StepReport, StepError> {
        let mut report = StepReport { cancelled: self.drop_abandoned(), ..Default::default() };
        self.runtime.poll();
        self.share_out();
        if let Some(hook) = &self.fault
            && self.has_compute()
        {
            let index = self.steps;
            match hook(index) {
                Some(Fault::Panic) => panic!("injected fault at step {index}"),
                Some(Fault::ModelError) => return Err(StepError::Injected(index)),
                None => {}
            }
        }
        self.steps += 1;
        let fast = self.fast_lane()?;
        let (batch, tokens) = self.decode(Lane::All)?;
        report.batch = batch;
        report.tokens = tokens + fast.tokens;
        self.runtime.poll();
        report.completed = fast.completed + self.complete_plain() + self.complete_reasoning();
        report.cancelled += fast.cancelled + self.flush();
        self.update_gauges();
        Ok(report)
    }

    /// Drops requests whose client left, waiting or running: their
    /// sequences and caches go at once, and no more work is done for them.
    fn drop_abandoned(&mut self) -> usize {
        let mut cancelled = 0;
        self.waiting.retain(|j| {
            let closed = j.reply.is_closed();
            cancelled += usize::from(closed && j.meter.claim_cancel());
            !closed
        });
        let runtime = &mut self.runtime;
        let mut dropped = false;
        self.tasks.retain(|t| {
            if !t.job.reply.is_closed() {
                return true;
            }
            if let Kind::Reasoning { task, .. } = t.kind {
                runtime.cancel(task);
            }
            // A complete request whose answer was not delivered is counted by the HTTP side.
            cancelled += usize::from(!t.complete && t.job.meter.claim_cancel());
            dropped = true;
            false
        });
        self.metrics.cancelled.inc_by(cancelled as u64);
        if dropped || cancelled > 0 {
            self.update_gauges();
        }
        cancelled
    }

    fn claim(&self, t: &Task) -> Claim {
        match &t.kind {
            Kind::Plain(p) => {
                let k = if t.complete { 0 } else { p.unfinished(&t.job) };
                Claim { held: t.held, wants: k, started: k, floor: k }
            }
            Kind::Reasoning { task, .. } => {
                let floor = usize::from(!t.complete);
                let (wants, started) = self.runtime.demand(*task);
                Claim { held: t.held, wants, started, floor }
            }
        }
    }

    /// Gives back what running requests no longer use (and, while sequences
    /// are reserved for the oldest waiting request, what has not begun its
    /// step), starts waiting requests that now fit (oldest first, none
    /// overtaking), then shares the rest out.
    fn share_out(&mut self) {
        let claims: Vec<Claim> = self.tasks.iter().map(|t| self.claim(t)).collect();
        let reserving = self.head_needs().is_some_and(|k| reserve_for(&claims, self.max_running, k));
        for (t, c) in self.tasks.iter_mut().zip(&claims) {
            t.held = keep(c, reserving);
        }
        let mut used: usize = self.tasks.iter().map(|t| t.held).sum();
        while let Some(job) = self.waiting.front() {
            let need = job.request.initial_sequences();
            if used + need > self.max_running {
                break;
            }
            let job = self.waiting.pop_front().expect("front() was Some");
            if self.start(job, need) {
                used += need;
            }
        }
        let claims: Vec<Claim> = self.tasks.iter().map(|t| self.claim(t)).collect();
        let held = allocate(&claims, self.max_running, self.head_needs());
        for (t, held) in self.tasks.iter_mut().zip(held) {
            t.held = held;
        }
    }

    /// Sequences the oldest waiting request needs to start.
    fn head_needs(&self) -> Option<usize> {
        self.waiting.front().map(|j| j.request.initial_sequences())
    }

    /// Starts a request; false when its sequences could not be created.
    fn start(&mut self, job: Job, need: usize) -> bool {
        let queue_secs = job.admitted.elapsed().as_secs_f64();
        self.metrics.queue_duration.observe(queue_secs);
        let kind = match &job.request.reasoning {
            None => Plain::start(&self.engine, &job).map(|p| Kind::Plain(Box::new(p))),
            Some(params) => {
                let r = &job.request;
                self.runtime
                    .spawn(ReasoningJob {
                        question: r.question.clone(),
                        prompt: r.prompts[0].clone(),
                        params: *params,
                        sampling: r.sampling,
                    })
                    .map(|task| {
                        self.metrics.prompt_tokens.inc_by(r.prompts[0].len() as u64);
                        Kind::Reasoning { task, last: None }
                    })
            }
        };
        match kind {
            Ok(kind) => {
                self.tasks.push(Task {
                    job,
                    kind,
                    held: need,
                    queue_secs,
                    outbox: Outbox::default(),
                    complete: false,
                });
                true
            }
            Err(e) => {
                tracing::error!(request = %job.id, error = %e, "could not start a request");
                let _ = job.reply.try_send(GenEvent::Failed);
                false
            }
        }
    }

    /// One engine step: every plain request's sequences and each reasoning
    /// request's share of the trajectories it wants stepped, in one batch.
    fn decode(&mut self, lane: Lane) -> Result<(usize, usize), EngineError> {
        let grants: HashMap<TaskId, usize> = match lane {
            Lane::Fresh => HashMap::new(),
            Lane::All => self
                .tasks
                .iter()
                .filter_map(|t| match t.kind {
                    Kind::Reasoning { task, .. } => Some((task, t.held)),
                    Kind::Plain(_) => None,
                })
                .collect(),
        };
        let mut thinking = self.runtime.begin_step(&Grants::Limited(grants));
        let chunk = self.engine.prefill_chunk();
        let mut plain_refs: Vec<(usize, usize)> = Vec::new();
        let mut refs: Vec<&mut Sequence> = Vec::new();
        for (i, t) in self.tasks.iter_mut().enumerate() {
            if let Kind::Plain(p) = &mut t.kind
                && (lane == Lane::All || p.first_token_within_chunk(chunk))
            {
                let seqs = p.sequences();
                plain_refs.push((i, seqs.len()));
                refs.extend(seqs);
            }
        }
        let n_plain = refs.len();
        refs.extend(thinking.sequences());
        let batch = refs.len();
        let updates = if batch == 0 { Vec::new() } else { self.engine.step(&mut refs)? };
        drop(refs);
        let per_task: HashMap<TaskId, usize> =
            thinking.finish(updates.get(n_plain..).unwrap_or(&[])).into_iter().collect();
        let reasoning_tokens: usize = per_task.values().sum();
        for t in &self.tasks {
            if let Kind::Reasoning { task, .. } = t.kind {
                t.job.meter.add(per_task.get(&task).copied().unwrap_or(0));
            }
        }
        if batch > 0 {
            self.metrics.batch_size.observe(batch as f64);
        }
        self.metrics.generated_tokens.inc_by(reasoning_tokens as u64);
        let mut tokens = reasoning_tokens;
        let mut offset = 0;
        for (i, k) in plain_refs {
            let t = &mut self.tasks[i];
            let Kind::Plain(p) = &mut t.kind else { unreachable!("plain_refs lists plain tasks") };
            let generated =
                p.apply(&updates[offset..offset + k], &t.job, &self.engine, &self.metrics, &mut t.outbox);
            t.job.meter.add(generated);
            tokens += generated;
            offset += k;
        }
        Ok((batch, tokens))
    }

    /// Plain requests that have not sent a token yet and have at most one
    /// prefill chunk of prompt left get up to two small steps of their own
    /// (the rest of the prompt, then the first token, delivered at once)
    /// before the full batch: a request whose prompt fits in one chunk gets
    /// its first token in about one full step however many reasoning
    /// trajectories share the batch, at the cost of two small forward passes
    /// per new request. A longer prompt is fed one chunk per full step, as
    /// chunked prefill means (a step never carries more of it, so running
    /// requests keep their pace), and takes the fast lane for its last
    /// chunk: its first token comes a full step sooner than in the batch.
    /// A request takes the fast lane at most once: it leaves with its first
    /// token. Reports the tokens, completions and cancellations of its steps.
    fn fast_lane(&mut self) -> Result<StepReport, EngineError> {
        let chunk = self.engine.prefill_chunk();
        let fresh =
            |t: &Task| !t.complete && matches!(&t.kind, Kind::Plain(p) if p.first_token_within_chunk(chunk));
        // Only worth it when a fuller batch would otherwise carry them.
        let others = self.tasks.iter().any(|t| !t.complete && !fresh(t));
        let mut report = StepReport::default();
        for _ in 0..2 {
            if !others || !self.tasks.iter().any(fresh) {
                break;
            }
            report.tokens += self.decode(Lane::Fresh)?.1;
            report.completed += self.complete_plain();
            report.cancelled += self.flush();
        }
        Ok(report)
    }

    /// Forks prefilled prompts into choices and queues `Done` for plain
    /// requests whose every choice finished.
    fn complete_plain(&mut self) -> usize {
        let mut completed = 0;
        for t in self.tasks.iter_mut().filter(|t| !t.complete) {
            let Kind::Plain(p) = &mut t.kind else { continue };
            if let Err(e) = p.promote_prefilled_roots(&self.engine, &t.job) {
                tracing::error!(request = %t.job.id, error = %e, "fork failed");
                t.outbox.push(GenEvent::Failed);
                t.complete = true;
                t.held = 0;
                continue;
            }
            if p.is_done(&t.job) {
                t.complete = true;
                t.held = 0;
                completed += 1;
                t.outbox.push(GenEvent::Done(p.stats(&t.job, t.queue_secs)));
            }
        }
        completed
    }

    /// Queues the answers of reasoning requests that finished, and a
    /// progress event for those that completed a reasoning step.
    fn complete_reasoning(&mut self) -> usize {
        let mut completed = 0;
        let mut finished: HashMap<TaskId, _> = self.runtime.take_finished().into_iter().collect();
        for t in self.tasks.iter_mut().filter(|t| !t.complete) {
            let Kind::Reasoning { task, last } = &mut t.kind else { continue };
            if let Some(result) = finished.remove(task) {
                t.complete = true;
                t.held = 0;
                match result {
                    Ok(outcome) => {
                        completed += 1;
                        self.metrics.ttft.observe(t.job.received.elapsed().as_secs_f64());
                        let params = t.job.request.reasoning.expect("reasoning tasks have reasoning");
                        self.metrics.reasoning.record(
                            params.strategy.name(),
                            &outcome.accounting,
                            params.budget_quantile,
                        );
                        for e in crate::backend::outcome_events(
                            &t.job.request,
                            outcome,
                            t.queue_secs,
                            t.job.received,
                        ) {
                            t.outbox.push(e);
                        }
                    }
                    Err(e) => {
                        tracing::error!(request = %t.job.id, error = %e, "reasoning failed");
                        t.outbox.push(GenEvent::Failed);
                    }
                }
                continue;
            }
            let Some(p) = self.runtime.progress(*task) else { continue };
            let key = (p.steps, p.samples, p.budget);
            if p.steps > 0 && *last != Some(key) {
                *last = Some(key);
                t.outbox.push(GenEvent::Progress(p));
            }
        }
        completed
    }

    /// Delivers what each client has room for; forgets requests that are
    /// delivered, and drops (and counts) those whose client left.
    fn flush(&mut self) -> usize {
        let mut cancelled = 0;
        let runtime = &mut self.runtime;
        self.tasks.retain_mut(|t| match t.outbox.flush(&t.job.reply) {
            Delivery::Closed => {
                if let Kind::Reasoning { task, .. } = t.kind {
                    runtime.cancel(task);
                }
                cancelled += usize::from(!t.complete && t.job.meter.claim_cancel());
                false
            }
            Delivery::Open => !(t.complete && t.outbox.is_empty()),
        });
        self.metrics.cancelled.inc_by(cancelled as u64);
        cancelled
    }

    fn update_gauges(&self) {
        self.metrics.queue_depth.set(self.waiting_sequences() as i64);
        self.metrics.running.set(self.running_sequences() as i64);
        self.metrics.kv_bytes.set(self.engine.model().kv_memory().live_bytes() as i64);
    }
}
