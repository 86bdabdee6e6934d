//! Benchmarks behind `ponder bench`: measurements reported in notes, never
//! asserted in tests.

pub mod engine;
pub mod server;
