//! The shipped verifier PRM for ponder-arith on held-out labels: its raw
//! form (Math-Shepherd hard labels, binary loss) overestimates the policy's
//! success probability, and its calibrated quantile head does not; and it
//! ranks finished solutions by whether they are right.

use std::collections::HashMap;
use std::path::PathBuf;

use ponder::arith::task::{self, Split};
use ponder::calibrate::labels::LabelRow;
use ponder::calibrate::metrics::{auroc, over_under};
use ponder::prm::model_prm::{HeadChoice, ModelPrm, ModelPrmOptions};
use ponder::prm::{ScoreItem, Scorer};

fn verifier_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/ponder-arith-verifier")
}

fn load(head: HeadChoice) -> ModelPrm {
    ModelPrm::load(&verifier_dir(), &ModelPrmOptions { head, lora: None }).unwrap()
}

/// 600 prefixes of the test split's Monte-Carlo labels (a fixed random
/// sample of `models/ponder-arith/calibration/labels_test.jsonl.gz`, prefixes
/// without the final answer, as the calibration report uses).
fn heldout() -> Vec<LabelRow> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/heldout_labels.jsonl");
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// (raw P(good), calibrated mean) of every row.
fn scores(rows: &[LabelRow]) -> (Vec<f64>, Vec<f64>) {
    let questions: HashMap<String, String> =
        task::generate(Split::Test, 50).unwrap().into_iter().map(|p| (p.id, p.question)).collect();
    let calibrated =
        load(HeadChoice::Trained(verifier_dir().join("calibration/prm_quantile_head.safetensors")));
    let (mut raw, mut cal) = (Vec::new(), Vec::new());
    for chunk in rows.chunks(32) {
        let items: Vec<ScoreItem<'_>> = chunk
            .iter()
            .map(|r| ScoreItem {
                question: &questions[&r.question_id],
                steps: &r.prefix,
                hidden: None,
                logprobs: &[],
            })
            .collect();
        for s in calibrated.score(&items).unwrap() {
            raw.push(s.raw.unwrap() as f64);
            cal.push(s.quantiles.mean() as f64);
        }
    }
    (raw, cal)
}

#[test]
fn the_raw_verifier_overestimates_held_out_labels_and_the_calibrated_one_does_not() {
    let rows = heldout();
    let label: Vec<f64> = rows.iter().map(|r| r.success).collect();
    let (raw, cal) = scores(&rows);
    let raw_ou = over_under(&raw, &label);
    let cal_ou = over_under(&cal, &label);
    assert!(raw_ou.over > 2.0 * raw_ou.under, "raw: over {:.3}, under {:.3}", raw_ou.over, raw_ou.under);
    assert!(
        cal_ou.over < 1.5 * cal_ou.under && cal_ou.over < raw_ou.over / 2.0,
        "calibrated: over {:.3}, under {:.3} (raw over {:.3})",
        cal_ou.over,
        cal_ou.under,
        raw_ou.over
    );
    // Calibration keeps the ranking: good prefixes still score above bad ones.
    let good: Vec<bool> = label.iter().map(|&y| y >= 0.5).collect();
    assert!(auroc(&cal, &good).unwrap() > 0.85, "AUROC {:?}", auroc(&cal, &good));
}

#[test]
fn a_right_solution_scores_above_the_same_solution_with_one_wrong_digit() {
    let prm = load(HeadChoice::TwoClass);
    let mut wins = 0;
    let problems: Vec<_> =
        task::generate(Split::Test, 4).unwrap().into_iter().filter(|p| p.level >= 3).collect();
    for p in &problems {
        let right = p.steps();
        let mut wrong = right.clone();
        // The first step's result, its last digit changed.
        let (lhs, result) = wrong[0].rsplit_once(' ').unwrap();
        let digit = result.chars().last().unwrap().to_digit(10).unwrap();
        wrong[0] = format!("{lhs} {}{}", &result[..result.len() - 1], (digit + 3) % 10);
        let items = [
            ScoreItem { question: &p.question, steps: &right, hidden: None, logprobs: &[] },
            ScoreItem { question: &p.question, steps: &wrong, hidden: None, logprobs: &[] },
        ];
        let s = prm.score(&items).unwrap();
        wins += usize::from(s[0].raw.unwrap() > s[1].raw.unwrap());
    }
    assert!(wins * 10 >= problems.len() * 9, "{wins} of {}", problems.len());
}
