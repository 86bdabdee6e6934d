//! The arithmetic reasoning task: seeded problems graded in six levels,
//! reference solutions with one operation per step, an answer checker, and
//! three splits that never share a question.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub const LEVELS: std::ops::RangeInclusive<u8> = 1..=6;
pub const STEP_DELIMITER: &str = "\n\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Calib,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Calib => "calib",
            Split::Test => "test",
        }
    }

    /// Each split draws from its own seed stream...
    fn seed(self) -> u64 {
        match self {
            Split::Train => 0x7472_6169_6e00_0001,
            Split::Calib => 0x6361_6c69_6200_0002,
            Split::Test => 0x7465_7374_0000_0003,
        }
    }

    /// ...and keeps only questions whose hash falls in its own range, so no
    /// question string can belong to two splits.
    fn owns(self, question: &str) -> bool {
        let bucket = fnv1a(question.as_bytes()) % 100;
        match self {
            Split::Train => bucket < 80,
            Split::Calib => (80..90).contains(&bucket),
            Split::Test => bucket >= 90,
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Add(i64),
    Sub(i64),
    Mul(i64),
}

impl Op {
    fn apply(self, x: i64) -> i64 {
        match self {
            Op::Add(b) => x + b,
            Op::Sub(b) => x - b,
            Op::Mul(k) => x * k,
        }
    }

    fn symbol(self) -> (&'static str, i64) {
        match self {
            Op::Add(b) => ("+", b),
            Op::Sub(b) => ("-", b),
            Op::Mul(k) => ("*", k),
        }
    }
}

/// How hard a level is: operations, operand digits, and whether `*` appears.
struct LevelSpec {
    ops: usize,
    digits: u32,
    multiply: bool,
}

fn spec(level: u8) -> LevelSpec {
    match level {
        1 => LevelSpec { ops: 1, digits: 1, multiply: false },
        2 => LevelSpec { ops: 2, digits: 1, multiply: false },
        3 => LevelSpec { ops: 2, digits: 2, multiply: true },
        4 => LevelSpec { ops: 3, digits: 2, multiply: true },
        5 => LevelSpec { ops: 4, digits: 2, multiply: true },
        6 => LevelSpec { ops: 5, digits: 3, multiply: true },
        _ => unreachable!("levels are 1..=6"),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub id: String,
    pub level: u8,
    pub question: String,
    pub answer: i64,
    pub start: i64,
    pub ops: Vec<Op>,
}

impl Problem {
    /// The reference solution: one operation per step, blank lines between
    /// steps, and a last line `The answer is N.`
    pub fn solution(&self) -> String {
        let mut steps = Vec::with_capacity(self.ops.len() + 1);
        let mut x = self.start;
        for &op in &self.ops {
            let (s, b) = op.symbol();
            let y = op.apply(x);
            steps.push(format!("{x} {s} {b} = {y}"));
            x = y;
        }
        steps.push(format!("The answer is {x}."));
        steps.join(STEP_DELIMITER)
    }

    /// The reference solution split into steps.
    pub fn steps(&self) -> Vec<String> {
        self.solution().split(STEP_DELIMITER).map(str::to_string).collect()
    }
}

fn operand(rng: &mut ChaCha8Rng, digits: u32) -> i64 {
    let lo = if digits == 1 { 1 } else { 10i64.pow(digits - 1) };
    rng.random_range(lo..10i64.pow(digits))
}

const NAMES: &[&str] =
    &["Ava", "Ben", "Chloe", "Dan", "Eli", "Fay", "Gus", "Ida", "Jon", "Kim", "Leo", "Mia"];
const ITEMS: &[&str] = &["apples", "coins", "books", "stamps", "marbles", "shells", "cards", "pens"];

fn bare(start: i64, ops: &[Op]) -> String {
    // Left to right, with the running total parenthesised before each `*`,
    // so ordinary precedence agrees with the step-by-step solution.
    let mut expr = start.to_string();
    for (i, &op) in ops.iter().enumerate() {
        let (s, b) = op.symbol();
        if matches!(op, Op::Mul(_)) && i > 0 {
            expr = format!("({expr})");
        }
        expr = format!("{expr} {s} {b}");
    }
    let lead = ["What is", "Compute", "Calculate", "Evaluate"];
    format!("{} {expr}?", lead[(start as usize + ops.len()) % lead.len()])
}

fn word(rng: &mut ChaCha8Rng, start: i64, ops: &[Op]) -> String {
    let name = NAMES[rng.random_range(0..NAMES.len())];
    let item = ITEMS[rng.random_range(0..ITEMS.len())];
    let mut parts = vec![match rng.random_range(0..3) {
        0 => format!("{name} has {start} {item}."),
        1 => format!("A box holds {start} {item}."),
        _ => format!("There are {start} {item} on a shelf."),
    }];
    for &op in ops {
        parts.push(match (op, rng.random_range(0..3)) {
            (Op::Add(b), 0) => format!("{name} gets {b} more."),
            (Op::Add(b), 1) => format!("{b} more {item} are added."),
            (Op::Add(b), _) => format!("Then {b} {item} arrive."),
            (Op::Sub(b), 0) => format!("{name} gives away {b}."),
            (Op::Sub(b), 1) => format!("{b} {item} are lost."),
            (Op::Sub(b), _) => format!("Then {b} {item} are taken."),
            (Op::Mul(k), 0) => format!("The number of {item} is multiplied by {k}."),
            (Op::Mul(k), 1) => format!("Each pile is copied until there are {k} times as many."),
            (Op::Mul(k), _) => format!("Then the amount grows {k} times."),
        });
    }
    parts.push(match rng.random_range(0..2) {
        0 => format!("How many {item} are there now?"),
        _ => "How many are left in the end?".to_string(),
    });
    parts.join(" ")
}

/// One problem of `level` drawn from `rng` (not yet assigned to a split).
fn draw(rng: &mut ChaCha8Rng, level: u8) -> (String, i64, Vec<Op>) {
    let s = spec(level);
    let start = operand(rng, s.digits);
    let mut x = start;
    let mut ops = Vec::with_capacity(s.ops);
    for _ in 0..s.ops {
        let kind = if s.multiply { rng.random_range(0..3) } else { rng.random_range(0..2) };
        let size = operand(rng, s.digits);
        let op = match kind {
            // Multipliers stay small and totals stay under 10^(digits+1).
            2 if x < 10i64.pow(s.digits + 1) / 2 => Op::Mul(rng.random_range(2..=5)),
            1 | 2 if x > 1 => Op::Sub(rng.random_range(1..=x.min(size))),
            _ => Op::Add(size),
        };
        x = op.apply(x);
        ops.push(op);
    }
    let question = if rng.random_bool(0.5) { bare(start, &ops) } else { word(rng, start, &ops) };
    (question, x, ops)
}

/// A split's level holds fewer distinct questions than were asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "per_level {per_level}: level {level} of the {split} split gave only {made} distinct questions in {tries} draws; ask for fewer per level"
)]
pub struct TooFewQuestions {
    pub split: &'static str,
    pub level: u8,
    pub per_level: usize,
    pub made: usize,
    pub tries: usize,
}

/// `per_level` problems of every level for `split`, the same every time.
pub fn generate(split: Split, per_level: usize) -> Result<Vec<Problem>, TooFewQuestions> {
    generate_seeded(split, per_level, 0)
}

/// As [`generate`], from another stream of the same split (for training
/// data beyond a fixed set).
pub fn generate_seeded(split: Split, per_level: usize, stream: u64) -> Result<Vec<Problem>, TooFewQuestions> {
    draw_problems(split, per_level, stream, std::collections::HashSet::new())
}

/// `per_level` problems of every level from stream `stream` (> 0) of
/// `split`, none of which is among [`generate`]'s at the same `per_level`:
/// questions new to every evaluation that read stream 0 at that size.
pub fn generate_unseen(split: Split, per_level: usize, stream: u64) -> Result<Vec<Problem>, TooFewQuestions> {
    let seen = generate(split, per_level)?.into_iter().map(|p| p.question).collect();
    draw_problems(split, per_level, stream, seen)
}

/// Draws in a row that found nothing new, after which a level counts as
/// exhausted: far more than a level with questions left ever needs (about
/// ten draws per question while a split's pool is far from used up).
const MAX_MISSES: usize = 200_000;

/// Draws from `stream` of `split`, skipping questions already in `seen`.
fn draw_problems(
    split: Split,
    per_level: usize,
    stream: u64,
    mut seen: std::collections::HashSet<String>,
) -> Result<Vec<Problem>, TooFewQuestions> {
    let mut rng = ChaCha8Rng::seed_from_u64(split.seed() ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut out = Vec::with_capacity(per_level.min(10_000) * LEVELS.count());
    for level in LEVELS {
        let (mut made, mut tries, mut misses) = (0, 0, 0);
        while made < per_level {
            tries += 1;
            if misses >= MAX_MISSES {
                return Err(TooFewQuestions { split: split.name(), level, per_level, made, tries });
            }
            let (question, answer, ops) = draw(&mut rng, level);
            if !split.owns(&question) || !seen.insert(question.clone()) {
                misses += 1;
                continue;
            }
            misses = 0;
            let start = ops_start(&question, answer, &ops);
            out.push(Problem {
                id: format!("{}-{stream}-{level}-{made}", split.name()),
                level,
                question,
                answer,
                start,
                ops,
            });
            made += 1;
        }
    }
    Ok(out)
}

/// The starting value, recovered by undoing the operations.
fn ops_start(_question: &str, answer: i64, ops: &[Op]) -> i64 {
    ops.iter().rev().fold(answer, |x, op| match *op {
        Op::Add(b) => x - b,
        Op::Sub(b) => x + b,
        Op::Mul(k) => x / k,
    })
}

/// The final answer stated in `text`: the number in the last
/// `The answer is N` line, else the last number anywhere.
pub fn extract_answer(text: &str) -> Option<i64> {
    let marker = "The answer is";
    if let Some(pos) = text.rfind(marker)
        && let Some(n) = first_number(&text[pos + marker.len()..])
    {
        return Some(n);
    }
    last_number(text)
}

fn first_number(s: &str) -> Option<i64> {
    numbers(s).into_iter().next()
}

fn last_number(s: &str) -> Option<i64> {
    numbers(s).pop()
}

fn numbers(s: &str) -> Vec<i64> {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let neg = bytes[i] == b'-'
            && i + 1 < bytes.len()
            && bytes[i + 1].is_ascii_digit()
            && (i == 0 || !bytes[i - 1].is_ascii_digit());
        if bytes[i].is_ascii_digit() || neg {
            let start = i;
            i += 1;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            if let Ok(n) = s[start..i].parse() {
                out.push(n);
            }
        } else {
            i += 1;
        }
    }
    out
}

pub fn is_correct(text: &str, answer: i64) -> bool {
    extract_answer(text) == Some(answer)
}

/// Whether a completion has the reference format: steps separated by blank
/// lines, and a last line `The answer is N.`
pub fn format_ok(text: &str) -> (bool, bool) {
    let text = text.trim_end();
    let steps: Vec<&str> = text.split(STEP_DELIMITER).collect();
    let separated = steps.len() >= 2 && steps.iter().all(|s| !s.trim().is_empty() && !s.contains('\n'));
    let last = text.lines().last().unwrap_or("");
    let ends = last
        .strip_prefix("The answer is ")
        .and_then(|r| r.strip_suffix('.'))
        .is_some_and(|n| n.parse::<i64>().is_ok());
    (separated, ends)
}

/// `{id, level, question, answer}` per line.
pub fn to_jsonl(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| {
            serde_json::json!({"id": p.id, "level": p.level, "question": p.question, "answer": p.answer})
                .to_string()
                + "\n"
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asking_more_questions_than_a_level_holds_is_an_error_naming_the_level_not_a_panic() {
        // Level 1 of the test split holds about 12,700 questions.
        let err = generate(Split::Test, 20_000).unwrap_err();
        assert_eq!((err.split, err.level, err.per_level), ("test", 1, 20_000));
        assert!(err.made < 20_000);
        assert!(err.to_string().contains("per_level 20000: level 1 of the test split"), "{err}");
    }

    #[test]
    fn another_stream_draws_questions_of_the_split_that_stream_zero_does_not_hold() {
        let shown: std::collections::HashSet<String> =
            generate(Split::Test, 20).unwrap().into_iter().map(|p| p.question).collect();
        let unseen = generate_unseen(Split::Test, 20, 1).unwrap();
        assert_eq!(unseen.len(), 20 * LEVELS.count());
        assert!(unseen.iter().all(|p| !shown.contains(&p.question) && Split::Test.owns(&p.question)));
        assert!(unseen.iter().all(|p| p.id.starts_with("test-1-")));
        assert_eq!(unseen, generate_unseen(Split::Test, 20, 1).unwrap());
    }

    #[test]
    fn generation_is_deterministic_and_covers_every_level() {
        let a = generate(Split::Test, 20).unwrap();
        assert_eq!(a, generate(Split::Test, 20).unwrap());
        for level in LEVELS {
            assert_eq!(a.iter().filter(|p| p.level == level).count(), 20);
        }
        assert_ne!(
            generate_seeded(Split::Train, 5, 1).unwrap(),
            generate_seeded(Split::Train, 5, 2).unwrap()
        );
    }

    #[test]
    fn the_three_splits_share_no_question() {
        let sets: Vec<std::collections::HashSet<String>> = [Split::Train, Split::Calib, Split::Test]
            .iter()
            .map(|&s| generate(s, 150).unwrap().into_iter().map(|p| p.question).collect())
            .collect();
        assert!(
            sets[0].is_disjoint(&sets[1]) && sets[0].is_disjoint(&sets[2]) && sets[1].is_disjoint(&sets[2])
        );
        // Disjoint by construction: a split only keeps questions hashing into its range.
        for q in &sets[2] {
            assert!(Split::Test.owns(q) && !Split::Train.owns(q) && !Split::Calib.owns(q));
        }
    }

    #[test]
    fn reference_solutions_compute_the_answer_one_operation_per_step() {
        for p in generate(Split::Calib, 30).unwrap() {
            let sol = p.solution();
            let steps = p.steps();
            assert_eq!(steps.len(), p.ops.len() + 1);
            assert_eq!(format_ok(&sol), (true, true), "{sol}");
            assert!(is_correct(&sol, p.answer));
            assert!(p.answer >= 0, "totals never go negative: {sol}");
            for step in &steps[..steps.len() - 1] {
                let (lhs, rhs) = step.split_once(" = ").unwrap();
                let mut it = lhs.split(' ');
                let (a, op, b): (i64, &str, i64) = (
                    it.next().unwrap().parse().unwrap(),
                    it.next().unwrap(),
                    it.next().unwrap().parse().unwrap(),
                );
                let want = match op {
                    "+" => a + b,
                    "-" => a - b,
                    "*" => a * b,
                    _ => unreachable!(),
                };
                assert_eq!(rhs.parse::<i64>().unwrap(), want, "{step}");
            }
        }
    }

    #[test]
    fn the_checker_reads_the_final_line_and_falls_back_to_the_last_number() {
        assert_eq!(extract_answer("3 + 4 = 7\n\nThe answer is 7."), Some(7));
        assert_eq!(extract_answer("The answer is 12. Wait, no: 13"), Some(12));
        assert_eq!(extract_answer("so we get 5 - 9 = -4"), Some(-4));
        assert_eq!(extract_answer("no digits"), None);
        assert!(!is_correct("The answer is 8.", 7));
        assert_eq!(format_ok("1 + 2 = 3\n\nThe answer is 3."), (true, true));
        assert_eq!(format_ok("1 + 2 = 3\nThe answer is 3."), (false, true));
        assert_eq!(format_ok("1 + 2 = 3\n\nSo 3."), (true, false));
    }

    #[test]
    fn bare_expressions_parenthesise_before_multiplying() {
        let q = bare(3, &[Op::Add(4), Op::Mul(2), Op::Sub(1)]);
        assert!(q.ends_with("(3 + 4) * 2 - 1?"), "{q}");
    }

    #[test]
    fn jsonl_export_has_id_level_question_and_answer() {
        let line = to_jsonl(&generate(Split::Test, 1).unwrap()[..1]);
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        for k in ["id", "level", "question", "answer"] {
            assert!(v.get(k).is_some(), "{k}");
        }
    }
}
