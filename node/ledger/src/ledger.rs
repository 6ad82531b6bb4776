//! The privacy-budget ledger: how much epsilon each analyst has spent on each
//! dataset, how much all analysts together have spent, and which query ids
//! have been answered.
//!
//! **Guarantee.** [`Ledger::admit`] checks the limits and records the debit
//! in one atomic write (a journaled write, [`crate::journal`]) and waits
//! until a flush has
//! made it durable before returning, so a release is only ever computed
//! after its debit is durable (DESIGN invariant 3).
//! [`Ledger::admit_overlapping`] does the same while computing the exact
//! aggregates alongside the flush (not a release: no noise is drawn, and
//! it returns them only once the debit is durable). Admissions are also
//! serialised by a mutex, so concurrent queries are checked against each
//! other's debits and can never overspend; a crash after a debit can only
//! lose budget, never gain it. The mutex covers the check and the write, not
//! the flush: concurrent writers share flushes ([`crate::group_commit`]). A
//! query admitted while an earlier debit is not yet durable was checked
//! against that debit too, and sled's log becomes durable as a prefix, so a
//! crash can only drop debits whose releases were never computed.
//!
//! Amounts are kept as integer nano-units (`u64`) of the dataset's measure
//! (`[datasets.budget] measure`): nano-epsilon for pure DP, nano-rho for
//! zCDP. A debit is rounded up and a limit rounded down, so rounding never
//! favours the analyst. A ledger never mixes measures: the measure is
//! recorded with the first debit or grant (`measure/<dataset>`; a ledger
//! with spending but no record is pure, as every ledger before zCDP was),
//! and [`Ledger::check_measures`] refuses a config that changed it.
//!
//! Every debit, release and grant is appended to the audit log in the same
//! atomic write as the ledger write it records (a journaled write for
//! debits and releases, a multi-tree sled transaction for the rarer
//! changes), so neither can exist without the other, even after a crash
//! (DESIGN invariant 7).
//!
//! Keys of the `ledger` tree:
//! - `spent/analyst/<dataset>/<analyst>` and `spent/dataset/<dataset>`: u64 BE nano-epsilon;
//! - `grant/<dataset>/<analyst>`: u64 BE nano-epsilon added to the analyst's limit;
//! - `measure/<dataset>`: the measure the amounts are in (`pure`, `zcdp`);
//! - `query/<analyst>/<query id>`: a [`QueryRecord`] (DESIGN invariant 6);
//! - `resv/<expiry><analyst>\0<query id>`: live reservations by expiry;
//! - `kept/<stored at><query key>`: stored releases by when they were
//!   stored; once `[limits] replay_window_ms` has passed, the stored
//!   response is removed and the record keeps only the id's digest and
//!   release time ([`RecordState::Expired`]), so a retry is refused, never
//!   answered again.

use std::sync::{Arc, Mutex, OnceLock};

use sha2::{Digest, Sha256};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use crate::audit::{append_in, storage, AuditLog, Decimal, Event, Head, ReleasedMeasurement};
use crate::fault::StoreFailed;
use crate::journal::{Kv, Overlay};
use crate::limits::BudgetLimits;
use crate::store::{decode_u64, StoreError};
use fedq_dp::accounting::Measure;

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

/// Atto-delta per delta: released-key deltas are accounted in whole
/// 1e-18 units (a delta is at most 1e-3, so totals fit a u64 easily).
const ATTO: f64 = 1e18;

/// A delta debit, rounded up to whole atto-delta.
fn to_atto_ceil(delta: f64) -> u64 {
    (delta * ATTO).ceil() as u64
}

fn to_atto_floor(delta: f64) -> u64 {
    (delta * ATTO).floor() as u64
}

fn from_atto(n: u64) -> f64 {
    n as f64 / ATTO
}

/// A budget reservation of a two-phase query, waiting for Commit.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reservation {
    /// Dataset.
    pub dataset: String,
    /// The SQL to run on Commit.
    pub sql: String,
    /// The epsilon asked for (0 for a rho query).
    pub epsilon: f64,
    /// The rho asked for (0 for an epsilon query).
    #[serde(default)]
    pub rho: f64,
    /// The measure of the ledger the reservation was debited in.
    #[serde(default)]
    pub measure: Measure,
    /// The nano-units debited, in that measure.
    pub nano: u64,
    /// When it expires (ms since the Unix epoch).
    pub expires_ms: u64,
}

/// Where a query id stands.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordState {
    /// Debited, not yet released (the node may have stopped in between);
    /// for a committed two-phase query, its reservation (to resume it).
    Pending(Option<Reservation>),
    /// Released; the encoded response, for replays.
    Released(Vec<u8>),
    /// Reserved by Prepare, waiting for Commit or Cancel.
    Reserved(Reservation),
    /// A reservation that was cancelled or expired; its budget came back.
    Returned,
    /// Released, and its stored response removed after the replay window
    /// ([`Ledger::expire_releases`]): the id and digest stay, so a retry is
    /// refused rather than answered again with fresh noise.
    Expired {
        /// When the stored response was kept from (ms since the Unix epoch).
        released_ms: u64,
    },
}

/// The state of a query id, with the digest of what was asked under it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryRecord {
    /// SHA-256 of what was asked (SQL, epsilon).
    pub digest: [u8; 32],
    /// Where it stands.
    pub state: RecordState,
}

impl QueryRecord {
    fn encode(&self) -> Vec<u8> {
        let mut v = self.digest.to_vec();
        match &self.state {
            RecordState::Pending(r) => {
                v.push(0);
                if let Some(r) = r {
                    v.extend_from_slice(&serde_json::to_vec(r).unwrap_or_default());
                }
            }
            RecordState::Released(r) => {
                v.push(1);
                v.extend_from_slice(r);
            }
            RecordState::Reserved(r) => {
                v.push(2);
                v.extend_from_slice(&serde_json::to_vec(r).unwrap_or_default());
            }
            RecordState::Returned => v.push(3),
            RecordState::Expired { released_ms } => {
                v.push(4);
                v.extend_from_slice(&released_ms.to_be_bytes());
            }
        }
        v
    }

    fn decode(v: &[u8]) -> Option<QueryRecord> {
        if v.len() < 33 {
            return None;
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&v[..32]);
        let state = match v[32] {
            0 if v.len() == 33 => RecordState::Pending(None),
            0 => RecordState::Pending(Some(serde_json::from_slice(&v[33..]).ok()?)),
            1 => RecordState::Released(v[33..].to_vec()),
            2 => RecordState::Reserved(serde_json::from_slice(&v[33..]).ok()?),
            3 => RecordState::Returned,
            4 if v.len() == 41 => RecordState::Expired {
                released_ms: decode_u64(&v[33..]),
            },
            _ => return None,
        };
        Some(QueryRecord { digest, state })
    }
}

/// What [`Ledger::commit`] found: how to proceed, the reservation (to
/// rebuild the query from), and the digest of the query.
pub type Committed = (Admission, Option<Reservation>, [u8; 32]);

/// What [`Ledger::reserve`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum ReserveOutcome {
    /// Reserved now (or already reserved by an earlier Prepare of the same query).
    Reserved(BudgetState, u64),
    /// This query id was already released: Commit will replay it.
    AlreadyReleased,
}

/// Proof that a query id's debit is durable and its release not yet
/// recorded: noise may be drawn for it, and [`Ledger::record_release`]
/// takes it. Only this crate makes one, and it hands one out only once
/// the debit is durable (DESIGN invariant 3), so the node's pipeline
/// cannot reach its noise step without the ledger's say-so: the order of
/// operations is checked by the compiler, not kept by convention.
#[derive(Debug, Clone, PartialEq)]
pub struct Durable(());

/// What [`Ledger::admit`] (and [`Ledger::hold`], [`Ledger::commit`])
/// decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// Debited now, durably; compute and release.
    Debited(BudgetState, Durable),
    /// Held as a reservation by [`Ledger::hold`] (not yet a debit):
    /// compute, then [`Ledger::commit`] it (which gives the [`Durable`]) or
    /// give it back.
    Held(BudgetState),
    /// This query id was answered before with the same query: replay the
    /// stored response, spend nothing.
    Replay(Vec<u8>),
    /// Debited earlier (durably) but never released (the node stopped in
    /// between, or a reservation was just committed): compute and release
    /// under that debit.
    Resume(BudgetState, Durable),
}

/// What [`Ledger::admit_overlapping`] decided, with what it computed.
#[derive(Debug)]
pub enum Computed<R> {
    /// Debited (now, or earlier and never released), durably: `R` was
    /// computed while the debit was being made durable.
    Debited(BudgetState, Durable, R),
    /// A retry of a released query: replay the stored response; nothing
    /// was spent or computed.
    Replay(Vec<u8>),
}

/// Why a query was refused by the ledger.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// The analyst's own limit would be exceeded.
    #[error("{unit} {asked} exceeds your remaining budget on dataset {dataset:?}: {remaining} of {limit} left")]
    AnalystBudget {
        /// `epsilon` or `rho`: the dataset's measure.
        unit: &'static str,
        /// Dataset.
        dataset: String,
        /// The query's cost in that measure.
        asked: f64,
        /// Left for this analyst.
        remaining: f64,
        /// The analyst's limit.
        limit: f64,
    },
    /// The dataset's total across analysts would be exceeded.
    #[error("{unit} {asked} exceeds the remaining total budget of dataset {dataset:?} (all analysts together): {remaining} of {limit} left")]
    DatasetBudget {
        /// `epsilon` or `rho`: the dataset's measure.
        unit: &'static str,
        /// Dataset.
        dataset: String,
        /// The query's cost in that measure.
        asked: f64,
        /// Left for everyone.
        remaining: f64,
        /// The dataset's limit.
        limit: f64,
    },
    /// The query id was used before for a different query.
    #[error("query id {0:?} was already used for a different query; use a new id")]
    IdReused(String),
    /// The query id holds a two-phase reservation.
    #[error("query id {0:?} holds a reservation of a two-phase query; commit or cancel it")]
    Reserved(String),
    /// The delta of released keys would exceed a limit.
    #[error("a release of open-domain keys spends delta {asked:e}, more than the {whose} left on dataset {dataset:?}: {remaining:e} of {limit:e}; no more open-domain GROUP BY queries can run there (declared domains still can)")]
    KeysDelta {
        /// `your delta budget for released keys` or `delta budget of all analysts together for released keys`.
        whose: &'static str,
        /// Dataset.
        dataset: String,
        /// The release's delta.
        asked: f64,
        /// Left.
        remaining: f64,
        /// The limit.
        limit: f64,
    },
    /// The query id was answered, and its stored answer removed after the
    /// replay window: a retry cannot be replayed, and answering it again
    /// would release fresh noise under the one debit.
    #[error("query id {query_id:?} was answered at {released_ms} ms since the Unix epoch, and its stored answer was removed after the node's replay window, so it cannot be replayed (answering it again would spend budget on fresh noise); nothing was spent: ask again with a new query id")]
    ReplayExpired {
        /// The query id.
        query_id: String,
        /// When the answer was stored.
        released_ms: u64,
    },
    /// Commit without a live reservation.
    #[error("query id {0:?} has no live reservation (never prepared, cancelled or expired); prepare it again")]
    NoReservation(String),
}

/// Why a ledger call did not do what it was asked: refused (nothing was
/// written; the caller tells the analyst why), or the store failed (the
/// node stops: its fault is set, see [`crate::fault`]).
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Refused by the ledger's checks; nothing was written.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// A read, write or flush failed; after a failed write or flush
    /// nothing more is written until a restart.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<StoreFailed> for LedgerError {
    fn from(e: StoreFailed) -> Self {
        LedgerError::Store(e.into())
    }
}

/// Why [`Ledger::grant`] granted nothing.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// The amount is zero, negative or not finite.
    #[error("a grant must be a positive, finite {unit} (got {amount})")]
    NotPositive {
        /// `epsilon` or `rho`: the dataset's measure.
        unit: &'static str,
        /// The amount asked.
        amount: f64,
    },
    /// The store failed (see [`crate::fault`]).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<StoreFailed> for GrantError {
    fn from(e: StoreFailed) -> Self {
        GrantError::Store(e.into())
    }
}

/// Why a dataset's recorded measure cannot be read, or disagrees with the
/// configuration ([`Ledger::check_measures`]).
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// The ledger records a measure this build does not know.
    #[error("the ledger of dataset {dataset:?} records an unknown measure {name:?}")]
    Unknown {
        /// The dataset.
        dataset: String,
        /// The recorded name.
        name: String,
    },
    /// The configuration names another measure than the one the ledger
    /// has spent in.
    #[error(
        "dataset {dataset:?} is configured with measure = {configured:?}, but its budget ledger has already spent in measure {recorded:?}; \
mixing measures in one ledger would be unsound, so the node will not start. Set measure = {recorded:?} again (or serve the data under a new dataset name with its own ledger)"
    )]
    Mixed {
        /// The dataset.
        dataset: String,
        /// The measure in the configuration.
        configured: &'static str,
        /// The measure the ledger has spent in.
        recorded: &'static str,
    },
    /// The store failed a read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sled::Error> for MeasureError {
    fn from(e: sled::Error) -> Self {
        MeasureError::Store(e.into())
    }
}

impl LedgerError {
    /// The refusal, if this is one.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            LedgerError::Refused(r) => Some(r),
            LedgerError::Store(_) => None,
        }
    }
}

/// One debit asked of the ledger: whose, for which query, how much. The
/// same value names the release that [`Ledger::record_release`] records
/// under the debit.
#[derive(Debug, Clone, Copy)]
pub struct Debit<'a> {
    /// Analyst identity (certificate CN).
    pub analyst: &'a str,
    /// Dataset.
    pub dataset: &'a str,
    /// Query id.
    pub query_id: &'a str,
    /// The query's digest ([`fedq_proto::query_digest`]): a retry under the
    /// same id must match it.
    pub digest: [u8; 32],
    /// The cost, in the dataset's measure (`limits.measure`).
    pub amount: f64,
    /// Delta of a release of open-domain keys (0 otherwise), debited from
    /// the dataset's released-key delta budget in the same write.
    pub keys_delta: f64,
    /// The dataset's limits.
    pub limits: &'a BudgetLimits,
    /// The query's `query_received` entry if not logged yet: appended
    /// first, in the same write, when the debit (or a resume or replay)
    /// commits; on a refusal nothing is written and the caller logs it.
    pub received: Option<&'a Event>,
}

impl Debit<'_> {
    /// The query this debit pays for, as its release is recorded.
    pub fn release_of(&self) -> ReleaseOf<'_> {
        ReleaseOf {
            analyst: self.analyst,
            dataset: self.dataset,
            query_id: self.query_id,
            digest: self.digest,
            secure: None,
        }
    }
}

/// The query a release is recorded for ([`Ledger::record_release`]): the
/// ids its debit was made under.
#[derive(Debug, Clone, Copy)]
pub struct ReleaseOf<'a> {
    /// Analyst identity.
    pub analyst: &'a str,
    /// Dataset.
    pub dataset: &'a str,
    /// Query id.
    pub query_id: &'a str,
    /// The query's digest.
    pub digest: [u8; 32],
    /// For a secure-aggregation release, its round (logged with it).
    pub secure: Option<&'a fedq_audit::SecureRound>,
}

/// A debit held for a two-phase query or a database source: the SQL kept
/// with it, when it expires, and the `(epsilon, rho)` asked (to rebuild
/// the query at Commit).
#[derive(Debug, Clone, Copy)]
pub struct Hold<'a> {
    /// The SQL.
    pub sql: &'a str,
    /// Expiry, ms since the Unix epoch.
    pub expires_ms: u64,
    /// `(epsilon, rho)` asked.
    pub request: (f64, f64),
}

/// Spent and remaining budget of one analyst on one dataset, in the
/// dataset's measure.
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
    /// The audit log that records every ledger change.
    pub audit: Arc<AuditLog>,
    /// Serialises every ledger write: check-and-debit, release records,
    /// reservations, grants.
    admit_lock: Mutex<()>,
    /// Debits and release records waiting to be written (see
    /// [`Ledger::combine`]).
    queued: Mutex<Vec<Job>>,
}

/// A ledger write waiting for the admission lock (see [`Ledger::combine`]).
enum Job {
    Debit(Box<DebitJob>),
    Release(Box<ReleaseJob>),
}

impl Job {
    /// Records that the shared commit failed in storage: nothing of it
    /// was written.
    fn fail(&self, e: &sled::Error) {
        match self {
            Job::Debit(j) => {
                let _ = j.done.set(DebitOutcome::Failed(e.clone()));
            }
            Job::Release(j) => {
                let _ = j.done.set(Err(e.clone()));
            }
        }
    }
}

/// A check-and-debit (or hold) waiting for the admission lock, and where
/// its outcome goes (`Err`: the shared write failed in storage).
struct DebitJob {
    analyst: String,
    dataset: String,
    query_id: String,
    digest: [u8; 32],
    amount: f64,
    keys_delta: f64,
    limits: BudgetLimits,
    /// For a hold: the SQL, the expiry and the (epsilon, rho) asked.
    hold: Option<(String, u64, (f64, f64))>,
    /// The query's `query_received` entry, logged first when it commits.
    received: Option<Event>,
    done: Arc<OnceLock<DebitOutcome>>,
}

/// How a queued debit was decided ([`Ledger::combine`]).
#[derive(Clone)]
enum DebitOutcome {
    /// Checked and written (or recognised as a retry).
    Admitted(Admission),
    /// Refused by the checks; nothing of it was written.
    Refused(Refusal),
    /// The shared write failed in storage.
    Failed(sled::Error),
}

/// A release waiting to be recorded, and where its outcome goes.
struct ReleaseJob {
    qkey: String,
    digest: [u8; 32],
    event: Event,
    /// The response to store, without its audit head.
    response: fedq_proto::v1::QueryResponse,
    /// The audit head after its entry, or why the batch failed.
    done: Arc<OnceLock<Result<Head, sled::Error>>>,
}

/// One analyst's standing on one dataset, read inside a ledger write.
/// Both debits (one-phase and reservations) go through [`Account::debit`],
/// so the limit checks exist once.
struct Account {
    akey: String,
    dkey: String,
    a_spent: u64,
    d_spent: u64,
    a_limit: u64,
    d_limit: u64,
    /// Released-key delta spent by the analyst and by everyone (atto).
    ka_spent: u64,
    kd_spent: u64,
}

/// What one debit charges: the amount as asked (for messages), in whole
/// nano-units of the measure (rounded up), and the released-key delta in
/// atto-units.
#[derive(Clone, Copy)]
struct Charge {
    amount: f64,
    nano: u64,
    keys: u64,
}

impl Account {
    fn read(
        tx: &impl Kv,
        dataset: &str,
        analyst: &str,
        limits: &BudgetLimits,
    ) -> Result<Account, ConflictableTransactionError<Refusal>> {
        let get = |k: &str| -> Result<u64, ConflictableTransactionError<Refusal>> {
            Ok(tx.get(k)?.map(|v| decode_u64(&v)).unwrap_or(0))
        };
        let (akey, dkey) = (analyst_key(dataset, analyst), dataset_key(dataset));
        Ok(Account {
            a_spent: get(&akey)?,
            d_spent: get(&dkey)?,
            a_limit: to_nano_floor(limits.per_analyst)
                .saturating_add(get(&grant_key(dataset, analyst))?),
            d_limit: to_nano_floor(limits.total),
            ka_spent: get(&keys_analyst_key(dataset, analyst))?,
            kd_spent: get(&keys_dataset_key(dataset))?,
            akey,
            dkey,
        })
    }

    /// The budget as the analyst sees it, at spent totals `a` and `d`.
    fn state(&self, a: u64, d: u64) -> BudgetState {
        BudgetState {
            spent_by_analyst: from_nano(a),
            remaining_for_analyst: from_nano(
                self.a_limit
                    .saturating_sub(a)
                    .min(self.d_limit.saturating_sub(d)),
            ),
            remaining_for_dataset: from_nano(self.d_limit.saturating_sub(d)),
        }
    }

    /// Refuses a debit of `charge` that any limit cannot take, or writes
    /// it (and the ledger's measure); returns the totals after it.
    fn debit(
        &self,
        tx: &impl Kv,
        (dataset, analyst): (&str, &str),
        charge: Charge,
        limits: &BudgetLimits,
    ) -> Result<(u64, u64), ConflictableTransactionError<Refusal>> {
        let Charge { amount, nano, keys } = charge;
        let unit = limits.measure.unit();
        if keys > 0 {
            let ka_limit = to_atto_floor(limits.keys_delta_per_analyst.unwrap_or(0.0));
            let kd_limit = to_atto_floor(limits.keys_delta_total.unwrap_or(0.0));
            for (whose, spent, limit) in [
                (
                    "your delta budget for released keys",
                    self.ka_spent,
                    ka_limit,
                ),
                (
                    "delta budget of all analysts together for released keys",
                    self.kd_spent,
                    kd_limit,
                ),
            ] {
                if spent.saturating_add(keys) > limit {
                    return abort(Refusal::KeysDelta {
                        whose,
                        dataset: dataset.to_string(),
                        asked: from_atto(keys),
                        remaining: from_atto(limit.saturating_sub(spent)),
                        limit: from_atto(limit),
                    });
                }
            }
        }
        if self.a_spent.saturating_add(nano) > self.a_limit {
            return abort(Refusal::AnalystBudget {
                unit,
                dataset: dataset.to_string(),
                asked: amount,
                remaining: from_nano(self.a_limit.saturating_sub(self.a_spent)),
                limit: from_nano(self.a_limit),
            });
        }
        if self.d_spent.saturating_add(nano) > self.d_limit {
            return abort(Refusal::DatasetBudget {
                unit,
                dataset: dataset.to_string(),
                asked: amount,
                remaining: from_nano(self.d_limit.saturating_sub(self.d_spent)),
                limit: limits.total,
            });
        }
        if keys > 0 {
            // Checked above, after every refusal of the amount.
            tx.insert(
                keys_analyst_key(dataset, analyst).as_bytes(),
                &(self.ka_spent + keys).to_be_bytes(),
            )?;
            tx.insert(
                keys_dataset_key(dataset).as_bytes(),
                &(self.kd_spent + keys).to_be_bytes(),
            )?;
        }
        let (a, d) = (self.a_spent + nano, self.d_spent + nano);
        tx.insert(self.akey.as_bytes(), &a.to_be_bytes())?;
        tx.insert(self.dkey.as_bytes(), &d.to_be_bytes())?;
        tx.insert(measure_key(dataset).as_bytes(), limits.measure.name())?;
        Ok((a, d))
    }
}

/// What a debit or reservation entry says about its amount: the measure
/// and the amount as `(epsilon, rho)` (one of them 0).
///
/// Entries no longer state the (epsilon, delta) equivalent of the
/// analyst's total (`analyst_spent_equivalent`, still read in entries
/// written before): it is a function of the stated total and the
/// dataset's logged delta, and computing it per debit (a new total each
/// time, so never remembered) was most of a zCDP query's extra CPU. The
/// audit report and the coordinator compute it where they show it.
struct Stated {
    measure: String,
    epsilon: Decimal,
    rho: Decimal,
}

impl Stated {
    /// The amounts are written exactly, from the ledger's nano-units.
    fn new(limits: &BudgetLimits, nano: u64) -> Stated {
        let amount = Decimal::from_nano(nano);
        let (epsilon, rho) = match limits.measure {
            Measure::Pure => (amount, Decimal::zero()),
            Measure::Zcdp => (Decimal::zero(), amount),
        };
        Stated {
            measure: limits.measure.name().to_string(),
            epsilon,
            rho,
        }
    }
}

/// The state recorded under `qkey`, if any; a record of a different query
/// (or an unreadable one) under the same id is refused.
fn same_query(
    tx: &impl Kv,
    qkey: &str,
    query_id: &str,
    digest: [u8; 32],
) -> Result<Option<RecordState>, ConflictableTransactionError<Refusal>> {
    let Some(existing) = tx.get(qkey)? else {
        return Ok(None);
    };
    match QueryRecord::decode(&existing) {
        Some(rec) if rec.digest == digest => Ok(Some(rec.state)),
        _ => abort(Refusal::IdReused(query_id.to_string())),
    }
}

/// The storage failure inside a ledger write's error (a release record is
/// never refused, and an overlay never conflicts).
fn storage_error<E>(e: ConflictableTransactionError<E>) -> sled::Error {
    match e {
        ConflictableTransactionError::Storage(e) => e,
        _ => sled::Error::ReportableBug("a ledger write failed without a storage error".into()),
    }
}

/// Aborts a ledger write with a refusal.
fn abort<T>(r: Refusal) -> Result<T, ConflictableTransactionError<Refusal>> {
    Err(ConflictableTransactionError::Abort(r))
}

impl Ledger {
    /// A ledger over `store`, logging to `audit`.
    pub fn new(store: crate::store::Store, audit: Arc<AuditLog>) -> Ledger {
        Ledger {
            tree: store.ledger.clone(),
            store,
            audit,
            admit_lock: Mutex::new(()),
            queued: Mutex::new(Vec::new()),
        }
    }

    /// A ledger write failed in storage: sets the store's fault (every
    /// later write is refused; [`crate::fault`]) and returns it, which
    /// names the first failure (sled's own error loses its text when a
    /// shared write's outcome is cloned to each of its callers).
    fn failed(&self, e: sled::Error) -> StoreError {
        self.store
            .fault()
            .set(format!("a ledger write failed: {e}"));
        match self.store.fault().check() {
            Err(failed) => failed.into(),
            Ok(()) => e.into(),
        }
    }

    /// A write made in a sled transaction that never aborts failed in
    /// storage: sets the store's fault and says what was being written.
    fn write_failed(&self, what: &'static str, e: TransactionError<()>) -> StoreError {
        let error = storage(e);
        self.store
            .fault()
            .set(format!("a ledger write failed: {error}"));
        StoreError::Write { what, error }
    }

    /// The store's fault: set once a ledger write or flush failed, after
    /// which every ledger writer is refused ([`crate::fault`]); the server
    /// watches it to stop.
    pub fn fault(&self) -> &crate::fault::Fault {
        self.store.fault()
    }

    /// Turns a ledger write's outcome into the caller's result,
    /// waiting first, when it wrote something, for a flush that covers the
    /// write (so a debit or reservation is durable before anyone acts on
    /// it). Called after the admission lock is released: the next check
    /// and debit need not wait for this one's `fsync`, and concurrent
    /// callers share one (see [`crate::group_commit`]).
    fn settle<T>(
        &self,
        outcome: Result<T, TransactionError<Refusal>>,
        flush: bool,
    ) -> Result<T, LedgerError> {
        match outcome {
            Ok(o) => {
                if flush {
                    self.store.wait_durable()?;
                }
                Ok(o)
            }
            Err(TransactionError::Abort(refusal)) => Err(refusal.into()),
            Err(TransactionError::Storage(e)) => Err(self.failed(e).into()),
        }
    }

    /// Checks limits and durably debits `d.amount` (in the dataset's
    /// measure), or recognises a retry of `d.query_id`. Nothing is written
    /// when refused.
    pub fn admit(&self, d: &Debit<'_>) -> Result<Admission, LedgerError> {
        let (outcome, wrote) = self.debit_in_tx(d, None);
        self.settle(outcome, wrote)
    }

    /// As [`Ledger::admit`], and runs `meanwhile` on this thread while the
    /// debit is being made durable: once the check and the debit are
    /// committed in sled (visible to every later check, so nothing can
    /// overspend) and only for a query that will be computed (a fresh
    /// debit or a resume; never for a refusal or a replay), the debit is
    /// queued for the store's flusher thread and `meanwhile` runs alongside
    /// the flush. Its result is handed back only once the debit is
    /// durable; if the flush fails it is dropped and the error returned.
    ///
    /// **Guarantee.** `meanwhile` must not release anything: it is meant for
    /// the exact aggregates, which stay inside the process and are not a
    /// release. Noise is drawn from what this returns, so after the debit is
    /// durable (DESIGN invariant 3); a crash before then loses the exact
    /// values with the un-synced debit, and nothing was released.
    pub fn admit_overlapping<R>(
        &self,
        d: &Debit<'_>,
        meanwhile: impl FnOnce() -> R,
    ) -> Result<Computed<R>, LedgerError> {
        let (outcome, _) = self.debit_in_tx(d, None);
        let (budget, durable) = match outcome {
            Ok(Admission::Replay(bytes)) => return Ok(Computed::Replay(bytes)),
            Ok(Admission::Debited(b, d) | Admission::Resume(b, d)) => (b, d),
            Ok(Admission::Held(_)) => {
                return Err(StoreError::from(sled::Error::ReportableBug(
                    "a debit without a hold was held".into(),
                ))
                .into())
            }
            Err(TransactionError::Abort(refusal)) => return Err(refusal.into()),
            Err(TransactionError::Storage(e)) => return Err(self.failed(e).into()),
        };
        // The flusher thread makes the debit durable while this thread
        // computes; the result (and the proof) is handed back only once it
        // is.
        let ticket = self.store.ticket();
        let computed = meanwhile();
        self.store.wait(ticket)?;
        Ok(Computed::Debited(budget, durable, computed))
    }

    /// As [`Ledger::admit`], but a fresh debit is held as a reservation
    /// expiring at `hold.expires_ms` (logged as `reserved`), for a query
    /// whose exact values come from a database that may fail: the caller
    /// then either [`Ledger::commit`]s it once the values are in hand, or
    /// [`Ledger::give_back`]s it if nothing was computed. A fresh hold is
    /// returned as [`Admission::Held`]; replays and resumes are as for
    /// `admit`.
    pub fn hold(&self, d: &Debit<'_>, hold: &Hold<'_>) -> Result<Admission, LedgerError> {
        let (outcome, wrote) = self.debit_in_tx(d, Some(hold));
        self.settle(outcome, wrote)
    }

    /// Writes `job` in a commit shared with every other debit and release
    /// record queued meanwhile, and returns once that commit is decided
    /// (committed in sled, not yet durable; the job's slot says how).
    ///
    /// Each caller queues its job and takes the admission lock; whichever
    /// thread holds it next writes every queued job, in queue order, in one
    /// atomic write: debits are checked and written in turn, each seeing
    /// the writes before it (serialised exactly as one write each would be,
    /// so nothing can overspend); a refused debit writes nothing (every
    /// check comes before any write) and leaves the others intact; a
    /// storage failure fails every job of the write. A caller whose job
    /// another thread wrote finds its slot set and only returns.
    ///
    /// The write is computed on overlays of the ledger and audit trees and
    /// committed through the store's journal ([`crate::journal`]), not in a
    /// sled transaction: sled 0.34 writes its log buffer out twice per
    /// transaction, each write waiting for the device (`sync_file_range`),
    /// and takes a process-wide lock; the journal halved the log writes per
    /// query (BENCHMARKS.md). Every other writer of the ledger tree holds
    /// the admission lock, and every other audit append either holds
    /// [`AuditLog::appending`] (held here too) or is one of those writers.
    fn combine(&self, job: Job, decided: impl Fn() -> bool) {
        use prost::Message;
        self.queued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(job);
        let _guard = self.admit_lock.lock().unwrap_or_else(|p| p.into_inner());
        // Queued before taking the lock: either a previous holder decided
        // it, or it is still queued and this thread does.
        if decided() {
            return;
        }
        let jobs = std::mem::take(&mut *self.queued.lock().unwrap_or_else(|p| p.into_inner()));
        let began = std::time::Instant::now();
        // Every other writer of the audit chain waits meanwhile.
        let _appending = self.audit.appending();
        let (tx, atx) = (Overlay::new(&self.tree), Overlay::new(&self.audit.tree));
        // Each job's outcome, handed to its caller only once the whole
        // write is committed.
        type Settle<'j> = Box<dyn FnOnce() + 'j>;
        let computed = (|| -> Result<Vec<Settle<'_>>, sled::Error> {
            let mut settle: Vec<Settle<'_>> = Vec::with_capacity(jobs.len());
            for job in &jobs {
                match job {
                    Job::Debit(job) => {
                        let decided = match self.debit_one(&tx, &atx, job) {
                            Ok(admission) => DebitOutcome::Admitted(admission),
                            Err(ConflictableTransactionError::Abort(refusal)) => {
                                DebitOutcome::Refused(refusal)
                            }
                            Err(ConflictableTransactionError::Storage(e)) => return Err(e),
                            Err(ConflictableTransactionError::Conflict) => {
                                return Err(sled::Error::ReportableBug(
                                    "a ledger write without a transaction met a conflict".into(),
                                ))
                            }
                        };
                        settle.push(Box::new(move || {
                            let _ = job.done.set(decided);
                        }));
                    }
                    Job::Release(job) => {
                        let head = append_in::<()>(&atx, &self.audit.key, job.event.clone())
                            .map_err(storage_error)?;
                        let mut stored = job.response.clone();
                        stored.audit_head = Some(head.to_proto());
                        let rec = QueryRecord {
                            digest: job.digest,
                            state: RecordState::Released(stored.encode_to_vec()),
                        };
                        tx.insert(job.qkey.as_bytes(), rec.encode())
                            .map_err(|e| storage_error::<()>(e.into()))?;
                        // Kept until the replay window has passed.
                        tx.insert(kept_key(unix_ms(), &job.qkey), &[])
                            .map_err(|e| storage_error::<()>(e.into()))?;
                        settle.push(Box::new(move || {
                            let _ = job.done.set(Ok(head));
                        }));
                    }
                }
            }
            Ok(settle)
        })();
        let outcome = computed.and_then(|settle| {
            self.store.journal.commit(&[&tx, &atx])?;
            Ok(settle)
        });
        // Durations only, for the benchmarks (`fedq_node::timing`).
        tracing::debug!(target: "fedq_node::timing", batch = jobs.len(), us = began.elapsed().as_micros() as u64, "ledger commit");
        match outcome {
            Ok(settle) => settle.into_iter().for_each(|f| f()),
            Err(e) => {
                for job in &jobs {
                    job.fail(&e);
                }
            }
        }
    }

    /// The check and the debit (or hold) of [`Ledger::admit`] and
    /// [`Ledger::hold`], written under the admission lock in a write shared
    /// with concurrent debits and release records ([`Ledger::combine`]),
    /// not yet durable; also whether it wrote anything (a replay writes
    /// only the receipt). Callers make it durable before computing.
    fn debit_in_tx(
        &self,
        d: &Debit<'_>,
        hold: Option<&Hold<'_>>,
    ) -> (Result<Admission, TransactionError<Refusal>>, bool) {
        let done = Arc::new(OnceLock::new());
        self.combine(
            Job::Debit(Box::new(DebitJob {
                analyst: d.analyst.to_string(),
                dataset: d.dataset.to_string(),
                query_id: d.query_id.to_string(),
                digest: d.digest,
                amount: d.amount,
                keys_delta: d.keys_delta,
                limits: *d.limits,
                hold: hold.map(|h| (h.sql.to_string(), h.expires_ms, h.request)),
                received: d.received.cloned(),
                done: Arc::clone(&done),
            })),
            || done.get().is_some(),
        );
        let outcome = match done.get().cloned() {
            Some(DebitOutcome::Admitted(admission)) => Ok(admission),
            Some(DebitOutcome::Refused(refusal)) => Err(TransactionError::Abort(refusal)),
            Some(DebitOutcome::Failed(e)) => Err(TransactionError::Storage(e)),
            None => Err(TransactionError::Storage(sled::Error::ReportableBug(
                "a queued debit was never decided".into(),
            ))),
        };
        // Made durable before any release is computed (a replay wrote
        // nothing but the receipt).
        let wrote = !matches!(outcome, Ok(Admission::Replay(_)));
        (outcome, wrote)
    }

    /// One request of a [`Ledger::debit_in_tx`] batch, inside its
    /// transaction. Every check comes before any write, so a refusal
    /// (`Abort`) has written nothing.
    fn debit_one(
        &self,
        tx: &impl Kv,
        atx: &impl Kv,
        job: &DebitJob,
    ) -> Result<Admission, ConflictableTransactionError<Refusal>> {
        let (analyst, dataset, query_id) = (&job.analyst[..], &job.dataset[..], &job.query_id[..]);
        let limits = &job.limits;
        let qkey = query_key(analyst, query_id);
        let debit = to_nano_ceil(job.amount);
        let keys = if job.keys_delta > 0.0 {
            to_atto_ceil(job.keys_delta)
        } else {
            0
        };
        let log_receipt = || -> Result<(), ConflictableTransactionError<Refusal>> {
            if let Some(received) = &job.received {
                append_in(atx, &self.audit.key, received.clone())?;
            }
            Ok(())
        };
        let acct = Account::read(tx, dataset, analyst, limits)?;
        if let Some(state) = same_query(tx, &qkey, query_id, job.digest)? {
            match state {
                RecordState::Released(r) => {
                    log_receipt()?;
                    return Ok(Admission::Replay(r));
                }
                RecordState::Pending(_) => {
                    log_receipt()?;
                    return Ok(Admission::Resume(
                        acct.state(acct.a_spent, acct.d_spent),
                        Durable(()),
                    ));
                }
                RecordState::Reserved(_) => return abort(Refusal::Reserved(query_id.to_string())),
                RecordState::Expired { released_ms } => {
                    return abort(Refusal::ReplayExpired {
                        query_id: query_id.to_string(),
                        released_ms,
                    })
                }
                // A returned reservation: the same query may now run afresh.
                RecordState::Returned => {}
            }
        }
        // Checks, then the writes: a refusal writes nothing.
        let charge = Charge {
            amount: job.amount,
            nano: debit,
            keys,
        };
        let (a_new, d_new) = acct.debit(tx, (dataset, analyst), charge, limits)?;
        log_receipt()?;
        let stated = Stated::new(limits, debit);
        let (state, event) = match &job.hold {
            None => (
                RecordState::Pending(None),
                Event::Debited {
                    analyst: analyst.to_string(),
                    query_id: query_id.to_string(),
                    dataset: dataset.to_string(),
                    epsilon: stated.epsilon,
                    analyst_spent: Decimal::from_nano(a_new),
                    dataset_spent: Decimal::from_nano(d_new),
                    measure: stated.measure,
                    rho: stated.rho,
                    analyst_spent_equivalent: None,
                    keys_delta: Decimal::from_atto(keys),
                    analyst_keys_delta_spent: if keys > 0 {
                        Decimal::from_atto(acct.ka_spent + keys)
                    } else {
                        Decimal::zero()
                    },
                },
            ),
            Some((sql, expires_ms, request)) => {
                tx.insert(expiry_key(*expires_ms, analyst, query_id), &[])?;
                (
                    RecordState::Reserved(Reservation {
                        dataset: dataset.to_string(),
                        sql: sql.to_string(),
                        epsilon: request.0,
                        rho: request.1,
                        measure: limits.measure,
                        nano: debit,
                        expires_ms: *expires_ms,
                    }),
                    Event::Reserved {
                        analyst: analyst.to_string(),
                        query_id: query_id.to_string(),
                        dataset: dataset.to_string(),
                        epsilon: stated.epsilon,
                        analyst_spent: Decimal::from_nano(a_new),
                        dataset_spent: Decimal::from_nano(d_new),
                        expires_ms: *expires_ms,
                        measure: stated.measure,
                        rho: stated.rho,
                        analyst_spent_equivalent: None,
                    },
                )
            }
        };
        tx.insert(
            qkey.as_bytes(),
            QueryRecord {
                digest: job.digest,
                state,
            }
            .encode(),
        )?;
        append_in(atx, &self.audit.key, event)?;
        let state = acct.state(a_new, d_new);
        // The proof leaves the ledger only once the write is durable
        // (`settle`, `admit_overlapping`).
        Ok(match job.hold {
            None => Admission::Debited(state, Durable(())),
            Some(_) => Admission::Held(state),
        })
    }

    /// Stores the released response under its query id (for replays) and
    /// logs the release, in one commit, and waits until both are durable
    /// before the response is sent: otherwise a crash after the answer left
    /// would leave the id pending, and a retry would compute a second,
    /// independent release under the one debit. The stored copy and
    /// `response` get the audit head after the release entry, which is also
    /// returned.
    ///
    /// Concurrent releases and debits share one write ([`Ledger::combine`]).
    /// A thread whose record another wrote only waits for its durability;
    /// if the shared write fails, every record in it fails.
    pub fn record_release(
        &self,
        _debit: Durable,
        of: &ReleaseOf<'_>,
        measurements: Vec<ReleasedMeasurement>,
        source: Option<&str>,
        response: &mut fedq_proto::v1::QueryResponse,
    ) -> Result<Head, StoreError> {
        let ReleaseOf {
            analyst,
            dataset,
            query_id,
            digest,
            secure,
        } = *of;
        use prost::Message;
        let response_sha256 = hex::encode(Sha256::digest(response.encode_to_vec()));
        let qkey = query_key(analyst, query_id);
        let event = Event::Released {
            analyst: analyst.to_string(),
            query_id: query_id.to_string(),
            dataset: dataset.to_string(),
            measurements,
            response_sha256,
            source: source.map(str::to_string),
            secure: secure.cloned(),
        };
        let done = Arc::new(OnceLock::new());
        self.combine(
            Job::Release(Box::new(ReleaseJob {
                qkey,
                digest,
                event,
                response: response.clone(),
                done: Arc::clone(&done),
            })),
            || done.get().is_some(),
        );
        let head = match done.get() {
            Some(Ok(head)) => head.clone(),
            Some(Err(e)) => {
                return Err(StoreError::Write {
                    what: "cannot record the release",
                    error: e.clone(),
                })
            }
            None => {
                return Err(StoreError::Write {
                    what: "cannot record the release",
                    error: sled::Error::ReportableBug("it was not committed".into()),
                })
            }
        };
        self.store.wait_durable()?;
        response.audit_head = Some(head.to_proto());
        Ok(head)
    }

    /// Checks limits and durably reserves `d.amount` (in the dataset's
    /// measure) for a two-phase query (counted as spent until committed,
    /// cancelled or expired), logged in the same commit, with `hold`'s SQL
    /// and `(epsilon, rho)` kept to rebuild the query at Commit. Preparing
    /// the same query id again is idempotent. (`d.keys_delta` and
    /// `d.received` are not used: Prepare logs its own receipt.)
    pub fn reserve(&self, d: &Debit<'_>, hold: &Hold<'_>) -> Result<ReserveOutcome, LedgerError> {
        let (analyst, dataset, query_id, digest, amount, limits) = (
            d.analyst, d.dataset, d.query_id, d.digest, d.amount, d.limits,
        );
        let (sql, expires_ms, request) = (hold.sql, hold.expires_ms, hold.request);
        let guard = self.admit_lock.lock().unwrap_or_else(|p| p.into_inner());
        // After a failed commit or flush nothing more is written: the
        // trees may hold part of a write only the restart completes.
        self.store.fault().check()?;
        let qkey = query_key(analyst, query_id);
        let debit = to_nano_ceil(amount);
        let outcome = (&self.tree, &self.audit.tree).transaction(|(tx, atx)| {
            let acct = Account::read(tx, dataset, analyst, limits)?;
            if let Some(state) = same_query(tx, &qkey, query_id, digest)? {
                match state {
                    RecordState::Reserved(r) => {
                        return Ok(ReserveOutcome::Reserved(
                            acct.state(acct.a_spent, acct.d_spent),
                            r.expires_ms,
                        ))
                    }
                    RecordState::Released(_) | RecordState::Pending(_) => {
                        return Ok(ReserveOutcome::AlreadyReleased)
                    }
                    RecordState::Expired { released_ms } => {
                        return abort(Refusal::ReplayExpired {
                            query_id: query_id.to_string(),
                            released_ms,
                        })
                    }
                    RecordState::Returned => {}
                }
            }
            let charge = Charge {
                amount,
                nano: debit,
                keys: 0,
            };
            let (a_new, d_new) = acct.debit(tx, (dataset, analyst), charge, limits)?;
            let stated = Stated::new(limits, debit);
            let reservation = Reservation {
                dataset: dataset.to_string(),
                sql: sql.to_string(),
                epsilon: request.0,
                rho: request.1,
                measure: limits.measure,
                nano: debit,
                expires_ms,
            };
            tx.insert(
                qkey.as_bytes(),
                QueryRecord {
                    digest,
                    state: RecordState::Reserved(reservation),
                }
                .encode(),
            )?;
            tx.insert(expiry_key(expires_ms, analyst, query_id), &[])?;
            append_in(
                atx,
                &self.audit.key,
                Event::Reserved {
                    analyst: analyst.to_string(),
                    query_id: query_id.to_string(),
                    dataset: dataset.to_string(),
                    epsilon: stated.epsilon,
                    analyst_spent: Decimal::from_nano(a_new),
                    dataset_spent: Decimal::from_nano(d_new),
                    expires_ms,
                    measure: stated.measure,
                    rho: stated.rho,
                    analyst_spent_equivalent: None,
                },
            )?;
            Ok(ReserveOutcome::Reserved(
                acct.state(a_new, d_new),
                expires_ms,
            ))
        });
        drop(guard);
        self.settle(outcome, true)
    }

    /// Turns a live reservation into a pending release (the caller then
    /// computes and records it). A released id replays; a pending one resumes.
    pub fn commit(
        &self,
        analyst: &str,
        query_id: &str,
        now_ms: u64,
    ) -> Result<Committed, LedgerError> {
        let guard = self.admit_lock.lock().unwrap_or_else(|p| p.into_inner());
        // After a failed commit or flush nothing more is written: the
        // trees may hold part of a write only the restart completes.
        self.store.fault().check()?;
        let qkey = query_key(analyst, query_id);
        let outcome = self.tree.transaction(|tx| {
            let Some(rec) = tx.get(&qkey)?.and_then(|v| QueryRecord::decode(&v)) else {
                return abort(Refusal::NoReservation(query_id.to_string()));
            };
            let zero = BudgetState {
                spent_by_analyst: 0.0,
                remaining_for_analyst: 0.0,
                remaining_for_dataset: 0.0,
            };
            match rec.state {
                RecordState::Released(r) => Ok((Admission::Replay(r), None, rec.digest)),
                RecordState::Pending(r) => {
                    Ok((Admission::Resume(zero, Durable(())), r, rec.digest))
                }
                RecordState::Returned => abort(Refusal::NoReservation(query_id.to_string())),
                RecordState::Expired { released_ms } => abort(Refusal::ReplayExpired {
                    query_id: query_id.to_string(),
                    released_ms,
                }),
                RecordState::Reserved(r) if r.expires_ms <= now_ms => {
                    abort(Refusal::NoReservation(query_id.to_string()))
                }
                RecordState::Reserved(r) => {
                    let pending = RecordState::Pending(Some(r.clone()));
                    tx.insert(
                        qkey.as_bytes(),
                        QueryRecord {
                            digest: rec.digest,
                            state: pending,
                        }
                        .encode(),
                    )?;
                    tx.remove(expiry_key(r.expires_ms, analyst, query_id))?;
                    Ok((Admission::Resume(zero, Durable(())), Some(r), rec.digest))
                }
            }
        });
        drop(guard);
        self.settle(outcome, true)
    }

    /// The live (not yet committed, cancelled or expired by `now_ms`)
    /// reservation held under `query_id`, if any. Read only.
    pub fn reservation(
        &self,
        analyst: &str,
        query_id: &str,
        now_ms: u64,
    ) -> Result<Option<Reservation>, StoreError> {
        let rec = self
            .tree
            .get(query_key(analyst, query_id))?
            .and_then(|v| QueryRecord::decode(&v));
        Ok(match rec.map(|r| r.state) {
            Some(RecordState::Reserved(r)) if r.expires_ms > now_ms => Some(r),
            _ => None,
        })
    }

    /// Returns a reservation's budget (cancelled or expired), logged in the
    /// same commit. Returns the epsilon given back (0 if nothing was reserved).
    pub fn give_back(
        &self,
        analyst: &str,
        query_id: &str,
        reason: &str,
        now_ms: Option<u64>,
    ) -> Result<f64, StoreError> {
        let guard = self.admit_lock.lock().unwrap_or_else(|p| p.into_inner());
        // After a failed commit or flush nothing more is written: the
        // trees may hold part of a write only the restart completes.
        self.store.fault().check()?;
        let qkey = query_key(analyst, query_id);
        let returned = (&self.tree, &self.audit.tree)
            .transaction(|(tx, atx)| {
                let Some(rec) = tx.get(&qkey)?.and_then(|v| QueryRecord::decode(&v)) else {
                    return Ok(0);
                };
                let RecordState::Reserved(r) = rec.state else {
                    return Ok(0);
                };
                if now_ms.is_some_and(|now| r.expires_ms > now) {
                    return Ok(0);
                }
                let akey = analyst_key(&r.dataset, analyst);
                let dkey = dataset_key(&r.dataset);
                let a = tx.get(&akey)?.map(|v| decode_u64(&v)).unwrap_or(0);
                let d = tx.get(&dkey)?.map(|v| decode_u64(&v)).unwrap_or(0);
                tx.insert(akey.as_bytes(), &a.saturating_sub(r.nano).to_be_bytes())?;
                tx.insert(dkey.as_bytes(), &d.saturating_sub(r.nano).to_be_bytes())?;
                tx.insert(
                    qkey.as_bytes(),
                    QueryRecord {
                        digest: rec.digest,
                        state: RecordState::Returned,
                    }
                    .encode(),
                )?;
                tx.remove(expiry_key(r.expires_ms, analyst, query_id))?;
                append_in::<()>(
                    atx,
                    &self.audit.key,
                    Event::ReservationReturned {
                        analyst: analyst.to_string(),
                        query_id: query_id.to_string(),
                        dataset: r.dataset.clone(),
                        epsilon: if r.measure == Measure::Pure {
                            Decimal::from_nano(r.nano)
                        } else {
                            Decimal::zero()
                        },
                        reason: reason.to_string(),
                        measure: r.measure.name().to_string(),
                        rho: if r.measure == Measure::Zcdp {
                            Decimal::from_nano(r.nano)
                        } else {
                            Decimal::zero()
                        },
                    },
                )?;
                Ok(r.nano)
            })
            // Only storage fails these writes (nothing aborts them).
            .map_err(|e| self.write_failed("cannot return the reservation", e))?;
        drop(guard);
        if returned > 0 {
            self.store.wait_durable()?;
        }
        Ok(from_nano(returned))
    }

    /// Returns every reservation that expired by `now_ms`. Returns how many.
    pub fn expire_due(&self, now_ms: u64) -> Result<usize, StoreError> {
        let mut due = Vec::new();
        for item in self
            .tree
            .range(EXPIRY_PREFIX.as_bytes().to_vec()..expiry_key(now_ms.saturating_add(1), "", ""))
        {
            let (k, _) = item?;
            let rest = &k[EXPIRY_PREFIX.len() + 8..];
            let mut parts = rest.splitn(2, |b| *b == 0);
            let analyst = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
            let query_id = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
            due.push((analyst, query_id));
        }
        let mut n = 0;
        for (analyst, query_id) in due {
            if self.give_back(&analyst, &query_id, "expired", Some(now_ms))? > 0.0 {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Removes the stored responses of releases kept since before
    /// `kept_before_ms` (the replay window has passed), leaving each id's
    /// digest and release time as [`RecordState::Expired`], so a retry is
    /// refused instead of answered with fresh noise; the release's entries
    /// stay in the audit log. Releases stored before the replay window
    /// existed are first indexed as kept from now. Returns how many were
    /// removed. Nothing here is a privacy event: no audit entry, no budget.
    pub fn expire_releases(&self, kept_before_ms: u64) -> Result<usize, StoreError> {
        self.index_unkept_releases()?;
        let mut n = 0;
        loop {
            let due: Vec<(sled::IVec, u64, String)> = self
                .tree
                .range(KEPT_PREFIX.as_bytes().to_vec()..kept_key(kept_before_ms, ""))
                .take(256)
                .map(|item| {
                    let (k, _) = item?;
                    let at = decode_u64(&k[KEPT_PREFIX.len()..KEPT_PREFIX.len() + 8]);
                    let qkey = String::from_utf8_lossy(&k[KEPT_PREFIX.len() + 8..]).into_owned();
                    Ok((k, at, qkey))
                })
                .collect::<sled::Result<_>>()?;
            if due.is_empty() {
                return Ok(n);
            }
            let guard = self.admit_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.store.fault().check()?;
            let removed = self
                .tree
                .transaction(|tx| {
                    let mut removed = 0;
                    for (k, at, qkey) in &due {
                        tx.remove(k)?;
                        let Some(rec) = tx.get(qkey)?.and_then(|v| QueryRecord::decode(&v)) else {
                            continue;
                        };
                        if let RecordState::Released(_) = rec.state {
                            let state = RecordState::Expired { released_ms: *at };
                            let rec = QueryRecord {
                                digest: rec.digest,
                                state,
                            };
                            tx.insert(qkey.as_bytes(), rec.encode())?;
                            removed += 1;
                        }
                    }
                    Ok::<_, ConflictableTransactionError<()>>(removed)
                })
                .map_err(|e| self.write_failed("cannot remove expired stored releases", e))?;
            drop(guard);
            n += removed;
        }
    }

    /// Indexes, once, the releases stored before the replay window existed
    /// (no `kept/` key) as kept from now, so they expire a window after
    /// the upgrade.
    fn index_unkept_releases(&self) -> Result<(), StoreError> {
        if self.tree.contains_key(KEPT_INDEXED)? {
            return Ok(());
        }
        let _guard = self.admit_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.store.fault().check()?;
        let now = unix_ms();
        let mut batch = sled::Batch::default();
        for item in self.tree.scan_prefix(b"query/") {
            let (k, v) = item?;
            if let Some(QueryRecord {
                state: RecordState::Released(_),
                ..
            }) = QueryRecord::decode(&v)
            {
                batch.insert(kept_key(now, &String::from_utf8_lossy(&k)), &[]);
            }
        }
        batch.insert(KEPT_INDEXED, &[]);
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Raises `analyst`'s limit on `dataset` by `amount`, in the dataset's
    /// `measure`, logged in the same commit. Returns the analyst's total
    /// grants after it.
    pub fn grant(
        &self,
        analyst: &str,
        dataset: &str,
        amount: f64,
        measure: Measure,
    ) -> Result<f64, GrantError> {
        let epsilon = amount;
        if !(epsilon.is_finite() && epsilon > 0.0) {
            return Err(GrantError::NotPositive {
                unit: measure.unit(),
                amount: epsilon,
            });
        }
        let guard = self.admit_lock.lock().unwrap_or_else(|p| p.into_inner());
        // After a failed commit or flush nothing more is written: the
        // trees may hold part of a write only the restart completes.
        self.store.fault().check()?;
        let gkey = grant_key(dataset, analyst);
        let add = to_nano_floor(epsilon);
        let total = (&self.tree, &self.audit.tree)
            .transaction(|(tx, atx)| {
                let before = tx.get(&gkey)?.map(|v| decode_u64(&v)).unwrap_or(0);
                let after = before.saturating_add(add);
                tx.insert(gkey.as_bytes(), &after.to_be_bytes())?;
                tx.insert(measure_key(dataset).as_bytes(), measure.name())?;
                append_in::<()>(
                    atx,
                    &self.audit.key,
                    Event::BudgetGranted {
                        analyst: analyst.to_string(),
                        dataset: dataset.to_string(),
                        epsilon: Decimal::from_nano(add),
                        granted_total: Decimal::from_nano(after),
                        measure: measure.name().to_string(),
                    },
                )?;
                Ok(after)
            })
            // Only storage fails these writes (nothing aborts them).
            .map_err(|e| self.write_failed("cannot record the grant", e))?;
        drop(guard);
        self.store.wait_durable()?;
        Ok(from_nano(total))
    }

    /// The analyst's budget on a dataset, without spending anything.
    pub fn state(
        &self,
        analyst: &str,
        dataset: &str,
        limits: &BudgetLimits,
    ) -> Result<BudgetState, StoreError> {
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
        let granted = self
            .tree
            .get(grant_key(dataset, analyst))?
            .map(|v| decode_u64(&v))
            .unwrap_or(0);
        let a_limit = to_nano_floor(limits.per_analyst).saturating_add(granted);
        let d_limit = to_nano_floor(limits.total);
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

/// Prefix of the reservation expiry index: `resv/` + expiry (u64 BE) +
/// analyst + NUL + query id, so due reservations are a range scan.
const EXPIRY_PREFIX: &str = "resv/";

fn expiry_key(expires_ms: u64, analyst: &str, query_id: &str) -> Vec<u8> {
    let mut k = EXPIRY_PREFIX.as_bytes().to_vec();
    k.extend_from_slice(&expires_ms.to_be_bytes());
    k.extend_from_slice(analyst.as_bytes());
    k.push(0);
    k.extend_from_slice(query_id.as_bytes());
    k
}

/// Prefix of the stored-release index: `kept/` + when it was stored (u64
/// BE, ms) + the record's key, so releases past the replay window are a
/// range scan.
const KEPT_PREFIX: &str = "kept/";

/// Set once every release stored before the index existed is indexed.
const KEPT_INDEXED: &[u8] = b"kept-indexed";

fn kept_key(at_ms: u64, qkey: &str) -> Vec<u8> {
    let mut k = KEPT_PREFIX.as_bytes().to_vec();
    k.extend_from_slice(&at_ms.to_be_bytes());
    k.extend_from_slice(qkey.as_bytes());
    k
}

/// Now, in ms since the Unix epoch.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Released-key delta spent by one analyst on a dataset (atto-delta).
fn keys_analyst_key(dataset: &str, analyst: &str) -> String {
    format!("keysdelta/analyst/{dataset}/{analyst}")
}

/// Released-key delta spent by all analysts on a dataset (atto-delta).
fn keys_dataset_key(dataset: &str) -> String {
    format!("keysdelta/dataset/{dataset}")
}

fn grant_key(dataset: &str, analyst: &str) -> String {
    format!("grant/{dataset}/{analyst}")
}

/// Every analyst with a ledger entry on `dataset`, for `budget show`.
impl Ledger {
    /// `(analyst, spent, granted)` for every analyst known on `dataset`.
    pub fn analysts(&self, dataset: &str) -> Result<Vec<(String, f64, f64)>, StoreError> {
        let mut out: Vec<(String, f64, f64)> = Vec::new();
        let prefix = format!("spent/analyst/{dataset}/");
        for item in self.tree.scan_prefix(prefix.as_bytes()) {
            let (k, v) = item?;
            let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            out.push((name, from_nano(decode_u64(&v)), 0.0));
        }
        let gprefix = format!("grant/{dataset}/");
        for item in self.tree.scan_prefix(gprefix.as_bytes()) {
            let (k, v) = item?;
            let name = String::from_utf8_lossy(&k[gprefix.len()..]).into_owned();
            match out.iter_mut().find(|(n, _, _)| *n == name) {
                Some(e) => e.2 = from_nano(decode_u64(&v)),
                None => out.push((name, 0.0, from_nano(decode_u64(&v)))),
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

fn measure_key(dataset: &str) -> String {
    format!("measure/{dataset}")
}

impl Ledger {
    /// The measure `dataset`'s ledger has spent or granted in, if any:
    /// the recorded one, else pure when anything was spent or granted
    /// (ledgers from before zCDP), else none.
    pub fn recorded_measure(&self, dataset: &str) -> Result<Option<Measure>, MeasureError> {
        if let Some(v) = self.tree.get(measure_key(dataset))? {
            let name = String::from_utf8_lossy(&v).into_owned();
            return match Measure::parse(&name) {
                Some(m) => Ok(Some(m)),
                None => Err(MeasureError::Unknown {
                    dataset: dataset.to_string(),
                    name,
                }),
            };
        }
        let used = self.tree.get(dataset_key(dataset))?.is_some()
            || self
                .tree
                .scan_prefix(format!("grant/{dataset}/").as_bytes())
                .next()
                .is_some();
        Ok(used.then_some(Measure::Pure))
    }

    /// Refuses (without writing anything) a configuration under which a
    /// dataset's ledger would mix measures: amounts already spent in one
    /// measure cannot be compared with limits in another.
    pub fn check_measures<'a>(
        &self,
        configured: impl IntoIterator<Item = (&'a str, Measure)>,
    ) -> Result<(), MeasureError> {
        for (dataset, measure) in configured {
            if let Some(recorded) = self.recorded_measure(dataset)? {
                if recorded != measure {
                    return Err(MeasureError::Mixed {
                        dataset: dataset.to_string(),
                        configured: measure.name(),
                        recorded: recorded.name(),
                    });
                }
            }
        }
        Ok(())
    }
}

fn dataset_key(dataset: &str) -> String {
    format!("spent/dataset/{dataset}")
}

/// The record of `query_id` asked by `analyst`. Query ids may contain `/`,
/// so an analyst name containing `/` (or starting with `~`) is written as
/// `~` and its hex: otherwise analyst `a/b` asking `c` and analyst `a`
/// asking `b/c` would share a record. Other names keep the form they had
/// before, so stored releases of existing stores are still found.
fn query_key(analyst: &str, query_id: &str) -> String {
    if analyst.contains('/') || analyst.starts_with('~') {
        format!("query/~{}/{query_id}", hex::encode(analyst))
    } else {
        format!("query/{analyst}/{query_id}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ledger call's outcome as the tests below read it: the value or
    /// the ledger's refusal. The store never fails in these tests unless
    /// one arms a fail point, and those call the ledger directly.
    fn refused<T>(r: Result<T, LedgerError>) -> Result<T, Refusal> {
        match r {
            Ok(t) => Ok(t),
            Err(LedgerError::Refused(r)) => Err(r),
            Err(LedgerError::Store(e)) => panic!("the store failed: {e}"),
        }
    }

    /// One request of the tests below: who asks, for which query, how
    /// much. As a hold ([`Ask::hold`]) it keeps `SELECT 1` and asks the
    /// same amount in the dataset's measure.
    #[derive(Clone, Copy)]
    struct Ask<'a> {
        analyst: &'a str,
        dataset: &'a str,
        query_id: &'a str,
        digest: [u8; 32],
        amount: f64,
        limits: &'a BudgetLimits,
        /// When a hold or reservation expires (ms since the Unix epoch).
        expires_ms: u64,
        /// The query's `query_received` entry, logged with the debit.
        received: Option<&'a Event>,
    }

    /// A request of `amount` by `analyst` on `dataset` under `query_id`,
    /// holding (if held) until far in the future, with no receipt.
    fn ask<'a>(
        (analyst, dataset, query_id): (&'a str, &'a str, &'a str),
        digest: [u8; 32],
        amount: f64,
        limits: &'a BudgetLimits,
    ) -> Ask<'a> {
        Ask {
            analyst,
            dataset,
            query_id,
            digest,
            amount,
            limits,
            expires_ms: u64::MAX / 2,
            received: None,
        }
    }

    impl<'a> Ask<'a> {
        /// Held or reserved until `expires_ms`.
        fn expiring(self, expires_ms: u64) -> Ask<'a> {
            Ask { expires_ms, ..self }
        }

        /// With its `query_received` entry.
        fn received(self, received: &'a Event) -> Ask<'a> {
            Ask {
                received: Some(received),
                ..self
            }
        }

        /// The debit asked.
        fn debit(&self) -> Debit<'a> {
            Debit {
                analyst: self.analyst,
                dataset: self.dataset,
                query_id: self.query_id,
                digest: self.digest,
                amount: self.amount,
                keys_delta: 0.0,
                limits: self.limits,
                received: self.received,
            }
        }

        /// The hold or reservation asked.
        fn hold(&self) -> Hold<'a> {
            Hold {
                sql: "SELECT 1",
                expires_ms: self.expires_ms,
                request: (self.amount, 0.0),
            }
        }
    }

    /// The ledger's calls on an [`Ask`], for the tests.
    impl Ledger {
        fn t_admit(
            &self,
            analyst: &str,
            dataset: &str,
            query_id: &str,
            digest: [u8; 32],
            amount: f64,
            limits: &BudgetLimits,
        ) -> Result<Admission, Refusal> {
            let a = ask((analyst, dataset, query_id), digest, amount, limits);
            refused(self.admit(&a.debit()))
        }

        fn t_admit_overlapping<R>(
            &self,
            a: &Ask<'_>,
            meanwhile: impl FnOnce() -> R,
        ) -> Result<Computed<R>, Refusal> {
            refused(self.admit_overlapping(&a.debit(), meanwhile))
        }

        fn t_hold(&self, a: &Ask<'_>) -> Result<Admission, Refusal> {
            refused(self.hold(&a.debit(), &a.hold()))
        }

        fn t_reserve(&self, a: &Ask<'_>) -> Result<ReserveOutcome, Refusal> {
            refused(self.reserve(&a.debit(), &a.hold()))
        }

        fn t_commit(
            &self,
            analyst: &str,
            query_id: &str,
            now_ms: u64,
        ) -> Result<Committed, Refusal> {
            refused(self.commit(analyst, query_id, now_ms))
        }

        /// Records the release (no measurements, no source) of `a`'s debit.
        fn t_record_release(
            &self,
            a: &Ask<'_>,
            response: &mut fedq_proto::v1::QueryResponse,
        ) -> Result<Head, StoreError> {
            self.record_release(Durable(()), &a.debit().release_of(), vec![], None, response)
        }
    }

    fn test_ledger(dir: &std::path::Path) -> Ledger {
        let store = crate::store::Store::open(&dir.join("store")).unwrap();
        let key = crate::audit::AuditKey::load_or_create(&dir.join("k"), &dir.join("p")).unwrap();
        let audit = Arc::new(AuditLog::new(store.audit.clone(), key));
        Ledger::new(store, audit)
    }

    /// The overlapped admission computes only what will be released (a
    /// fresh debit or a resume, never a refusal or a replay), and returns
    /// only after a flush that covers the debit.
    #[test]
    fn overlapped_admission_computes_only_admitted_queries_and_returns_durable() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = test_ledger(dir.path());
        let l = limits();
        let calls = std::cell::Cell::new(0);
        let admit = |id: &str, digest: u8, amount: f64| {
            ledger.t_admit_overlapping(
                &ask(("alice", "cases", id), [digest; 32], amount, &l),
                || {
                    calls.set(calls.get() + 1);
                    42
                },
            )
        };
        let flushes = ledger.store.group_flushes();
        let Ok(Computed::Debited(b, _, 42)) = admit("q1", 1, 0.6) else {
            panic!("a fresh debit is computed");
        };
        assert_eq!(b.spent_by_analyst, 0.6);
        assert_eq!(calls.get(), 1);
        assert!(
            ledger.store.group_flushes() > flushes,
            "returned before a flush"
        );
        // Over the analyst's limit: refused, nothing computed or spent.
        assert!(matches!(
            admit("q2", 2, 0.6),
            Err(Refusal::AnalystBudget { .. })
        ));
        assert_eq!(calls.get(), 1);
        // Debited and never released: a retry computes under the same debit.
        assert!(matches!(
            admit("q1", 1, 0.6),
            Ok(Computed::Debited(_, _, 42))
        ));
        assert_eq!(calls.get(), 2);
        assert_eq!(
            ledger.state("alice", "cases", &l).unwrap().spent_by_analyst,
            0.6
        );
        // Released: a retry replays, nothing computed.
        ledger
            .t_record_release(
                &ask(("alice", "cases", "q1"), [1; 32], 0.0, &l),
                &mut fedq_proto::v1::QueryResponse::default(),
            )
            .unwrap();
        assert!(matches!(admit("q1", 1, 0.6), Ok(Computed::Replay(_))));
        assert_eq!(calls.get(), 2);
    }

    /// A received query's audit entry passed to the admission is committed
    /// with the debit, right before it; a refusal commits neither (the
    /// service then logs it with the refusal).
    #[test]
    fn a_receipt_is_committed_with_its_debit_and_not_with_a_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = test_ledger(dir.path());
        let l = limits();
        let received = |id: &str| Event::QueryReceived {
            analyst: "alice".into(),
            query_id: id.into(),
            dataset: "cases".into(),
            sql: "SELECT COUNT(*) FROM cases".into(),
            epsilon: Decimal::from_nano(600_000_000),
            dry_run: false,
            rho: Decimal::zero(),
        };
        let kinds = |ledger: &Ledger| -> Vec<(String, &'static str)> {
            ledger
                .audit
                .entries(0)
                .map(|e| {
                    let e = e.unwrap();
                    let event = e.event().unwrap();
                    let id = match &event {
                        Event::QueryReceived { query_id, .. } | Event::Debited { query_id, .. } => {
                            query_id.clone()
                        }
                        _ => String::new(),
                    };
                    (id, event.kind())
                })
                .collect()
        };
        for (id, amount) in [("q1", 0.6), ("q2", 0.6)] {
            let _ = ledger.t_admit_overlapping(
                &ask(("alice", "cases", id), [1; 32], amount, &l).received(&received(id)),
                || (),
            );
        }
        assert_eq!(
            kinds(&ledger),
            vec![
                ("q1".to_string(), "query_received"),
                ("q1".to_string(), "debited")
            ],
            "q2 was refused (over the analyst's limit): nothing of it is committed"
        );
    }

    /// After a journaled write failed part-way, every writer (debits,
    /// reservations, give-backs, grants, commits) is refused, though the
    /// disk takes writes again, until the restart replays it; then the
    /// ledger holds the interrupted debit and the reservation, and the log
    /// verifies and records exactly those (issue 16, item 10).
    #[test]
    fn after_a_write_failed_part_way_every_writer_is_refused_until_the_replay() {
        use crate::fault::fail_point::{self, Point};
        let dir = tempfile::tempdir().unwrap();
        let store_dir = dir.path().join("store");
        let l = limits();
        let far = u64::MAX / 2;
        {
            let ledger = test_ledger(dir.path());
            ledger
                .t_reserve(&ask(("bob", "cases", "r1"), [3; 32], 0.2, &l).expiring(far))
                .unwrap();
            // The journal value and one key land, then the disk is full.
            fail_point::arm(&store_dir, Point::JournalWrite, 2, u64::MAX);
            assert!(matches!(
                ledger.admit(&ask(("alice", "cases", "q1"), [1; 32], 0.5, &l).debit()),
                Err(LedgerError::Store(_))
            ));
            assert!(ledger.fault().is_set());
            // The disk takes writes again; the node has not restarted.
            fail_point::disarm(&store_dir);
            fn refuses_every_write(e: impl std::fmt::Display) {
                let e = e.to_string();
                assert!(e.contains("refuses every write"), "{e}");
            }
            let carol = ask(("carol", "cases", "r2"), [4; 32], 0.1, &l).expiring(far);
            refuses_every_write(ledger.reserve(&carol.debit(), &carol.hold()).unwrap_err());
            refuses_every_write(
                ledger
                    .give_back("bob", "r1", "cancelled", None)
                    .unwrap_err(),
            );
            refuses_every_write(
                ledger
                    .grant("alice", "cases", 1.0, Measure::Pure)
                    .unwrap_err(),
            );
            let e = ledger.commit("bob", "r1", 0).unwrap_err();
            assert!(
                matches!(&e, LedgerError::Store(s) if s.fault().is_some()),
                "{e:?}"
            );
            refuses_every_write(e);
            refuses_every_write(
                ledger
                    .admit(&ask(("alice", "cases", "q2"), [2; 32], 0.1, &l).debit())
                    .unwrap_err(),
            );
            assert_eq!(ledger.tree.get(grant_key("cases", "alice")).unwrap(), None);
            assert!(ledger.reservation("bob", "r1", 0).unwrap().is_some());
            assert_eq!(ledger.reservation("carol", "r2", 0).unwrap(), None);
        }
        let ledger = test_ledger(dir.path());
        assert!(!ledger.fault().is_set(), "a reopened store is whole");
        let spent = |who| ledger.state(who, "cases", &l).unwrap().spent_by_analyst;
        assert!((spent("alice") - 0.5).abs() < 1e-9, "{}", spent("alice"));
        assert!((spent("bob") - 0.2).abs() < 1e-9);
        assert_eq!(spent("carol"), 0.0);
        let text: String = ledger.audit.lines(0).map(|l| l.unwrap() + "\n").collect();
        let public =
            crate::audit::parse_public_key(&std::fs::read_to_string(dir.path().join("p")).unwrap())
                .unwrap();
        crate::audit::verify(&text, &public, 0, None).unwrap();
        assert_eq!(logged(&ledger, "debited"), 1);
        assert_eq!(logged(&ledger, "reserved"), 1);
        assert_eq!(logged(&ledger, "budget_granted"), 0);
        assert_eq!(logged(&ledger, "reservation_returned"), 0);
    }

    /// How many entries of `kind` the ledger's audit log holds.
    fn logged(ledger: &Ledger, kind: &str) -> usize {
        ledger
            .audit
            .entries(0)
            .filter(|e| e.as_ref().unwrap().event().unwrap().kind() == kind)
            .count()
    }

    /// Debits checked concurrently (and so in shared transactions) are
    /// serialised: exactly as many as the limit takes are debited, each
    /// once, the rest refused without a trace in the ledger or the log.
    #[test]
    fn concurrent_debits_in_shared_transactions_never_overspend() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(test_ledger(dir.path()));
        // 0.1 each: the analyst's 1.0 takes exactly 10 of the 64.
        let l = limits();
        let threads: Vec<_> = (0..16u8)
            .map(|t| {
                let (ledger, l) = (Arc::clone(&ledger), l);
                std::thread::spawn(move || {
                    (0..4u8)
                        .map(|i| {
                            let id = format!("q{t}-{i}");
                            let outcome =
                                ledger.t_admit("alice", "cases", &id, [t * 4 + i; 32], 0.1, &l);
                            (id, t * 4 + i, outcome)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let outcomes: Vec<_> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let debited: Vec<_> = outcomes
            .iter()
            .filter(|(_, _, o)| matches!(o, Ok(Admission::Debited(..))))
            .collect();
        let refused = outcomes
            .iter()
            .filter(|(_, _, o)| matches!(o, Err(Refusal::AnalystBudget { .. })))
            .count();
        assert_eq!((debited.len(), refused), (10, 54));
        assert_eq!(
            ledger.state("alice", "cases", &l).unwrap().spent_by_analyst,
            1.0
        );
        assert_eq!(logged(&ledger, "debited"), 10);
        // Each debited id resumes under its own debit; a refused one is
        // refused again (it left no record).
        for (id, digest, o) in &outcomes {
            let again = ledger.t_admit("alice", "cases", id, [*digest; 32], 0.1, &l);
            match o {
                Ok(_) => assert!(matches!(again, Ok(Admission::Resume(..))), "{id}"),
                Err(_) => assert!(matches!(again, Err(Refusal::AnalystBudget { .. })), "{id}"),
            }
        }
    }

    /// Releases recorded concurrently (and so in shared commits) each get
    /// their own entry and head, and each stored copy replays with its own
    /// values and head.
    #[test]
    fn concurrent_releases_are_each_recorded_once_with_their_own_head() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(test_ledger(dir.path()));
        let l = BudgetLimits {
            per_analyst: 100.0,
            total: 100.0,
            ..limits()
        };
        let threads: Vec<_> = (0..16u8)
            .map(|t| {
                let (ledger, l) = (Arc::clone(&ledger), l);
                std::thread::spawn(move || {
                    let mut heads = Vec::new();
                    for i in 0..8u8 {
                        let id = format!("q{t}-{i}");
                        let digest = [t * 8 + i; 32];
                        assert!(matches!(
                            ledger.t_admit("alice", "cases", &id, digest, 0.01, &l),
                            Ok(Admission::Debited(..))
                        ));
                        let mut response = fedq_proto::v1::QueryResponse {
                            query_id: id.clone(),
                            cost: f64::from(t * 8 + i),
                            ..Default::default()
                        };
                        let head = ledger
                            .t_record_release(
                                &ask(("alice", "cases", &id), digest, 0.0, &l),
                                &mut response,
                            )
                            .unwrap();
                        assert_eq!(response.audit_head, Some(head.to_proto()));
                        heads.push((id, digest, head));
                    }
                    heads
                })
            })
            .collect();
        let heads: Vec<_> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let mut seqs: Vec<u64> = heads.iter().map(|(_, _, h)| h.seq).collect();
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), 128, "every release has its own audit entry");
        assert_eq!(logged(&ledger, "released"), 128);
        for (id, digest, head) in &heads {
            let Ok(Admission::Replay(bytes)) =
                ledger.t_admit("alice", "cases", id, *digest, 0.01, &l)
            else {
                panic!("{id} replays");
            };
            use prost::Message;
            let stored = fedq_proto::v1::QueryResponse::decode(bytes.as_slice()).unwrap();
            assert_eq!(&stored.query_id, id);
            assert_eq!(stored.cost, f64::from(digest[0]));
            assert_eq!(stored.audit_head, Some(head.to_proto()));
        }
    }

    /// A held debit (database sources) counts as spent; given back it
    /// returns, committed it stays; once the sweeper expired it, a commit is
    /// refused, so a late answer is never released.
    #[test]
    fn a_held_debit_is_either_committed_or_given_back_never_both() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = test_ledger(dir.path());
        let l = limits();
        let spent = |ledger: &Ledger| ledger.state("alice", "cases", &l).unwrap().spent_by_analyst;
        let held = ledger
            .t_hold(&ask(("alice", "cases", "q1"), [1; 32], 0.5, &l).expiring(10_000))
            .unwrap();
        assert!(matches!(held, Admission::Held(_)));
        assert_eq!(spent(&ledger), 0.5);
        assert!(ledger.reservation("alice", "q1", 0).unwrap().is_some());
        assert_eq!(
            ledger
                .give_back("alice", "q1", "database source failed", None)
                .unwrap(),
            0.5
        );
        assert_eq!(spent(&ledger), 0.0);
        assert!(
            ledger.t_commit("alice", "q1", 0).is_err(),
            "given back: no commit"
        );

        // The same id runs afresh, and commits.
        ledger
            .t_hold(&ask(("alice", "cases", "q1"), [1; 32], 0.5, &l).expiring(10_000))
            .unwrap();
        let (admission, r, _) = ledger.t_commit("alice", "q1", 0).unwrap();
        assert!(matches!(admission, Admission::Resume(..)) && r.is_some());
        assert_eq!(ledger.give_back("alice", "q1", "late", None).unwrap(), 0.0);
        assert_eq!(spent(&ledger), 0.5);

        // Expired by the sweeper before the answer came: nothing to commit.
        ledger
            .t_hold(&ask(("alice", "cases", "q2"), [2; 32], 0.25, &l).expiring(1_000))
            .unwrap();
        assert_eq!(ledger.expire_due(1_000).unwrap(), 1);
        assert!(ledger.t_commit("alice", "q2", 1_001).is_err());
        assert_eq!(spent(&ledger), 0.5);
        let kinds: Vec<String> = ledger
            .audit
            .entries(0)
            .map(|e| e.unwrap().event().unwrap().kind().to_string())
            .collect();
        assert_eq!(
            kinds,
            [
                "reserved",
                "reservation_returned",
                "reserved",
                "reserved",
                "reservation_returned"
            ]
        );
    }

    #[test]
    fn grants_raise_the_limit_and_are_logged() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = test_ledger(dir.path());
        let l = limits();
        ledger
            .t_admit("alice", "cases", "q1", [1; 32], 1.0, &l)
            .unwrap();
        assert!(ledger
            .t_admit("alice", "cases", "q2", [2; 32], 0.3, &l)
            .is_err());
        assert_eq!(
            ledger.grant("alice", "cases", 0.5, Measure::Pure).unwrap(),
            0.5
        );
        ledger
            .t_admit("alice", "cases", "q2", [2; 32], 0.3, &l)
            .unwrap();
        let kinds: Vec<String> = ledger
            .audit
            .entries(0)
            .map(|e| e.unwrap().event().unwrap().kind().to_string())
            .collect();
        assert_eq!(kinds, vec!["debited", "budget_granted", "debited"]);
        assert!(ledger
            .grant("alice", "cases", f64::NAN, Measure::Pure)
            .is_err());
    }

    fn limits() -> BudgetLimits {
        BudgetLimits {
            keys_delta: None,
            keys_delta_per_analyst: None,
            keys_delta_total: None,
            per_analyst: 1.0,
            total: 1.5,
            per_query_max: 1.0,
            measure: Default::default(),
            delta: None,
        }
    }

    #[test]
    fn debits_refuses_and_replays() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = test_ledger(dir.path());
        let l = limits();
        let a = ledger
            .t_admit("alice", "cases", "q1", [1; 32], 0.6, &l)
            .unwrap();
        assert!(
            matches!(a, Admission::Debited(s, _) if (s.remaining_for_analyst - 0.4).abs() < 1e-9)
        );
        // Over alice's own limit: refused, nothing written.
        let r = ledger
            .t_admit("alice", "cases", "q2", [2; 32], 0.5, &l)
            .unwrap_err();
        assert!(matches!(r, Refusal::AnalystBudget { .. }), "{r}");
        assert!((ledger.state("alice", "cases", &l).unwrap().spent_by_analyst - 0.6).abs() < 1e-9);
        // Same id, different query: refused.
        let r = ledger
            .t_admit("alice", "cases", "q1", [9; 32], 0.1, &l)
            .unwrap_err();
        assert_eq!(r, Refusal::IdReused("q1".into()));
        // Same id, same query, not yet released: resume without a new debit.
        assert!(matches!(
            ledger
                .t_admit("alice", "cases", "q1", [1; 32], 0.6, &l)
                .unwrap(),
            Admission::Resume(..)
        ));
        let mut resp = fedq_proto::v1::QueryResponse {
            query_id: "q1".into(),
            ..Default::default()
        };
        let head = ledger
            .t_record_release(&ask(("alice", "cases", "q1"), [1; 32], 0.0, &l), &mut resp)
            .unwrap();
        assert_eq!(resp.audit_head, Some(head.to_proto()));
        use prost::Message;
        assert_eq!(
            ledger
                .t_admit("alice", "cases", "q1", [1; 32], 0.6, &l)
                .unwrap(),
            Admission::Replay(resp.encode_to_vec())
        );
        // Bob hits the dataset total (1.5) before his own limit.
        ledger
            .t_admit("bob", "cases", "q1", [3; 32], 0.8, &l)
            .unwrap();
        let r = ledger
            .t_admit("bob", "cases", "q2", [4; 32], 0.2, &l)
            .unwrap_err();
        assert!(matches!(r, Refusal::DatasetBudget { .. }), "{r}");
    }

    /// Past the replay window a stored answer is removed; a retry of its id
    /// (Query, Prepare or Commit) is refused and spends nothing, a
    /// different query under it is still a reused id, and releases stored
    /// before the window existed expire a window after the upgrade.
    #[test]
    fn stored_answers_expire_after_the_replay_window_and_retries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = test_ledger(dir.path());
        let l = BudgetLimits {
            per_analyst: 10.0,
            total: 10.0,
            ..limits()
        };
        for id in ["q1", "q2"] {
            ledger
                .t_admit("alice", "cases", id, [1; 32], 0.5, &l)
                .unwrap();
            let mut resp = fedq_proto::v1::QueryResponse {
                query_id: id.into(),
                ..Default::default()
            };
            ledger
                .t_record_release(&ask(("alice", "cases", id), [1; 32], 0.0, &l), &mut resp)
                .unwrap();
        }
        // A release stored before the index existed (no `kept/` key).
        let legacy = QueryRecord {
            digest: [7; 32],
            state: RecordState::Released(vec![1, 2, 3]),
        };
        ledger
            .tree
            .insert(query_key("bob", "old"), legacy.encode())
            .unwrap();
        let before = unix_ms();
        // Nothing is older than a cutoff in the past.
        assert_eq!(ledger.expire_releases(before - 60_000).unwrap(), 0);
        assert!(matches!(
            ledger
                .t_admit("alice", "cases", "q1", [1; 32], 0.5, &l)
                .unwrap(),
            Admission::Replay(_)
        ));
        let spent = ledger.state("alice", "cases", &l).unwrap().spent_by_analyst;
        // Everything stored so far (the legacy one indexed as of now) is due.
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(ledger.expire_releases(unix_ms()).unwrap(), 3);
        assert_eq!(ledger.expire_releases(unix_ms()).unwrap(), 0, "done once");
        let r = ledger
            .t_admit("alice", "cases", "q1", [1; 32], 0.5, &l)
            .unwrap_err();
        assert!(
            matches!(&r, Refusal::ReplayExpired { query_id, released_ms } if query_id == "q1" && *released_ms <= before),
            "{r:?}"
        );
        let r = ledger
            .t_reserve(&ask(("alice", "cases", "q2"), [1; 32], 0.5, &l).expiring(before + 60_000))
            .unwrap_err();
        assert!(matches!(r, Refusal::ReplayExpired { .. }), "{r:?}");
        let r = ledger.t_commit("alice", "q2", before).unwrap_err();
        assert!(matches!(r, Refusal::ReplayExpired { .. }), "{r:?}");
        let r = ledger
            .t_admit("alice", "cases", "q1", [9; 32], 0.5, &l)
            .unwrap_err();
        assert_eq!(r, Refusal::IdReused("q1".into()));
        let r = ledger
            .t_admit("bob", "cases", "old", [7; 32], 0.5, &l)
            .unwrap_err();
        assert!(matches!(r, Refusal::ReplayExpired { .. }), "{r:?}");
        assert_eq!(
            ledger.state("alice", "cases", &l).unwrap().spent_by_analyst,
            spent,
            "refused retries spend nothing"
        );
        // What is kept of an expired release is its digest and time.
        let kept = ledger.tree.get(query_key("alice", "q1")).unwrap().unwrap();
        assert_eq!(kept.len(), 41);
        assert_eq!(ledger.tree.scan_prefix(KEPT_PREFIX).count(), 0);
    }

    #[test]
    fn a_zcdp_ledger_records_its_measure_and_states_rho() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = test_ledger(dir.path());
        let l = BudgetLimits {
            measure: Measure::Zcdp,
            delta: Some(1e-7),
            ..limits()
        };
        assert_eq!(ledger.recorded_measure("cases").unwrap(), None);
        // Before anything is spent, either measure may be configured.
        ledger.check_measures([("cases", Measure::Pure)]).unwrap();
        ledger
            .t_admit("alice", "cases", "q1", [1; 32], 0.25, &l)
            .unwrap();
        assert_eq!(
            ledger.recorded_measure("cases").unwrap(),
            Some(Measure::Zcdp)
        );
        ledger.check_measures([("cases", Measure::Zcdp)]).unwrap();
        let err = ledger
            .check_measures([("cases", Measure::Pure)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"cases\"") && err.contains("\"pure\"") && err.contains("\"zcdp\""),
            "{err}"
        );
        let entry = ledger.audit.entries(0).next().unwrap().unwrap();
        let Event::Debited {
            epsilon,
            rho,
            measure,
            analyst_spent,
            analyst_spent_equivalent,
            ..
        } = entry.event().unwrap()
        else {
            panic!("{:?}", entry.event)
        };
        assert_eq!(
            (epsilon.value(), rho.value(), measure.as_str()),
            (0.0, 0.25, "zcdp")
        );
        // The total in rho, and no equivalent: readers compute it from the
        // total and the logged delta (a conversion per debit was most of a
        // zCDP query's CPU).
        assert_eq!(analyst_spent.value(), 0.25);
        assert_eq!(analyst_spent_equivalent, None);
        // Refusals are stated in rho.
        let r = ledger
            .t_admit("alice", "cases", "q2", [2; 32], 0.8, &l)
            .unwrap_err();
        assert!(r.to_string().starts_with("rho 0.8 exceeds"), "{r}");
    }

    #[test]
    fn a_ledger_that_spent_before_zcdp_is_pure() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = test_ledger(dir.path());
        ledger
            .t_admit("alice", "cases", "q1", [1; 32], 0.25, &limits())
            .unwrap();
        // As a ledger written before measures were recorded.
        ledger.tree.remove(measure_key("cases")).unwrap();
        assert_eq!(
            ledger.recorded_measure("cases").unwrap(),
            Some(Measure::Pure)
        );
        assert!(ledger.check_measures([("cases", Measure::Zcdp)]).is_err());
    }

    #[test]
    fn rounding_never_lets_ten_tenths_exceed_one() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = test_ledger(dir.path());
        let l = BudgetLimits {
            keys_delta: None,
            keys_delta_per_analyst: None,
            keys_delta_total: None,
            per_analyst: 1.0,
            total: 10.0,
            per_query_max: 1.0,
            measure: Default::default(),
            delta: None,
        };
        let ok = (0..12)
            .filter(|i| {
                ledger
                    .t_admit("a", "d", &format!("q{i}"), [*i as u8; 32], 0.1, &l)
                    .is_ok()
            })
            .count();
        assert_eq!(ok, 10);
    }
}
