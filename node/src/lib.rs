//! `fedq-node`: a partner organisation's node in a fedq federation.
//!
//! The node holds the partner's raw case records and answers aggregate SQL
//! queries with differentially private noise. Raw records and exact
//! aggregates never leave it.
//!
//! The crates below it (each with its own map): `fedq-proto` (the API),
//! `fedq-dp` (measures, OpenDP's mechanisms, accuracy, distributions),
//! `fedq-plan` (schemas, SQL to a plan with its sensitivities),
//! `fedq-pki` (certificates), `fedq-secagg` (secure aggregation's keys
//! and masks), `fedq-audit` (the audit format and its
//! verifier), `fedq-engine` (exact aggregates, handed out only as opaque
//! values a mechanism can read) and `fedq-ledger` (the budget ledger and
//! its storage: the store, journaled writes, shared flushes, faults, the
//! audit log's store). This crate is the server over them:
//!
//! - [`config`]: `node.toml`, the partner's single configuration file.
//! - [`ingest`]: CSV → validated rows → one atomic, durable store commit.
//! - [`migrate`]: a stopped node's stored rows translated in place to a new
//!   minor version of its columns, logged first; ledger and log kept.
//! - [`backup`]: backup and restore of a stopped node's store, never over
//!   a newer ledger.
//! - [`refusals`]: refused requests counted, and logged as bounded
//!   summaries (one entry per identity, kind and minute).
//! - [`service`]: the `fedq.v1.Node` gRPC service and the order of
//!   operations of a query.
//! - [`secure`]: secure aggregation: round keys, the participant set's
//!   checks before anything is spent, the masked noise share
//!   (`fedq-secagg`, `fedq_dp::distributed`).
//! - [`preflight`]: everything `serve` needs, checked once for `check` and
//!   `serve` alike.
//! - [`server`]: serving over mutual TLS, start and graceful stop.
//! - [`tls`]: the node's mutual TLS: its files checked at start, the client
//!   verifier with the revocation list reloaded live, refusals logged.

#![deny(missing_docs)]

mod error;

pub mod backup;
pub mod config;
pub mod ingest;
pub mod migrate;
pub mod preflight;
pub mod refusals;
pub mod secure;
pub mod server;
pub mod service;
pub mod tls;
