//! One Prometheus registry for the process: metric names as constants,
//! fixed label sets, and typed helpers to record through.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub const HTTP_REQUESTS_TOTAL: &str = "ponder_http_requests_total";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "ponder_http_request_duration_seconds";
pub const QUEUE_DURATION_SECONDS: &str = "ponder_queue_duration_seconds";
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "ponder_time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY_SECONDS: &str = "ponder_inter_token_latency_seconds";
pub const PROMPT_TOKENS_TOTAL: &str = "ponder_prompt_tokens_total";
pub const GENERATED_TOKENS_TOTAL: &str = "ponder_generated_tokens_total";
pub const QUEUE_DEPTH: &str = "ponder_queue_depth_sequences";
pub const RUNNING_SEQUENCES: &str = "ponder_running_sequences";
pub const BATCH_SIZE: &str = "ponder_batch_size_sequences";
pub const CANCELLED_REQUESTS_TOTAL: &str = "ponder_cancelled_requests_total";
pub const REJECTED_REQUESTS_TOTAL: &str = "ponder_rejected_requests_total";
pub const KV_CACHE_BYTES: &str = "ponder_kv_cache_bytes";
pub const WORKER_RESTARTS_TOTAL: &str = "ponder_worker_restarts_total";
pub const MODELS_LOADED: &str = "ponder_models_loaded";
pub const REASONING_TOKENS_GENERATED_TOTAL: &str = "ponder_reasoning_tokens_generated_total";
pub const REASONING_TOKENS_SAVED_TOTAL: &str = "ponder_reasoning_tokens_saved_total";
pub const REASONING_SAMPLES: &str = "ponder_reasoning_samples";
pub const REASONING_BUDGET_FRACTION: &str = "ponder_reasoning_budget_fraction";
pub const PRM_SUCCESS_PROBABILITY: &str = "ponder_prm_success_probability";
pub const PRM_EVALUATIONS_TOTAL: &str = "ponder_prm_evaluations_total";
pub const REASONING_STOPS_TOTAL: &str = "ponder_reasoning_stops_total";

const LATENCY_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const FRACTION_BUCKETS: &[f64] = &[0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0];
const PROBABILITY_BUCKETS: &[f64] = &[0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0];

/// Why a request was turned away before reaching a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    QueueFull,
    Draining,
    Loading,
    /// A worker is reloading its model after a failure.
    Restarting,
    /// A remote engine does not answer.
    Unreachable,
    /// The model failed to load and is not retried.
    Failed,
}

impl Rejection {
    /// Every reason, for series that exist from the start.
    pub const ALL: [Rejection; 6] = [
        Rejection::QueueFull,
        Rejection::Draining,
        Rejection::Loading,
        Rejection::Restarting,
        Rejection::Unreachable,
        Rejection::Failed,
    ];

    fn label(self) -> &'static str {
        match self {
            Rejection::QueueFull => "queue_full",
            Rejection::Draining => "draining",
            Rejection::Loading => "loading",
            Rejection::Restarting => "restarting",
            Rejection::Unreachable => "unreachable",
            Rejection::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    queue_duration: HistogramVec,
    ttft: HistogramVec,
    itl: HistogramVec,
    prompt_tokens: IntCounterVec,
    generated_tokens: IntCounterVec,
    queue_depth: IntGaugeVec,
    running: IntGaugeVec,
    batch_size: HistogramVec,
    cancelled: IntCounterVec,
    rejected: IntCounterVec,
    kv_bytes: IntGaugeVec,
    worker_restarts: IntCounterVec,
    models_loaded: IntGauge,
    reasoning_generated: IntCounterVec,
    reasoning_saved: IntCounterVec,
    reasoning_samples: HistogramVec,
    reasoning_budget: HistogramVec,
    prm_probability: HistogramVec,
    prm_evaluations: IntCounterVec,
    reasoning_stops: IntCounterVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric options are valid");
    r.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric options are valid");
    r.register(Box::new(g.clone())).expect("metric names are unique");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)
        .expect("metric options are valid");
    r.register(Box::new(h.clone())).expect("metric names are unique");
    h
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let models_loaded = IntGauge::new(MODELS_LOADED, "Models ready to serve, as /health counts them")
            .expect("valid gauge");
        r.register(Box::new(models_loaded.clone())).expect("metric names are unique");
        Self {
            http_requests: counter(
                &r,
                HTTP_REQUESTS_TOTAL,
                "HTTP requests by route and status",
                &["route", "status"],
            ),
            http_duration: histogram(
                &r,
                HTTP_REQUEST_DURATION_SECONDS,
                "Time from request to complete response, by route",
                &["route"],
                LATENCY_BUCKETS,
            ),
            queue_duration: histogram(
                &r,
                QUEUE_DURATION_SECONDS,
                "Time from admission to the first decode step",
                &["model"],
                LATENCY_BUCKETS,
            ),
            ttft: histogram(
                &r,
                TIME_TO_FIRST_TOKEN_SECONDS,
                "Time from request to its first generated token",
                &["model"],
                LATENCY_BUCKETS,
            ),
            itl: histogram(
                &r,
                INTER_TOKEN_LATENCY_SECONDS,
                "Time between consecutive tokens of one sequence",
                &["model"],
                LATENCY_BUCKETS,
            ),
            prompt_tokens: counter(&r, PROMPT_TOKENS_TOTAL, "Prompt tokens prefilled", &["model"]),
            generated_tokens: counter(&r, GENERATED_TOKENS_TOTAL, "Tokens generated", &["model"]),
            queue_depth: gauge(
                &r,
                QUEUE_DEPTH,
                "Admitted sequences waiting for a worker",
                &["model", "device"],
            ),
            running: gauge(
                &r,
                RUNNING_SEQUENCES,
                "Sequences in a worker's running batch",
                &["model", "device"],
            ),
            batch_size: histogram(
                &r,
                BATCH_SIZE,
                "Sequences per batched decode step",
                &["model", "device"],
                BATCH_BUCKETS,
            ),
            cancelled: counter(
                &r,
                CANCELLED_REQUESTS_TOTAL,
                "Requests whose client left before the end",
                &["model"],
            ),
            rejected: counter(
                &r,
                REJECTED_REQUESTS_TOTAL,
                "Requests turned away, by reason",
                &["model", "reason"],
            ),
            kv_bytes: gauge(&r, KV_CACHE_BYTES, "Bytes held by live KV caches", &["model", "device"]),
            worker_restarts: counter(
                &r,
                WORKER_RESTARTS_TOTAL,
                "Workers restarted after a panic or a model error",
                &["model"],
            ),
            models_loaded,
            reasoning_generated: counter(
                &r,
                REASONING_TOKENS_GENERATED_TOTAL,
                "Tokens generated by reasoning requests",
                &["model", "strategy"],
            ),
            reasoning_saved: counter(
                &r,
                REASONING_TOKENS_SAVED_TOTAL,
                "Fixed-budget token estimate minus tokens generated, per reasoning request",
                &["model", "strategy"],
            ),
            reasoning_samples: histogram(
                &r,
                REASONING_SAMPLES,
                "Trajectories sampled per reasoning request",
                &["model", "strategy"],
                BATCH_BUCKETS,
            ),
            reasoning_budget: histogram(
                &r,
                REASONING_BUDGET_FRACTION,
                "Tokens generated over the fixed-budget estimate, per reasoning request",
                &["model", "strategy"],
                FRACTION_BUCKETS,
            ),
            prm_probability: histogram(
                &r,
                PRM_SUCCESS_PROBABILITY,
                "PRM success probability (budget quantile) of the question alone, per request",
                &["model", "strategy"],
                PROBABILITY_BUCKETS,
            ),
            prm_evaluations: counter(
                &r,
                PRM_EVALUATIONS_TOTAL,
                "Prefixes scored by a PRM",
                &["model", "strategy"],
            ),
            reasoning_stops: counter(
                &r,
                REASONING_STOPS_TOTAL,
                "Reasoning requests by why they stopped drawing: budget (fixed or ias), confident, gave_up, exhausted",
                &["model", "strategy", "reason"],
            ),
            registry: r,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }

    pub fn http_request(&self, route: &str, status: u16, seconds: f64) {
        self.http_requests.with_label_values(&[route, &status.to_string()]).inc();
        self.http_duration.with_label_values(&[route]).observe(seconds);
    }

    pub fn rejected(&self, model: &str, why: Rejection) {
        self.rejected.with_label_values(&[model, why.label()]).inc();
    }

    /// A request to `model` whose client left before its response was
    /// written, noticed by the HTTP side rather than the worker.
    pub fn cancelled(&self, model: &str) {
        self.cancelled.with_label_values(&[model]).inc();
    }

    /// Set at each scrape from the models' statuses, so that a model on
    /// several devices counts once and one that failed or became
    /// unreachable no longer counts.
    pub fn set_models_ready(&self, ready: usize) {
        self.models_loaded.set(ready as i64);
    }

    /// Handles bound to one model's labels, for the worker's hot loop; the
    /// gauges and batch sizes of one worker also carry its `device` ("cpu",
    /// "cuda:0", or "remote" for an engine elsewhere), so that a model's
    /// workers do not overwrite each other.
    pub fn for_model(&self, model: &str, device: &str) -> ModelMetrics {
        let l = [model];
        let d = [model, device];
        // Every reason's series exists from the start, at 0, so that a
        // dashboard's rate() of rejections reads 0 rather than no data.
        for why in Rejection::ALL {
            self.rejected.with_label_values(&[model, why.label()]);
        }
        ModelMetrics {
            queue_duration: self.queue_duration.with_label_values(&l),
            ttft: self.ttft.with_label_values(&l),
            itl: self.itl.with_label_values(&l),
            prompt_tokens: self.prompt_tokens.with_label_values(&l),
            generated_tokens: self.generated_tokens.with_label_values(&l),
            queue_depth: self.queue_depth.with_label_values(&d),
            running: self.running.with_label_values(&d),
            batch_size: self.batch_size.with_label_values(&d),
            cancelled: self.cancelled.with_label_values(&l),
            kv_bytes: self.kv_bytes.with_label_values(&d),
            worker_restarts: self.worker_restarts.with_label_values(&l),
            reasoning: ReasoningMetrics { model: model.to_string(), metrics: self.clone() },
        }
    }
}

/// Per-request reasoning figures, labelled by model and strategy.
#[derive(Debug, Clone)]
pub struct ReasoningMetrics {
    model: String,
    metrics: Metrics,
}

impl ReasoningMetrics {
    pub fn record(&self, strategy: &str, a: &crate::reasoning::Accounting, budget_quantile: f64) {
        let m = &self.metrics;
        let l = [self.model.as_str(), strategy];
        m.reasoning_generated.with_label_values(&l).inc_by(a.tokens_generated as u64);
        m.reasoning_saved.with_label_values(&l).inc_by(a.tokens_saved as u64);
        m.reasoning_samples.with_label_values(&l).observe(a.samples as f64);
        if a.fixed_tokens_estimate > 0 {
            m.reasoning_budget
                .with_label_values(&l)
                .observe(a.tokens_generated as f64 / a.fixed_tokens_estimate as f64);
        }
        if let Some(q) = a.start {
            m.prm_probability.with_label_values(&l).observe(q.at(budget_quantile) as f64);
        }
        m.prm_evaluations.with_label_values(&l).inc_by(a.prm_evaluations as u64);
        m.reasoning_stops.with_label_values(&[self.model.as_str(), strategy, a.stop.name()]).inc();
    }
}

/// One model's series.
#[derive(Debug, Clone)]
pub struct ModelMetrics {
    pub queue_duration: Histogram,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    pub queue_depth: IntGauge,
    pub running: IntGauge,
    pub batch_size: Histogram,
    pub cancelled: IntCounter,
    pub kv_bytes: IntGauge,
    pub worker_restarts: IntCounter,
    pub reasoning: ReasoningMetrics,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_name_follows_the_naming_rules() {
        let m = Metrics::new();
        m.http_request("/v1/models", 200, 0.01);
        m.rejected("x", Rejection::QueueFull);
        let mm = m.for_model("x", "cpu");
        mm.ttft.observe(0.1);
        let text = m.render();
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name.starts_with("ponder_"), "{name}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{name}");
            }
            let unitless = ["batch_size", "reasoning_samples", "budget_fraction", "success_probability"];
            if kind == "histogram" && !unitless.iter().any(|u| name.contains(u)) {
                assert!(name.ends_with("_seconds"), "{name}");
            }
        }
        assert!(text.contains("ponder_rejected_requests_total{model=\"x\",reason=\"queue_full\"} 1"));
    }

    #[test]
    fn two_workers_of_one_model_keep_their_own_gauges_under_their_device_label() {
        let m = Metrics::new();
        m.for_model("x", "cuda:0").running.set(3);
        m.for_model("x", "cuda:1").running.set(5);
        let text = m.render();
        assert!(text.contains("ponder_running_sequences{device=\"cuda:0\",model=\"x\"} 3"), "{text}");
        assert!(text.contains("ponder_running_sequences{device=\"cuda:1\",model=\"x\"} 5"), "{text}");
    }

    /// Every `ponder_*` metric a PromQL expression reads, with the labels it
    /// groups or filters by.
    fn references(expr: &str) -> Vec<(String, Vec<String>)> {
        let mut out = Vec::new();
        let mut rest = expr;
        while let Some(i) = rest.find("ponder_") {
            let name: String =
                rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            rest = &rest[i + name.len()..];
            let mut labels = Vec::new();
            if let Some(selector) = rest.strip_prefix('{') {
                let body = &selector[..selector.find('}').expect("selectors close")];
                labels.extend(
                    body.split(',')
                        .filter_map(|m| m.split(['=', '!', '~']).next())
                        .map(|l| l.trim().to_string()),
                );
            }
            out.push((name, labels));
        }
        // `by (a, b)` applies to the metrics of its aggregation; checking it
        // against each metric of the expression is stricter, and holds here.
        let mut by_labels = Vec::new();
        let mut rest = expr;
        while let Some(i) = rest.find("by (") {
            let body = &rest[i + 4..];
            let end = body.find(')').expect("by clauses close");
            by_labels.extend(body[..end].split(',').map(|l| l.trim().to_string()).filter(|l| l != "le"));
            rest = &body[end..];
        }
        for (_, labels) in &mut out {
            labels.extend(by_labels.iter().cloned());
        }
        out
    }

    #[test]
    fn every_series_the_shipped_dashboard_queries_is_exported_with_the_labels_it_uses() {
        let m = Metrics::new();
        m.http_request("/v1/chat/completions", 200, 0.01);
        m.rejected("x", Rejection::QueueFull);
        m.set_models_ready(1);
        let mm = m.for_model("x", "cpu");
        for h in [&mm.queue_duration, &mm.ttft, &mm.itl, &mm.batch_size] {
            h.observe(1.0);
        }
        for c in [&mm.prompt_tokens, &mm.generated_tokens, &mm.cancelled, &mm.worker_restarts] {
            c.inc();
        }
        for g in [&mm.queue_depth, &mm.running, &mm.kv_bytes] {
            g.set(1);
        }
        let q = crate::prm::Quantiles::point(0.5);
        let a = crate::reasoning::Accounting {
            samples: 2,
            fixed_samples: 4,
            tokens_generated: 10,
            fixed_tokens_estimate: 20,
            tokens_saved: 10,
            prm_evaluations: 3,
            start: Some(q),
            selected: Some(q),
            steps: 2,
            rule: Some(crate::reasoning::BudgetRule::GiveUp),
            stop: crate::reasoning::Stop::GaveUp,
            rounds: 1,
        };
        mm.reasoning.record("best_of_n", &a, 0.1);
        let text = m.render();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/ponder.json");
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let exprs: Vec<&str> = dashboard["panels"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p["targets"].as_array().into_iter().flatten())
            .map(|t| t["expr"].as_str().unwrap())
            .collect();
        assert!(exprs.len() >= 15, "{} queries", exprs.len());
        let mut seen = std::collections::BTreeSet::new();
        for expr in &exprs {
            for (name, labels) in references(expr) {
                let series: Vec<&str> =
                    text.lines().filter(|l| !l.starts_with('#') && l.starts_with(name.as_str())).collect();
                assert!(!series.is_empty(), "{name} (in {expr}) is not exported");
                for label in labels {
                    assert!(
                        series.iter().any(|l| l.contains(&format!("{label}=\""))),
                        "{name} has no label {label}: {expr}"
                    );
                }
                seen.insert(name);
            }
        }
        // Tokens saved per query is the dashboard's first panel.
        assert!(exprs[0].contains(REASONING_TOKENS_SAVED_TOTAL) && exprs[0].contains(REASONING_SAMPLES));
        assert!(seen.len() >= 14, "{seen:?}");
    }
}
