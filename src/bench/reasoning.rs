//! `ponder bench reasoning`: starts `ponder serve` as a second process and
//! sends it ponder-arith test questions with best-of-N reasoning, adaptive
//! and fixed, at several concurrencies: questions/s, latency, accuracy,
//! tokens per question, refusals. Then it times the first streamed token of
//! plain requests alone and beside an adaptive reasoning load, which shows
//! whether reasoning traffic starves ordinary traffic on the same model.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use serde_json::{Value, json};

use super::client::{self, percentile};
use crate::arith::task::{self, Problem, Split};

const MODEL: &str = "ponder-arith";
/// Seeds are `SEED_BASE + question index`, the same in every run, so modes
/// and concurrencies answer the same sampled questions.
const SEED_BASE: u64 = 1000;
/// A request longer than this counts as an error; it bounds every run.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Background reasoning requests in flight while plain TTFT is timed.
const LOAD_CONCURRENCY: usize = 16;
/// Time the background load gets to fill the server before timing starts.
const LOAD_RAMP: Duration = Duration::from_secs(2);
const START_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Args)]
pub struct ReasoningBenchArgs {
    /// Server configuration (must serve ponder-arith).
    #[arg(long, default_value = "config/ponder.toml")]
    config: PathBuf,
    /// Concurrency levels (requests in flight), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// Test questions per run, interleaved by level so every level appears.
    #[arg(long, default_value_t = 48)]
    questions: usize,
    /// Plain streamed requests timed one at a time, alone and under load.
    #[arg(long, default_value_t = 20)]
    plain_requests: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    Adaptive,
    Fixed,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Adaptive => "adaptive",
            Mode::Fixed => "fixed",
        }
    }

    fn reasoning(self) -> Value {
        match self {
            Mode::Adaptive => json!({"strategy": "best_of_n"}),
            Mode::Fixed => json!({"strategy": "best_of_n", "adaptive": false, "max_samples": 64}),
        }
    }
}

/// One mode at one concurrency. Refused and failed questions are not
/// retried: they count in `refused` / `errors` and the rates, accuracy and
/// latencies are over the answered ones (`answered`).
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub mode: &'static str,
    pub concurrency: usize,
    pub questions: usize,
    pub answered: usize,
    /// Answered questions per second of wall time.
    pub questions_per_s: f64,
    pub refused: usize,
    pub errors: usize,
    pub tokens_per_question: Option<f64>,
    pub accuracy: Option<f64>,
    pub p50_s: Option<f64>,
    pub p99_s: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ReasoningBenchReport {
    pub runs: Vec<RunReport>,
    pub plain_ttft_p50_alone_s: Option<f64>,
    pub plain_ttft_p99_alone_s: Option<f64>,
    pub plain_ttft_p50_under_load_s: Option<f64>,
    pub plain_ttft_p99_under_load_s: Option<f64>,
    /// Plain requests answered 429, and those that failed otherwise.
    pub plain_refused_alone: usize,
    pub plain_refused_under_load: usize,
    pub plain_errors: usize,
}

/// Test problems per level drawn for the question list: the default of
/// `ponder arith export` and `ponder eval`, so a list of up to 300 questions
/// is always a prefix of the same one.
const POOL_PER_LEVEL: usize = 50;

/// The first `n` test questions, taking one of each level in turn.
fn questions(n: usize) -> Result<Vec<Problem>, task::TooFewQuestions> {
    let levels = task::LEVELS.count();
    let per_level = n.div_ceil(levels).max(POOL_PER_LEVEL);
    // `generate` returns the problems grouped by level, `per_level` each.
    let all = task::generate(Split::Test, per_level)?;
    Ok((0..per_level)
        .flat_map(|i| (0..levels).map(move |l| l * per_level + i))
        .map(|i| all[i].clone())
        .take(n)
        .collect())
}

fn reasoning_body(p: &Problem, seed: u64, mode: Mode) -> String {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": p.question}],
        "temperature": 0.7,
        "seed": seed,
        "reasoning": mode.reasoning(),
    })
    .to_string()
}

fn plain_body(p: &Problem, seed: u64) -> String {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": p.question}],
        "temperature": 0.7,
        "seed": seed,
        "max_tokens": 32,
        "stream": true,
    })
    .to_string()
}

enum Outcome {
    Answered { secs: f64, correct: bool, tokens: u64 },
    Refused { retry_after: Option<Duration> },
    Error(String),
}

/// One reasoning question, not retried.
async fn ask(addr: &str, body: &str, answer: i64) -> Outcome {
    let start = Instant::now();
    let sent = tokio::time::timeout(
        REQUEST_TIMEOUT,
        client::request(addr, "POST", "/v1/chat/completions", Some(body)),
    )
    .await;
    let r = match sent {
        Err(_) => return Outcome::Error(format!("no answer within {REQUEST_TIMEOUT:?}")),
        Ok(Err(e)) => return Outcome::Error(format!("transport: {e:#}")),
        Ok(Ok(r)) => r,
    };
    let secs = start.elapsed().as_secs_f64();
    match r.head.status {
        200 => {}
        429 => return Outcome::Refused { retry_after: r.head.retry_after() },
        s => return Outcome::Error(format!("status {s}: {}", String::from_utf8_lossy(&r.body))),
    }
    let v = match r.json() {
        Ok(v) => v,
        Err(e) => return Outcome::Error(format!("body is not JSON: {e}")),
    };
    let content = v["choices"][0]["message"]["content"].as_str().unwrap_or("");
    let tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
    Outcome::Answered { secs, correct: task::is_correct(content, answer), tokens }
}

/// Every question once with `concurrency` requests in flight.
async fn run_level(addr: &str, mode: Mode, concurrency: usize, qs: &[Problem]) -> anyhow::Result<RunReport> {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(qs.len());
    for (i, p) in qs.iter().enumerate() {
        let permit = sem.clone().acquire_owned().await?;
        let (addr, body, answer) =
            (addr.to_string(), reasoning_body(p, SEED_BASE + i as u64, mode), p.answer);
        tasks.push(tokio::spawn(async move {
            let out = ask(&addr, &body, answer).await;
            drop(permit);
            out
        }));
    }
    let (mut latencies, mut correct, mut tokens, mut refused, mut errors) = (Vec::new(), 0, 0, 0, 0);
    for t in tasks {
        match t.await? {
            Outcome::Answered { secs, correct: ok, tokens: n } => {
                latencies.push(secs);
                correct += usize::from(ok);
                tokens += n;
            }
            Outcome::Refused { .. } => refused += 1,
            Outcome::Error(e) => {
                if errors == 0 {
                    eprintln!("  first error: {e}");
                }
                errors += 1;
            }
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let answered = latencies.len();
    let per_answered = |x: f64| (answered > 0).then(|| x / answered as f64);
    Ok(RunReport {
        mode: mode.name(),
        concurrency,
        questions: qs.len(),
        answered,
        questions_per_s: answered as f64 / wall,
        refused,
        errors,
        tokens_per_question: per_answered(tokens as f64),
        accuracy: per_answered(correct as f64),
        p50_s: percentile(&latencies, 0.5),
        p99_s: percentile(&latencies, 0.99),
    })
}

enum Plain {
    Ttft(f64),
    Refused,
    Error(String),
}

/// One streamed plain request: seconds until the first chunk with content.
async fn plain_ttft(addr: &str, body: &str) -> Plain {
    let start = Instant::now();
    let read = async {
        let mut conn = client::send(addr, "POST", "/v1/chat/completions", Some(body)).await?;
        let head = conn.head().await?;
        match head.status {
            200 => {}
            429 => return Ok(Plain::Refused),
            s => {
                let body = conn.body_to_end().await.unwrap_or_default();
                return Ok(Plain::Error(format!("status {s}: {}", String::from_utf8_lossy(&body))));
            }
        }
        let (mut pending, mut ttft) = (String::new(), None);
        while let Some(data) = conn.next_sse_data(&mut pending).await? {
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(&data)?;
            if v.get("error").is_some() {
                return Ok(Plain::Error(format!("stream error: {data}")));
            }
            let content = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
            if ttft.is_none() && !content.is_empty() {
                ttft = Some(start.elapsed().as_secs_f64());
            }
        }
        anyhow::Ok(ttft.map_or(Plain::Error("stream carried no content".into()), Plain::Ttft))
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
        Err(_) => Plain::Error(format!("no answer within {REQUEST_TIMEOUT:?}")),
        Ok(Err(e)) => Plain::Error(format!("transport: {e:#}")),
        Ok(Ok(p)) => p,
    }
}

#[derive(Default)]
struct PlainStats {
    ttfts: Vec<f64>,
    refused: usize,
    errors: usize,
}

/// `n` plain requests one at a time.
async fn plain_series(addr: &str, qs: &[Problem], n: usize) -> PlainStats {
    let mut stats = PlainStats::default();
    for i in 0..n {
        match plain_ttft(addr, &plain_body(&qs[i % qs.len()], SEED_BASE + i as u64)).await {
            Plain::Ttft(t) => stats.ttfts.push(t),
            Plain::Refused => stats.refused += 1,
            Plain::Error(e) => {
                if stats.errors == 0 {
                    eprintln!("  first plain error: {e}");
                }
                stats.errors += 1;
            }
        }
    }
    stats
}

/// Counters of the background load, shared by its workers.
#[derive(Default)]
struct LoadCounts {
    answered: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
}

/// Starts `LOAD_CONCURRENCY` workers each keeping one adaptive reasoning
/// request in flight until `stop`; a refused worker waits out `Retry-After`
/// instead of hammering the server with requests it cannot take.
fn spawn_load(
    addr: &str,
    qs: &[Problem],
    stop: Arc<AtomicBool>,
    counts: Arc<LoadCounts>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..LOAD_CONCURRENCY)
        .map(|w| {
            let (addr, qs, stop, counts) = (addr.to_string(), qs.to_vec(), stop.clone(), counts.clone());
            tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let p = &qs[i % qs.len()];
                    match ask(&addr, &reasoning_body(p, SEED_BASE + i as u64, Mode::Adaptive), p.answer).await
                    {
                        Outcome::Answered { .. } => counts.answered.fetch_add(1, Ordering::Relaxed),
                        Outcome::Refused { retry_after } => {
                            tokio::time::sleep(retry_after.unwrap_or(Duration::from_secs(1))).await;
                            counts.refused.fetch_add(1, Ordering::Relaxed)
                        }
                        Outcome::Error(_) => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            counts.errors.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    i += LOAD_CONCURRENCY;
                }
            })
        })
        .collect()
}

/// Plain TTFT beside the background load; the load is stopped (its
/// in-flight requests abandoned) once the plain requests are done.
async fn plain_under_load(addr: &str, qs: &[Problem], n: usize) -> PlainStats {
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(LoadCounts::default());
    let workers = spawn_load(addr, qs, stop.clone(), counts.clone());
    tokio::time::sleep(LOAD_RAMP).await;
    let stats = plain_series(addr, qs, n).await;
    stop.store(true, Ordering::Relaxed);
    for w in &workers {
        w.abort();
    }
    for w in workers {
        let _ = w.await;
    }
    eprintln!(
        "  background load: {} answered, {} refused, {} errors",
        counts.answered.load(Ordering::Relaxed),
        counts.refused.load(Ordering::Relaxed),
        counts.errors.load(Ordering::Relaxed)
    );
    stats
}

async fn bench(addr: &str, args: &ReasoningBenchArgs) -> anyhow::Result<ReasoningBenchReport> {
    client::wait_healthy(addr, START_TIMEOUT).await?;
    let qs = questions(args.questions)?;
    eprintln!("warm-up");
    let _ = ask(addr, &reasoning_body(&qs[0], SEED_BASE, Mode::Adaptive), qs[0].answer).await;
    let mut runs = Vec::new();
    for mode in [Mode::Adaptive, Mode::Fixed] {
        for &c in &args.concurrency {
            eprintln!("{} best-of-N, concurrency {c}, {} questions", mode.name(), qs.len());
            let r = run_level(addr, mode, c, &qs).await?;
            eprintln!(
                "  {:.2} q/s, {} answered, {} refused, {} errors",
                r.questions_per_s, r.answered, r.refused, r.errors
            );
            runs.push(r);
        }
    }
    eprintln!("plain TTFT alone, {} requests", args.plain_requests);
    let alone = plain_series(addr, &qs, args.plain_requests).await;
    eprintln!("plain TTFT beside {LOAD_CONCURRENCY} adaptive reasoning requests");
    let loaded = plain_under_load(addr, &qs, args.plain_requests).await;
    Ok(ReasoningBenchReport {
        runs,
        plain_ttft_p50_alone_s: percentile(&alone.ttfts, 0.5),
        plain_ttft_p99_alone_s: percentile(&alone.ttfts, 0.99),
        plain_ttft_p50_under_load_s: percentile(&loaded.ttfts, 0.5),
        plain_ttft_p99_under_load_s: percentile(&loaded.ttfts, 0.99),
        plain_refused_alone: alone.refused,
        plain_refused_under_load: loaded.refused,
        plain_errors: alone.errors + loaded.errors,
    })
}

fn secs(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.3}"))
}

fn print_table(r: &ReasoningBenchReport) {
    println!(
        "{:<8}  {:>11}  {:^9}  {:>6}  {:>7}  {:>7}  {:>8}  {:>8}  {:>7}  {:>6}",
        "mode",
        "concurrency",
        "answered",
        "q/s",
        "p50 s",
        "p99 s",
        "accuracy",
        "tokens/q",
        "refused",
        "errors"
    );
    for run in &r.runs {
        println!(
            "{:<8}  {:>11}  {:>4}/{:<4}  {:>6.2}  {:>7}  {:>7}  {:>8}  {:>8}  {:>7}  {:>6}",
            run.mode,
            run.concurrency,
            run.answered,
            run.questions,
            run.questions_per_s,
            secs(run.p50_s),
            secs(run.p99_s),
            run.accuracy.map_or("-".into(), |a| format!("{:.1}%", a * 100.0)),
            run.tokens_per_question.map_or("-".into(), |t| format!("{t:.0}")),
            run.refused,
            run.errors
        );
    }
    println!(
        "plain TTFT alone: p50 {} s, p99 {} s ({} refused)",
        secs(r.plain_ttft_p50_alone_s),
        secs(r.plain_ttft_p99_alone_s),
        r.plain_refused_alone
    );
    println!(
        "plain TTFT beside {LOAD_CONCURRENCY} adaptive reasoning requests: p50 {} s, p99 {} s ({} refused)",
        secs(r.plain_ttft_p50_under_load_s),
        secs(r.plain_ttft_p99_under_load_s),
        r.plain_refused_under_load
    );
    if r.plain_errors > 0 {
        println!("plain requests failed: {}", r.plain_errors);
    }
}

pub fn run(args: ReasoningBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.questions >= 1, "--questions must be at least 1");
    anyhow::ensure!(!args.concurrency.is_empty(), "--concurrency needs at least one level");
    if let Some(&c) = args.concurrency.iter().find(|&&c| c == 0) {
        anyhow::bail!("--concurrency levels must be at least 1, got {c}");
    }
    eprintln!("starting ponder serve --config {}", args.config.display());
    let server = client::start_serve(&args.config, START_TIMEOUT)?;
    eprintln!("server at {}", server.addr);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let report = rt.block_on(bench(&server.addr, &args))?;
    drop(server);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_cycle_through_the_levels() {
        let qs = questions(8).unwrap();
        let levels: Vec<u8> = qs.iter().map(|p| p.level).collect();
        assert_eq!(levels, [1, 2, 3, 4, 5, 6, 1, 2]);
        assert_eq!(questions(48).unwrap().iter().filter(|p| p.level == 6).count(), 8);
    }
}
