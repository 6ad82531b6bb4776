//! Where a dataset's rows live, and how its exact aggregates are computed.
//!
//! - [`Source::Embedded`]: rows ingested from CSV into the node's sled store
//!   and scanned in memory by [`crate::table`].
//! - [`Source::Postgres`]: rows in the partner's own PostgreSQL database; the
//!   aggregation is pushed down by [`crate::postgres`] and only aggregates
//!   come back.
//!
//! Either way the exact values come out only as [`fedq_dp::mechanism::Exact`]
//! values, which nothing but a mechanism can read (DESIGN invariant 2);
//! budget, ledger and audit log stay in the node's store whatever the
//! source. [`SourceConfig`] is a dataset's `[datasets.source]` section.

use std::path::PathBuf;
use std::sync::Arc;

use fedq_plan::schema::ColumnSpec;
use serde::{Deserialize, Serialize};

use crate::postgres::PgSource;
use crate::table::Table;

/// A dataset's rows.
pub enum Source {
    /// In the node's own store, loaded into memory at start.
    Embedded(Arc<Table>),
    /// In the partner's PostgreSQL database.
    Postgres(Arc<PgSource>),
}

impl Source {
    /// The name recorded in the audit log's `released` entries; `None` for
    /// the embedded store, so that entries keep the form they always had.
    pub fn audit_name(&self) -> Option<&'static str> {
        match self {
            Source::Embedded(_) => None,
            Source::Postgres(_) => Some("postgres"),
        }
    }
}

/// The kinds of external source a dataset can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// PostgreSQL or a compatible engine (Citus, YugabyteDB, CockroachDB).
    Postgres,
}

/// `[datasets.source]`: a table or view in the partner's own database. The
/// declared `columns` stay the only source of sensitivity; the database
/// column names are the declared names.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// `postgres`.
    pub kind: SourceKind,
    /// `schema.table` or `table` (a view works too): plain identifiers only.
    pub table: String,
    /// A file holding the connection URL (keep it readable by the node
    /// only). Exactly one of `url_file` and `url_env`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_file: Option<PathBuf>,
    /// An environment variable holding the connection URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_env: Option<String>,
    /// The CA (PEM) that issued the database server's certificate: when
    /// set, the connection requires TLS and verifies the server with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// How long the database may take for one query (sent as the session's
    /// `statement_timeout`, and enforced on the node's side too).
    #[serde(default = "default_statement_timeout_ms")]
    pub statement_timeout_ms: u64,
}

fn default_statement_timeout_ms() -> u64 {
    10_000
}

/// Longest identifier PostgreSQL keeps (longer ones are silently cut).
const MAX_IDENTIFIER: usize = 63;

/// Whether `s` is an identifier we accept for a database name: an ASCII
/// letter or `_`, then letters, digits or `_`, at most 63 bytes. Anything
/// else (quotes, dots, spaces, semicolons) is refused at config load, so the
/// statement builder only ever quotes plain names.
pub fn is_plain_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= MAX_IDENTIFIER
}

impl SourceConfig {
    /// The table's optional schema and its name, checked to be plain
    /// identifiers.
    pub fn table_parts(&self) -> Result<(Option<&str>, &str), String> {
        let parts: Vec<&str> = self.table.split('.').collect();
        let (schema, table) = match parts.as_slice() {
            [t] => (None, *t),
            [s, t] => (Some(*s), *t),
            _ => {
                return Err(format!(
                    "source.table {:?} must be `table` or `schema.table`",
                    self.table
                ))
            }
        };
        for p in schema.iter().chain([&table]) {
            if !is_plain_identifier(p) {
                return Err(format!(
                    "source.table {:?}: {p:?} is not a plain identifier (letters, digits and '_', starting with a letter or '_', at most {MAX_IDENTIFIER} bytes)",
                    self.table
                ));
            }
        }
        Ok((schema, table))
    }

    /// Checks the source declaration and the column names it implies.
    /// Checks the section against the dataset's declared columns.
    pub fn validate(&self, dataset: &str, columns: &[ColumnSpec]) -> Result<(), String> {
        let at = format!("dataset {dataset:?}");
        self.table_parts().map_err(|e| format!("{at}: {e}"))?;
        match (&self.url_file, &self.url_env) {
            (Some(_), None) => {}
            (None, Some(var)) if !var.is_empty() => {}
            _ => {
                return Err(format!(
                    "{at}: source needs exactly one of url_file = \"path\" or url_env = \"VARIABLE\" (the connection URL is never written in node.toml)"
                ))
            }
        }
        if self.statement_timeout_ms == 0 || self.statement_timeout_ms > 3_600_000 {
            return Err(format!(
                "{at}: source.statement_timeout_ms must be from 1 to 3600000"
            ));
        }
        for c in columns {
            if !is_plain_identifier(&c.name) {
                return Err(format!(
                    "{at}: column {:?} is not a plain identifier; a database source needs column names made of letters, digits and '_' (starting with a letter or '_', at most {MAX_IDENTIFIER} bytes), equal to the database's column names",
                    c.name
                ));
            }
        }
        Ok(())
    }
}
