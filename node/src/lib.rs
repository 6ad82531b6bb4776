//! `fedq-node`: a partner organisation's node in a fedq federation.
//!
//! The node holds the partner's raw case records and answers aggregate SQL
//! queries with differentially private noise. Raw records and exact
//! aggregates never leave it. The map:
//!
//! - [`audit`]: the signed, hash-chained audit log and its offline verifier.
//! - [`decimal`]: numbers in audit events as decimal strings (no floats
//!   in hashed content, nothing non-finite).
//! - [`audit_report`]: audit summaries and the self-contained HTML report.
//! - [`config`]: `node.toml`, the partner's single configuration file.
//! - [`schema`]: declared, public column types, domains and bounds, and how
//!   cells are encoded. Sensitivity comes only from here.
//! - [`ingest`]: CSV → validated rows → one atomic, durable store commit.
//! - [`store`]: the sled database (rows, ledger, answered queries).
//! - [`fault`]: a failed store write or flush stops every writer and the
//!   node (it restarts and replays); test-only fail points.
//! - [`group_commit`]: concurrent ledger writes made durable by shared flushes.
//! - [`backup`]: backup and restore of a stopped node's store, never over a newer ledger.
//! - [`table`]: the in-memory columnar view that queries scan.
//! - `bits`: the bitmap counting kernels `table` uses (CPU-feature dispatch).
//! - [`source`]: where a dataset's rows live (embedded store or database).
//! - [`postgres`]: a PostgreSQL table or view as a dataset: the start-up
//!   check and the push-down of each query as one parameterised statement.
//! - [`plan`]: SQL (via `sqlparser`) → a typed, validated query plan.
//! - [`mechanism`]: OpenDP's discrete Laplace and discrete Gaussian
//!   mechanisms and their accuracy; the only source of noise.
//! - [`accounting`]: privacy measures (pure DP, zCDP) and OpenDP's
//!   conversions between them.
//! - [`ledger`]: the privacy-budget ledger, debited durably before release.
//! - [`refusals`]: refused requests counted, and logged as bounded
//!   summaries (one entry per identity, kind and minute).
//! - [`service`]: the `fedq.v1.Node` gRPC service and the order of
//!   operations of a query.
//! - [`preflight`]: everything `serve` needs, checked once for `check` and
//!   `serve` alike.
//! - [`server`]: serving over mutual TLS, start and graceful stop.
//! - [`pki`]: creating certificates and revocation lists, reading identities.
//! - [`tls`]: the node's mutual TLS: its files checked at start, the client
//!   verifier with the revocation list reloaded live, refusals logged.
//! - [`synth`]: synthetic CTDC-shaped partner datasets for demos and tests.

pub mod accounting;
pub mod audit;
pub mod audit_report;
pub mod backup;
mod bits;
pub mod config;
pub mod decimal;
pub mod distribution;
pub mod fault;
pub mod group_commit;
pub mod ingest;
pub mod journal;
pub mod ledger;
pub mod mechanism;
pub mod pki;
pub mod plan;
pub mod postgres;
pub mod preflight;
#[cfg(test)]
mod privacy_tests;
pub mod refusals;
pub mod schema;
pub mod server;
pub mod service;
pub mod source;
pub mod store;
pub mod synth;
pub mod table;
pub mod tls;
