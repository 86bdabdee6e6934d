//! The verifier's training sequences: the policy's labelled trajectories
//! (Math-Shepherd hard labels at every step tag), and worked solutions of
//! train-split problems with one result corrupted the way the policy errs,
//! which teach the step arithmetic densely (a label at every step and the
//! digits of every correct result as next-token targets).

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::arith::task::{self, Op, Problem};
use crate::arith::vocab::PAD;
use crate::calibrate::labels::LabelRow;
use crate::prm::model_prm::{NumberOrder, STEP_TOKEN, encode_with};
use crate::tokenizer::Tokenizer;

/// How the verifier reads numbers (written into its tokenizer config).
pub const ORDER: NumberOrder = NumberOrder::LeastSignificantFirst;
/// The tokens that open the assistant turn in the verifier's template.
pub const ASSISTANT_PREFIX: &str = "<|im_start|>assistant\n";

/// One training sequence: the PRM's input, the label of each step tag, and
/// the positions whose next token is a step token to predict.
#[derive(Debug, Clone)]
pub struct Example {
    pub question_id: String,
    pub ids: Vec<u32>,
    /// (position of an `<extra_0>`, label).
    pub tags: Vec<(usize, u32)>,
    /// Every `<extra_0>` position (the surprisal features delimit steps by them).
    pub all_tags: Vec<usize>,
    /// Where the steps begin (after the assistant turn's opening tokens).
    pub steps_start: usize,
    /// (position, the next token): the step tokens written right.
    pub lm: Vec<(usize, u32)>,
    /// The last tag ends a finished solution.
    pub finished: bool,
}

/// Which token ids are digits or end a step, and where steps begin.
pub struct Marks {
    digit: Vec<bool>,
    step: u32,
    /// The assistant turn's opening tokens.
    assistant: Vec<u32>,
}

impl Marks {
    pub fn new(tok: &Tokenizer) -> anyhow::Result<Self> {
        let step =
            tok.token_id(STEP_TOKEN).ok_or_else(|| anyhow::anyhow!("the tokenizer has no {STEP_TOKEN}"))?;
        let n = tok.vocab_size();
        let text: Vec<String> = (0..n as u32).map(|i| tok.token_text(i)).collect();
        Ok(Self {
            digit: text.iter().map(|t| t.len() == 1 && t.as_bytes()[0].is_ascii_digit()).collect(),
            step,
            assistant: tok.encode(ASSISTANT_PREFIX, crate::tokenizer::AddSpecial::No)?,
        })
    }

    /// Where the steps of `ids` begin.
    pub fn steps_start(&self, ids: &[u32], all_tags: &[usize]) -> usize {
        crate::prm::surprisal::steps_start(
            ids,
            &self.assistant,
            all_tags.first().copied().unwrap_or(ids.len()),
        )
    }

    fn is(&self, table: &[bool], id: u32) -> bool {
        table.get(id as usize).copied().unwrap_or(false)
    }

    /// Positions of the step tags in `ids`.
    pub fn tags(&self, ids: &[u32]) -> Vec<usize> {
        ids.iter().enumerate().filter(|(_, t)| **t == self.step).map(|(i, _)| i).collect()
    }

    /// Next-token targets for every token of the steps (from `start`), but
    /// the digits of step `skip` (0-based), the one written wrong.
    fn step_targets(&self, ids: &[u32], start: usize, skip: Option<usize>) -> Vec<(usize, u32)> {
        let mut step = 0usize;
        let mut out = Vec::new();
        for (i, &t) in ids.iter().enumerate().skip(start.max(1)) {
            if !(skip == Some(step) && self.is(&self.digit, t)) {
                out.push((i - 1, t));
            }
            if t == self.step {
                step += 1;
            }
        }
        out
    }
}

/// Every finished trajectory of the labels as one sequence whose tags carry
/// the hard labels of its prefixes (the last one: whether the answer is
/// right), and every question alone (one tag, the empty prefix's label).
pub fn from_labels(
    rows: &[LabelRow],
    questions: &HashMap<String, String>,
    tok: &Tokenizer,
    marks: &Marks,
) -> anyhow::Result<Vec<Example>> {
    let mut prefixes: HashMap<(&str, String), u32> = HashMap::new();
    for r in rows.iter().filter(|r| !r.final_answer) {
        prefixes.insert((r.question_id.as_str(), r.prefix.join(task::STEP_DELIMITER)), r.hard() as u32);
    }
    let mut out = Vec::new();
    for r in rows.iter().filter(|r| r.final_answer || r.k == 0) {
        let question = questions.get(&r.question_id).ok_or_else(|| {
            anyhow::anyhow!("labels name question {} that the split does not hold", r.question_id)
        })?;
        let steps: &[String] = if r.final_answer { &r.prefix } else { &[] };
        let ids = encode_with(tok, ORDER, question, steps)?;
        let positions = marks.tags(&ids);
        let mut tags = Vec::with_capacity(positions.len());
        for (j, &pos) in positions.iter().enumerate() {
            let label = if !r.final_answer {
                Some(r.hard() as u32)
            } else if j + 1 == positions.len() {
                Some(u32::from(r.correct > 0))
            } else {
                // Prefixes past `max_prefix` have no label: they teach nothing.
                prefixes.get(&(r.question_id.as_str(), r.prefix[..=j].join(task::STEP_DELIMITER))).copied()
            };
            tags.extend(label.map(|l| (pos, l)));
        }
        let steps_start = marks.steps_start(&ids, &positions);
        out.push(Example {
            question_id: r.question_id.clone(),
            ids,
            tags,
            all_tags: positions,
            steps_start,
            lm: Vec::new(),
            finished: r.final_answer,
        });
    }
    Ok(out)
}

/// `y` with one slip of the kinds the policy makes: a digit replaced by
/// another, or a carry lost or doubled (± a power of ten).
fn slip(y: i64, rng: &mut ChaCha8Rng) -> i64 {
    let digits = y.unsigned_abs().to_string().len() as u32;
    loop {
        let d = rng.random_range(0..digits);
        let p = 10i64.pow(d);
        let z = if rng.random_bool(0.6) {
            let old = (y.abs() / p) % 10;
            let new = (old + rng.random_range(1..10)) % 10;
            // No new leading zero on a number of several digits.
            if new == 0 && d + 1 == digits && digits > 1 {
                continue;
            }
            y.signum().max(1) * (y.abs() + (new - old) * p)
        } else if rng.random_bool(0.5) {
            y + p
        } else {
            y - p
        };
        if z != y && z >= 0 {
            return z;
        }
    }
}

/// A worked solution of `p` as steps, with one result wrong in half of them
/// (later steps compute on from the wrong value, as a policy's do); also
/// returns the index of the first wrong step.
pub fn corrupted_steps(p: &Problem, rng: &mut ChaCha8Rng) -> (Vec<String>, Option<usize>) {
    let wrong = rng.random_bool(0.5).then(|| rng.random_range(0..=p.ops.len()));
    let mut steps = Vec::with_capacity(p.ops.len() + 1);
    let mut x = p.start;
    for (i, &op) in p.ops.iter().enumerate() {
        let (s, b, y) = match op {
            Op::Add(b) => ("+", b, x + b),
            Op::Sub(b) => ("-", b, x - b),
            Op::Mul(k) => ("*", k, x * k),
        };
        let y = if wrong == Some(i) { slip(y, rng) } else { y };
        steps.push(format!("{x} {s} {b} = {y}"));
        x = y;
    }
    let answer = if wrong == Some(p.ops.len()) { slip(x, rng) } else { x };
    steps.push(format!("The answer is {answer}."));
    (steps, wrong)
}

/// Synthetic sequences from `problems`, labels exact at every step, and
/// every step token but the wrong digits as next-token targets.
pub fn synthetic(
    problems: &[Problem],
    tok: &Tokenizer,
    marks: &Marks,
    rng: &mut ChaCha8Rng,
) -> anyhow::Result<Vec<Example>> {
    let mut out = Vec::with_capacity(problems.len());
    for p in problems {
        let (steps, wrong) = corrupted_steps(p, rng);
        let ids = encode_with(tok, ORDER, &p.question, &steps)?;
        let all_tags = marks.tags(&ids);
        let tags = all_tags
            .iter()
            .enumerate()
            .map(|(j, &pos)| (pos, u32::from(wrong.is_none_or(|w| j < w))))
            .collect();
        let steps_start = marks.steps_start(&ids, &all_tags);
        let lm = marks.step_targets(&ids, steps_start, wrong);
        out.push(Example { question_id: p.id.clone(), ids, tags, all_tags, steps_start, lm, finished: true });
    }
    Ok(out)
}

/// A batch as tensors: ids `(batch, time)` right-padded, the flat rows of
/// the step tags and their labels, the flat rows of LM positions and their
/// targets.
pub struct Batch {
    pub ids: Tensor,
    pub tag_rows: Tensor,
    pub labels: Tensor,
    pub lm_rows: Option<(Tensor, Tensor)>,
}

pub fn batch(examples: &[&Example], device: &Device) -> candle_core::Result<Batch> {
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(examples.len() * t);
    let (mut rows, mut labels, mut lm_rows, mut lm_targets) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, e) in examples.iter().enumerate() {
        ids.extend(e.ids.iter().copied().chain(std::iter::repeat(PAD)).take(t));
        for &(pos, label) in &e.tags {
            rows.push((i * t + pos) as u32);
            labels.push(label);
        }
        for &(pos, target) in &e.lm {
            lm_rows.push((i * t + pos) as u32);
            lm_targets.push(target);
        }
    }
    let lm_rows = if lm_rows.is_empty() {
        None
    } else {
        Some((Tensor::new(lm_rows.as_slice(), device)?, Tensor::new(lm_targets.as_slice(), device)?))
    };
    Ok(Batch {
        ids: Tensor::from_vec(ids, (examples.len(), t), device)?,
        tag_rows: Tensor::new(rows.as_slice(), device)?,
        labels: Tensor::new(labels.as_slice(), device)?,
        lm_rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_corrupted_solution_has_one_slip_and_computes_on_from_it() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (mut wrong_seen, mut right_seen) = (0, 0);
        for p in task::generate_seeded(task::Split::Train, 20, 7).unwrap() {
            let (steps, wrong) = corrupted_steps(&p, &mut rng);
            assert_eq!(steps.len(), p.ops.len() + 1);
            let answer = task::extract_answer(steps.last().unwrap()).unwrap();
            match wrong {
                None => {
                    right_seen += 1;
                    assert_eq!(steps, p.steps(), "an uncorrupted solution is the reference");
                }
                Some(w) => {
                    wrong_seen += 1;
                    assert_ne!(answer, p.answer, "one slip changes the answer");
                    assert_eq!(steps[..w], p.steps()[..w], "steps before the slip are right");
                    // Every step but the slipped one is right arithmetic on what it was given.
                    for (i, s) in steps[..p.ops.len()].iter().enumerate() {
                        let n: Vec<i64> = s.split(' ').filter_map(|t| t.parse().ok()).collect();
                        let exact = match s.split(' ').nth(1).unwrap() {
                            "+" => n[0] + n[1],
                            "-" => n[0] - n[1],
                            _ => n[0] * n[1],
                        };
                        assert_eq!(exact == n[2], i != w, "{s} in {steps:?}");
                    }
                }
            }
        }
        assert!(wrong_seen > 20 && right_seen > 20, "{wrong_seen} {right_seen}");
    }
}
