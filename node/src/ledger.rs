//! The privacy-budget ledger: how much epsilon each analyst has spent on each
//! dataset, how much all analysts together have spent, and which query ids
//! have been answered.
//!
//! **Guarantee.** [`Ledger::admit`] checks the limits and records the debit
//! in one sled transaction on the `ledger` tree and flushes it to disk
//! before returning, so a release is only ever computed after its debit is
//! durable (DESIGN invariant 3). Admissions are also serialised by a mutex,
//! so concurrent queries are checked against each other's debits and can
//! never overspend; a crash after a debit can only lose budget, never gain it.
//!
//! Amounts are kept as integer nano-epsilon (`u64`): a debit is rounded up
//! and a limit rounded down, so rounding never favours the analyst.
//!
//! Keys of the `ledger` tree:
//! - `spent/analyst/<dataset>/<analyst>` and `spent/dataset/<dataset>`: u64 BE nano-epsilon;
//! - `query/<analyst>/<query id>`: a [`QueryRecord`] (DESIGN invariant 6).

use std::sync::Mutex;

use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::config::BudgetLimits;
use crate::store::decode_u64;

/// Nano-epsilon per epsilon.
const NANO: f64 = 1e9;

/// A debit amount, rounded up to whole nano-epsilon.
pub fn to_nano_ceil(eps: f64) -> u64 {
    (eps * NANO).ceil() as u64
}

fn to_nano_floor(eps: f64) -> u64 {
    (eps * NANO).floor() as u64
}

/// Epsilon from nano-epsilon.
pub fn from_nano(n: u64) -> f64 {
    n as f64 / NANO
}

/// The state of an answered or in-progress query id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryRecord {
    /// SHA-256 of what was asked (dataset, SQL, epsilon).
    pub digest: [u8; 32],
    /// The encoded response, once released. `None` means debited but not yet
    /// released (the node stopped in between).
    pub response: Option<Vec<u8>>,
}

impl QueryRecord {
    fn encode(&self) -> Vec<u8> {
        let mut v = self.digest.to_vec();
        if let Some(r) = &self.response {
            v.push(1);
            v.extend_from_slice(r);
        } else {
            v.push(0);
        }
        v
    }

    fn decode(v: &[u8]) -> Option<QueryRecord> {
        if v.len() < 33 {
            return None;
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&v[..32]);
        let response = (v[32] == 1).then(|| v[33..].to_vec());
        Some(QueryRecord { digest, response })
    }
}

/// What [`Ledger::admit`] decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// Debited now; compute and release.
    Debited(BudgetState),
    /// This query id was answered before with the same query: replay the
    /// stored response, spend nothing.
    Replay(Vec<u8>),
    /// Debited earlier but never released (the node stopped in between):
    /// compute and release under that debit.
    Resume(BudgetState),
}

/// Why a query was refused by the ledger.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// The analyst's own limit would be exceeded.
    #[error("epsilon {asked} exceeds your remaining budget on dataset {dataset:?}: {remaining} of {limit} left")]
    AnalystBudget {
        /// Dataset.
        dataset: String,
        /// Requested epsilon.
        asked: f64,
        /// Left for this analyst.
        remaining: f64,
        /// The analyst's limit.
        limit: f64,
    },
    /// The dataset's total across analysts would be exceeded.
    #[error("epsilon {asked} exceeds the remaining total budget of dataset {dataset:?} (all analysts together): {remaining} of {limit} left")]
    DatasetBudget {
        /// Dataset.
        dataset: String,
        /// Requested epsilon.
        asked: f64,
        /// Left for everyone.
        remaining: f64,
        /// The dataset's limit.
        limit: f64,
    },
    /// The query id was used before for a different query.
    #[error("query id {0:?} was already used for a different query; use a new id")]
    IdReused(String),
}

/// Spent and remaining budget of one analyst on one dataset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetState {
    /// Spent by this analyst.
    pub spent_by_analyst: f64,
    /// Left for this analyst (also bounded by the dataset's total).
    pub remaining_for_analyst: f64,
    /// Left for all analysts together.
    pub remaining_for_dataset: f64,
}

/// The ledger over the store's `ledger` tree.
pub struct Ledger {
    tree: sled::Tree,
    store: crate::store::Store,
    /// Serialises check-and-debit across concurrent requests.
    admit_lock: Mutex<()>,
}

impl Ledger {
    /// A ledger over `store`.
    pub fn new(store: crate::store::Store) -> Ledger {
        Ledger {
            tree: store.ledger.clone(),
            store,
            admit_lock: Mutex::new(()),
        }
    }

    /// Checks limits and durably debits `epsilon`, or recognises a retry of
    /// `query_id`. Nothing is written when refused.
    pub fn admit(
        &self,
        analyst: &str,
        dataset: &str,
        query_id: &str,
        digest: [u8; 32],
        epsilon: f64,
        limits: &BudgetLimits,
    ) -> anyhow::Result<Result<Admission, Refusal>> {
        let _guard = self.admit_lock.lock().unwrap_or_else(|p| p.into_inner());
        let akey = analyst_key(dataset, analyst);
        let dkey = dataset_key(dataset);
        let qkey = query_key(analyst, query_id);
        let debit = to_nano_ceil(epsilon);
        let a_limit = to_nano_floor(limits.per_analyst);
        let d_limit = to_nano_floor(limits.total);
        let outcome = self.tree.transaction(|tx| {
            let a_spent = tx.get(&akey)?.map(|v| decode_u64(&v)).unwrap_or(0);
            let d_spent = tx.get(&dkey)?.map(|v| decode_u64(&v)).unwrap_or(0);
            let state = |a: u64, d: u64| BudgetState {
                spent_by_analyst: from_nano(a),
                remaining_for_analyst: from_nano(
                    a_limit.saturating_sub(a).min(d_limit.saturating_sub(d)),
                ),
                remaining_for_dataset: from_nano(d_limit.saturating_sub(d)),
            };
            if let Some(existing) = tx.get(&qkey)? {
                let rec = QueryRecord::decode(&existing).ok_or_else(|| {
                    ConflictableTransactionError::Abort(Refusal::IdReused(query_id.to_string()))
                })?;
                if rec.digest != digest {
                    return Err(ConflictableTransactionError::Abort(Refusal::IdReused(
                        query_id.to_string(),
                    )));
                }
                return Ok(match rec.response {
                    Some(r) => Admission::Replay(r),
                    None => Admission::Resume(state(a_spent, d_spent)),
                });
            }
            if a_spent.saturating_add(debit) > a_limit {
                return Err(ConflictableTransactionError::Abort(
                    Refusal::AnalystBudget {
                        dataset: dataset.to_string(),
                        asked: epsilon,
                        remaining: from_nano(a_limit.saturating_sub(a_spent)),
                        limit: limits.per_analyst,
                    },
                ));
            }
            if d_spent.saturating_add(debit) > d_limit {
                return Err(ConflictableTransactionError::Abort(
                    Refusal::DatasetBudget {
                        dataset: dataset.to_string(),
                        asked: epsilon,
                        remaining: from_nano(d_limit.saturating_sub(d_spent)),
                        limit: limits.total,
                    },
                ));
            }
            let (a_new, d_new) = (a_spent + debit, d_spent + debit);
            tx.insert(akey.as_bytes(), &a_new.to_be_bytes())?;
            tx.insert(dkey.as_bytes(), &d_new.to_be_bytes())?;
            tx.insert(
                qkey.as_bytes(),
                QueryRecord {
                    digest,
                    response: None,
                }
                .encode(),
            )?;
            Ok(Admission::Debited(state(a_new, d_new)))
        });
        match outcome {
            Ok(admission) => {
                if !matches!(admission, Admission::Replay(_)) {
                    // Durable before any release is computed.
                    self.store.flush()?;
                }
                Ok(Ok(admission))
            }
            Err(TransactionError::Abort(refusal)) => Ok(Err(refusal)),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// Stores the released response under its query id (for replays) and
    /// flushes it, before the response is sent.
    pub fn record_release(
        &self,
        analyst: &str,
        query_id: &str,
        digest: [u8; 32],
        response: Vec<u8>,
    ) -> anyhow::Result<()> {
        let rec = QueryRecord {
            digest,
            response: Some(response),
        };
        self.tree
            .insert(query_key(analyst, query_id), rec.encode())?;
        self.store.flush()?;
        Ok(())
    }

    /// The analyst's budget on a dataset, without spending anything.
    pub fn state(
        &self,
        analyst: &str,
        dataset: &str,
        limits: &BudgetLimits,
    ) -> anyhow::Result<BudgetState> {
        let a = self
            .tree
            .get(analyst_key(dataset, analyst))?
            .map(|v| decode_u64(&v))
            .unwrap_or(0);
        let d = self
            .tree
            .get(dataset_key(dataset))?
            .map(|v| decode_u64(&v))
            .unwrap_or(0);
        let (a_limit, d_limit) = (
            to_nano_floor(limits.per_analyst),
            to_nano_floor(limits.total),
        );
        Ok(BudgetState {
            spent_by_analyst: from_nano(a),
            remaining_for_analyst: from_nano(
                a_limit.saturating_sub(a).min(d_limit.saturating_sub(d)),
            ),
            remaining_for_dataset: from_nano(d_limit.saturating_sub(d)),
        })
    }
}

fn analyst_key(dataset: &str, analyst: &str) -> String {
    format!("spent/analyst/{dataset}/{analyst}")
}

fn dataset_key(dataset: &str) -> String {
    format!("spent/dataset/{dataset}")
}

fn query_key(analyst: &str, query_id: &str) -> String {
    format!("query/{analyst}/{query_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> BudgetLimits {
        BudgetLimits {
            per_analyst: 1.0,
            total: 1.5,
            per_query_max: 1.0,
        }
    }

    #[test]
    fn debits_refuses_and_replays() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let ledger = Ledger::new(store);
        let l = limits();
        let a = ledger
            .admit("alice", "cases", "q1", [1; 32], 0.6, &l)
            .unwrap()
            .unwrap();
        assert!(matches!(a, Admission::Debited(s) if (s.remaining_for_analyst - 0.4).abs() < 1e-9));
        // Over alice's own limit: refused, nothing written.
        let r = ledger
            .admit("alice", "cases", "q2", [2; 32], 0.5, &l)
            .unwrap()
            .unwrap_err();
        assert!(matches!(r, Refusal::AnalystBudget { .. }), "{r}");
        assert!((ledger.state("alice", "cases", &l).unwrap().spent_by_analyst - 0.6).abs() < 1e-9);
        // Same id, different query: refused.
        let r = ledger
            .admit("alice", "cases", "q1", [9; 32], 0.1, &l)
            .unwrap()
            .unwrap_err();
        assert_eq!(r, Refusal::IdReused("q1".into()));
        // Same id, same query, not yet released: resume without a new debit.
        assert!(matches!(
            ledger
                .admit("alice", "cases", "q1", [1; 32], 0.6, &l)
                .unwrap()
                .unwrap(),
            Admission::Resume(_)
        ));
        ledger
            .record_release("alice", "q1", [1; 32], b"resp".to_vec())
            .unwrap();
        assert_eq!(
            ledger
                .admit("alice", "cases", "q1", [1; 32], 0.6, &l)
                .unwrap()
                .unwrap(),
            Admission::Replay(b"resp".to_vec())
        );
        // Bob hits the dataset total (1.5) before his own limit.
        ledger
            .admit("bob", "cases", "q1", [3; 32], 0.8, &l)
            .unwrap()
            .unwrap();
        let r = ledger
            .admit("bob", "cases", "q2", [4; 32], 0.2, &l)
            .unwrap()
            .unwrap_err();
        assert!(matches!(r, Refusal::DatasetBudget { .. }), "{r}");
    }

    #[test]
    fn rounding_never_lets_ten_tenths_exceed_one() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(crate::store::Store::open(dir.path()).unwrap());
        let l = BudgetLimits {
            per_analyst: 1.0,
            total: 10.0,
            per_query_max: 1.0,
        };
        let ok = (0..12)
            .filter(|i| {
                ledger
                    .admit("a", "d", &format!("q{i}"), [*i as u8; 32], 0.1, &l)
                    .unwrap()
                    .is_ok()
            })
            .count();
        assert_eq!(ok, 10);
    }
}
