//! `ponder bench server --backend URL`: what ponder costs in front of a
//! remote engine. Starts `ponder serve` with one model on the engine at URL
//! (the tokenizer from `--model`), then sends the same greedy completions
//! to the engine alone and through ponder, level by level in one run, and
//! reports the added latency at one request in flight and the throughput
//! ratio at each concurrency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::client;

const PROMPT: &str = "Count on: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,";
const FRONT_ID: &str = "bench-remote";
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// One concurrency level, measured on both paths.
#[derive(Debug, Serialize)]
pub struct HopLevel {
    pub concurrency: usize,
    pub requests: usize,
    pub engine_tok_s: f64,
    pub ponder_tok_s: f64,
    /// ponder's throughput over the engine's.
    pub throughput_ratio: f64,
    pub engine_p50_ms: f64,
    pub ponder_p50_ms: f64,
    pub engine_p99_ms: f64,
    pub ponder_p99_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct ProxyBenchReport {
    pub backend: String,
    pub engine_model: String,
    pub max_tokens: usize,
    pub levels: Vec<HopLevel>,
    /// Median latency through ponder minus the engine's, one request in
    /// flight, from alternating one-token requests (so that generation time
    /// and its noise do not hide the hop).
    pub hop_p50_ms: f64,
    pub hop_engine_p50_ms: f64,
    pub hop_ponder_p50_ms: f64,
    pub hop_requests: usize,
}

/// Requests per path in the hop measurement.
const HOP_REQUESTS: usize = 100;

/// p50 of one-token requests, alternating engine and ponder.
async fn hop(engine: (&str, &str, &str), front: (&str, &str, &str)) -> anyhow::Result<(f64, f64)> {
    let (mut e, mut p) = (Vec::new(), Vec::new());
    for _ in 0..HOP_REQUESTS {
        for ((addr, path, body), out) in [(engine, &mut e), (front, &mut p)] {
            let t = Instant::now();
            let r = client::request(addr, "POST", path, Some(body)).await?;
            anyhow::ensure!(r.head.status == 200, "{path} answered {}", r.head.status);
            out.push(t.elapsed().as_secs_f64());
        }
    }
    e.sort_by(f64::total_cmp);
    p.sort_by(f64::total_cmp);
    Ok((ms(&e, 0.5), ms(&p, 0.5)))
}

/// `host:port` and the path prefix (`/v1`) of an `http://` URL.
fn split_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .trim_end_matches('/')
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("--backend must be an http:// URL ending in /v1; got {url:?}"))?;
    Ok(match rest.split_once('/') {
        Some((host, path)) => (host.to_string(), format!("/{path}")),
        None => (rest.to_string(), String::new()),
    })
}

/// The engine's first served model, when `--backend-model` is not given.
async fn first_model(addr: &str, prefix: &str) -> anyhow::Result<String> {
    let r = client::request(addr, "GET", &format!("{prefix}/models"), None).await?;
    anyhow::ensure!(r.head.status == 200, "GET {prefix}/models answered {}", r.head.status);
    let v = r.json()?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("the engine lists no model"))
}

/// Wall time, sorted latencies and completion tokens of `total` requests.
async fn level(
    addr: &str,
    path: &str,
    body: &str,
    concurrency: usize,
    total: usize,
) -> anyhow::Result<(f64, Vec<f64>, usize)> {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for _ in 0..total {
        let permit = sem.clone().acquire_owned().await?;
        let (addr, path, body) = (addr.to_string(), path.to_string(), body.to_string());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = client::request(&addr, "POST", &path, Some(&body)).await;
            drop(permit);
            r.map(|r| (r, t.elapsed().as_secs_f64()))
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    let mut tokens = 0;
    for t in tasks {
        let (r, secs) = t.await??;
        anyhow::ensure!(
            r.head.status == 200,
            "{path} answered {}: {}",
            r.head.status,
            String::from_utf8_lossy(&r.body)
        );
        tokens += r.json()?["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
        latencies.push(secs);
    }
    latencies.sort_by(f64::total_cmp);
    Ok((start.elapsed().as_secs_f64(), latencies, tokens))
}

fn ms(sorted: &[f64], q: f64) -> f64 {
    client::percentile(sorted, q).unwrap_or(f64::NAN) * 1e3
}

pub struct ProxyArgs<'a> {
    pub backend: &'a str,
    pub backend_model: Option<&'a str>,
    pub tokenizer: &'a std::path::Path,
    pub concurrency: &'a [usize],
    pub requests: usize,
    pub max_tokens: usize,
}

pub fn run(a: ProxyArgs<'_>) -> anyhow::Result<ProxyBenchReport> {
    let (engine_addr, prefix) = split_url(a.backend)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let engine_model = match a.backend_model {
        Some(m) => m.to_string(),
        None => rt
            .block_on(first_model(&engine_addr, &prefix))
            .map_err(|e| anyhow::anyhow!("--backend {}: asking for its models: {e:#}", a.backend))?,
    };
    // A config file for the front: one remote model, room for every level.
    let dir = std::env::temp_dir().join(format!("ponder-bench-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("front.toml");
    let most = a.concurrency.iter().copied().max().unwrap_or(1).max(a.requests);
    std::fs::write(
        &config,
        format!(
            "[queue]\ncapacity = {most}\nmax_running = {running}\n\n[[models]]\nid = \"{FRONT_ID}\"\ntokenizer = {tok:?}\nbackend = {{ kind = \"openai\", url = {url:?}, model = {engine_model:?} }}\n",
            running = most.max(64),
            tok = a.tokenizer.display().to_string(),
            url = a.backend.trim_end_matches('/'),
        ),
    )?;
    let server = client::start_serve(&config, START_TIMEOUT)?;
    let body = |model: &str, max_tokens: usize| {
        serde_json::json!({"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})
            .to_string()
    };
    let (engine_body, front_body) = (body(&engine_model, a.max_tokens), body(FRONT_ID, a.max_tokens));
    let (engine_one, front_one) = (body(&engine_model, 1), body(FRONT_ID, 1));
    let engine_path = format!("{prefix}/completions");
    let (levels, (hop_engine, hop_ponder)) = rt.block_on(async {
        client::wait_healthy(&server.addr, START_TIMEOUT).await?;
        // Warm both paths (caches, connections) before measuring.
        level(&engine_addr, &engine_path, &engine_body, 1, 2).await?;
        level(&server.addr, "/v1/completions", &front_body, 1, 2).await?;
        let mut levels = Vec::new();
        for &c in a.concurrency {
            let c = c.max(1);
            let total = a.requests.max(c);
            let (ew, el, et) = level(&engine_addr, &engine_path, &engine_body, c, total).await?;
            let (pw, pl, pt) = level(&server.addr, "/v1/completions", &front_body, c, total).await?;
            let (etps, ptps) = (et as f64 / ew, pt as f64 / pw);
            levels.push(HopLevel {
                concurrency: c,
                requests: total,
                engine_tok_s: etps,
                ponder_tok_s: ptps,
                throughput_ratio: ptps / etps,
                engine_p50_ms: ms(&el, 0.5),
                ponder_p50_ms: ms(&pl, 0.5),
                engine_p99_ms: ms(&el, 0.99),
                ponder_p99_ms: ms(&pl, 0.99),
            });
        }
        let hop =
            hop((&engine_addr, &engine_path, &engine_one), (&server.addr, "/v1/completions", &front_one))
                .await?;
        anyhow::Ok((levels, hop))
    })?;
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ProxyBenchReport {
        backend: a.backend.to_string(),
        engine_model,
        max_tokens: a.max_tokens,
        levels,
        hop_p50_ms: hop_ponder - hop_engine,
        hop_engine_p50_ms: hop_engine,
        hop_ponder_p50_ms: hop_ponder,
        hop_requests: HOP_REQUESTS,
    })
}

pub fn print(r: &ProxyBenchReport) {
    println!("engine {} ({}), {} tokens per request", r.backend, r.engine_model, r.max_tokens);
    println!(
        "concurrency  requests  engine tok/s  ponder tok/s  ratio  engine p50  ponder p50  engine p99  ponder p99"
    );
    for l in &r.levels {
        println!(
            "{:>11}  {:>8}  {:>12.1}  {:>12.1}  {:>5.3}  {:>8.1}ms  {:>8.1}ms  {:>8.1}ms  {:>8.1}ms",
            l.concurrency,
            l.requests,
            l.engine_tok_s,
            l.ponder_tok_s,
            l.throughput_ratio,
            l.engine_p50_ms,
            l.ponder_p50_ms,
            l.engine_p99_ms,
            l.ponder_p99_ms
        );
    }
    println!(
        "one-token requests, alternating, {} each: engine p50 {:.2} ms, through ponder {:.2} ms: the hop adds {:.2} ms",
        r.hop_requests, r.hop_engine_p50_ms, r.hop_ponder_p50_ms, r.hop_p50_ms
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_url_splits_into_address_and_prefix() {
        assert_eq!(split_url("http://127.0.0.1:8000/v1/").unwrap(), ("127.0.0.1:8000".into(), "/v1".into()));
        assert_eq!(split_url("http://gpu:9").unwrap(), ("gpu:9".into(), String::new()));
        assert!(split_url("https://gpu/v1").is_err());
    }
}
