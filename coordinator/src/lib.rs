//! `fedq`: the researchers' coordinator.
//!
//! It sends one aggregate SQL query to every node of a federation at once
//! over mutual TLS, and combines the nodes' noisy answers. It never sees raw
//! records or exact aggregates: only what each node released under
//! differential privacy. The map:
//!
//! - [`audit`]: the audit heads seen in answers, pulling and checking node logs.
//! - [`chart`]: results as bars with interval whiskers, in the terminal and as an HTML page.
//! - [`federation`]: `federation.toml`, the nodes and the researcher's certificate.
//! - [`client`]: mutual-TLS channels and concurrent fan-out with deadlines;
//!   `tls` builds the rustls side (the CA, the researcher's certificate and
//!   the federation's revocation list, `[tls] crl`).
//! - [`combine`]: sums, means and federated confidence intervals.
//! - [`compose`]: several queries asked together (UNION ALL, `--file`), as
//!   one grouped query when their records are provably disjoint (parallel
//!   composition), else one by one with the budget split.
//! - [`output`]: tables, JSON and CSV.
//! - [`post`]: ORDER BY, LIMIT, HAVING and ROUND, applied to the combined
//!   noisy answers (post-processing, no privacy cost).
//! - [`progress`]: the progress line of a long fan-out (nodes answered of
//!   those asked, the slowest so far), on a terminal only unless forced.
//! - [`query`]: a researcher's query from the SQL written to the combined
//!   result, the one path of `fedq query` and the Python package.
//! - [`run`]: one query across the federation: capability checks, retries, quorum (two phases).
//! - [`secure`]: secure aggregation: the nodes' round keys relayed, their
//!   masked shares summed, so that only the sum is ever in the clear.
//! - [`standard`]: whether the nodes asked follow the same data standard
//!   (name, major version, and the columns a query reads declared alike),
//!   checked before anything is spent; the differences `fedq schema --diff` shows.
//! - [`verify`]: every answer checked against the coordinator's own plan from the
//!   nodes' public schemas; a node whose answer disagrees is left out and named.

#![deny(missing_docs)]

pub mod audit;
pub mod chart;
pub mod client;
pub mod combine;
pub mod compose;
mod distribution;
pub mod error;
pub mod federation;
pub mod output;
pub mod post;
pub mod progress;
pub mod query;
pub mod run;
pub mod secure;
pub mod standard;
mod tls;
pub mod verify;

/// The candidate closest to `written` (a case-insensitive match, or at most
/// two edits away), for "did you mean" in messages.
pub fn closest_name<'a>(written: &str, candidates: &[&'a str]) -> Option<&'a str> {
    fedq_plan::schema::closest(written, candidates.iter().copied())
}
