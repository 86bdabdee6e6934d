//! The reasoning runtime on the real ponder-arith model and its calibrated
//! PRM head: adaptive budgets follow difficulty, requests share engine
//! steps, and cancelled requests free their caches.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use ponder::engine::{Engine, EngineOptions, SamplingParams};
use ponder::eval::step_offline;
use ponder::model::WeightFormat;
use ponder::prm::head::HeadPrm;
use ponder::reasoning::runtime::{ReasoningJob, Runtime};
use ponder::reasoning::{Budget, Candidates, Outcome, ReasoningParams, Select, Strategy};
use ponder::tokenizer::{AddSpecial, ChatMessage};

fn arith() -> (Arc<Engine>, Arc<HeadPrm>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/ponder-arith");
    let engine = Engine::load(&dir, WeightFormat::Auto, &Device::Cpu, EngineOptions::default())
        .expect("ponder-arith loads");
    let prm = HeadPrm::load(&dir.join("prm_head.safetensors")).expect("the committed PRM head loads");
    (Arc::new(engine), Arc::new(prm))
}

fn params(strategy: Strategy, budget: Budget) -> ReasoningParams {
    ReasoningParams {
        strategy,
        budget,
        max_samples: 32,
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
        answer: ponder::reasoning::select::AnswerFormat::LastNumber,
        candidates: Candidates::Return,
        n: 1,
        max_tokens: 200,
        max_step_tokens: 48,
        max_steps: 12,
    }
}

fn job(engine: &Engine, question: &str, p: ReasoningParams) -> ReasoningJob {
    let tok = engine.tokenizer();
    let text = tok.apply_chat_template(&[ChatMessage::new("user", question)]).unwrap();
    ReasoningJob {
        question: question.into(),
        prompt: tok.encode(&text, AddSpecial::No).unwrap(),
        params: p,
        sampling: SamplingParams::sampled(0.7, 3),
    }
}

fn run(rt: &mut Runtime, engine: &Engine, n: usize) -> Vec<(u64, Outcome)> {
    let mut done = Vec::new();
    let mut batches = Vec::new();
    while done.len() < n {
        batches.push(step_offline(rt, engine).unwrap());
        done.extend(rt.take_finished().into_iter().map(|(id, r)| (id, r.unwrap())));
    }
    done.sort_by_key(|d| d.0);
    done
}

fn question(level: u8) -> (String, String) {
    let p = ponder::arith::task::generate(ponder::arith::task::Split::Test, 3)
        .unwrap()
        .into_iter()
        .find(|p| p.level == level)
        .expect("every level has problems");
    (p.question, p.answer.to_string())
}

#[test]
fn adaptive_best_of_n_spends_fewer_samples_on_an_easy_question_than_on_a_hard_one() {
    let (engine, prm) = arith();
    let mut rt = Runtime::new(engine.clone(), Some(prm));
    let p = params(Strategy::BestOfN, Budget::Adaptive);
    let ((easy_q, easy_a), (hard_q, _)) = (question(1), question(6));
    rt.spawn(job(&engine, &easy_q, p)).unwrap();
    rt.spawn(job(&engine, &hard_q, p)).unwrap();
    let out = run(&mut rt, &engine, 2);
    let (easy, hard) = (&out[0].1, &out[1].1);
    assert!(
        easy.accounting.samples < hard.accounting.samples,
        "{:?} vs {:?}",
        easy.accounting,
        hard.accounting
    );
    assert!(easy.accounting.samples <= 4, "{:?}", easy.accounting);
    assert_eq!(easy.answers[0].answer, easy_a);
    assert!(easy.accounting.tokens_saved > 0);
    let start = easy.accounting.start.unwrap();
    assert!(start.q10 <= start.q50 && start.q50 <= start.q90);
    assert_eq!(easy.candidates.len(), easy.accounting.samples);
    assert_eq!(easy.accounting.prm_evaluations, 1 + easy.accounting.samples);
}

#[test]
fn requests_share_engine_steps_and_beam_search_prunes_to_an_answer() {
    let (engine, prm) = arith();
    let mut rt = Runtime::new(engine.clone(), Some(prm));
    let fixed = params(Strategy::BestOfN, Budget::Fixed);
    for q in ["What is 12 + 30?", "What is 9 - 4?", "Compute 6 + 7?"] {
        rt.spawn(job(&engine, q, fixed)).unwrap();
    }
    // First step prefills three prompts together; later steps decode 3 x 32 trajectories together.
    let mut widest = 0;
    while rt.take_finished().is_empty() {
        widest = widest.max(step_offline(&mut rt, &engine).unwrap());
    }
    assert!(widest > 32, "trajectories of several requests share a step ({widest})");

    let mut rt = Runtime::new(engine.clone(), rt_prm());
    rt.spawn(job(&engine, "What is (23 + 45) * 2?", params(Strategy::Beam, Budget::Fixed))).unwrap();
    let out = run(&mut rt, &engine, 1);
    let o = &out[0].1;
    assert_eq!(o.answers[0].answer, "136", "{:?}", o.answers);
    assert!(o.accounting.samples > 32, "beam expands kept paths: {:?}", o.accounting);
}

fn rt_prm() -> Option<Arc<dyn ponder::prm::Scorer>> {
    Some(arith().1)
}

#[test]
fn cancelling_a_request_frees_every_trajectory_at_once() {
    let (engine, prm) = arith();
    let memory = engine.model().kv_memory().clone();
    let mut rt = Runtime::new(engine.clone(), Some(prm));
    let id = rt.spawn(job(&engine, &question(6).0, params(Strategy::BestOfN, Budget::Fixed))).unwrap();
    for _ in 0..4 {
        step_offline(&mut rt, &engine).unwrap();
    }
    assert!(memory.live_bytes() > 0);
    assert!(rt.trajectories(id) > 1);
    rt.cancel(id);
    assert_eq!(memory.live_bytes(), 0);
    assert!(rt.is_idle());
}
