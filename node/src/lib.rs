//! `fedq-node`: a partner organisation's node in a fedq federation.
//!
//! The node holds the partner's raw case records and answers aggregate SQL
//! queries with differentially private noise. Raw records and exact
//! aggregates never leave it. The map:
//!
//! The crates below it (each with its own map): `fedq-proto` (the API),
//! `fedq-dp` (measures, OpenDP's mechanisms, accuracy, distributions),
//! `fedq-plan` (schemas, SQL to a plan with its sensitivities),
//! `fedq-pki` (certificates) and `fedq-audit` (the audit format and its
//! verifier). This crate is the server over them:
//!
//! - [`config`]: `node.toml`, the partner's single configuration file.
//! - [`ingest`]: CSV → validated rows → one atomic, durable store commit.
//! - [`synth`]: synthetic CTDC-shaped partner datasets for demos and tests.
//! - The engine: [`table`] (the in-memory columnar view that queries
//!   scan), `bits` (its bitmap counting kernels), [`source`] (where a
//!   dataset's rows live) and [`postgres`] (a PostgreSQL table or view as a
//!   dataset: the start-up check and the push-down of each query).
//! - The ledger and its storage: [`ledger`] (the budget, debited durably
//!   before release), [`store`] (the sled database), [`journal`] (atomic
//!   multi-key writes), [`group_commit`] (shared flushes), [`fault`] (a
//!   failed write stops every writer; test fail points) and [`backup`].
//! - [`audit`]: the audit log's store (the format is `fedq-audit`).
//! - [`refusals`]: refused requests counted, and logged as bounded
//!   summaries (one entry per identity, kind and minute).
//! - [`service`]: the `fedq.v1.Node` gRPC service and the order of
//!   operations of a query.
//! - [`preflight`]: everything `serve` needs, checked once for `check` and
//!   `serve` alike.
//! - [`server`]: serving over mutual TLS, start and graceful stop.
//! - [`tls`]: the node's mutual TLS: its files checked at start, the client
//!   verifier with the revocation list reloaded live, refusals logged.

#![deny(missing_docs)]

pub mod audit;
pub mod backup;
pub mod config;
pub mod fault;
pub mod group_commit;
pub mod ingest;
pub mod journal;
pub mod ledger;
pub mod preflight;
pub mod refusals;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
