//! A PRM served over HTTP in vLLM's pooling format: each prefix becomes the
//! Qwen2.5-Math-PRM prompt (ChatML: the model card's system prompt, the
//! question, the steps joined and ended by `<extra_0>`), all prefixes of a
//! call go in one `POST /pooling` with `task = "token_classify"`, and the
//! score of a prefix is P(good) at its last step tag. The client runs on a
//! thread of its own with its own small runtime, so that scoring can be
//! called from a worker thread or a blocking task alike, and nothing async
//! is ever dropped inside another runtime. A prefix the server refuses as
//! longer than its context scores as a certain failure, as an in-process
//! PRM scores one.

use std::sync::Mutex;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use super::config::RemotePrmConfig;
use super::head::HeadOutput;
use super::model_prm::{STEP_TOKEN, SYSTEM_PROMPT};
use super::quantile_map::QuantileMap;
use super::{PrmError, PrmScore, Quantiles, ScoreItem, Scorer};

/// P(good) per input; `None` for one longer than the server's context.
type Reply = std_mpsc::Sender<Result<Vec<Option<f32>>, String>>;

/// A remote PRM; dropping it ends its client thread.
pub struct RemotePrm {
    calls: Mutex<std_mpsc::Sender<(Vec<String>, Reply)>>,
    /// Applied to P(good) when answering calibrated quantiles.
    map: Option<QuantileMap>,
}

impl RemotePrm {
    /// A client for the configured server; answering with `output`: the
    /// configured quantile map's quantiles, or the raw P(good).
    pub fn new(config: &RemotePrmConfig, output: HeadOutput) -> Result<Self, PrmError> {
        let map = match (&config.calibration, output) {
            (Some(path), HeadOutput::Calibrated) => Some(QuantileMap::load(path)?),
            _ => None,
        };
        let url = format!("{}/pooling", config.remote.trim_end_matches('/'));
        let model = config.model.clone();
        let timeout = Duration::from_secs(config.timeout_secs.max(1));
        let (tx, rx) = std_mpsc::channel::<(Vec<String>, Reply)>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| PrmError::Remote(format!("runtime: {e}")))?;
        std::thread::Builder::new()
            .name("prm-client".into())
            .spawn(move || {
                let http = reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(timeout)
                    .build()
                    .expect("a client without TLS needs no system resources to build");
                while let Ok((inputs, reply)) = rx.recv() {
                    let r = rt.block_on(score_each(&http, &url, &model, inputs));
                    let _ = reply.send(r);
                }
            })
            .map_err(|e| PrmError::Remote(format!("thread: {e}")))?;
        Ok(Self { calls: Mutex::new(tx), map })
    }
}

/// The Qwen2.5-Math-PRM prompt of a prefix (its chat template's output).
pub fn prompt(question: &str, steps: &[String]) -> String {
    let mut answer = steps.join(STEP_TOKEN);
    answer.push_str(STEP_TOKEN);
    format!(
        "<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
    )
}

/// Why a pooling call failed.
enum PoolFailure {
    /// A 400 that says an input is over the server's context.
    OverContext,
    Other(String),
}

/// P(good) of every input: one call for all, and only when the server
/// refuses that call as over its context, one call per input, so that the
/// inputs it can read keep their scores (`None` marks the others).
async fn score_each(
    http: &reqwest::Client,
    url: &str,
    model: &str,
    inputs: Vec<String>,
) -> Result<Vec<Option<f32>>, String> {
    match pool(http, url, model, &inputs).await {
        Ok(scores) => return Ok(scores.into_iter().map(Some).collect()),
        Err(PoolFailure::Other(e)) => return Err(e),
        Err(PoolFailure::OverContext) => {}
    }
    let mut out = Vec::with_capacity(inputs.len());
    for input in inputs {
        match pool(http, url, model, std::slice::from_ref(&input)).await {
            Ok(score) => out.push(score.first().copied()),
            Err(PoolFailure::OverContext) => out.push(None),
            Err(PoolFailure::Other(e)) => return Err(e),
        }
    }
    Ok(out)
}

/// One pooling call: P(good) at the last step tag of each input.
async fn pool(
    http: &reqwest::Client,
    url: &str,
    model: &str,
    inputs: &[String],
) -> Result<Vec<f32>, PoolFailure> {
    let other = |e: String| PoolFailure::Other(format!("{url}: {e}"));
    let body = serde_json::json!({"model": model, "task": "token_classify", "input": inputs});
    let r = http.post(url).json(&body).send().await.map_err(|e| other(e.to_string()))?;
    let status = r.status().as_u16();
    let text = r.text().await.map_err(|e| other(e.to_string()))?;
    if status == 400 && says_over_context(&text) {
        return Err(PoolFailure::OverContext);
    }
    if status != 200 {
        return Err(other(format!("answered {status}: {}", text.chars().take(300).collect::<String>())));
    }
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| other(format!("not JSON: {e}")))?;
    read_pooling(&v, inputs.len()).map_err(other)
}

/// Whether an error body says an input is longer than the model's context:
/// vLLM's and SGLang's messages say "context length", ponder's code is
/// `context_length_exceeded`.
fn says_over_context(body: &str) -> bool {
    let body = body.to_ascii_lowercase();
    body.contains("context length") || body.contains("context_length")
}

/// P(good) at the last step tag of each of `n` inputs, from a pooling
/// response: `{"data": [{"index", "data": [[p_bad, p_good] per step tag]}]}`.
fn read_pooling(v: &serde_json::Value, n: usize) -> Result<Vec<f32>, String> {
    let data = v["data"].as_array().ok_or("no `data` array")?;
    let mut out = vec![None; n];
    for d in data {
        let i = d["index"].as_u64().ok_or("an entry without `index`")? as usize;
        // The last row is the last step tag's [p_bad, p_good].
        let last = d["data"].as_array().and_then(|rows| rows.last()).and_then(|r| r.as_array());
        let good = last.filter(|r| r.len() == 2).and_then(|r| r[1].as_f64());
        match (out.get_mut(i), good) {
            // A pooling server that returns logits (softmax off) would
            // otherwise make every rule "confident".
            (Some(_), Some(p)) if !(0.0..=1.0).contains(&p) => {
                return Err(format!(
                    "input {i}: P(good) {p} is not a probability (does the server apply softmax?)"
                ));
            }
            (Some(slot), Some(p)) => *slot = Some(p as f32),
            (None, _) => return Err(format!("index {i} for {n} inputs")),
            (Some(_), None) => return Err(format!("input {i}: no [p_bad, p_good] row")),
        }
    }
    out.into_iter().enumerate().map(|(i, p)| p.ok_or_else(|| format!("no score for input {i}"))).collect()
}

impl Scorer for RemotePrm {
    /// P(good) of each prefix's last step, through the quantile map where
    /// one is configured, else as a point estimate; a prefix the server
    /// cannot read scores as a certain failure (logged), because failing
    /// the request would throw away every sample already drawn.
    fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<PrmScore>, PrmError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let inputs = items.iter().map(|i| prompt(i.question, i.steps)).collect();
        let (tx, rx) = std_mpsc::channel();
        self.calls
            .lock()
            .expect("no panics while holding the call lock")
            .send((inputs, tx))
            .map_err(|_| PrmError::Remote("the PRM client thread has stopped".into()))?;
        let scores = rx.recv().map_err(|_| PrmError::Remote("the PRM client thread has stopped".into()))?;
        let scores = scores.map_err(PrmError::Remote)?;
        let unread = scores.iter().filter(|p| p.is_none()).count();
        if unread > 0 {
            tracing::warn!(
                prefixes = unread,
                "prefixes longer than the remote PRM's context score as failures"
            );
        }
        Ok(scores
            .into_iter()
            .map(|p| match p {
                Some(p) => {
                    let quantiles = self.map.as_ref().map_or(Quantiles::point(p), |m| m.apply(p));
                    PrmScore { quantiles, raw: Some(p) }
                }
                None => PrmScore { quantiles: Quantiles::point(0.0), raw: Some(0.0) },
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllms_documented_pooling_response_gives_p_good_at_each_inputs_last_step_tag() {
        // The shape of vLLM's PoolingResponse (vllm/entrypoints/pooling/pooling/protocol.py;
        // vllm/entrypoints/openai/protocol.py before 0.11):
        // id, object "list", created, model, data of PoolingResponseData
        // {index, object "pooling", data}, usage; for token_classify on a
        // PRM, `data` holds one [p_bad, p_good] row per <extra_0>. Entries
        // may come in any order.
        let v = serde_json::json!({
            "id": "pool-0c1f", "object": "list", "created": 1733000000,
            "model": "Qwen/Qwen2.5-Math-PRM-7B",
            "data": [
                {"index": 1, "object": "pooling", "data": [[0.25, 0.75]]},
                {"index": 0, "object": "pooling", "data": [[0.1, 0.9], [0.6, 0.4]]}
            ],
            "usage": {"prompt_tokens": 96, "total_tokens": 96, "completion_tokens": 0, "prompt_tokens_details": null}
        });
        assert_eq!(read_pooling(&v, 2).unwrap(), vec![0.4, 0.75]);
        assert!(read_pooling(&v, 3).unwrap_err().contains("no score for input 2"));
        assert!(read_pooling(&v, 1).unwrap_err().contains("index 1 for 1 inputs"));
        let flat = serde_json::json!({"data": [{"index": 0, "data": [0.3, 0.7]}]});
        assert!(read_pooling(&flat, 1).is_err(), "a pooled vector is not a per-step answer");
        let logits = serde_json::json!({"data": [{"index": 0, "data": [[-1.5, 3.2]]}]});
        assert!(read_pooling(&logits, 1).unwrap_err().contains("3.2 is not a probability"));
    }

    #[test]
    fn a_prefix_becomes_the_qwen_prm_prompt_with_a_tag_after_every_step() {
        let p = prompt("1+1?", &["two".into(), "so 2".into()]);
        assert!(p.ends_with("<|im_start|>assistant\ntwo<extra_0>so 2<extra_0><|im_end|>\n"), "{p}");
        assert!(
            prompt("q", &[]).contains("assistant\n<extra_0><|im_end|>"),
            "the question alone has one tag"
        );
    }
}
