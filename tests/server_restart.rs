//! Supervised workers: a worker that panics (or whose model fails) fails its
//! in-flight requests with a generic 500, /health answers 503 while it
//! reloads its model, requests after the restart succeed, and
//! `ponder_worker_restarts_total` counts the restarts. Faults come from the
//! test-only hook in `WorkerOptions`.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use common::{TestServer, blocking_get, metric};
use ponder::worker::{Fault, WorkerOptions};
use serde_json::{Value, json};

const ARITH: &str = "ponder-arith";

fn body() -> Value {
    json!({"model": ARITH, "messages": [{"role": "user", "content": "What is 12 + 30?"}], "max_tokens": 40, "temperature": 0})
}

async fn chat(s: &TestServer) -> (u16, Value) {
    let r = reqwest::Client::new().post(s.url("/v1/chat/completions")).json(&body()).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn wait_healthy(s: &TestServer) {
    for _ in 0..600 {
        let (status, _) = blocking_get(&s.url("/health")).unwrap();
        if status == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never healthy again: {:?}", blocking_get(&s.url("/health")));
}

#[tokio::test]
async fn a_failed_worker_fails_its_requests_with_500_restarts_and_serves_again() {
    // Armed with the fault to inject at the next step that has work.
    let armed = Arc::new(AtomicU64::new(0));
    let hook = {
        let armed = armed.clone();
        Arc::new(move |_step: u64| match armed.swap(0, Ordering::SeqCst) {
            1 => Some(Fault::Panic),
            2 => Some(Fault::ModelError),
            _ => None,
        })
    };
    let mut config = common::smollm_config();
    config.models.retain(|m| m.id == ARITH);
    // The worker waits here before each reload until the test has looked
    // at /health, so the restarting state cannot be missed.
    let (release, gate) = mpsc::channel::<()>();
    let gate = Mutex::new(gate);
    let before_reload = Arc::new(move || {
        let _ = gate.lock().expect("the test never panics holding the gate").recv();
    });
    let options = WorkerOptions { fault: Some(hook), before_reload: Some(before_reload) };
    let server = TestServer::start_with(config, options);
    assert_eq!(chat(&server).await.0, 200);

    for (fault, restarts) in [(1, 1.0), (2, 2.0)] {
        armed.store(fault, Ordering::SeqCst);
        let (status, v) = chat(&server).await;
        assert_eq!(status, 500, "{v}");
        assert_eq!(v["error"]["type"], "server_error");
        assert_eq!(v["error"]["message"], "The server failed to complete the request.", "generic: {v}");
        // Marked restarting before the request failed, and the reload waits
        // for the gate.
        let (health, text) = blocking_get(&server.url("/health")).unwrap();
        assert_eq!(health, 503, "fault {fault}: {text}");
        assert!(text.contains("restarting"), "fault {fault}: {text}");
        let (status, v) = chat(&server).await;
        assert_eq!(status, 503, "refused while restarting: {v}");
        assert_eq!(v["error"]["code"], "model_restarting", "{v}");
        release.send(()).expect("the worker waits at the gate");
        wait_healthy(&server).await;
        let (status, v) = chat(&server).await;
        assert_eq!(status, 200, "served again after the restart: {v}");
        assert!(!v["choices"][0]["message"]["content"].as_str().unwrap().is_empty());
        let m = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
        let series = format!("ponder_worker_restarts_total{{model=\"{ARITH}\"}}");
        assert_eq!(metric(&m, &series), Some(restarts), "fault {fault}");
    }
}

#[tokio::test]
async fn a_reload_that_panics_leaves_the_model_failed_not_restarting_forever() {
    let armed = Arc::new(AtomicU64::new(0));
    let hook = {
        let armed = armed.clone();
        Arc::new(move |_step: u64| (armed.swap(0, Ordering::SeqCst) == 1).then_some(Fault::Panic))
    };
    let mut config = common::smollm_config();
    config.models.retain(|m| m.id == ARITH);
    let before_reload = Arc::new(|| panic!("injected panic while reloading"));
    let options = WorkerOptions { fault: Some(hook), before_reload: Some(before_reload) };
    let server = TestServer::start_with(config, options);
    armed.store(1, Ordering::SeqCst);
    assert_eq!(chat(&server).await.0, 500);
    let mut health = (0, String::new());
    for _ in 0..250 {
        health = blocking_get(&server.url("/health")).unwrap();
        if health.1.contains("failed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(health.0, 503, "{}", health.1);
    let v: Value = serde_json::from_str(&health.1).unwrap();
    assert_eq!(v["status"], "failed", "{v}");
    assert!(v["models"][ARITH].as_str().unwrap().contains("injected panic while reloading"), "{v}");
    let (status, v) = chat(&server).await;
    assert_eq!((status, &v["error"]["code"]), (503, &json!("model_failed")), "{v}");
}
