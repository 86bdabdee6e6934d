//! A client that leaves stops its work, always: streamed or not, plain,
//! best-of-N or beam, a client that disconnects after 100 ms is counted
//! once as cancelled, no more tokens are generated for it, and its request
//! is logged (and counted) with status 499.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::{TestServer, metric};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

/// Everything the server logs, as JSON lines.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn request_lines(&self) -> Vec<Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "ponder::request")
            .collect()
    }
}

fn logs() -> &'static Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .with_env_filter("ponder=info")
            .init();
        logs
    })
}

async fn metrics(s: &TestServer) -> String {
    reqwest::get(s.url("/metrics")).await.unwrap().text().await.unwrap()
}

fn read(text: &str, series: &str) -> f64 {
    metric(text, series).unwrap_or(0.0)
}

async fn wait_until(s: &TestServer, what: &str, pred: impl Fn(&str) -> bool) -> String {
    for _ in 0..400 {
        let m = metrics(s).await;
        if pred(&m) {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}:\n{}", metrics(s).await);
}

/// Sends `body` on a raw socket and hangs up after 100 ms, checking that
/// the request is still running then. (At temperature 2 ponder-arith
/// rambles to its token limit, so a search takes seconds.)
async fn send_and_leave(s: &TestServer, path: &str, body: &Value, model: &str) {
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let payload = body.to_string();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
        payload.len()
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let m = metrics(s).await;
    let held = read(&m, &format!("ponder_running_sequences{{device=\"cpu\",model=\"{model}\"}}"))
        + read(&m, &format!("ponder_queue_depth_sequences{{device=\"cpu\",model=\"{model}\"}}"));
    assert!(held > 0.0, "{body}: still in the worker when the client leaves");
    drop(sock);
}

fn hard_question() -> String {
    ponder::arith::task::generate(ponder::arith::task::Split::Test, 2)
        .unwrap()
        .into_iter()
        .find(|p| p.level == 6)
        .expect("level 6 has problems")
        .question
}

#[tokio::test]
async fn a_client_that_leaves_after_100_ms_is_cancelled_counted_once_and_logged_as_499() {
    let logs = logs();
    let server = TestServer::start(common::smollm_config());
    let q = hard_question();
    let cases: Vec<(&str, &str, Value)> = vec![
        (
            "smollm2-135m-instruct",
            "plain",
            json!({"model": "smollm2-135m-instruct", "prompt": "1, 2, 3, 4,", "max_tokens": 3000, "temperature": 0}),
        ),
        (
            "ponder-arith",
            "best_of_n",
            json!({"model": "ponder-arith", "messages": [{"role": "user", "content": q}], "temperature": 2.0, "max_tokens": 400,
                   "reasoning": {"strategy": "best_of_n", "adaptive": false, "max_samples": 64}}),
        ),
        (
            "ponder-arith",
            "beam",
            json!({"model": "ponder-arith", "messages": [{"role": "user", "content": q}], "temperature": 2.0, "max_tokens": 400,
                   "reasoning": {"strategy": "beam", "adaptive": false}}),
        ),
    ];
    for (model, kind, body) in cases {
        for stream in [false, true] {
            let mut body = body.clone();
            body["stream"] = json!(stream);
            let path = if body.get("prompt").is_some() { "/v1/completions" } else { "/v1/chat/completions" };
            let what = format!("{kind}, stream {stream}");
            let cancelled = format!("ponder_cancelled_requests_total{{model=\"{model}\"}}");
            let generated = format!("ponder_generated_tokens_total{{model=\"{model}\"}}");
            let closed = format!("ponder_http_requests_total{{route=\"{path}\",status=\"499\"}}");
            let before = metrics(&server).await;
            let logged_before = logs.request_lines().len();
            send_and_leave(&server, path, &body, model).await;
            let m = wait_until(&server, &format!("{what}: the cancellation"), |m| {
                read(m, &cancelled) >= read(&before, &cancelled) + 1.0
            })
            .await;
            assert_eq!(read(&m, &cancelled), read(&before, &cancelled) + 1.0, "{what}: counted once");
            let at_cancel = read(&m, &generated);
            // The log line is written once the worker has let go of the request.
            let mut line = None;
            for _ in 0..400 {
                let lines = logs.request_lines();
                line =
                    lines[logged_before..].iter().find(|l| l["status"] == 499 && l["route"] == path).cloned();
                if line.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let line = line.unwrap_or_else(|| panic!("{what}: no 499 log line"));
            assert_eq!(line["model"], model, "{line}");
            let completion_id = line["completion_id"].as_str().unwrap_or_else(|| panic!("{what}: {line}"));
            assert!(completion_id.starts_with("chatcmpl-") || completion_id.starts_with("cmpl-"), "{line}");
            let spent = read(&metrics(&server).await, &generated);
            // Whoever noticed first counted it; the worker stops at its next step at the latest.
            assert!(spent - at_cancel <= 64.0, "{what}: {} tokens after the cancellation", spent - at_cancel);
            tokio::time::sleep(Duration::from_millis(300)).await;
            let later = metrics(&server).await;
            assert_eq!(read(&later, &generated), spent, "{what}: no token once the worker let go");
            assert_eq!(read(&later, &cancelled), read(&m, &cancelled), "{what}: counted once");
            assert!(
                read(&later, &closed) >= read(&before, &closed) + 1.0,
                "{what}: a 499 in http_requests_total"
            );
            let delta = spent - read(&before, &generated);
            assert_eq!(
                line["completion_tokens"].as_f64(),
                Some(delta),
                "{what}: tokens spent are logged: {line}"
            );
        }
    }
    let idle = wait_until(&server, "an idle worker", |m| {
        read(m, "ponder_running_sequences{device=\"cpu\",model=\"ponder-arith\"}") == 0.0
            && read(m, "ponder_kv_cache_bytes{device=\"cpu\",model=\"ponder-arith\"}") == 0.0
            && read(m, "ponder_kv_cache_bytes{device=\"cpu\",model=\"smollm2-135m-instruct\"}") == 0.0
    })
    .await;
    assert_eq!(read(&idle, "ponder_queue_depth_sequences{device=\"cpu\",model=\"ponder-arith\"}"), 0.0);
}
