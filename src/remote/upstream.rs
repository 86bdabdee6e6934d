//! The HTTP client side of a remote OpenAI-compatible engine: the
//! `/v1/completions` request ponder sends (prompt as token ids), in vLLM's
//! or llama.cpp's dialect, split into calls of at most `max_n` choices; the
//! answer it reads back, whole or as streamed chunks (server-sent events);
//! the `/v1/models` probe (context length); and how transport failures map
//! to 502 or 504.

use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::backend::UpstreamFailure;
use crate::config::{EngineServer, RemoteEngine};

/// Longest wait for a TCP connection to the engine.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the `/v1/models` probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a call to the engine failed; the text goes to the log only.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {url}: {source}")]
    Connect { url: String, source: reqwest::Error },
    #[error("no answer from {url} within {secs} s")]
    Timeout { url: String, secs: u64 },
    #[error("{url} answered {status}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error("{url}: {message}")]
    Protocol { url: String, message: String },
}

impl UpstreamError {
    /// What the client is told: 504 for a timeout, 502 otherwise.
    pub fn failure(&self) -> UpstreamFailure {
        match self {
            UpstreamError::Timeout { .. } => UpstreamFailure::Timeout,
            _ => UpstreamFailure::BadGateway,
        }
    }
}

fn is_zero(x: &f32) -> bool {
    *x == 0.0
}

/// vLLM's `/v1/completions` body, as ponder sends it. Fields the engine
/// does not know are ignored by vLLM, SGLang, TGI and llama.cpp alike.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionCall {
    pub model: String,
    /// Token ids: the engine does not tokenize again, so ponder's counts hold.
    pub prompt: Vec<u32>,
    pub n: usize,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// Absent when off: engines disagree on how to say "off" (-1 or 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// llama.cpp only: 0, since its default (0.05) would filter tokens the
    /// request did not ask to filter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    /// OpenAI's penalties, which every engine reads under these names;
    /// left out when 0 (the engines' default).
    #[serde(skip_serializing_if = "is_zero")]
    pub presence_penalty: f32,
    #[serde(skip_serializing_if = "is_zero")]
    pub frequency_penalty: f32,
    pub seed: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<usize>,
    pub stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptionsCall>,
    /// vLLM: keep the matched stop string in the text (a reasoning step
    /// ends with its delimiter). Engines that drop it anyway (llama.cpp)
    /// name it in `stopping_word`, and ponder puts it back.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub include_stop_str_in_output: bool,
    /// vLLM (0.10.2 and later): the generated token ids; llama.cpp's
    /// equivalent is `return_tokens`. Without them ponder re-tokenizes the text.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub return_token_ids: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub return_tokens: bool,
    /// llama.cpp: add `__verbose` (tokens, stopping word) to the answer.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub verbose: bool,
}

/// A completion: a whole one, or one streamed chunk of it (the same shape).
#[derive(Debug, Clone, Deserialize)]
pub struct Completion {
    #[serde(default)]
    pub choices: Vec<CompletionChoice>,
    #[serde(default)]
    pub usage: Option<ChunkUsage>,
    /// llama.cpp's native result beside the OpenAI one (asked with
    /// `verbose`); of the first choice only, so calls ask for one.
    #[serde(default, rename = "__verbose")]
    verbose: Option<LlamaVerbose>,
}

#[derive(Debug, Clone, Deserialize)]
struct LlamaVerbose {
    #[serde(default)]
    tokens: Vec<u32>,
    #[serde(default)]
    stopping_word: String,
}

impl Completion {
    /// Moves what llama.cpp's `__verbose` says of a lone choice into the
    /// fields vLLM uses: its tokens (the stop string's included) and the
    /// stop string it met, which its text leaves out.
    fn normalized(mut self) -> Self {
        if let (Some(v), [c]) = (self.verbose.take(), self.choices.as_mut_slice()) {
            if c.token_ids.is_none() && !v.tokens.is_empty() {
                c.token_ids = Some(v.tokens);
            }
            if c.stopping_word.is_none() && !v.stopping_word.is_empty() {
                c.stopping_word = Some(v.stopping_word);
            }
        }
        self
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionChoice {
    #[serde(default)]
    pub index: usize,
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// vLLM and ponder: the stop string (or token id) that ended the
    /// choice; SGLang names it `matched_stop`.
    #[serde(default, alias = "matched_stop")]
    pub stop_reason: Option<serde_json::Value>,
    /// llama.cpp: the stop string that ended the choice.
    #[serde(default)]
    pub stopping_word: Option<String>,
    /// vLLM's `token_ids`, llama.cpp's `tokens`.
    #[serde(default, alias = "tokens")]
    pub token_ids: Option<Vec<u32>>,
    #[serde(default)]
    pub logprobs: Option<ChunkLogprobs>,
}

impl CompletionChoice {
    /// Whether the choice ended on stop string `stop`.
    pub fn stopped_on(&self, stop: &str) -> bool {
        self.stop_string() == Some(stop)
    }

    /// The stop string that ended the choice, as vLLM (`stop_reason`),
    /// SGLang (`matched_stop`) or llama.cpp (`stopping_word`) names it.
    pub fn stop_string(&self) -> Option<&str> {
        self.stop_reason.as_ref().and_then(|v| v.as_str()).or(self.stopping_word.as_deref())
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct StreamOptionsCall {
    pub include_usage: bool,
}

/// The completions API's logprobs object.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChunkLogprobs {
    #[serde(default)]
    pub tokens: Vec<String>,
    #[serde(default)]
    pub token_logprobs: Vec<Option<f32>>,
    #[serde(default)]
    pub top_logprobs: Vec<Option<serde_json::Map<String, serde_json::Value>>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct ChunkUsage {
    #[serde(default)]
    pub completion_tokens: usize,
}

/// What the engine's `/v1/models` says about the served model.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// The model is among those it serves.
    pub serves_model: bool,
    pub context_length: Option<usize>,
}

/// A client for one engine.
#[derive(Debug, Clone)]
pub struct Upstream {
    http: reqwest::Client,
    base: String,
    model: String,
    api_key: Option<String>,
    timeout_secs: u64,
    server: EngineServer,
    per_call: usize,
}

impl Upstream {
    pub fn new(engine: &RemoteEngine) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            // Between reads, not for the whole response: a long generation
            // streams for minutes, but an engine silent for this long is stuck.
            .read_timeout(Duration::from_secs(engine.timeout_secs))
            .build()
            .expect("a client without TLS needs no system resources to build");
        Self {
            http,
            base: engine.url.trim_end_matches('/').to_string(),
            model: engine.model.clone(),
            api_key: engine.api_key.clone(),
            timeout_secs: engine.timeout_secs,
            server: engine.server,
            per_call: engine.choices_per_call(),
        }
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// `n` choices as calls of at most `max_n` each: `(offset, count)`,
    /// the offset also shifting each call's seed.
    pub fn split_n(&self, n: usize) -> Vec<(usize, usize)> {
        let per = self.per_call.max(1);
        (0..n).step_by(per).map(|offset| (offset, per.min(n - offset))).collect()
    }

    /// The call in this server's words: vLLM's extensions, or llama.cpp's.
    fn adapt(&self, call: &CompletionCall) -> CompletionCall {
        let mut c = call.clone();
        match self.server {
            EngineServer::Vllm => c.return_tokens = false,
            EngineServer::LlamaCpp => {
                c.return_tokens = c.return_token_ids;
                c.return_token_ids = false;
                // It drops the stop string whatever is asked, and names it in `__verbose`.
                c.include_stop_str_in_output = false;
                c.verbose = true;
                // Its sampler defaults to top-k 40 and min-p 0.05; OpenAI's
                // request means neither unless it says so (0 turns them off).
                c.top_k = Some(c.top_k.unwrap_or(0));
                c.min_p = Some(0.0);
            }
        }
        c
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn authed(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    fn classify(&self, url: &str, e: reqwest::Error) -> UpstreamError {
        if e.is_timeout() {
            UpstreamError::Timeout { url: url.to_string(), secs: self.timeout_secs }
        } else if e.is_connect() {
            UpstreamError::Connect { url: url.to_string(), source: e }
        } else {
            UpstreamError::Protocol { url: url.to_string(), message: e.to_string() }
        }
    }

    /// Sends a request with the key; a transport failure or an answer
    /// other than 200 (its body kept for the log) is an error.
    async fn send(
        &self,
        url: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, UpstreamError> {
        let r = self.authed(req).send().await.map_err(|e| self.classify(url, e))?;
        let status = r.status().as_u16();
        if status != 200 {
            let body = r.text().await.unwrap_or_default();
            return Err(UpstreamError::Status { url: url.to_string(), status, body: truncate(&body) });
        }
        Ok(r)
    }

    /// `GET /v1/models`: reachable, serving the model, and its context length.
    pub async fn probe(&self) -> Result<Probe, UpstreamError> {
        let url = self.url("/models");
        let r = self.send(&url, self.http.get(&url).timeout(PROBE_TIMEOUT)).await?;
        let text = r.text().await.map_err(|e| self.classify(&url, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| UpstreamError::Protocol { url: url.clone(), message: format!("not JSON: {e}") })?;
        Ok(read_models(&v, &self.model))
    }

    /// Sends a completion and reads the whole answer.
    pub async fn complete(&self, call: &CompletionCall) -> Result<Completion, UpstreamError> {
        let url = self.url("/completions");
        let r = self.send(&url, self.http.post(&url).json(&self.adapt(call))).await?;
        let text = r.text().await.map_err(|e| self.classify(&url, e))?;
        serde_json::from_str::<Completion>(&text).map(Completion::normalized).map_err(|e| {
            UpstreamError::Protocol {
                url,
                message: format!("unexpected completion ({e}): {}", truncate(&text)),
            }
        })
    }

    /// Sends a streamed completion and returns its chunks as they come.
    pub async fn stream(
        &self,
        call: &CompletionCall,
    ) -> Result<impl futures::Stream<Item = Result<Completion, UpstreamError>> + Send + 'static, UpstreamError>
    {
        let url = self.url("/completions");
        let r = self.send(&url, self.http.post(&url).json(&self.adapt(call))).await?;
        let timeout_secs = self.timeout_secs;
        let bytes = r.bytes_stream();
        let state = SseState { bytes: Box::pin(bytes), pending: Vec::new(), url, timeout_secs, done: false };
        Ok(futures::stream::unfold(state, |mut st| async move {
            let item = st.next_chunk().await?;
            Some((item, st))
        }))
    }
}

type ByteStream = std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>>;

/// Reads `data:` lines of server-sent events into chunks.
struct SseState {
    bytes: ByteStream,
    /// Bytes read and not yet a whole line. Kept as bytes: a frame may end
    /// inside a UTF-8 character, and decoding frames one by one would turn
    /// both halves into U+FFFD. Only whole lines are decoded.
    pending: Vec<u8>,
    url: String,
    timeout_secs: u64,
    done: bool,
}

impl SseState {
    async fn next_chunk(&mut self) -> Option<Result<Completion, UpstreamError>> {
        loop {
            if self.done {
                return None;
            }
            while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let bytes: Vec<u8> = self.pending.drain(..=end).collect();
                let line = String::from_utf8_lossy(&bytes);
                let line = line.trim_end_matches(['\r', '\n']);
                let Some(data) = line.strip_prefix("data:") else { continue };
                let data = data.trim_start();
                if data == "[DONE]" {
                    self.done = true;
                    return None;
                }
                return Some(
                    parse_chunk(data)
                        .map_err(|message| UpstreamError::Protocol { url: self.url.clone(), message }),
                );
            }
            match self.bytes.next().await {
                Some(Ok(b)) => self.pending.extend_from_slice(&b),
                Some(Err(e)) if e.is_timeout() => {
                    self.done = true;
                    return Some(Err(UpstreamError::Timeout {
                        url: self.url.clone(),
                        secs: self.timeout_secs,
                    }));
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(UpstreamError::Protocol {
                        url: self.url.clone(),
                        message: e.to_string(),
                    }));
                }
                None => {
                    self.done = true;
                    return Some(Err(UpstreamError::Protocol {
                        url: self.url.clone(),
                        message: "the stream ended without [DONE]".into(),
                    }));
                }
            }
        }
    }
}

/// One `data:` payload: a chunk, or an error object the engine sent mid-stream.
fn parse_chunk(data: &str) -> Result<Completion, String> {
    let v: serde_json::Value =
        serde_json::from_str(data).map_err(|e| format!("a chunk is not JSON ({e}): {}", truncate(data)))?;
    if let Some(err) = v.get("error") {
        return Err(format!("the engine sent an error mid-stream: {err}"));
    }
    serde_json::from_value::<Completion>(v)
        .map(Completion::normalized)
        .map_err(|e| format!("unexpected chunk ({e}): {}", truncate(data)))
}

/// The served model's entry in a `/v1/models` answer: vLLM gives
/// `max_model_len`; llama.cpp `meta.n_ctx`, the context of one of its
/// slots (its `-c` over `--parallel`), which is less than `n_ctx_train`.
fn read_models(v: &serde_json::Value, model: &str) -> Probe {
    let entry = v["data"].as_array().and_then(|d| d.iter().find(|m| m["id"].as_str() == Some(model)));
    let context_length = entry.and_then(|m| {
        m["max_model_len"]
            .as_u64()
            .or_else(|| m["meta"]["n_ctx"].as_u64())
            .or_else(|| m["meta"]["n_ctx_train"].as_u64())
            .map(|n| n as usize)
    });
    Probe { serves_model: entry.is_some(), context_length }
}

fn truncate(s: &str) -> String {
    const MAX: usize = 300;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_character_split_across_two_network_frames_arrives_whole() {
        let line =
            "data: {\"choices\": [{\"index\": 0, \"text\": \"caf\u{e9} \u{1f642}\"}]}\n\ndata: [DONE]\n\n";
        let bytes = line.as_bytes();
        // Cut inside the emoji's four bytes, and again inside the é.
        let emoji = line.find('\u{1f642}').expect("the emoji is in the line") + 2;
        let e_acute = line.find('\u{e9}').expect("the é is in the line") + 1;
        let frames: Vec<reqwest::Result<axum::body::Bytes>> = vec![
            Ok(axum::body::Bytes::copy_from_slice(&bytes[..e_acute])),
            Ok(axum::body::Bytes::copy_from_slice(&bytes[e_acute..emoji])),
            Ok(axum::body::Bytes::copy_from_slice(&bytes[emoji..])),
        ];
        let mut st = SseState {
            bytes: Box::pin(futures::stream::iter(frames)),
            pending: Vec::new(),
            url: "test".into(),
            timeout_secs: 1,
            done: false,
        };
        let chunk = st.next_chunk().await.expect("one chunk").expect("it parses");
        assert_eq!(chunk.choices[0].text, "caf\u{e9} \u{1f642}");
        assert!(st.next_chunk().await.is_none(), "[DONE] ends the stream");
    }

    #[test]
    fn sglangs_matched_stop_names_the_stop_string_as_vllms_stop_reason_does() {
        let c: CompletionChoice = serde_json::from_str(
            r#"{"index": 0, "text": "x", "finish_reason": "stop", "matched_stop": "\n\n"}"#,
        )
        .expect("a choice");
        assert!(c.stopped_on("\n\n"));
    }

    #[test]
    fn the_served_models_context_length_is_read_from_vllm_or_llama_cpp() {
        let vllm = serde_json::json!({"data": [{"id": "other"}, {"id": "policy", "max_model_len": 4096}]});
        assert_eq!(read_models(&vllm, "policy"), Probe { serves_model: true, context_length: Some(4096) });
        let llama =
            serde_json::json!({"data": [{"id": "policy", "meta": {"n_ctx": 2048, "n_ctx_train": 8192}}]});
        assert_eq!(read_models(&llama, "policy").context_length, Some(2048), "a slot's context");
        let older = serde_json::json!({"data": [{"id": "policy", "meta": {"n_ctx_train": 8192}}]});
        assert_eq!(read_models(&older, "policy").context_length, Some(8192));
        assert_eq!(read_models(&vllm, "missing"), Probe { serves_model: false, context_length: None });
    }

    #[test]
    fn llama_cpps_verbose_answer_gives_a_lone_choice_its_tokens_and_stopping_word() {
        let v = r#"{"choices":[{"text":"1. Red","index":0,"finish_reason":"stop"}],
            "__verbose":{"content":"1. Red","tokens":[33,30,3950,198],"stop_type":"word","stopping_word":"\n"}}"#;
        let c = parse_chunk(v).unwrap();
        assert_eq!(c.choices[0].token_ids.as_deref(), Some(&[33, 30, 3950, 198][..]));
        assert!(c.choices[0].stopped_on("\n"));
        let eos = r#"{"choices":[{"text":"Hi","index":0,"finish_reason":"stop"}],
            "__verbose":{"tokens":[5],"stop_type":"eos","stopping_word":""}}"#;
        assert_eq!(parse_chunk(eos).unwrap().choices[0].stop_string(), None);
    }

    #[test]
    fn n_is_split_into_calls_of_at_most_max_n_choices() {
        let engine = |max_n| RemoteEngine {
            url: "http://e/v1".into(),
            model: "m".into(),
            api_key_env: None,
            timeout_secs: 1,
            server: EngineServer::Vllm,
            max_n,
            api_key: None,
        };
        assert_eq!(Upstream::new(&engine(None)).split_n(5), vec![(0, 5)]);
        assert_eq!(Upstream::new(&engine(Some(2))).split_n(5), vec![(0, 2), (2, 2), (4, 1)]);
        let llama = RemoteEngine { server: EngineServer::LlamaCpp, ..engine(None) };
        assert_eq!(Upstream::new(&llama).split_n(2), vec![(0, 1), (1, 1)]);
        assert!(Upstream::new(&llama).split_n(0).is_empty());
    }

    #[test]
    fn chunks_and_mid_stream_errors_are_told_apart() {
        let c = parse_chunk(r#"{"choices":[{"index":1,"text":"hi","finish_reason":null}]}"#).unwrap();
        assert_eq!((c.choices[0].index, c.choices[0].text.as_str()), (1, "hi"));
        let u = parse_chunk(r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":7}}"#).unwrap();
        assert_eq!(u.usage.map(|u| u.completion_tokens), Some(7));
        assert!(parse_chunk(r#"{"error":{"message":"boom"}}"#).unwrap_err().contains("boom"));
        assert!(parse_chunk("not json").is_err());
    }
}
