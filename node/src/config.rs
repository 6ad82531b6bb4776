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
pub use fedq_engine::mapping::{ColumnMapping, Mapping};
use fedq_plan::schema::{ColumnSpec, Schema};
use fedq_plan::standard::{Followed, Standard};

crate::error::stage_error! {
    /// Why node.toml cannot be used: the message names the file and the key.
    ConfigError {
    }
}

impl From<std::io::Error> for ConfigError {
    fn from(e: std::io::Error) -> Self {
        ConfigError::io("file operation", e)
    }
}

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
    /// Declared columns. With a `standard`, they may be left out (they
    /// are then the standard's); if given, they must be the standard's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<ColumnSpec>,
    /// `[datasets.standard]`: the federation data standard this dataset
    /// follows (its columns and privacy unit come from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standard: Option<StandardRef>,
    /// `[datasets.mapping.<column>]`: how the partner's own columns and
    /// codes are read as the declared ones at ingest.
    #[serde(default, skip_serializing_if = "Mapping::is_empty")]
    pub mapping: Mapping,
    /// `[datasets.privacy_unit]`: protect persons rather than records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy_unit: Option<PrivacyUnitConfig>,
    /// Where the rows live when not in the node's own store: a table or
    /// view of the partner's PostgreSQL database. Absent: rows are ingested
    /// from CSV into the embedded store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceConfig>,
    /// `[datasets.secure_aggregation]`: this dataset takes part in
    /// secure-aggregation rounds (zCDP only). Absent: it refuses them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<SecureAggregationConfig>,
    /// `[[datasets.lookups]]`: small public lookup tables (key to value)
    /// that queries of this dataset may join by key, like the built-in
    /// `regions`; published in `Describe` with the schema.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lookups: Vec<LookupConfig>,
}

/// `[[datasets.lookups]]`: a public lookup table, e.g.
///
/// ```toml
/// [[datasets.lookups]]
/// name = "zones"
/// key = "country"
/// value = "zone"
/// rows = { UA = "East", MD = "East", PH = "Pacific" }
/// ```
///
/// joined as `JOIN zones z ON z.country = citizenship` and grouped by or
/// filtered on `z.zone`. Public: every researcher sees it in `Describe`,
/// so it must hold nothing confidential. Validated by
/// [`fedq_plan::lookup::Lookup::new`] (identifiers, at most 10,000 keys
/// and 64 values, no missing values).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupConfig {
    /// Its name in JOIN.
    pub name: String,
    /// The key column's name (`ON table.key = column`).
    pub key: String,
    /// The value column's name.
    pub value: String,
    /// `key = "value"` pairs (values are shown in order of first
    /// appearance over the keys in sorted order).
    pub rows: std::collections::BTreeMap<String, String>,
}

/// `[datasets.secure_aggregation]`: the node adds only a share of a
/// release's noise, calibrated so that the shares of `min_honest` honest
/// participants sum to one central release's privacy
/// (`fedq_dp::distributed`), and refuses a round with fewer participants.
/// It still debits its own ledger for the whole release.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureAggregationConfig {
    /// The fewest participants of a round this node assumes honest (not
    /// colluding with the coordinator): at least 2. With fewer honest
    /// ones than this, its share alone carries less noise than one
    /// release needs (SECURITY.md says how much).
    pub min_honest: u32,
}

/// `[datasets.standard]`: which standard a dataset follows.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandardRef {
    /// The standard file (relative to the config's directory).
    pub file: PathBuf,
    /// The standard's name, checked against the file's if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The version (`MAJOR.MINOR`), checked against the file's if given,
    /// so that a replaced file cannot change the dataset unnoticed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The standard's dataset this one follows; default: the same name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// What the node states in `Describe`, filled in when the config is
    /// loaded ([`NodeConfig::apply_standards`]).
    #[serde(skip)]
    pub followed: Option<Followed>,
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
        let schema = match &self.privacy_unit {
            None => schema,
            Some(u) => schema
                .with_person_unit(&u.person_column, u.max_records)
                .map_err(|e| format!("dataset {:?}: {e}", self.name))?,
        };
        if self.lookups.is_empty() {
            return Ok(schema);
        }
        let at = |e: String| format!("dataset {:?}: [[datasets.lookups]]: {e}", self.name);
        let mut lookups = Vec::with_capacity(self.lookups.len());
        for t in &self.lookups {
            if t.name.eq_ignore_ascii_case(&self.name) {
                return Err(at(format!(
                    "lookup table {:?} has the dataset's name; choose another",
                    t.name
                )));
            }
            let pairs = t.rows.iter().map(|(k, v)| (k.clone(), v.clone()));
            lookups.push(
                fedq_plan::lookup::Lookup::new(&t.name, &t.key, &t.value, pairs).map_err(at)?,
            );
        }
        schema.with_lookups(lookups).map_err(at)
    }

    /// What the dataset states about its standard in `Describe`, if it
    /// follows one (after [`NodeConfig::apply_standards`]).
    pub fn followed(&self) -> Option<&Followed> {
        self.standard.as_ref().and_then(|s| s.followed.as_ref())
    }

    /// Reads the dataset's standard file and takes its columns and privacy
    /// unit (or checks the declared ones against them). Errors name the
    /// key and what differs.
    fn apply_standard(&mut self, base: &Path) -> Result<(), String> {
        let Some(r) = &mut self.standard else {
            return Ok(());
        };
        let path = if r.file.is_absolute() {
            r.file.clone()
        } else {
            base.join(&r.file)
        };
        let at = format!("dataset {:?}: standard", self.name);
        let standard = Standard::load(&path).map_err(|e| format!("{at}: {e}"))?;
        if let Some(name) = &r.name {
            if *name != standard.name {
                return Err(format!(
                    "{at}: name = {name:?}, but {} is standard {:?}; fix `name` or `file`",
                    path.display(),
                    standard.name
                ));
            }
        }
        if let Some(version) = &r.version {
            if *version != standard.version.to_string() {
                return Err(format!(
                    "{at}: version = {version:?}, but {} is version {}; install the version you mean, or change `version` (and re-ingest if the columns changed)",
                    path.display(),
                    standard.version
                ));
            }
        }
        let ds = standard
            .dataset(r.dataset.as_deref().unwrap_or(&self.name))
            .map_err(|e| format!("{at}: {e}; set [datasets.standard] dataset"))?;
        if self.columns.is_empty() {
            self.columns = ds.columns.clone();
        } else {
            let declared = Schema::from_specs(&self.name, &self.columns)?;
            let theirs = Schema::from_specs(&self.name, &ds.columns)?;
            if declared != theirs {
                let differs = theirs
                    .columns
                    .iter()
                    .find_map(
                        |c| match declared.columns.iter().find(|d| d.name() == c.name()) {
                            None => Some(format!("node.toml lacks column {:?}", c.name())),
                            Some(d) if d != c => Some(format!(
                                "column {:?} is declared as {}, the standard has {}",
                                c.name(),
                                d.expectation(),
                                c.expectation()
                            )),
                            Some(_) => None,
                        },
                    )
                    .or_else(|| {
                        declared
                            .columns
                            .iter()
                            .find(|d| theirs.index_of(d.name()).is_none())
                            .map(|d| {
                                format!(
                                    "node.toml declares {:?}, which the standard does not",
                                    d.name()
                                )
                            })
                    })
                    .unwrap_or_else(|| "the columns are in another order".to_string());
                return Err(format!(
                    "{at}: {differs}; remove [[datasets.columns]] to take the standard's, and map your own coding in [datasets.mapping]"
                ));
            }
        }
        let unit = ds
            .privacy_unit
            .as_ref()
            .map(|u| (u.person_column.clone(), u.max_records));
        let mine = self
            .privacy_unit
            .as_ref()
            .map(|u| (u.person_column.clone(), u.max_records));
        match (&mine, &unit) {
            (None, Some((person_column, max_records))) => {
                self.privacy_unit = Some(PrivacyUnitConfig {
                    person_column: person_column.clone(),
                    max_records: *max_records,
                })
            }
            _ if mine != unit => {
                return Err(format!(
                    "{at}: [datasets.privacy_unit] differs from the standard's ({}); remove it to take the standard's",
                    unit.map_or("one record".to_string(), |(c, k)| format!("person by {c}, at most {k} records"))
                ))
            }
            _ => {}
        }
        r.followed = Some(standard.followed());
        Ok(())
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
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::Refused(format!("cannot read node config {}: {e}", path.display()))
        })?;
        let mut cfg: NodeConfig = toml::from_str(&text).map_err(|e| {
            ConfigError::Refused(format!("invalid node config {}: {e}", path.display()))
        })?;
        cfg.source_sha256 = hex::encode(sha2::Sha256::digest(text.as_bytes()));
        cfg.base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        cfg.apply_standards()
            .and_then(|()| cfg.validate())
            .map_err(|e| {
                ConfigError::Refused(format!("invalid node config {}: {e}", path.display()))
            })?;
        Ok(cfg)
    }

    /// Reads each dataset's `[datasets.standard]` file (relative to
    /// `base_dir`): takes its columns and privacy unit, or checks the
    /// declared ones against them. [`NodeConfig::load`] calls it; a config
    /// built in code calls it before use.
    pub fn apply_standards(&mut self) -> Result<(), String> {
        let base = self.base_dir.clone();
        for d in &mut self.datasets {
            d.apply_standard(&base)?;
        }
        Ok(())
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
            if let Some(sa) = &d.secure_aggregation {
                if d.budget.measure != Measure::Zcdp {
                    return Err(format!(
                        "dataset {:?}: secure_aggregation needs measure = \"zcdp\" (its noise is the distributed discrete Gaussian); set budget.measure = \"zcdp\" or remove [datasets.secure_aggregation]",
                        d.name
                    ));
                }
                let most = fedq_secagg::MAX_PARTICIPANTS as u32;
                if !(2..=most).contains(&sa.min_honest) {
                    return Err(format!(
                        "dataset {:?}: secure_aggregation.min_honest must be from 2 to {most} (got {}): the fewest participants of a round this node assumes do not collude with the coordinator",
                        d.name, sa.min_honest
                    ));
                }
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
            let schema = d.schema()?;
            if d.standard.as_ref().is_some_and(|s| s.followed.is_none()) {
                return Err(format!(
                    "dataset {:?}: [datasets.standard] was not read (NodeConfig::apply_standards)",
                    d.name
                ));
            }
            fedq_engine::mapping::Mapper::compile(&d.name, &schema, &d.mapping)?;
            if d.source.is_some() && !d.mapping.is_empty() {
                // A database source reads mapped columns as text and maps
                // them in the node (fedq_engine::postgres::mapped): the
                // partner's column names go into SQL, and only categories
                // and flags are mapped there.
                let at = |c: &str| format!("dataset {:?}: [datasets.mapping.{c}]", d.name);
                for (column, m) in &d.mapping {
                    if let Some(from) = &m.from {
                        if !is_plain_identifier(from.trim()) {
                            return Err(format!(
                                "{}: from = {from:?} is not a plain identifier; a database source needs the database's column name (letters, digits and '_')",
                                at(column)
                            ));
                        }
                    }
                    let integer = schema.index_of(column).is_some_and(|i| {
                        matches!(schema.columns[i], fedq_plan::schema::Column::Integer { .. })
                    });
                    if integer && (!m.values.is_empty() || m.convert.is_some()) {
                        return Err(format!(
                            "{}: a database source maps categories and flags; for an integer column use `from` only, or compute it in a view over your table (deploy/README.md, \"Answering from a PostgreSQL database\")",
                            at(column)
                        ));
                    }
                }
                if d.privacy_unit.is_some() {
                    return Err(format!(
                        "dataset {:?}: a database source with [datasets.mapping] and a person-level privacy unit is not supported (the truncation orders each person's records by their codes in the database); map in a view over your table instead",
                        d.name
                    ));
                }
            }
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

    /// `[[datasets.lookups]]` become the schema's public lookup tables
    /// (published in `Describe`); a bad one is refused at load naming the
    /// dataset and what is wrong.
    #[test]
    fn a_dataset_declares_public_lookup_tables() {
        let text = include_str!("../../deploy/node.example.toml");
        let with = |table: &str| format!("{text}\n[[datasets.lookups]]\n{table}\n");
        let good = "name = \"zones\"\nkey = \"country\"\nvalue = \"zone\"\nrows = { UA = \"East\", MD = \"East\", PH = \"Pacific\" }";
        let cfg: NodeConfig = toml::from_str(&with(good)).unwrap();
        cfg.validate().unwrap();
        let d = cfg.datasets.last().unwrap();
        let s = d.schema().unwrap();
        assert_eq!(s.lookups.len(), 1);
        assert_eq!(s.lookups[0].value_of("MD"), Some("East"));
        // Keys in sorted order, values in order of first appearance.
        let values: Vec<&str> = s.lookups[0].rows.iter().map(|(v, _)| v.as_str()).collect();
        assert_eq!(values, ["East", "Pacific"]);
        for (bad, says) in [
            (good.replace("zones", "regions"), "built-in"),
            (good.replace("zones", &d.name), "the dataset's name"),
            (good.replace("\"Pacific\"", "\"-99\""), "missing value"),
            (good.replace("\"zone\"", "\"country\""), "different names"),
        ] {
            let cfg: NodeConfig = toml::from_str(&with(&bad)).unwrap();
            let e = cfg.validate().unwrap_err();
            assert!(
                e.contains(says) && e.contains("[[datasets.lookups]]"),
                "{bad}: {e}"
            );
        }
        let unknown = format!("{good}\ncolour = \"blue\"");
        assert!(toml::from_str::<NodeConfig>(&with(&unknown)).is_err());
    }

    /// A node.toml following the shipped standard, in a directory with a
    /// copy of it.
    fn following(dir: &Path, extra: &str) -> Result<NodeConfig, ConfigError> {
        std::fs::write(
            dir.join("ctdc.toml"),
            include_str!("../../deploy/standards/ctdc-cases-1.0.toml"),
        )?;
        let text = format!(
            r#"[node]
name = "n1"
listen = "127.0.0.1:7001"
store = "store"
[tls]
ca = "ca.pem"
cert = "node.pem"
key = "node.key"
[[datasets]]
name = "cases"
[datasets.budget]
per_analyst = 1.0
total = 2.0
per_query_max = 1.0
[datasets.standard]
file = "ctdc.toml"
{extra}"#
        );
        let path = dir.join("node.toml");
        std::fs::write(&path, text)?;
        NodeConfig::load(&path)
    }

    /// The shipped standard declares exactly what `fedq-node synth`
    /// writes, a dataset following it takes its columns, and a mapping or
    /// a pin that does not fit is refused at load naming the key.
    #[test]
    fn a_dataset_follows_the_shipped_standard() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = following(dir.path(), "version = \"1.0\"\n").unwrap();
        let d = &cfg.datasets[0];
        assert_eq!(d.columns, fedq_engine::synth::ctdc_columns());
        let f = d.followed().unwrap();
        assert_eq!(
            (f.name.as_str(), f.version.to_string().as_str()),
            ("ctdc-cases", "1.0")
        );
        let mapping = fedq_engine::partner_coding::MAPPING_TOML;
        following(dir.path(), mapping).unwrap();
        for (extra, says) in [
            ("version = \"1.1\"\n", "is version 1.0"),
            ("name = \"other\"\n", "is standard \"ctdc-cases\""),
            ("dataset = \"victims\"\n", "has no dataset \"victims\""),
            (
                "[datasets.mapping.gender]\nvalues = { F = \"female\" }\n",
                "values maps \"F\" to \"female\"",
            ),
            (
                "[[datasets.columns]]\nname = \"gender\"\ntype = \"categorical\"\ndomain = [\"F\", \"M\"]\n",
                "remove [[datasets.columns]]",
            ),
        ] {
            let e = format!("{:#}", following(dir.path(), extra).unwrap_err());
            assert!(e.contains(says), "{says}: {e}");
        }
        // A database source reads the shipped mapping too (mapped in the
        // node); what it cannot map is refused naming the key.
        let db = "[datasets.source]\nkind = \"postgres\"\ntable = \"cases\"\nurl_env = \"DB\"\n";
        following(dir.path(), &format!("{db}{mapping}")).unwrap();
        for (extra, says) in [
            (
                "[datasets.mapping.gender]\nfrom = \"sex; DROP\"\n",
                "is not a plain identifier",
            ),
            (
                "[datasets.mapping.traffickMonths]\nvalues = { none = \"0\" }\n",
                "for an integer column use `from` only",
            ),
        ] {
            let e = format!(
                "{:#}",
                following(dir.path(), &format!("{db}{extra}")).unwrap_err()
            );
            assert!(e.contains(says), "{says}: {e}");
        }
        std::fs::remove_file(dir.path().join("ctdc.toml")).unwrap();
        let e = format!(
            "{:#}",
            NodeConfig::load(&dir.path().join("node.toml")).unwrap_err()
        );
        assert!(e.contains("cannot read standard file"), "{e}");
    }
}
