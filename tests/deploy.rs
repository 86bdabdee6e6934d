//! The deployment files under `deploy/` stay true to the code: the ponder
//! configurations in them load and the YAML parses. (That the Grafana
//! dashboard they mount queries only exported metrics is tested in
//! `src/metrics.rs`.)

use std::collections::BTreeSet;
use std::path::PathBuf;

use ponder::config::{BackendConfig, Config, Overrides};

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

fn yaml_docs(path: &str) -> Vec<serde_yaml_ng::Value> {
    let text = std::fs::read_to_string(deploy(path)).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

fn assert_remote(config: &Config, what: &str) {
    let m = &config.models[0];
    assert!(matches!(m.backend, BackendConfig::Openai(_)), "{what}: a remote model");
}

#[test]
fn the_ponder_configurations_in_deploy_load() {
    let c = Config::load(Some(&deploy("ponder-vllm.toml")), [], &Overrides::default()).unwrap();
    assert_remote(&c, "ponder-vllm.toml");
    // The Kubernetes ConfigMap's file too.
    let docs = yaml_docs("k8s/ponder.yaml");
    let map = docs.iter().find(|d| d["kind"] == "ConfigMap").expect("a ConfigMap");
    let text = map["data"]["ponder.toml"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ponder.toml");
    std::fs::write(&file, text).unwrap();
    let c = Config::load(Some(&file), [], &Overrides::default()).unwrap();
    assert_remote(&c, "the ConfigMap");
}

#[test]
fn the_compose_prometheus_and_kubernetes_files_parse() {
    let compose = &yaml_docs("docker-compose.yml")[0];
    for service in ["vllm-policy", "ponder", "prometheus", "grafana"] {
        assert!(compose["services"][service].is_mapping(), "service {service}");
    }
    let prom = &yaml_docs("prometheus.yml")[0];
    assert!(prom["scrape_configs"].as_sequence().unwrap().iter().any(|j| j["job_name"] == "ponder"));
    let kinds: BTreeSet<String> =
        yaml_docs("k8s/ponder.yaml").iter().map(|d| d["kind"].as_str().unwrap().to_string()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["ConfigMap", "Deployment", "PersistentVolumeClaim", "Service"].map(String::from))
    );
}
