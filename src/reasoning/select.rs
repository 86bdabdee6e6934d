//! Choosing answers among candidates: the best PRM score, a PRM-weighted
//! vote over extracted answers, or a majority vote.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{Candidate, Select};

/// How answers are read out of a trajectory's text for voting and for
/// telling candidates apart; a per-model setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum AnswerFormat {
    /// `The answer is N`, else the last number in the text; else the
    /// trimmed text (arithmetic and GSM8K-style models such as ponder-arith).
    LastNumber,
    /// The content of the last `\boxed{...}` (MATH-style models such as
    /// Qwen2.5-Math); else the trimmed text.
    Boxed,
    /// The whole answer, trimmed, whitespace runs collapsed (free-form chat
    /// models; the default for a model nobody configured).
    #[default]
    Text,
}

impl AnswerFormat {
    pub fn name(self) -> &'static str {
        match self {
            AnswerFormat::LastNumber => "last_number",
            AnswerFormat::Boxed => "boxed",
            AnswerFormat::Text => "text",
        }
    }

    /// The key answers are grouped by.
    pub fn key(self, text: &str) -> String {
        let whole = || text.split_whitespace().collect::<Vec<_>>().join(" ");
        match self {
            AnswerFormat::LastNumber => {
                crate::arith::task::extract_answer(text).map_or_else(whole, |n| n.to_string())
            }
            AnswerFormat::Boxed => last_boxed(text).map_or_else(whole, |b| b.split_whitespace().collect()),
            AnswerFormat::Text => whole(),
        }
    }
}

/// The content of the last `\boxed{...}`, braces balanced.
fn last_boxed(text: &str) -> Option<String> {
    let start = text.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1usize;
    for (i, ch) in text[start..].char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(text[start..start + i].to_string());
                }
            }
            _ => {}
        }
    }
    None
}

/// The key of ponder-arith's answers (`The answer is N`, else the last number).
pub fn answer_key(text: &str) -> String {
    AnswerFormat::LastNumber.key(text)
}

fn q50(c: &Candidate) -> f64 {
    c.score.map_or(0.0, |s| s.quantiles.q50 as f64)
}

/// Up to `n` candidates with distinct answers, best first.
pub fn choose(candidates: &[Candidate], how: Select, n: usize) -> Vec<Candidate> {
    // Per answer: (weight, best member).
    let mut groups: HashMap<&str, (f64, usize, &Candidate)> = HashMap::new();
    for c in candidates {
        let g = groups.entry(c.answer.as_str()).or_insert((0.0, 0, c));
        g.0 += q50(c);
        g.1 += 1;
        if q50(c) > q50(g.2) {
            g.2 = c;
        }
    }
    let mut ranked: Vec<(f64, f64, &Candidate)> = groups
        .into_values()
        .map(|(sum, count, best)| match how {
            Select::PrmMax => (q50(best), 0.0, best),
            Select::PrmVote => (sum, q50(best), best),
            Select::Majority => (count as f64, sum, best),
        })
        .collect();
    // Ties fall back to the answer text, so the choice is deterministic.
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.total_cmp(&a.1)).then(a.2.answer.cmp(&b.2.answer)));
    // A sample that says nothing (the model ended at once) is no answer: it
    // is returned only when nothing else was drawn.
    if ranked.iter().any(|r| r.2.has_answer()) {
        ranked.retain(|r| r.2.has_answer());
    }
    ranked.into_iter().take(n.max(1)).map(|(_, _, c)| c.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prm::{PrmScore, Quantiles};

    fn cand(answer: &str, q: f32) -> Candidate {
        Candidate {
            text: format!("The answer is {answer}."),
            answer: answer.into(),
            score: Some(PrmScore { quantiles: Quantiles::point(q), raw: None }),
            tokens: 5,
            steps: 1,
            ended: true,
        }
    }

    #[test]
    fn prm_max_vote_and_majority_can_pick_different_answers() {
        let cs =
            [cand("7", 0.9), cand("8", 0.5), cand("8", 0.5), cand("9", 0.3), cand("9", 0.3), cand("9", 0.3)];
        assert_eq!(choose(&cs, Select::PrmMax, 1)[0].answer, "7");
        assert_eq!(choose(&cs, Select::PrmVote, 1)[0].answer, "8", "0.5 + 0.5 beats 0.9 and 0.9");
        assert_eq!(choose(&cs, Select::Majority, 1)[0].answer, "9");
        let top = choose(&cs, Select::PrmMax, 3);
        assert_eq!(top.iter().map(|c| c.answer.as_str()).collect::<Vec<_>>(), ["7", "8", "9"]);
    }

    #[test]
    fn answers_are_keyed_by_the_final_number() {
        assert_eq!(answer_key("2 + 2 = 4\n\nThe answer is 4."), "4");
        assert_eq!(answer_key("  no number here "), "no number here");
    }

    #[test]
    fn each_answer_format_reads_its_own_kind_of_answer() {
        let math = "We get $x = 3$.\n\nSo the result is $\\boxed{\\frac{1}{2}}$ and not 7.";
        assert_eq!(AnswerFormat::Boxed.key(math), "\\frac{1}{2}");
        assert_eq!(AnswerFormat::LastNumber.key(math), "7");
        assert_eq!(AnswerFormat::Text.key("  Paris,\n  France "), "Paris, France");
        assert_eq!(AnswerFormat::Boxed.key("no box  here"), "no box here", "falls back to the text");
    }

    #[test]
    fn an_empty_answer_is_chosen_only_when_nothing_else_was_drawn() {
        let empty = |q| Candidate { answer: String::new(), text: String::new(), ..cand("x", q) };
        let cs = vec![empty(0.9), cand("7", 0.2), empty(0.8)];
        for how in [Select::PrmMax, Select::PrmVote, Select::Majority] {
            let top = choose(&cs, how, 3);
            assert_eq!(top.len(), 1, "{how:?}");
            assert_eq!(top[0].answer, "7", "{how:?}");
        }
        let top = choose(&[empty(0.1), empty(0.3)], Select::PrmMax, 2);
        assert_eq!((top.len(), top[0].answer.as_str()), (1, ""));
    }
}
