//! A sequence's KV cache is freed as soon as the sequence is dropped; forks
//! share their parent's prefix instead of copying it.

mod common;

use common::{chat_prompt, options, prefill, run_all, smollm};

#[test]
fn forks_share_the_prompt_cache_and_dropping_every_sequence_frees_all_of_it() {
    let engine = smollm();
    let memory = engine.model().kv_memory().clone();
    assert_eq!(memory.live_bytes(), 0);
    let mut root = engine.start(chat_prompt(engine, "Tell me a story."), options(0.8, 1, 6)).unwrap();
    prefill(engine, &mut root);
    let prompt_bytes = memory.live_bytes();
    assert!(prompt_bytes > 0);
    let mut children = engine.fork(&mut root, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    assert_eq!(memory.live_bytes(), prompt_bytes, "forking copies no cache");
    run_all(engine, &mut children);
    let per_token = prompt_bytes / root.prompt_len();
    let generated: usize = children.iter().map(|c| c.cached_len() - root.prompt_len()).sum();
    assert_eq!(memory.live_bytes(), prompt_bytes + generated * per_token);
    // Pruning: dropping some children frees exactly their private tails.
    let dropped: usize = children.drain(..4).map(|c| c.cached_len() - root.prompt_len()).sum();
    assert_eq!(memory.live_bytes(), prompt_bytes + (generated - dropped) * per_token);
    drop(root);
    assert!(memory.live_bytes() >= prompt_bytes, "children still hold the prompt");
    drop(children);
    assert_eq!(memory.live_bytes(), 0);
}
