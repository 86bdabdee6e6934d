//! The device path (KV caches in a pool of device tensors, attention as
//! batched candle ops, activations in f32, f16 or bf16), run on the CPU
//! against the host path on ponder-arith (4 heads, 4 kv heads) and SmolLM2
//! (9 heads on 3 kv heads: GQA).

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use common::{chat_prompt, options, prefill, run_all, smollm_path};
use ponder::engine::{Engine, EngineOptions, EosPolicy, Sequence};
use ponder::model::{AttentionPath, BatchEntry, KvCache, Llama, ModelError, WeightFormat};

fn arith_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/ponder-arith")
}

fn load(path: &Path, weights: WeightFormat, attention: AttentionPath) -> Engine {
    let opts = EngineOptions { attention, ..EngineOptions::default() };
    Engine::load(path, weights, &Device::Cpu, opts).expect("the model loads")
}

fn arith_host() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| load(&arith_path(), WeightFormat::Auto, AttentionPath::Auto))
}

fn arith_device() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| load(&arith_path(), WeightFormat::Auto, AttentionPath::Device))
}

// SmolLM2's paths are compared with dense f32 weights. Its default Q8_0
// matmuls quantize their inputs to 8 bits per block of 32, so a difference
// of 1e-7 that flips one rounding becomes a jump of 1/127 of the block's
// largest value; after 30 layers two paths that agree to 1e-6 with dense
// weights differ by ~5% of the logits' spread and greedy decoding parts
// within 30 tokens.
fn smollm_host() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| load(&smollm_path(), WeightFormat::F32, AttentionPath::Auto))
}

fn smollm_device() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| load(&smollm_path(), WeightFormat::F32, AttentionPath::Device))
}

const ARITH_QUESTIONS: [&str; 3] = ["What is 3 + 4?", "What is 27 * 3 - 5?", "What is 100 - 64 + 8?"];
const SMOLLM_QUESTIONS: [&str; 3] =
    ["What is 7 times 8?", "Write a haiku about rain.", "Name three colours of the rainbow."];

/// Greedy tokens of every prompt, all decoded in one batch.
fn greedy_batch(engine: &Engine, prompts: &[Vec<u32>], tokens: usize) -> Vec<Vec<u32>> {
    let mut seqs: Vec<Sequence> = prompts
        .iter()
        .map(|p| {
            let mut o = options(0.0, 0, tokens);
            o.stop.eos = EosPolicy::Ignore;
            engine.start(p.clone(), o).unwrap()
        })
        .collect();
    run_all(engine, &mut seqs);
    seqs.iter().map(|s| s.generated().to_vec()).collect()
}

fn greedy_alone(engine: &Engine, prompt: &[u32], tokens: usize) -> Vec<u32> {
    greedy_batch(engine, &[prompt.to_vec()], tokens).remove(0)
}

#[test]
fn the_f32_device_path_decodes_in_one_batch_the_greedy_tokens_the_host_path_decodes_alone() {
    for (host, device, questions) in
        [(arith_host(), arith_device(), ARITH_QUESTIONS), (smollm_host(), smollm_device(), SMOLLM_QUESTIONS)]
    {
        assert_eq!(host.model().attention(), AttentionPath::Host);
        assert_eq!(device.model().attention(), AttentionPath::Device);
        let prompts: Vec<Vec<u32>> = questions.iter().map(|q| chat_prompt(host, q)).collect();
        let batched = greedy_batch(device, &prompts, 32);
        for (i, p) in prompts.iter().enumerate() {
            assert_eq!(batched[i], greedy_alone(host, p, 32), "{:?}", questions[i]);
        }
    }
}

/// The logits of one sequence: its prompt, then `then` fed one at a time.
fn logits_along(model: &Llama, prompt: &[u32], then: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    let mut out = vec![];
    let feed = |tokens: &[u32], cache: &mut KvCache| {
        let o = model.forward(&mut [BatchEntry { tokens, cache }]).unwrap();
        o.logits.to_vec2::<f32>().unwrap().remove(0)
    };
    out.push(feed(prompt, &mut cache));
    for t in then {
        out.push(feed(std::slice::from_ref(t), &mut cache));
    }
    out
}

/// Largest difference between two logit vectors, over the spread of the first.
fn relative_gap(want: &[f32], got: &[f32]) -> f32 {
    let (lo, hi) = want.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let worst = want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    worst / (hi - lo)
}

fn argmax(xs: &[f32]) -> usize {
    ponder::engine::sampling::argmax(xs) as usize
}

// Tolerances, as a fraction of the logits' spread (max - min). Rounding
// every activation to f16 (11 significant bits, relative step 2^-11) or
// bf16 (8 bits, 2^-8) errs by about half a step per value, and every
// layer's residual adds carry those errors on. Measured over a prompt and
// five decode steps: f16 at most 0.19% (SmolLM2) and 0.12% (ponder-arith),
// bf16 at most 1.4% and 0.39%, so the bounds are 0.5% and 3%.
const F16_TOLERANCE: f32 = 0.005;
const BF16_TOLERANCE: f32 = 0.03;
// A batch and a lone pass round differently in bf16 (the CPU's bf16 matmul
// widens to f32, whose sums depend on the rows beside them, then narrows):
// one flipped last bit in an early layer spreads as far as the f32-to-bf16
// error itself. Measured 2.8% on SmolLM2; the bound is 5%.
const BF16_BATCH_TOLERANCE: f32 = 0.05;

#[test]
fn f16_and_bf16_logits_stay_within_half_precision_of_the_f32_host_path() {
    for (path, question) in [(arith_path(), ARITH_QUESTIONS[1]), (smollm_path(), SMOLLM_QUESTIONS[0])] {
        // Dense f32 is the exact dequantisation the half formats round from.
        let host = load(&path, WeightFormat::F32, AttentionPath::Auto);
        let prompt = chat_prompt(&host, question);
        let then = greedy_alone(&host, &prompt, 6);
        let want = logits_along(host.model(), &prompt, &then[..5]);
        drop(host);
        for (weights, tolerance) in [(WeightFormat::F16, F16_TOLERANCE), (WeightFormat::Bf16, BF16_TOLERANCE)]
        {
            let half = load(&path, weights, AttentionPath::Auto);
            assert_eq!(half.model().attention(), AttentionPath::Device, "half weights take the device path");
            let got = logits_along(half.model(), &prompt, &then[..5]);
            for (step, (w, g)) in want.iter().zip(&got).enumerate() {
                let gap = relative_gap(w, g);
                assert!(gap < tolerance, "{weights:?} {}: step {step}: {gap}", path.display());
                assert_eq!(argmax(w), argmax(g), "{weights:?} {}: step {step}", path.display());
            }
        }
    }
}

/// Feeds `tokens[i]` to `caches[i]` in one forward pass; each entry's logits.
fn step(model: &Llama, caches: &mut [KvCache], tokens: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let mut batch: Vec<BatchEntry<'_>> =
        caches.iter_mut().zip(tokens).map(|(cache, t)| BatchEntry { tokens: t, cache }).collect();
    model.forward(&mut batch).unwrap().logits.to_vec2::<f32>().unwrap()
}

/// Eight forks of one prompt, a second prompt decoding beside them and a
/// third prefilled in the middle of their decoding, in shared forward passes,
/// against each sequence decoded alone; the largest relative gap.
fn forks_batched_against_alone(model: &Llama, prompts: &[Vec<u32>; 3]) -> f32 {
    let vocab = model.config().vocab as u32;
    let [a, b, c] = prompts;
    let mut root = model.new_cache();
    step(model, std::slice::from_mut(&mut root), std::slice::from_ref(a));
    let mut caches: Vec<KvCache> = (0..8).map(|_| root.fork()).collect();
    drop(root);
    caches.push(model.new_cache());
    step(model, &mut caches[8..], std::slice::from_ref(b));
    caches.push(model.new_cache());
    // Three steps; the third prompt is prefilled in the first, beside eight one-token decodes.
    let token = |seq: usize, s: usize| (17 + 31 * seq as u32 + 101 * s as u32) % vocab;
    let mut history: Vec<Vec<u32>> = vec![Vec::new(); 10];
    let mut batched: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 10];
    for s in 0..3 {
        let fed: Vec<Vec<u32>> =
            (0..10).map(|i| if i == 9 && s == 0 { c.clone() } else { vec![token(i, s)] }).collect();
        for (i, row) in step(model, &mut caches, &fed).into_iter().enumerate() {
            batched[i].push(row);
            history[i].extend(&fed[i]);
        }
    }
    let mut worst = 0f32;
    for i in 0..10 {
        let alone = match i {
            0..8 => logits_along(model, a, &history[i])[1..].to_vec(),
            8 => logits_along(model, b, &history[i])[1..].to_vec(),
            _ => logits_along(model, c, &history[i][c.len()..]),
        };
        for (want, got) in alone.iter().zip(&batched[i]) {
            worst = worst.max(relative_gap(want, got));
        }
    }
    worst
}

#[test]
fn forks_and_other_prompts_decoded_in_one_device_batch_match_each_decoded_alone() {
    let arith = arith_device();
    let smol = smollm_device();
    let prompts = |e: &Engine, qs: [&str; 3]| -> [Vec<u32>; 3] { qs.map(|q| chat_prompt(e, q)) };
    let gap = forks_batched_against_alone(arith.model(), &prompts(arith, ARITH_QUESTIONS));
    // f32: the batch reorders sums only (measured 3.9e-7 and 2.8e-6).
    assert!(gap < 1e-5, "ponder-arith f32: {gap}");
    let gap = forks_batched_against_alone(smol.model(), &prompts(smol, SMOLLM_QUESTIONS));
    assert!(gap < 2e-5, "SmolLM2 f32: {gap}");
    let smol_bf16 = load(&smollm_path(), WeightFormat::Bf16, AttentionPath::Auto);
    let gap = forks_batched_against_alone(smol_bf16.model(), &prompts(&smol_bf16, SMOLLM_QUESTIONS));
    assert!(gap < BF16_BATCH_TOLERANCE, "SmolLM2 bf16: {gap}");
}

#[test]
fn device_kv_blocks_are_shared_by_forks_and_freed_when_every_sequence_drops() {
    let engine = arith_device();
    let memory = engine.model().kv_memory().clone();
    assert_eq!(memory.live_bytes(), 0);
    let mut root = engine.start(chat_prompt(engine, ARITH_QUESTIONS[2]), options(0.8, 1, 24)).unwrap();
    prefill(engine, &mut root);
    let prompt_bytes = memory.live_bytes();
    assert!(prompt_bytes > 0);
    let mut children = engine.fork(&mut root, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    assert_eq!(memory.live_bytes(), prompt_bytes, "forking copies no cache");
    run_all(engine, &mut children);
    let grown = memory.live_bytes();
    assert!(grown > prompt_bytes, "children write blocks of their own");
    children.truncate(4);
    assert!(memory.live_bytes() < grown, "dropped children free their blocks");
    drop(root);
    assert!(memory.live_bytes() >= prompt_bytes, "children still hold the prompt");
    drop(children);
    assert_eq!(memory.live_bytes(), 0);
    assert!(engine.model().kv_pool_bytes() >= grown, "the pool keeps its capacity for the next sequences");
}

#[test]
fn the_host_path_refuses_half_weights_and_a_cache_from_another_path_is_refused() {
    let half = Llama::from_safetensors(&arith_path(), WeightFormat::F16, &Device::Cpu).unwrap();
    assert!(matches!(half.with_attention(AttentionPath::Host), Err(ModelError::Unsupported(_))));
    let host = arith_host().model();
    let mut foreign = arith_device().model().new_cache();
    let err = host.forward(&mut [BatchEntry { tokens: &[5], cache: &mut foreign }]).unwrap_err();
    assert!(matches!(err, ModelError::ForeignCache), "{err}");
}
