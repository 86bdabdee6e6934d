//! ponder: an inference server that thinks as hard as each question needs.
//!
//! # Map of the crate
//!
//! Dependencies point one way, from the outside in:
//!
//! ```text
//! cli, bench ──► engine ──► model      (tensors: weights, forward pass, KV caches)
//!                   └─────► tokenizer  (text ⇄ ids, chat template, streaming decode)
//! ```
//!
//! - [`model`]: the llama-family decoder over a batch of sequences of
//!   different lengths; each sequence owns its [`model::KvCache`], and forks
//!   share prefixes instead of copying them.
//! - [`tokenizer`]: `tokenizer.json` or a tokenizer built from GGUF metadata,
//!   the chat template (minijinja), end-of-generation ids.
//! - [`engine`]: sequences with sampling and stop conditions; `step` samples
//!   one token for every running sequence and feeds all of them (and any
//!   prompt chunks) through one batched forward pass.
//! - [`cli`] and [`bench`]: the `ponder` command.
//!
//! # Path of one generation
//!
//! `Engine::start(prompt)` makes a [`engine::Sequence`] whose prompt is
//! pending; the next `Engine::step` prefills it (in the same forward pass as
//! the decode steps of other sequences) and stores its next-token logits;
//! `Engine::fork` gives k children that share the prefilled cache; each
//! further `step` samples a token per child with the child's own seed,
//! checks EOS, stop strings (on decoded text, across token boundaries) and
//! `max_tokens`, and feeds the new tokens in one batched pass. Dropping a
//! sequence frees its cache.

pub mod bench;
pub mod cli;
pub mod engine;
pub mod model;
pub mod tokenizer;
