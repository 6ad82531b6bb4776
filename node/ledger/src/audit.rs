//! The node's store of its audit log (the `audit` tree): appends inside
//! the ledger's writes and on their own, the head, and the stored lines an
//! export streams. The format (entries, events, hashing, signing and the
//! verifier) is [`fedq_audit`], re-exported here.
//!
//! Appends happen inside sled transactions (or the ledger's journaled
//! writes, under [`AuditLog::appending`]) that read and advance the log's
//! head, so concurrent appends serialise and the chain never forks; the
//! ledger appends its debit and release entries inside the same write as
//! the ledger change they record.
//!
//! Tree `audit`: `head` → JSON [`Head`]; `e` + seq (u64 BE) → JSON [`Entry`].

use sled::transaction::{
    ConflictableTransactionError, TransactionError, UnabortableTransactionError,
};

use crate::store::StoreError;

pub use fedq_audit::*;

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
    let entry = key.seal(head.as_ref(), &event).map_err(|e| {
        UnabortableTransactionError::Storage(sled::Error::Unsupported(e.to_string()))
    })?;
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

/// The storage error of a sled transaction that never aborts (its only
/// failures are storage failures).
pub(crate) fn storage(e: TransactionError<()>) -> sled::Error {
    match e {
        TransactionError::Storage(e) => e,
        TransactionError::Abort(()) => {
            sled::Error::ReportableBug("a write that never aborts was aborted".into())
        }
    }
}

/// A stored audit entry this build cannot read.
fn unreadable(why: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        what: "a stored audit entry is unreadable".into(),
        why: why.to_string(),
    }
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
    /// The store's failure flag: once a commit or flush failed, appends
    /// are refused too, so nothing is written after a partial write.
    fault: crate::fault::Fault,
}

impl AuditLog {
    /// The log in `tree`, signed with `key`.
    pub fn new(tree: sled::Tree, key: AuditKey) -> AuditLog {
        AuditLog {
            tree,
            key,
            appending: std::sync::Mutex::new(()),
            fault: crate::fault::Fault::default(),
        }
    }

    /// Refuses appends once `fault` (the store's) is set.
    pub fn with_fault(mut self, fault: crate::fault::Fault) -> AuditLog {
        self.fault = fault;
        self
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
    pub fn append(&self, event: Event) -> Result<Head, StoreError> {
        let _appending = self.appending();
        self.fault.check()?;
        self.tree
            .transaction(|tx| append_in::<()>(tx, &self.key, event.clone()))
            .map_err(|e| StoreError::Write {
                what: "cannot append to the audit log",
                error: storage(e),
            })
    }

    /// Appends `events`, in order, in one commit (all or none).
    pub fn append_all(&self, events: &[Event]) -> Result<Option<Head>, StoreError> {
        let _appending = self.appending();
        self.fault.check()?;
        self.tree
            .transaction(|tx| {
                let mut head = None;
                for event in events {
                    head = Some(append_in::<()>(tx, &self.key, event.clone())?);
                }
                Ok(head)
            })
            .map_err(|e| StoreError::Write {
                what: "cannot append to the audit log",
                error: storage(e),
            })
    }

    /// The limits recorded by the latest `node_started` entry, if any.
    pub fn last_limits(&self) -> Result<Option<Vec<DatasetLimits>>, StoreError> {
        for item in self.tree.range(entry_key(0)..).rev() {
            let (k, v) = item?;
            if k.first() != Some(&b'e') {
                continue;
            }
            let e: Entry = serde_json::from_slice(&v).map_err(unreadable)?;
            // An event this version cannot read (a newer node's) is not
            // a start record it could compare limits with.
            if let Ok(Event::NodeStarted { limits, .. }) = e.event() {
                return Ok(Some(limits));
            }
        }
        Ok(None)
    }

    /// The latest head, if the log is not empty.
    pub fn head(&self) -> Result<Option<Head>, StoreError> {
        Ok(self
            .tree
            .get("head")?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Entries from `since` on, in order, as the JSON lines stored (and
    /// exported: an export is these bytes, so it verifies bit for bit).
    pub fn lines(&self, since: u64) -> impl Iterator<Item = Result<String, StoreError>> + '_ {
        self.tree
            .range(entry_key(since)..)
            .filter(|r| {
                r.as_ref()
                    .map(|(k, _)| k.first() == Some(&b'e'))
                    .unwrap_or(true)
            })
            .map(|r| {
                let (_, v) = r?;
                String::from_utf8(v.to_vec()).map_err(|_| StoreError::Corrupt {
                    what: "a stored audit entry".into(),
                    why: "not UTF-8".into(),
                })
            })
    }

    /// Entries from `since` on, in order (the stored lines, read).
    pub fn entries(&self, since: u64) -> impl Iterator<Item = Result<Entry, StoreError>> + '_ {
        self.lines(since)
            .map(|line| serde_json::from_str::<Entry>(&line?).map_err(unreadable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use ed25519_dalek::VerifyingKey;
    use proptest::prelude::*;

    fn dec(x: f64) -> Decimal {
        Decimal::from_f64(x).unwrap_or_default()
    }

    /// One event of every kind, with the awkward number `x` in every
    /// numeric field.
    fn every_event(x: f64, n: u64) -> Vec<Event> {
        let limits = DatasetLimits {
            dataset: "cases".into(),
            per_analyst: dec(x),
            total: dec(x),
            per_query_max: dec(x),
            measure: "zcdp".into(),
            delta: Some(dec(x)),
        };
        let eq = Some(Equivalent {
            epsilon: dec(x),
            delta: dec(x),
        });
        vec![
            Event::NodeStarted {
                version: "0".into(),
                config_sha256: "c".into(),
                audit_public_key: "k".into(),
                limits: vec![limits.clone()],
            },
            Event::LimitsChanged {
                dataset: "cases".into(),
                before: Some(limits.clone()),
                after: limits,
            },
            Event::Ingested {
                dataset: "cases".into(),
                rows: None,
                rows_total: None,
                file_sha256: "f".into(),
            },
            Event::Migrated {
                dataset: "cases".into(),
                from_schema: "a".repeat(64),
                to_schema: format!("{n:064x}"),
                from_standard: Some(fedq_audit::StandardVersion {
                    name: "ctdc-cases".into(),
                    version: "1.0".into(),
                }),
                to_standard: None,
            },
            Event::QueryReceived {
                analyst: "a/b \"c\"".into(),
                query_id: "q".into(),
                dataset: "cases".into(),
                sql: "SELECT COUNT(*) FROM cases -- é \u{1}".into(),
                epsilon: dec(x),
                dry_run: false,
                rho: dec(x),
            },
            Event::Refusals {
                identity: "a".into(),
                role: "analyst".into(),
                dataset: "cases".into(),
                reason: "budget".into(),
                example: "no".into(),
                first_query_id: "q".into(),
                count: n,
                first_ms: n,
                last_ms: n,
            },
            Event::Debited {
                analyst: "a".into(),
                query_id: "q".into(),
                dataset: "cases".into(),
                epsilon: dec(x),
                analyst_spent: dec(x),
                dataset_spent: dec(x),
                measure: "zcdp".into(),
                rho: dec(x),
                analyst_spent_equivalent: eq.clone(),
                keys_delta: dec(x),
                analyst_keys_delta_spent: dec(x),
            },
            Event::Reserved {
                analyst: "a".into(),
                query_id: "q".into(),
                dataset: "cases".into(),
                epsilon: dec(x),
                analyst_spent: dec(x),
                dataset_spent: dec(x),
                expires_ms: n,
                measure: "zcdp".into(),
                rho: dec(x),
                analyst_spent_equivalent: eq,
            },
            Event::ReservationReturned {
                analyst: "a".into(),
                query_id: "q".into(),
                dataset: "cases".into(),
                epsilon: dec(x),
                reason: "expired".into(),
                measure: String::new(),
                rho: dec(x),
            },
            Event::Released {
                analyst: "a".into(),
                query_id: "q".into(),
                dataset: "cases".into(),
                measurements: vec![ReleasedMeasurement {
                    label: "COUNT(*)".into(),
                    mechanism: "discrete_laplace".into(),
                    scale: dec(x),
                    epsilon: dec(x),
                    values: n,
                    rho: dec(x),
                }],
                response_sha256: "r".into(),
                source: None,
                secure: None,
            },
            Event::Replayed {
                analyst: "a".into(),
                query_id: "q".into(),
            },
            Event::BudgetGranted {
                analyst: "a".into(),
                dataset: "cases".into(),
                epsilon: dec(x),
                granted_total: dec(x),
                measure: String::new(),
            },
        ]
    }

    /// No JSON number with a fraction or an exponent anywhere in `v`.
    fn has_float(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Number(n) => !(n.is_u64() || n.is_i64()),
            serde_json::Value::Array(a) => a.iter().any(has_float),
            serde_json::Value::Object(o) => o.values().any(has_float),
            _ => false,
        }
    }

    /// Checks what an auditor's own program relies on, for one export.
    fn check_export(lines: &[String], public: &VerifyingKey) {
        verify(&lines.join("\n"), public, 0, None).unwrap();
        for line in lines {
            // The hashed text is the line cut at its hash, closed.
            let entry: Entry = serde_json::from_str(line).unwrap();
            let cut = line.rfind(",\"hash\":").unwrap();
            assert_eq!(format!("{}}}", &line[..cut]), entry.hashed_text());
            // Re-read generically (as another language would) and
            // re-encoded, the event has the same bytes: no floats in it.
            let generic: serde_json::Value = serde_json::from_str(entry.event.get()).unwrap();
            assert!(!has_float(&generic), "{line}");
            let typed = entry.event().unwrap();
            assert_eq!(serde_json::to_string(&typed).unwrap(), entry.event.get());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Every event type, with random doubles in every numeric field,
        /// exports to lines that verify, re-read and re-encode exactly.
        #[test]
        fn every_event_round_trips_bit_for_bit(bits in any::<u64>(), n in any::<u64>()) {
            let x = f64::from_bits(bits);
            let (dir, log) = log_with(0);
            log.append_all(&every_event(x, n)).unwrap();
            let public = parse_public_key(
                &std::fs::read_to_string(dir.path().join("audit.pub")).unwrap(),
            )
            .unwrap();
            check_export(&export(&log), &public);
        }
    }

    #[test]
    fn awkward_numbers_round_trip() {
        let (dir, log) = log_with(0);
        for x in [
            0.1,
            0.3,
            1.0 / 3.0,
            1.1,
            1e-6,
            1e308,
            3600.0000000036002,
            -0.0,
            f64::NAN,
            f64::INFINITY,
            f64::MIN_POSITIVE,
        ] {
            log.append_all(&every_event(x, u64::MAX)).unwrap();
        }
        let public =
            parse_public_key(&std::fs::read_to_string(dir.path().join("audit.pub")).unwrap())
                .unwrap();
        check_export(&export(&log), &public);
    }

    /// A version-1 entry (floats in its event, even `null` for a NaN) as
    /// an older node wrote it: it verifies over its stored bytes, which is
    /// what the older verifier, re-encoding the floats, failed to do.
    #[test]
    fn version_one_entries_verify_over_their_bytes() {
        let (dir, log) = log_with(0);
        let public =
            parse_public_key(&std::fs::read_to_string(dir.path().join("audit.pub")).unwrap())
                .unwrap();
        let events = [
            r#"{"type":"released","analyst":"a","query_id":"q","dataset":"d","measurements":[{"label":"VARIANCE(x)","mechanism":"discrete_laplace","scale":3600.0000000036002,"epsilon":0.1,"values":1}],"response_sha256":"r"}"#,
            r#"{"type":"query_received","analyst":"a","query_id":"q","dataset":"","sql":"s","epsilon":null,"dry_run":false}"#,
        ];
        let mut prev = GENESIS.to_string();
        let mut lines = Vec::new();
        for (seq, event) in events.iter().enumerate() {
            let hash = entry_hash(1, seq as u64, 7, &prev, event);
            let sig = log.key.sign_hash(&hash);
            lines.push(format!(
                r#"{{"seq":{seq},"time_ms":7,"prev":"{prev}","event":{event},"hash":"{}","sig":"{}"}}"#,
                hex::encode(hash),
                hex::encode(sig.to_bytes())
            ));
            prev = hex::encode(hash);
        }
        verify(&lines.join("\n"), &public, 0, None).unwrap();
        // They read, too (a node with such a log still starts).
        for line in &lines {
            let entry: Entry = serde_json::from_str(line).unwrap();
            assert_eq!(entry.v, 1);
            entry.event().unwrap();
            assert_eq!(serde_json::to_string(&entry).unwrap(), *line);
        }
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
        log.lines(0).map(|e| e.unwrap()).collect()
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
        let forged = other
            .key
            .seal(
                Some(&head),
                &Event::Replayed {
                    analyst: "x".into(),
                    query_id: "y".into(),
                },
            )
            .unwrap();
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
