//! The end-to-end suite, one test binary (one link) for every area: real
//! nodes with real sled stores in temporary directories, over real mutual
//! TLS gRPC on loopback, and the real coordinator library.

mod access;
mod adversary;
mod audit;
mod audit_format;
mod bad_input;
mod budget;
mod coordinator;
mod deploy_examples;
mod disk_full;
mod distributions;
mod federation;
mod flood;
mod hostile_input;
mod ingest_restart;
mod misbehaving_node;
mod noise;
mod onboarding;
mod person_unit;
mod postgres;
mod released_keys;
mod replay_window;
mod request_codes;
mod researcher_sql;
mod secure;
mod standard;
mod trust;
mod wan;
mod zcdp;
