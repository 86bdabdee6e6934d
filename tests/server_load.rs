//! Admission under a burst, and clients that leave mid-generation.

mod common;

use std::time::Duration;

use common::{MODEL, TestServer, metric};
use futures::StreamExt;
use serde_json::{Value, json};

const COUNTING: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,";

async fn metrics(s: &TestServer) -> String {
    reqwest::get(s.url("/metrics")).await.unwrap().text().await.unwrap()
}

/// Polls /metrics until `pred` holds (the worker acts between steps).
async fn wait_for(s: &TestServer, what: &str, pred: impl Fn(&str) -> bool) -> String {
    for _ in 0..600 {
        let m = metrics(s).await;
        if pred(&m) {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}:\n{}", metrics(s).await);
}

fn series(name: &str) -> String {
    format!("{name}{{model=\"{MODEL}\"}}")
}

/// A series of the one CPU worker's gauges.
fn worker_series(name: &str) -> String {
    format!("{name}{{device=\"cpu\",model=\"{MODEL}\"}}")
}

#[tokio::test]
async fn a_burst_beyond_queue_capacity_gets_429_at_once_while_every_accepted_request_completes() {
    let mut c = common::smollm_config();
    c.queue.capacity = 2;
    c.queue.max_running = 2;
    c.limits.max_n = 2;
    c.queue.retry_after_secs = 3;
    let server = TestServer::start(c);
    let order = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let (client, url, order) = (client.clone(), server.url("/v1/completions"), order.clone());
            tokio::spawn(async move {
                let body = json!({"model": MODEL, "prompt": COUNTING, "max_tokens": 48, "temperature": 0, "seed": i});
                let r = client.post(url).json(&body).send().await.unwrap();
                let status = r.status().as_u16();
                let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
                let body: Value = r.json().await.unwrap();
                let finished_at = order.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                (status, retry, body, finished_at)
            })
        })
        .collect();
    let results: Vec<_> = futures::future::join_all(tasks).await.into_iter().map(Result::unwrap).collect();
    let accepted: Vec<_> = results.iter().filter(|r| r.0 == 200).collect();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(accepted.len() + refused.len(), 12, "only 200 and 429: {results:?}");
    assert!(accepted.len() >= 4, "queue capacity plus running batch are admitted");
    assert!(!refused.is_empty());
    for (_, retry, body, _) in &refused {
        assert_eq!(retry.as_deref(), Some("3"));
        assert_eq!(body["error"]["code"], "queue_full");
        assert_eq!(body["error"]["type"], "rate_limit_exceeded");
    }
    for (_, _, body, _) in &accepted {
        assert_eq!(body["usage"]["completion_tokens"], 48, "{body}");
        assert_eq!(body["choices"][0]["finish_reason"], "length");
    }
    // Refusals came back before the first accepted request finished.
    let first_done = accepted.iter().map(|r| r.3).min().unwrap();
    assert!(refused.iter().all(|r| r.3 < first_done), "{results:?}");
    let m = metrics(&server).await;
    let rejected =
        metric(&m, &format!("ponder_rejected_requests_total{{model=\"{MODEL}\",reason=\"queue_full\"}}"));
    assert_eq!(rejected, Some(refused.len() as f64));
}

#[tokio::test]
async fn a_client_that_disconnects_stops_its_sequences_within_a_step_and_others_finish() {
    let server = TestServer::start(common::smollm_config());
    let client = reqwest::Client::new();
    let cancelled = series("ponder_cancelled_requests_total");
    let running = worker_series("ponder_running_sequences");
    let kv = worker_series("ponder_kv_cache_bytes");

    // Streaming: read a few chunks, then drop the response.
    let body = json!({"model": MODEL, "prompt": COUNTING, "max_tokens": 3000, "temperature": 0, "stream": true, "n": 2});
    let resp = client.post(server.url("/v1/completions")).json(&body).send().await.unwrap();
    let mut chunks = resp.bytes_stream();
    for _ in 0..3 {
        chunks.next().await.unwrap().unwrap();
    }
    // Another request runs beside it and is unaffected.
    let other = tokio::spawn({
        let (client, url) = (client.clone(), server.url("/v1/chat/completions"));
        async move {
            let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 40, "temperature": 0});
            client.post(url).json(&body).send().await.unwrap().json::<Value>().await.unwrap()
        }
    });
    wait_for(&server, "both requests running", |m| metric(m, &running).unwrap_or(0.0) >= 2.0).await;
    drop(chunks);
    wait_for(&server, "the stream's cancellation", |m| metric(m, &cancelled) == Some(1.0)).await;
    let done = other.await.unwrap();
    assert_eq!(done["object"], "chat.completion", "{done}");
    assert!(done["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    wait_for(&server, "an empty worker", |m| metric(m, &running) == Some(0.0) && metric(m, &kv) == Some(0.0))
        .await;

    // Not streaming: the socket closes while the worker generates.
    use tokio::io::AsyncWriteExt;
    let addr = server.base.trim_start_matches("http://").to_string();
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let payload =
        json!({"model": MODEL, "prompt": COUNTING, "max_tokens": 3000, "temperature": 0}).to_string();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
        payload.len()
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    wait_for(&server, "the plain request running", |m| metric(m, &running) == Some(1.0)).await;
    drop(sock);
    let m =
        wait_for(&server, "the plain request's cancellation", |m| metric(m, &cancelled) == Some(2.0)).await;
    let _ = m;
    wait_for(&server, "caches freed", |m| metric(m, &running) == Some(0.0) && metric(m, &kv) == Some(0.0))
        .await;
}
