//! The HTTP layer through `router()` and `oneshot`, with a fake backend and
//! no model: every validation and auth failure (status, OpenAI error type,
//! `param`, a message naming the limit and the value), how backend refusals
//! and failures map to statuses, health, and the shape of streams.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use futures::StreamExt;
use ponder::api::{AppState, router};
use ponder::backend::fake::{FakeBackend, FakeBehaviour};
use ponder::backend::{Backend, BackendStatus, ModelInfo, TokenDetail};
use ponder::config::{Config, MetricsAuth, PrmConfig};
use ponder::metrics::Metrics;
use ponder::tokenizer::{AddSpecial, Tokenizer};
use serde_json::{Value, json};
use tower::ServiceExt;

const MODEL: &str = "fake";
const KEY: &str = "test-key-2";
const CONTEXT: usize = 8192;

/// ponder-arith's tokenizer: a committed file, not a model.
fn tokenizer() -> Arc<Tokenizer> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/ponder-arith");
    Arc::new(Tokenizer::from_hf_dir(&dir).expect("the committed tokenizer loads"))
}

struct App {
    router: Router,
    fake: Arc<FakeBackend>,
    metrics: Metrics,
}

/// API keys, protected metrics and small limits, over one fake model with a PRM.
fn app() -> App {
    app_with(TokenDetail::Full)
}

fn app_with(detail: TokenDetail) -> App {
    let mut c = Config::default();
    c.server.api_keys = vec!["test-key-1".into(), KEY.into()];
    c.server.metrics_auth = MetricsAuth::Protected;
    c.limits.max_body_bytes = 4000;
    c.limits.body_timeout_secs = 1;
    c.limits.max_prompt_tokens = 60;
    c.limits.max_tokens = 10_000;
    c.models.truncate(1);
    c.models[0].id = MODEL.into();
    c.models[0].prm = Some(PrmConfig::Head("unused".into()));
    let fake =
        Arc::new(FakeBackend::new(ModelInfo { tokenizer: tokenizer(), context_length: CONTEXT, detail }));
    let metrics = Metrics::new();
    let backend: Arc<dyn Backend> = fake.clone();
    let state = AppState::new(Arc::new(c), metrics.clone(), BTreeMap::from([(MODEL.to_string(), backend)]));
    App { router: router(state), fake, metrics }
}

struct Reply {
    status: u16,
    headers: axum::http::HeaderMap,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
}

async fn call(app: &App, method: &str, path: &str, body: Option<&str>, key: Option<&str>) -> Reply {
    let mut req = Request::builder().method(method).uri(path).header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let req = req.body(body.map_or_else(Body::empty, |b| Body::from(b.to_string()))).unwrap();
    let resp = app.router.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    Reply { status, headers, text: String::from_utf8(bytes.to_vec()).unwrap() }
}

async fn post(app: &App, path: &str, body: &Value) -> Reply {
    call(app, "POST", path, Some(&body.to_string()), Some(KEY)).await
}

/// Asserts a 400 naming `param` whose message contains every `needle`.
async fn expect_400(app: &App, path: &str, body: Value, param: Option<&str>, needles: &[&str]) {
    let r = post(app, path, &body).await;
    let v = r.json();
    assert_eq!(r.status, 400, "{body} -> {v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert_eq!(v["error"]["param"].as_str(), param, "{body} -> {v}");
    let msg = v["error"]["message"].as_str().unwrap();
    for n in needles {
        assert!(msg.contains(n), "message {msg:?} lacks {n:?}");
    }
}

fn chat(extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": "1 + 2"}], "max_tokens": 2});
    b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    b
}

#[tokio::test]
async fn out_of_range_sampling_fields_are_rejected_naming_field_limit_and_value() {
    let app = app();
    let cases: Vec<(Value, &str, Vec<&str>)> = vec![
        (json!({"temperature": 3.5}), "temperature", vec!["2", "3.5"]),
        (json!({"top_p": 0}), "top_p", vec!["0"]),
        (json!({"top_k": -5}), "top_k", vec!["-5"]),
        (json!({"n": 0}), "n", vec!["16", "0"]),
        (json!({"n": 17}), "n", vec!["16", "17"]),
        (json!({"n": 2.5}), "n", vec!["2.5", "integer"]),
        (json!({"max_tokens": 0}), "max_tokens", vec!["10000", "0"]),
        (json!({"max_tokens": 20000}), "max_tokens", vec!["10000", "20000"]),
        (json!({"max_completion_tokens": 20000}), "max_completion_tokens", vec!["10000", "20000"]),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop", vec!["4", "5"]),
        (json!({"stop": ""}), "stop", vec!["64", "0"]),
        (json!({"top_logprobs": 2}), "top_logprobs", vec!["logprobs"]),
        (json!({"logprobs": true, "top_logprobs": 21}), "top_logprobs", vec!["20", "21"]),
    ];
    for (extra, param, needles) in cases {
        expect_400(&app, "/v1/chat/completions", chat(extra), Some(param), &needles).await;
    }
    assert!(app.fake.seen().is_empty(), "no invalid request reached the backend");
}

#[tokio::test]
async fn openai_fields_ponder_cannot_honour_are_refused_by_name_and_harmless_ones_accepted() {
    let app = app();
    let path = "/v1/chat/completions";
    let cases: Vec<(Value, &str, Vec<&str>)> = vec![
        (json!({"presence_penalty": 5}), "presence_penalty", vec!["-2", "2", "got 5"]),
        (json!({"frequency_penalty": -2.5}), "frequency_penalty", vec!["got -2.5"]),
        (json!({"logit_bias": {"15": -100}}), "logit_bias", vec!["not supported", "15"]),
        (json!({"logit_bias": "x"}), "logit_bias", vec![]),
        (json!({"stream_options": {"include_usage": true}}), "stream_options", vec!["stream is true"]),
        (json!({"tool_choice": "required", "tools": []}), "tool_choice", vec!["never calls a tool"]),
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "f"}}}),
            "tool_choice",
            vec!["\"auto\""],
        ),
        (json!({"tool_choice": "sometimes"}), "tool_choice", vec!["sometimes"]),
        (json!({"response_format": {"type": "json_object"}}), "response_format", vec!["json_object"]),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {}}}),
            "response_format",
            vec!["json_schema"],
        ),
        (json!({"response_format": {"type": "xml"}}), "response_format.type", vec!["xml"]),
    ];
    for (extra, param, needles) in cases {
        expect_400(&app, path, chat(extra), Some(param), &needles).await;
    }
    let null_content = json!({"model": MODEL, "messages": [{"role": "user", "content": null}]});
    expect_400(&app, path, null_content, Some("messages[0].content"), &["user message needs content"]).await;
    let completions: Vec<(Value, &str, Vec<&str>)> = vec![
        (json!({"echo": true}), "echo", vec!["not supported"]),
        (json!({"suffix": "end"}), "suffix", vec!["not supported"]),
        (json!({"best_of": 3, "n": 2}), "best_of", vec!["best_of 3 with n 2"]),
        (json!({"logit_bias": {"7": 1}}), "logit_bias", vec!["7"]),
    ];
    for (extra, param, needles) in completions {
        let mut body = json!({"model": MODEL, "prompt": "1", "max_tokens": 1});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        expect_400(&app, "/v1/completions", body, Some(param), &needles).await;
    }
    assert!(app.fake.seen().is_empty(), "no refused request reached the backend");

    let harmless = [
        json!({"presence_penalty": 1.5, "frequency_penalty": -2, "logit_bias": {}, "user": "u"}),
        json!({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}),
        json!({"tool_choice": "none", "response_format": {"type": "text"}}),
        json!({"stream": true, "stream_options": {"include_usage": false}}),
        json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null}, {"role": "user", "content": "again"}]}),
    ];
    for extra in harmless {
        let r = post(&app, path, &chat(extra.clone())).await;
        assert_eq!(r.status, 200, "{extra}: {}", r.text);
    }
    let penalised = app.fake.seen().into_iter().find(|s| !s.generation.sampling.penalties.is_none());
    let penalties = penalised.expect("the penalties reach the backend").generation.sampling.penalties;
    assert_eq!(penalties, ponder::engine::Penalties { presence: 1.5, frequency: -2.0 });
    for extra in [json!({"echo": false, "suffix": "", "best_of": 1}), json!({"prompt": [1.0, 2.0]})] {
        let mut body = json!({"model": MODEL, "prompt": "1", "max_tokens": 1});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let r = post(&app, "/v1/completions", &body).await;
        assert_eq!(r.status, 200, "{extra}: {}", r.text);
    }
}

#[tokio::test]
async fn reasoning_fields_are_checked_against_the_same_ranges_as_the_config() {
    let app = app();
    let cases: Vec<(Value, &str, Vec<&str>)> = vec![
        (json!({"max_samples": 0}), "reasoning.max_samples", vec!["between 1 and 64", "got 0"]),
        (json!({"max_samples": 65}), "reasoning.max_samples", vec!["64", "65"]),
        (json!({"beams": 16}), "reasoning.beams", vec!["128 paths", "64"]),
        (json!({"confidence": 1.0}), "reasoning.confidence", vec!["less than 1", "got 1"]),
        (json!({"budget_quantile": 0.95}), "reasoning.budget_quantile", vec!["0.9", "0.95"]),
        (json!({"prune_every": 101}), "reasoning.prune_every", vec!["100", "101"]),
        (json!({"strategy": "single", "adaptive": true}), "reasoning.adaptive", vec!["single"]),
        (json!({"round_size": 65}), "reasoning.round_size", vec!["between 1 and 64", "got 65"]),
        (json!({"give_up_gain": -0.1}), "reasoning.give_up_gain", vec!["at least 0", "-0.1"]),
        (json!({"give_up_plausible": 1.5}), "reasoning.give_up_plausible", vec!["between 0 and 1", "1.5"]),
        (json!({"budget_rule": "vote", "strategy": "beam"}), "reasoning.budget_rule", vec!["best_of_n"]),
        (json!({"budget_rule": "always"}), "reasoning.budget_rule", vec!["always"]),
        (json!({"max_step_tokens": 0}), "reasoning.max_step_tokens", vec!["between 1 and 10000", "got 0"]),
        (json!({"max_steps": 10001}), "reasoning.max_steps", vec!["between 1 and 10000", "got 10001"]),
        (
            json!({"adaptive": false, "budget_rule": "ias"}),
            "reasoning.budget_rule",
            vec!["fixed", "adaptive true"],
        ),
        (json!({"strategy": "single", "budget_rule": "vote"}), "reasoning.budget_rule", vec!["single"]),
    ];
    for (reasoning, param, needles) in cases {
        expect_400(
            &app,
            "/v1/chat/completions",
            chat(json!({"reasoning": reasoning})),
            Some(param),
            &needles,
        )
        .await;
    }
    expect_400(
        &app,
        "/v1/chat/completions",
        chat(json!({"reasoning": {}, "stop": ["x"]})),
        Some("stop"),
        &["blank lines"],
    )
    .await;
}

#[tokio::test]
async fn integral_json_numbers_are_accepted_as_integers() {
    let app = app();
    let r =
        post(&app, "/v1/chat/completions", &chat(json!({"max_tokens": 416.0, "n": 2.0, "seed": 7.0}))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let g = &app.fake.seen()[0].generation;
    assert_eq!((g.max_tokens, g.n, g.sampling.seed), (416, 2, 7));
    assert_eq!(r.json()["choices"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn malformed_bodies_get_400_never_500() {
    let app = app();
    let r = call(&app, "POST", "/v1/chat/completions", Some("{\"model\": "), Some(KEY)).await;
    assert_eq!((r.status, r.json()["error"]["param"].clone()), (400, Value::Null), "{}", r.text);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("not valid JSON"));
    expect_400(&app, "/v1/chat/completions", json!({"messages": []}), Some("model"), &["model"]).await;
    expect_400(&app, "/v1/chat/completions", chat(json!({"temperature": "hot"})), Some("temperature"), &[])
        .await;
    expect_400(
        &app,
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": "hi"}),
        Some("messages"),
        &[],
    )
    .await;
    expect_400(&app, "/v1/completions", json!({"model": MODEL, "prompt": [1, "two"]}), Some("prompt"), &[])
        .await;
    let r = call(&app, "POST", "/v1/completions", Some("[]"), Some(KEY)).await;
    assert_eq!(r.status, 400, "{}", r.text);
}

#[tokio::test]
async fn message_and_prompt_problems_name_the_offending_element() {
    let app = app();
    let path = "/v1/chat/completions";
    expect_400(&app, path, json!({"model": MODEL, "messages": []}), Some("messages"), &["at least one"])
        .await;
    let bad_role = json!({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]});
    expect_400(&app, path, bad_role, Some("messages[0].role"), &["wizard"]).await;
    let image = json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]});
    expect_400(&app, path, image, Some("messages[0].content[0]"), &["image_url"]).await;
    let empty = json!({"model": MODEL, "prompt": []});
    expect_400(&app, "/v1/completions", empty, Some("prompt"), &["at least one"]).await;
    let lp = json!({"model": MODEL, "prompt": "1", "logprobs": 21});
    expect_400(&app, "/v1/completions", lp, Some("logprobs"), &["20", "21"]).await;
    // Token-id prompts (as OpenAI and vLLM take them) are checked against the vocabulary.
    let vocab = tokenizer().vocab_size();
    let outside = json!({"model": MODEL, "prompt": [[5, 6], [7, vocab]]});
    let needle = format!("token id {vocab} at position 1");
    expect_400(&app, "/v1/completions", outside, Some("prompt[1]"), &[&needle]).await;
    let empty_ids = json!({"model": MODEL, "prompt": [[5], []]});
    expect_400(&app, "/v1/completions", empty_ids, Some("prompt[1]"), &["at least one token"]).await;
    let r =
        post(&app, "/v1/completions", &json!({"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(app.fake.seen().last().unwrap().generation.prompts, vec![vec![5u32, 6, 7]]);
}

#[tokio::test]
async fn size_limits_on_body_prompt_and_context_are_enforced_and_a_body_over_the_limit_is_413() {
    let app = app();
    let long = "1 + ".repeat(40);
    let tokens = tokenizer().encode(&long, AddSpecial::Yes).unwrap().len();
    assert!(tokens > 60);
    let body = json!({"model": MODEL, "prompt": long, "max_tokens": 1});
    expect_400(&app, "/v1/completions", body, Some("prompt"), &["60", &format!("{tokens} tokens")]).await;
    let huge = json!({"model": MODEL, "prompt": "x".repeat(5000)}).to_string();
    let send = |declare: bool| {
        let mut req = Request::builder()
            .method("POST")
            .uri("/v1/completions")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {KEY}"));
        if declare {
            req = req.header("content-length", huge.len());
        }
        // A chunked body declares no length, so only reading it finds the excess.
        let chunks =
            huge.as_bytes().chunks(1000).map(|c| Ok::<_, std::io::Error>(c.to_vec())).collect::<Vec<_>>();
        let req = req.body(Body::from_stream(futures::stream::iter(chunks))).unwrap();
        async {
            let resp = app.router.clone().oneshot(req).await.unwrap();
            let status = resp.status().as_u16();
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
            (status, serde_json::from_slice::<Value>(&bytes).unwrap())
        }
    };
    let ((s1, v1), (s2, v2)) = (send(true).await, send(false).await);
    for (status, v, got) in
        [(s1, v1, format!("got {} bytes", huge.len())), (s2, v2, "got more than 4000 bytes".to_string())]
    {
        assert_eq!(status, 413, "{v}");
        assert_eq!(v["error"]["code"], "request_too_large", "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("4000 bytes (limits.max_body_bytes)") && msg.contains(&got), "{msg}");
    }
    let r = post(&app, "/v1/completions", &json!({"model": MODEL, "prompt": "1", "max_tokens": 9000})).await;
    let v = r.json();
    assert_eq!(r.status, 400);
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert_eq!(v["error"]["param"], "max_tokens");
    assert!(v["error"]["message"].as_str().unwrap().contains(&CONTEXT.to_string()), "{v}");
}

#[tokio::test]
async fn a_body_that_stops_arriving_gets_408_naming_the_limit() {
    let app = app();
    let first = Ok::<_, std::io::Error>(br#"{"model": "m", "prompt": "#.to_vec());
    let stalled = futures::stream::iter([first]).chain(futures::stream::pending());
    let req = Request::builder()
        .method("POST")
        .uri("/v1/completions")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {KEY}"))
        .body(Body::from_stream(stalled))
        .unwrap();
    let resp = tokio::time::timeout(std::time::Duration::from_secs(60), app.router.clone().oneshot(req))
        .await
        .expect("answered, not left hanging")
        .unwrap();
    let status = resp.status().as_u16();
    let v: Value =
        serde_json::from_slice(&axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap()).unwrap();
    assert_eq!(status, 408, "{v}");
    assert_eq!(v["error"]["code"], "request_timeout", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("1 s (limits.body_timeout_secs)"), "{v}");
    assert!(app.fake.seen().is_empty());
}

async fn post_with_id(app: &App, id: &str) -> Reply {
    let req = Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {KEY}"))
        .header("x-request-id", id)
        .body(Body::from(chat(json!({})).to_string()))
        .unwrap();
    let resp = app.router.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    Reply { status, headers, text: String::from_utf8(bytes.to_vec()).unwrap() }
}

#[tokio::test]
async fn a_client_request_id_is_kept_and_a_bad_one_is_refused_naming_the_header() {
    let app = app();
    let r = post_with_id(&app, "trace-42.a:b").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.headers["x-request-id"], "trace-42.a:b");
    let r = post(&app, "/v1/chat/completions", &chat(json!({}))).await;
    let made = r.headers["x-request-id"].to_str().unwrap();
    assert_eq!(made.len(), 32, "a uuid without dashes: {made}");
    for bad in ["has space", &"x".repeat(129)] {
        let r = post_with_id(&app, bad).await;
        let v = r.json();
        assert_eq!(r.status, 400, "{bad:?} -> {v}");
        assert_eq!(v["error"]["param"], "x-request-id", "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("128") && msg.contains(&format!("{} bytes", bad.len())), "{msg}");
    }
}

#[tokio::test]
async fn an_unknown_model_is_404_model_not_found() {
    let app = app();
    let r = post(
        &app,
        "/v1/chat/completions",
        &json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    let v = r.json();
    assert_eq!(r.status, 404);
    assert_eq!(v["error"]["code"], "model_not_found");
    assert_eq!(v["error"]["param"], "model");
    assert!(v["error"]["message"].as_str().unwrap().contains("gpt-9"));
}

#[tokio::test]
async fn unknown_routes_methods_and_prms_answer_openai_error_bodies() {
    let app = app();
    let r = call(&app, "GET", "/v2/nothing", None, Some(KEY)).await;
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (404, json!("not_found")), "{}", r.text);
    for (method, path) in [("GET", "/v1/chat/completions"), ("PUT", "/v1/completions"), ("POST", "/health")] {
        let r = call(&app, method, path, None, Some(KEY)).await;
        assert_eq!(r.status, 405, "{method} {path}");
        let v = r.json();
        assert_eq!(v["error"]["code"], "method_not_allowed", "{method} {path}: {}", r.text);
        assert!(v["error"]["message"].as_str().unwrap().contains(path));
        assert!(r.headers.contains_key("allow"), "{method} {path}: the Allow header stays");
    }
    let r = post(&app, "/pooling", &json!({"model": "no-prm", "input": "x"})).await;
    assert_eq!(r.status, 404);
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("no-prm") && message.contains("[[prms]]"), "{message}");
}

#[tokio::test]
async fn token_details_a_remote_engine_does_not_return_are_refused_not_faked() {
    let ids = json!({"model": MODEL, "prompt": "1", "max_tokens": 1, "return_token_ids": true});
    let logprobs = json!({"model": MODEL, "prompt": "1", "max_tokens": 1, "logprobs": 1});
    let vllm = app_with(TokenDetail::Logprobs);
    expect_400(&vllm, "/v1/completions", ids.clone(), Some("return_token_ids"), &["names tokens by text"])
        .await;
    assert_eq!(post(&vllm, "/v1/completions", &logprobs).await.status, 200);
    let llama = app_with(TokenDetail::TextOnly);
    expect_400(&llama, "/v1/completions", logprobs, Some("logprobs"), &["llama.cpp"]).await;
    expect_400(&llama, "/v1/chat/completions", chat(json!({"logprobs": true})), Some("logprobs"), &[]).await;
    assert_eq!(post(&app(), "/v1/completions", &ids).await.status, 200, "ponder's own engine has both");
}

#[tokio::test]
async fn api_keys_guard_the_api_and_protected_metrics_but_not_health() {
    let app = app();
    let body = chat(json!({})).to_string();
    for key in [None, Some("wrong"), Some("test-key")] {
        let r = call(&app, "POST", "/v1/chat/completions", Some(&body), key).await;
        let v = r.json();
        assert_eq!(r.status, 401, "{key:?}");
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["param"].is_null());
    }
    assert_eq!(call(&app, "POST", "/v1/chat/completions", Some(&body), Some("test-key-1")).await.status, 200);
    assert_eq!(call(&app, "GET", "/v1/models", None, None).await.status, 401);
    assert_eq!(call(&app, "GET", "/v1/models", None, Some(KEY)).await.status, 200);
    assert_eq!(call(&app, "GET", "/metrics", None, None).await.status, 401);
    assert_eq!(call(&app, "GET", "/metrics", None, Some(KEY)).await.status, 200);
    assert_eq!(call(&app, "GET", "/health", None, None).await.status, 200);
    assert_eq!(call(&app, "GET", "/openapi.yaml", None, None).await.status, 200);
    assert_eq!(call(&app, "GET", "/v2/nothing", None, Some(KEY)).await.status, 404);
}

#[tokio::test]
async fn backend_refusals_and_failures_map_to_429_503_and_a_generic_500() {
    let app = app();
    app.fake.set_behaviour(FakeBehaviour::QueueFull { retry_after_secs: 3 });
    let r = post(&app, "/v1/chat/completions", &chat(json!({}))).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["retry-after"], "3");
    assert_eq!(r.json()["error"]["code"], "queue_full");

    app.fake.set_behaviour(FakeBehaviour::Fail);
    let r = post(&app, "/v1/chat/completions", &chat(json!({}))).await;
    assert_eq!(r.status, 500);
    let v = r.json();
    assert_eq!(v["error"]["type"], "server_error");
    assert_eq!(v["error"]["message"], "The server failed to complete the request.", "5xx bodies are generic");
    let r = post(&app, "/v1/chat/completions", &chat(json!({"stream": true}))).await;
    assert_eq!(r.status, 200, "a stream has started when the failure comes");
    assert!(r.text.contains("server_error") && r.text.trim_end().ends_with("data: [DONE]"), "{}", r.text);

    app.fake.set_behaviour(FakeBehaviour::Answer("ok".into()));
    app.fake.set_status(BackendStatus::Restarting);
    let r = post(&app, "/v1/chat/completions", &chat(json!({}))).await;
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (503, json!("model_restarting")), "{}", r.text);
    let h = call(&app, "GET", "/health", None, None).await;
    assert_eq!((h.status, h.json()["status"].clone()), (503, json!("restarting")));
    assert_eq!(h.json()["models"][MODEL], "restarting");

    app.fake.set_status(BackendStatus::Loading);
    let r = post(&app, "/v1/chat/completions", &chat(json!({}))).await;
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (503, json!("model_loading")));
    assert_eq!(call(&app, "GET", "/health", None, None).await.status, 503);
    let m = call(&app, "GET", "/metrics", None, Some(KEY)).await.text;
    assert!(m.contains("ponder_http_requests_total{route=\"/v1/chat/completions\",status=\"503\"}"), "{m}");
    assert!(m.contains("ponder_models_loaded 0"), "a loading model is not ready: {m}");
    app.fake.set_status(BackendStatus::Ready);
    let m = call(&app, "GET", "/metrics", None, Some(KEY)).await.text;
    assert!(m.contains("ponder_models_loaded 1"), "{m}");
    app.fake.set_status(BackendStatus::Unreachable("gone".into()));
    let m = call(&app, "GET", "/metrics", None, Some(KEY)).await.text;
    assert!(m.contains("ponder_models_loaded 0"), "an unreachable model is not ready: {m}");
    let _ = &app.metrics;
}

#[tokio::test]
async fn a_request_that_fails_before_its_first_event_is_a_generic_500_streamed_or_not() {
    let app = app();
    app.fake.set_behaviour(FakeBehaviour::FailAtOnce);
    for stream in [false, true] {
        let r = post(&app, "/v1/chat/completions", &chat(json!({"stream": stream}))).await;
        assert_eq!(r.status, 500, "stream {stream}: {}", r.text);
        let v = r.json();
        assert_eq!(v["error"]["type"], "server_error", "stream {stream}: {}", r.text);
        assert_eq!(v["error"]["message"], "The server failed to complete the request.", "generic: {v}");
    }
}

#[tokio::test]
async fn a_model_that_failed_for_good_is_refused_as_failed_not_loading_and_counted_so() {
    let app = app();
    app.fake.set_status(BackendStatus::Failed("weights unreadable".into()));
    for stream in [false, true] {
        let r = post(&app, "/v1/chat/completions", &chat(json!({"stream": stream}))).await;
        let v = r.json();
        assert_eq!((r.status, v["error"]["code"].clone()), (503, json!("model_failed")), "{}", r.text);
        assert!(v["error"]["message"].as_str().unwrap().contains("not being retried"), "{v}");
        assert!(r.headers.get("retry-after").is_none(), "there is nothing to wait for");
    }
    let h = call(&app, "GET", "/health", None, None).await;
    assert_eq!((h.status, h.json()["status"].clone()), (503, json!("failed")), "{}", h.text);
    assert_eq!(h.json()["models"][MODEL], "failed: weights unreadable");
    app.fake.set_status(BackendStatus::Restarting);
    assert_eq!(post(&app, "/v1/chat/completions", &chat(json!({}))).await.status, 503);
    let m = call(&app, "GET", "/metrics", None, Some(KEY)).await.text;
    for (reason, count) in [("failed", 2), ("restarting", 1)] {
        let series =
            format!("ponder_rejected_requests_total{{model=\"{MODEL}\",reason=\"{reason}\"}} {count}");
        assert!(m.contains(&series), "{series} in {m}");
    }
    assert!(!m.contains("reason=\"loading\"} 1"), "{m}");
}

#[tokio::test]
async fn a_streamed_reasoning_request_sends_progress_chunks_before_the_answer() {
    let app = app();
    app.fake.set_behaviour(FakeBehaviour::Answer("The answer is 3.".into()));
    let body = chat(json!({"stream": true, "reasoning": {"strategy": "best_of_n"}}));
    let r = post(&app, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200);
    let data: Vec<Value> = r
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let first_content =
        data.iter().position(|c| c["choices"][0]["delta"]["content"].as_str().is_some_and(|t| !t.is_empty()));
    let progress: Vec<usize> =
        (0..data.len()).filter(|&i| data[i]["ponder"]["status"] == "searching").collect();
    assert_eq!(progress.len(), 2, "{}", r.text);
    assert!(progress.iter().all(|&i| i < first_content.unwrap()), "progress comes before the answer");
    for &i in &progress {
        let c = &data[i];
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["choices"], json!([]));
        for key in ["samples", "live", "budget", "best_success_probability", "tokens_generated", "steps"] {
            assert!(c["ponder"].get(key).is_some(), "{key} in {c}");
        }
    }
    let last = data.last().unwrap();
    assert_eq!(last["ponder"]["strategy"], "best_of_n", "the final chunk has the full ponder object");
    assert!(last["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert!(r.text.trim_end().ends_with("data: [DONE]"));
}

fn sse_data(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test]
async fn a_search_with_fewer_distinct_answers_than_n_returns_fewer_choices_streamed_or_not() {
    let app = app();
    app.fake.set_behaviour(FakeBehaviour::Answer("The answer is 3.".into()));
    let r = post(&app, "/v1/chat/completions", &chat(json!({"n": 3, "reasoning": {"max_samples": 4}}))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let choices = r.json()["choices"].as_array().unwrap().clone();
    assert_eq!(choices.len(), 1, "one distinct answer, no empty choices: {}", r.text);
    assert_eq!(choices[0]["message"]["content"], "The answer is 3.");
    let streamed = chat(json!({"n": 3, "stream": true, "reasoning": {"max_samples": 4}}));
    let r = post(&app, "/v1/chat/completions", &streamed).await;
    let data = sse_data(&r.text);
    let indices: Vec<u64> = data
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap().iter().map(|x| x["index"].as_u64().unwrap()))
        .collect();
    assert!(!indices.is_empty() && indices.iter().all(|&i| i == 0), "{}", r.text);
    let first = data.iter().find(|c| !c["choices"].as_array().unwrap().is_empty()).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant", "the first delta names the role: {first}");
    let roles = data.iter().filter(|c| c["choices"][0]["delta"]["role"].is_string()).count();
    assert_eq!(roles, 1, "{}", r.text);
}

#[tokio::test]
async fn the_reasoning_object_refuses_unknown_fields_and_non_objects() {
    let app = app();
    let path = "/v1/chat/completions";
    let typo = chat(json!({"reasoning": {"Strategy": "beam"}}));
    expect_400(&app, path, typo, Some("reasoning.Strategy"), &["unknown field `Strategy`", "`strategy`"])
        .await;
    let array = chat(json!({"reasoning": ["beam"]}));
    expect_400(&app, path, array, Some("reasoning"), &["expected an object"]).await;
    // Nor does any other object of the request read an array of its fields.
    let usage = chat(json!({"stream": true, "stream_options": [true]}));
    expect_400(&app, path, usage, Some("stream_options"), &["expected an object"]).await;
    let message = json!({"model": MODEL, "messages": [["user", "hi"]]});
    expect_400(&app, path, message, Some("messages[0]"), &["expected an object"]).await;
    // An enum given a number is a type error at its field, not "invalid JSON".
    let number = chat(json!({"reasoning": {"strategy": 1}}));
    expect_400(&app, path, number, Some("reasoning.strategy"), &["integer `1`"]).await;
    let r = call(&app, "POST", path, Some(&json!([MODEL, []]).to_string()), Some(KEY)).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json()["error"]["message"], "request body must be a JSON object");
    // Messages say what was expected in JSON's words, not the server's type names.
    for (body, param) in [
        (json!({"model": MODEL, "messages": [{"role": "user", "content": 5}]}), "messages[0].content"),
        (chat(json!({"stop": 5})), "stop"),
    ] {
        expect_400(&app, path, body, Some(param), &["a string or an array of"]).await;
    }
    let prompt = json!({"model": MODEL, "prompt": 5});
    expect_400(&app, "/v1/completions", prompt, Some("prompt"), &["a string, an array of strings"]).await;
    assert!(app.fake.seen().is_empty(), "no invalid request reached the backend");
}

#[tokio::test]
async fn per_request_step_limits_reach_the_search_capped_by_max_tokens() {
    let app = app();
    for (max_tokens, want) in [(50, (7, 3)), (5, (5, 3))] {
        let reasoning = json!({"max_step_tokens": 7, "max_steps": 3});
        let r = post(
            &app,
            "/v1/chat/completions",
            &chat(json!({"max_tokens": max_tokens, "reasoning": reasoning})),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let p = app.fake.seen().last().unwrap().generation.reasoning.unwrap();
        assert_eq!((p.max_step_tokens, p.max_steps), want);
    }
}

#[tokio::test]
async fn reasoning_refuses_token_ids_and_takes_an_empty_stop_list() {
    let app = app();
    let ids = json!({"model": MODEL, "prompt": "1 + 2", "return_token_ids": true, "reasoning": {}});
    expect_400(&app, "/v1/completions", ids, Some("return_token_ids"), &["not available with reasoning"])
        .await;
    let r = post(&app, "/v1/chat/completions", &chat(json!({"stop": [], "reasoning": {}}))).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test]
async fn a_completions_prompt_in_the_models_template_gives_the_prm_the_bare_question() {
    let app = app();
    let tok = tokenizer();
    let turn = [ponder::tokenizer::ChatMessage { role: "user".into(), content: "12 + 30".into() }];
    let wrapped = tok.apply_chat_template(&turn).unwrap();
    // Several turns share one turn's ends; their text goes to the PRM as it is.
    let user = |c: &str| ponder::tokenizer::ChatMessage { role: "user".into(), content: c.into() };
    let assistant = ponder::tokenizer::ChatMessage { role: "assistant".into(), content: "42".into() };
    let talk = tok.apply_chat_template(&[user("12 + 30"), assistant, user("1 + 1")]).unwrap();
    for (prompt, question) in
        [(wrapped.as_str(), "12 + 30"), ("12 + 30 =", "12 + 30 ="), (talk.as_str(), talk.as_str())]
    {
        let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 2, "reasoning": {}});
        let r = post(&app, "/v1/completions", &body).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(app.fake.seen().last().unwrap().generation.question, question);
    }
}

/// Serves the fake app on a loopback port: (address, the fake).
async fn serve(app: App) -> (std::net::SocketAddr, Arc<FakeBackend>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app.router).await.unwrap() });
    (addr, app.fake)
}

#[tokio::test]
async fn a_client_that_leaves_a_silent_request_is_noticed_streamed_or_not() {
    use tokio::io::AsyncWriteExt;
    let app = app();
    app.fake.set_behaviour(FakeBehaviour::Hang);
    let (addr, fake) = serve(app).await;
    for (i, stream) in [false, true].into_iter().enumerate() {
        let payload = chat(json!({"stream": stream, "reasoning": {}})).to_string();
        let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
            payload.len()
        );
        sock.write_all(req.as_bytes()).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(fake.cancelled(), i, "still running while the client is there");
        drop(sock);
        // No event is written to the client: only the closed socket tells.
        for _ in 0..200 {
            if fake.cancelled() > i {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(fake.cancelled(), i + 1, "stream {stream}: the backend saw the client leave");
    }
}
