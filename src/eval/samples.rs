//! The per-sample evaluation: k independent samples per question, each
//! checked; accuracy per level and the spread of per-question success.

use serde::Serialize;

use super::{EvalArgs, EvalProblem};
use crate::arith::task;
use crate::engine::{
    Engine, EosPolicy, HiddenCapture, Logprobs, SamplingParams, SeqOptions, Sequence, StopCriteria,
    child_seed,
};
use crate::tokenizer::{AddSpecial, ChatMessage};

#[derive(Debug, Serialize)]
pub struct LevelReport {
    pub level: u8,
    pub accuracy: f64,
    pub questions: usize,
}

#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub split: String,
    pub strategy: &'static str,
    pub samples: usize,
    pub temperature: f32,
    /// Correct samples over all samples.
    pub accuracy: f64,
    pub per_level: Vec<LevelReport>,
    /// `success_histogram[k]`: questions with exactly k correct samples.
    pub success_histogram: Vec<usize>,
    /// Fraction of questions whose success rate is strictly between 2/k and (k-2)/k.
    pub spread_fraction: f64,
    /// Fraction of samples whose steps are separated by blank lines.
    pub blank_line_steps: f64,
    /// Fraction of samples ending with `The answer is N.`
    pub answer_line: f64,
    pub mean_generated_tokens: f64,
}

/// Per question: how many of its samples were right, and format counts.
struct Outcome {
    level: u8,
    correct: usize,
    separated: usize,
    answer_line: usize,
    tokens: usize,
}

fn run_questions(engine: &Engine, problems: &[EvalProblem], args: &EvalArgs) -> anyhow::Result<Vec<Outcome>> {
    let tok = engine.tokenizer();
    let mut seqs: Vec<(usize, Sequence)> = Vec::new();
    for (q, p) in problems.iter().enumerate() {
        let text = tok.apply_chat_template(&[ChatMessage::new("user", p.question.clone())])?;
        let opts = SeqOptions {
            sampling: SamplingParams::sampled(args.temperature, args.seed),
            stop: StopCriteria { max_tokens: args.max_tokens, stop: Vec::new(), eos: EosPolicy::Stop },
            logprobs: Logprobs::None,
            capture: HiddenCapture::Never,
        };
        let mut root = engine.start(tok.encode(&text, AddSpecial::No)?, opts)?;
        while root.cached_len() < root.prompt_len() {
            engine.step(&mut [&mut root])?;
        }
        let seeds: Vec<u64> =
            (0..args.samples() as u64).map(|j| child_seed(args.seed ^ fnv(&p.id), j)).collect();
        seqs.extend(engine.fork(&mut root, &seeds)?.into_iter().map(|s| (q, s)));
    }
    while seqs.iter().any(|(_, s)| s.is_running()) {
        let mut live: Vec<&mut Sequence> =
            seqs.iter_mut().map(|(_, s)| s).filter(|s| s.is_running()).collect();
        engine.step(&mut live)?;
    }
    let mut out: Vec<Outcome> = problems
        .iter()
        .map(|p| Outcome { level: p.level, correct: 0, separated: 0, answer_line: 0, tokens: 0 })
        .collect();
    for (q, s) in &seqs {
        let text = s.text();
        let (separated, ends) = task::format_ok(text);
        let o = &mut out[*q];
        o.correct += usize::from(problems[*q].is_correct(text));
        o.separated += usize::from(separated);
        o.answer_line += usize::from(ends);
        o.tokens += s.generated().len();
    }
    Ok(out)
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

pub fn run(engine: &Engine, problems: &[EvalProblem], args: &EvalArgs) -> anyhow::Result<()> {
    let bar = indicatif::ProgressBar::new(problems.len() as u64);
    let mut outcomes = Vec::new();
    for chunk in problems.chunks(args.concurrent) {
        outcomes.extend(run_questions(engine, chunk, args)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let report = summarize(args, &outcomes);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn summarize(args: &EvalArgs, outcomes: &[Outcome]) -> EvalReport {
    let k = args.samples();
    let total = (outcomes.len() * k) as f64;
    let mut histogram = vec![0; k + 1];
    for o in outcomes {
        histogram[o.correct] += 1;
    }
    let mut levels: Vec<u8> = outcomes.iter().map(|o| o.level).collect();
    levels.sort_unstable();
    levels.dedup();
    let per_level = levels
        .into_iter()
        .filter_map(|level| {
            let qs: Vec<&Outcome> = outcomes.iter().filter(|o| o.level == level).collect();
            (!qs.is_empty()).then(|| LevelReport {
                level,
                accuracy: qs.iter().map(|o| o.correct).sum::<usize>() as f64 / (qs.len() * k) as f64,
                questions: qs.len(),
            })
        })
        .collect();
    let spread = outcomes.iter().filter(|o| o.correct > 2 && o.correct + 2 < k).count();
    EvalReport {
        model: args.model.clone(),
        split: super::source_name(args),
        strategy: "single",
        samples: k,
        temperature: args.temperature,
        accuracy: outcomes.iter().map(|o| o.correct).sum::<usize>() as f64 / total,
        per_level,
        success_histogram: histogram,
        spread_fraction: spread as f64 / outcomes.len() as f64,
        blank_line_steps: outcomes.iter().map(|o| o.separated).sum::<usize>() as f64 / total,
        answer_line: outcomes.iter().map(|o| o.answer_line).sum::<usize>() as f64 / total,
        mean_generated_tokens: outcomes.iter().map(|o| o.tokens).sum::<usize>() as f64 / total,
    }
}

/// The share of questions solved strictly between 2 and k-2 times out of
/// k, printed only when some count lies strictly between: with k ≤ 5 none
/// does (k = 2 would read "between 2/2 and 0/2"), and the share is 0 by
/// construction.
fn spread_line(r: &EvalReport) -> Option<String> {
    let k = r.samples;
    (k >= 6).then(|| {
        format!("questions strictly between 2/{k} and {}/{k}: {:.1}%", k - 2, r.spread_fraction * 100.0)
    })
}

fn print_report(r: &EvalReport) {
    println!(
        "{} on {} ({} samples per question, temperature {})",
        r.model, r.split, r.samples, r.temperature
    );
    println!("accuracy {:.1}%", r.accuracy * 100.0);
    println!("level  accuracy  questions");
    for l in &r.per_level {
        println!("{:>5}  {:>7.1}%  {:>9}", l.level, l.accuracy * 100.0, l.questions);
    }
    println!("per-question correct samples (0..={}): {:?}", r.samples, r.success_histogram);
    if let Some(line) = spread_line(r) {
        println!("{line}");
    }
    println!(
        "format: blank-line steps {:.1}%, final answer line {:.1}%; mean {:.1} tokens per sample",
        r.blank_line_steps * 100.0,
        r.answer_line * 100.0,
        r.mean_generated_tokens
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(samples: usize) -> EvalReport {
        EvalReport {
            model: "m".into(),
            split: "test".into(),
            strategy: "single",
            samples,
            temperature: 0.7,
            accuracy: 0.5,
            per_level: Vec::new(),
            success_histogram: vec![0; samples + 1],
            spread_fraction: 0.25,
            blank_line_steps: 1.0,
            answer_line: 1.0,
            mean_generated_tokens: 10.0,
        }
    }

    #[test]
    fn the_spread_line_is_printed_only_when_a_count_lies_strictly_between_2_and_k_minus_2() {
        for k in 1..=5 {
            assert_eq!(spread_line(&report(k)), None, "k = {k}");
        }
        assert_eq!(spread_line(&report(6)).as_deref(), Some("questions strictly between 2/6 and 4/6: 25.0%"));
        assert_eq!(
            spread_line(&report(16)).as_deref(),
            Some("questions strictly between 2/16 and 14/16: 25.0%")
        );
    }
}
