//! A dataset's privacy limits (`[datasets.budget]` of `node.toml`): what
//! the ledger checks every debit against.

use fedq_dp::accounting::Measure;
use serde::{Deserialize, Serialize};

/// `[datasets.budget]`: privacy limits, in the dataset's measure: epsilon
/// for `measure = "pure"` (the default; basic composition), rho for
/// `measure = "zcdp"` (zCDP composition).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetLimits {
    /// Total any one analyst may spend on this dataset.
    pub per_analyst: f64,
    /// Total all analysts together may spend on this dataset.
    pub total: f64,
    /// Largest cost a single query may have.
    pub per_query_max: f64,
    /// The measure the ledger accounts in. Fixed once anything was spent:
    /// a node whose ledger has spent in another measure refuses to start.
    #[serde(default)]
    pub measure: Measure,
    /// zCDP only (required there): the delta at which the (epsilon, delta)
    /// equivalents of rho are stated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
    /// Open-domain GROUP BY (released keys): the delta each such release
    /// spends; its threshold is the smallest whose delta, by OpenDP's
    /// privacy map, is at most this. Required when a column is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_delta: Option<f64>,
    /// Total delta one analyst may spend on released keys of this dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_delta_per_analyst: Option<f64>,
    /// Total delta all analysts together may spend on released keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_delta_total: Option<f64>,
}

/// Largest delta a zCDP dataset may state its equivalents at, and largest
/// `keys_delta` and delta limits of released keys.
pub const MAX_DELTA: f64 = 1e-3;

impl BudgetLimits {
    /// The delta of (epsilon, delta) equivalents: 0 for pure DP.
    pub fn equivalence_delta(&self) -> f64 {
        match self.measure {
            Measure::Pure => 0.0,
            Measure::Zcdp => self.delta.unwrap_or(MAX_DELTA),
        }
    }
}
