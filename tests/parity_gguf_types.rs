//! GGUF loading for every tensor type the engine promises (F32, F16, Q4_0,
//! Q4_1, Q8_0, Q4_K, Q6_K) and both architectures, against candle's
//! `quantized_llama` and `quantized_qwen2` on tiny random files.

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use ponder::model::{BatchEntry, Llama, WeightFormat};

const HIDDEN: usize = 256; // K-quants need rows that are multiples of 256.
const INTER: usize = 512;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const VOCAB: usize = 96;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Arch {
    Llama,
    Qwen2,
}

/// A tiny random file; with `rope_freqs`, Llama 3's RoPE factors tensor too.
fn write_gguf(path: &std::path::Path, arch: Arch, dtype: GgmlDType, rope_freqs: Option<&[f32]>) {
    let dev = Device::Cpu;
    let name = match arch {
        Arch::Llama => "llama",
        Arch::Qwen2 => "qwen2",
    };
    let head_dim = HIDDEN / HEADS;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut add = |n: String, shape: &[usize], scale: f64, offset: f64, dt: GgmlDType| {
        let t = ((Tensor::randn(0f32, 1.0, shape, &dev).unwrap() * scale).unwrap() + offset).unwrap();
        tensors.push((n, QTensor::quantize(&t, dt).unwrap()));
    };
    let s = 1.0 / (HIDDEN as f64).sqrt();
    add("token_embd.weight".into(), &[VOCAB, HIDDEN], 0.5, 0.0, dtype);
    add("output_norm.weight".into(), &[HIDDEN], 0.1, 1.0, GgmlDType::F32);
    add("output.weight".into(), &[VOCAB, HIDDEN], 0.2, 0.0, dtype);
    for i in 0..LAYERS {
        let p = format!("blk.{i}");
        add(format!("{p}.attn_norm.weight"), &[HIDDEN], 0.1, 1.0, GgmlDType::F32);
        add(format!("{p}.ffn_norm.weight"), &[HIDDEN], 0.1, 1.0, GgmlDType::F32);
        add(format!("{p}.attn_q.weight"), &[HEADS * head_dim, HIDDEN], s, 0.0, dtype);
        add(format!("{p}.attn_k.weight"), &[KV_HEADS * head_dim, HIDDEN], s, 0.0, dtype);
        add(format!("{p}.attn_v.weight"), &[KV_HEADS * head_dim, HIDDEN], s, 0.0, dtype);
        add(format!("{p}.attn_output.weight"), &[HIDDEN, HEADS * head_dim], s, 0.0, dtype);
        add(format!("{p}.ffn_gate.weight"), &[INTER, HIDDEN], s, 0.0, dtype);
        add(format!("{p}.ffn_up.weight"), &[INTER, HIDDEN], s, 0.0, dtype);
        add(format!("{p}.ffn_down.weight"), &[HIDDEN, INTER], 1.0 / (INTER as f64).sqrt(), 0.0, dtype);
        if arch == Arch::Qwen2 {
            add(format!("{p}.attn_q.bias"), &[HEADS * head_dim], 0.1, 0.0, GgmlDType::F32);
            add(format!("{p}.attn_k.bias"), &[KV_HEADS * head_dim], 0.1, 0.0, GgmlDType::F32);
            add(format!("{p}.attn_v.bias"), &[KV_HEADS * head_dim], 0.1, 0.0, GgmlDType::F32);
        }
    }
    if let Some(f) = rope_freqs {
        let t = Tensor::new(f, &dev).unwrap();
        tensors.push(("rope_freqs.weight".into(), QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    }
    use gguf_file::Value as V;
    let meta: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(name.into())),
        (format!("{name}.block_count"), V::U32(LAYERS as u32)),
        (format!("{name}.embedding_length"), V::U32(HIDDEN as u32)),
        (format!("{name}.feed_forward_length"), V::U32(INTER as u32)),
        (format!("{name}.attention.head_count"), V::U32(HEADS as u32)),
        (format!("{name}.attention.head_count_kv"), V::U32(KV_HEADS as u32)),
        (format!("{name}.rope.dimension_count"), V::U32(head_dim as u32)),
        (format!("{name}.attention.layer_norm_rms_epsilon"), V::F32(1e-6)),
        (format!("{name}.rope.freq_base"), V::F32(10000.0)),
        (format!("{name}.context_length"), V::U32(256)),
    ];
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

/// Candle's logits after the prompt and after each forced token.
fn reference(path: &std::path::Path, arch: Arch, prompt: &[u32], forced: &[u32]) -> Vec<Vec<f32>> {
    use candle_transformers::models::{quantized_llama, quantized_qwen2};
    let dev = Device::Cpu;
    let mut f = std::fs::File::open(path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let x = |ids: &[u32]| Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
    let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut out = Vec::new();
    match arch {
        Arch::Llama => {
            let mut m = quantized_llama::ModelWeights::from_gguf(ct, &mut f, &dev).unwrap();
            out.push(flat(m.forward(&x(prompt), 0).unwrap()));
            for (i, &t) in forced.iter().enumerate() {
                out.push(flat(m.forward(&x(&[t]), prompt.len() + i).unwrap()));
            }
        }
        Arch::Qwen2 => {
            let mut m = quantized_qwen2::ModelWeights::from_gguf(ct, &mut f, &dev).unwrap();
            out.push(flat(m.forward(&x(prompt), 0).unwrap()));
            for (i, &t) in forced.iter().enumerate() {
                out.push(flat(m.forward(&x(&[t]), prompt.len() + i).unwrap()));
            }
        }
    }
    out
}

fn kl(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let ls = |l: &[f32]| -> Vec<f64> {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z = l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
        l.iter().map(|&x| x as f64 - z).collect()
    };
    let (p, q) = (ls(p_logits), ls(q_logits));
    p.iter().zip(&q).map(|(a, b)| a.exp() * (a - b)).sum()
}

fn check(arch: Arch, dtype: GgmlDType) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, arch, dtype, None);
    let model = Llama::from_gguf(&path, WeightFormat::Stored, &Device::Cpu).unwrap();
    let prompt: Vec<u32> = (0..10).map(|i| (i * 29 % VOCAB) as u32).collect();
    let mut cache = model.new_cache();
    let mut out = model.forward(&mut [BatchEntry { tokens: &prompt, cache: &mut cache }]).unwrap();
    let (mut ours, mut tokens) = (Vec::new(), Vec::new());
    for _ in 0..6 {
        let l = out.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let next = ponder::engine::sampling::argmax(&l);
        ours.push(l);
        tokens.push(next);
        out = model.forward(&mut [BatchEntry { tokens: &[next], cache: &mut cache }]).unwrap();
    }
    let theirs = reference(&path, arch, &prompt, &tokens[..tokens.len() - 1]);
    let dense = matches!(dtype, GgmlDType::F32 | GgmlDType::F16);
    for (step, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        let k = kl(b, a);
        if dense {
            assert!(diff < 1e-3, "{arch:?} {dtype:?} step {step}: max |logit difference| {diff}");
        } else {
            // Activations are quantized before each matmul in both
            // implementations, so last-bit differences can flip a rounding.
            assert!(k < 0.01, "{arch:?} {dtype:?} step {step}: KL {k} (max diff {diff})");
        }
    }
}

#[test]
fn every_promised_tensor_type_loads_and_matches_candle_quantized_llama() {
    for dtype in [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ] {
        check(Arch::Llama, dtype);
    }
}

#[test]
fn qwen2_gguf_with_biases_and_half_split_rope_matches_candle_quantized_qwen2() {
    for dtype in [GgmlDType::F32, GgmlDType::Q8_0, GgmlDType::Q4K] {
        check(Arch::Qwen2, dtype);
    }
}

#[test]
fn llama3_rope_factors_in_a_gguf_divide_the_frequencies_candle_quantized_llama_leaves_as_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let half = HIDDEN / HEADS / 2;
    let logits = |factors: &[f32]| {
        let path = dir.path().join("rope.gguf");
        write_gguf(&path, Arch::Llama, GgmlDType::F32, Some(factors));
        let model = Llama::from_gguf(&path, WeightFormat::Stored, &Device::Cpu).unwrap();
        assert_eq!(model.config().rope_freq_factors.as_deref(), Some(factors));
        let prompt: Vec<u32> = (0..10).map(|i| (i * 29 % VOCAB) as u32).collect();
        let mut cache = model.new_cache();
        let out = model.forward(&mut [BatchEntry { tokens: &prompt, cache: &mut cache }]).unwrap();
        let ours = out.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (ours, reference(&path, Arch::Llama, &prompt, &[])[0].clone())
    };
    let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    // Factors of 1 change nothing: the same logits as candle's.
    let (ours, theirs) = logits(&vec![1.0; half]);
    assert!(max_diff(&ours, &theirs) < 1e-3);
    // Slower low frequencies (as Llama 3 makes them) change what attention sees.
    let mut factors = vec![1.0; half];
    for f in &mut factors[half / 2..] {
        *f = 32.0;
    }
    let (ours, theirs) = logits(&factors);
    assert!(max_diff(&ours, &theirs) > 1e-3, "the factors were applied");
}
