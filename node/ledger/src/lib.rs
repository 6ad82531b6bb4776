//! `fedq-ledger`: a node's privacy-budget ledger over its storage layer.
//!
//! **Guarantee.** A debit is checked against the limits and written, with
//! its audit entry, in one atomic write, and made durable before the
//! caller may draw noise (DESIGN invariant 3); every debit, release and
//! grant has its audit entry in the same write (invariant 7); a query id
//! is bound to its query (invariant 6).
//!
//! The map:
//!
//! - [`limits`]: a dataset's `[datasets.budget]`, what debits are checked
//!   against.
//! - [`ledger`]: the policy: check-and-debit, holds and reservations,
//!   releases and replays (within the replay window), grants.
//! - The storage it runs on: [`store`] (the sled database: rows, ledger,
//!   audit log), [`journal`] (atomic multi-key writes without a sled
//!   transaction), [`group_commit`] (shared flushes), [`fault`] (a failed
//!   write stops every writer; test fail points), and [`audit`] (the audit
//!   log's store; its format is `fedq-audit`, re-exported there).
//!
//! Errors are typed: [`store::StoreError`] for the storage layer (the
//! store's fault among them), [`journal::JournalError`] for the replay at
//! open, and [`ledger::LedgerError`] (a refusal, or the store's error),
//! [`ledger::GrantError`] and [`ledger::MeasureError`] for the policy.
//!
//! Depends on `fedq-dp` (measures and conversions), `fedq-audit` (entries),
//! `fedq-plan` and `fedq-engine` (the rows the store keeps); nothing of the
//! server.

#![deny(missing_docs)]

pub mod audit;
pub mod fault;
pub mod group_commit;
pub mod journal;
pub mod ledger;
pub mod limits;
pub mod store;
