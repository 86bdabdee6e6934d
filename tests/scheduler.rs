//! The worker's scheduler driven step by step on ponder-arith (a tiny real
//! model) with a scorer whose estimates the test sets: admission follows
//! what a request really uses, plain requests run beside reasoning ones,
//! and clients that leave are dropped at the next step.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::Device;
use ponder::backend::GenEvent;
use ponder::engine::{Engine, EngineOptions, SamplingParams};
use ponder::metrics::Metrics;
use ponder::model::WeightFormat;
use ponder::prm::{PrmError, PrmScore, Quantiles, ScoreItem, Scorer};
use ponder::reasoning::select::AnswerFormat;
use ponder::reasoning::{Budget, Candidates, ReasoningParams, Select, Strategy};
use ponder::tokenizer::{AddSpecial, ChatMessage};
use ponder::validation::GenerationRequest;
use ponder::worker::{Admission, Job, Scheduler};
use tokio::sync::mpsc;

fn engine(opts: EngineOptions) -> Arc<Engine> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/ponder-arith");
    Arc::new(Engine::load(&dir, WeightFormat::Auto, &Device::Cpu, opts).expect("ponder-arith loads"))
}

/// Says `p` for every prefix (the question alone included).
struct FixedScorer(Mutex<f32>);

impl Scorer for FixedScorer {
    fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<PrmScore>, PrmError> {
        let p = *self.0.lock().unwrap();
        Ok(items.iter().map(|_| PrmScore { quantiles: Quantiles::point(p), raw: None }).collect())
    }
}

fn params(strategy: Strategy, budget: Budget, max_samples: usize) -> ReasoningParams {
    ReasoningParams {
        strategy,
        budget,
        max_samples,
        confidence: 0.99,
        budget_quantile: 0.1,
        rule: ponder::reasoning::BudgetRule::Ias,
        round: 4,
        give_up_gain: 0.02,
        give_up_plausible: 1.0,
        beam_width: 4,
        beams: 4,
        prune_every: 1,
        select: Select::PrmMax,
        answer: AnswerFormat::LastNumber,
        candidates: Candidates::Omit,
        n: 1,
        max_tokens: 200,
        max_step_tokens: 48,
        max_steps: 12,
    }
}

struct Client {
    rx: mpsc::Receiver<GenEvent>,
    events: Vec<GenEvent>,
}

impl Client {
    fn drain(&mut self) -> bool {
        while let Ok(e) = self.rx.try_recv() {
            self.events.push(e);
        }
        self.done()
    }

    fn done(&self) -> bool {
        self.events.iter().any(|e| matches!(e, GenEvent::Done(_) | GenEvent::Failed))
    }
}

fn submit(
    s: &mut Scheduler,
    e: &Engine,
    question: &str,
    reasoning: Option<ReasoningParams>,
    seed: u64,
) -> Client {
    submit_with(s, e, question, reasoning, seed, 200)
}

fn submit_with(
    s: &mut Scheduler,
    e: &Engine,
    question: &str,
    reasoning: Option<ReasoningParams>,
    seed: u64,
    max_tokens: usize,
) -> Client {
    submit_n(s, e, question, reasoning, seed, max_tokens, 1)
}

fn submit_n(
    s: &mut Scheduler,
    e: &Engine,
    question: &str,
    reasoning: Option<ReasoningParams>,
    seed: u64,
    max_tokens: usize,
    n: usize,
) -> Client {
    let tok = e.tokenizer();
    let text = tok.apply_chat_template(&[ChatMessage::new("user", question)]).unwrap();
    let prompt = tok.encode(&text, AddSpecial::No).unwrap();
    let (tx, rx) = mpsc::channel(1024);
    let permit = Admission::new(1).try_admit().expect("an empty queue admits");
    s.submit(Job {
        id: format!("req-{seed}"),
        request: GenerationRequest {
            prompts: vec![prompt],
            n,
            sampling: SamplingParams::sampled(0.7, seed),
            stop: Vec::new(),
            max_tokens,
            logprobs: None,
            token_ids: ponder::validation::TokenIds::Omit,
            question: question.into(),
            reasoning,
        },
        reply: tx,
        permit,
        received: Instant::now(),
        admitted: Instant::now(),
        meter: Default::default(),
    });
    Client { rx, events: Vec::new() }
}

fn scheduler(p: f32, max_running: usize) -> (Scheduler, Arc<Engine>, Metrics) {
    scheduler_with(p, max_running, EngineOptions::default())
}

fn scheduler_with(p: f32, max_running: usize, opts: EngineOptions) -> (Scheduler, Arc<Engine>, Metrics) {
    let e = engine(opts);
    let metrics = Metrics::new();
    let scorer: Arc<dyn Scorer> = Arc::new(FixedScorer(Mutex::new(p)));
    (Scheduler::new(e.clone(), metrics.for_model("arith", "cpu"), max_running, Some(scorer)), e, metrics)
}

#[test]
fn an_adaptive_request_holds_only_the_samples_ias_draws_and_others_use_the_rest() {
    // p = 0.91 at C = 0.99: N_IAS = 2 of N_max 64, under a running limit of 64.
    // (0.9 as an f32 is a hair under 0.9, which makes N_IAS 3.)
    let (mut s, e, _) = scheduler(0.91, 64);
    let mut a =
        submit(&mut s, &e, "What is 12 + 30?", Some(params(Strategy::BestOfN, Budget::Adaptive, 64)), 1);
    let mut most = 0;
    for _ in 0..6 {
        s.step().unwrap();
        most = most.max(s.running_sequences());
    }
    assert!(most <= 2, "an IAS budget of 2 holds at most 2 sequences, held {most}");
    // A fixed best-of-62 now fits beside it at once: 2 + 62 = 64.
    let mut b = submit(&mut s, &e, "What is 9 - 4?", Some(params(Strategy::BestOfN, Budget::Fixed, 62)), 2);
    let mut both = 0;
    while !(a.drain() && b.drain()) {
        s.step().unwrap();
        assert!(s.running_sequences() <= 64);
        both = both.max(s.running_sequences());
    }
    assert!(both > 32, "the fixed request used the sequences the adaptive one left ({both})");
    assert_eq!(s.running_sequences(), 0);
}

#[test]
fn a_beam_gives_back_what_pruning_frees() {
    // Fixed beam: 16 initial samples, then K 4 x M 4 = 16 paths. With an
    // adaptive beam at p = 0.91 the IAS rules keep 1 beam with 2 children.
    let (mut s, e, _) = scheduler(0.91, 64);
    let mut p = params(Strategy::Beam, Budget::Adaptive, 16);
    p.beams = 4;
    p.beam_width = 4;
    let mut c = submit(&mut s, &e, "What is (23 + 45) * 2?", Some(p), 3);
    let mut held = Vec::new();
    while !c.drain() {
        s.step().unwrap();
        held.push(s.running_sequences());
    }
    let most = *held.iter().max().unwrap();
    assert!(most <= 2, "IAS keeps K = 1 beam with M = 2 children: held at most {most}, {held:?}");
    let fixed_start = {
        let (mut s, e, _) = scheduler(0.9, 64);
        let mut p = params(Strategy::Beam, Budget::Fixed, 16);
        p.beams = 2;
        p.beam_width = 2;
        let mut c = submit(&mut s, &e, "What is (23 + 45) * 2?", Some(p), 3);
        let mut held = Vec::new();
        while !c.drain() {
            s.step().unwrap();
            held.push(s.running_sequences());
        }
        held
    };
    assert_eq!(fixed_start.iter().max(), Some(&16), "16 initial paths: {fixed_start:?}");
    let after = fixed_start.iter().skip_while(|&&h| h < 16).skip_while(|&&h| h == 16).max().copied();
    assert!(after.is_some_and(|h| h <= 4), "after the first pruning point K x M = 4 paths: {fixed_start:?}");
}

#[test]
fn a_plain_request_completes_while_reasoning_requests_hold_the_worker() {
    let (mut s, e, _) = scheduler(0.01, 64);
    let hard = hard_question();
    let mut heavy: Vec<Client> = (0..2)
        .map(|i| submit(&mut s, &e, &hard, Some(params(Strategy::BestOfN, Budget::Fixed, 64)), 10 + i))
        .collect();
    for _ in 0..4 {
        s.step().unwrap();
    }
    assert_eq!(s.running_sequences(), 64, "the reasoning requests fill the running limit");
    let mut plain = submit_with(&mut s, &e, "What is 2 + 2?", None, 20, 4);
    let (mut steps, mut first_token) = (0, None);
    while !plain.drain() {
        s.step().unwrap();
        steps += 1;
        if first_token.is_none() && plain.events.iter().any(|e| matches!(e, GenEvent::Delta { .. })) {
            first_token = Some(steps);
        }
        assert!(steps < 400, "the plain request never finished");
    }
    assert!(first_token.is_some_and(|k| k <= 20), "its first token came after {first_token:?} steps");
    assert!(
        !heavy.iter_mut().all(|h| h.drain()),
        "the plain request finished while reasoning requests were still running"
    );
}

#[test]
fn progress_events_come_after_each_reasoning_step_and_before_the_answer() {
    let (mut s, e, _) = scheduler(0.5, 64);
    let mut c =
        submit(&mut s, &e, "What is (3 + 4) * 5?", Some(params(Strategy::BestOfN, Budget::Adaptive, 64)), 5);
    while !c.drain() {
        s.step().unwrap();
    }
    let first_delta = c.events.iter().position(|e| matches!(e, GenEvent::Delta { .. })).unwrap();
    let progress: Vec<usize> =
        (0..c.events.len()).filter(|&i| matches!(c.events[i], GenEvent::Progress(_))).collect();
    assert!(progress.len() >= 2, "{:?}", c.events);
    assert!(progress.iter().all(|&i| i < first_delta));
    let GenEvent::Progress(p) = c.events[progress[0]] else { unreachable!() };
    // p = 0.5 at C = 0.99: N_IAS = 7.
    assert_eq!((p.budget, p.samples), (7, 7), "{p:?}");
    assert_eq!(p.best, Some(Quantiles::point(0.5)));
}

#[test]
fn a_client_that_leaves_is_dropped_at_the_next_step_with_its_caches_and_counted_once() {
    let (mut s, e, metrics) = scheduler(0.01, 64);
    let kv = e.model().kv_memory().clone();
    for (reasoning, seed) in [
        (None, 30),
        (Some(params(Strategy::BestOfN, Budget::Fixed, 32)), 31),
        (Some(params(Strategy::Beam, Budget::Fixed, 16)), 32),
    ] {
        let c = submit(&mut s, &e, "What is 7 * 8 + 3?", reasoning, seed);
        for _ in 0..3 {
            s.step().unwrap();
        }
        assert!(kv.live_bytes() > 0 && s.running_sequences() > 0);
        drop(c);
        let r = s.step().unwrap();
        assert_eq!((r.cancelled, r.tokens), (1, 0), "no work after the client left: {r:?}");
        assert_eq!(kv.live_bytes(), 0, "every cache freed");
        assert!(s.is_idle());
    }
    let text = metrics.render();
    assert!(text.contains("ponder_cancelled_requests_total{model=\"arith\"} 3"), "{text}");
    assert!(text.contains("ponder_kv_cache_bytes{device=\"cpu\",model=\"arith\"} 0"), "{text}");
    assert!(text.contains("ponder_running_sequences{device=\"cpu\",model=\"arith\"} 0"), "{text}");
}

/// The hard (level 6) arithmetic question: samples run many reasoning steps.
fn hard_question() -> String {
    ponder::arith::task::generate(ponder::arith::task::Split::Test, 2)
        .unwrap()
        .into_iter()
        .find(|p| p.level == 6)
        .expect("level 6 has problems")
        .question
}

#[test]
fn a_waiting_request_that_running_floors_block_does_not_slow_the_running_ones() {
    // A best-of-8 holds the whole limit of 8 and keeps 1 whatever happens, so
    // a plain request with n = 8 can start only once it ends: holding
    // sequences back for it would run the best-of-8 at batch 1 for nothing.
    let steps_to_finish = |with_waiting: bool| {
        let (mut s, e, _) = scheduler(0.01, 8);
        let mut heavy =
            submit(&mut s, &e, &hard_question(), Some(params(Strategy::BestOfN, Budget::Fixed, 8)), 40);
        let mut waiting = None;
        let mut steps = 0;
        while !heavy.drain() {
            if with_waiting && steps == 3 {
                waiting = Some(submit_n(&mut s, &e, "What is 2 + 2?", None, 41, 4, 8));
            }
            s.step().unwrap();
            steps += 1;
            if waiting.is_some() && !heavy.done() {
                assert_eq!(s.waiting_requests(), 1, "the n = 8 request cannot start beside the best-of-8");
            }
            assert!(steps < 2000, "the best-of-8 never finished");
        }
        if let Some(mut w) = waiting {
            while !w.drain() {
                s.step().unwrap();
            }
        }
        steps
    };
    let alone = steps_to_finish(false);
    assert_eq!(steps_to_finish(true), alone, "the same steps as with nobody waiting");
}

/// The value of one series in the metrics' text.
fn metric(metrics: &Metrics, series: &str) -> f64 {
    let text = metrics.render();
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

#[test]
fn a_prompt_longer_than_a_prefill_chunk_is_fed_one_chunk_per_step_beside_running_requests() {
    let chunk = 4;
    let (mut s, e, metrics) =
        scheduler_with(0.01, 64, EngineOptions { prefill_chunk: chunk, ..Default::default() });
    let mut heavy =
        submit(&mut s, &e, &hard_question(), Some(params(Strategy::BestOfN, Budget::Fixed, 8)), 50);
    for _ in 0..3 {
        s.step().unwrap();
    }
    // Plain requests alone count their prompt as it is fed.
    let fed = || metric(&metrics, "ponder_prompt_tokens_total{model=\"arith\"}");
    let question = "What is 12 + 30 - 7 * 2 + 5?";
    let mut plain = submit_with(&mut s, &e, question, None, 51, 8);
    let prompt_len = {
        let tok = e.tokenizer();
        let text = tok.apply_chat_template(&[ChatMessage::new("user", question)]).unwrap();
        tok.encode(&text, AddSpecial::No).unwrap().len()
    };
    assert!(prompt_len > 3 * chunk, "the prompt spans several chunks ({prompt_len} tokens)");
    let mut steps = 0;
    while !plain.events.iter().any(|e| matches!(e, GenEvent::Delta { .. })) {
        let before = fed();
        s.step().unwrap();
        steps += 1;
        let step_fed = fed() - before;
        assert!(step_fed <= chunk as f64, "step {steps} fed {step_fed} prompt tokens (chunk {chunk})");
        plain.drain();
        assert!(!heavy.drain(), "the reasoning request still runs");
    }
    // The last chunk and the first token in the fast lane: one step per chunk.
    assert_eq!(steps, prompt_len.div_ceil(chunk), "first token after {steps} steps");
}

#[test]
fn a_request_the_fast_lane_completes_counts_in_the_step_report() {
    let (mut s, e, _) = scheduler(0.01, 64);
    let mut heavy =
        submit(&mut s, &e, &hard_question(), Some(params(Strategy::BestOfN, Budget::Fixed, 8)), 60);
    let mut completed = 0;
    for _ in 0..3 {
        completed += s.step().unwrap().completed;
    }
    // One token: the fast lane's second pass finishes it and delivers its answer.
    let mut plain = submit_with(&mut s, &e, "What is 2 + 2?", None, 61, 1);
    let r = s.step().unwrap();
    completed += r.completed;
    assert!(plain.drain(), "answered within the step it started: {:?}", plain.events);
    assert_eq!(r.completed, 1, "{r:?}");
    while !heavy.drain() {
        completed += s.step().unwrap().completed;
    }
    assert_eq!(completed, 2, "each request counted once");
}
