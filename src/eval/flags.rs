//! `ponder eval`'s flags before any work: ranges, flags that nothing would
//! read with the others given (an error, not ignored), and what runs on a
//! model with or without a PRM — the server's rules for a request's
//! `reasoning` object (`src/validation/`), the flag named instead of the
//! field.

use super::{EvalArgs, MAX_SEQUENCES};
use crate::prm::head::HeadOutput;
use crate::reasoning::{BudgetRule, Select, Strategy};

/// What a best-of-N or beam run does, the defaults filled in for the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Choice {
    pub(super) strategy: Strategy,
    pub(super) adaptive: bool,
    pub(super) rule: BudgetRule,
    pub(super) select: Select,
}

/// The checks that need no model: ranges, then whether every flag given is
/// read by the strategy and budget given.
pub(super) fn check(args: &EvalArgs) -> anyhow::Result<()> {
    check_ranges(args)?;
    anyhow::ensure!(
        (args.plot.is_none() && args.questions_out.is_none() && args.questions_in.is_none()) || args.sweep,
        "--plot, --questions-out and --questions-in belong to the sweep: add --sweep"
    );
    check_strategy_flags(args)?;
    if args.strategy() != Strategy::Single && !args.sweep {
        check_budget_flags(args)?;
    }
    Ok(())
}

/// The flags that are no reasoning knobs (`check_knobs` has those).
fn check_ranges(args: &EvalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.per_level >= 1, "--per-level must be at least 1, got 0");
    if let Some(n) = args.samples {
        // The same cap as --max-samples: k samples of a question are k sequences at once.
        anyhow::ensure!(
            (1..=MAX_SEQUENCES).contains(&n),
            "--samples must be between 1 and {MAX_SEQUENCES}, got {n}"
        );
    }
    anyhow::ensure!(args.concurrent >= 1, "--concurrent must be at least 1, got 0");
    let range = crate::validation::TEMPERATURE_RANGE;
    anyhow::ensure!(
        range.contains(&(args.temperature as f64)),
        "--temperature must be between {} and {}, got {}",
        range.start(),
        range.end(),
        args.temperature
    );
    anyhow::ensure!(args.max_tokens >= 1, "--max-tokens must be at least 1, got 0");
    Ok(())
}

/// The first flag of `flags` given.
fn first_given(flags: &[(&'static str, bool)]) -> Option<&'static str> {
    flags.iter().find(|(_, given)| *given).map(|(flag, _)| *flag)
}

/// Flags the strategy does not read. (`--sweep`'s own conflicts are
/// clap's: they hold whatever the strategy.)
fn check_strategy_flags(args: &EvalArgs) -> anyhow::Result<()> {
    if let Some(s) = args.strategy.filter(|&s| args.sweep && s != Strategy::BestOfN) {
        anyhow::bail!(
            "--sweep replays one fixed best-of-N run, and --strategy {} cannot be replayed from one: \
             drop --sweep to run it",
            s.name()
        );
    }
    let beam_only = [
        ("--beam-width", args.beam_width.is_some()),
        ("--beams", args.beams.is_some()),
        ("--prune-every", args.prune_every.is_some()),
    ];
    match args.strategy() {
        Strategy::Single => {
            let search = [
                ("--adaptive", args.adaptive.is_some()),
                ("--max-samples", args.max_samples.is_some()),
                ("--confidence", args.confidence.is_some()),
                ("--budget-quantile", args.budget_quantile.is_some()),
                ("--budget-rule", args.rule.is_some()),
                ("--round-size", args.round_size.is_some()),
                ("--give-up-gain", args.give_up_gain.is_some()),
                ("--give-up-plausible", args.give_up_plausible.is_some()),
                ("--select", args.select.is_some()),
                ("--prm", args.prm.is_some()),
                ("--prm-path", args.prm_path.is_some()),
            ];
            let default = if args.strategy.is_none() { " (the default)" } else { "" };
            if let Some(flag) = first_given(&search) {
                anyhow::bail!(
                    "{flag} applies to best_of_n and beam search, and --strategy is single{default}, \
                     which draws --samples independent samples: add --strategy best_of_n or beam, or drop {flag}"
                );
            }
            if let Some(flag) = first_given(&beam_only) {
                anyhow::bail!(
                    "{flag} applies to --strategy beam, and --strategy is single{default}: add --strategy beam, \
                     or drop {flag}"
                );
            }
        }
        strategy => {
            if args.samples.is_some() {
                anyhow::bail!(
                    "--samples is the single strategy's samples per question; --strategy {} takes \
                     its budget from --max-samples",
                    strategy.name()
                );
            }
            if let Some(flag) = first_given(&beam_only).filter(|_| strategy == Strategy::BestOfN) {
                anyhow::bail!("{flag} applies to --strategy beam, and --strategy is best_of_n: drop {flag}");
            }
        }
    }
    Ok(())
}

/// Best-of-N and beam search: flags an adaptive budget reads, given with
/// a fixed one, and rules the strategy has no use for.
fn check_budget_flags(args: &EvalArgs) -> anyhow::Result<()> {
    let strategy = args.strategy();
    if strategy == Strategy::Beam && args.give_up_plausible.is_some() {
        anyhow::bail!(
            "--give-up-plausible applies to best_of_n's give_up rule; beam search does not read it"
        );
    }
    if strategy == Strategy::Beam && args.rule == Some(BudgetRule::Vote) {
        anyhow::bail!(
            "--budget-rule vote applies to best_of_n; beam search takes ias, sequential or give_up"
        );
    }
    let adaptive_only = [
        ("--budget-rule", args.rule.is_some()),
        ("--confidence", args.confidence.is_some()),
        ("--budget-quantile", args.budget_quantile.is_some()),
        ("--round-size", args.round_size.is_some()),
        ("--give-up-gain", args.give_up_gain.is_some()),
        ("--give-up-plausible", args.give_up_plausible.is_some()),
    ];
    match first_given(&adaptive_only) {
        Some(flag) if !args.adaptive() => anyhow::bail!(
            "{flag} sets how an adaptive budget stops, and --adaptive is false (a fixed budget of \
             --max-samples): drop {flag} or set --adaptive true"
        ),
        _ => Ok(()),
    }
}

/// The strategy, budget, rule and selection of a best-of-N, beam or sweep
/// run on a model with or without a PRM. Left out, the rule and selection
/// are the served defaults, and without a PRM the server's fallbacks
/// (`vote`, `majority`); asked for, one that needs a PRM the model lacks
/// is an error naming the flag.
pub(super) fn choose(args: &EvalArgs, has_prm: bool) -> anyhow::Result<Choice> {
    let d = args.defaults;
    let no_prm = |flag: &str, what: &str| {
        anyhow::anyhow!(
            "{flag}: {what} needs a PRM and model {:?} has none (configure `prm` for it, pass \
             --prm-path, or use another model)",
            args.model
        )
    };
    let strategy = args.strategy();
    if args.sweep && !has_prm {
        return Err(no_prm(
            "--sweep",
            "the sweep (its fixed curve's selection and its budget rules read PRM scores)",
        ));
    }
    if strategy == Strategy::Beam && !has_prm {
        return Err(no_prm("--strategy beam", "beam search"));
    }
    if let (Some(output), false) = (args.prm, has_prm) {
        let name = match output {
            HeadOutput::Calibrated => "calibrated",
            HeadOutput::Raw => "raw",
        };
        return Err(no_prm(&format!("--prm {name}"), "choosing the PRM's output"));
    }
    let adaptive = strategy != Strategy::Single && !args.sweep && args.adaptive();
    let rule = match args.rule {
        Some(r) if adaptive && r.needs_prm() && !has_prm => {
            return Err(no_prm(
                &format!("--budget-rule {}", r.name()),
                &format!("the {:?} budget rule", r.name()),
            ));
        }
        Some(r) => r,
        None if d.budget_rule.needs_prm() && !has_prm => BudgetRule::Vote,
        // As the server: a vote has nothing to count in a beam search.
        None if strategy == Strategy::Beam && !d.budget_rule.needs_prm() => BudgetRule::Ias,
        None => d.budget_rule,
    };
    let select = match args.select {
        Some(s) if s.needs_prm() && !has_prm => {
            return Err(no_prm(&format!("--select {}", s.name()), &format!("select {:?}", s.name())));
        }
        Some(s) => s,
        None if d.select.needs_prm() && !has_prm => Select::Majority,
        None => d.select,
    };
    Ok(Choice { strategy, adaptive, rule, select })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(flags: &[&str]) -> Result<EvalArgs, clap::Error> {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            eval: EvalArgs,
        }
        let args = ["ponder", "--model", "m"].into_iter().chain(flags.iter().copied());
        Cli::try_parse_from(args).map(|c| c.eval)
    }

    /// The error `ponder eval` gives for `flags`, from clap or the checks.
    fn error(flags: &[&str]) -> String {
        match parse(flags) {
            Err(e) => e.to_string(),
            Ok(args) => check(&args).expect_err(&format!("{flags:?} was accepted")).to_string(),
        }
    }

    #[test]
    fn flags_that_nothing_reads_with_the_others_given_are_errors_naming_both() {
        let cases: [(&[&str], &[&str]); 15] = [
            (&["--jsonl", "q.jsonl", "--split", "calib"], &["--jsonl", "--split"]),
            (&["--jsonl", "q.jsonl", "--per-level", "3"], &["--jsonl", "--per-level"]),
            (&["--sweep", "--strategy", "beam"], &["--sweep", "--strategy beam"]),
            (&["--sweep", "--budget-rule", "ias"], &["--sweep", "--budget-rule"]),
            (&["--sweep", "--questions-in", "q", "--temperature", "1"], &["--questions-in", "--temperature"]),
            (&["--sweep", "--questions-in", "q", "--seed", "1"], &["--questions-in", "--seed"]),
            (&["--sweep", "--questions-in", "q", "--samples", "2"], &["--samples"]),
            (&["--sweep", "--questions-in", "q", "--adaptive", "false"], &["--adaptive"]),
            (&["--strategy", "best_of_n", "--samples", "2"], &["--samples", "best_of_n", "--max-samples"]),
            (
                &["--strategy", "best_of_n", "--adaptive", "false", "--budget-rule", "ias"],
                &["--budget-rule", "--adaptive is false"],
            ),
            (&["--strategy", "single", "--prm-path", "h"], &["--prm-path", "--strategy is single"]),
            (
                &["--beams", "2"],
                &["--beams applies to --strategy beam", "--strategy is single (the default)"],
            ),
            (&["--strategy", "single", "--confidence", "0.5"], &["--confidence", "single"]),
            (&["--select", "majority"], &["--select", "single"]),
            (&["--strategy", "best_of_n", "--beam-width", "2"], &["--beam-width", "--strategy beam"]),
        ];
        for (flags, wants) in cases {
            let e = error(flags);
            for want in wants {
                assert!(e.contains(want), "{flags:?}: {e}");
            }
        }
    }

    #[test]
    fn flags_left_at_their_defaults_conflict_with_nothing() {
        for flags in [
            &["--sweep", "--questions-in", "q"][..],
            &["--jsonl", "q.jsonl", "--strategy", "best_of_n"],
            &[
                "--strategy",
                "beam",
                "--adaptive",
                "false",
                "--beams",
                "2",
                "--beam-width",
                "2",
                "--max-samples",
                "4",
            ],
            &[
                "--strategy",
                "beam",
                "--budget-rule",
                "sequential",
                "--confidence",
                "0.9",
                "--give-up-gain",
                "0.01",
                "--round-size",
                "2",
            ],
            &[
                "--strategy",
                "best_of_n",
                "--adaptive",
                "true",
                "--budget-rule",
                "ias",
                "--confidence",
                "0.99",
            ],
            &["--strategy", "single", "--samples", "16", "--temperature", "0.7"],
            &[
                "--split",
                "calib",
                "--per-level",
                "50",
                "--sweep",
                "--temperature",
                "1",
                "--questions-out",
                "q",
            ],
            &["--sweep", "--strategy", "best_of_n", "--max-samples", "8", "--select", "prm_vote"],
        ] {
            let args = parse(flags).unwrap_or_else(|e| panic!("{flags:?}: {e}"));
            check(&args).unwrap_or_else(|e| panic!("{flags:?}: {e}"));
        }
    }

    #[test]
    fn samples_and_concurrent_out_of_range_are_errors_naming_the_flag_the_limit_and_the_value() {
        assert!(error(&["--samples", "100000"]).contains("--samples must be between 1 and 1024, got 100000"));
        assert!(error(&["--samples", "0"]).contains("--samples must be between 1 and 1024, got 0"));
        assert!(error(&["--concurrent", "0"]).contains("--concurrent must be at least 1, got 0"));
        assert!(error(&["--per-level", "0"]).contains("--per-level must be at least 1, got 0"));
    }

    #[test]
    fn flags_left_out_take_the_configured_models_reasoning_defaults_and_a_paths_the_built_in_ones() {
        let smol =
            super::super::resolve_entry(crate::config::DEFAULT_MODEL_ID, None).expect("built-in config");
        let mut args = parse(&["--strategy", "best_of_n"]).expect("flags parse");
        args.defaults = smol.reasoning;
        let c = choose(&args, false).expect("no PRM needed");
        assert_eq!((c.rule, c.select), (BudgetRule::Vote, Select::Majority));
        assert_eq!(args.round_knobs(Strategy::BestOfN).confidence, 0.95);
        // The same defaults with a PRM: a vote cannot run a beam search.
        let mut beam = parse(&["--strategy", "beam"]).expect("flags parse");
        beam.defaults = smol.reasoning;
        assert_eq!(choose(&beam, true).expect("with a PRM").rule, BudgetRule::Ias);

        let path = super::super::resolve_entry("some/dir", None).expect("a path is taken as is");
        assert_eq!(path.path, std::path::PathBuf::from("some/dir"));
        let mut args = parse(&["--strategy", "best_of_n"]).expect("flags parse");
        args.defaults = path.reasoning;
        assert_eq!(args.round_knobs(Strategy::BestOfN).confidence, 0.9);
        assert_eq!(choose(&args, true).expect("with a PRM").rule, BudgetRule::GiveUp);
    }

    #[test]
    fn a_model_without_a_prm_falls_back_to_vote_and_majority_unless_asked_for_more() {
        let choose = |flags: &[&str], has_prm| choose(&parse(flags).expect("flags parse"), has_prm);
        let c = choose(&["--strategy", "best_of_n"], false).expect("no PRM needed");
        assert_eq!((c.adaptive, c.rule, c.select), (true, BudgetRule::Vote, Select::Majority));
        let c = choose(&["--strategy", "best_of_n", "--adaptive", "false"], false).expect("fixed best-of-N");
        assert_eq!((c.adaptive, c.select), (false, Select::Majority));
        let c = choose(&["--strategy", "best_of_n"], true).expect("with a PRM");
        assert_eq!((c.rule, c.select), (BudgetRule::GiveUp, Select::PrmMax));
        let cases: [(&[&str], &str); 6] = [
            (&["--strategy", "best_of_n", "--prm", "raw"], "--prm raw: choosing the PRM's output"),
            (&["--strategy", "best_of_n", "--select", "prm_vote"], "--select prm_vote: select \"prm_vote\""),
            (
                &["--strategy", "best_of_n", "--budget-rule", "ias"],
                "--budget-rule ias: the \"ias\" budget rule",
            ),
            (
                &["--strategy", "best_of_n", "--budget-rule", "give_up", "--select", "majority"],
                "--budget-rule give_up",
            ),
            (&["--strategy", "beam"], "--strategy beam: beam search"),
            (&["--sweep"], "--sweep: the sweep"),
        ];
        for (flags, want) in cases {
            let e = choose(flags, false).expect_err(&format!("{flags:?} ran without a PRM")).to_string();
            assert!(e.contains(want) && e.contains("needs a PRM and model \"m\" has none"), "{flags:?}: {e}");
        }
    }

    /// The flags of every `ponder eval --model ponder-arith` command line in
    /// the README, docs/method.md and reports/ponder-arith (its READMEs and
    /// timings files), placeholders (`--temperature T`) given a value.
    fn documented() -> Vec<String> {
        const COMMAND: &str = "ponder eval --model ponder-arith ";
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = vec![root.join("README.md"), root.join("docs/method.md")];
        let mut dirs = vec![root.join("reports/ponder-arith")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).expect("reports/ponder-arith is committed") {
                let path = entry.expect("a readable folder").path();
                match path.extension().and_then(|e| e.to_str()) {
                    _ if path.is_dir() => dirs.push(path),
                    Some("md" | "txt") => files.push(path),
                    _ => {}
                }
            }
        }
        let mut lines = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file).expect("a committed text file");
            for (at, _) in text.match_indices(COMMAND) {
                let rest = &text[at + COMMAND.len()..];
                let end = rest.find(['>', '`', '|', '\n']).unwrap_or(rest.len());
                let flags = rest[..end].split_whitespace().map(|w| match w {
                    "T" => "0.7",
                    "C" => "0.9",
                    "RULE" => "give_up",
                    w => w,
                });
                lines.push(flags.collect::<Vec<_>>().join(" "));
            }
        }
        lines.sort();
        lines.dedup();
        lines
    }

    #[test]
    fn every_documented_command_line_still_parses_and_passes_the_flag_checks() {
        let lines = documented();
        assert!(lines.len() >= 30, "found only {} command lines: {lines:?}", lines.len());
        for line in &lines {
            let flags: Vec<&str> = line.split_whitespace().collect();
            let args = parse(&flags).unwrap_or_else(|e| panic!("{line}: {e}"));
            check(&args).unwrap_or_else(|e| panic!("{line}: {e}"));
            super::super::check_knobs(&args).unwrap_or_else(|e| panic!("{line}: {e}"));
        }
    }
}
