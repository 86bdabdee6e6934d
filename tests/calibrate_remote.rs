//! `ponder calibrate` for a model whose policy and PRM are both remote:
//! ponder-arith generates on another ponder (over `/v1/completions`), a
//! tiny PRM scores on a third (over `/pooling`), and calibration collects
//! Monte-Carlo labels through the engine, fits a quantile map of the PRM's
//! P(good), and writes the report; a configuration naming the map then
//! scores with calibrated quantiles.

mod common;

use common::{TestServer, ponder_cli as ponder};
use ponder::config::{Config, Overrides, PrmConfig, ServedPrm};
use ponder::prm::ScoreItem;
use ponder::prm::head::HeadOutput;
use ponder::prm::quantile_map::QuantileMap;

#[test]
fn a_remote_prm_is_calibrated_on_labels_drawn_through_the_remote_engine() {
    let arith = concat!(env!("CARGO_MANIFEST_DIR"), "/models/ponder-arith");
    // The engine: a ponder serving ponder-arith.
    let mut engine = Config::default();
    engine.models.retain(|m| m.id == "ponder-arith");
    let engine = TestServer::start(engine);
    // The PRM: a ponder serving a tiny random PRM on /pooling.
    let dir = tempfile::tempdir().unwrap();
    let prm_dir = dir.path().join("prm");
    std::fs::create_dir(&prm_dir).unwrap();
    common::write_prm(&prm_dir);
    let mut prm = Config::default();
    prm.models.clear();
    prm.prms = vec![ServedPrm { id: "tiny-prm".into(), model: prm_dir.clone(), lora: None }];
    let prm = TestServer::start(prm);

    let remote_model = |calibration: &str| {
        format!(
            "[[models]]\nid = \"arith-remote\"\ntokenizer = {arith:?}\n\
             backend = {{ kind = \"openai\", url = \"{}/v1\", model = \"ponder-arith\" }}\n\
             prm = {{ remote = \"{}\", format = \"vllm_pooling\", model = \"tiny-prm\"{calibration} }}\n",
            engine.base, prm.base
        )
    };
    let config = dir.path().join("ponder.toml");
    std::fs::write(&config, remote_model("")).unwrap();
    let out = dir.path().join("calibration");
    let (ok, stdout, stderr) = ponder(&[
        "calibrate",
        "--config",
        config.to_str().unwrap(),
        "--model",
        "arith-remote",
        "--per-level",
        "2",
        "--eval-per-level",
        "1",
        "--n-val",
        "2",
        "--n-mc",
        "3",
        "--max-prefix",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let map_path = out.join("prm_quantile_map.json");
    assert!(stdout.contains("serve it with: prm = { remote = "), "{stdout}");
    assert!(stdout.contains("calibration = "), "{stdout}");

    // The labels came through the engine: every calibration question's
    // empty prefix, each with its N_MC continuations.
    let labels = std::fs::read_to_string(out.join("labels_calib.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = labels.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.iter().filter(|r| r["k"] == 0).count(), 12, "2 questions at each of 6 levels");
    assert!(rows.iter().filter(|r| r["final_answer"] == false).all(|r| r["n_mc"] == 3));
    assert!(rows.iter().any(|r| r["k"].as_u64().unwrap() > 0), "trajectories were extended step by step");
    // ponder-arith solves level 1 nearly always: the labels are its own.
    let level1: Vec<f64> = rows
        .iter()
        .filter(|r| r["level"] == 1 && r["k"] == 0)
        .map(|r| r["success"].as_f64().unwrap())
        .collect();
    assert!(level1.iter().sum::<f64>() / level1.len() as f64 >= 0.5, "{level1:?}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["head"]["kind"], "remote_prm_quantile_map", "{report}");
    for level in report["head"]["fit_pinball"].as_array().unwrap() {
        let (raw, fitted) = (level["raw"].as_f64().unwrap(), level["fitted"].as_f64().unwrap());
        assert!(fitted <= raw + 1e-9, "the map never fits worse than P(good) itself: {level}");
    }
    for method in ["calibrated", "raw", "platt", "isotonic", "histogram"] {
        assert!(report["methods"][method]["brier"].as_f64().is_some(), "{method}: {report}");
    }
    let map = QuantileMap::load(&map_path).unwrap();

    // A configuration naming the map loads, and its PRM answers with the
    // map's quantiles of the server's P(good).
    std::fs::write(&config, remote_model(&format!(", calibration = {:?}", map_path.to_str().unwrap())))
        .unwrap();
    let c = Config::load(Some(&config), [], &Overrides::default()).unwrap();
    let Some(prm_config) = &c.models[0].prm else { panic!("a PRM") };
    assert!(
        matches!(prm_config, PrmConfig::Remote(r) if r.calibration.as_deref() == Some(map_path.as_path()))
    );
    let scorer = ponder::prm::load(prm_config, 0, HeadOutput::Calibrated).unwrap();
    let steps = vec!["3 + 4 = 7".to_string()];
    let item = ScoreItem { question: "What is 3 + 4?", steps: &steps, hidden: None, logprobs: &[] };
    let s = scorer.score(&[item]).unwrap()[0];
    assert_eq!(s.quantiles, map.apply(s.raw.unwrap()));
    let raw = ponder::prm::load(prm_config, 0, HeadOutput::Raw).unwrap().score(&[item]).unwrap()[0];
    assert_eq!(raw.quantiles, ponder::prm::Quantiles::point(s.raw.unwrap()), "raw output skips the map");
}
