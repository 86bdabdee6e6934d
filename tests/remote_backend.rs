//! A model served by a remote OpenAI-compatible engine: ponder in front of
//! another ponder (a real server speaking the completions API) gives the
//! same greedy answers and token counts as the engine itself, streamed or
//! not; reads the context length from the engine's /v1/models; counts the
//! tokens in its own metrics; a client that leaves cancels the upstream
//! request; and an engine that is down, fails or stalls gives 502, 502 or
//! 504 in OpenAI's error JSON, never a hang, with /health saying so.

mod common;

use std::time::Duration;

use axum::Router;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use common::{MODEL, TestServer, blocking_get, metric, remote_config, smollm_config, sse_data};
use ponder::worker::WorkerOptions;
use serde_json::{Value, json};

const FRONT: &str = "remote-smol";

fn engine() -> TestServer {
    let mut c = smollm_config();
    c.models.retain(|m| m.id == MODEL);
    TestServer::start(c)
}

fn front(engine: &str, timeout_secs: u64) -> TestServer {
    TestServer::start(remote_config(FRONT, &format!("{engine}/v1"), MODEL, timeout_secs))
}

async fn post_json(url: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(url).json(body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn chat(model: &str, extra: Value) -> Value {
    let mut b = json!({"model": model, "messages": [{"role": "user", "content": "Name three colours."}],
                       "max_tokens": 24, "temperature": 0});
    b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    b
}

async fn metrics_text(s: &TestServer) -> String {
    reqwest::get(s.url("/metrics")).await.unwrap().text().await.unwrap()
}

#[tokio::test]
async fn through_a_remote_engine_answers_and_counts_equal_the_engines_own() {
    let engine = engine();
    let front = front(&engine.base, 60);
    let models: Value = reqwest::get(front.url("/v1/models")).await.unwrap().json().await.unwrap();
    let card = &models["data"][0];
    assert_eq!(card["id"], FRONT);
    assert!(card["max_model_len"].as_u64().unwrap() >= 2048, "read from the engine's /v1/models: {card}");

    let (s, direct) = post_json(&engine.url("/v1/chat/completions"), &chat(MODEL, json!({}))).await;
    assert_eq!(s, 200, "{direct}");
    let (s, relayed) = post_json(&front.url("/v1/chat/completions"), &chat(FRONT, json!({}))).await;
    assert_eq!(s, 200, "{relayed}");
    assert_eq!(relayed["model"], FRONT);
    assert_eq!(relayed["choices"][0]["message"]["content"], direct["choices"][0]["message"]["content"]);
    assert_eq!(relayed["choices"][0]["finish_reason"], direct["choices"][0]["finish_reason"]);
    assert_eq!(relayed["usage"], direct["usage"], "ponder's own template and tokenizer count the same");

    // Streamed: the same text, chunk by chunk, and the usage chunk.
    let body = chat(FRONT, json!({"stream": true, "stream_options": {"include_usage": true}}));
    let text =
        reqwest::Client::new().post(front.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(text.status(), 200);
    let text = text.text().await.unwrap();
    let events = sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let content: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<String>();
    assert_eq!(content, direct["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(chunks.last().unwrap()["usage"], direct["usage"]);

    // Several prompts with n: every choice in place, counted once each.
    let body = json!({"model": FRONT, "prompt": ["The sky is", "Grass is"], "n": 2, "max_tokens": 6,
                      "temperature": 0.8, "seed": 7});
    let (s, v) = post_json(&front.url("/v1/completions"), &body).await;
    assert_eq!(s, 200, "{v}");
    let mut idx: Vec<u64> =
        v["choices"].as_array().unwrap().iter().map(|c| c["index"].as_u64().unwrap()).collect();
    idx.sort_unstable();
    assert_eq!(idx, [0, 1, 2, 3]);

    // ponder's metrics count what the engine generated for the front's requests.
    let m = metrics_text(&front).await;
    let series = format!("ponder_generated_tokens_total{{model=\"{FRONT}\"}}");
    let expected = 2.0 * direct["usage"]["completion_tokens"].as_f64().unwrap()
        + v["usage"]["completion_tokens"].as_f64().unwrap();
    assert_eq!(metric(&m, &series), Some(expected), "{m}");
}

#[tokio::test]
async fn a_client_that_leaves_cancels_its_upstream_request() {
    let engine = engine();
    let front = front(&engine.base, 60);
    let before = metric(
        &metrics_text(&engine).await,
        &format!("ponder_cancelled_requests_total{{model=\"{MODEL}\"}}"),
    )
    .unwrap_or(0.0);
    let body = chat(
        FRONT,
        json!({"stream": true, "max_tokens": 400, "temperature": 0.8,
                                  "messages": [{"role": "user", "content": "Write a long story."}]}),
    );
    let mut resp =
        reqwest::Client::new().post(front.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let _first = resp.chunk().await.unwrap();
    drop(resp);
    wait_for_cancels(&engine, &front, before + 1.0, 1.0).await;

    // A reasoning request, left while it searches: its step calls are dropped too.
    let reasoning = json!({"strategy": "best_of_n", "adaptive": false, "select": "majority", "max_samples": 8,
                           "max_step_tokens": 200, "max_steps": 4});
    let body = chat(
        FRONT,
        json!({"stream": true, "max_tokens": 400, "temperature": 0.8, "reasoning": reasoning,
                                  "messages": [{"role": "user", "content": "Write a long story."}]}),
    );
    let resp =
        reqwest::Client::new().post(front.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    wait_for_cancels(&engine, &front, before + 2.0, 2.0).await;
}

/// Waits until the engine and the front have counted these cancellations.
async fn wait_for_cancels(engine: &TestServer, front: &TestServer, upstream: f64, here: f64) {
    let cancelled = |m: &str, model: &str| {
        metric(m, &format!("ponder_cancelled_requests_total{{model=\"{model}\"}}")).unwrap_or(0.0)
    };
    let mut seen = (0.0, 0.0);
    for _ in 0..100 {
        seen = (cancelled(&metrics_text(engine).await, MODEL), cancelled(&metrics_text(front).await, FRONT));
        if seen.0 >= upstream && seen.1 == here {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cancellations (engine, front) {seen:?}, expected ({upstream}, {here})");
}

#[tokio::test]
async fn an_engine_that_is_down_gives_502_and_health_says_unreachable() {
    // A port that was bound and released: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let c = remote_config(FRONT, &format!("http://127.0.0.1:{port}/v1"), MODEL, 5);
    let front = TestServer::start_unchecked(c, WorkerOptions::default());
    let mut health = (0, String::new());
    for _ in 0..100 {
        health = blocking_get(&front.url("/health")).unwrap();
        if health.1.contains("unreachable") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(health.0, 503, "{}", health.1);
    assert!(health.1.contains("unreachable"), "{}", health.1);
    // No context length is known yet, so validation cannot run: 503.
    let (s, v) = post_json(&front.url("/v1/chat/completions"), &chat(FRONT, json!({}))).await;
    assert_eq!((s, &v["error"]["code"]), (503, &json!("model_loading")), "{v}");
    // With a configured length, requests are validated and get 502.
    let mut c = remote_config(FRONT, &format!("http://127.0.0.1:{port}/v1"), MODEL, 5);
    c.models[0].context_length = Some(2048);
    drop(front);
    let front = TestServer::start_unchecked(c, WorkerOptions::default());
    for _ in 0..100 {
        if blocking_get(&front.url("/health")).unwrap().1.contains("unreachable") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, v) = post_json(&front.url("/v1/chat/completions"), &chat(FRONT, json!({}))).await;
    assert_eq!(s, 502, "{v}");
    assert_eq!(v["error"]["code"], "engine_unreachable", "{v}");
}

/// An engine that serves /v1/models but fails or stalls every completion.
async fn broken_engine(kind: &'static str) -> String {
    let models = || async { axum::Json(json!({"data": [{"id": MODEL, "max_model_len": 2048}]})) };
    let completions = move || async move {
        if kind == "stall" {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "engine exploded").into_response()
    };
    let app = Router::new().route("/v1/models", get(models)).route("/v1/completions", post(completions));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_fails_gives_502_and_one_that_stalls_gives_504() {
    // A failure comes at once: streamed or not, the request gets its status.
    let fails = front(&broken_engine("fail").await, 60);
    for stream in [false, true] {
        let (s, v) =
            post_json(&fails.url("/v1/chat/completions"), &chat(FRONT, json!({"stream": stream}))).await;
        assert_eq!(s, 502, "stream {stream}: {v}");
        assert_eq!(v["error"]["code"], "engine_error", "{v}");
        assert!(!v["error"]["message"].as_str().unwrap().contains("exploded"), "5xx bodies are generic: {v}");
    }
    let m = metrics_text(&fails).await;
    let series = "ponder_http_requests_total{route=\"/v1/chat/completions\",status=\"502\"}";
    assert_eq!(metric(&m, series), Some(2.0), "{m}");

    // A stall is noticed after timeout_secs: 504, or in a stream whose head
    // went out after a second, an error event before [DONE].
    let stalls = front(&broken_engine("stall").await, 3);
    let (s, v) = post_json(&stalls.url("/v1/chat/completions"), &chat(FRONT, json!({}))).await;
    assert_eq!((s, &v["error"]["code"]), (504, &json!("engine_timeout")), "{v}");
    let body = chat(FRONT, json!({"stream": true}));
    let r = reqwest::Client::new().post(stalls.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let events = sse_data(&r.text().await.unwrap());
    assert!(events.iter().any(|e| e.contains("engine_timeout")), "{events:?}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn reasoning_without_a_prm_over_a_remote_engine_votes_with_a_fixed_or_an_adaptive_budget() {
    let engine = engine();
    let front = front(&engine.base, 60);
    let reasoning = json!({"strategy": "best_of_n", "adaptive": false, "select": "majority", "max_samples": 3,
                           "max_step_tokens": 12, "max_steps": 2});
    let body = chat(FRONT, json!({"temperature": 0.9, "seed": 3, "reasoning": reasoning, "max_tokens": 24}));
    let (s, v) = post_json(&front.url("/v1/chat/completions"), &body).await;
    assert_eq!(s, 200, "{v}");
    let p = &v["ponder"];
    assert_eq!((p["samples"].as_u64(), p["adaptive"].as_bool()), (Some(3), Some(false)), "{v}");
    assert!(p["tokens_generated"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], p["tokens_generated"], "{v}");
    // Without a PRM an adaptive budget follows the vote, as on the local
    // engine; a rule that needs a PRM is refused.
    let adaptive = |rule: Value| {
        chat(
            FRONT,
            json!({"temperature": 0.9, "seed": 3, "max_tokens": 24,
                           "reasoning": {"strategy": "best_of_n", "max_samples": 6, "budget_rule": rule}}),
        )
    };
    let (s, v) = post_json(&front.url("/v1/chat/completions"), &adaptive(Value::Null)).await;
    assert_eq!(s, 200, "{v}");
    let p = &v["ponder"];
    assert_eq!((p["adaptive"].as_bool(), p["budget_rule"].as_str()), (Some(true), Some("vote")), "{v}");
    assert!((1..=6).contains(&p["samples"].as_u64().unwrap()), "{v}");
    let (s, v) = post_json(&front.url("/v1/chat/completions"), &adaptive(json!("ias"))).await;
    assert_eq!((s, &v["error"]["param"]), (400, &json!("reasoning.budget_rule")), "{v}");
}

#[tokio::test]
async fn an_adaptive_best_of_n_request_reports_the_same_accounting_through_a_remote_engine() {
    use ponder::config::{ModelPrmConfig, PrmConfig};
    use ponder::prm::model_prm::HeadChoice;
    // A separate (tiny, random) PRM reads text, so it scores a remote
    // policy's steps as it scores the local one's.
    let dir = tempfile::tempdir().unwrap();
    common::write_prm(dir.path());
    let prm =
        PrmConfig::Model(ModelPrmConfig { model: dir.path().into(), head: HeadChoice::TwoClass, lora: None });
    let mut local = smollm_config();
    local.models.retain(|m| m.id == MODEL);
    local.models[0].prm = Some(prm.clone());
    let engine = TestServer::start(local);
    let mut remote = remote_config(FRONT, &format!("{}/v1", engine.base), MODEL, 60);
    remote.models[0].prm = Some(prm);
    let front = TestServer::start(remote);

    let (here, there) = same_request_both_ways(&engine, &front).await;
    assert_eq!(here["ponder"]["adaptive"], there["ponder"]["adaptive"]);
    assert_eq!(here["ponder"]["fixed_tokens_estimate"], there["ponder"]["fixed_tokens_estimate"]);
    assert_eq!(here["choices"][0]["message"]["content"], there["choices"][0]["message"]["content"]);
    assert_eq!(here["usage"], there["usage"]);
    let m = metrics_text(&front).await;
    let series = format!("ponder_generated_tokens_total{{model=\"{FRONT}\"}}");
    assert_eq!(metric(&m, &series), there["ponder"]["tokens_generated"].as_f64(), "{m}");
}

#[tokio::test]
async fn a_prm_served_on_another_ponders_pooling_scores_as_the_same_prm_run_locally_and_a_prefix_over_its_context_as_a_failure()
 {
    use ponder::config::{ModelPrmConfig, PrmConfig, RemotePrmConfig, ServedPrm};
    use ponder::prm::model_prm::HeadChoice;
    let dir = tempfile::tempdir().unwrap();
    common::write_prm(dir.path());
    // A ponder that only serves the PRM, in vLLM's pooling format.
    let mut prm_only = ponder::config::Config::default();
    prm_only.models.clear();
    prm_only.prms = vec![ServedPrm { id: "tiny-prm".into(), model: dir.path().into(), lora: None }];
    let prm_server = TestServer::start(prm_only);
    let pooling = |body: Value| {
        let url = prm_server.url("/pooling");
        async move { post_json(&url, &body).await }
    };
    let text = ponder::prm::remote::prompt("What is 2 + 2?", &["2 + 2 = 4".into(), "The answer is 4".into()]);
    let (s, v) =
        pooling(json!({"model": "tiny-prm", "task": "token_classify", "input": [text.clone(), text]})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    let rows = v["data"][0]["data"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "one row per step tag: {v}");
    for r in rows {
        let (bad, good) = (r[0].as_f64().unwrap(), r[1].as_f64().unwrap());
        assert!((bad + good - 1.0).abs() < 1e-5 && (0.0..=1.0).contains(&good), "{r}");
    }
    let (s, v) = pooling(json!({"model": "tiny-prm", "input": "no tags here"})).await;
    assert_eq!((s, &v["error"]["param"]), (400, &json!("input[0]")), "{v}");
    let (s, v) = pooling(json!({"model": "tiny-prm", "task": "embed", "input": "x<extra_0>"})).await;
    assert_eq!((s, &v["error"]["param"]), (400, &json!("task")), "{v}");
    let (s, _) = pooling(json!({"model": "nope", "input": "x<extra_0>"})).await;
    assert_eq!(s, 404);
    let long = format!("{}<extra_0>", "x ".repeat(600));
    let (s, v) = pooling(json!({"model": "tiny-prm", "input": [text.clone(), long]})).await;
    assert_eq!((s, &v["error"]["param"]), (400, &json!("input[1]")), "beyond the PRM's context: {v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("the PRM's context is 512"), "{v}");
    let good_at_last_tag =
        v_first_rows_last_good(&pooling(json!({"model": "tiny-prm", "input": text})).await.1);

    // Scoring through the client: the prefix the server refuses as over its
    // context scores as a certain failure; the others keep their scores.
    let client_config = RemotePrmConfig {
        remote: prm_server.base.clone(),
        format: Default::default(),
        model: "tiny-prm".into(),
        timeout_secs: 30,
        calibration: None,
    };
    let scores = tokio::task::spawn_blocking(move || {
        use ponder::prm::{ScoreItem, Scorer};
        let client = ponder::prm::remote::RemotePrm::new(&client_config, ponder::prm::head::HeadOutput::Raw)
            .expect("no calibration file to load");
        let short = vec!["2 + 2 = 4".to_string(), "The answer is 4".to_string()];
        let long = vec!["x ".repeat(600)];
        let items: Vec<ScoreItem<'_>> = [&short, &long, &short]
            .into_iter()
            .map(|steps| ScoreItem { question: "What is 2 + 2?", steps, hidden: None, logprobs: &[] })
            .collect();
        client.score(&items)
    })
    .await
    .unwrap()
    .expect("an input over the PRM's context does not fail the call");
    let raw: Vec<f32> = scores.iter().map(|s| s.raw.unwrap()).collect();
    assert_eq!(raw[1], 0.0, "{raw:?}");
    for k in [0, 2] {
        assert!((raw[k] as f64 - good_at_last_tag).abs() < 1e-5, "{raw:?} vs {good_at_last_tag}");
    }

    // The same adaptive request: the local engine with the PRM in process,
    // and ponder over that engine with the PRM on the pooling server.
    let mut local = smollm_config();
    local.models.retain(|m| m.id == MODEL);
    local.models[0].prm = Some(PrmConfig::Model(ModelPrmConfig {
        model: dir.path().into(),
        head: HeadChoice::TwoClass,
        lora: None,
    }));
    let engine = TestServer::start(local);
    let mut remote = remote_config(FRONT, &format!("{}/v1", engine.base), MODEL, 60);
    remote.models[0].prm = Some(PrmConfig::Remote(RemotePrmConfig {
        remote: prm_server.base.clone(),
        format: Default::default(),
        model: "tiny-prm".into(),
        timeout_secs: 30,
        calibration: None,
    }));
    let front = TestServer::start(remote);
    let (here, there) = same_request_both_ways(&engine, &front).await;
    let start = |v: &Value| v["ponder"]["success_probability_start"]["q50"].as_f64().unwrap();
    assert!((start(&here) - start(&there)).abs() < 1e-4, "the same PRM score: {here} {there}");
}

/// P(good) at the last step tag of a pooling response's first input.
fn v_first_rows_last_good(v: &Value) -> f64 {
    let rows = v["data"][0]["data"].as_array().unwrap_or_else(|| panic!("a pooling response: {v}"));
    rows.last().unwrap()[1].as_f64().unwrap()
}

#[tokio::test]
async fn the_engines_api_key_is_sent_as_a_bearer_token() {
    let mut c = smollm_config();
    c.models.retain(|m| m.id == MODEL);
    c.server.api_keys = vec!["engine-secret".into()];
    let engine = TestServer::start(c);
    let mut without = remote_config(FRONT, &format!("{}/v1", engine.base), MODEL, 60);
    without.models[0].context_length = Some(2048);
    let front = TestServer::start_unchecked(without, WorkerOptions::default());
    // Until its first probe of the engine has failed the front says it is
    // loading (503); how long that takes depends on the machine's load.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (s, v) = loop {
        let (s, v) = post_json(&front.url("/v1/chat/completions"), &chat(FRONT, json!({}))).await;
        if s != 503 || std::time::Instant::now() > deadline {
            break (s, v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(s, 502, "the engine refuses a request without its key: {v}");
    let mut with = remote_config(FRONT, &format!("{}/v1", engine.base), MODEL, 60);
    if let ponder::config::BackendConfig::Openai(r) = &mut with.models[0].backend {
        r.api_key = Some("engine-secret".into());
    }
    let front = TestServer::start(with);
    let (s, v) = post_json(&front.url("/v1/chat/completions"), &chat(FRONT, json!({}))).await;
    assert_eq!(s, 200, "{v}");
}

/// The same greedy adaptive best-of-N request to the engine itself (its
/// model `MODEL`) and through `front` (its model `FRONT`); asserts that the
/// accounting agrees and returns both answers.
async fn same_request_both_ways(engine: &TestServer, front: &TestServer) -> (Value, Value) {
    // Greedy, so that both sides draw the same samples.
    let reasoning = json!({"strategy": "best_of_n", "budget_rule": "ias", "select": "prm_max", "max_samples": 4,
                           "max_step_tokens": 16, "max_steps": 3});
    let body = |model: &str| {
        json!({"model": model, "messages": [{"role": "user", "content": "What is 7 + 5? Think step by step."}],
               "max_tokens": 48, "temperature": 0, "reasoning": reasoning})
    };
    let (s, here) = post_json(&engine.url("/v1/chat/completions"), &body(MODEL)).await;
    assert_eq!(s, 200, "{here}");
    let (s, there) = post_json(&front.url("/v1/chat/completions"), &body(FRONT)).await;
    assert_eq!(s, 200, "{there}");
    for field in ["samples", "fixed_samples", "tokens_generated", "tokens_saved", "prm_evaluations", "steps"]
    {
        assert_eq!(here["ponder"][field], there["ponder"][field], "{field}: local {here} remote {there}");
    }
    (here, there)
}
