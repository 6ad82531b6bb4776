//! The `fedq.v1` wire API shared by `fedq-node` (server) and `fedq` (client).
//!
//! The schema lives in `proto/fedq/v1/fedq.proto`; this crate compiles it,
//! and holds [`query_digest`], the digest of a request both sides compute.
//! Bump [`API_VERSION`] whenever a message changes meaning, so coordinators can
//! tell which nodes speak which dialect.

/// The generated messages and the `Node` service client and server.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("fedq.v1");
}

/// Version of the API this build speaks, reported by `Describe`.
pub const API_VERSION: u32 = 1;

/// The digest of what a request asks (SQL, cost, dry run): a node stores it
/// with a release so a retry under the same id is recognised, and sends it
/// in every answer (`QueryResponse.request_sha256`) so a coordinator can
/// check what was answered.
pub fn query_digest(q: &v1::QueryRequest) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(q.sql.as_bytes());
    h.update([0]);
    h.update(q.epsilon.to_bits().to_be_bytes());
    h.update([u8::from(q.dry_run)]);
    // Only rho queries hash rho, so digests of epsilon queries stored
    // before rho existed still match their retries.
    if q.rho != 0.0 {
        h.update(b"rho");
        h.update(q.rho.to_bits().to_be_bytes());
    }
    h.finalize().into()
}
