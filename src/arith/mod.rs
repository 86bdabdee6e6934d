//! ponder-arith: a small reasoning model trained in the repository on a
//! graded arithmetic task, so that adaptive reasoning has something to adapt
//! to on a CPU.

pub mod model;
pub mod task;
pub mod train;
pub mod verifier;
pub mod vocab;
