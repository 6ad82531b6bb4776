//! `fedq-cli`: the `fedq` command (`src/main.rs`: one function per
//! command over the coordinator library, [`fedq`]) and what only the
//! command needs: [`demo`], a whole federation on this machine, which runs
//! three nodes in this process and so links the node (the coordinator
//! library never does).

#![deny(missing_docs)]

pub mod demo;
