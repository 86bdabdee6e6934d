//! ponder's forward pass against candle_transformers' `quantized_llama` on
//! the default model, SmolLM2-135M-Instruct.

mod common;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use ponder::model::{BatchEntry, Llama, WeightFormat};
use ponder::tokenizer::{AddSpecial, Tokenizer};

const PROMPT: &str = "Question: A farmer has 12 cows and buys 35 more. Then 7 cows run away and he sells \
half of the rest. How many cows does he have now? Explain each step, then give the final number.";

fn prompt_64(path: &std::path::Path) -> Vec<u32> {
    let tok = Tokenizer::from_gguf_file(path).unwrap();
    let mut ids = tok.encode(&format!("{PROMPT} {PROMPT}"), AddSpecial::Yes).unwrap();
    assert!(ids.len() >= 64, "prompt has {} tokens", ids.len());
    ids.truncate(64);
    ids
}

/// Greedy decoding with candle's model: (tokens, logits at every step).
fn reference(path: &std::path::Path, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let dev = Device::Cpu;
    let mut f = std::fs::File::open(path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut m = ModelWeights::from_gguf(ct, &mut f, &dev).unwrap();
    let mut logits = m.forward(&Tensor::new(prompt, &dev).unwrap().unsqueeze(0).unwrap(), 0).unwrap();
    let (mut tokens, mut all) = (Vec::new(), Vec::new());
    for i in 0..steps {
        let l = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let next = ponder::engine::sampling::argmax(&l);
        all.push(l);
        tokens.push(next);
        let x = Tensor::new(&[next], &dev).unwrap().unsqueeze(0).unwrap();
        logits = m.forward(&x, prompt.len() + i).unwrap();
    }
    (tokens, all)
}

/// Greedy decoding with ponder's model, or teacher-forced along `forced`.
fn ponder_run(
    model: &Llama,
    prompt: &[u32],
    steps: usize,
    forced: Option<&[u32]>,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut cache = model.new_cache();
    let mut out = model.forward(&mut [BatchEntry { tokens: prompt, cache: &mut cache }]).unwrap();
    let (mut tokens, mut all) = (Vec::new(), Vec::new());
    for i in 0..steps {
        let l = out.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let next = forced.map_or_else(|| ponder::engine::sampling::argmax(&l), |f| f[i]);
        tokens.push(ponder::engine::sampling::argmax(&l));
        all.push(l);
        out = model.forward(&mut [BatchEntry { tokens: &[next], cache: &mut cache }]).unwrap();
    }
    (tokens, all)
}

/// KL(p_ref || p_ponder) of the softmax distributions, per step.
fn kl_per_step(ours: &[Vec<f32>], reference: &[Vec<f32>]) -> Vec<f64> {
    let log_softmax = |l: &[f32]| -> Vec<f64> {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z = l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
        l.iter().map(|&x| x as f64 - z).collect()
    };
    ours.iter()
        .zip(reference)
        .map(|(a, b)| {
            let (la, lb) = (log_softmax(a), log_softmax(b));
            lb.iter().zip(&la).map(|(q, p)| q.exp() * (q - p)).sum()
        })
        .collect()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Writes the SmolLM2 GGUF with every tensor as F16: both implementations
/// then run the same dense weights, so any difference is their arithmetic.
fn f16_copy(src: &std::path::Path, dir: &std::path::Path) -> std::path::PathBuf {
    let dev = Device::Cpu;
    let mut f = std::fs::File::open(src).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut tensors = Vec::new();
    for name in ct.tensor_infos.keys() {
        let q = ct.tensor(&mut f, name, &dev).unwrap();
        let dtype = if q.shape().dims().len() == 1 { GgmlDType::F32 } else { GgmlDType::F16 };
        tensors.push((name.clone(), QTensor::quantize(&q.dequantize(&dev).unwrap(), dtype).unwrap()));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let out = dir.join("smollm2-f16.gguf");
    let mut w = std::fs::File::create(&out).unwrap();
    gguf_file::write(&mut w, &metadata, &tensors).unwrap();
    out
}

#[test]
fn logits_match_candle_quantized_llama_on_the_same_dense_weights_for_64_prompt_tokens_and_32_greedy_steps() {
    let dir = tempfile::tempdir().unwrap();
    let path = f16_copy(&common::smollm_path(), dir.path());
    let prompt = prompt_64(&path);
    let (ref_tokens, ref_logits) = reference(&path, &prompt, 32);
    let model = Llama::from_gguf(&path, WeightFormat::Stored, &Device::Cpu).unwrap();
    let (tokens, logits) = ponder_run(&model, &prompt, 32, None);
    assert_eq!(tokens, ref_tokens, "greedy tokens differ");
    let diff = max_abs_diff(&logits, &ref_logits);
    eprintln!("dense weights: max |logit difference| {diff}");
    // Logits reach ~35 in magnitude; differences come only from summation order.
    assert!(diff < 1e-3, "max |logit difference| {diff}");
}

#[test]
fn on_the_q4_1_file_as_stored_logits_stay_close_to_candle_along_its_greedy_path() {
    // Both implementations quantize activations to Q8_1 before each Q4_1
    // matmul, which turns last-bit differences of attention into rounding
    // flips: the comparison is teacher-forced along candle's greedy path and
    // the tolerance is that of the quantization, not of f32 arithmetic.
    let path = common::smollm_path();
    let prompt = prompt_64(&path);
    let (ref_tokens, ref_logits) = reference(&path, &prompt, 32);
    let model = Llama::from_gguf(&path, WeightFormat::Stored, &Device::Cpu).unwrap();
    let (argmaxes, logits) = ponder_run(&model, &prompt, 32, Some(&ref_tokens));
    let agree = argmaxes.iter().zip(&ref_tokens).filter(|(a, b)| a == b).count();
    let diff = max_abs_diff(&logits, &ref_logits);
    let kl = kl_per_step(&logits, &ref_logits);
    let mean_kl = kl.iter().sum::<f64>() / kl.len() as f64;
    let max_kl = kl.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "argmax agreement {agree}/32, max |logit difference| {diff}, KL mean {mean_kl:.2e} max {max_kl:.2e}"
    );
    assert!(agree >= 29, "argmax agrees at {agree}/32 steps");
    assert!(mean_kl < 0.01 && max_kl < 0.05, "KL mean {mean_kl} max {max_kl}");
}
