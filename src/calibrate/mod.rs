//! Calibration of process reward models: Monte-Carlo labels, quantile-head
//! training, baselines, metrics and reports (DESIGN §1).

pub mod baselines;
mod fitted;
pub mod labels;
pub mod metrics;
mod model_prm;
pub mod report;
pub mod run;
pub mod train;
