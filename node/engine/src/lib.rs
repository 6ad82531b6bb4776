//! `fedq-engine`: a dataset's exact aggregates, computed from a plan.
//!
//! **Guarantee.** What this crate computes leaves it only as
//! [`fedq_dp::mechanism::Exact`] and [`fedq_dp::mechanism::ExactKeyCounts`]
//! values: no `Debug`, `Display`, `Clone` or `Serialize`, no accessor
//! outside the mechanism that noises them. "Exact answers never leave the
//! node" (DESIGN invariant 2) is a type boundary, not a convention: the
//! node's pipeline can hold them and hand them to noise, nothing else.
//!
//! The map:
//!
//! - [`source`]: where a dataset's rows live ([`source::Source`]: the
//!   embedded table or a PostgreSQL table), and its `[datasets.source]`
//!   configuration.
//! - [`table`]: the in-memory columns loaded from the node's store, and
//!   their scans: the WHERE as bitmaps, the GROUP BY as dense cell indices,
//!   counts, clamped sums, centred squares and histograms per cell.
//! - `bits`: the word-at-a-time counting kernels `table` uses.
//! - [`postgres`]: a PostgreSQL table or view as a dataset: the start-up
//!   check against the declared schema and each query pushed down as one
//!   parameterised statement; equivalence-tested against [`table`].
//! - [`mapping`]: a partner's own columns and codes read as the declared
//!   (standard) ones at ingest: renamed columns, value maps, country names
//!   and ages converted, unmapped values counted per column.
//! - [`partner_coding`]: the synthetic data in a partner's own coding, and
//!   the mapping that reads it back (demo and tests).
//! - [`synth`]: seeded synthetic CTDC-shaped partner datasets (the demo,
//!   the tests and the benchmarks; never a node's real data).
//!
//! Depends on `fedq-plan` (what to compute) and `fedq-dp` (the opaque
//! values); nothing of the ledger, the audit log or the server.

#![deny(missing_docs)]

mod bits;
pub mod mapping;
pub mod partner_coding;
pub mod postgres;
#[cfg(test)]
mod privacy_tests;
pub mod source;
pub mod synth;
pub mod table;
