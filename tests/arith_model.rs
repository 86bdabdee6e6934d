//! ponder-arith's training: every trainable tensor gets a gradient, a few
//! steps lower the loss, and the saved checkpoint loads through the engine
//! with the same logits.

use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use ponder::arith::model::{ArithConfig, TrainModel};
use ponder::arith::task::{Split, generate_seeded};
use ponder::arith::train::{Encoder, Example, batch_tensors};
use ponder::arith::vocab;
use ponder::model::{BatchEntry, Llama, WeightFormat};

fn tiny() -> ArithConfig {
    ArithConfig {
        vocab: vocab::vocab_size(),
        hidden: 32,
        layers: 2,
        heads: 4,
        intermediate: 64,
        max_position: 512,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
    }
}

fn examples(n: usize) -> (Encoder, Vec<Example>) {
    let enc = Encoder::new().unwrap();
    let ex = generate_seeded(Split::Train, n, 42).unwrap().iter().map(|p| enc.example(p).unwrap()).collect();
    (enc, ex)
}

#[test]
fn every_trainable_tensor_gets_a_nonzero_gradient() {
    let dev = Device::Cpu;
    let model = TrainModel::new(tiny(), 1, &dev).unwrap();
    let (_, ex) = examples(2);
    let refs: Vec<&Example> = ex.iter().take(4).collect();
    let (input, target, mask) = batch_tensors(&refs, &dev).unwrap();
    let grads = model.loss(&input, &target, &mask).unwrap().backward().unwrap();
    assert_eq!(model.named_vars().len(), 1 + 2 * 9 + 1);
    for (name, var) in model.named_vars() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"));
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient norm {norm}");
    }
}

#[test]
fn a_few_optimiser_steps_lower_the_loss() {
    let dev = Device::Cpu;
    let model = TrainModel::new(tiny(), 2, &dev).unwrap();
    let (_, ex) = examples(2);
    let refs: Vec<&Example> = ex.iter().take(8).collect();
    let (input, target, mask) = batch_tensors(&refs, &dev).unwrap();
    let mut opt = AdamW::new(model.vars(), ParamsAdamW { lr: 3e-3, ..Default::default() }).unwrap();
    let first = model.loss(&input, &target, &mask).unwrap().to_scalar::<f32>().unwrap();
    for _ in 0..15 {
        let loss = model.loss(&input, &target, &mask).unwrap();
        opt.backward_step(&loss).unwrap();
    }
    let last = model.loss(&input, &target, &mask).unwrap().to_scalar::<f32>().unwrap();
    assert!(last < first * 0.8, "loss {first} -> {last}");
}

#[test]
fn the_saved_checkpoint_loads_through_the_engine_with_the_training_logits() {
    let dev = Device::Cpu;
    let cfg = tiny();
    let model = TrainModel::new(cfg, 3, &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save(&dir.path().join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("config.json"), cfg.hf_config(vocab::EOS, vocab::EOS).to_string())
        .unwrap();
    vocab::write_files(dir.path(), &vocab::build().unwrap()).unwrap();
    let (enc, _) = examples(1);
    let prompt = enc.prompt("What is 3 + 4?").unwrap();

    let train_logits =
        model.forward(&Tensor::new(prompt.as_slice(), &dev).unwrap().unsqueeze(0).unwrap()).unwrap();
    let last: Vec<f32> = train_logits.squeeze(0).unwrap().get(prompt.len() - 1).unwrap().to_vec1().unwrap();

    let engine =
        ponder::engine::Engine::load(dir.path(), WeightFormat::Auto, &dev, Default::default()).unwrap();
    assert_eq!(
        engine
            .tokenizer()
            .encode(
                &engine
                    .tokenizer()
                    .apply_chat_template(&[ponder::tokenizer::ChatMessage::new("user", "What is 3 + 4?")])
                    .unwrap(),
                ponder::tokenizer::AddSpecial::No
            )
            .unwrap(),
        prompt
    );
    assert_eq!(engine.tokenizer().end_of_generation(), &[0, 2]);
    let llama: &Llama = engine.model();
    let mut cache = llama.new_cache();
    let out = llama.forward(&mut [BatchEntry { tokens: &prompt, cache: &mut cache }]).unwrap();
    let got: Vec<f32> = out.logits.flatten_all().unwrap().to_vec1().unwrap();
    let diff = last.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(diff < 1e-4, "engine and training logits differ by {diff}");
}
