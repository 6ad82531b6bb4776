//! Where a dataset's rows live, and how its exact aggregates are computed.
//!
//! - [`Source::Embedded`]: rows ingested from CSV into the node's sled store
//!   and scanned in memory by [`crate::table`].
//! - [`Source::Postgres`]: rows in the partner's own PostgreSQL database; the
//!   aggregation is pushed down by [`crate::postgres`] and only aggregates
//!   come back.
//!
//! Either way the exact values go only to [`crate::service`], which adds the
//! noise (DESIGN invariant 2); budget, ledger and audit log stay in the sled
//! store whatever the source.

use std::sync::Arc;

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
