//! The accuracy-vs-tokens frontier of each run family (a budget rule read
//! through one estimator), and the best accuracy each family reaches within
//! the token budgets of the fixed curve.

use std::collections::BTreeMap;

use serde::Serialize;

use super::points::{Estimator, SweepPoint};
use crate::reasoning::rules::BudgetRule;

/// A rule with the estimator it reads (`NoPrm` for `vote`).
pub(super) type Family = (BudgetRule, Estimator);

/// Tokens within this of a budget count as inside it: the fixed curve's own
/// point at N_max sits exactly at 1.0 after a division.
const TOKEN_SLACK: f64 = 1e-9;

/// Every family, in the order reports list them: the calibrated estimator
/// of each PRM rule first, then the raw and oracle ones, then `vote`.
pub(super) fn families() -> Vec<Family> {
    let rules = [BudgetRule::Ias, BudgetRule::Sequential, BudgetRule::GiveUp];
    let mut out = Vec::new();
    for e in [Estimator::Calibrated, Estimator::Raw, Estimator::Oracle] {
        out.extend(rules.iter().map(|&r| (r, e)));
    }
    out.push((BudgetRule::Vote, Estimator::NoPrm));
    out
}

/// "sequential/calibrated", or the rule alone where it reads no PRM.
pub(super) fn family_name((rule, estimator): Family) -> String {
    match estimator {
        Estimator::NoPrm => rule.name().to_string(),
        e => format!("{}/{}", rule.name(), e.name()),
    }
}

fn in_family(p: &SweepPoint, (rule, estimator): Family) -> bool {
    p.rule == Some(rule) && p.estimator == Some(estimator)
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct Frontier {
    pub(super) rule: BudgetRule,
    pub(super) estimator: Estimator,
    /// Cheapest first.
    pub(super) points: Vec<SweepPoint>,
}

/// Each family's Pareto frontier (families without points are left out).
pub(super) fn frontiers(points: &[SweepPoint]) -> Vec<Frontier> {
    families()
        .into_iter()
        .map(|f| Frontier {
            rule: f.0,
            estimator: f.1,
            points: pareto(points.iter().filter(|p| in_family(p, f))),
        })
        .filter(|f| !f.points.is_empty())
        .collect()
}

/// The points no other point beats: none has higher-or-equal accuracy with
/// fewer-or-equal tokens (of identical points, the first is kept).
pub(super) fn pareto<'a>(points: impl Iterator<Item = &'a SweepPoint>) -> Vec<SweepPoint> {
    let mut sorted: Vec<&SweepPoint> = points.collect();
    // Cheapest first and, at equal tokens, the most accurate first, so a
    // point is on the frontier exactly when it beats every point before it.
    sorted.sort_by(|a, b| {
        a.tokens_vs_fixed_max
            .total_cmp(&b.tokens_vs_fixed_max)
            .then(b.summary.accuracy.total_cmp(&a.summary.accuracy))
    });
    let mut best = f64::NEG_INFINITY;
    let mut out = Vec::new();
    for p in sorted {
        if p.summary.accuracy > best {
            best = p.summary.accuracy;
            out.push(p.clone());
        }
    }
    out
}

/// A point named in the equal-token table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct Best {
    pub(super) label: String,
    pub(super) accuracy: f64,
    pub(super) accuracy_ci: [f64; 2],
    pub(super) tokens_vs_fixed_max: f64,
    pub(super) mean_samples: f64,
}

impl From<&SweepPoint> for Best {
    fn from(p: &SweepPoint) -> Self {
        Self {
            label: p.label.clone(),
            accuracy: p.summary.accuracy,
            accuracy_ci: p.accuracy_ci,
            tokens_vs_fixed_max: p.tokens_vs_fixed_max,
            mean_samples: p.summary.mean_samples,
        }
    }
}

/// At the token budget of fixed best-of-N, the fixed accuracy and each
/// family's best point spending at most as much (None: none is that cheap).
#[derive(Debug, Clone, Serialize)]
pub(super) struct EqualTokens {
    pub(super) n: usize,
    pub(super) tokens_vs_fixed_max: f64,
    pub(super) fixed: Best,
    /// By [`family_name`].
    pub(super) best: BTreeMap<String, Option<Best>>,
}

/// The most accurate of `points` within `budget` tokens; of equally
/// accurate ones, the cheapest.
fn best_within<'a>(points: impl Iterator<Item = &'a SweepPoint>, budget: f64) -> Option<&'a SweepPoint> {
    points.filter(|p| p.tokens_vs_fixed_max <= budget + TOKEN_SLACK).max_by(|a, b| {
        a.summary
            .accuracy
            .total_cmp(&b.summary.accuracy)
            .then(b.tokens_vs_fixed_max.total_cmp(&a.tokens_vs_fixed_max))
    })
}

/// One row per point of the fixed curve.
pub(super) fn equal_tokens(fixed: &[SweepPoint], points: &[SweepPoint]) -> Vec<EqualTokens> {
    fixed
        .iter()
        .map(|f| {
            let budget = f.tokens_vs_fixed_max;
            let best = families()
                .into_iter()
                .filter(|&fam| points.iter().any(|p| in_family(p, fam)))
                .map(|fam| {
                    let b = best_within(points.iter().filter(|p| in_family(p, fam)), budget);
                    (family_name(fam), b.map(Best::from))
                })
                .collect();
            EqualTokens { n: f.max_samples, tokens_vs_fixed_max: budget, fixed: Best::from(f), best }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::points::tests::{GRID, questions};
    use crate::eval::points::{Sweep, specs};
    use crate::eval::search::Summary;

    fn point(label: &str, family: Option<Family>, accuracy: f64, tokens: f64) -> SweepPoint {
        SweepPoint {
            label: label.into(),
            rule: family.map(|f| f.0),
            estimator: family.map(|f| f.1),
            confidence: family.map(|_| 0.9),
            round: None,
            give_up_gain: None,
            give_up_plausible: None,
            max_samples: 8,
            summary: Summary {
                questions: 10,
                accuracy,
                mean_samples: 8.0 * tokens,
                mean_generated_tokens: 100.0 * tokens,
                budget_fraction: tokens,
                mean_prm_evaluations: 0.0,
            },
            accuracy_ci: [accuracy - 0.1, accuracy + 0.1],
            tokens_vs_fixed_max: tokens,
            stops: BTreeMap::new(),
            samples: Vec::new(),
            correct: Vec::new(),
        }
    }

    const SEQ: Family = (BudgetRule::Sequential, Estimator::Calibrated);
    const VOTE: Family = (BudgetRule::Vote, Estimator::NoPrm);

    #[test]
    fn the_frontier_keeps_only_points_nothing_cheaper_matches() {
        let ps = [
            point("a", Some(SEQ), 0.5, 0.1),
            point("b", Some(SEQ), 0.4, 0.2), // dearer and worse than a
            point("c", Some(SEQ), 0.7, 0.3),
            point("d", Some(SEQ), 0.7, 0.5), // as good as c, dearer
            point("e", Some(SEQ), 0.6, 0.3), // as dear as c, worse
            point("f", Some(SEQ), 0.8, 0.9),
            point("v", Some(VOTE), 0.9, 0.05), // another family
        ];
        let front = frontiers(&ps);
        assert_eq!(front.len(), 2);
        let seq: Vec<&str> = front[0].points.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(seq, ["a", "c", "f"]);
        assert_eq!((front[1].rule, front[1].estimator), VOTE);
    }

    #[test]
    fn the_equal_token_table_picks_the_best_affordable_point_per_family() {
        let fixed = [point("fixed N=1", None, 0.3, 0.25), point("fixed N=2", None, 0.5, 1.0)];
        let ps = [
            point("cheap", Some(SEQ), 0.4, 0.2),
            point("cheaper tie", Some(SEQ), 0.4, 0.1),
            point("good", Some(SEQ), 0.6, 0.6),
            point("best but dear", Some(SEQ), 0.9, 1.01),
            point("vote", Some(VOTE), 0.55, 0.5),
        ];
        let table = equal_tokens(&fixed, &ps);
        assert_eq!(table.iter().map(|e| e.n).collect::<Vec<_>>(), [8, 8]);
        let seq = family_name(SEQ);
        assert_eq!(table[0].fixed.label, "fixed N=1");
        assert_eq!(table[0].best[&seq].as_ref().map(|b| b.label.as_str()), Some("cheaper tie"));
        assert_eq!(table[0].best["vote"], None, "nothing of vote's is that cheap");
        assert_eq!(table[1].best[&seq].as_ref().map(|b| b.label.as_str()), Some("good"));
        assert_eq!(table[1].best["vote"].as_ref().map(|b| b.accuracy), Some(0.55));
        assert_eq!(table[0].best.len(), 2, "only families with points");
    }

    #[test]
    fn at_full_budget_every_estimator_reaches_the_hard_answer_but_raw_does_not() {
        let qs = questions();
        let sweep = Sweep::new(&qs, GRID);
        let fixed = sweep.fixed_curve();
        let points: Vec<SweepPoint> = specs(&GRID).iter().map(|s| sweep.rule_point(s)).collect();
        let table = equal_tokens(&fixed, &points);
        let full = table.last().expect("four budgets");
        assert_eq!(full.fixed.accuracy, 1.0);
        let acc = |name: &str| full.best[name].as_ref().map(|b| b.accuracy);
        for name in ["ias/calibrated", "sequential/calibrated", "ias/oracle", "sequential/oracle"] {
            assert_eq!(acc(name), Some(1.0), "{name}");
        }
        // The raw head scores the hard question's wrong answers above its
        // right one, so PRM selection with it never picks the right answer.
        assert!(table.iter().all(|e| e.best["ias/raw"].as_ref().is_none_or(|b| b.accuracy == 0.5)));
    }
}
