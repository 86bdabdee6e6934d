//! Stop conditions, step boundaries with hidden states, logprobs.

mod common;

use common::{chat_prompt, options, prefill, run_all, smollm};
use ponder::engine::{EngineError, EosPolicy, FinishReason, HiddenCapture, Logprobs, StopCriteria};
use ponder::model::BatchEntry;

fn greedy_text(prompt: &[u32], max_tokens: usize) -> (Vec<u32>, String) {
    let engine = smollm();
    let mut s = engine.start(prompt.to_vec(), options(0.0, 0, max_tokens)).unwrap();
    run_all(engine, std::slice::from_mut(&mut s));
    (s.generated().to_vec(), s.text().to_string())
}

#[test]
fn a_stop_string_spanning_two_tokens_ends_the_run_before_it_and_is_never_streamed() {
    let engine = smollm();
    let tok = engine.tokenizer();
    let prompt = chat_prompt(engine, "Describe a cat in two sentences.");
    let (ids, text) = greedy_text(&prompt, 40);
    // A stop string made of the last two characters before a token
    // boundary and the first two after it.
    let mut stop = None;
    for i in 3..ids.len() - 1 {
        let before = tok.decode(&ids[..i]).unwrap();
        let after = tok.decode(&ids[..i + 1]).unwrap();
        let tail: String = before.chars().rev().take(2).collect::<Vec<_>>().into_iter().rev().collect();
        let head: String = after[before.len()..].chars().take(2).collect();
        if tail.chars().count() < 2 || head.chars().count() < 2 {
            continue;
        }
        let candidate = format!("{tail}{head}");
        let at = before.len() - tail.len();
        if text.find(&candidate) == Some(at) {
            stop = Some((candidate, at));
            break;
        }
    }
    let (stop, at) = stop.expect("some token boundary gives a stop string that first occurs there");
    let mut opts = options(0.0, 0, 40);
    opts.stop.stop = vec!["never-matches".into(), stop.clone()];
    let mut seq = engine.start(prompt, opts).unwrap();
    let mut streamed = String::new();
    while seq.is_running() {
        for u in engine.step(&mut [&mut seq]).unwrap() {
            streamed.push_str(&u.delta);
        }
    }
    assert_eq!(seq.finish(), Some(FinishReason::Stop { index: 1 }), "stop {stop:?}");
    assert_eq!(seq.text(), &text[..at]);
    assert_eq!(streamed, seq.text(), "streamed deltas equal the final text");
}

#[test]
fn a_step_ends_at_a_blank_line_with_the_hidden_state_of_its_last_token_and_resumes_after_it() {
    let engine = smollm();
    let prompt = chat_prompt(engine, "List three fruits, one per paragraph, separated by blank lines.");
    let mut opts = options(0.0, 0, 200);
    opts.stop.stop = vec!["\n\n".into()];
    opts.capture = HiddenCapture::AtStop;
    let mut seq = engine.start(prompt.clone(), opts.clone()).unwrap();
    prefill(engine, &mut seq);
    // After prefill the hidden state is that of the last prompt token.
    assert!(seq.hidden().is_some());
    run_all(engine, std::slice::from_mut(&mut seq));
    assert_eq!(seq.finish(), Some(FinishReason::Stop { index: 0 }), "text {:?}", seq.text());
    let first = seq.run_text().to_string();
    assert!(!first.contains("\n\n"));
    // The hidden state equals a fresh forward pass over every token so far.
    let hidden = seq.hidden().unwrap().to_vec();
    let model = engine.model();
    let mut cache = model.new_cache();
    let fresh = model.forward(&mut [BatchEntry { tokens: seq.tokens(), cache: &mut cache }]).unwrap();
    let fresh: Vec<f32> = fresh.hidden.flatten_all().unwrap().to_vec1().unwrap();
    let diff = hidden.iter().zip(&fresh).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(diff < 1e-3, "hidden state differs by {diff}");
    // Resuming continues after the delimiter.
    let tokens_before = seq.tokens().len();
    seq.resume(opts.stop.clone());
    run_all(engine, std::slice::from_mut(&mut seq));
    assert!(seq.tokens().len() > tokens_before);
    assert!(!seq.run_text().starts_with('\n'), "second step {:?}", seq.run_text());
    assert!(seq.text().starts_with(&first));
}

#[test]
fn max_tokens_ends_a_run_with_length_and_eos_ends_it_with_stop() {
    let engine = smollm();
    let prompt = chat_prompt(engine, "Say hello.");
    let mut s = engine.start(prompt.clone(), options(0.0, 0, 3)).unwrap();
    run_all(engine, std::slice::from_mut(&mut s));
    assert_eq!((s.generated().len(), s.finish()), (3, Some(FinishReason::Length)));
    assert_eq!(FinishReason::Length.openai(), "length");

    let mut s = engine.start(prompt.clone(), options(0.0, 0, 200)).unwrap();
    run_all(engine, std::slice::from_mut(&mut s));
    assert_eq!(s.finish(), Some(FinishReason::Eos), "text {:?}", s.text());
    let last = *s.generated().last().unwrap();
    assert!(engine.tokenizer().end_of_generation().contains(&last));
    assert!(!s.text().contains("<|im_end|>"));
    assert_eq!(FinishReason::Eos.openai(), "stop");

    let mut opts = options(0.0, 0, 40);
    opts.stop = StopCriteria { max_tokens: 40, stop: vec![], eos: EosPolicy::Ignore };
    let mut s = engine.start(prompt, opts).unwrap();
    run_all(engine, std::slice::from_mut(&mut s));
    assert_eq!(s.generated().len(), 40, "EOS ignored when asked");
}

#[test]
fn logprobs_give_the_chosen_token_and_sorted_alternatives() {
    let engine = smollm();
    let mut opts = options(0.0, 0, 8);
    opts.logprobs = Logprobs::Top(3);
    let mut s = engine.start(chat_prompt(engine, "Count to five."), opts).unwrap();
    run_all(engine, std::slice::from_mut(&mut s));
    assert_eq!(s.logprobs().len(), s.generated().len());
    for (lp, &token) in s.logprobs().iter().zip(s.generated()) {
        assert!(lp.logprob <= 0.0);
        assert_eq!(lp.top.len(), 3);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        // Greedy: the chosen token is the most likely one.
        assert_eq!(lp.top[0], (token, lp.logprob));
    }
}

#[test]
fn prompts_that_are_empty_or_fill_the_context_are_refused() {
    let engine = smollm();
    assert!(matches!(engine.start(vec![], options(0.0, 0, 1)), Err(EngineError::EmptyPrompt)));
    let max = engine.model().max_position();
    let err = engine.start(vec![42; max], options(0.0, 0, 1)).unwrap_err();
    assert!(
        matches!(err, EngineError::PromptTooLong { tokens, max: m } if tokens == max && m == max),
        "{err}"
    );
    let err = engine.start(vec![u32::MAX], options(0.0, 0, 1)).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}
