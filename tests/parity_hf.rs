//! ponder's forward pass against candle_transformers' `llama` and `qwen2` on
//! tiny random HF checkpoints that the test writes itself.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ponder::model::{BatchEntry, Llama, WeightFormat};

const HIDDEN: usize = 64;
const INTER: usize = 128;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const VOCAB: usize = 96;

#[derive(Clone, Copy, PartialEq)]
enum Family {
    Llama,
    Qwen2,
}

fn config(family: Family, tied: bool) -> serde_json::Value {
    let mut c = serde_json::json!({
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 128,
        "tie_word_embeddings": tied, "hidden_act": "silu",
    });
    let extra = match family {
        Family::Llama => serde_json::json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}),
        Family::Qwen2 => serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "sliding_window": 128, "max_window_layers": LAYERS, "use_sliding_window": false,
        }),
    };
    c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    c
}

/// Random weights with the real tensor names, saved in `dtype`.
fn write_checkpoint(dir: &Path, family: Family, tied: bool, dtype: DType) {
    let dev = Device::Cpu;
    let head_dim = HIDDEN / HEADS;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let mut rand = |name: String, shape: &[usize], scale: f64| {
        let x = (Tensor::randn(0f32, 1.0, shape, &dev).unwrap() * scale).unwrap();
        t.insert(name, x.to_dtype(dtype).unwrap());
    };
    rand("model.embed_tokens.weight".into(), &[VOCAB, HIDDEN], 0.5);
    rand("model.norm.weight".into(), &[HIDDEN], 0.1);
    if !tied {
        rand("lm_head.weight".into(), &[VOCAB, HIDDEN], 0.2);
    }
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        let s = 1.0 / (HIDDEN as f64).sqrt();
        rand(format!("{p}.input_layernorm.weight"), &[HIDDEN], 0.1);
        rand(format!("{p}.post_attention_layernorm.weight"), &[HIDDEN], 0.1);
        rand(format!("{p}.self_attn.q_proj.weight"), &[HEADS * head_dim, HIDDEN], s);
        rand(format!("{p}.self_attn.k_proj.weight"), &[KV_HEADS * head_dim, HIDDEN], s);
        rand(format!("{p}.self_attn.v_proj.weight"), &[KV_HEADS * head_dim, HIDDEN], s);
        rand(format!("{p}.self_attn.o_proj.weight"), &[HIDDEN, HEADS * head_dim], s);
        rand(format!("{p}.mlp.gate_proj.weight"), &[INTER, HIDDEN], s);
        rand(format!("{p}.mlp.up_proj.weight"), &[INTER, HIDDEN], s);
        rand(format!("{p}.mlp.down_proj.weight"), &[HIDDEN, INTER], 1.0 / (INTER as f64).sqrt());
        if family == Family::Qwen2 {
            rand(format!("{p}.self_attn.q_proj.bias"), &[HEADS * head_dim], 0.1);
            rand(format!("{p}.self_attn.k_proj.bias"), &[KV_HEADS * head_dim], 0.1);
            rand(format!("{p}.self_attn.v_proj.bias"), &[KV_HEADS * head_dim], 0.1);
        }
    }
    // Norm weights near 1, as trained models have them.
    for (name, x) in t.iter_mut() {
        if name.ends_with("norm.weight") {
            *x = (x.to_dtype(DType::F32).unwrap() + 1.0).unwrap().to_dtype(dtype).unwrap();
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), config(family, tied).to_string()).unwrap();
}

/// Logits of candle's implementation: after the prompt, then after each forced token.
fn reference(dir: &Path, family: Family, prompt: &[u32], forced: &[u32]) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let files = [dir.join("model.safetensors")];
    // SAFETY: the file is not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &dev).unwrap() };
    let cfg_text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let x = |ids: &[u32]| Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
    let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut out = Vec::new();
    match family {
        Family::Llama => {
            use candle_transformers::models::llama;
            let cfg: llama::LlamaConfig = serde_json::from_str(&cfg_text).unwrap();
            let cfg = cfg.into_config(false);
            let model = llama::Llama::load(vb, &cfg).unwrap();
            let mut cache = llama::Cache::new(true, DType::F32, &cfg, &dev).unwrap();
            out.push(flat(model.forward(&x(prompt), 0, &mut cache).unwrap()));
            for (i, &t) in forced.iter().enumerate() {
                out.push(flat(model.forward(&x(&[t]), prompt.len() + i, &mut cache).unwrap()));
            }
        }
        Family::Qwen2 => {
            use candle_transformers::models::qwen2;
            let cfg: qwen2::Config = serde_json::from_str(&cfg_text).unwrap();
            let mut model = qwen2::ModelForCausalLM::new(&cfg, vb).unwrap();
            out.push(flat(model.forward(&x(prompt), 0).unwrap()));
            for (i, &t) in forced.iter().enumerate() {
                out.push(flat(model.forward(&x(&[t]), prompt.len() + i).unwrap()));
            }
        }
    }
    out
}

fn check(family: Family, tied: bool, dtype: DType) {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), family, tied, dtype);
    let model = Llama::from_safetensors(dir.path(), WeightFormat::Auto, &Device::Cpu).unwrap();
    assert_eq!(model.config().tie_embeddings, tied);
    let prompt: Vec<u32> = (0..12).map(|i| (i * 37 % VOCAB) as u32).collect();
    // Greedy with ponder, then candle forced along the same tokens.
    let mut cache = model.new_cache();
    let mut logits = Vec::new();
    let mut tokens = Vec::new();
    let mut out = model.forward(&mut [BatchEntry { tokens: &prompt, cache: &mut cache }]).unwrap();
    for _ in 0..10 {
        let l = out.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let next = ponder::engine::sampling::argmax(&l);
        logits.push(l);
        tokens.push(next);
        out = model.forward(&mut [BatchEntry { tokens: &[next], cache: &mut cache }]).unwrap();
    }
    let want = reference(dir.path(), family, &prompt, &tokens[..tokens.len() - 1]);
    assert_eq!(want.len(), logits.len());
    for (step, (a, b)) in logits.iter().zip(&want).enumerate() {
        assert_eq!(ponder::engine::sampling::argmax(a), ponder::engine::sampling::argmax(b), "step {step}");
        let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(diff < 1e-4, "step {step}: max |logit difference| {diff}");
    }
}

#[test]
fn llama_with_untied_embeddings_matches_candle_llama() {
    check(Family::Llama, false, DType::F32);
}

#[test]
fn llama_with_tied_embeddings_in_bf16_matches_candle_llama() {
    check(Family::Llama, true, DType::BF16);
}

#[test]
fn qwen2_with_untied_embeddings_in_f16_matches_candle_qwen2() {
    check(Family::Qwen2, false, DType::F16);
}

#[test]
fn qwen2_with_tied_embeddings_matches_candle_qwen2() {
    check(Family::Qwen2, true, DType::F32);
}
