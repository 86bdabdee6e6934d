//! One worker's private state, driven one `step` at a time: requests wait in
//! FIFO order until the running batch has room for all their sequences, then
//! every running sequence of every request advances in one engine step.
//! Tests drive it directly.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use crate::engine::{
    Engine, EngineError, EosPolicy, FinishReason, HiddenCapture, Logprobs, SeqOptions, Sequence,
    StopCriteria, child_seed,
};
use crate::metrics::ModelMetrics;
use crate::prm::Scorer;
use crate::reasoning::Outcome;
use crate::reasoning::runtime::{ReasoningJob, Runtime, TaskId};

use super::job::{Delivery, GenEvent, Job, JobStats, Outbox, ReasoningReport, TokenOut};

/// A request in the running batch.
struct Active {
    job: Job,
    /// Per prompt: its sequence until the prompt is prefilled (then forked into choices).
    roots: Vec<Option<Sequence>>,
    /// Per choice (`prompt * n + j`): `None` before the fork and after it finished.
    choices: Vec<Option<Sequence>>,
    finished: usize,
    outbox: Outbox,
    first_token: Option<Instant>,
    last_token: Vec<Option<Instant>>,
    completion_tokens: usize,
    queue_secs: f64,
    /// Set once every choice finished and `Done` is queued.
    complete: bool,
}

impl Active {
    fn unfinished_sequences(&self) -> usize {
        if self.complete { 0 } else { self.job.request.sequences() - self.finished }
    }
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

/// A reasoning request: its strategy runs in the runtime; the answers are
/// sent once it has chosen them.
struct Thinking {
    job: Job,
    task: TaskId,
    queue_secs: f64,
    outbox: Outbox,
    complete: bool,
}

pub struct Scheduler {
    engine: Arc<Engine>,
    metrics: ModelMetrics,
    max_running: usize,
    waiting: VecDeque<Job>,
    running: Vec<Active>,
    runtime: Runtime,
    thinking: Vec<Thinking>,
}

impl Scheduler {
    pub fn new(
        engine: Arc<Engine>,
        metrics: ModelMetrics,
        max_running: usize,
        prm: Option<Arc<dyn Scorer>>,
    ) -> Self {
        Self {
            runtime: Runtime::new(engine.clone(), prm),
            engine,
            metrics,
            max_running,
            waiting: VecDeque::new(),
            running: Vec::new(),
            thinking: Vec::new(),
        }
    }

    pub fn submit(&mut self, job: Job) {
        self.waiting.push_back(job);
        self.update_gauges();
    }

    /// Nothing waiting, running or left to deliver.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty() && self.thinking.is_empty()
    }

    /// Whether a step would run the model (rather than only deliver events).
    pub fn has_compute(&self) -> bool {
        !self.waiting.is_empty()
            || self.running.iter().any(|a| !a.complete)
            || self.thinking.iter().any(|t| !t.complete)
    }

    pub fn waiting_sequences(&self) -> usize {
        self.waiting.iter().map(|j| j.request.sequences()).sum()
    }

    pub fn running_sequences(&self) -> usize {
        self.running.iter().map(Active::unfinished_sequences).sum::<usize>()
            + self.thinking.iter().filter(|t| !t.complete).map(|t| t.job.request.sequences()).sum::<usize>()
    }

    pub fn step(&mut self) -> StepReport {
        let mut report = StepReport { cancelled: self.reap_cancelled(), ..Default::default() };
        self.start_waiting();
        let (batch, tokens) = match self.decode() {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "engine step failed; failing the running requests");
                self.fail_running();
                (0, 0)
            }
        };
        report.batch = batch;
        report.tokens = tokens;
        self.promote_prefilled_roots();
        report.completed = self.complete_and_flush() + self.finish_thinking();
        self.update_gauges();
        report
    }

    /// Drops requests whose client left: their sequences and caches go at once.
    fn reap_cancelled(&mut self) -> usize {
        let before = self.waiting.len() + self.running.len() + self.thinking.len();
        self.waiting.retain(|j| !j.reply.is_closed());
        self.running.retain(|a| !a.job.reply.is_closed());
        let runtime = &mut self.runtime;
        self.thinking.retain(|t| {
            let open = !t.job.reply.is_closed();
            if !open {
                runtime.cancel(t.task);
            }
            open
        });
        let cancelled = before - self.waiting.len() - self.running.len() - self.thinking.len();
        self.metrics.cancelled.inc_by(cancelled as u64);
        cancelled
    }

    fn start_waiting(&mut self) {
        let mut running = self.running_sequences();
        while let Some(job) = self.waiting.front() {
            if running + job.request.sequences() > self.max_running {
                break;
            }
            let job = self.waiting.pop_front().expect("front() was Some");
            running += job.request.sequences();
            if job.request.reasoning.is_some() {
                self.think(job);
            } else if let Some(active) = self.activate(job) {
                self.running.push(active);
            }
        }
    }

    fn seq_options(&self, job: &Job, seed: u64) -> SeqOptions {
        let r = &job.request;
        SeqOptions {
            sampling: r.sampling.with_seed(seed),
            stop: StopCriteria { max_tokens: r.max_tokens, stop: r.stop.clone(), eos: EosPolicy::Stop },
            logprobs: r.logprobs.map_or(Logprobs::None, Logprobs::Top),
            capture: HiddenCapture::Never,
        }
    }

    fn activate(&mut self, job: Job) -> Option<Active> {
        let queue_secs = job.admitted.elapsed().as_secs_f64();
        self.metrics.queue_duration.observe(queue_secs);
        let mut roots = Vec::with_capacity(job.request.prompts.len());
        for prompt in &job.request.prompts {
            // The root samples only when n = 1 (it is choice 0 of its prompt).
            let opts = self.seq_options(&job, child_seed(job.request.sampling.seed, 0));
            match self.engine.start(prompt.clone(), opts) {
                Ok(seq) => roots.push(Some(seq)),
                Err(e) => {
                    tracing::error!(request = %job.id, error = %e, "could not start a sequence");
                    let _ = job.reply.try_send(GenEvent::Failed);
                    return None;
                }
            }
        }
        let choices = job.request.choices();
        Some(Active {
            roots,
            choices: (0..choices).map(|_| None).collect(),
            finished: 0,
            outbox: Outbox::default(),
            first_token: None,
            last_token: vec![None; choices],
            completion_tokens: 0,
            queue_secs,
            complete: false,
            job,
        })
    }

    /// One engine step over every sequence that needs one.
    fn decode(&mut self) -> Result<(usize, usize), EngineError> {
        #[derive(Clone, Copy)]
        enum Slot {
            Root,
            Choice(usize),
        }
        let mut refs: Vec<&mut Sequence> = Vec::new();
        let mut owners: Vec<(usize, Slot)> = Vec::new();
        for (a, active) in self.running.iter_mut().enumerate() {
            for root in active.roots.iter_mut() {
                if let Some(seq) = root.as_mut().filter(|s| s.needs_work()) {
                    refs.push(seq);
                    owners.push((a, Slot::Root));
                }
            }
            for (c, choice) in active.choices.iter_mut().enumerate() {
                if let Some(seq) = choice.as_mut().filter(|s| s.needs_work()) {
                    refs.push(seq);
                    owners.push((a, Slot::Choice(c)));
                }
            }
        }
        if refs.is_empty() && self.runtime.is_idle() {
            return Ok((0, 0));
        }
        let step = self.runtime.step(refs)?;
        let (batch, updates) = (step.batch, step.updates);
        if batch > 0 {
            self.metrics.batch_size.observe(batch as f64);
        }
        self.metrics.generated_tokens.inc_by(step.reasoning_tokens as u64);
        let now = Instant::now();
        let mut tokens = 0;
        for (update, (a, slot)) in updates.into_iter().zip(owners) {
            let active = &mut self.running[a];
            self.metrics.prompt_tokens.inc_by(update.prefilled as u64);
            let Slot::Choice(c) = slot else { continue };
            let seq = active.choices[c].as_ref().expect("a stepped choice exists");
            if update.token.is_some() {
                tokens += 1;
                active.completion_tokens += 1;
                self.metrics.generated_tokens.inc();
                if active.first_token.is_none() {
                    active.first_token = Some(now);
                    self.metrics.ttft.observe(now.duration_since(active.job.received).as_secs_f64());
                }
                if let Some(prev) = active.last_token[c].replace(now) {
                    self.metrics.itl.observe(now.duration_since(prev).as_secs_f64());
                }
            }
            let token_out = match (update.token, seq.logprobs().last()) {
                (Some(id), Some(lp)) if active.job.request.logprobs.is_some() => {
                    let tok = self.engine.tokenizer();
                    vec![TokenOut {
                        id,
                        text: tok.token_text(id),
                        logprob: lp.logprob,
                        top: lp.top.iter().map(|&(t, l)| (tok.token_text(t), l)).collect(),
                    }]
                }
                _ => Vec::new(),
            };
            if !update.delta.is_empty() || !token_out.is_empty() {
                active.outbox.push(GenEvent::Delta { choice: c, text: update.delta, tokens: token_out });
            }
            if let Some(reason) = update.finished {
                active.outbox.push(GenEvent::Finished { choice: c, reason });
                active.finished += 1;
                // Frees this choice's cache now, not when the request ends.
                active.choices[c] = None;
            }
        }
        Ok((batch, tokens + step.reasoning_tokens))
    }

    /// Roots whose prompt is fully fed become their prompt's choices: the
    /// root itself when n = 1, else n forks sharing its cache.
    fn promote_prefilled_roots(&mut self) {
        let engine = self.engine.clone();
        for active in &mut self.running {
            let n = active.job.request.n;
            let seed = active.job.request.sampling.seed;
            for (p, slot) in active.roots.iter_mut().enumerate() {
                let ready = slot.as_ref().is_some_and(|s| s.cached_len() == s.prompt_len());
                if !ready {
                    continue;
                }
                let mut root = slot.take().expect("checked above");
                if n == 1 {
                    active.choices[p] = Some(root);
                    continue;
                }
                let seeds: Vec<u64> = (0..n as u64).map(|j| child_seed(seed, j)).collect();
                match engine.fork(&mut root, &seeds) {
                    Ok(children) => {
                        for (j, child) in children.into_iter().enumerate() {
                            active.choices[p * n + j] = Some(child);
                        }
                    }
                    Err(e) => {
                        tracing::error!(request = %active.job.id, error = %e, "fork failed");
                        active.outbox.push(GenEvent::Failed);
                        active.complete = true;
                    }
                }
            }
        }
    }

    fn fail_running(&mut self) {
        for t in &mut self.thinking {
            self.runtime.cancel(t.task);
            t.outbox.push(GenEvent::Failed);
            t.complete = true;
        }
        for active in &mut self.running {
            active.roots.clear();
            active.choices.iter_mut().for_each(|c| *c = None);
            active.outbox.push(GenEvent::Failed);
            active.complete = true;
        }
    }

    /// Queues `Done` for finished requests, delivers what each client has
    /// room for, and forgets requests that are delivered or abandoned.
    fn complete_and_flush(&mut self) -> usize {
        let mut completed = 0;
        for active in &mut self.running {
            if !active.complete && active.finished == active.job.request.choices() {
                active.complete = true;
                completed += 1;
                active.outbox.push(GenEvent::Done(JobStats {
                    prompt_tokens: active.job.request.prompts.iter().map(Vec::len).sum(),
                    completion_tokens: active.completion_tokens,
                    queue_secs: active.queue_secs,
                    ttft_secs: active
                        .first_token
                        .map(|t| t.duration_since(active.job.received).as_secs_f64()),
                }));
            }
        }
        let metrics = &self.metrics;
        self.running.retain_mut(|active| match active.outbox.flush(&active.job.reply) {
            Delivery::Closed => {
                if !active.complete {
                    metrics.cancelled.inc();
                }
                false
            }
            Delivery::Open => !(active.complete && active.outbox.is_empty()),
        });
        completed
    }

    /// Starts a reasoning request in the runtime.
    fn think(&mut self, job: Job) {
        let queue_secs = job.admitted.elapsed().as_secs_f64();
        self.metrics.queue_duration.observe(queue_secs);
        let r = &job.request;
        let spawned = self.runtime.spawn(ReasoningJob {
            question: r.question.clone(),
            prompt: r.prompts[0].clone(),
            params: r.reasoning.expect("think() takes reasoning jobs"),
            sampling: r.sampling,
        });
        match spawned {
            Ok(task) => {
                self.metrics.prompt_tokens.inc_by(r.prompts[0].len() as u64);
                self.thinking.push(Thinking {
                    job,
                    task,
                    queue_secs,
                    outbox: Outbox::default(),
                    complete: false,
                });
            }
            Err(e) => {
                tracing::error!(request = %job.id, error = %e, "could not start reasoning");
                let _ = job.reply.try_send(GenEvent::Failed);
            }
        }
    }

    /// Sends the answers of reasoning requests that finished, delivers what
    /// each client has room for, and forgets delivered or abandoned ones.
    fn finish_thinking(&mut self) -> usize {
        let mut completed = 0;
        for (task, result) in self.runtime.take_finished() {
            let Some(t) = self.thinking.iter_mut().find(|t| t.task == task) else { continue };
            t.complete = true;
            match result {
                Ok(outcome) => {
                    completed += 1;
                    let now = Instant::now();
                    self.metrics.ttft.observe(now.duration_since(t.job.received).as_secs_f64());
                    let params = t.job.request.reasoning.expect("thinking jobs have reasoning");
                    self.metrics.reasoning.record(
                        params.strategy.name(),
                        &outcome.accounting,
                        params.budget_quantile,
                    );
                    answer_events(&mut t.outbox, &t.job, outcome, t.queue_secs);
                }
                Err(e) => {
                    tracing::error!(request = %t.job.id, error = %e, "reasoning failed");
                    t.outbox.push(GenEvent::Failed);
                }
            }
        }
        self.thinking.retain_mut(|t| match t.outbox.flush(&t.job.reply) {
            Delivery::Closed => false,
            Delivery::Open => !(t.complete && t.outbox.is_empty()),
        });
        completed
    }

    fn update_gauges(&self) {
        self.metrics.queue_depth.set(self.waiting_sequences() as i64);
        self.metrics.running.set(self.running_sequences() as i64);
        self.metrics.kv_bytes.set(self.engine.model().kv_memory().live_bytes() as i64);
    }
}

/// The answers of a reasoning request as choice events, then its report.
fn answer_events(outbox: &mut Outbox, job: &Job, outcome: Outcome, queue_secs: f64) {
    let Outcome { answers, candidates, accounting } = outcome;
    let answer_tokens: usize = answers.iter().map(|a| a.tokens).sum();
    for (choice, a) in answers.iter().enumerate() {
        outbox.push(GenEvent::Delta { choice, text: a.text.clone(), tokens: Vec::new() });
        let reason = if a.ended { FinishReason::Eos } else { FinishReason::Length };
        outbox.push(GenEvent::Finished { choice, reason });
    }
    // Fewer distinct answers than `n`: the remaining choices are empty.
    for choice in answers.len()..job.request.choices() {
        outbox.push(GenEvent::Finished { choice, reason: FinishReason::Eos });
    }
    let params = job.request.reasoning.expect("answer events are for reasoning jobs");
    outbox.push(GenEvent::Reasoning(Box::new(ReasoningReport {
        params,
        accounting,
        candidates,
        answer_tokens,
    })));
    outbox.push(GenEvent::Done(JobStats {
        prompt_tokens: job.request.prompts[0].len(),
        completion_tokens: accounting.tokens_generated,
        queue_secs,
        ttft_secs: Some(job.received.elapsed().as_secs_f64()),
    }));
}
