//! The OpenAI-compatible routes end to end, over loopback, with the default
//! model.

mod common;

use common::{MODEL, shared_server, sse_data};
use serde_json::{Value, json};

async fn post(path: &str, body: Value) -> (u16, String) {
    let r = reqwest::Client::new().post(shared_server().url(path)).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn post_json(path: &str, body: Value) -> Value {
    let (status, text) = post(path, body).await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// Reassembles streamed chat chunks: per choice (text, finish_reason), and the usage chunk.
fn reassemble_chat(body: &str) -> (Vec<(String, Option<String>)>, Option<Value>) {
    let mut choices: Vec<(String, Option<String>)> = Vec::new();
    let mut usage = None;
    let data = sse_data(body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
        }
        for c in v["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            if choices.len() <= i {
                choices.resize(i + 1, (String::new(), None));
            }
            if let Some(t) = c["delta"]["content"].as_str() {
                choices[i].0.push_str(t);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                choices[i].1 = Some(f.to_string());
            }
        }
    }
    (choices, usage)
}

fn chat_body(extra: Value) -> Value {
    let mut b = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Give me two tips for learning to cook."}],
        "max_tokens": 24,
    });
    b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    b
}

#[tokio::test]
async fn chat_stream_reassembled_equals_the_non_streamed_result_greedy_and_seeded() {
    for extra in [json!({"temperature": 0}), json!({"temperature": 0.9, "seed": 1234})] {
        let full = post_json("/v1/chat/completions", chat_body(extra.clone())).await;
        let mut streamed = chat_body(extra.clone());
        streamed["stream"] = json!(true);
        streamed["stream_options"] = json!({"include_usage": true});
        let (status, body) = post("/v1/chat/completions", streamed).await;
        assert_eq!(status, 200);
        let (choices, usage) = reassemble_chat(&body);
        assert_eq!(choices.len(), 1);
        assert_eq!(choices[0].0, full["choices"][0]["message"]["content"].as_str().unwrap(), "{extra}");
        assert_eq!(choices[0].1.as_deref(), full["choices"][0]["finish_reason"].as_str());
        assert_eq!(usage.unwrap(), full["usage"]);
    }
}

#[tokio::test]
async fn completion_stream_reassembled_equals_the_non_streamed_result() {
    let body = json!({"model": MODEL, "prompt": "The three primary colours are", "max_tokens": 16, "temperature": 0.8, "seed": 9});
    let full = post_json("/v1/completions", body.clone()).await;
    assert_eq!(full["object"], "text_completion");
    let mut s = body.clone();
    s["stream"] = json!(true);
    let (_, text) = post("/v1/completions", s).await;
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let mut joined = String::new();
    let mut finish = None;
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        assert!(v.get("usage").is_none(), "no usage field unless asked for");
        joined.push_str(v["choices"][0]["text"].as_str().unwrap());
        finish = v["choices"][0]["finish_reason"].as_str().map(str::to_string).or(finish);
    }
    assert_eq!(joined, full["choices"][0]["text"].as_str().unwrap());
    assert_eq!(finish.as_deref(), full["choices"][0]["finish_reason"].as_str());
}

#[tokio::test]
async fn n_choices_are_distinct_samples_and_usage_counts_them_all() {
    let v =
        post_json("/v1/chat/completions", chat_body(json!({"n": 3, "temperature": 1.0, "seed": 5}))).await;
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let texts: std::collections::HashSet<&str> =
        choices.iter().map(|c| c["message"]["content"].as_str().unwrap()).collect();
    assert!(texts.len() > 1, "{texts:?}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
    }
    let u = &v["usage"];
    assert!(u["completion_tokens"].as_u64().unwrap() > 24, "three choices of up to 24 tokens: {u}");
    assert_eq!(
        u["total_tokens"],
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    // Streamed, the three choices interleave and reassemble to the same texts.
    let mut s = chat_body(json!({"n": 3, "temperature": 1.0, "seed": 5, "stream": true}));
    s["stream"] = json!(true);
    let (_, body) = post("/v1/chat/completions", s).await;
    let (streamed, _) = reassemble_chat(&body);
    let got: Vec<&str> = streamed.iter().map(|c| c.0.as_str()).collect();
    let want: Vec<&str> = choices.iter().map(|c| c["message"]["content"].as_str().unwrap()).collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn a_seed_reproduces_a_completion_and_another_seed_changes_it() {
    let body = |seed| json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 20, "temperature": 1.0, "seed": seed});
    let a = post_json("/v1/completions", body(1)).await;
    let b = post_json("/v1/completions", body(1)).await;
    let c = post_json("/v1/completions", body(2)).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    assert_ne!(a["choices"][0]["text"], c["choices"][0]["text"]);
}

#[tokio::test]
async fn a_stop_string_ends_the_choice_before_it_with_finish_reason_stop() {
    let base =
        json!({"model": MODEL, "prompt": "Count: 1, 2, 3, 4, 5, 6, 7,", "max_tokens": 24, "temperature": 0});
    let free = post_json("/v1/completions", base.clone()).await;
    let text = free["choices"][0]["text"].as_str().unwrap().to_string();
    let stop = " 9";
    let at = text.find(stop).expect("greedy counting reaches 9");
    let mut stopped = base.clone();
    stopped["stop"] = json!([stop, "never appears"]);
    let v = post_json("/v1/completions", stopped.clone()).await;
    assert_eq!(v["choices"][0]["text"], text[..at]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    stopped["stream"] = json!(true);
    let (_, body) = post("/v1/completions", stopped).await;
    let joined: String = sse_data(&body)
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(joined, text[..at], "the stop string is never streamed");
}

#[tokio::test]
async fn logprobs_come_per_token_in_both_formats() {
    let v = post_json(
        "/v1/chat/completions",
        chat_body(json!({"temperature": 0, "logprobs": true, "top_logprobs": 2, "max_tokens": 6})),
    )
    .await;
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len() as u64, v["usage"]["completion_tokens"].as_u64().unwrap());
    for t in content {
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0]["token"], t["token"], "greedy picks the most likely token");
        assert_eq!(t["bytes"].as_array().unwrap().len(), t["token"].as_str().unwrap().len(), "ASCII tokens");
    }
    let joined: String = content.iter().map(|t| t["token"].as_str().unwrap()).collect();
    assert_eq!(joined, v["choices"][0]["message"]["content"].as_str().unwrap());

    let c = post_json(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0, "logprobs": 3}),
    )
    .await;
    let lp = &c["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 4);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 3);
    assert_eq!(lp["text_offset"][0], 0);
    let no = post_json("/v1/completions", json!({"model": MODEL, "prompt": "Hello", "max_tokens": 2})).await;
    assert!(no["choices"][0]["logprobs"].is_null());
}

/// Completions logprobs of a whole answer, or of a stream's chunks put
/// together: (tokens, text_offset, token_ids).
fn completion_tokens(chunks: &[Value]) -> (Vec<String>, Vec<u64>, Vec<u64>) {
    let (mut tokens, mut offsets, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    for c in chunks {
        let lp = &c["choices"][0]["logprobs"];
        if !lp.is_null() {
            tokens.extend(lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()));
            offsets.extend(lp["text_offset"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()));
        }
        if let Some(t) = c["choices"][0]["token_ids"].as_array() {
            ids.extend(t.iter().map(|i| i.as_u64().unwrap()));
        }
    }
    (tokens, offsets, ids)
}

#[tokio::test]
async fn logprobs_cover_exactly_the_returned_text_streamed_or_whole_a_stop_strings_tokens_keep_only_their_ids()
 {
    let body = json!({"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 16, "temperature": 0,
        "stop": "6, 7", "logprobs": 1, "return_token_ids": true});
    let whole = post_json("/v1/completions", body.clone()).await;
    let c = &whole["choices"][0];
    assert_eq!(
        (c["finish_reason"].as_str(), c["stop_reason"].as_str()),
        (Some("stop"), Some("6, 7")),
        "{whole}"
    );
    let text = c["text"].as_str().unwrap();
    let (tokens, offsets, ids) = completion_tokens(std::slice::from_ref(&whole));
    assert_eq!(tokens.concat(), text, "logprobs cover the text and not the stop string");
    let chars: Vec<char> = text.chars().collect();
    for (t, &o) in tokens.iter().zip(&offsets) {
        let at: String = chars[o as usize..].iter().collect();
        assert!(at.starts_with(t.as_str()), "offset {o} of {t:?} in {text:?}");
    }
    assert_eq!(
        ids.len() as u64,
        whole["usage"]["completion_tokens"].as_u64().unwrap(),
        "every id is returned"
    );
    assert!(ids.len() > tokens.len(), "the stop string's tokens keep their ids");

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (_, sse) = post("/v1/completions", streamed).await;
    let data = sse_data(&sse);
    let chunks: Vec<Value> =
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(
        completion_tokens(&chunks),
        (tokens, offsets, ids),
        "a stream carries what the whole answer does"
    );
}

#[tokio::test]
async fn logprob_bytes_are_the_tokens_raw_bytes_and_offsets_count_characters() {
    let chat = post_json(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Reply with three emoji: 🙂🙂"}],
            "max_tokens": 6, "temperature": 0, "logprobs": true}),
    )
    .await;
    let content = chat["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!content.is_ascii(), "the reply holds multi-byte characters: {content:?}");
    let bytes: Vec<u8> = chat["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8))
        .collect();
    assert_eq!(
        String::from_utf8(bytes).unwrap(),
        content,
        "the tokens' bytes put the characters back together"
    );

    let c = post_json(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Café, café, café, café,", "max_tokens": 8, "temperature": 0, "logprobs": 1}),
    )
    .await;
    let text: Vec<char> = c["choices"][0]["text"].as_str().unwrap().chars().collect();
    let (tokens, offsets, _) = completion_tokens(std::slice::from_ref(&c));
    assert!(tokens.iter().any(|t| !t.is_ascii()), "{tokens:?}");
    for (t, &o) in tokens.iter().zip(&offsets) {
        let at: String = text[o as usize..].iter().collect();
        assert!(at.starts_with(t.as_str()), "offset {o} of {t:?}");
    }
}

#[tokio::test]
async fn several_prompts_each_get_n_choices_in_order() {
    let v = post_json("/v1/completions", json!({"model": MODEL, "prompt": ["Red is a", "Blue is a"], "n": 2, "max_tokens": 3, "temperature": 0})).await;
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    // Greedy: both choices of a prompt agree; the two prompts differ.
    assert_eq!(choices[0]["text"], choices[1]["text"]);
    assert_eq!(choices[2]["text"], choices[3]["text"]);
}

#[tokio::test]
async fn models_health_metrics_and_the_openapi_document_are_served() {
    let client = reqwest::Client::new();
    let s = shared_server();
    let models: Value = client.get(s.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    let health = client.get(s.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let r = client.get(s.url("/openapi.yaml")).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "application/yaml");
    assert!(r.text().await.unwrap().starts_with("openapi: 3.1"));
    post_json("/v1/completions", json!({"model": MODEL, "prompt": "Hi", "max_tokens": 2})).await;
    let text = client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for name in [
        "ponder_http_requests_total{route=\"/v1/completions\",status=\"200\"}",
        "ponder_generated_tokens_total{model=\"smollm2-135m-instruct\"}",
        "ponder_prompt_tokens_total{model=\"smollm2-135m-instruct\"}",
    ] {
        assert!(common::metric(&text, name).is_some_and(|v| v > 0.0), "{name}");
    }
    for family in [
        "ponder_time_to_first_token_seconds",
        "ponder_inter_token_latency_seconds",
        "ponder_queue_duration_seconds",
        "ponder_http_request_duration_seconds",
        "ponder_batch_size_sequences",
        "ponder_queue_depth_sequences",
        "ponder_running_sequences",
        "ponder_kv_cache_bytes",
    ] {
        assert!(text.contains(&format!("# TYPE {family}")), "{family}");
    }
}
