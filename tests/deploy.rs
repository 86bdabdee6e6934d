//! The deployment files stay true to the code and to the tools that read
//! them: docker/compose.yaml is accepted by docker-compose, with and without
//! its gpu profile; deploy/prometheus.yml by promtool; the Kubernetes
//! manifests under deploy/k8s/ by the API's schemas (kubernetes-validate,
//! offline); the ponder configurations in them load; and a real Prometheus,
//! scraping a live ponder with the shipped configuration, answers every
//! query of the shipped Grafana dashboard with data.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Child, TestServer, free_port, tool};
use ponder::config::{BackendConfig, Config, Overrides, PrmConfig};
use serde_json::{Value, json};

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn yaml_docs(path: &Path) -> Vec<serde_yaml_ng::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

fn k8s_docs() -> Vec<serde_yaml_ng::Value> {
    k8s_files().iter().flat_map(|f| yaml_docs(f)).collect()
}

fn k8s_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

/// Runs `program args`, asserting it exits 0; its stdout.
fn run_ok(program: &Path, args: &[&str]) -> String {
    let out = Command::new(program).args(args).current_dir(repo(".")).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{} {args:?} failed:\n{text}", program.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_remote_with_remote_prm(config: &Config, what: &str) {
    let m = &config.models[0];
    assert!(matches!(m.backend, BackendConfig::Openai(_)), "{what}: a remote model");
    assert!(matches!(m.prm, Some(PrmConfig::Remote(_))), "{what}: scored by vLLM's PRM");
}

#[test]
fn the_ponder_configurations_of_compose_and_kubernetes_load() {
    let c = Config::load(Some(&repo("deploy/ponder-vllm.toml")), [], &Overrides::default()).unwrap();
    assert_remote_with_remote_prm(&c, "ponder-vllm.toml");
    let docs = k8s_docs();
    let map = docs.iter().find(|d| d["kind"] == "ConfigMap").expect("a ConfigMap");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ponder.toml");
    std::fs::write(&file, map["data"]["ponder.toml"].as_str().unwrap()).unwrap();
    let c = Config::load(Some(&file), [], &Overrides::default()).unwrap();
    assert_remote_with_remote_prm(&c, "the ConfigMap");
}

#[test]
fn docker_compose_accepts_the_compose_file_and_the_gpu_profile_adds_vllm() {
    // docker-compose (v1) lists every service whatever the profile, so the
    // profiles are read from the configuration it resolved.
    let resolved: serde_yaml_ng::Value = serde_yaml_ng::from_str(&run_ok(
        &tool("docker-compose"),
        &["-f", "docker/compose.yaml", "--profile", "gpu", "config"],
    ))
    .unwrap();
    let services = resolved["services"].as_mapping().unwrap();
    let in_profile = |want: Option<&str>| -> BTreeSet<&str> {
        services
            .iter()
            .filter(|(_, s)| {
                let profiles: Vec<&str> =
                    s["profiles"].as_sequence().into_iter().flatten().filter_map(|p| p.as_str()).collect();
                match want {
                    None => profiles.is_empty(),
                    Some(p) => profiles == [p],
                }
            })
            .map(|(name, _)| name.as_str().unwrap())
            .collect()
    };
    assert_eq!(in_profile(None), BTreeSet::from(["ponder", "prometheus", "grafana"]), "without a profile");
    assert_eq!(in_profile(Some("gpu")), BTreeSet::from(["vllm-policy", "vllm-prm", "ponder-vllm"]), "gpu");
    assert!(services["ponder-vllm"]["depends_on"]["vllm-prm"].is_mapping(), "ponder-vllm waits for the PRM");

    // Every file the services mount from the repository exists (the
    // policy's tokenizer directory is the user's to provide).
    let mut mounted = 0;
    for (name, service) in services {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            // "host:container[:mode]", or the long form; named volumes
            // ("hf-cache:…") are not paths.
            let source = match volume.as_str() {
                Some(short) => short.split(':').next().unwrap_or_default(),
                None => volume["source"].as_str().unwrap_or_default(),
            };
            if source.starts_with('/') && !source.ends_with("models/policy") {
                assert!(Path::new(source).exists(), "{name:?} mounts {source}, which does not exist");
                mounted += 1;
            }
        }
    }
    assert!(mounted >= 4, "prometheus.yml, grafana provisioning, dashboards, ponder-vllm.toml: {mounted}");
}

#[test]
fn promtool_accepts_the_prometheus_configuration() {
    run_ok(&tool("promtool"), &["check", "config", "deploy/prometheus.yml"]);
}

#[test]
fn the_kubernetes_manifests_validate_against_the_api_schemas() {
    let files: Vec<String> = k8s_files().iter().map(|p| p.display().to_string()).collect();
    let mut args = vec!["--strict"];
    args.extend(files.iter().map(String::as_str));
    run_ok(&tool("kubernetes-validate"), &args);

    let docs = k8s_docs();
    let kinds: BTreeSet<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    let want = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "Service"];
    assert_eq!(kinds, BTreeSet::from(want));
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/health");
    assert!(container["livenessProbe"].is_mapping(), "a liveness probe");
    let hpa = docs.iter().find(|d| d["kind"] == "HorizontalPodAutoscaler").unwrap();
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], deployment["metadata"]["name"]);
}

// ---------------------------------------------------------------- a live Prometheus

/// deploy/prometheus.yml with its ponder job pointed at `target` and the
/// other jobs (vLLM, absent here) left out; scraped every second so the
/// test waits seconds, not minutes.
fn prometheus_config(target: &str) -> String {
    let mut config = yaml_docs(&repo("deploy/prometheus.yml")).remove(0);
    config["global"]["scrape_interval"] = "1s".into();
    let jobs = config["scrape_configs"].as_sequence_mut().unwrap();
    jobs.retain(|j| j["job_name"] == "ponder");
    assert_eq!(jobs.len(), 1, "deploy/prometheus.yml has a ponder job");
    jobs[0]["static_configs"] = serde_yaml_ng::from_str(&format!("[{{targets: [\"{target}\"]}}]")).unwrap();
    serde_yaml_ng::to_string(&config).unwrap()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

async fn instant_query(prometheus: &str, query: &str) -> Value {
    let url = format!("{prometheus}/api/v1/query?query={}", percent_encode(query));
    let v: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    assert_eq!(v["status"], "success", "{query}: {v}");
    v["data"]["result"].clone()
}

/// Every query of dashboards/ponder.json, with Grafana's variables as the
/// dashboard's defaults give them (all models; a rate window wide enough
/// for a test that lasts seconds).
fn dashboard_queries() -> Vec<(String, String)> {
    let d: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("dashboards/ponder.json")).unwrap()).unwrap();
    let mut out = Vec::new();
    for panel in d["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let expr = expr.replace("$__rate_interval", "2m").replace("$model", ".*");
            out.push((panel["title"].as_str().unwrap().to_string(), expr));
        }
    }
    assert!(out.len() >= 20, "the dashboard's queries: {}", out.len());
    out
}

/// Reasoning requests to ponder-arith (adaptive best-of-N, scored by its
/// PRM head, and a beam search) and plain requests to SmolLM2.
async fn some_requests(ponder: &TestServer) {
    let client = reqwest::Client::new();
    let ask = |body: Value| {
        let client = client.clone();
        let url = ponder.url("/v1/chat/completions");
        async move {
            let r = client.post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        }
    };
    let reasoning = [
        json!({"strategy": "best_of_n", "max_samples": 8}),
        json!({"strategy": "beam", "beams": 2, "beam_width": 2}),
    ];
    for (i, reasoning) in reasoning.into_iter().enumerate() {
        let q = &ponder::arith::task::generate(ponder::arith::task::Split::Test, 4).unwrap()[i].question;
        ask(json!({"model": "ponder-arith", "messages": [{"role": "user", "content": q}], "max_tokens": 160,
                   "temperature": 0.7, "seed": 3, "reasoning": reasoning}))
        .await;
    }
    ask(json!({"model": common::MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
        .await;
}

async fn wait_for(what: &str, mut ready: impl AsyncFnMut() -> bool) {
    for _ in 0..300 {
        if ready().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scraping_a_live_ponder_answers_every_dashboard_query_with_data() {
    let ponder = TestServer::start(common::smollm_config());
    let target = ponder.base.trim_start_matches("http://").to_string();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(&config, prometheus_config(&target)).unwrap();
    run_ok(&tool("promtool"), &["check", "config", config.to_str().unwrap()]);

    let port = free_port();
    let prometheus = format!("http://127.0.0.1:{port}");
    let _child = Child(
        Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let scraped = async |p: &str| {
        let up = instant_query(p, "up{job=\"ponder\"} == 1").await;
        !up.as_array().unwrap().is_empty()
    };
    wait_for("Prometheus to scrape ponder", async || {
        reqwest::get(format!("{prometheus}/-/ready")).await.is_ok_and(|r| r.status() == 200)
            && scraped(&prometheus).await
    })
    .await;

    // Two rounds, each followed by scrapes: a series born in the first round
    // has a sample to rise from in the second, so every rate() is defined.
    for _ in 0..2 {
        some_requests(&ponder).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }

    let mut missing = Vec::new();
    for (panel, expr) in dashboard_queries() {
        let result = instant_query(&prometheus, &expr).await;
        let values: Vec<f64> = result
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["value"][1].as_str().unwrap().parse::<f64>().unwrap())
            .collect();
        if !values.iter().any(|v| v.is_finite()) {
            missing.push(format!("{panel}: {expr} -> {result}"));
        }
    }
    assert!(missing.is_empty(), "queries without data:\n{}", missing.join("\n"));
}

#[test]
fn the_cuda_images_configuration_asks_for_a_gpu_which_only_a_cuda_build_opens() {
    let loaded = Config::load(Some(&repo("docker/ponder-cuda.toml")), [], &Overrides::default());
    if cfg!(feature = "cuda") {
        assert_eq!(loaded.unwrap().models[0].devices, [ponder::config::DeviceKind::Cuda(0)]);
    } else {
        let err = loaded.unwrap_err().to_string();
        assert!(err.contains("cuda:0") && err.contains("make build-cuda"), "{err}");
    }
    // The image copies files that exist.
    let dockerfile = std::fs::read_to_string(repo("docker/Dockerfile.cuda")).unwrap();
    for path in ["scripts/install_cuda.sh", "scripts/cuda-wheels.txt", "docker/ponder-cuda.toml"] {
        assert!(repo(path).is_file(), "{path}");
    }
    assert!(dockerfile.contains("--features cuda") && dockerfile.contains("docker/ponder-cuda.toml"));
}
