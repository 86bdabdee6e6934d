//! Calibration of process reward models: Monte-Carlo labels, quantile-head
//! training, baselines, metrics and reports (as in Park et al. 2025, arXiv 2506.09338).

pub mod baselines;
mod fitted;
pub mod labels;
pub mod metrics;
mod model_prm;
mod remote_labels;
mod remote_prm;
pub mod report;
pub mod run;
pub mod train;
