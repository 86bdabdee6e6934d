//! ponder: an inference server that thinks as hard as each question needs.
//!
//! # Map of the crate
//!
//! Dependencies point one way, from the outside in:
//!
//! ```text
//! server ─► api ─► validation ─► worker ─► reasoning ─► engine ─► model  (tensors: weights, forward pass, KV caches)
//!            │                     │                     └──────► tokenizer
//!            │                     └──────────► prm (PRM heads and models: success-probability quantiles)
//!            └─► wire (OpenAI JSON types), metrics, config
//!
//! arith (the ponder-arith task, tokenizer, trainer) ◄─ calibrate, eval (offline commands over the same layers)
//! ```
//!
//! - [`config`]: settings parsed once (defaults, TOML file, `PONDER_*`, flags).
//! - [`server`]: wiring and graceful shutdown; [`api`]: routes, auth, errors
//!   in OpenAI's JSON, SSE; [`wire`]: the OpenAI request/response types.
//! - [`validation`]: wire requests become [`validation::ValidRequest`]s (token
//!   ids, defaults resolved, limits checked) or an error naming the field.
//! - [`worker`]: admission counted in sequences (RAII permits), one thread per
//!   model and device owning its engine; its [`worker::Scheduler`] decodes the
//!   sequences of every running request together.
//! - [`reasoning`]: inference-time scaling per request (single, best-of-N,
//!   beam; fixed or instance-adaptive budgets from calibrated PRM quantiles),
//!   written against a two-call [`reasoning::Backend`] ("extend these
//!   trajectories by one step", "score these prefixes"); its
//!   [`reasoning::runtime::Runtime`] batches the trajectories of every request.
//! - [`prm`]: process reward models: the quantile head on the policy's own
//!   hidden states (default) and separate PRMs in the Qwen2.5-Math-PRM
//!   format, loaded as a model's `prm` setting names them.
//! - [`arith`], [`calibrate`], [`eval`]: the trained demo model and its task,
//!   the PRM calibration pipeline (heads and model PRMs), and the evaluation
//!   command with its sweep of fixed, adaptive and oracle budgets.
//! - [`engine`]: sequences with sampling and stop conditions; `step` samples
//!   one token for every running sequence and feeds all of them (and any
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
//! template, tokenizes and checks limits → the model's pool admits `n`
//! sequences or answers 429 at once → a [`worker::Job`] goes down a bounded
//! channel to the worker thread → the scheduler starts a root sequence whose
//! prompt is prefilled in the next batched step, forks it into `n` choices
//! sharing the prompt's cache, and steps them with every other running
//! sequence; each step's text deltas go back as [`worker::GenEvent`]s → the
//! handler answers with one JSON body or SSE chunks. With a `reasoning`
//! object the scheduler hands the request to the [`reasoning::runtime::Runtime`]
//! instead: the strategy scores the empty prefix, forks as many trajectories
//! as the budget asks, extends them one reasoning step ("\n\n") at a time in
//! the same batched steps, prunes or stops by PRM score, and the selected
//! answer goes back with a [`worker::ReasoningReport`] (tokens spent and
//! saved) that becomes the response's `ponder` object, headers and metrics. A closed reply channel
//! (the client left) drops the request's sequences, and their caches, before
//! the next step.

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
pub mod server;
pub mod tokenizer;
pub mod validation;
pub mod wire;
pub mod worker;
