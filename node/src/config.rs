//! `node.toml`: how a partner describes its node.
//!
//! Relative paths are resolved against the directory holding the config file,
//! so a node directory can be moved or mounted anywhere as a whole.

pub use fedq_engine::source::{is_plain_identifier, SourceConfig, SourceKind};
pub use fedq_ledger::limits::{BudgetLimits, MAX_DELTA};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use fedq_dp::accounting::Measure;
use fedq_plan::schema::{ColumnSpec, Schema};

/// The whole node configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Identity and storage of the node.
    pub node: NodeSection,
    /// The node's certificate, key and the federation CA it trusts.
    pub tls: TlsSection,
    /// Request limits; each has a safe default.
    #[serde(default)]
    pub limits: Limits,
    /// The audit log's key files and who may export the log.
    #[serde(default)]
    pub audit: AuditSection,
    /// Who may query which dataset.
    #[serde(default)]
    pub access: AccessSection,
    /// The datasets this node serves.
    #[serde(default, rename = "datasets")]
    pub datasets: Vec<DatasetConfig>,
    /// SHA-256 of the config file's text, recorded in the audit log at start.
    #[serde(skip)]
    pub source_sha256: String,
    /// Directory of the config file; relative paths are resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `[node]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// The node's name in the federation; also the DNS name in its
    /// certificate that coordinators verify.
    pub name: String,
    /// Address to listen on, e.g. `127.0.0.1:7001`.
    pub listen: SocketAddr,
    /// Directory of the sled store (data, budget ledger).
    pub store: PathBuf,
}

/// `[tls]`: PEM files.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The federation CA; only clients with certificates it issued get in.
    pub ca: PathBuf,
    /// The node's certificate chain.
    pub cert: PathBuf,
    /// The node's private key.
    pub key: PathBuf,
    /// The federation's certificate revocation list (PEM, from `fedq ca
    /// revoke`), if any. Checked every few seconds and reloaded when it
    /// changes, so a revocation takes effect without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
}

/// `[audit]`: the audit log's signing key and its auditors.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    /// The ed25519 signing key (hex seed), created on first start. Keep it
    /// secret and backed up with the store.
    pub key: PathBuf,
    /// Where the public key (hex) is written; give it to auditors.
    pub public_key: PathBuf,
    /// Certificate names (CN, with OU `auditor`) allowed to export the log.
    pub auditors: Vec<String>,
}

impl Default for AuditSection {
    fn default() -> Self {
        AuditSection {
            key: "audit.key".into(),
            public_key: "audit.pub".into(),
            auditors: Vec::new(),
        }
    }
}

/// `[access]`: which analyst identities may query, and what.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessSection {
    /// The analysts allowed to query (certificate CN with OU `analyst`) and
    /// their datasets. Empty: any analyst certificate issued by the
    /// federation CA may query every dataset (an open federation).
    pub analysts: Vec<AnalystAccess>,
}

/// `[[access.analysts]]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalystAccess {
    /// Certificate common name.
    pub name: String,
    /// Datasets this analyst may query; `"*"` for all.
    pub datasets: Vec<String>,
}

impl AccessSection {
    /// Whether `analyst` may query at all (`None`: not listed), and if a
    /// dataset is given, whether that one.
    pub fn allows(&self, analyst: &str, dataset: Option<&str>) -> Result<(), String> {
        if self.analysts.is_empty() {
            return Ok(());
        }
        let Some(a) = self.analysts.iter().find(|a| a.name == analyst) else {
            return Err(format!(
                "{analyst:?} is not an analyst of this node; ask its operator to add it under [access] analysts"
            ));
        };
        match dataset {
            Some(d) if !a.datasets.iter().any(|x| x == "*" || x == d) => Err(format!(
                "{analyst:?} may not query dataset {d:?} on this node (allowed: {}); ask its operator",
                a.datasets.join(", ")
            )),
            _ => Ok(()),
        }
    }
}

/// `[limits]`: bounds on what one request may cost the node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest accepted gRPC request, in bytes.
    pub max_request_bytes: usize,
    /// Longest accepted SQL text, in bytes.
    pub max_sql_bytes: usize,
    /// Most cells (GROUP BY cross product) one query may release.
    pub max_cells: usize,
    /// Longest a two-phase reservation may wait for Commit, in milliseconds;
    /// after that its budget comes back.
    pub max_reservation_ms: u64,
    /// Queries (Query, Prepare, Commit) one analyst may start per minute.
    pub queries_per_minute: u32,
    /// Queries one analyst may have running at once.
    pub concurrent_queries: u32,
    /// How long the node works on one query before answering
    /// DEADLINE_EXCEEDED, in milliseconds (a retry with the same id then
    /// gets the release if it was made, without a second debit).
    pub query_deadline_ms: u64,
    /// How long a released answer is kept for replays, in milliseconds
    /// (default 30 days). A retry of the same query id within it gets the
    /// stored answer again at no cost; after it the stored answer is
    /// removed, and a retry is refused (never answered with fresh noise).
    /// The release's audit entries are kept for ever.
    pub replay_window_ms: u64,
}

/// The default replay window: 30 days.
pub const DEFAULT_REPLAY_WINDOW_MS: u64 = 30 * 24 * 3600 * 1000;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 64 * 1024,
            max_sql_bytes: 8 * 1024,
            max_cells: 10_000,
            max_reservation_ms: 60_000,
            queries_per_minute: 600,
            concurrent_queries: 4,
            query_deadline_ms: 30_000,
            replay_window_ms: DEFAULT_REPLAY_WINDOW_MS,
        }
    }
}

/// `[[datasets]]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// Name used in `FROM`.
    pub name: String,
    /// Free text shown to researchers.
    #[serde(default)]
    pub description: String,
    /// Privacy budget limits for this dataset.
    pub budget: BudgetLimits,
    /// Declared columns.
    pub columns: Vec<ColumnSpec>,
    /// `[datasets.privacy_unit]`: protect persons rather than records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy_unit: Option<PrivacyUnitConfig>,
    /// Where the rows live when not in the node's own store: a table or
    /// view of the partner's PostgreSQL database. Absent: rows are ingested
    /// from CSV into the embedded store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceConfig>,
}

/// `[datasets.privacy_unit]`: the dataset's records may repeat a person.
/// Every record must carry the person's identifier in `person_column` (a
/// CSV header not among the declared columns, never queryable); at most
/// `max_records` records per person count in any aggregate (the rest are
/// dropped deterministically before aggregation) and every sensitivity is
/// multiplied by `max_records`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyUnitConfig {
    /// Header of the column identifying the person.
    pub person_column: String,
    /// Records counted per person.
    pub max_records: u32,
}

impl DatasetConfig {
    /// The validated schema, with the person-level privacy unit if declared.
    pub fn schema(&self) -> Result<Schema, String> {
        let schema = Schema::from_specs(&self.name, &self.columns)?;
        match &self.privacy_unit {
            None => Ok(schema),
            Some(u) => schema
                .with_person_unit(&u.person_column, u.max_records)
                .map_err(|e| format!("dataset {:?}: {e}", self.name)),
        }
    }

    /// The unit of privacy in words, as `Describe` reports it.
    pub fn privacy_unit_text(&self) -> String {
        match &self.privacy_unit {
            None => "record".to_string(),
            Some(u) => format!(
                "person (identified by {}, at most {} records per person)",
                u.person_column, u.max_records
            ),
        }
    }
}

impl NodeConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> anyhow::Result<NodeConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read node config {}: {e}", path.display()))?;
        let mut cfg: NodeConfig = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("invalid node config {}: {e}", path.display()))?;
        cfg.source_sha256 = hex::encode(sha2::Sha256::digest(text.as_bytes()));
        cfg.base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("invalid node config {}: {e}", path.display()))?;
        Ok(cfg)
    }

    /// Checks everything that TOML types cannot: names, budgets, schemas.
    pub fn validate(&self) -> Result<(), String> {
        if self.node.name.is_empty()
            || !self
                .node
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(format!(
                "node.name {:?} must be non-empty and use only letters, digits, '-' and '.' (it is a DNS name in the node's certificate)",
                self.node.name
            ));
        }
        for (i, d) in self.datasets.iter().enumerate() {
            if self.datasets[..i].iter().any(|o| o.name == d.name) {
                return Err(format!("dataset {:?} is declared twice", d.name));
            }
            if d.name.is_empty()
                || !d
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(format!(
                    "dataset name {:?} must be non-empty and use only letters, digits and '_'",
                    d.name
                ));
            }
            let b = d.budget;
            for (what, v) in [
                ("per_analyst", b.per_analyst),
                ("total", b.total),
                ("per_query_max", b.per_query_max),
            ] {
                if !v.is_finite() || v <= 0.0 {
                    return Err(format!(
                        "dataset {:?}: budget.{what} must be a positive, finite {} (got {v})",
                        d.name,
                        b.measure.unit()
                    ));
                }
            }
            match (b.measure, b.delta) {
                (Measure::Pure, Some(_)) => {
                    return Err(format!(
                        "dataset {:?}: budget.delta only applies to measure = \"zcdp\" (pure epsilon-DP has delta 0); remove it",
                        d.name
                    ))
                }
                (Measure::Zcdp, None) => {
                    return Err(format!(
                        "dataset {:?}: measure = \"zcdp\" needs budget.delta, the delta at which (epsilon, delta) equivalents are stated (e.g. 1e-7)",
                        d.name
                    ))
                }
                (Measure::Zcdp, Some(delta)) if !(delta > 0.0 && delta <= MAX_DELTA) => {
                    return Err(format!(
                        "dataset {:?}: budget.delta must be in (0, {MAX_DELTA}] (got {delta})",
                        d.name
                    ))
                }
                _ => {}
            }
            let open = d.columns.iter().any(|c| c.open == Some(true));
            let keys = [
                ("keys_delta", b.keys_delta),
                ("keys_delta_per_analyst", b.keys_delta_per_analyst),
                ("keys_delta_total", b.keys_delta_total),
            ];
            for (what, v) in keys {
                match v {
                    None if open => {
                        return Err(format!(
                            "dataset {:?} has an open-domain column, so [datasets.budget] needs keys_delta (the delta each release of open keys spends, e.g. 1e-8), keys_delta_per_analyst and keys_delta_total (e.g. 1e-6 and 1e-5); {what} is missing",
                            d.name
                        ))
                    }
                    Some(_) if !open => {
                        return Err(format!(
                            "dataset {:?}: budget.{what} only applies to datasets with an open-domain column (`open = true`); remove it",
                            d.name
                        ))
                    }
                    Some(v) if !(v > 0.0 && v <= MAX_DELTA) => {
                        return Err(format!(
                            "dataset {:?}: budget.{what} must be in (0, {MAX_DELTA}] (got {v})",
                            d.name
                        ))
                    }
                    _ => {}
                }
            }
            if let (Some(q), Some(a), Some(t)) =
                (b.keys_delta, b.keys_delta_per_analyst, b.keys_delta_total)
            {
                if q > a || a > t {
                    return Err(format!(
                        "dataset {:?}: budget needs keys_delta <= keys_delta_per_analyst <= keys_delta_total (got {q}, {a}, {t})",
                        d.name
                    ));
                }
            }
            d.schema()?;
            if let Some(source) = &d.source {
                source.validate(&d.name, &d.columns)?;
                if let Some(c) = d.columns.iter().find(|c| c.open == Some(true)) {
                    return Err(format!(
                        "dataset {:?}: column {:?} has an open domain, which a database source does not support yet; declare its domain, or serve the dataset from ingested CSV",
                        d.name, c.name
                    ));
                }
                if let Some(u) = &d.privacy_unit {
                    if !is_plain_identifier(&u.person_column) {
                        return Err(format!(
                            "dataset {:?}: privacy_unit.person_column {:?} is not a plain identifier; a database source needs the database's column name (letters, digits and '_')",
                            d.name, u.person_column
                        ));
                    }
                }
            }
        }
        if self.limits.max_sql_bytes == 0
            || self.limits.max_request_bytes < 1024
            || self.limits.max_cells == 0
            || self.limits.queries_per_minute == 0
            || self.limits.concurrent_queries == 0
            || self.limits.query_deadline_ms == 0
            || self.limits.max_reservation_ms < 1000
        {
            return Err(
                "limits must be positive (max_request_bytes at least 1024, max_reservation_ms at least 1000)".into(),
            );
        }
        if self.limits.replay_window_ms < self.limits.query_deadline_ms.max(1000) {
            return Err(format!(
                "limits.replay_window_ms is {} ms, shorter than a query's deadline ({} ms): a client retrying a timed-out query could find its answer already gone; set it to at least that (the default is {} ms, 30 days)",
                self.limits.replay_window_ms, self.limits.query_deadline_ms, DEFAULT_REPLAY_WINDOW_MS
            ));
        }
        for a in &self.access.analysts {
            for d in &a.datasets {
                if d != "*" && self.dataset(d).is_none() {
                    return Err(format!(
                        "[access] analyst {:?} lists dataset {d:?}, which is not declared",
                        a.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// Resolves a path from the config against the config's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The dataset declaration by name.
    pub fn dataset(&self, name: &str) -> Option<&DatasetConfig> {
        self.datasets.iter().find(|d| d.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example config validates with the default replay window, and a
    /// window shorter than a query's deadline is refused with a message
    /// that names the setting and the bound.
    #[test]
    fn a_replay_window_shorter_than_the_deadline_is_refused() {
        let text = include_str!("../../deploy/node.example.toml");
        let mut cfg: NodeConfig = toml::from_str(text).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.limits.replay_window_ms, DEFAULT_REPLAY_WINDOW_MS);
        cfg.limits.replay_window_ms = cfg.limits.query_deadline_ms - 1;
        let e = cfg.validate().unwrap_err();
        assert!(
            e.contains("replay_window_ms") && e.contains("at least"),
            "{e}"
        );
        cfg.limits.replay_window_ms = cfg.limits.query_deadline_ms;
        cfg.validate().unwrap();
    }
}
