//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::Device;
use ponder::engine::{
    Engine, EngineOptions, EosPolicy, HiddenCapture, Logprobs, SamplingParams, SeqOptions, Sequence,
    StopCriteria,
};
use ponder::model::WeightFormat;
use ponder::tokenizer::{AddSpecial, ChatMessage};

/// The default model, fetched by `make models` (which `make test` runs first).
pub fn smollm_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run `make models` (make test does it first)", p.display());
    p
}

/// SmolLM2 with the default weight format, loaded once per test binary.
pub fn smollm() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        Engine::load(&smollm_path(), WeightFormat::Auto, &Device::Cpu, EngineOptions::default())
            .expect("SmolLM2 loads")
    })
}

pub fn chat_prompt(engine: &Engine, user: &str) -> Vec<u32> {
    let tok = engine.tokenizer();
    let text = tok.apply_chat_template(&[ChatMessage::new("user", user)]).expect("template renders");
    tok.encode(&text, AddSpecial::No).expect("prompt encodes")
}

pub fn options(temperature: f32, seed: u64, max_tokens: usize) -> SeqOptions {
    SeqOptions {
        sampling: SamplingParams { temperature, top_p: 1.0, top_k: 0, seed },
        stop: StopCriteria { max_tokens, stop: Vec::new(), eos: EosPolicy::Stop },
        logprobs: Logprobs::None,
        capture: HiddenCapture::Never,
    }
}

/// Steps the given sequences together until none is running.
pub fn run_all(engine: &Engine, seqs: &mut [Sequence]) {
    while seqs.iter().any(|s| s.needs_work()) {
        let mut live: Vec<&mut Sequence> = seqs.iter_mut().filter(|s| s.needs_work()).collect();
        engine.step(&mut live).expect("step succeeds");
    }
}

/// Feeds a sequence's prompt completely.
pub fn prefill(engine: &Engine, seq: &mut Sequence) {
    while seq.cached_len() < seq.prompt_len() {
        engine.step(&mut [seq]).expect("prefill succeeds");
    }
}
