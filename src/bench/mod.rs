//! Benchmarks behind `ponder bench`: measurements reported in notes, never
//! asserted in tests.

pub mod client;
pub mod engine;
pub mod proxy;
pub mod reasoning;
pub mod server;
pub mod soak;
