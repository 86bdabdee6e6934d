//! SIGTERM: the request in flight completes, later ones are refused, and
//! the process exits 0.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish_refuses_new_ones_and_exits_zero() {
    let model = common::smollm_path();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ponder"))
        .args(["serve", "--port", "0", "--log-format", "json", "--model"])
        .arg(format!("m={}", model.display()))
        .env("RAYON_NUM_THREADS", "1")
        .env("PONDER_SERVER_DRAIN_TIMEOUT_SECS", "60")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Logs are JSON lines; the first announces the address.
    let addr = loop {
        let line = rx.recv_timeout(Duration::from_secs(60)).expect("the server logs its address");
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
        if let Some(rest) =
            v["fields"]["message"].as_str().and_then(|m| m.strip_prefix("listening on http://"))
        {
            break rest.to_string();
        }
    };
    let base = format!("http://{addr}");
    // The socket opens at once; the model takes seconds to load.
    let (status, body) = common::blocking_get(&format!("{base}/health")).unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"loading\""), "{body}");
    for _ in 0..600 {
        if common::blocking_get(&format!("{base}/health")).is_ok_and(|r| r.0 == 200) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let client = reqwest::Client::new();
    let body = json!({"model": "m", "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 80, "temperature": 0, "stream": true});
    let resp = client.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut received = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();

    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());

    // Once the signal is handled, new requests are refused (503 or no connection).
    let mut refused = false;
    for _ in 0..200 {
        let r = client
            .post(format!("{base}/v1/completions"))
            .json(&json!({"model": "m", "prompt": "x", "max_tokens": 1}))
            .send()
            .await;
        match r {
            Err(_) => refused = true,
            Ok(r) if r.status() == 503 => refused = true,
            Ok(_) => {}
        }
        if refused {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "requests after SIGTERM are refused");

    while let Some(chunk) = stream.next().await {
        received.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let data = common::sse_data(&received);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "the in-flight stream completes");
    let texts = data.iter().filter(|d| *d != "[DONE]").count();
    assert!(texts >= 40, "{texts} chunks");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "{status:?}");
    // One JSON line per request, with its id, model, status and token counts; no prompt text.
    // `iter`, not `try_iter`: the reader thread may still be forwarding the
    // last lines; it ends (and drops its sender) at the exited child's EOF.
    let lines: Vec<serde_json::Value> =
        rx.iter().map(|l| serde_json::from_str(&l).expect("JSON log line")).collect();
    let streamed = lines
        .iter()
        .find(|v| {
            v["fields"]["route"] == "/v1/completions"
                && v["fields"]["status"] == 200
                && v["fields"]["stream"] == true
        })
        .expect("a log line for the streamed request");
    let f = &streamed["fields"];
    assert_eq!(f["model"], "m");
    assert_eq!(f["completion_tokens"], 80);
    assert!(f["id"].as_str().is_some_and(|id| !id.is_empty()) && f["total_ms"].is_number());
    assert!(f.get("prompt").is_none(), "prompts are not logged by default");
}

#[tokio::test]
async fn requests_still_running_when_the_drain_timeout_ends_get_503_not_a_cut_connection() {
    let mut c = common::smollm_config();
    c.server.drain_timeout_secs = 1;
    let server = common::TestServer::start(c);
    let completions_url = server.url("/v1/completions");
    // Counting at temperature 0 runs to max_tokens: far longer than the drain.
    let long = |stream: bool| {
        json!({"model": "smollm2-135m-instruct", "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 1500,
               "temperature": 0, "stream": stream})
    };
    let client = reqwest::Client::new();
    let whole = tokio::spawn({
        let (client, body) = (client.clone(), long(false));
        async move { client.post(completions_url).json(&body).send().await.unwrap() }
    });
    let resp = client.post(server.url("/v1/completions")).json(&long(true)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut received = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    let stopped = tokio::task::spawn_blocking(move || server.stop());
    while let Some(chunk) = stream.next().await {
        received.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let data = common::sse_data(&received);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{received}");
    let error: serde_json::Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "shutting_down", "{error}");
    let whole = whole.await.unwrap();
    assert_eq!(whole.status(), 503);
    let body: serde_json::Value = whole.json().await.unwrap();
    assert_eq!(body["error"]["code"], "shutting_down", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("drain_timeout_secs"), "{body}");
    stopped.await.unwrap();
}
