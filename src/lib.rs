//! ponder: an inference server that thinks as hard as each question needs.
//!
//! # Map of the crate
//!
//! Dependencies point one way, from the outside in:
//!
//! ```text
//! server ─► api ─► backend (the seam) ─► validation ─► reasoning ─► engine ─► model
//!   │        │         ▲                     │             ├─► prm ──┘          └─► tokenizer
//!   │        │         │                     └─► wire      └─► arith::task (answer extraction)
//!   │        └─► wire, metrics, config
//!   ├─► worker ────────┤ (implements Backend; its scheduler drives reasoning::runtime and engine)
//!   └─► remote ────────┘ (implements Backend over an OpenAI-compatible engine; reqwest)
//!
//! config ─► prm::config, reasoning::knobs, model      metrics ─► reasoning, prm
//! arith, calibrate, eval, bench, cli: offline commands over the same layers
//! ```
//!
//! - [`config`]: settings parsed once (defaults, TOML file, `PONDER_*`, flags),
//!   with the reasoning defaults checked against the same ranges as requests.
//! - [`server`]: wiring and graceful shutdown; [`api`]: routes, auth, errors
//!   in OpenAI's JSON (status chosen in one place), SSE with progress chunks
//!   and keep-alives, the one log line per request; [`wire`]: the OpenAI
//!   request/response types.
//! - [`backend`]: the one seam between HTTP and generation —
//!   `schedule(request) -> EventStream` or a refusal — implemented by the
//!   local [`worker::ModelPool`], by [`remote::RemoteBackend`] (a vLLM,
//!   SGLang, TGI or llama.cpp engine over HTTP) and by
//!   [`backend::fake::FakeBackend`] (HTTP tests without a model).
//! - [`validation`]: wire requests become [`validation::ValidRequest`]s (token
//!   ids, defaults resolved, limits checked) or an error naming the field.
//! - [`worker`]: per model, admission counted in requests and supervised
//!   worker threads (one per device) owning their engines; each worker's
//!   [`worker::Scheduler`] alone calls the engine's step. Plain and reasoning
//!   requests are its two kinds of task; before every step it shares the
//!   running limit (in sequences) out by what each request uses now.
//! - [`reasoning`]: inference-time scaling per request (single, best-of-N,
//!   beam; fixed or instance-adaptive budgets from calibrated PRM quantiles),
//!   written against a two-call [`reasoning::Trajectories`] ("extend these
//!   trajectories by one step", "score these prefixes"); its
//!   [`reasoning::runtime::Runtime`] runs every reasoning request of a worker
//!   and hands the scheduler the sequences it wants stepped; [`reasoning::knobs`]
//!   holds the knobs' defaults and ranges.
//! - [`prm`]: process reward models: the quantile head on the policy's own
//!   hidden states (default) and separate PRMs in the Qwen2.5-Math-PRM
//!   format, loaded as a model's `prm` setting names them.
//! - [`arith`], [`calibrate`], [`eval`]: the trained demo model and its task,
//!   the PRM calibration pipeline (heads and model PRMs), and the evaluation
//!   command with its sweep of fixed, adaptive and oracle budgets.
//! - [`engine`]: sequences with sampling and stop conditions; `step` samples
//!   one token for every sequence it is given and feeds all of them (and any
//!   prompt chunks) through one batched forward pass.
//! - [`model`]: the llama-family decoder over a batch of sequences of
//!   different lengths; each sequence owns its [`model::KvCache`], and forks
//!   share prefixes instead of copying them.
//! - [`tokenizer`]: `tokenizer.json` or a tokenizer built from GGUF metadata,
//!   the chat template (minijinja), end-of-generation ids.
//! - [`metrics`]: the Prometheus registry; [`cli`] and [`bench`](mod@bench): the command.
//!
//! # Path of one request
//!
//! `POST /v1/chat/completions` → [`api`] checks the key and parses the body
//! (400 naming the field on failure) → [`validation::chat`] renders the chat
//! template, tokenizes and checks limits → the model's [`backend::Backend`]
//! schedules it: the [`worker::ModelPool`] admits it (or answers 429 at once)
//! and sends a [`worker::Job`] down a bounded channel to a worker → the
//! scheduler starts it once the sequences it needs fit: a plain request's
//! root sequence is prefilled, forked into `n` choices sharing the prompt's
//! cache, and stepped with every other running sequence; a reasoning
//! request's strategy scores the empty prefix, forks as many trajectories as
//! its budget asks and extends them one reasoning step ("\n\n") at a time,
//! pruning or stopping by PRM score, while the scheduler steps its share of
//! them in the same batches and sends a progress event after each reasoning
//! step → the events ([`backend::GenEvent`]) become one JSON body or SSE
//! chunks; a reasoning answer comes with a [`backend::ReasoningReport`]
//! (tokens spent and saved) that becomes the response's `ponder` object,
//! headers and metrics. A closed reply channel (the client left) drops the
//! request's sequences, and their caches, before the next step; the request
//! is logged with status 499.

pub mod api;
pub mod arith;
pub mod backend;
pub mod bench;
pub mod calibrate;
pub mod cli;
pub mod config;
pub mod engine;
pub mod eval;
pub mod metrics;
pub mod model;
pub mod prm;
pub mod reasoning;
pub mod remote;
pub mod server;
pub mod tokenizer;
pub mod validation;
pub mod wire;
pub mod worker;
