//! A backend that generates nothing: it answers every request with a fixed
//! text (or refuses, fails or hangs, as a test tells it), so that the HTTP
//! layer — routes, auth, validation, errors, streaming — is tested without
//! a model.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{
    Backend, BackendStatus, EventStream, GenEvent, JobStats, ModelInfo, Progress, ReasoningReport,
    ScheduleError, Scheduled,
};
use crate::engine::FinishReason;
use crate::prm::Quantiles;
use crate::reasoning::{Accounting, Candidate};

/// What the fake does with the next requests.
#[derive(Debug, Clone, PartialEq)]
pub enum FakeBehaviour {
    /// Every choice answers this text, one word per delta; reasoning
    /// requests first send two progress events, answer one choice (a search
    /// whose samples all agree finds one distinct answer, whatever `n`) and
    /// end with a report.
    Answer(String),
    /// Refuse with 429.
    QueueFull { retry_after_secs: u64 },
    /// Start, then fail after the first delta.
    Fail,
    /// Fail before sending anything, as a worker that cannot start the
    /// request does.
    FailAtOnce,
    /// Never answer (until the client leaves).
    Hang,
}

#[derive(Debug)]
pub struct FakeBackend {
    info: ModelInfo,
    status: Mutex<BackendStatus>,
    behaviour: Mutex<FakeBehaviour>,
    /// Every request scheduled, in order.
    seen: Mutex<Vec<Scheduled>>,
    /// Requests whose stream the client dropped before the end.
    cancelled: Arc<Mutex<usize>>,
}

impl FakeBackend {
    pub fn new(info: ModelInfo) -> Self {
        Self {
            info,
            status: Mutex::new(BackendStatus::Ready),
            behaviour: Mutex::new(FakeBehaviour::Answer("fake answer".into())),
            seen: Mutex::new(Vec::new()),
            cancelled: Arc::new(Mutex::new(0)),
        }
    }

    pub fn set_status(&self, s: BackendStatus) {
        *self.status.lock().expect("no panics while holding the fake's lock") = s;
    }

    pub fn set_behaviour(&self, b: FakeBehaviour) {
        *self.behaviour.lock().expect("no panics while holding the fake's lock") = b;
    }

    pub fn seen(&self) -> Vec<Scheduled> {
        self.seen.lock().expect("no panics while holding the fake's lock").clone()
    }

    pub fn cancelled(&self) -> usize {
        *self.cancelled.lock().expect("no panics while holding the fake's lock")
    }
}

fn report(req: &Scheduled, answer_tokens: usize) -> ReasoningReport {
    let params = req.generation.reasoning.expect("reports are for reasoning requests");
    let samples = 2;
    let accounting = Accounting {
        samples,
        fixed_samples: params.max_samples,
        tokens_generated: answer_tokens * samples,
        fixed_tokens_estimate: answer_tokens * params.max_samples.max(samples),
        tokens_saved: answer_tokens * (params.max_samples.max(samples) - samples),
        prm_evaluations: 1 + samples,
        start: Some(Quantiles::point(0.5)),
        selected: Some(Quantiles::point(0.9)),
        steps: 1,
        rule: (params.budget == crate::reasoning::Budget::Adaptive).then_some(params.rule),
        stop: crate::reasoning::Stop::Budget,
        rounds: 1,
    };
    ReasoningReport { params, accounting, candidates: Vec::<Candidate>::new(), answer_tokens }
}

/// Sends the events of one answered request; stops when the client leaves.
async fn answer(req: Scheduled, text: String, tx: mpsc::Sender<GenEvent>, cancelled: Arc<Mutex<usize>>) {
    let words: Vec<String> = text.split_inclusive(' ').map(str::to_string).collect();
    let choices = if req.generation.reasoning.is_some() { 1 } else { req.generation.choices() };
    let mut events = Vec::new();
    if req.generation.reasoning.is_some() {
        for step in 1..=2 {
            events.push(GenEvent::Progress(Progress {
                samples: 2,
                live: 2,
                budget: 2,
                best: Some(Quantiles::point(0.5)),
                tokens: step * words.len(),
                steps: step,
            }));
        }
    }
    for choice in 0..choices {
        for w in &words {
            events.push(GenEvent::Delta { choice, text: w.clone(), tokens: Vec::new() });
        }
        events.push(GenEvent::Finished { choice, reason: FinishReason::Eos });
    }
    if req.generation.reasoning.is_some() {
        events.push(GenEvent::Reasoning(Box::new(report(&req, words.len()))));
    }
    let completion_tokens = match req.generation.reasoning {
        Some(_) => words.len() * 2,
        None => words.len() * choices,
    };
    events.push(GenEvent::Done(JobStats {
        prompt_tokens: req.generation.prompts.iter().map(Vec::len).sum(),
        completion_tokens,
        queue_secs: 0.0,
        ttft_secs: Some(req.received.elapsed().as_secs_f64()),
    }));
    for ev in events {
        if tx.send(ev).await.is_err() {
            *cancelled.lock().expect("no panics while holding the fake's lock") += 1;
            return;
        }
    }
}

impl Backend for FakeBackend {
    fn status(&self) -> BackendStatus {
        self.status.lock().expect("no panics while holding the fake's lock").clone()
    }

    fn model_info(&self) -> Option<ModelInfo> {
        (self.status() != BackendStatus::Loading).then(|| self.info.clone())
    }

    fn schedule(&self, req: Scheduled) -> Result<EventStream, ScheduleError> {
        let behaviour = self.behaviour.lock().expect("no panics while holding the fake's lock").clone();
        if let FakeBehaviour::QueueFull { retry_after_secs } = behaviour {
            return Err(ScheduleError::QueueFull { retry_after_secs });
        }
        self.seen.lock().expect("no panics while holding the fake's lock").push(req.clone());
        let (tx, rx) = mpsc::channel(4);
        let cancelled = self.cancelled.clone();
        match behaviour {
            FakeBehaviour::Answer(text) => {
                tokio::spawn(answer(req, text, tx, cancelled));
            }
            FakeBehaviour::Fail => {
                tokio::spawn(async move {
                    let _ = tx.send(GenEvent::Delta { choice: 0, text: "par".into(), tokens: vec![] }).await;
                    let _ = tx.send(GenEvent::Failed).await;
                });
            }
            FakeBehaviour::FailAtOnce => {
                tokio::spawn(async move {
                    let _ = tx.send(GenEvent::Failed).await;
                });
            }
            FakeBehaviour::Hang => {
                tokio::spawn(async move {
                    while !tx.is_closed() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    *cancelled.lock().expect("no panics while holding the fake's lock") += 1;
                });
            }
            FakeBehaviour::QueueFull { .. } => unreachable!("refused above"),
        }
        Ok(EventStream::new(rx))
    }
}
