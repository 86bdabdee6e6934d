//! `ponder bench soak`: starts `ponder serve` as a second process and keeps
//! a mixed load on it for some minutes (reasoning clients, a plain client,
//! and a client that hangs up mid-response), sampling the server's RSS and
//! `/metrics` every 10 s. The report shows whether memory settles, what the
//! clients were answered, and whether the server counted every abandoned
//! request as cancelled.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{Value, json};

use super::client;
use crate::arith::task::{self, Problem, Split};

const REASONING_MODEL: &str = "ponder-arith";
/// The plain client's model when the configuration serves it.
const PLAIN_MODEL: &str = "smollm2-135m-instruct";
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// After the load stops, time for the server to notice the last closed
/// connections before the final scrape.
const QUIET: Duration = Duration::from_secs(5);
/// Bounds every request, so the run ends at most this long after its time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause after a failed exchange, so a dead server is not spun on.
const FAILURE_PAUSE: Duration = Duration::from_millis(200);
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// RSS growth is measured from the first sample at or after this time.
const GROWTH_FROM_S: f64 = 120.0;

#[derive(Debug, Args)]
pub struct SoakBenchArgs {
    /// Length of the load in minutes (fractions allowed).
    #[arg(long)]
    minutes: f64,
    /// Server configuration (must serve ponder-arith).
    #[arg(long, default_value = "config/ponder.toml")]
    config: PathBuf,
    /// Seed of the clients' questions, request seeds and hang-up delays.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
pub struct SoakReport {
    pub minutes: f64,
    /// `[seconds since the load started, MiB]`, the last after the quiet period.
    pub rss_mib: Vec<(f64, f64)>,
    /// Last RSS over the RSS of the first sample at or after 120 s, minus 1.
    pub rss_growth_after_2min: Option<f64>,
    /// Client-observed statuses (abandoned requests too, when their head arrived).
    pub statuses: BTreeMap<String, u64>,
    pub requests: u64,
    /// Requests the abandoning client closed before the whole response arrived.
    pub abandoned: u64,
    /// Growth of `ponder_cancelled_requests_total` over the run.
    pub server_cancelled: u64,
    /// Requests the server logged with status 499.
    pub server_logged_499: u64,
    /// Requests on which the client and the server's log line disagree.
    pub disagreements: Vec<Disagreement>,
    /// Growth of 5xx samples of `ponder_http_requests_total` over the run.
    pub server_5xx: u64,
    /// Growth of `ponder_generated_tokens_total` over the run.
    pub server_generated_tokens: u64,
    /// Exchanges that failed below HTTP (connect, read, timeout).
    pub transport_errors: u64,
    /// 200 streams that carried an error event.
    pub stream_errors: u64,
}

/// What the clients saw, shared by them.
#[derive(Debug, Default)]
struct Tally {
    statuses: BTreeMap<String, u64>,
    requests: u64,
    abandoned: u64,
    /// Every exchange's request id and how it ended for the client.
    outcomes: Vec<(String, ClientSaw)>,
    transport_errors: u64,
    stream_errors: u64,
}

type SharedTally = Arc<Mutex<Tally>>;

fn tally(t: &SharedTally, f: impl FnOnce(&mut Tally)) {
    f(&mut t.lock().expect("tally updates never panic while holding the lock"));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    BestOfN,
    Beam,
    Plain,
}

/// The load's clients, one task each.
#[derive(Debug, Clone, Copy)]
enum Client {
    BestOfN,
    Beam,
    Plain,
    Abandoning,
}

const CLIENTS: [Client; 4] = [Client::BestOfN, Client::Beam, Client::Plain, Client::Abandoning];

/// One request of a client: what, streamed or not, and when to hang up.
struct Plan {
    kind: Kind,
    stream: bool,
    abandon_after: Option<Duration>,
}

impl Client {
    fn plan(self, i: u64, rng: &mut ChaCha8Rng) -> Plan {
        let (kind, stream, abandon_after) = match self {
            Client::BestOfN => (Kind::BestOfN, false, None),
            Client::Beam => (Kind::Beam, true, None),
            Client::Plain => (Kind::Plain, i.is_multiple_of(2), None),
            Client::Abandoning => {
                let kind = if rng.random_bool(0.5) { Kind::BestOfN } else { Kind::Plain };
                let delay = Duration::from_millis(rng.random_range(50..=300));
                (kind, rng.random_bool(0.5), Some(delay))
            }
        };
        Plan { kind, stream, abandon_after }
    }
}

/// What every client needs.
struct Ctx {
    addr: String,
    plain_model: String,
    questions: Vec<Problem>,
    tally: SharedTally,
}

fn body(ctx: &Ctx, kind: Kind, stream: bool, p: &Problem, seed: u64) -> String {
    let messages = json!([{"role": "user", "content": p.question}]);
    let mut v = json!({"messages": messages, "temperature": 0.7, "seed": seed, "stream": stream});
    match kind {
        Kind::BestOfN => v["reasoning"] = json!({"strategy": "best_of_n"}),
        Kind::Beam => v["reasoning"] = json!({"strategy": "beam"}),
        Kind::Plain => v["max_tokens"] = json!(32),
    }
    v["model"] = json!(if kind == Kind::Plain { ctx.plain_model.as_str() } else { REASONING_MODEL });
    v.to_string()
}

/// How an exchange ended for its client, to set beside the server's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientSaw {
    /// Hung up before the whole response arrived.
    Abandoned,
    /// Read the whole response.
    Complete,
    /// Failed below HTTP.
    Failed,
}

/// A request on which the client and the server's log disagree: abandoned
/// but not logged as 499, or logged as 499 but read in full.
#[derive(Debug, Clone, Serialize)]
pub struct Disagreement {
    pub id: String,
    pub client: ClientSaw,
    /// The server's log line; `None` when it has none (the request never
    /// reached a handler).
    pub server: Option<client::Logged>,
}

/// How one exchange ended.
enum Ended {
    Complete { status: u16, retry_after: Option<Duration> },
    Abandoned,
    Failed,
}

/// At the deadline: whether the rest of the response is already in this
/// client's socket buffer (read without waiting). Such a response had
/// arrived in full — the server wrote all of it — so hanging up now is not
/// abandoning it. (The head is read here too when `head` is `None`; its
/// status is tallied by the caller only when the head came in time.)
async fn arrived(conn: &mut client::Conn, head: Option<&client::Head>) -> Option<client::Head> {
    let rest = async {
        let h = match head {
            Some(h) => h.clone(),
            None => conn.head().await?,
        };
        conn.body_to_end().await?;
        anyhow::Ok(h)
    };
    // A zero timeout still polls the read once: only bytes already here count.
    tokio::time::timeout(Duration::ZERO, rest).await.ok()?.ok()
}

/// Sends one request and reads the response, or hangs up at
/// `abandon_after`: dropping the connection closes it, and the request
/// counts as abandoned only because the deadline came before its end.
async fn exchange(ctx: &Ctx, id: &str, body: &str, abandon_after: Option<Duration>) -> Ended {
    let ended = exchange_inner(ctx, id, body, abandon_after).await;
    let saw = match ended {
        Ended::Complete { .. } => ClientSaw::Complete,
        Ended::Abandoned => ClientSaw::Abandoned,
        Ended::Failed => ClientSaw::Failed,
    };
    tally(&ctx.tally, |t| t.outcomes.push((id.to_string(), saw)));
    ended
}

async fn exchange_inner(ctx: &Ctx, id: &str, body: &str, abandon_after: Option<Duration>) -> Ended {
    tally(&ctx.tally, |t| t.requests += 1);
    let deadline = tokio::time::Instant::now() + abandon_after.unwrap_or(REQUEST_TIMEOUT);
    let expired = || {
        if abandon_after.is_some() {
            tally(&ctx.tally, |t| t.abandoned += 1);
            Ended::Abandoned
        } else {
            tally(&ctx.tally, |t| t.transport_errors += 1);
            Ended::Failed
        }
    };
    let failed = |e: anyhow::Error| {
        if ctx.tally.lock().map(|t| t.transport_errors == 0).unwrap_or(false) {
            eprintln!("  first transport error: {e:#}");
        }
        tally(&ctx.tally, |t| t.transport_errors += 1);
        Ended::Failed
    };
    let headers = [("x-request-id", id)];
    let sent = tokio::time::timeout_at(
        deadline,
        client::send_with(&ctx.addr, "POST", "/v1/chat/completions", Some(body), &headers),
    );
    let mut conn = match sent.await {
        Err(_) => return expired(),
        Ok(Err(e)) => return failed(e),
        Ok(Ok(c)) => c,
    };
    let head = match tokio::time::timeout_at(deadline, conn.head()).await {
        Err(_) => match arrived(&mut conn, None).await {
            Some(head) => head,
            None => return expired(),
        },
        Ok(Err(e)) => return failed(e),
        Ok(Ok(h)) => h,
    };
    tally(&ctx.tally, |t| *t.statuses.entry(head.status.to_string()).or_default() += 1);
    let body = match tokio::time::timeout_at(deadline, conn.body_to_end()).await {
        Err(_) => match arrived(&mut conn, Some(&head)).await {
            Some(_) => Vec::new(),
            None => return expired(),
        },
        Ok(Err(e)) => return failed(e),
        Ok(Ok(b)) => b,
    };
    // An error after a stream has started arrives as a `data:` error object.
    let text = String::from_utf8_lossy(&body);
    if head.status == 200 && text.lines().any(|l| l.starts_with("data: {\"error\"")) {
        tally(&ctx.tally, |t| t.stream_errors += 1);
    }
    Ended::Complete { status: head.status, retry_after: head.retry_after() }
}

/// One client's requests until `until`; each waits out `Retry-After` on 429.
async fn client_loop(ctx: Arc<Ctx>, k: usize, client: Client, seed: u64, until: Instant) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut i = 0u64;
    while Instant::now() < until {
        let plan = client.plan(i, &mut rng);
        let p = &ctx.questions[rng.random_range(0..ctx.questions.len())];
        let body = body(&ctx, plan.kind, plan.stream, p, rng.random_range(0..1u64 << 32));
        let id = format!("{}{k}-{i}", client::TRACKED_ID_PREFIX);
        let pause = match exchange(&ctx, &id, &body, plan.abandon_after).await {
            Ended::Complete { status: 429, retry_after } => retry_after.unwrap_or(Duration::from_secs(1)),
            Ended::Complete { .. } | Ended::Abandoned => Duration::ZERO,
            Ended::Failed => FAILURE_PAUSE,
        };
        let left = until.saturating_duration_since(Instant::now());
        tokio::time::sleep(pause.min(left)).await;
        i += 1;
    }
}

/// The figures taken from one `/metrics` scrape.
#[derive(Debug, Clone, Copy, Default)]
struct Scrape {
    cancelled: f64,
    generated: f64,
    http_5xx: f64,
}

async fn scrape(addr: &str) -> anyhow::Result<Scrape> {
    let r = client::request(addr, "GET", "/metrics", None).await?;
    anyhow::ensure!(r.head.status == 200, "GET /metrics answered {}", r.head.status);
    let text = String::from_utf8_lossy(&r.body);
    let http_5xx = client::metric_samples(&text, crate::metrics::HTTP_REQUESTS_TOTAL)
        .filter(|(labels, _)| client::label(labels, "status").is_some_and(|s| s.starts_with('5')))
        .map(|(_, v)| v)
        .sum();
    Ok(Scrape {
        cancelled: client::metric_sum(&text, crate::metrics::CANCELLED_REQUESTS_TOTAL),
        generated: client::metric_sum(&text, crate::metrics::GENERATED_TOKENS_TOTAL),
        http_5xx,
    })
}

/// The child's resident set in MiB, from `/proc/<pid>/status`.
fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS line in /proc/{pid}/status"))?;
    Ok(kb / 1024.0)
}

/// RSS every `SAMPLE_EVERY` until `until`, with a progress line each time.
async fn sampler(addr: String, pid: u32, start: Instant, until: Instant, t: SharedTally) -> Vec<(f64, f64)> {
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        if Instant::now() >= until {
            return samples;
        }
        let at = start.elapsed().as_secs_f64();
        match rss_mib(pid) {
            Ok(mib) => samples.push((at, mib)),
            Err(e) => eprintln!("  t={at:.0}s: cannot read the server's RSS: {e:#}"),
        }
        let generated = scrape(&addr).await.map(|s| s.generated).unwrap_or(f64::NAN);
        let tl = t.lock().expect("tally updates never panic while holding the lock");
        eprintln!(
            "  t={at:.0}s rss={:.1} MiB requests={} abandoned={} statuses={:?} server tokens={generated}",
            samples.last().map_or(f64::NAN, |s| s.1),
            tl.requests,
            tl.abandoned,
            tl.statuses
        );
    }
}

/// Last RSS over the first sample at or after 120 s, minus 1.
fn growth(samples: &[(f64, f64)], run_s: f64) -> Option<f64> {
    if run_s < GROWTH_FROM_S {
        return None;
    }
    let base = samples.iter().find(|s| s.0 >= GROWTH_FROM_S)?.1;
    Some(samples.last()?.1 / base - 1.0)
}

/// One request of each kind before the load, so that a server that
/// refuses one (no PRM for ponder-arith, an API key the clients do not
/// send) fails the run with its answer instead of spinning the load's
/// clients on refusals.
async fn preflight(ctx: &Ctx) -> anyhow::Result<()> {
    let p = &ctx.questions[0];
    for kind in [Kind::BestOfN, Kind::Beam, Kind::Plain] {
        let r =
            client::request(&ctx.addr, "POST", "/v1/chat/completions", Some(&body(ctx, kind, false, p, 0)))
                .await?;
        anyhow::ensure!(
            r.head.status == 200,
            "before the load, a {kind:?} request answered {}: {}; bench soak needs a server whose \
             {REASONING_MODEL} has a PRM and that asks no API key",
            r.head.status,
            String::from_utf8_lossy(&r.body).trim()
        );
    }
    Ok(())
}

/// The ids `GET /v1/models` lists.
async fn served_models(addr: &str) -> anyhow::Result<Vec<String>> {
    let r = client::request(addr, "GET", "/v1/models", None).await?;
    anyhow::ensure!(r.head.status == 200, "GET /v1/models answered {}", r.head.status);
    let v: Value = r.json()?;
    let ids =
        v["data"].as_array().map(|d| d.iter().filter_map(|m| m["id"].as_str().map(String::from)).collect());
    Ok(ids.unwrap_or_default())
}

fn delta(before: f64, after: f64) -> u64 {
    (after - before).max(0.0).round() as u64
}

async fn soak(server: &mut client::Server, args: &SoakBenchArgs) -> anyhow::Result<SoakReport> {
    let addr = server.addr.clone();
    client::wait_healthy(&addr, START_TIMEOUT).await?;
    let models = served_models(&addr).await?;
    anyhow::ensure!(
        models.iter().any(|m| m == REASONING_MODEL),
        "the server does not serve {REASONING_MODEL}"
    );
    let plain_model = if models.iter().any(|m| m == PLAIN_MODEL) { PLAIN_MODEL } else { REASONING_MODEL };
    eprintln!("plain client on {plain_model}");
    let ctx = Arc::new(Ctx {
        addr: addr.clone(),
        plain_model: plain_model.to_string(),
        questions: task::generate(Split::Test, 20)?,
        tally: SharedTally::default(),
    });
    preflight(&ctx).await?;
    let before = scrape(&addr).await?;
    let run = Duration::from_secs_f64(args.minutes * 60.0);
    let start = Instant::now();
    let until = start + run;
    let sampling = tokio::spawn(sampler(addr.clone(), server.pid(), start, until, ctx.tally.clone()));
    let clients: Vec<_> = CLIENTS
        .iter()
        .enumerate()
        .map(|(k, &c)| {
            let seed = args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ k as u64;
            tokio::spawn(client_loop(ctx.clone(), k, c, seed, until))
        })
        .collect();
    for c in clients {
        c.await?;
    }
    let mut rss = sampling.await?;
    eprintln!(
        "load stopped at {:.0}s; {QUIET:?} quiet before the last scrape",
        start.elapsed().as_secs_f64()
    );
    tokio::time::sleep(QUIET).await;
    anyhow::ensure!(!server.has_exited(), "the server exited during the run");
    rss.push((start.elapsed().as_secs_f64(), rss_mib(server.pid())?));
    let after = scrape(&addr).await?;
    let t = ctx.tally.lock().expect("tally updates never panic while holding the lock");
    let logged = server.logged_all();
    Ok(SoakReport {
        server_logged_499: logged.values().filter(|l| l.status == 499).count() as u64,
        disagreements: disagreements(&t.outcomes, &logged),
        minutes: args.minutes,
        rss_growth_after_2min: growth(&rss, run.as_secs_f64()),
        rss_mib: rss,
        statuses: t.statuses.clone(),
        requests: t.requests,
        abandoned: t.abandoned,
        server_cancelled: delta(before.cancelled, after.cancelled),
        server_5xx: delta(before.http_5xx, after.http_5xx),
        server_generated_tokens: delta(before.generated, after.generated),
        transport_errors: t.transport_errors,
        stream_errors: t.stream_errors,
    })
}

/// Abandoned requests the server did not log as 499, and 499s whose client
/// read the whole response.
fn disagreements(
    outcomes: &[(String, ClientSaw)],
    logged: &std::collections::HashMap<String, client::Logged>,
) -> Vec<Disagreement> {
    outcomes
        .iter()
        .filter_map(|(id, saw)| {
            let server = logged.get(id).copied();
            let closed = server.is_some_and(|l| l.status == 499);
            let disagree = match saw {
                ClientSaw::Abandoned => !closed,
                ClientSaw::Complete => closed,
                ClientSaw::Failed => false,
            };
            disagree.then(|| Disagreement { id: id.clone(), client: *saw, server })
        })
        .collect()
}

fn print_report(r: &SoakReport) {
    println!("soak of {} min: {} requests, statuses {:?}", r.minutes, r.requests, r.statuses);
    println!(
        "abandoned by the client {}, cancelled by the server {}; server 5xx {}; transport errors {}, stream errors {}",
        r.abandoned, r.server_cancelled, r.server_5xx, r.transport_errors, r.stream_errors
    );
    println!("server logged {} requests as 499", r.server_logged_499);
    for d in &r.disagreements {
        println!("  disagreement: {} client {:?}, server {:?}", d.id, d.client, d.server);
    }
    println!("server generated {} tokens", r.server_generated_tokens);
    let rss: Vec<String> = r.rss_mib.iter().map(|(t, m)| format!("{t:.0}s {m:.1}")).collect();
    println!("RSS MiB: {}", rss.join(", "));
    match r.rss_growth_after_2min {
        Some(g) => println!("RSS growth after 2 min: {:+.1}%", g * 100.0),
        None => println!("RSS growth after 2 min: - (run shorter than 2 min)"),
    }
}

pub fn run(args: SoakBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.minutes > 0.0 && args.minutes.is_finite(), "--minutes must be positive");
    eprintln!("starting ponder serve --config {}", args.config.display());
    let mut server = client::start_serve(&args.config, START_TIMEOUT)?;
    eprintln!("server at {} (pid {})", server.addr, server.pid());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let report = rt.block_on(soak(&mut server, &args))?;
    drop(server);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_starts_at_two_minutes_and_needs_a_long_enough_run() {
        let s = [(0.0, 100.0), (110.0, 150.0), (120.5, 200.0), (300.0, 220.0)];
        assert_eq!(growth(&s, 60.0), None);
        let g = growth(&s, 300.0).expect("a sample after 120 s exists");
        assert!((g - 0.1).abs() < 1e-9, "{g}");
    }

    #[test]
    fn client_and_server_disagree_only_where_an_abandoned_request_was_not_a_499_or_the_reverse() {
        let l = |status| client::Logged { status, sent_status: 200, total_ms: 1.0 };
        let logged = std::collections::HashMap::from([
            ("a".to_string(), l(499)),
            ("b".to_string(), l(200)),
            ("c".to_string(), l(499)),
            ("d".to_string(), l(200)),
        ]);
        let outcomes = [
            ("a".to_string(), ClientSaw::Abandoned),
            ("b".to_string(), ClientSaw::Abandoned),
            ("c".to_string(), ClientSaw::Complete),
            ("d".to_string(), ClientSaw::Complete),
            ("e".to_string(), ClientSaw::Abandoned),
            ("f".to_string(), ClientSaw::Failed),
        ];
        let ids: Vec<_> = disagreements(&outcomes, &logged).into_iter().map(|d| (d.id, d.server)).collect();
        assert_eq!(ids, [("b".into(), Some(l(200))), ("c".into(), Some(l(499))), ("e".into(), None)]);
    }

    #[test]
    fn the_abandoning_client_hangs_up_within_its_window() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for i in 0..100 {
            let plan = Client::Abandoning.plan(i, &mut rng);
            let d = plan.abandon_after.expect("the abandoning client always hangs up");
            assert!((50..=300).contains(&d.as_millis()), "{d:?}");
            assert_ne!(plan.kind, Kind::Beam);
        }
        assert!(Client::Plain.plan(0, &mut rng).stream && !Client::Plain.plan(1, &mut rng).stream);
    }
}
