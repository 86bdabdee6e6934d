//! Every validation and auth failure: status, OpenAI error type, `param`,
//! and a message that names the limit and the value given.

mod common;

use std::sync::OnceLock;

use common::{MODEL, TestServer};
use ponder::config::MetricsAuth;
use serde_json::{Value, json};

const KEY: &str = "test-key-2";

/// API keys, protected metrics and small limits.
fn strict() -> &'static TestServer {
    static S: OnceLock<TestServer> = OnceLock::new();
    S.get_or_init(|| {
        let mut c = common::smollm_config();
        c.server.api_keys = vec!["test-key-1".into(), KEY.into()];
        c.server.metrics_auth = MetricsAuth::Protected;
        c.limits.max_body_bytes = 4000;
        c.limits.max_prompt_tokens = 60;
        c.limits.max_tokens = 10_000;
        TestServer::start(c)
    })
}

async fn send(path: &str, body: &str, key: Option<&str>) -> (u16, Value) {
    let mut r = reqwest::Client::new()
        .post(strict().url(path))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Asserts a 400 naming `param` whose message contains every `needle`.
async fn expect_400(path: &str, body: Value, param: Option<&str>, needles: &[&str]) {
    let (status, v) = send(path, &body.to_string(), Some(KEY)).await;
    assert_eq!(status, 400, "{body} -> {v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert_eq!(v["error"]["param"].as_str(), param, "{body} -> {v}");
    let msg = v["error"]["message"].as_str().unwrap();
    for n in needles {
        assert!(msg.contains(n), "message {msg:?} lacks {n:?}");
    }
}

fn chat(extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    b
}

#[tokio::test]
async fn out_of_range_sampling_fields_are_rejected_naming_field_limit_and_value() {
    let cases: Vec<(Value, &str, Vec<&str>)> = vec![
        (json!({"temperature": 3.5}), "temperature", vec!["2", "3.5"]),
        (json!({"top_p": 0}), "top_p", vec!["0"]),
        (json!({"top_k": -5}), "top_k", vec!["-5"]),
        (json!({"n": 0}), "n", vec!["16", "0"]),
        (json!({"n": 17}), "n", vec!["16", "17"]),
        (json!({"max_tokens": 0}), "max_tokens", vec!["10000", "0"]),
        (json!({"max_tokens": 20000}), "max_tokens", vec!["10000", "20000"]),
        (json!({"max_completion_tokens": 20000}), "max_completion_tokens", vec!["10000", "20000"]),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop", vec!["4", "5"]),
        (json!({"stop": ""}), "stop", vec!["64", "0"]),
        (json!({"top_logprobs": 2}), "top_logprobs", vec!["logprobs"]),
        (json!({"logprobs": true, "top_logprobs": 21}), "top_logprobs", vec!["20", "21"]),
    ];
    for (extra, param, needles) in cases {
        expect_400("/v1/chat/completions", chat(extra), Some(param), &needles).await;
    }
}

#[tokio::test]
async fn malformed_bodies_get_400_never_500() {
    let (status, v) = send("/v1/chat/completions", "{\"model\": ", Some(KEY)).await;
    assert_eq!((status, v["error"]["param"].clone()), (400, Value::Null), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("not valid JSON"));
    expect_400("/v1/chat/completions", json!({"messages": []}), Some("model"), &["model"]).await;
    expect_400(
        "/v1/chat/completions",
        chat(json!({"temperature": "hot"})),
        Some("temperature"),
        &["temperature"],
    )
    .await;
    expect_400("/v1/chat/completions", json!({"model": MODEL, "messages": "hi"}), Some("messages"), &[])
        .await;
    expect_400("/v1/completions", json!({"model": MODEL, "prompt": [1, 2, 3]}), Some("prompt"), &[]).await;
    let (status, v) = send("/v1/completions", "[]", Some(KEY)).await;
    assert_eq!(status, 400, "{v}");
}

#[tokio::test]
async fn message_and_prompt_problems_name_the_offending_element() {
    expect_400(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": []}),
        Some("messages"),
        &["at least one"],
    )
    .await;
    let bad_role = json!({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]});
    expect_400("/v1/chat/completions", bad_role, Some("messages[0].role"), &["wizard"]).await;
    let image = json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]});
    expect_400("/v1/chat/completions", image, Some("messages[0].content[0]"), &["image_url"]).await;
    expect_400("/v1/completions", json!({"model": MODEL, "prompt": []}), Some("prompt"), &["at least one"])
        .await;
    expect_400(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "x", "logprobs": 21}),
        Some("logprobs"),
        &["20", "21"],
    )
    .await;
}

#[tokio::test]
async fn size_limits_on_body_prompt_and_context_are_enforced() {
    let long = "word ".repeat(70);
    expect_400(
        "/v1/completions",
        json!({"model": MODEL, "prompt": long, "max_tokens": 1}),
        Some("prompt"),
        &["60", "71 tokens"],
    )
    .await;
    let huge = "x".repeat(5000);
    expect_400("/v1/completions", json!({"model": MODEL, "prompt": huge}), None, &["4000", "bytes"]).await;
    let (status, v) = send(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "hi", "max_tokens": 9000}).to_string(),
        Some(KEY),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert_eq!(v["error"]["param"], "max_tokens");
    assert!(v["error"]["message"].as_str().unwrap().contains("8192"), "{v}");
}

#[tokio::test]
async fn an_unknown_model_is_404_model_not_found() {
    let (status, v) = send(
        "/v1/chat/completions",
        &json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).to_string(),
        Some(KEY),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(v["error"]["code"], "model_not_found");
    assert_eq!(v["error"]["param"], "model");
    assert!(v["error"]["message"].as_str().unwrap().contains("gpt-9"));
}

#[tokio::test]
async fn api_keys_guard_the_api_and_protected_metrics_but_not_health() {
    let client = reqwest::Client::new();
    let s = strict();
    for key in [None, Some("wrong"), Some("test-key")] {
        let (status, v) = send("/v1/chat/completions", &chat(json!({})).to_string(), key).await;
        assert_eq!(status, 401, "{key:?}");
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["param"].is_null());
    }
    let (status, _) = send("/v1/chat/completions", &chat(json!({})).to_string(), Some("test-key-1")).await;
    assert_eq!(status, 200);
    assert_eq!(client.get(s.url("/v1/models")).send().await.unwrap().status(), 401);
    assert_eq!(client.get(s.url("/v1/models")).bearer_auth(KEY).send().await.unwrap().status(), 200);
    assert_eq!(client.get(s.url("/metrics")).send().await.unwrap().status(), 401);
    assert_eq!(client.get(s.url("/metrics")).bearer_auth(KEY).send().await.unwrap().status(), 200);
    assert_eq!(client.get(s.url("/health")).send().await.unwrap().status(), 200);
    assert_eq!(client.get(s.url("/openapi.yaml")).send().await.unwrap().status(), 200);
    let unknown = client.get(s.url("/v2/nothing")).send().await.unwrap();
    assert_eq!(unknown.status(), 404);
}
