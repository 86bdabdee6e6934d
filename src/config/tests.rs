//! Tests of configuration loading: file, environment and flags, and the checks that stop start-up.

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn the_shipped_config_file_equals_the_built_in_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ponder.toml");
    let cfg = Config::load(Some(&path), [], &Overrides::default()).unwrap();
    assert_eq!(cfg, Config::default());
}

#[test]
fn environment_overrides_the_file_and_flags_override_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, "[server]\nport = 9000\n[queue]\ncapacity = 5\n").unwrap();
    let cfg = Config::load(
        Some(&file),
        env(&[("PONDER_QUEUE_CAPACITY", "7"), ("PONDER_SERVER_API_KEYS", "a,b"), ("HOME", "/x")]),
        &Overrides { port: Some(9100), ..Default::default() },
    )
    .unwrap();
    assert_eq!(cfg.queue.capacity, 7);
    assert_eq!(cfg.server.port, 9100);
    assert_eq!(cfg.server.api_keys, ["a", "b"]);
    assert!(!cfg.to_redacted_toml().contains("\"a\""), "keys never printed");
}

#[test]
fn a_remote_model_needs_an_http_url_and_a_tokenizer_and_reads_its_key_from_the_named_variable() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    let load = |model: &str, env_pairs: &[(&str, &str)]| {
        std::fs::write(&file, format!("[[models]]\nid = \"r\"\n{model}")).unwrap();
        Config::load(Some(&file), env(env_pairs), &Overrides::default())
    };
    let backend = r#"backend = { kind = "openai", url = "http://gpu:8000/v1", model = "qwen", api_key_env = "ENGINE_KEY" }"#;
    let ok = load(&format!("tokenizer = \"t.json\"\n{backend}\n"), &[("ENGINE_KEY", "s3cret")]).unwrap();
    let m = ok.models.iter().find(|m| m.id == "r").unwrap();
    let BackendConfig::Openai(r) = &m.backend else { panic!("a remote backend: {m:?}") };
    assert_eq!((r.url.as_str(), r.model.as_str(), r.timeout_secs), ("http://gpu:8000/v1", "qwen", 600));
    assert_eq!(r.api_key.as_deref(), Some("s3cret"));
    assert!(!ok.to_redacted_toml().contains("s3cret"), "the key is never printed");
    let err = load(&format!("tokenizer = \"t.json\"\n{backend}\n"), &[]).unwrap_err();
    assert!(err.to_string().contains("ENGINE_KEY"), "{err}");
    let err = load(&format!("{backend}\n"), &[("ENGINE_KEY", "k")]).unwrap_err();
    assert!(err.to_string().contains("needs `tokenizer`"), "{err}");
    let creds = backend.replace("http://", "http://user:pw@");
    let err = load(&format!("tokenizer = \"t.json\"\n{creds}\n"), &[("ENGINE_KEY", "k")]).unwrap_err();
    assert!(
        err.to_string().contains("must not hold credentials") && err.to_string().contains("api_key_env"),
        "{err}"
    );
    let https = backend.replace("http://", "https://");
    let err = load(&format!("tokenizer = \"t.json\"\n{https}\n"), &[("ENGINE_KEY", "k")]).unwrap_err();
    assert!(err.to_string().contains("backend.url") && err.to_string().contains("https://gpu"), "{err}");
    let err = load(
        &format!("tokenizer = \"t.json\"\nprm = \"head.safetensors\"\n{backend}\n"),
        &[("ENGINE_KEY", "k")],
    )
    .unwrap_err();
    assert!(err.to_string().contains("hidden states"), "{err}");
    let err = load("tokenizer = \"t.json\"\n", &[]).unwrap_err();
    assert!(err.to_string().contains("`path` is required"), "{err}");
}

#[test]
fn devices_parse_as_cpu_or_cuda_and_a_build_without_cuda_refuses_a_gpu_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.toml");
    let load = |devices: &str| {
        std::fs::write(&file, format!("[[models]]\nid = \"m\"\npath = \"x.gguf\"\ndevices = {devices}\n"))
            .unwrap();
        Config::load(Some(&file), [], &Overrides::default())
    };
    assert_eq!(load(r#"["cpu", "cpu"]"#).unwrap().models[0].devices, [DeviceKind::Cpu, DeviceKind::Cpu]);
    assert!(load(r#"["gpu0"]"#).unwrap_err().to_string().contains("\"cuda:N\""));
    let gpu = load(r#"["cuda:0", "cuda:1"]"#);
    if cfg!(feature = "cuda") {
        assert_eq!(gpu.unwrap().models[0].devices, [DeviceKind::Cuda(0), DeviceKind::Cuda(1)]);
    } else {
        let err = gpu.unwrap_err().to_string();
        assert!(err.contains("devices") && err.contains("make build-cuda"), "{err}");
    }
}

#[test]
fn a_remote_prm_is_a_table_naming_its_url_and_a_mistyped_one_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    let load = |prm: &str| {
        std::fs::write(&file, format!("[[models]]\nid = \"m\"\npath = \"x.gguf\"\nprm = {prm}\n")).unwrap();
        Config::load(Some(&file), [], &Overrides::default())
    };
    let c = load(r#"{ remote = "http://prm:8001", model = "qwen-prm" }"#).unwrap();
    let want = RemotePrmConfig {
        remote: "http://prm:8001".into(),
        format: PoolingFormat::VllmPooling,
        model: "qwen-prm".into(),
        timeout_secs: 120,
        calibration: None,
    };
    assert_eq!(c.models[0].prm, Some(PrmConfig::Remote(want)));
    let err = load(r#"{ remote = "http://prm:8001", modle = "qwen-prm" }"#).unwrap_err();
    assert!(err.to_string().contains("modle"), "{err}");
    let err = load(r#"{ remote = "http://prm:8001", model = "p", format = "grpc" }"#).unwrap_err();
    assert!(err.to_string().contains("grpc"), "{err}");
    let err = load(r#"{ remote = "http://user:pw@prm:8001", model = "p" }"#).unwrap_err();
    assert!(err.to_string().contains("prm.remote must not hold credentials"), "{err}");
    let err = load(r#"{ remote = "https://prm:8001", model = "p" }"#).unwrap_err();
    assert!(err.to_string().contains("prm.remote must be an http:// URL"), "{err}");
}

#[test]
fn an_empty_environment_list_fails_closed_instead_of_dropping_the_files_api_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, "[server]\napi_keys = [\"k\"]\n").unwrap();
    for empty in ["", " , "] {
        let err = Config::load(Some(&file), env(&[("PONDER_SERVER_API_KEYS", empty)]), &Overrides::default())
            .unwrap_err();
        assert!(
            err.to_string().contains("PONDER_SERVER_API_KEYS") && err.to_string().contains("lists nothing"),
            "{err}"
        );
    }
    let cfg = Config::load(Some(&file), env(&[("PONDER_SERVER_API_KEYS", "k1, k2 ")]), &Overrides::default())
        .unwrap();
    assert_eq!(cfg.server.api_keys, ["k1", "k2"], "each key is trimmed");
}

#[test]
fn limits_that_would_exceed_each_other_or_panic_the_admission_semaphore_stop_start_up() {
    let load = |pairs: &[(&str, &str)]| Config::load(None, env(pairs), &Overrides::default());
    let err = load(&[("PONDER_LIMITS_DEFAULT_MAX_TOKENS", "5000"), ("PONDER_LIMITS_MAX_TOKENS", "4000")])
        .unwrap_err();
    assert!(
        err.to_string().contains("limits.default_max_tokens (5000) exceeds limits.max_tokens (4000)"),
        "{err}"
    );
    let err = load(&[("PONDER_QUEUE_CAPACITY", &i64::MAX.to_string())]).unwrap_err();
    assert!(err.to_string().contains("queue.capacity + queue.max_running must be at most"), "{err}");
    let err = load(&[("PONDER_QUEUE_CAPACITY", "-1")]).unwrap_err();
    assert!(err.to_string().contains("capacity"), "{err}");
}

#[test]
fn unknown_settings_and_bad_values_are_errors_that_name_them() {
    let err = Config::load(None, env(&[("PONDER_QUEUE_CAPACTY", "7")]), &Overrides::default()).unwrap_err();
    assert!(err.to_string().contains("PONDER_QUEUE_CAPACTY"), "{err}");
    let err =
        Config::load(None, env(&[("PONDER_QUEUE_CAPACITY", "many")]), &Overrides::default()).unwrap_err();
    assert!(err.to_string().contains("\"many\" is not an integer"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, "[server]\nprot = 1\n").unwrap();
    let err = Config::load(Some(&file), [], &Overrides::default()).unwrap_err();
    assert!(err.to_string().contains("prot"), "{err}");
}

#[test]
fn a_prm_is_a_head_path_or_a_table_naming_a_separate_prm_model() {
    use crate::prm::model_prm::HeadChoice;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    let toml = "[[models]]\nid = \"a\"\npath = \"x\"\nprm = \"h.safetensors\"\n\
                [[models]]\nid = \"b\"\npath = \"y\"\n[models.prm]\nmodel = \"prm\"\n\
                head = { trained = \"q.safetensors\" }\nlora = \"adapter\"\n\
                [[models]]\nid = \"c\"\npath = \"z\"\nprm = { model = \"prm\" }\n";
    std::fs::write(&file, toml).unwrap();
    let cfg = Config::load(Some(&file), [], &Overrides::default()).unwrap();
    assert_eq!(cfg.models[0].prm, Some(PrmConfig::Head("h.safetensors".into())));
    let want = ModelPrmConfig {
        model: "prm".into(),
        head: HeadChoice::Trained("q.safetensors".into()),
        lora: Some("adapter".into()),
    };
    assert_eq!(cfg.models[1].prm, Some(PrmConfig::Model(want)));
    let converted = ModelPrmConfig { model: "prm".into(), head: HeadChoice::Converted, lora: None };
    assert_eq!(cfg.models[2].prm, Some(PrmConfig::Model(converted)));
    // The effective configuration reads back as the same settings.
    std::fs::write(&file, cfg.to_redacted_toml()).unwrap();
    assert_eq!(Config::load(Some(&file), [], &Overrides::default()).unwrap(), cfg);
    // A mistyped key of the table is named.
    std::fs::write(&file, "[[models]]\nid = \"b\"\npath = \"y\"\n[models.prm]\nmodle = \"prm\"\n").unwrap();
    let err = Config::load(Some(&file), [], &Overrides::default()).unwrap_err();
    assert!(err.to_string().contains("modle"), "{err}");
}

#[test]
fn a_missing_model_file_names_the_path_and_the_fetch_command() {
    let mut cfg = Config::default();
    cfg.models[0].path = "/nowhere/model.gguf".into();
    let err = cfg.check_model_files().unwrap_err().to_string();
    assert!(err.contains("/nowhere/model.gguf") && err.contains("make models"), "{err}");
    // So is a missing file of a model PRM's table.
    let mut cfg = Config::default();
    cfg.models[1].prm = Some(PrmConfig::Model(ModelPrmConfig {
        model: "models/ponder-arith".into(),
        head: crate::prm::model_prm::HeadChoice::Trained("/nowhere/head.safetensors".into()),
        lora: None,
    }));
    let err = cfg.check_model_files().unwrap_err().to_string();
    assert!(err.contains("/nowhere/head.safetensors") && err.contains("`prm` table"), "{err}");
}

#[test]
fn a_model_default_that_every_request_would_fail_on_stops_start_up_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    for (setting, key) in [
        ("max_samples = 100", "reasoning.max_samples must be between 1 and 64, got 100"),
        ("budget_quantile = 0.05", "reasoning.budget_quantile must be between 0.1 and 0.9"),
        ("confidence = 1.0", "reasoning.confidence"),
        ("beams = 16", "reasoning.beams x reasoning.beam_width = 128"),
        ("max_steps = 0", "reasoning.max_steps must be at least 1"),
    ] {
        let toml = format!("[[models]]\nid = \"a\"\npath = \"x\"\n[models.reasoning]\n{setting}\n");
        std::fs::write(&file, toml).unwrap();
        let err = Config::load(Some(&file), [], &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains(key) && err.contains("model \"a\""), "{setting}: {err}");
    }
    // The running limit bounds N_max: lowering it below the default fails too.
    let err = Config::load(None, env(&[("PONDER_QUEUE_MAX_RUNNING", "16")]), &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("reasoning.max_samples must be between 1 and 16, got 64"), "{err}");
}

#[test]
fn a_mistyped_value_names_its_key_and_where_it_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, "[server]\nport = \"9000\"\n").unwrap();
    let err = Config::load(Some(&file), [], &Overrides::default()).unwrap_err().to_string();
    assert!(err.contains("p.toml") && err.contains("server.port") && err.contains("9000"), "{err}");
    let err = Config::load(None, env(&[("PONDER_SERVER_PORT", "70000")]), &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("PONDER_SERVER_PORT") && err.contains("server.port") && err.contains("70000"),
        "{err}"
    );
}

#[test]
fn a_zero_running_limit_is_named_before_the_defaults_it_would_break() {
    let err = Config::load(None, env(&[("PONDER_QUEUE_MAX_RUNNING", "0")]), &Overrides::default())
        .unwrap_err()
        .to_string();
    assert_eq!(err, "queue.max_running must be at least 1");
}

#[test]
fn a_logging_level_that_names_no_level_is_refused() {
    for ok in ["info", "WARN", "info,ponder=debug", "ponder=trace"] {
        assert!(
            Config::load(None, env(&[("PONDER_LOGGING_LEVEL", ok)]), &Overrides::default()).is_ok(),
            "{ok}"
        );
    }
    let err = Config::load(None, env(&[("PONDER_LOGGING_LEVEL", "nonsense")]), &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("logging.level") && err.contains("\"nonsense\"") && err.contains("ponder=debug"),
        "{err}"
    );
}
