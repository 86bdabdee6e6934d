//! `ponder bench server`: starts `ponder serve` as a second process, drives
//! it over loopback with a bounded number of requests in flight, and reports
//! throughput and latency percentiles per concurrency, plus what the HTTP
//! layer adds over running the same request on the engine directly. With
//! `--backend URL` it measures ponder in front of a remote engine instead
//! ([`super::proxy`]).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::engine::{
    Engine, EngineOptions, EosPolicy, HiddenCapture, Logprobs, SamplingParams, SeqOptions, StopCriteria,
};
use crate::model::WeightFormat;
use crate::tokenizer::AddSpecial;

#[derive(Debug, Args)]
pub struct ServerBenchArgs {
    /// Model file or directory to serve; with `--backend`, the engine's
    /// model's tokenizer (its GGUF, `tokenizer.json` or HF directory).
    #[arg(long)]
    model: PathBuf,
    /// Measure ponder in front of this OpenAI-compatible engine
    /// (`http://host:port/v1`) against the engine alone, instead.
    #[arg(long)]
    backend: Option<String>,
    /// The engine's name for its model (default: the first it lists).
    #[arg(long, requires = "backend")]
    backend_model: Option<String>,
    /// Concurrency levels (requests in flight), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// Requests per level (at least the concurrency).
    #[arg(long, default_value_t = 32)]
    requests: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
pub struct LevelReport {
    pub concurrency: usize,
    pub requests: usize,
    pub throughput_tok_s: f64,
    pub requests_per_s: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct ServerBenchReport {
    pub model: String,
    pub max_tokens: usize,
    pub levels: Vec<LevelReport>,
    /// Median latency of one request on the engine in this process.
    pub direct_engine_p50_ms: f64,
    /// Median latency of the same request over HTTP, one in flight.
    pub http_p50_ms: f64,
    pub http_overhead_ms: f64,
}

const PROMPT: &str = "Count on: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,";
const MODEL_ID: &str = "bench";

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(model: &std::path::Path) -> anyhow::Result<Server> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["serve", "--port", "0", "--model"])
        .arg(format!("{MODEL_ID}={}", model.display()))
        .env("PONDER_QUEUE_CAPACITY", "256")
        .env("PONDER_QUEUE_MAX_RUNNING", "64")
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // The last lines before the server ended say why it never listened.
        let mut last = std::collections::VecDeque::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(a) = line.split("listening on http://").nth(1) {
                let _ = tx.send(Ok(a.trim().to_string()));
            }
            if last.len() == 5 {
                last.pop_front();
            }
            last.push_back(line);
        }
        let _ = tx.send(Err(Vec::from(last).join("\n")));
    });
    let addr = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(Ok(addr)) => addr,
        Ok(Err(why)) => anyhow::bail!("the server did not start; it said:\n{why}"),
        Err(_) => anyhow::bail!("the server did not start within 120 s"),
    };
    Ok(Server { child, addr })
}

/// One HTTP/1.1 exchange on a fresh connection: (status, body).
async fn http(addr: &str, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

async fn wait_ready(addr: &str) -> anyhow::Result<()> {
    for _ in 0..1200 {
        if let Ok((200, _)) = http(addr, "GET", "/health", "").await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("server never became healthy")
}

fn request_body(max_tokens: usize) -> String {
    serde_json::json!({"model": MODEL_ID, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})
        .to_string()
}

/// Latencies (seconds) and completion tokens of `total` requests with `concurrency` in flight.
async fn level(
    addr: &str,
    concurrency: usize,
    total: usize,
    max_tokens: usize,
) -> anyhow::Result<(f64, Vec<f64>, usize)> {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let body = Arc::new(request_body(max_tokens));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..total {
        let permit = sem.clone().acquire_owned().await?;
        let (addr, body) = (addr.to_string(), body.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = http(&addr, "POST", "/v1/completions", &body).await;
            drop(permit);
            r.map(|(status, text)| (status, text, t.elapsed().as_secs_f64()))
        }));
    }
    let mut latencies = Vec::new();
    let mut tokens = 0;
    for t in tasks {
        let (status, text, secs) = t.await??;
        anyhow::ensure!(status == 200, "request failed with {status}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text)?;
        tokens += v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
        latencies.push(secs);
    }
    Ok((start.elapsed().as_secs_f64(), latencies, tokens))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The same request on the engine in this process, one at a time.
fn direct(model: &std::path::Path, max_tokens: usize, runs: usize) -> anyhow::Result<f64> {
    let engine =
        Engine::load(model, WeightFormat::Auto, &candle_core::Device::Cpu, EngineOptions::default())?;
    let prompt = engine.tokenizer().encode(PROMPT, AddSpecial::Yes)?;
    let opts = SeqOptions {
        sampling: SamplingParams::greedy(),
        stop: StopCriteria { max_tokens, stop: Vec::new(), eos: EosPolicy::Stop },
        logprobs: Logprobs::None,
        capture: HiddenCapture::Never,
    };
    let mut times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let mut seq = engine.start(prompt.clone(), opts.clone())?;
        while seq.is_running() {
            engine.step(&mut [&mut seq])?;
        }
        let _text = engine.tokenizer().decode(seq.generated())?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(percentile(&times, 0.5))
}

pub fn run(args: ServerBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.max_tokens >= 1 && args.requests >= 1,
        "--max-tokens and --requests must be at least 1"
    );
    if let Some(&c) = args.concurrency.iter().find(|&&c| c == 0) {
        anyhow::bail!("--concurrency levels must be at least 1, got {c}");
    }
    if let Some(backend) = &args.backend {
        let report = super::proxy::run(super::proxy::ProxyArgs {
            backend,
            backend_model: args.backend_model.as_deref(),
            tokenizer: &args.model,
            concurrency: &args.concurrency,
            requests: args.requests,
            max_tokens: args.max_tokens,
        })?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            super::proxy::print(&report);
        }
        return Ok(());
    }
    let server = start_server(&args.model)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (levels, http_p50) = rt.block_on(async {
        wait_ready(&server.addr).await?;
        // Warm-up, then one-at-a-time latency for the HTTP-overhead comparison.
        level(&server.addr, 1, 2, args.max_tokens).await?;
        let (_, mut single, _) = level(&server.addr, 1, 8, args.max_tokens).await?;
        single.sort_by(f64::total_cmp);
        let mut levels = Vec::new();
        for &c in &args.concurrency {
            let total = args.requests.max(c);
            let (wall, mut lat, tokens) = level(&server.addr, c.max(1), total, args.max_tokens).await?;
            lat.sort_by(f64::total_cmp);
            levels.push(LevelReport {
                concurrency: c,
                requests: total,
                throughput_tok_s: tokens as f64 / wall,
                requests_per_s: total as f64 / wall,
                latency_p50_ms: percentile(&lat, 0.5) * 1e3,
                latency_p99_ms: percentile(&lat, 0.99) * 1e3,
            });
        }
        anyhow::Ok((levels, percentile(&single, 0.5)))
    })?;
    drop(server);
    let direct_p50 = direct(&args.model, args.max_tokens, 8)?;
    let report = ServerBenchReport {
        model: args.model.display().to_string(),
        max_tokens: args.max_tokens,
        levels,
        direct_engine_p50_ms: direct_p50 * 1e3,
        http_p50_ms: http_p50 * 1e3,
        http_overhead_ms: (http_p50 - direct_p50) * 1e3,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!("model {} ({} tokens per request)", report.model, report.max_tokens);
    println!("concurrency  requests  tok/s   req/s   p50 ms   p99 ms");
    for l in &report.levels {
        println!(
            "{:>11}  {:>8}  {:>6.1}  {:>6.2}  {:>7.0}  {:>7.0}",
            l.concurrency,
            l.requests,
            l.throughput_tok_s,
            l.requests_per_s,
            l.latency_p50_ms,
            l.latency_p99_ms
        );
    }
    println!(
        "one request: engine direct {:.0} ms, over HTTP {:.0} ms, HTTP layer adds {:.1} ms",
        report.direct_engine_p50_ms, report.http_p50_ms, report.http_overhead_ms
    );
    Ok(())
}
