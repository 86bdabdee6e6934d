//! The Qwen2.5-Math-PRM-format model PRM on tiny random checkpoints with
//! the real tensor names: step scores against candle's qwen2 backbone plus
//! the score head, the 2-class to 3-quantile conversion, a trained quantile
//! head, a merged LoRA adapter, and the server scoring a policy's
//! trajectories with a model PRM named in its configuration.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{D, DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use ponder::prm::model_prm::{HeadChoice, ModelPrm, ModelPrmOptions};

use common::{H, write_prm};

/// P(good) at every step token, from candle's qwen2 backbone and the head.
fn reference(dir: &Path, ids: &[u32], step: u32) -> Vec<f32> {
    use candle_transformers::models::qwen2;
    let dev = Device::Cpu;
    let files = [dir.join("model.safetensors")];
    // SAFETY: the file is not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &dev).unwrap() };
    let cfg: qwen2::Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let mut model = qwen2::Model::new(&cfg, vb.clone()).unwrap();
    let hidden = model
        .forward(&Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap(), 0, None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let l0 = candle_nn::linear(H, H, vb.pp("score.0")).unwrap();
    let l2 = candle_nn::linear(H, 2, vb.pp("score.2")).unwrap();
    use candle_core::Module;
    let logits = l2.forward(&l0.forward(&hidden).unwrap().relu().unwrap()).unwrap();
    let p =
        candle_nn::ops::softmax(&logits, D::Minus1).unwrap().i((.., 1)).unwrap().to_vec1::<f32>().unwrap();
    ids.iter().zip(p).filter(|(t, _)| **t == step).map(|(_, p)| p).collect()
}

fn steps() -> Vec<String> {
    vec!["3 + 4 = 7".into(), "7 * 2 = 14".into(), "The answer is 14.".into()]
}

#[test]
fn step_scores_equal_candles_qwen2_backbone_with_the_score_head() {
    let dir = tempfile::tempdir().unwrap();
    write_prm(dir.path());
    let prm =
        ModelPrm::load(dir.path(), &ModelPrmOptions { head: HeadChoice::TwoClass, lora: None }).unwrap();
    let ids = prm.encode("What is (3 + 4) * 2?", &steps()).unwrap();
    let step = 2;
    assert_eq!(ids.iter().filter(|&&t| t == step).count(), 3, "one <extra_0> per step");
    let want = reference(dir.path(), &ids, step);
    let got = prm.step_scores("What is (3 + 4) * 2?", &steps()).unwrap();
    assert_eq!(got.len(), 3);
    for (g, w) in got.iter().zip(&want) {
        assert!((g.raw.unwrap() - w).abs() < 1e-5, "{got:?} vs {want:?}");
        assert_eq!(g.quantiles.q10, g.quantiles.q90, "a 2-class head is a point estimate");
    }
    // The question alone is scored through a lone step token.
    assert_eq!(prm.step_scores("What is 1 + 1?", &[]).unwrap().len(), 1);
}

#[test]
fn the_converted_quantile_head_starts_with_every_output_equal_to_p_good() {
    let dir = tempfile::tempdir().unwrap();
    write_prm(dir.path());
    let two =
        ModelPrm::load(dir.path(), &ModelPrmOptions { head: HeadChoice::TwoClass, lora: None }).unwrap();
    let conv =
        ModelPrm::load(dir.path(), &ModelPrmOptions { head: HeadChoice::Converted, lora: None }).unwrap();
    let a = two.step_scores("q?", &steps()).unwrap();
    let b = conv.step_scores("q?", &steps()).unwrap();
    for (x, y) in a.iter().zip(&b) {
        let p = x.raw.unwrap();
        for q in [y.quantiles.q10, y.quantiles.q50, y.quantiles.q90] {
            assert!((q - p).abs() < 1e-6, "{x:?} {y:?}");
        }
    }
}

#[test]
fn a_trained_quantile_head_and_a_lora_adapter_load_from_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    write_prm(dir.path());
    let dev = Device::Cpu;
    // A trained head: three distinct rows.
    let head = dir.path().join("quantile_head.safetensors");
    let mut t = HashMap::new();
    t.insert("score.2.weight".to_string(), Tensor::randn(0f32, 1.0, (3, H), &dev).unwrap());
    t.insert("score.2.bias".to_string(), Tensor::new(&[-1f32, 0.0, 1.0], &dev).unwrap());
    candle_core::safetensors::save(&t, &head).unwrap();
    let trained =
        ModelPrm::load(dir.path(), &ModelPrmOptions { head: HeadChoice::Trained(head), lora: None }).unwrap();
    for s in trained.step_scores("q?", &steps()).unwrap() {
        assert!(s.quantiles.q10 < s.quantiles.q90 && s.quantiles.q10 <= s.quantiles.q50);
    }
    // A LoRA adapter on layer 0's q_proj equals the same delta merged by hand.
    let lora = dir.path().join("lora");
    std::fs::create_dir(&lora).unwrap();
    let a = Tensor::randn(0f32, 0.3, (4, H), &dev).unwrap();
    let b = Tensor::randn(0f32, 0.3, (H, 4), &dev).unwrap();
    let mut t = HashMap::new();
    t.insert("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string(), a.clone());
    t.insert("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".to_string(), b.clone());
    candle_core::safetensors::save(&t, lora.join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        lora.join("adapter_config.json"),
        r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}"#,
    )
    .unwrap();
    let with_lora =
        ModelPrm::load(dir.path(), &ModelPrmOptions { head: HeadChoice::TwoClass, lora: Some(lora) })
            .unwrap();

    let merged_dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(dir.path().join(f), merged_dir.path().join(f)).unwrap();
    }
    let mut weights = candle_core::safetensors::load(dir.path().join("model.safetensors"), &dev).unwrap();
    let key = "model.layers.0.self_attn.q_proj.weight".to_string();
    let merged = (&weights[&key] + (b.matmul(&a).unwrap() * 2.0).unwrap()).unwrap();
    weights.insert(key, merged);
    candle_core::safetensors::save(&weights, merged_dir.path().join("model.safetensors")).unwrap();
    let by_hand =
        ModelPrm::load(merged_dir.path(), &ModelPrmOptions { head: HeadChoice::TwoClass, lora: None })
            .unwrap();
    let plain =
        ModelPrm::load(dir.path(), &ModelPrmOptions { head: HeadChoice::TwoClass, lora: None }).unwrap();
    let (x, y, z) = (
        with_lora.step_scores("q?", &steps()).unwrap(),
        by_hand.step_scores("q?", &steps()).unwrap(),
        plain.step_scores("q?", &steps()).unwrap(),
    );
    for (p, q) in x.iter().zip(&y) {
        assert!((p.raw.unwrap() - q.raw.unwrap()).abs() < 1e-6);
    }
    // The adapter moves the head's inputs. (Not P(good) itself: with random
    // weights it can saturate at 1.0 in f32 with and without the adapter,
    // which made this test flaky.)
    let steps = steps();
    let item = [ponder::prm::ScoreItem { question: "q?", steps: &steps, hidden: None, logprobs: &[] }];
    let (f_lora, f_plain) = (with_lora.features(&item).unwrap(), plain.features(&item).unwrap());
    let moved = (f_lora - f_plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(moved > 1e-4, "the adapter changes what the head reads: {moved}");
    assert_eq!(z.len(), x.len());
}

#[test]
fn a_batch_of_prefixes_of_different_lengths_scores_as_each_alone() {
    use ponder::prm::{ScoreItem, Scorer};
    let dir = tempfile::tempdir().unwrap();
    write_prm(dir.path());
    let prm =
        ModelPrm::load(dir.path(), &ModelPrmOptions { head: HeadChoice::Converted, lora: None }).unwrap();
    let all = steps();
    let prefixes: Vec<(&str, &[String])> = vec![
        ("What is (3 + 4) * 2?", &all[..]),
        ("What is 1 + 1?", &[]),
        ("What is (3 + 4) * 2?", &all[..1]),
    ];
    let items: Vec<ScoreItem<'_>> = prefixes
        .iter()
        .map(|(q, s)| ScoreItem { question: q, steps: s, hidden: None, logprobs: &[] })
        .collect();
    let batched = prm.score(&items).unwrap();
    assert_eq!(batched.len(), 3);
    for ((q, s), b) in prefixes.iter().zip(&batched) {
        let alone = *prm.step_scores(q, s).unwrap().last().unwrap();
        assert!((alone.raw.unwrap() - b.raw.unwrap()).abs() < 1e-5, "{alone:?} vs {b:?}");
        assert!((alone.quantiles.q10 - b.quantiles.q10).abs() < 1e-5);
    }
    assert!(prm.score(&[]).unwrap().is_empty());
}

#[test]
fn a_prefix_longer_than_the_prms_context_scores_as_a_failure_and_the_others_as_alone() {
    use ponder::prm::{ScoreItem, Scorer};
    let dir = tempfile::tempdir().unwrap();
    write_prm(dir.path());
    let prm =
        ModelPrm::load(dir.path(), &ModelPrmOptions { head: HeadChoice::Converted, lora: None }).unwrap();
    let all = steps();
    let long: Vec<String> = (0..prm.context_length()).map(|i| format!("{i} + 1 = {}", i + 1)).collect();
    assert!(prm.encode("q", &long).unwrap().len() > prm.context_length());
    let items = [
        ScoreItem { question: "What is (3 + 4) * 2?", steps: &all, hidden: None, logprobs: &[] },
        ScoreItem { question: "q", steps: &long, hidden: None, logprobs: &[] },
    ];
    let scored = prm.score(&items).expect("an over-long prefix does not fail the batch");
    assert_eq!((scored[1].raw, scored[1].quantiles.q90), (Some(0.0), 0.0));
    let alone = *prm.step_scores(items[0].question, &all).unwrap().last().unwrap();
    assert!((alone.raw.unwrap() - scored[0].raw.unwrap()).abs() < 1e-5, "{alone:?} vs {:?}", scored[0]);
}

/// The steps a reasoning answer was scored as: its text split at blank lines.
fn answer_steps(text: &str) -> Vec<String> {
    text.split("\n\n").map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

#[tokio::test]
async fn a_model_prm_named_in_the_config_scores_the_policys_trajectories_over_http() {
    use ponder::config::{Config, ModelPrmConfig, PrmConfig};
    let dir = tempfile::tempdir().unwrap();
    write_prm(dir.path());
    let mut config = Config::default();
    config.models.retain(|m| m.id == "ponder-arith");
    config.models[0].prm = Some(PrmConfig::Model(ModelPrmConfig {
        model: dir.path().into(),
        head: HeadChoice::Converted,
        lora: None,
    }));
    let server = common::TestServer::start(config);
    let question = "What is 3 + 4?";
    let body = serde_json::json!({"model": "ponder-arith", "messages": [{"role": "user", "content": question}],
        "max_tokens": 96, "temperature": 0.7, "seed": 5, "reasoning": {"strategy": "best_of_n", "max_samples": 6}});
    let r = reqwest::Client::new().post(server.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    let p = &v["ponder"];
    assert_eq!(p["adaptive"], true, "adaptive by default: the model has a PRM");
    let samples = p["samples"].as_u64().unwrap();
    assert!((1..=6).contains(&samples), "{p}");
    assert_eq!(p["prm_evaluations"].as_u64().unwrap(), 1 + samples, "the question, then each sample's end");

    // The figures are the configured PRM's own: the question alone, and the
    // selected answer's steps.
    let prm =
        ModelPrm::load(dir.path(), &ModelPrmOptions { head: HeadChoice::Converted, lora: None }).unwrap();
    let close = |json: &serde_json::Value, want: f32| (json.as_f64().unwrap() - want as f64).abs() < 1e-5;
    let start = prm.step_scores(question, &[]).unwrap()[0];
    for q in ["q10", "q50", "q90"] {
        assert!(close(&p["success_probability_start"][q], start.raw.unwrap()), "{q}: {p} vs {start:?}");
    }
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    let end = *prm.step_scores(question, &answer_steps(text)).unwrap().last().unwrap();
    assert!(close(&p["success_probability_selected"]["q50"], end.quantiles.q50), "{p} vs {end:?}");
    server.stop();
}

#[test]
fn a_model_prm_on_the_device_path_in_f16_scores_steps_as_the_f32_one_does_within_half_precision() {
    let dir = tempfile::tempdir().unwrap();
    write_prm(dir.path());
    let opts = ModelPrmOptions { head: HeadChoice::TwoClass, lora: None };
    let f32_prm = ModelPrm::load(dir.path(), &opts).unwrap();
    let f16_prm =
        ModelPrm::load_on(dir.path(), &opts, &Device::Cpu, ponder::model::WeightFormat::F16).unwrap();
    let want = f32_prm.step_scores("What is (3 + 4) * 2?", &steps()).unwrap();
    let got = f16_prm.step_scores("What is (3 + 4) * 2?", &steps()).unwrap();
    assert_eq!(got.len(), want.len());
    // P(good) through an f16 backbone: within a few f16 steps (2^-11) of f32.
    for (g, w) in got.iter().zip(&want) {
        assert!((g.raw.unwrap() - w.raw.unwrap()).abs() < 5e-3, "{got:?} vs {want:?}");
    }
    // Prefixes longest first: the device path groups them by length and puts the rows back in order.
    let items: Vec<ponder::prm::ScoreItem<'_>> = (1..=3)
        .rev()
        .map(|k| ponder::prm::ScoreItem {
            question: "What is (3 + 4) * 2?",
            steps: &steps_static()[..k],
            hidden: None,
            logprobs: &[],
        })
        .collect();
    use ponder::prm::Scorer;
    let (a, b) = (f32_prm.score(&items).unwrap(), f16_prm.score(&items).unwrap());
    for (x, y) in a.iter().zip(&b) {
        assert!((x.raw.unwrap() - y.raw.unwrap()).abs() < 5e-3, "{a:?} vs {b:?}");
    }
}

fn steps_static() -> &'static [String] {
    static S: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    S.get_or_init(steps)
}
