//! The `fedq.v1` wire API shared by `fedq-node` (server) and `fedq` (client).
//!
//! The schema lives in `proto/fedq/v1/fedq.proto`; this crate only compiles it.
//! Bump [`API_VERSION`] whenever a message changes meaning, so coordinators can
//! tell which nodes speak which dialect.

/// The generated messages and the `Node` service client and server.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("fedq.v1");
}

/// Version of the API this build speaks, reported by `Describe`.
pub const API_VERSION: u32 = 1;
