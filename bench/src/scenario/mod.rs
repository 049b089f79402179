//! The benchmark scenarios. Each returns an [`Outcome`]: one summary line, a JSON result for
//! the report, whether the harness saw anything wrong, and whether the target was met.

pub mod churn;
pub mod compare;
pub mod idle;
pub mod instructions;
pub mod stream;
pub mod worker;

use std::path::PathBuf;

use serde_json::Value;

use crate::{client::Sources, target::Target};

/// What every scenario works with.
pub struct Bench {
    pub target: Target,
    pub out_dir: PathBuf,
    /// An access token to use instead of signing up users (servers with other auth).
    pub token: Option<String>,
    pub sources: Sources,
}

pub struct Outcome {
    pub summary: String,
    pub result: Value,
    /// False when a connection failed, a frame was missing or a check did not hold.
    pub correct: bool,
    /// Whether the target for this scenario was met.
    pub target_met: bool,
}

/// "met" or "MISSED", for summary lines.
pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}
