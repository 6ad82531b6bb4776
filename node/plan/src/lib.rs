//! `fedq-plan`: what a query asks and what it may cost, decided from
//! public metadata alone (DESIGN invariant 4). No data, no ledger and no
//! noise here: the node plans with it before it touches a record, and the
//! coordinator plans with it (from the schemas nodes publish in Describe)
//! to check every answer it is sent.
//!
//! The map:
//!
//! - [`schema`]: declared column types, domains and bounds (`node.toml`),
//!   how values are coded into cells, and the public schema sent in
//!   Describe.
//! - [`plan`]: SQL (via `sqlparser`) to a typed, validated [`plan::Plan`]:
//!   the filter, the GROUP BY, the measurements with their bounds and
//!   sensitivities, and the cells they release ([`plan::cell_keys`]).
//! - [`standard`]: the federation's data standard (a versioned data
//!   dictionary every node follows) and its canonical digest.
//! - [`lookup`]: public lookup tables (country to region) a query may join
//!   to its dataset by key, planned as CASE buckets and IN lists.
//!
//! Entry point: [`plan::plan`] (SQL text and a schema in, a plan or a
//! [`plan::PlanError`] out).

#![deny(missing_docs)]

pub mod lookup;
pub mod plan;
pub mod schema;
pub mod standard;
