//! The tamper-evident audit log: every privacy-relevant event, hash-chained
//! and signed with the node's ed25519 audit key (DESIGN invariant 7).
//!
//! Each [`Entry`] has a sequence number, a timestamp, the SHA-256 hash of the
//! previous entry, an [`Event`], its own hash and a signature of that hash.
//! The hash covers `seq`, `time_ms`, `prev` and `event` in their canonical
//! JSON form, so an auditor holding only the public key and an export can
//! re-check every link offline ([`verify`]).
//!
//! Appends happen inside sled transactions that read and advance the log's
//! head, so concurrent appends serialise and the chain never forks; the
//! ledger appends its debit and release entries inside the same
//! transaction as the ledger write they record.
//!
//! **Architecture Invariant:** no exact aggregate and no raw value appears
//! in any event. Releases are logged by mechanism, scale, number of values
//! and the SHA-256 of the (noisy) response; refusals by their message, which
//! depends only on the query, the schema and the budget.
//!
//! Tree `audit`: `head` → JSON [`Head`]; `e` + seq (u64 BE) → JSON [`Entry`].

use std::path::Path;

use anyhow::{anyhow, bail, Context};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sled::transaction::{ConflictableTransactionError, UnabortableTransactionError};

/// The `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Domain separation for entry hashes.
const HASH_CONTEXT: &[u8] = b"fedq-audit-v1\0";

/// Budget limits of one dataset, as recorded at node start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetLimits {
    /// Dataset.
    pub dataset: String,
    /// Per-analyst limit (before grants).
    pub per_analyst: f64,
    /// Dataset total across analysts.
    pub total: f64,
    /// Per-query maximum.
    pub per_query_max: f64,
    /// `zcdp` when the limits are rho; empty for pure epsilon-DP (so the
    /// limits of pure datasets read as before).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub measure: String,
    /// zCDP: the delta of the stated (epsilon, delta) equivalents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
}

/// The (epsilon, delta)-DP equivalent of an amount spent in a ledger's
/// measure: `(epsilon, 0)` for pure DP, OpenDP's zCDP conversion at the
/// dataset's configured delta for zCDP.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Equivalent {
    /// Epsilon.
    pub epsilon: f64,
    /// Delta.
    pub delta: f64,
}

/// Serde helper: fields added after the first release are left out when
/// zero, so entries written before them hash the same.
fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// A privacy-relevant event. Field names are part of the export format.
/// Fields added later are `#[serde(default, skip_serializing_if)]`, so
/// entries written before them still verify.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// The node started serving.
    NodeStarted {
        /// Software version.
        version: String,
        /// SHA-256 of the node.toml text.
        config_sha256: String,
        /// The audit public key (hex).
        audit_public_key: String,
        /// Budget limits in force.
        limits: Vec<DatasetLimits>,
    },
    /// A dataset's budget limits differ from those in force at the previous
    /// start (recorded at start, right after `node_started`).
    LimitsChanged {
        /// Dataset.
        dataset: String,
        /// Limits before (none if the dataset is new).
        before: Option<DatasetLimits>,
        /// Limits now.
        after: DatasetLimits,
    },
    /// Rows were ingested.
    Ingested {
        /// Dataset.
        dataset: String,
        /// Rows added.
        rows: u64,
        /// Rows in the dataset after the ingest.
        rows_total: u64,
        /// SHA-256 of the ingested file.
        file_sha256: String,
    },
    /// A query arrived (before any check).
    QueryReceived {
        /// Analyst identity (certificate CN).
        analyst: String,
        /// Coordinator's query id.
        query_id: String,
        /// Dataset named in FROM, if it could be parsed.
        dataset: String,
        /// The SQL text.
        sql: String,
        /// Requested epsilon.
        epsilon: f64,
        /// Dry run (spends nothing).
        dry_run: bool,
        /// Requested rho (zCDP), if the query asked for rho.
        #[serde(default, skip_serializing_if = "is_zero")]
        rho: f64,
    },
    /// A query was refused; nothing was spent.
    Refused {
        /// Analyst identity.
        analyst: String,
        /// Query id.
        query_id: String,
        /// The reason given to the analyst.
        reason: String,
    },
    /// Budget was debited (in the same commit as the ledger).
    Debited {
        /// Analyst identity.
        analyst: String,
        /// Query id.
        query_id: String,
        /// Dataset.
        dataset: String,
        /// Epsilon debited (pure ledger).
        epsilon: f64,
        /// The analyst's total spent on the dataset after the debit.
        analyst_spent: f64,
        /// The dataset's total spent after the debit.
        dataset_spent: f64,
        /// The ledger's measure (`pure` or `zcdp`); empty in entries
        /// written before zCDP existed, which are all pure.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        measure: String,
        /// Rho debited, for a zCDP ledger (`epsilon` is then 0, and the
        /// spent totals are rho).
        #[serde(default, skip_serializing_if = "is_zero")]
        rho: f64,
        /// The (epsilon, delta) equivalent of the analyst's total spent on
        /// the dataset after this entry.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        analyst_spent_equivalent: Option<Equivalent>,
        /// Delta debited for a release of open-domain keys (the threshold
        /// mechanism's delta), on the dataset's released-key delta budget.
        #[serde(default, skip_serializing_if = "is_zero")]
        keys_delta: f64,
        /// The analyst's released-key delta spent on the dataset after it.
        #[serde(default, skip_serializing_if = "is_zero")]
        analyst_keys_delta_spent: f64,
    },
    /// Budget was reserved by a two-phase Prepare (a debit until committed,
    /// cancelled or expired).
    Reserved {
        /// Analyst identity.
        analyst: String,
        /// Query id.
        query_id: String,
        /// Dataset.
        dataset: String,
        /// Epsilon reserved.
        epsilon: f64,
        /// The analyst's total spent (reservations included) after it.
        analyst_spent: f64,
        /// The dataset's total spent after it.
        dataset_spent: f64,
        /// When it expires (ms since the Unix epoch).
        expires_ms: u64,
        /// The ledger's measure (`pure` or `zcdp`); empty in entries
        /// written before zCDP existed, which are all pure.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        measure: String,
        /// Rho debited, for a zCDP ledger (`epsilon` is then 0, and the
        /// spent totals are rho).
        #[serde(default, skip_serializing_if = "is_zero")]
        rho: f64,
        /// The (epsilon, delta) equivalent of the analyst's total spent on
        /// the dataset after this entry.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        analyst_spent_equivalent: Option<Equivalent>,
    },
    /// A reservation's budget came back: cancelled by the coordinator, or
    /// expired without a Commit. Nothing was released under it.
    ReservationReturned {
        /// Analyst identity.
        analyst: String,
        /// Query id.
        query_id: String,
        /// Dataset.
        dataset: String,
        /// Epsilon returned.
        epsilon: f64,
        /// `cancelled` or `expired`.
        reason: String,
        /// The ledger's measure (empty: pure).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        measure: String,
        /// Rho returned, for a zCDP ledger.
        #[serde(default, skip_serializing_if = "is_zero")]
        rho: f64,
    },
    /// Noisy values were released (in the same commit as the stored response).
    Released {
        /// Analyst identity.
        analyst: String,
        /// Query id.
        query_id: String,
        /// Dataset.
        dataset: String,
        /// One per measurement: label, mechanism, scale, epsilon, number of values.
        measurements: Vec<ReleasedMeasurement>,
        /// SHA-256 of the encoded response sent.
        response_sha256: String,
        /// Where the exact aggregates were computed when not in the node's
        /// own store: `postgres`. Absent for the embedded store (so entries
        /// written before sources existed keep their form and hashes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<String>,
    },
    /// A retried query id was answered from the stored release; nothing spent.
    Replayed {
        /// Analyst identity.
        analyst: String,
        /// Query id.
        query_id: String,
    },
    /// An administrator raised an analyst's limit on a dataset.
    BudgetGranted {
        /// Analyst identity.
        analyst: String,
        /// Dataset.
        dataset: String,
        /// Epsilon added to the analyst's limit.
        epsilon: f64,
        /// The analyst's total grants on the dataset after this one.
        granted_total: f64,
        /// The ledger's measure (empty: pure); for zCDP the amounts are rho.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        measure: String,
    },
}

impl Event {
    /// The event's `type` tag.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::NodeStarted { .. } => "node_started",
            Event::LimitsChanged { .. } => "limits_changed",
            Event::Ingested { .. } => "ingested",
            Event::QueryReceived { .. } => "query_received",
            Event::Refused { .. } => "refused",
            Event::Debited { .. } => "debited",
            Event::Reserved { .. } => "reserved",
            Event::ReservationReturned { .. } => "reservation_returned",
            Event::Released { .. } => "released",
            Event::Replayed { .. } => "replayed",
            Event::BudgetGranted { .. } => "budget_granted",
        }
    }
}

/// What the log says about one released measurement (never its values).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleasedMeasurement {
    /// e.g. `COUNT(*)`.
    pub label: String,
    /// e.g. `discrete_laplace`.
    pub mechanism: String,
    /// Noise scale.
    pub scale: f64,
    /// Epsilon of this measurement.
    pub epsilon: f64,
    /// Number of released values (cells).
    pub values: u64,
    /// Rho of this measurement (discrete Gaussian).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rho: f64,
}

/// One log entry, as stored and exported (one JSON line each).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Position in the log, from 0, without gaps.
    pub seq: u64,
    /// Milliseconds since the Unix epoch (node clock).
    pub time_ms: u64,
    /// Hash of the previous entry ([`GENESIS`] for seq 0).
    pub prev: String,
    /// What happened.
    pub event: Event,
    /// SHA-256 of the canonical form of the four fields above (hex).
    pub hash: String,
    /// ed25519 signature of the hash bytes (hex).
    pub sig: String,
}

#[derive(Serialize)]
struct Canonical<'a> {
    seq: u64,
    time_ms: u64,
    prev: &'a str,
    event: &'a Event,
}

/// The hash an entry must carry.
pub fn entry_hash(seq: u64, time_ms: u64, prev: &str, event: &Event) -> [u8; 32] {
    let body = serde_json::to_vec(&Canonical {
        seq,
        time_ms,
        prev,
        event,
    })
    .unwrap_or_default();
    let mut h = Sha256::new();
    h.update(HASH_CONTEXT);
    h.update(&body);
    h.finalize().into()
}

/// The latest entry's position and hash, plus its signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// Sequence number of the latest entry.
    pub seq: u64,
    /// Its hash (hex).
    pub hash: String,
    /// Its signature (hex).
    pub sig: String,
}

impl Head {
    /// As sent in responses.
    pub fn to_proto(&self) -> fedq_proto::v1::AuditHead {
        fedq_proto::v1::AuditHead {
            seq: self.seq,
            hash: self.hash.clone(),
            signature: self.sig.clone(),
        }
    }
}

/// The node's audit signing key.
pub struct AuditKey {
    signing: SigningKey,
}

impl AuditKey {
    /// Loads the key from `key_path` (hex seed), or creates it there (mode
    /// 0600) on first start; (re)writes the public key (hex) to `pub_path`.
    pub fn load_or_create(key_path: &Path, pub_path: &Path) -> anyhow::Result<AuditKey> {
        let signing = if key_path.exists() {
            let text = std::fs::read_to_string(key_path)
                .with_context(|| format!("cannot read the audit key {}", key_path.display()))?;
            let bytes = hex::decode(text.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    anyhow!("audit key {} is not 64 hex characters", key_path.display())
                })?;
            SigningKey::from_bytes(&bytes)
        } else {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed)
                .map_err(|e| anyhow!("cannot get randomness for the audit key: {e}"))?;
            if let Some(dir) = key_path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(key_path, hex::encode(seed) + "\n")
                .with_context(|| format!("cannot write the audit key {}", key_path.display()))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(key_path, std::fs::Permissions::from_mode(0o600))?;
            }
            SigningKey::from_bytes(&seed)
        };
        let key = AuditKey { signing };
        let public = key.public_hex() + "\n";
        if std::fs::read_to_string(pub_path).ok().as_deref() != Some(public.as_str()) {
            if let Some(dir) = pub_path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(pub_path, public).with_context(|| {
                format!("cannot write the audit public key {}", pub_path.display())
            })?;
        }
        Ok(key)
    }

    /// The public key, hex.
    pub fn public_hex(&self) -> String {
        hex::encode(self.signing.verifying_key().to_bytes())
    }

    /// Builds the next entry after `head`.
    fn seal(&self, head: Option<&Head>, event: Event) -> Entry {
        let (seq, prev) = match head {
            Some(h) => (h.seq + 1, h.hash.clone()),
            None => (0, GENESIS.to_string()),
        };
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let hash = entry_hash(seq, time_ms, &prev, &event);
        let sig = self.signing.sign(&hash);
        Entry {
            seq,
            time_ms,
            prev,
            event,
            hash: hex::encode(hash),
            sig: hex::encode(sig.to_bytes()),
        }
    }
}

fn entry_key(seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'e';
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Appends `event` inside a transaction on the `audit` tree, returning the
/// new head. Call it from within a (possibly multi-tree) sled transaction.
pub fn append_in<E>(
    tx: &impl crate::journal::Kv,
    key: &AuditKey,
    event: Event,
) -> Result<Head, ConflictableTransactionError<E>> {
    let head: Option<Head> = tx
        .get("head")?
        .and_then(|v| serde_json::from_slice(&v).ok());
    let entry = key.seal(head.as_ref(), event);
    let bytes = serde_json::to_vec(&entry).map_err(|e| {
        UnabortableTransactionError::Storage(sled::Error::Unsupported(e.to_string()))
    })?;
    tx.insert(&entry_key(entry.seq), bytes)?;
    let new_head = Head {
        seq: entry.seq,
        hash: entry.hash,
        sig: entry.sig,
    };
    let head_bytes = serde_json::to_vec(&new_head).map_err(|e| {
        UnabortableTransactionError::Storage(sled::Error::Unsupported(e.to_string()))
    })?;
    tx.insert("head", head_bytes)?;
    Ok(new_head)
}

/// The audit log over the store's `audit` tree.
pub struct AuditLog {
    /// The tree.
    pub tree: sled::Tree,
    /// The signing key.
    pub key: AuditKey,
    /// Held by every append made outside a sled transaction's conflict
    /// detection (see [`AuditLog::appending`]).
    appending: std::sync::Mutex<()>,
}

impl AuditLog {
    /// The log in `tree`, signed with `key`.
    pub fn new(tree: sled::Tree, key: AuditKey) -> AuditLog {
        AuditLog {
            tree,
            key,
            appending: std::sync::Mutex::new(()),
        }
    }

    /// Excludes every other append of this process while held. The
    /// ledger's journaled writes ([`crate::journal`]) hold it while they
    /// read the head and write after it, since sled cannot detect their
    /// conflict with an append made in a transaction; [`AuditLog::append`]
    /// and [`AuditLog::append_all`] hold it too.
    pub fn appending(&self) -> std::sync::MutexGuard<'_, ()> {
        self.appending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one event on its own (not tied to a ledger write).
    pub fn append(&self, event: Event) -> anyhow::Result<Head> {
        let _appending = self.appending();
        self.tree
            .transaction(|tx| append_in::<()>(tx, &self.key, event.clone()))
            .map_err(|e| anyhow!("cannot append to the audit log: {e:?}"))
    }

    /// Appends `events`, in order, in one commit (all or none).
    pub fn append_all(&self, events: &[Event]) -> anyhow::Result<Option<Head>> {
        let _appending = self.appending();
        self.tree
            .transaction(|tx| {
                let mut head = None;
                for event in events {
                    head = Some(append_in::<()>(tx, &self.key, event.clone())?);
                }
                Ok(head)
            })
            .map_err(|e| anyhow!("cannot append to the audit log: {e:?}"))
    }

    /// The limits recorded by the latest `node_started` entry, if any.
    pub fn last_limits(&self) -> anyhow::Result<Option<Vec<DatasetLimits>>> {
        for item in self.tree.range(entry_key(0)..).rev() {
            let (k, v) = item?;
            if k.first() != Some(&b'e') {
                continue;
            }
            let e: Entry = serde_json::from_slice(&v)
                .map_err(|e| anyhow!("a stored audit entry is unreadable: {e}"))?;
            if let Event::NodeStarted { limits, .. } = e.event {
                return Ok(Some(limits));
            }
        }
        Ok(None)
    }

    /// The latest head, if the log is not empty.
    pub fn head(&self) -> anyhow::Result<Option<Head>> {
        Ok(self
            .tree
            .get("head")?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Entries from `since` on, in order.
    pub fn entries(&self, since: u64) -> impl Iterator<Item = anyhow::Result<Entry>> + '_ {
        self.tree
            .range(entry_key(since)..)
            .filter(|r| {
                r.as_ref()
                    .map(|(k, _)| k.first() == Some(&b'e'))
                    .unwrap_or(true)
            })
            .map(|r| {
                let (_, v) = r?;
                serde_json::from_slice::<Entry>(&v)
                    .map_err(|e| anyhow!("a stored audit entry is unreadable: {e}"))
            })
    }
}

/// A verification failure, naming the first bad entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line} (entry seq {seq}): {reason}")]
pub struct VerifyError {
    /// 1-based line of the export.
    pub line: usize,
    /// The sequence number expected or found there.
    pub seq: u64,
    /// What is wrong.
    pub reason: String,
}

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Entries checked.
    pub entries: u64,
    /// The last entry's head.
    pub last: Option<(u64, String)>,
}

/// Parses a hex ed25519 public key (as written to `audit.pub`).
pub fn parse_public_key(text: &str) -> anyhow::Result<VerifyingKey> {
    let bytes = hex::decode(text.trim()).map_err(|_| anyhow!("the public key is not hex"))?;
    let arr = <[u8; 32]>::try_from(bytes)
        .map_err(|_| anyhow!("the public key must be 32 bytes (64 hex characters)"))?;
    VerifyingKey::from_bytes(&arr).map_err(|e| anyhow!("invalid ed25519 public key: {e}"))
}

/// Verifies an export (JSON lines) against `public`: consecutive sequence
/// numbers from `since`, each `prev` equal to the previous hash (or
/// [`GENESIS`] at 0), each hash recomputed from the contents, each signature
/// valid; and, when `head` is given, that the log reaches that sequence
/// number with that hash (so truncation below a known head is caught).
pub fn verify(
    export: &str,
    public: &VerifyingKey,
    since: u64,
    head: Option<(u64, &str)>,
) -> Result<Verified, VerifyError> {
    let mut expected_seq = since;
    let mut prev: Option<String> = None;
    let mut count = 0u64;
    let mut head_seen = false;
    for (i, line) in export.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| VerifyError {
            line: line_no,
            seq: expected_seq,
            reason,
        };
        let e: Entry = serde_json::from_str(line)
            .map_err(|err| bad(format!("not a valid audit entry ({err})")))?;
        if e.seq != expected_seq {
            return Err(bad(format!(
                "sequence number {} where {expected_seq} was expected (an entry was deleted, inserted or reordered)",
                e.seq
            )));
        }
        match &prev {
            Some(p) if &e.prev != p => {
                return Err(bad(
                    "its prev hash does not match the previous entry's hash (the chain is broken)"
                        .into(),
                ))
            }
            None if e.seq == 0 && e.prev != GENESIS => {
                return Err(bad("the first entry's prev is not the genesis hash".into()))
            }
            _ => {}
        }
        let computed = hex::encode(entry_hash(e.seq, e.time_ms, &e.prev, &e.event));
        if computed != e.hash {
            return Err(bad(
                "its hash does not match its contents (the entry was edited)".into(),
            ));
        }
        let sig = hex::decode(&e.sig)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .map(|b| Signature::from_bytes(&b))
            .ok_or_else(|| bad("its signature is malformed".into()))?;
        let hash_bytes = hex::decode(&e.hash).map_err(|_| bad("its hash is not hex".into()))?;
        public
            .verify(&hash_bytes, &sig)
            .map_err(|_| bad("its signature does not verify with this public key (forged or signed by another key)".into()))?;
        if let Some((hs, hh)) = head {
            if e.seq == hs {
                if e.hash != hh {
                    return Err(bad(format!("the known head {hs}:{hh} has a different hash here (history was rewritten)")));
                }
                head_seen = true;
            }
        }
        prev = Some(e.hash.clone());
        expected_seq += 1;
        count += 1;
    }
    if let Some((hs, _)) = head {
        if !head_seen {
            return Err(VerifyError {
                line: export.lines().count() + 1,
                seq: expected_seq,
                reason: format!(
                    "the log ends before the known head at seq {hs} (it was truncated)"
                ),
            });
        }
    }
    if count == 0 && since == 0 && head.is_none() {
        // An empty export verifies trivially; say so rather than succeed silently.
        return Ok(Verified {
            entries: 0,
            last: None,
        });
    }
    Ok(Verified {
        entries: count,
        last: prev.map(|h| (expected_seq - 1, h)),
    })
}

/// Parses `SEQ:HASH` (as printed by `fedq audit` and in responses).
pub fn parse_head(s: &str) -> anyhow::Result<(u64, String)> {
    let (seq, hash) = s
        .split_once(':')
        .ok_or_else(|| anyhow!("a head is written SEQ:HASH, e.g. 41:9f86d0..."))?;
    let seq = seq
        .trim()
        .parse()
        .map_err(|_| anyhow!("the head's sequence number {seq:?} is not a number"))?;
    if hash.len() != 64 || hex::decode(hash).is_err() {
        bail!("the head's hash must be 64 hex characters");
    }
    Ok((seq, hash.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_from_before_zcdp_hash_as_they_did() {
        // A debit line as written before the zCDP fields existed: it reads
        // back with defaults and serialises to the same bytes, so its hash
        // (and every later link) still verifies.
        let old = r#"{"type":"debited","analyst":"a","query_id":"q","dataset":"d","epsilon":0.5,"analyst_spent":0.5,"dataset_spent":0.5}"#;
        let event: Event = serde_json::from_str(old).unwrap();
        assert_eq!(serde_json::to_string(&event).unwrap(), old);
        // A zCDP debit states its measure, rho and (epsilon, delta).
        let new = Event::Debited {
            keys_delta: 0.0,
            analyst_keys_delta_spent: 0.0,
            analyst: "a".into(),
            query_id: "q".into(),
            dataset: "d".into(),
            epsilon: 0.0,
            analyst_spent: 0.1,
            dataset_spent: 0.1,
            measure: "zcdp".into(),
            rho: 0.1,
            analyst_spent_equivalent: Some(Equivalent {
                epsilon: 2.5,
                delta: 1e-7,
            }),
        };
        let json = serde_json::to_string(&new).unwrap();
        assert!(
            json.contains(r#""measure":"zcdp","rho":0.1,"analyst_spent_equivalent":{"epsilon":2.5,"delta":1e-7}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), new);
    }

    fn log_with(n: usize) -> (tempfile::TempDir, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .unwrap();
        let key =
            AuditKey::load_or_create(&dir.path().join("audit.key"), &dir.path().join("audit.pub"))
                .unwrap();
        let log = AuditLog::new(db.open_tree("audit").unwrap(), key);
        for i in 0..n {
            log.append(Event::Replayed {
                analyst: format!("a{i}"),
                query_id: format!("q{i}"),
            })
            .unwrap();
        }
        (dir, log)
    }

    fn export(log: &AuditLog) -> Vec<String> {
        log.entries(0)
            .map(|e| serde_json::to_string(&e.unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn key_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let (k, p) = (dir.path().join("k"), dir.path().join("p"));
        let a = AuditKey::load_or_create(&k, &p).unwrap().public_hex();
        let b = AuditKey::load_or_create(&k, &p).unwrap().public_hex();
        assert_eq!(a, b);
        assert_eq!(std::fs::read_to_string(&p).unwrap().trim(), a);
    }

    #[test]
    fn intact_log_verifies_and_every_tampering_is_named() {
        let (dir, log) = log_with(6);
        let public =
            parse_public_key(&std::fs::read_to_string(dir.path().join("audit.pub")).unwrap())
                .unwrap();
        let lines = export(&log);
        let head = log.head().unwrap().unwrap();
        let ok = verify(&lines.join("\n"), &public, 0, Some((head.seq, &head.hash))).unwrap();
        assert_eq!(ok.entries, 6);

        let check =
            |tampered: Vec<String>, head: Option<(u64, &str)>, line: usize, needle: &str| {
                let e = verify(&tampered.join("\n"), &public, 0, head).unwrap_err();
                assert_eq!(e.line, line, "{e}");
                assert!(e.reason.contains(needle), "{e}");
            };
        // Edit a field.
        let mut t = lines.clone();
        t[2] = t[2].replace("\"a2\"", "\"b2\"");
        check(t, None, 3, "edited");
        // Delete an entry.
        let mut t = lines.clone();
        t.remove(3);
        check(t, None, 4, "sequence number 4 where 3");
        // Swap two.
        let mut t = lines.clone();
        t.swap(1, 2);
        check(t, None, 2, "sequence number 2 where 1");
        // Append a forged entry signed by another key.
        let (_d2, other) = log_with(0);
        let forged = other.key.seal(
            Some(&head),
            Event::Replayed {
                analyst: "x".into(),
                query_id: "y".into(),
            },
        );
        let mut t = lines.clone();
        t.push(serde_json::to_string(&forged).unwrap());
        check(t, None, 7, "signature");
        // Truncate below a known head.
        let t = lines[..4].to_vec();
        check(t, Some((head.seq, &head.hash)), 5, "truncated");
        // Delete the first entry of a full export.
        check(lines[1..].to_vec(), None, 1, "sequence number 1 where 0");
    }
}
