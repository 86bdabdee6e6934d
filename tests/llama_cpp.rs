//! ponder in front of a real engine: llama.cpp's `llama-server` (built by
//! `scripts/install_test_tools.sh` from the llama.cpp sources in PyPI's
//! llama-cpp-python) serving SmolLM2's GGUF on loopback, with
//! `server = "llama_cpp"`. Plain chat and completions, streaming, `n`,
//! stop lists and seeds through ponder agree with the engine's own answers;
//! reasoning requests run over it with a PRM that a second ponder serves
//! on `/pooling`; an engine killed mid-request gives 502 and ponder stays up.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::{Child, TestServer, blocking_get, free_port, metric, remote_config, sse_data, tool};
use ponder::config::{BackendConfig, EngineServer, PrmConfig, RemotePrmConfig, ServedPrm};
use serde_json::{Value, json};

/// The engine's name for the model (its `--alias`), and ponder's.
const ENGINE_MODEL: &str = "smollm2-llama";
const FRONT: &str = "smollm2-via-llama-cpp";

/// A llama-server on `port`, killed when dropped.
struct Llama {
    base: String,
    child: Child,
}

impl Llama {
    fn start(port: u16) -> Self {
        let log =
            std::fs::File::create(std::env::temp_dir().join(format!("llama-server-{port}.log"))).unwrap();
        // Held by the guard at once, so that a server that never becomes
        // healthy is killed when the panic below unwinds.
        let child = Child(
            Command::new(tool("llama-server"))
                .args(["-m", common::smollm_path().to_str().unwrap(), "--host", "127.0.0.1"])
                .args(["--port", &port.to_string(), "--alias", ENGINE_MODEL, "--parallel", "4"])
                // Four slots of 2048 tokens; one thread, as ponder's tests use.
                .args(["-c", "8192", "-t", "1", "--no-webui", "--no-warmup"])
                // A cached prefix's logits are not bit-for-bit those of a fresh
                // prefill, so the seeded answers compared here would drift.
                .arg("--no-cache-prompt")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("llama-server starts"),
        );
        let base = format!("http://127.0.0.1:{port}");
        for _ in 0..600 {
            if blocking_get(&format!("{base}/health")).is_ok_and(|(s, _)| s == 200) {
                return Self { base, child };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("llama-server on port {port} never became healthy");
    }
}

/// ponder serving `FRONT` from the llama-server at `engine`.
fn front_config(engine: &str) -> ponder::config::Config {
    let mut c = remote_config(FRONT, &format!("{engine}/v1"), ENGINE_MODEL, 60);
    if let BackendConfig::Openai(r) = &mut c.models[0].backend {
        r.server = EngineServer::LlamaCpp;
    }
    c
}

/// One engine and one ponder in front of it, shared by the tests that do
/// not kill the engine.
fn shared() -> &'static (Llama, TestServer) {
    static S: OnceLock<(Llama, TestServer)> = OnceLock::new();
    S.get_or_init(|| {
        let llama = Llama::start(free_port());
        let front = TestServer::start(front_config(&llama.base));
        (llama, front)
    })
}

async fn post(url: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(url).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The engine's own answer to `prompt` (token ids), one choice.
async fn engine_answer(prompt: &[u32], extra: Value) -> Value {
    // Sampling as ponder asks for it: no top-k or min-p (llama.cpp's own
    // defaults are 40 and 0.05).
    let mut body = json!({"model": ENGINE_MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0.0,
                          "top_p": 1.0, "top_k": 0, "min_p": 0.0});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let (s, v) = post(&format!("{}/v1/completions", shared().0.base), &body).await;
    assert_eq!(s, 200, "{v}");
    v
}

/// The token ids ponder sends for a chat message (the chat template of the
/// GGUF, rendered by ponder's tokenizer).
fn chat_prompt(user: &str) -> Vec<u32> {
    let tok = ponder::tokenizer::Tokenizer::from_gguf_file(&common::smollm_path()).unwrap();
    let text =
        tok.apply_chat_template(&[ponder::tokenizer::ChatMessage::new("user", user.to_string())]).unwrap();
    tok.encode(&text, ponder::tokenizer::AddSpecial::No).unwrap()
}

#[tokio::test]
async fn greedy_chat_and_completions_through_ponder_equal_llama_cpps_own_answers() {
    let front = &shared().1;
    let question = "Name a colour of the sky.";
    let own = engine_answer(&chat_prompt(question), json!({})).await;
    let body = json!({"model": FRONT, "messages": [{"role": "user", "content": question}], "max_tokens": 24,
                      "temperature": 0.0});
    let (s, v) = post(&front.url("/v1/chat/completions"), &body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], own["choices"][0]["text"], "{v}\n{own}");
    assert_eq!(v["usage"]["completion_tokens"], own["usage"]["completion_tokens"]);
    assert_eq!(v["usage"]["prompt_tokens"], own["usage"]["prompt_tokens"]);

    // A text prompt to /v1/completions, streamed and not.
    let prompt = "The three primary colours are";
    let ids = {
        let tok = ponder::tokenizer::Tokenizer::from_gguf_file(&common::smollm_path()).unwrap();
        tok.encode(prompt, ponder::tokenizer::AddSpecial::Yes).unwrap()
    };
    let own = engine_answer(&ids, json!({})).await;
    let body = json!({"model": FRONT, "prompt": prompt, "max_tokens": 24, "temperature": 0.0});
    let (s, v) = post(&front.url("/v1/completions"), &body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], own["choices"][0]["text"]);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let r = reqwest::Client::new().post(front.url("/v1/completions")).json(&streamed).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut text = String::new();
    let mut usage = Value::Null;
    for data in sse_data(&r.text().await.unwrap()) {
        if data == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(&data).unwrap();
        if let Some(t) = chunk["choices"][0]["text"].as_str() {
            text.push_str(t);
        }
        if !chunk["usage"].is_null() {
            usage = chunk["usage"].clone();
        }
    }
    assert_eq!(Value::String(text), own["choices"][0]["text"], "the stream spells the same answer");
    assert_eq!(usage["completion_tokens"], own["usage"]["completion_tokens"]);
}

#[tokio::test]
async fn n_choices_are_one_call_each_with_the_seed_shifted_and_repeat_with_the_seed() {
    let front = &shared().1;
    let question = "Write one word about the sea.";
    let body = json!({"model": FRONT, "messages": [{"role": "user", "content": question}], "max_tokens": 12,
                      "temperature": 1.0, "seed": 40, "n": 3});
    let (s, first) = post(&front.url("/v1/chat/completions"), &body).await;
    assert_eq!(s, 200, "{first}");
    let texts = |v: &Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["message"]["content"].as_str().unwrap().into())
            .collect()
    };
    assert_eq!(texts(&first).len(), 3);
    let (_, again) = post(&front.url("/v1/chat/completions"), &body).await;
    assert_eq!(texts(&first), texts(&again), "the same seed, the same choices");
    // Choice i is the engine's answer with seed 40 + i, as vLLM numbers them.
    let prompt = chat_prompt(question);
    let mut tokens = 0;
    for (i, text) in texts(&first).iter().enumerate() {
        let own = engine_answer(&prompt, json!({"max_tokens": 12, "temperature": 1.0, "seed": 40 + i})).await;
        assert_eq!(own["choices"][0]["text"].as_str(), Some(text.as_str()), "choice {i}");
        tokens += own["usage"]["completion_tokens"].as_u64().unwrap();
    }
    assert_eq!(first["usage"]["completion_tokens"].as_u64(), Some(tokens), "each choice's tokens counted");
}

#[tokio::test]
async fn a_stop_list_ends_the_answer_before_the_stop_string_and_names_it() {
    let front = &shared().1;
    let question = "List three colours, one per line.";
    let own = engine_answer(&chat_prompt(question), json!({"max_tokens": 40})).await;
    let full = own["choices"][0]["text"].as_str().unwrap().to_string();
    let cut = full.find('\n').expect("the engine's answer has several lines");
    let body = json!({"model": FRONT, "prompt": chat_prompt(question), "max_tokens": 40, "temperature": 0.0,
                      "stop": ["\n", "zebra"]});
    let (s, v) = post(&front.url("/v1/completions"), &body).await;
    assert_eq!(s, 200, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["text"].as_str(), Some(&full[..cut]), "{v}");
    assert_eq!(c["finish_reason"], "stop");
    assert_eq!(c["stop_reason"], "\n", "llama.cpp's stopping_word, as vLLM's stop_reason: {v}");
}

/// A ponder that serves only a tiny random PRM on `/pooling`.
fn prm_server(dir: &std::path::Path) -> TestServer {
    common::write_prm(dir);
    let mut c = ponder::config::Config::default();
    c.models.clear();
    c.prms = vec![ServedPrm { id: "tiny-prm".into(), model: PathBuf::from(dir), lora: None }];
    TestServer::start(c)
}

#[tokio::test]
async fn reasoning_runs_over_llama_cpp_scored_by_a_prm_on_another_ponders_pooling() {
    let llama = &shared().0;
    let dir = tempfile::tempdir().unwrap();
    let prm = prm_server(dir.path());
    let mut c = front_config(&llama.base);
    c.models[0].prm = Some(PrmConfig::Remote(RemotePrmConfig {
        remote: prm.base.clone(),
        format: Default::default(),
        model: "tiny-prm".into(),
        timeout_secs: 30,
        calibration: None,
    }));
    let front = TestServer::start(c);
    // Short answers: the tiny PRM's context is 512 of its (character-level) tokens.
    let ask = |reasoning: Value| {
        json!({"model": FRONT, "messages": [{"role": "user", "content": "What is 3 + 4? Think step by step."}],
               "max_tokens": 40, "temperature": 0.8, "seed": 7, "reasoning": reasoning})
    };
    let series = format!("ponder_generated_tokens_total{{model=\"{FRONT}\"}}");
    let generated = || metric(&blocking_get(&front.url("/metrics")).unwrap().1, &series).unwrap_or(0.0);

    // Adaptive best-of-N: the PRM's start score sets the budget.
    let before = generated();
    let (s, v) = post(
        &front.url("/v1/chat/completions"),
        &ask(json!({"strategy": "best_of_n", "budget_rule": "ias", "select": "prm_max", "max_samples": 4, "max_step_tokens": 16})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let p = &v["ponder"];
    assert_eq!(p["adaptive"], true, "{p}");
    let samples = p["samples"].as_u64().unwrap();
    assert!((1..=4).contains(&samples), "{p}");
    assert!(p["prm_evaluations"].as_u64().unwrap() >= samples, "the remote PRM scored the samples: {p}");
    assert!(!v["choices"][0]["message"]["content"].as_str().unwrap().is_empty());
    assert_eq!(
        Some(generated() - before),
        p["tokens_generated"].as_f64(),
        "the metric counts the tokens: {p}"
    );

    // A beam search prunes over the same engine.
    let (s, v) = post(
        &front.url("/v1/chat/completions"),
        &ask(json!({"strategy": "beam", "beams": 2, "beam_width": 2, "max_step_tokens": 16, "max_steps": 3})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["ponder"]["strategy"], "beam", "{v}");
}

#[tokio::test]
async fn an_engine_killed_mid_request_gives_502_and_ponder_stays_up() {
    let port = free_port();
    let mut llama = Llama::start(port);
    let mut c = front_config(&llama.base);
    c.models[0].context_length = Some(2048);
    let front = TestServer::start(c);
    let long = json!({"model": FRONT, "messages": [{"role": "user", "content": "Count from 1 to 1000, one number per line."}],
                      "max_tokens": 1500, "temperature": 0.0});
    let url = front.url("/v1/chat/completions");
    let request = tokio::spawn(async move { post(&url, &long).await });
    // Kill the engine once it has decoded some of the answer (its /slots
    // says so), not after a fixed sleep: on a loaded machine the prompt may
    // not even have been read by then, and on a fast one the answer done.
    let decoding = wait_for_decoding(&llama.base, 8).await;
    if request.is_finished() {
        let (s, v) = request.await.unwrap();
        panic!("the request ended before the engine died ({s}): {v}");
    }
    assert!(decoding, "llama-server's /slots never showed the request decoding");
    llama.child.0.kill().unwrap();
    llama.child.0.wait().unwrap();
    let (s, v) = tokio::time::timeout(Duration::from_secs(30), request).await.expect("no hang").unwrap();
    assert_eq!(s, 502, "{v}");
    assert_eq!(v["error"]["code"], "engine_error", "{v}");

    // ponder answers on: /health says why, and new requests get 502 at once.
    let mut unreachable = false;
    for _ in 0..100 {
        let (status, body) = blocking_get(&front.url("/health")).unwrap();
        if status == 503 && body.contains("unreachable") {
            unreachable = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(unreachable, "/health reports the engine unreachable");
    let short = json!({"model": FRONT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    let (s, v) = post(&front.url("/v1/chat/completions"), &short).await;
    assert_eq!(s, 502, "{v}");
    assert_eq!(blocking_get(&front.url("/v1/models")).unwrap().0, 200);

    // The engine comes back on the same port, and so does the model.
    let _llama = Llama::start(port);
    let mut ok = false;
    for _ in 0..100 {
        if blocking_get(&front.url("/health")).unwrap().0 == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "/health is 200 again once the engine answers");
    let (s, v) = post(&front.url("/v1/chat/completions"), &short).await;
    assert_eq!(s, 200, "{v}");
}

/// Waits (up to 60 s) until a slot of the llama-server at `base` is
/// processing a request that has decoded at least `tokens` tokens.
async fn wait_for_decoding(base: &str, tokens: u64) -> bool {
    for _ in 0..600 {
        if let Ok((200, body)) = blocking_get(&format!("{base}/slots")) {
            let slots: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let busy = slots.as_array().into_iter().flatten().any(|slot| {
                slot["is_processing"] == true
                    && slot["next_token"][0]["n_decoded"].as_u64().unwrap_or(0) >= tokens
            });
            if busy {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
