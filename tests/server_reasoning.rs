//! Adaptive reasoning over HTTP with ponder-arith and its calibrated PRM:
//! budgets follow difficulty, and `usage`, the `ponder` object, the
//! `x-ponder-*` headers and the metrics agree.

mod common;

use std::sync::OnceLock;

use common::{TestServer, metric, sse_data};
use serde_json::{Value, json};

const ARITH: &str = "ponder-arith";

/// A server of its own, so metric deltas belong to this binary's requests.
/// Its queue is deep enough that none of them meets a 429 however their
/// requests interleave.
fn server() -> &'static TestServer {
    static S: OnceLock<TestServer> = OnceLock::new();
    S.get_or_init(|| {
        let mut c = common::smollm_config();
        c.queue.capacity = 1024;
        TestServer::start(c)
    })
}

fn question(level: u8, index: usize) -> (String, String) {
    let p = ponder::arith::task::generate(ponder::arith::task::Split::Test, 4)
        .unwrap()
        .into_iter()
        .filter(|p| p.level == level)
        .nth(index)
        .expect("enough problems per level");
    (p.question, p.answer.to_string())
}

fn body(question: &str, reasoning: Value) -> Value {
    json!({"model": ARITH, "messages": [{"role": "user", "content": question}], "max_tokens": 160,
           "temperature": 0.7, "seed": 11, "reasoning": reasoning})
}

async fn post(b: &Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = reqwest::Client::new().post(server().url("/v1/chat/completions")).json(b).send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.json().await.unwrap())
}

fn header(h: &reqwest::header::HeaderMap, name: &str) -> String {
    h.get(name).unwrap_or_else(|| panic!("header {name}")).to_str().unwrap().to_string()
}

#[tokio::test]
async fn easy_questions_draw_fewer_samples_than_hard_ones() {
    let mut easy = Vec::new();
    let mut hard = Vec::new();
    for i in 0..2 {
        for (level, out) in [(1, &mut easy), (6, &mut hard)] {
            let (q, _) = question(level, i);
            let (status, _, v) = post(&body(&q, json!({"strategy": "best_of_n", "max_samples": 32}))).await;
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["ponder"]["adaptive"], true, "adaptive by default with a PRM");
            out.push(v["ponder"]["samples"].as_u64().unwrap());
        }
    }
    assert!(easy.iter().max() < hard.iter().min(), "easy {easy:?} hard {hard:?}");
}

#[tokio::test]
async fn usage_the_ponder_object_the_headers_and_the_metrics_agree() {
    let series = |name: &str| format!("{name}{{model=\"{ARITH}\",strategy=\"beam\"}}");
    let read = |text: &str, name: &str| metric(text, &series(name)).unwrap_or(0.0);
    let before = reqwest::get(server().url("/metrics")).await.unwrap().text().await.unwrap();
    let (q, answer) = question(3, 0);
    let reasoning = json!({"strategy": "beam", "beams": 4, "beam_width": 4, "max_samples": 16, "return_candidates": true});
    let (status, h, v) = post(&body(&q, reasoning)).await;
    assert_eq!(status, 200, "{v}");
    let p = &v["ponder"];
    let u = &v["usage"];
    assert_eq!(p["strategy"], "beam");
    assert_eq!(u["completion_tokens"], p["tokens_generated"]);
    assert_eq!(
        p["tokens_saved"].as_u64().unwrap(),
        p["fixed_tokens_estimate"].as_u64().unwrap() - p["tokens_generated"].as_u64().unwrap()
    );
    // Reasoning tokens are the generated ones outside the returned answer.
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    let chosen = p["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["text"] == text)
        .expect("the answer is a candidate");
    assert_eq!(
        u["completion_tokens_details"]["reasoning_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap() - chosen["tokens"].as_u64().unwrap()
    );
    assert_eq!(chosen["answer"].as_str().unwrap(), ponder::reasoning::select::answer_key(text));
    let _ = answer;
    for (name, field) in [
        ("x-ponder-samples", "samples"),
        ("x-ponder-fixed-samples", "fixed_samples"),
        ("x-ponder-tokens-generated", "tokens_generated"),
        ("x-ponder-fixed-tokens-estimate", "fixed_tokens_estimate"),
        ("x-ponder-tokens-saved", "tokens_saved"),
        ("x-ponder-prm-evaluations", "prm_evaluations"),
        ("x-ponder-steps", "steps"),
    ] {
        assert_eq!(header(&h, name), p[field].to_string(), "{name}");
    }
    assert_eq!(header(&h, "x-ponder-strategy"), "beam");
    let start = &p["success_probability_start"];
    assert_eq!(
        header(&h, "x-ponder-success-probability-start"),
        format!(
            "{:.4},{:.4},{:.4}",
            start["q10"].as_f64().unwrap(),
            start["q50"].as_f64().unwrap(),
            start["q90"].as_f64().unwrap()
        )
    );
    let after = reqwest::get(server().url("/metrics")).await.unwrap().text().await.unwrap();
    let delta = |name: &str| read(&after, name) - read(&before, name);
    assert_eq!(delta("ponder_reasoning_tokens_generated_total"), p["tokens_generated"].as_f64().unwrap());
    assert_eq!(delta("ponder_reasoning_tokens_saved_total"), p["tokens_saved"].as_f64().unwrap());
    assert_eq!(delta("ponder_prm_evaluations_total"), p["prm_evaluations"].as_f64().unwrap());
    assert_eq!(delta("ponder_reasoning_samples_count"), 1.0);
    assert_eq!(delta("ponder_reasoning_samples_sum"), p["samples"].as_f64().unwrap());
    assert_eq!(delta("ponder_prm_success_probability_count"), 1.0);
    assert_eq!(delta("ponder_reasoning_budget_fraction_count"), 1.0);
}

#[tokio::test]
async fn a_streamed_reasoning_answer_ends_with_the_ponder_object_and_usage() {
    let (q, _) = question(2, 1);
    let b = body(&q, json!({"strategy": "best_of_n", "max_samples": 16}));
    let (_, _, full) = post(&b).await;
    let mut s = b.clone();
    s["stream"] = json!(true);
    let text = reqwest::Client::new()
        .post(server().url("/v1/chat/completions"))
        .json(&s)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    let chunks: Vec<Value> =
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let joined: String = chunks
        .iter()
        .flat_map(|c| {
            c["choices"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|x| x["delta"]["content"].as_str())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(joined, full["choices"][0]["message"]["content"].as_str().unwrap());
    let last = chunks.last().unwrap();
    assert_eq!(last["ponder"], full["ponder"]);
    assert_eq!(last["usage"], full["usage"]);
}

#[tokio::test]
async fn reasoning_requests_are_validated_naming_the_field() {
    let smol = |reasoning: Value| json!({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "reasoning": reasoning});
    let cases = [
        (smol(json!({"budget_rule": "give_up"})), "reasoning.budget_rule", "has none"),
        (smol(json!({"strategy": "beam", "adaptive": false})), "reasoning.strategy", "has none"),
        (smol(json!({"select": "prm_max"})), "reasoning.select", "has none"),
        (smol(json!({"strategy": "single", "select": "prm_vote"})), "reasoning.select", "has none"),
        (body("x", json!({"strategy": "beam", "budget_rule": "vote"})), "reasoning.budget_rule", "best_of_n"),
        (body("x", json!({"round_size": 0})), "reasoning.round_size", "got 0"),
        (body("x", json!({"give_up_gain": 1.0})), "reasoning.give_up_gain", "less than 1"),
        (body("x", json!({"confidence": 1.5})), "reasoning.confidence", "1.5"),
        (body("x", json!({"max_samples": 0})), "reasoning.max_samples", "0"),
        (body("x", json!({"budget_quantile": 0.95})), "reasoning.budget_quantile", "0.95"),
        (body("x", json!({"strategy": "greedy"})), "reasoning.strategy", "greedy"),
        (body("x", json!({"beams": 16, "beam_width": 16})), "reasoning.beams", "256"),
    ];
    for (b, param, needle) in cases {
        let (status, _, v) = post(&b).await;
        assert_eq!(status, 400, "{b} -> {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(needle), "{v}");
    }
    // A model without a PRM still takes a fixed majority vote...
    let (status, _, v) = post(&smol(
        json!({"strategy": "best_of_n", "select": "majority", "max_samples": 2, "adaptive": false}),
    ))
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["ponder"]["adaptive"], false);
    assert_eq!(v["ponder"]["samples"], 2);
    assert_eq!(
        (v["ponder"]["budget_rule"].clone(), v["ponder"]["stop_reason"].clone()),
        (json!(null), json!("budget"))
    );
    // ...and, by default, an adaptive one: rounds of samples until the vote is clear.
    let (status, _, v) = post(&smol(json!({"max_samples": 6, "round_size": 2}))).await;
    assert_eq!(status, 200, "{v}");
    let p = &v["ponder"];
    assert_eq!(
        (p["adaptive"].clone(), p["budget_rule"].clone(), p["select"].clone()),
        (json!(true), json!("vote"), json!("majority"))
    );
    let samples = p["samples"].as_u64().unwrap();
    assert!((2..=6).contains(&samples) && samples % 2 == 0, "{p}");
    assert_eq!(p["rounds"].as_u64().unwrap(), samples / 2, "{p}");
    let stop = p["stop_reason"].as_str().unwrap();
    assert!(stop == "confident" || (stop == "exhausted" && samples == 6), "{p}");
    assert_eq!(p["success_probability_start"], json!(null), "no PRM was asked");
}

#[tokio::test]
async fn a_completions_prompt_in_the_chat_template_is_searched_as_the_chat_question() {
    // The prompt a client builds with the model's template: the PRM must
    // read the question inside it, not the template's markup.
    let tok = ponder::tokenizer::Tokenizer::from_hf_dir(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/ponder-arith"),
    )
    .unwrap();
    let (q, answer) = question(1, 1);
    let turn = [ponder::tokenizer::ChatMessage { role: "user".into(), content: q.clone() }];
    let prompt = tok.apply_chat_template(&turn).unwrap();
    let reasoning = json!({"strategy": "best_of_n", "max_samples": 16});
    let (status, _, chat) = post(&body(&q, reasoning.clone())).await;
    assert_eq!(status, 200, "{chat}");
    let mut completion = body(&q, reasoning);
    let fields = completion.as_object_mut().unwrap();
    fields.remove("messages");
    fields.insert("prompt".into(), Value::String(prompt));
    let r =
        reqwest::Client::new().post(server().url("/v1/completions")).json(&completion).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["ponder"]["stop_reason"], "confident", "{v}");
    for key in ["samples", "stop_reason", "success_probability_selected"] {
        assert_eq!(v["ponder"][key], chat["ponder"][key], "{key}: completions {v} chat {chat}");
    }
    assert!(v["choices"][0]["text"].as_str().unwrap().contains(&answer), "{v}");
}
