//! `openapi.yaml` documents exactly the router's routes, and live responses
//! validate against its schemas.

mod common;

use std::collections::BTreeSet;

use common::{MODEL, shared_server, sse_data};
use serde_json::{Value, json};

fn document() -> Value {
    serde_yaml_ng::from_str(ponder::api::OPENAPI_YAML).expect("openapi.yaml parses")
}

/// Asserts `instance` is valid against `#/components/schemas/{name}`.
fn check(doc: &Value, name: &str, instance: &Value) {
    let schema = json!({"$ref": format!("#/components/schemas/{name}"), "components": doc["components"]});
    let validator = jsonschema::validator_for(&schema).expect("the schema compiles");
    let errors: Vec<String> =
        validator.iter_errors(instance).map(|e| format!("{e} at {}", e.instance_path())).collect();
    assert!(errors.is_empty(), "{name}: {errors:?}\n{instance}");
}

#[test]
fn every_route_of_the_router_is_documented_and_nothing_else() {
    let doc = document();
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object().unwrap().keys().map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    // axum writes a wildcard segment `{*name}`; OpenAPI a path parameter `{name}`.
    let served: BTreeSet<(String, String)> =
        ponder::api::ROUTES.iter().map(|(m, p)| (m.to_string(), p.replace("{*", "{"))).collect();
    assert_eq!(documented, served);
    assert_eq!(doc["openapi"], "3.1.0");
}

async fn call(method: &str, path: &str, body: Option<Value>) -> (u16, String) {
    let client = reqwest::Client::new();
    let url = shared_server().url(path);
    let r = match body {
        Some(b) => client.request(method.parse().unwrap(), url).json(&b).send().await.unwrap(),
        None => client.request(method.parse().unwrap(), url).send().await.unwrap(),
    };
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn live_responses_validate_against_the_documented_schemas() {
    let doc = document();
    let chat_req = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
        "logprobs": true, "top_logprobs": 2, "n": 2, "seed": 1});
    check(&doc, "ChatCompletionRequest", &chat_req);
    let (status, body) = call("POST", "/v1/chat/completions", Some(chat_req.clone())).await;
    assert_eq!(status, 200);
    check(&doc, "ChatCompletion", &serde_json::from_str(&body).unwrap());

    let mut stream_req = chat_req.clone();
    stream_req["stream"] = json!(true);
    stream_req["stream_options"] = json!({"include_usage": true});
    let (_, body) = call("POST", "/v1/chat/completions", Some(stream_req)).await;
    for d in sse_data(&body).iter().filter(|d| *d != "[DONE]") {
        check(&doc, "ChatCompletionChunk", &serde_json::from_str(d).unwrap());
    }

    let comp_req =
        json!({"model": MODEL, "prompt": ["a", "b"], "max_tokens": 3, "logprobs": 2, "stop": "\n"});
    check(&doc, "CompletionRequest", &comp_req);
    let (status, body) = call("POST", "/v1/completions", Some(comp_req.clone())).await;
    assert_eq!(status, 200);
    check(&doc, "Completion", &serde_json::from_str(&body).unwrap());
    let mut stream_req = comp_req.clone();
    stream_req["stream"] = json!(true);
    let (_, body) = call("POST", "/v1/completions", Some(stream_req)).await;
    for d in sse_data(&body).iter().filter(|d| *d != "[DONE]") {
        check(&doc, "Completion", &serde_json::from_str(d).unwrap());
    }

    let (_, body) = call("GET", "/v1/models", None).await;
    check(&doc, "ModelList", &serde_json::from_str(&body).unwrap());
    let (status, body) = call("GET", &format!("/v1/models/{MODEL}"), None).await;
    assert_eq!(status, 200, "{body}");
    let card: Value = serde_json::from_str(&body).unwrap();
    check(&doc, "Model", &card);
    assert_eq!(card["id"], MODEL);
    let (status, body) = call("GET", "/v1/models/Qwen/not-served", None).await;
    assert_eq!(status, 404);
    check(&doc, "Error", &serde_json::from_str(&body).unwrap());
    assert!(body.contains("Qwen/not-served"), "{body}");
    let (_, body) = call("GET", "/health", None).await;
    check(&doc, "Health", &serde_json::from_str(&body).unwrap());
    for (path, bad) in [
        ("/v1/chat/completions", json!({"model": MODEL, "messages": []})),
        ("/v1/chat/completions", json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]})),
        ("/v1/completions", json!({"model": MODEL, "prompt": "x", "n": 99})),
    ] {
        let (status, body) = call("POST", path, Some(bad)).await;
        assert!(status == 400 || status == 404);
        check(&doc, "Error", &serde_json::from_str(&body).unwrap());
    }
}

#[test]
fn the_schema_check_rejects_a_response_that_breaks_the_document() {
    let doc = document();
    let bad = json!({"id": "x", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": 3}, "logprobs": null, "finish_reason": "done"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}});
    let caught = std::panic::catch_unwind(|| check(&doc, "ChatCompletion", &bad));
    assert!(caught.is_err());
}
