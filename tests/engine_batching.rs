//! Batched decoding gives each sequence exactly the tokens it gets alone.

mod common;

use common::{chat_prompt, options, prefill, run_all, smollm};
use ponder::engine::{Sequence, child_seed};

const QUESTIONS: [&str; 4] = [
    "What is 7 times 8?",
    "Name three colours of the rainbow and explain why the sky is blue in one sentence.",
    "Write a haiku about rain.",
    "Is 91 a prime number? Answer step by step.",
];

fn alone(prompt: &[u32], seed: u64, max_tokens: usize) -> Vec<u32> {
    let engine = smollm();
    let mut seq = engine.start(prompt.to_vec(), options(0.9, seed, max_tokens)).unwrap();
    run_all(engine, std::slice::from_mut(&mut seq));
    seq.generated().to_vec()
}

#[test]
fn sequences_of_different_lengths_decoded_in_one_batch_produce_exactly_the_tokens_each_produces_alone() {
    let engine = smollm();
    let prompts: Vec<Vec<u32>> = QUESTIONS.iter().map(|q| chat_prompt(engine, q)).collect();
    let mut batch: Vec<Sequence> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| engine.start(p.clone(), options(0.9, 100 + i as u64, 24)).unwrap())
        .collect();
    run_all(engine, &mut batch);
    for (i, seq) in batch.iter().enumerate() {
        assert_eq!(seq.generated(), alone(&prompts[i], 100 + i as u64, 24).as_slice(), "sequence {i}");
    }
}

#[test]
fn forked_children_decoded_together_match_sequences_prefilled_on_their_own() {
    let engine = smollm();
    let prompt = chat_prompt(engine, QUESTIONS[3]);
    let mut root = engine.start(prompt.clone(), options(0.9, 0, 20)).unwrap();
    prefill(engine, &mut root);
    let seeds: Vec<u64> = (0..5).map(|i| child_seed(77, i)).collect();
    let mut children = engine.fork(&mut root, &seeds).unwrap();
    run_all(engine, &mut children);
    let distinct: std::collections::HashSet<&[u32]> = children.iter().map(|c| c.generated()).collect();
    assert!(distinct.len() > 1, "different seeds should give different samples");
    for (child, &seed) in children.iter().zip(&seeds) {
        assert_eq!(child.generated(), alone(&prompt, seed, 20).as_slice(), "seed {seed}");
    }
}

#[test]
fn a_sequence_joining_a_running_batch_changes_nothing_for_the_others() {
    let engine = smollm();
    let p0 = chat_prompt(engine, QUESTIONS[0]);
    let p1 = chat_prompt(engine, QUESTIONS[2]);
    let mut first = engine.start(p0.clone(), options(0.9, 5, 24)).unwrap();
    for _ in 0..6 {
        engine.step(&mut [&mut first]).unwrap();
    }
    // The newcomer's prompt is prefilled in the same forward pass as `first`'s decode step.
    let mut second = engine.start(p1.clone(), options(0.9, 6, 24)).unwrap();
    let mut both = vec![first, second];
    run_all(engine, &mut both);
    second = both.pop().unwrap();
    first = both.pop().unwrap();
    assert_eq!(first.generated(), alone(&p0, 5, 24).as_slice());
    assert_eq!(second.generated(), alone(&p1, 6, 24).as_slice());
}

#[test]
fn greedy_decoding_is_the_same_with_and_without_a_seed() {
    let engine = smollm();
    let prompt = chat_prompt(engine, QUESTIONS[0]);
    let run = |seed| {
        let mut s = engine.start(prompt.clone(), options(0.0, seed, 12)).unwrap();
        run_all(engine, std::slice::from_mut(&mut s));
        s.generated().to_vec()
    };
    assert_eq!(run(1), run(2));
}

#[test]
fn forks_enough_to_draw_on_several_threads_sample_what_they_sample_in_small_batches() {
    // 24 x SmolLM2's 49152 logits pass the engine's threshold for drawing in
    // parallel; batches of 4 stay under it.
    let engine = smollm();
    let prompt = chat_prompt(engine, QUESTIONS[2]);
    let seeds: Vec<u64> = (0..24).map(|i| child_seed(9, i)).collect();
    let run = |batch: usize| -> Vec<Vec<u32>> {
        let mut root = engine.start(prompt.clone(), options(0.9, 0, 8)).unwrap();
        prefill(engine, &mut root);
        let mut out = Vec::new();
        for chunk in seeds.chunks(batch) {
            let mut children = engine.fork(&mut root, chunk).unwrap();
            run_all(engine, &mut children);
            out.extend(children.iter().map(|c| c.generated().to_vec()));
        }
        out
    };
    let together = run(24);
    assert!(together.iter().collect::<std::collections::HashSet<_>>().len() > 1);
    assert_eq!(together, run(4));
}
