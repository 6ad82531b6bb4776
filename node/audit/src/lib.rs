//! `fedq-audit`: the audit log's format, what auditors and coordinators
//! need to read and check a node's log, with no server and no store in it
//! (a node's store of the log is `fedq_ledger::audit::AuditLog`).
//!
//! Every privacy-relevant event is an [`Entry`]: a sequence number, a
//! timestamp, the SHA-256 hash of the previous entry, an [`Event`], its own
//! hash and an ed25519 signature of that hash (DESIGN invariant 7). The
//! hash covers the entry's exported line up to and including the event,
//! as stored (format version 2: `fedq-audit-v2\0` and
//! `{"v":2,"seq":..,"time_ms":..,"prev":"..","event":RAW}`), so an auditor
//! holding only the public key and an export re-checks every link offline,
//! bit for bit ([`verify`]). Events hold no floats: amounts are decimal
//! strings ([`Decimal`]), finite by construction.
//!
//! **Architecture Invariant:** no exact aggregate and no raw value appears
//! in any event. Releases are logged by mechanism, scale, number of values
//! and the SHA-256 of the (noisy) response; refusals by their message, which
//! depends only on the query, the schema and the budget.
//!
//! The map:
//!
//! - this module: [`Event`] (with [`StandardVersion`]), [`Entry`],
//!   [`entry_hash`], [`Head`], [`AuditKey`] (the node's signing key and
//!   [`AuditKey::seal`], which makes the next entry), [`verify`],
//!   [`parse_public_key`], [`parse_head`].
//! - [`decimal`]: numbers in events as exact decimal strings.
//! - [`report`]: summaries of a verified log and the self-contained HTML
//!   report for auditors.

#![deny(missing_docs)]

pub mod decimal;
pub mod report;

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

pub use crate::decimal::Decimal;

/// The `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Budget limits of one dataset, as recorded at node start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetLimits {
    /// Dataset.
    pub dataset: String,
    /// Per-analyst limit (before grants).
    pub per_analyst: Decimal,
    /// Dataset total across analysts.
    pub total: Decimal,
    /// Per-query maximum.
    pub per_query_max: Decimal,
    /// `zcdp` when the limits are rho; empty for pure epsilon-DP (so the
    /// limits of pure datasets read as before).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub measure: String,
    /// zCDP: the delta of the stated (epsilon, delta) equivalents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<Decimal>,
}

/// The (epsilon, delta)-DP equivalent of an amount spent in a ledger's
/// measure: `(epsilon, 0)` for pure DP, OpenDP's zCDP conversion at the
/// dataset's configured delta for zCDP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Equivalent {
    /// Epsilon.
    pub epsilon: Decimal,
    /// Delta.
    pub delta: Decimal,
}

/// Serde helper: fields added after the first release are left out when
/// zero, so entries stay short and read like those written before them.
fn is_zero(x: &Decimal) -> bool {
    x.is_zero()
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
    /// A file was ingested into a dataset (all of it: an ingest is all or
    /// nothing). No row count: how many records a partner holds, or how
    /// many a file added, is an exact statistic (DESIGN invariant 7).
    Ingested {
        /// Dataset.
        dataset: String,
        /// Row count, in entries written before format version 2 only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rows: Option<u64>,
        /// Rows in the dataset after the ingest, in entries written before
        /// format version 2 only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rows_total: Option<u64>,
        /// SHA-256 of the ingested file.
        file_sha256: String,
    },
    /// A dataset's stored rows were translated, in place, to new columns
    /// (`fedq-node migrate`, a new minor version of its standard: columns
    /// and categories added, categories re-coded by label). Logged, and
    /// made durable, before the rows are replaced. The ledger is
    /// untouched. No row count: it is an exact statistic (see
    /// [`Event::Ingested`]).
    Migrated {
        /// Dataset.
        dataset: String,
        /// Digest of the schema the rows were stored under.
        from_schema: String,
        /// Digest of the schema they are stored under now.
        to_schema: String,
        /// The standard the dataset followed before, when it followed one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from_standard: Option<StandardVersion>,
        /// The standard it follows now, when it follows one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_standard: Option<StandardVersion>,
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
        epsilon: Decimal,
        /// Dry run (spends nothing).
        dry_run: bool,
        /// Requested rho (zCDP), if the query asked for rho.
        #[serde(default, skip_serializing_if = "is_zero")]
        rho: Decimal,
    },
    /// A query was refused; nothing was spent. Written before format
    /// version 2 only: refusals are now summarised ([`Event::Refusals`]).
    Refused {
        /// Analyst identity.
        analyst: String,
        /// Query id.
        query_id: String,
        /// The reason given to the analyst.
        reason: String,
    },
    /// Refused requests of one identity for one reason, summarised: one
    /// entry per identity, reason and window (a minute), so no flood of
    /// refusals can grow the log faster than that. Nothing was spent or
    /// released by any of them.
    Refusals {
        /// The caller's certificate name.
        identity: String,
        /// The caller's certificate role.
        role: String,
        /// The dataset the refused requests named, when it is one this
        /// node serves (empty otherwise).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        dataset: String,
        /// What was refused, as a stable kind (e.g. `invalid_request`,
        /// `budget`, `rate_limit`, `not_an_analyst`).
        reason: String,
        /// The first refusal's message (cut to a bounded length).
        example: String,
        /// The first refused request's query id (empty when it had none or
        /// it was invalid).
        first_query_id: String,
        /// How many requests were refused in the window.
        count: u64,
        /// When the first of them arrived (ms since the Unix epoch).
        first_ms: u64,
        /// When the last of them arrived.
        last_ms: u64,
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
        epsilon: Decimal,
        /// The analyst's total spent on the dataset after the debit.
        analyst_spent: Decimal,
        /// The dataset's total spent after the debit.
        dataset_spent: Decimal,
        /// The ledger's measure (`pure` or `zcdp`); empty in entries
        /// written before zCDP existed, which are all pure.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        measure: String,
        /// Rho debited, for a zCDP ledger (`epsilon` is then 0, and the
        /// spent totals are rho).
        #[serde(default, skip_serializing_if = "is_zero")]
        rho: Decimal,
        /// The (epsilon, delta) equivalent of the analyst's total spent on
        /// the dataset after this entry.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        analyst_spent_equivalent: Option<Equivalent>,
        /// Delta debited for a release of open-domain keys (the threshold
        /// mechanism's delta), on the dataset's released-key delta budget.
        #[serde(default, skip_serializing_if = "is_zero")]
        keys_delta: Decimal,
        /// The analyst's released-key delta spent on the dataset after it.
        #[serde(default, skip_serializing_if = "is_zero")]
        analyst_keys_delta_spent: Decimal,
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
        epsilon: Decimal,
        /// The analyst's total spent (reservations included) after it.
        analyst_spent: Decimal,
        /// The dataset's total spent after it.
        dataset_spent: Decimal,
        /// When it expires (ms since the Unix epoch).
        expires_ms: u64,
        /// The ledger's measure (`pure` or `zcdp`); empty in entries
        /// written before zCDP existed, which are all pure.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        measure: String,
        /// Rho debited, for a zCDP ledger (`epsilon` is then 0, and the
        /// spent totals are rho).
        #[serde(default, skip_serializing_if = "is_zero")]
        rho: Decimal,
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
        epsilon: Decimal,
        /// `cancelled` or `expired`.
        reason: String,
        /// The ledger's measure (empty: pure).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        measure: String,
        /// Rho returned, for a zCDP ledger.
        #[serde(default, skip_serializing_if = "is_zero")]
        rho: Decimal,
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
        /// A secure-aggregation release: the participant set its masked
        /// noise share was for. Absent otherwise (so other entries keep
        /// their form and hashes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secure: Option<SecureRound>,
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
        epsilon: Decimal,
        /// The analyst's total grants on the dataset after this one.
        granted_total: Decimal,
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
            Event::Migrated { .. } => "migrated",
            Event::QueryReceived { .. } => "query_received",
            Event::Refused { .. } => "refused",
            Event::Refusals { .. } => "refusals",
            Event::Debited { .. } => "debited",
            Event::Reserved { .. } => "reserved",
            Event::ReservationReturned { .. } => "reservation_returned",
            Event::Released { .. } => "released",
            Event::Replayed { .. } => "replayed",
            Event::BudgetGranted { .. } => "budget_granted",
        }
    }
}

/// A data standard's name and version, as a [`Event::Migrated`] entry
/// states them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandardVersion {
    /// The standard's name, e.g. `ctdc-cases`.
    pub name: String,
    /// Its version, `MAJOR.MINOR`.
    pub version: String,
}

/// The round a secure-aggregation release took part in: what an auditor
/// needs to see that the node added a share calibrated for `min_honest`
/// participants and answered one participant set only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureRound {
    /// SHA-256 (hex) of the participant set (`fedq_secagg`).
    pub participant_set: String,
    /// The participants' names, in order.
    pub participants: Vec<String>,
    /// The fewest honest participants the share is calibrated for.
    pub min_honest: u32,
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
    pub scale: Decimal,
    /// Epsilon of this measurement.
    pub epsilon: Decimal,
    /// Number of released values (cells).
    pub values: u64,
    /// Rho of this measurement (discrete Gaussian).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rho: Decimal,
}

/// The format version of the entries this node writes.
///
/// - 1: the hash covers `{"seq":..,"time_ms":..,"prev":"..","event":EVENT}`
///   after the context `fedq-audit-v1\0`; numbers in events were JSON
///   floats. Entries of version 1 carry no `v` field.
/// - 2: the entry starts with `"v":2`, the hash covers
///   `{"v":2,"seq":..,"time_ms":..,"prev":"..","event":EVENT}` after the
///   context `fedq-audit-v2\0`, and events hold no JSON float: amounts and
///   scales are decimal strings ([`Decimal`]).
///
/// In both, `EVENT` is the event's JSON exactly as stored and exported: the
/// hash is over those bytes, never over a re-encoding, so any program that
/// reads the export verifies it bit for bit (see [`Entry::hashed_text`]).
pub const FORMAT_VERSION: u32 = 2;

fn is_v1(v: &u32) -> bool {
    *v == 1
}

fn v1() -> u32 {
    1
}

/// One log entry, as stored and exported (one JSON line each).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The format version ([`FORMAT_VERSION`]; absent, hence 1, in entries
    /// written before versions were stated).
    #[serde(default = "v1", skip_serializing_if = "is_v1")]
    pub v: u32,
    /// Position in the log, from 0, without gaps.
    pub seq: u64,
    /// Milliseconds since the Unix epoch (node clock).
    pub time_ms: u64,
    /// Hash of the previous entry ([`GENESIS`] for seq 0).
    pub prev: String,
    /// What happened: the event's JSON, byte for byte as written (read it
    /// with [`Entry::event`]).
    pub event: Box<RawValue>,
    /// SHA-256 of [`Entry::hashed_text`] after the version's context (hex).
    pub hash: String,
    /// ed25519 signature of the hash bytes (hex).
    pub sig: String,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Entry) -> bool {
        (self.v, self.seq, self.time_ms, &self.prev, self.event.get())
            == (
                other.v,
                other.seq,
                other.time_ms,
                &other.prev,
                other.event.get(),
            )
            && (&self.hash, &self.sig) == (&other.hash, &other.sig)
    }
}

impl Entry {
    /// The typed event. Fails only for an event this version does not
    /// know (a newer node's), which still verifies: verification never
    /// needs the typed form.
    pub fn event(&self) -> Result<Event, serde_json::Error> {
        serde_json::from_str(self.event.get())
    }

    /// The text the hash covers (after the version's context): the entry's
    /// JSON up to and including its event, closed with `}`. This is the
    /// exported line with everything from `,"hash":` on replaced by `}`.
    pub fn hashed_text(&self) -> String {
        hashed_text(self.v, self.seq, self.time_ms, &self.prev, self.event.get())
    }
}

fn hashed_text(v: u32, seq: u64, time_ms: u64, prev: &str, event: &str) -> String {
    // `prev` is written as a JSON string, escaped as the entry's own
    // serialisation escapes it (a stored prev is 64 hex digits anyway).
    let prev = serde_json::to_string(prev).unwrap_or_default();
    let version = if v == 1 {
        String::new()
    } else {
        format!("\"v\":{v},")
    };
    format!("{{{version}\"seq\":{seq},\"time_ms\":{time_ms},\"prev\":{prev},\"event\":{event}}}")
}

/// The hash an entry of format `v` must carry, over its event's JSON text
/// `event` (see [`FORMAT_VERSION`]).
pub fn entry_hash(v: u32, seq: u64, time_ms: u64, prev: &str, event: &str) -> [u8; 32] {
    let context: &[u8] = if v == 1 {
        b"fedq-audit-v1\0"
    } else {
        b"fedq-audit-v2\0"
    };
    let mut h = Sha256::new();
    h.update(context);
    h.update(hashed_text(v, seq, time_ms, prev, event).as_bytes());
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

/// Why an audit key or a head could not be loaded, made or parsed (a
/// verification failure is a [`VerifyError`]). Each message names the
/// file or the text at fault.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The audit key file could not be read.
    #[error("cannot read the audit key {}: {error}", path.display())]
    ReadKey {
        /// The key file.
        path: PathBuf,
        /// The system's error.
        error: std::io::Error,
    },
    /// The audit key file does not hold a 32-byte hex seed.
    #[error("audit key {} is not 64 hex characters", path.display())]
    KeyNotHex {
        /// The key file.
        path: PathBuf,
    },
    /// The system gave no randomness for a new key.
    #[error("cannot get randomness for the audit key: {0}")]
    Randomness(getrandom::Error),
    /// The directory of a key file could not be created.
    #[error("cannot create the directory {}: {error}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The system's error.
        error: std::io::Error,
    },
    /// The new audit key could not be written.
    #[error("cannot write the audit key {}: {error}", path.display())]
    WriteKey {
        /// The key file.
        path: PathBuf,
        /// The system's error.
        error: std::io::Error,
    },
    /// The audit public key could not be written.
    #[error("cannot write the audit public key {}: {error}", path.display())]
    WritePublic {
        /// The public key file.
        path: PathBuf,
        /// The system's error.
        error: std::io::Error,
    },
    /// A public key is not hex.
    #[error("the public key is not hex")]
    PublicKeyNotHex,
    /// A public key has the wrong length.
    #[error("the public key must be 32 bytes (64 hex characters)")]
    PublicKeyLength,
    /// A public key is not a valid ed25519 point.
    #[error("invalid ed25519 public key: {0}")]
    PublicKeyInvalid(ed25519_dalek::SignatureError),
    /// A head is not written `SEQ:HASH`.
    #[error("a head is written SEQ:HASH, e.g. 41:9f86d0...")]
    HeadFormat,
    /// A head's sequence number is not a number.
    #[error("the head's sequence number {seq:?} is not a number")]
    HeadSeq {
        /// The text given as the sequence number.
        seq: String,
    },
    /// A head's hash is not 64 hex characters.
    #[error("the head's hash must be 64 hex characters")]
    HeadHash,
}

/// The node's audit signing key.
pub struct AuditKey {
    signing: SigningKey,
}

impl AuditKey {
    /// Loads the key from `key_path` (hex seed), or creates it there (mode
    /// 0600) on first start; (re)writes the public key (hex) to `pub_path`.
    pub fn load_or_create(key_path: &Path, pub_path: &Path) -> Result<AuditKey, AuditError> {
        let create_parent = |file: &Path| match file.parent() {
            Some(dir) => std::fs::create_dir_all(dir).map_err(|error| AuditError::CreateDir {
                path: dir.to_path_buf(),
                error,
            }),
            None => Ok(()),
        };
        let signing = if key_path.exists() {
            let text = std::fs::read_to_string(key_path).map_err(|error| AuditError::ReadKey {
                path: key_path.to_path_buf(),
                error,
            })?;
            let bytes = hex::decode(text.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| AuditError::KeyNotHex {
                    path: key_path.to_path_buf(),
                })?;
            SigningKey::from_bytes(&bytes)
        } else {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(AuditError::Randomness)?;
            create_parent(key_path)?;
            // Mode 0600 from its first byte, never world-readable.
            fedq_pki::write_secret(key_path, (hex::encode(seed) + "\n").as_bytes()).map_err(
                |error| AuditError::WriteKey {
                    path: key_path.to_path_buf(),
                    error,
                },
            )?;
            SigningKey::from_bytes(&seed)
        };
        let key = AuditKey { signing };
        let public = key.public_hex() + "\n";
        if std::fs::read_to_string(pub_path).ok().as_deref() != Some(public.as_str()) {
            create_parent(pub_path)?;
            std::fs::write(pub_path, public).map_err(|error| AuditError::WritePublic {
                path: pub_path.to_path_buf(),
                error,
            })?;
        }
        Ok(key)
    }

    /// Signs an entry hash computed elsewhere (an entry of an older format
    /// version, as the compatibility tests write them); [`AuditKey::seal`]
    /// is the way to make an entry.
    pub fn sign_hash(&self, hash: &[u8; 32]) -> Signature {
        self.signing.sign(hash)
    }

    /// The public key, hex.
    pub fn public_hex(&self) -> String {
        hex::encode(self.signing.verifying_key().to_bytes())
    }

    /// Builds the next entry after `head`, in the current format.
    pub fn seal(&self, head: Option<&Head>, event: &Event) -> Result<Entry, serde_json::Error> {
        let (seq, prev) = match head {
            Some(h) => (h.seq + 1, h.hash.clone()),
            None => (0, GENESIS.to_string()),
        };
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let event = RawValue::from_string(serde_json::to_string(event)?)?;
        let hash = entry_hash(FORMAT_VERSION, seq, time_ms, &prev, event.get());
        let sig = self.signing.sign(&hash);
        Ok(Entry {
            v: FORMAT_VERSION,
            seq,
            time_ms,
            prev,
            event,
            hash: hex::encode(hash),
            sig: hex::encode(sig.to_bytes()),
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
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, AuditError> {
    let bytes = hex::decode(text.trim()).map_err(|_| AuditError::PublicKeyNotHex)?;
    let arr = <[u8; 32]>::try_from(bytes).map_err(|_| AuditError::PublicKeyLength)?;
    VerifyingKey::from_bytes(&arr).map_err(AuditError::PublicKeyInvalid)
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
        if e.v == 0 || e.v > FORMAT_VERSION {
            return Err(bad(format!(
                "format version {} is unknown to this verifier (it knows 1 to {FORMAT_VERSION}); verify with the fedq-node release that wrote it, or a newer one",
                e.v
            )));
        }
        let computed = hex::encode(entry_hash(e.v, e.seq, e.time_ms, &e.prev, e.event.get()));
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
pub fn parse_head(s: &str) -> Result<(u64, String), AuditError> {
    let (seq, hash) = s.split_once(':').ok_or(AuditError::HeadFormat)?;
    let seq = seq.trim().parse().map_err(|_| AuditError::HeadSeq {
        seq: seq.to_string(),
    })?;
    if hash.len() != 64 || hex::decode(hash).is_err() {
        return Err(AuditError::HeadHash);
    }
    Ok((seq, hash.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `migrated` event's JSON is part of the export format: an
    /// auditor's program reads these exact keys, and an entry carrying it
    /// verifies like any other.
    #[test]
    fn a_migrated_entry_has_its_documented_shape_and_verifies() {
        let digest = |c: char| c.to_string().repeat(64);
        let event = Event::Migrated {
            dataset: "cases".into(),
            from_schema: digest('a'),
            to_schema: digest('b'),
            from_standard: Some(StandardVersion {
                name: "ctdc-cases".into(),
                version: "1.0".into(),
            }),
            to_standard: Some(StandardVersion {
                name: "ctdc-cases".into(),
                version: "1.1".into(),
            }),
        };
        assert_eq!(
            serde_json::to_string(&event).unwrap(),
            format!(
                "{{\"type\":\"migrated\",\"dataset\":\"cases\",\"from_schema\":\"{}\",\"to_schema\":\"{}\",\
                 \"from_standard\":{{\"name\":\"ctdc-cases\",\"version\":\"1.0\"}},\
                 \"to_standard\":{{\"name\":\"ctdc-cases\",\"version\":\"1.1\"}}}}",
                digest('a'),
                digest('b')
            )
        );
        assert_eq!(event.kind(), "migrated");
        // Without a standard, the keys are left out.
        let plain = Event::Migrated {
            dataset: "cases".into(),
            from_schema: digest('a'),
            to_schema: digest('b'),
            from_standard: None,
            to_standard: None,
        };
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("standard"), "{json}");
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), plain);

        let key = AuditKey {
            signing: SigningKey::from_bytes(&[7; 32]),
        };
        let first = key.seal(None, &plain).unwrap();
        let head = Head {
            seq: first.seq,
            hash: first.hash.clone(),
            sig: first.sig.clone(),
        };
        let second = key.seal(Some(&head), &event).unwrap();
        let export = [&first, &second]
            .iter()
            .map(|e| serde_json::to_string(e).unwrap())
            .collect::<Vec<_>>()
            .join("\n");
        let public = parse_public_key(&key.public_hex()).unwrap();
        let verified = verify(&export, &public, 0, None).unwrap();
        assert_eq!(verified.entries, 2);
        let read: Entry = serde_json::from_str(export.lines().nth(1).unwrap()).unwrap();
        assert_eq!(read.event().unwrap(), event);
    }
}
