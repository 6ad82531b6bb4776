//! Atomic multi-key ledger writes without a sled transaction.
//!
//! A sled 0.34 transaction takes sled's process-wide write lock and pins
//! the log: it writes the log buffer out before and after its batch, each
//! write waiting for the device (`sync_file_range`), whatever the batch's
//! size. Under load the ledger's commits were the node's bottleneck
//! (BENCHMARKS.md). The hot ledger path (debits and release records,
//! [`crate::ledger::Ledger`]) therefore writes this way instead:
//!
//! 1. the writes are computed against an [`Overlay`] of the trees (reads
//!    see the batch's own earlier writes), under the ledger's lock, which
//!    every writer of those keys holds;
//! 2. [`Journal::commit`] inserts the whole write set as one value under
//!    one key of the `journal` tree, then applies it key by key, then
//!    removes the journal key: all single-key sled writes, which go into
//!    the log buffer without forcing it out;
//! 3. the caller makes it durable with the store's shared flush.
//!
//! **Why this is atomic across a crash.** sled recovers its log in order
//! and stops at the first write that did not reach the disk, so what
//! survives a crash is a prefix of the writes, in the order they were made
//! (one thread makes all three steps, in order). If any applied key
//! survived, the journal value before it did too; [`Journal::replay`],
//! run when the store opens, applies a journal value that is still there
//! (every write in it is a whole value, so applying it again is harmless)
//! and removes it. If the journal value did not survive, nothing after it
//! did either.

use std::cell::RefCell;
use std::collections::BTreeMap;

use sled::transaction::{TransactionalTree, UnabortableTransactionError};
use sled::IVec;

/// Why [`Journal::replay`] could not complete an interrupted write.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// sled failed to read the journal or to apply its writes.
    #[error("cannot complete the ledger write that the last stop interrupted: {0}")]
    Sled(#[from] sled::Error),
    /// The journal's value cannot be decoded: nothing was applied, and the
    /// value is kept.
    #[error(
        "the store's ledger journal is unreadable ({why}); restore the store from a backup (see deploy/README.md)"
    )]
    Unreadable {
        /// What is wrong with it (`truncated`, `trailing bytes`).
        why: &'static str,
    },
}

/// Reads and writes of a ledger write, inside a sled transaction or an
/// [`Overlay`]: the hot path and the transactional paths share one code.
pub trait Kv {
    /// The value of `key`, this write's own earlier writes included.
    fn get<K: AsRef<[u8]>>(&self, key: K) -> Result<Option<IVec>, UnabortableTransactionError>;
    /// Sets `key` to `value`.
    fn insert<K, V>(&self, key: K, value: V) -> Result<(), UnabortableTransactionError>
    where
        K: AsRef<[u8]> + Into<IVec>,
        V: Into<IVec>;
}

impl Kv for TransactionalTree {
    fn get<K: AsRef<[u8]>>(&self, key: K) -> Result<Option<IVec>, UnabortableTransactionError> {
        TransactionalTree::get(self, key)
    }

    fn insert<K, V>(&self, key: K, value: V) -> Result<(), UnabortableTransactionError>
    where
        K: AsRef<[u8]> + Into<IVec>,
        V: Into<IVec>,
    {
        TransactionalTree::insert(self, key, value).map(|_| ())
    }
}

/// Writes to one tree, held back until [`Journal::commit`]; reads see
/// them over the tree's current contents.
pub struct Overlay<'a> {
    tree: &'a sled::Tree,
    writes: RefCell<BTreeMap<IVec, IVec>>,
}

impl<'a> Overlay<'a> {
    /// An empty overlay of `tree`.
    pub fn new(tree: &'a sled::Tree) -> Overlay<'a> {
        Overlay {
            tree,
            writes: RefCell::new(BTreeMap::new()),
        }
    }
}

impl Kv for Overlay<'_> {
    fn get<K: AsRef<[u8]>>(&self, key: K) -> Result<Option<IVec>, UnabortableTransactionError> {
        if let Some(v) = self.writes.borrow().get(key.as_ref()) {
            return Ok(Some(v.clone()));
        }
        self.tree
            .get(key)
            .map_err(UnabortableTransactionError::Storage)
    }

    fn insert<K, V>(&self, key: K, value: V) -> Result<(), UnabortableTransactionError>
    where
        K: AsRef<[u8]> + Into<IVec>,
        V: Into<IVec>,
    {
        self.writes.borrow_mut().insert(key.into(), value.into());
        Ok(())
    }
}

/// The store's `journal` tree: at most one write set, present only while
/// it is being applied (or after a crash that interrupted it).
#[derive(Clone)]
pub struct Journal {
    db: sled::Db,
    tree: sled::Tree,
    /// The store's fault, set when a commit fails: the trees may hold part
    /// of its write set, and only a replay (the next open) is sure to
    /// complete it, so every later commit is refused rather than read the
    /// half-applied values and have the replay overwrite what it wrote.
    /// Shared with every other writer of the store ([`crate::fault`]).
    fault: crate::fault::Fault,
    /// Test-only failure injection ([`crate::fault::fail_point`]).
    fail: crate::fault::fail_point::FailPoints,
}

/// The journal's only key.
const PENDING: &[u8] = b"pending";

impl Journal {
    /// The journal of `db`, with a fault of its own.
    pub fn open(db: &sled::Db) -> sled::Result<Journal> {
        Journal::open_with(db, Default::default(), Default::default())
    }

    /// The journal of `db`, setting and honouring the store's `fault`.
    pub fn open_with(
        db: &sled::Db,
        fault: crate::fault::Fault,
        fail: crate::fault::fail_point::FailPoints,
    ) -> sled::Result<Journal> {
        Ok(Journal {
            db: db.clone(),
            tree: db.open_tree("journal")?,
            fault,
            fail,
        })
    }

    /// One insert of a commit, failing where a test armed it to.
    fn insert(&self, tree: &sled::Tree, k: &[u8], v: IVec) -> sled::Result<()> {
        use crate::fault::fail_point::{FailPoints, Point};
        if self.fail.hit(Point::JournalWrite) {
            return Err(sled::Error::Io(FailPoints::error(Point::JournalWrite)));
        }
        tree.insert(k, v).map(|_| ())
    }

    /// Writes every overlay's writes, atomically across a crash (see the
    /// module's doc), not yet durable. The caller must hold the lock that
    /// every writer of these keys takes, from computing the overlays to
    /// the return of this call, and makes the writes durable with the
    /// store's flush.
    ///
    /// A failure is a storage failure and sets the store's fault: this and
    /// every later commit fail, and so does every other writer that checks
    /// the fault. A failure part-way (the journal value written, some keys
    /// not) is first completed in place if the store lets it, as the
    /// replay would (every write is a whole value), so that writers which
    /// do not check the fault still find consistent trees; the journal, if
    /// written, completes the write set when the store next opens anyway.
    pub fn commit(&self, overlays: &[&Overlay<'_>]) -> sled::Result<()> {
        let sets: Vec<(&sled::Tree, Vec<(IVec, IVec)>)> = overlays
            .iter()
            .map(|o| {
                let writes = std::mem::take(&mut *o.writes.borrow_mut());
                (o.tree, writes.into_iter().collect::<Vec<_>>())
            })
            .filter(|(_, writes)| !writes.is_empty())
            .collect();
        self.fault.check_sled()?;
        if sets.is_empty() {
            return Ok(());
        }
        let apply = || -> sled::Result<()> {
            for (tree, writes) in &sets {
                for (k, v) in writes {
                    self.insert(tree, k, v.clone())?;
                }
            }
            self.tree.remove(PENDING).map(|_| ())
        };
        if let Err(e) = self.insert(&self.tree, PENDING, encode(&sets).into()) {
            self.fault.set(format!("a ledger write failed: {e}"));
            return Err(e);
        }
        let Err(e) = apply() else { return Ok(()) };
        self.fault
            .set(format!("a ledger write failed part-way: {e}"));
        if apply().is_ok() {
            tracing::warn!("completed the ledger write that failed part-way; it is not durable");
        }
        Err(e)
    }

    /// Completes a write set that a crash interrupted, if any, and makes it
    /// durable. Returns how many keys it wrote (0: nothing was pending).
    pub fn replay(&self) -> Result<usize, JournalError> {
        let Some(bytes) = self.tree.get(PENDING)? else {
            return Ok(0);
        };
        let sets = decode(&bytes).map_err(|why| JournalError::Unreadable { why })?;
        let mut n = 0;
        for (name, writes) in sets {
            let tree = self.db.open_tree(name)?;
            for (k, v) in writes {
                tree.insert(k, v)?;
                n += 1;
            }
        }
        self.tree.remove(PENDING)?;
        self.db.flush()?;
        Ok(n)
    }
}

/// `[u32 trees] ([u32 len] name [u32 writes] ([u32 len] key [u32 len]
/// value)*)*`, lengths big-endian.
fn encode(sets: &[(&sled::Tree, Vec<(IVec, IVec)>)]) -> Vec<u8> {
    let size: usize = sets
        .iter()
        .map(|(t, w)| {
            8 + t.name().len() + w.iter().map(|(k, v)| 8 + k.len() + v.len()).sum::<usize>()
        })
        .sum();
    let mut out = Vec::with_capacity(4 + size);
    let put = |b: &[u8], out: &mut Vec<u8>| {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    };
    out.extend_from_slice(&(sets.len() as u32).to_be_bytes());
    for (tree, writes) in sets {
        put(&tree.name(), &mut out);
        out.extend_from_slice(&(writes.len() as u32).to_be_bytes());
        for (k, v) in writes {
            put(k, &mut out);
            put(v, &mut out);
        }
    }
    out
}

/// One tree's writes in a journal value: the tree's name, then its
/// `(key, value)` pairs.
type TreeWrites = (Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>);

/// Decodes [`encode`]'s value, or says what is wrong with it.
fn decode(mut b: &[u8]) -> Result<Vec<TreeWrites>, &'static str> {
    fn u32_at(b: &mut &[u8]) -> Result<usize, &'static str> {
        if b.len() < 4 {
            return Err("truncated");
        }
        let n = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        *b = &b[4..];
        Ok(n)
    }
    fn bytes(b: &mut &[u8]) -> Result<Vec<u8>, &'static str> {
        let n = u32_at(b)?;
        if b.len() < n {
            return Err("truncated");
        }
        let v = b[..n].to_vec();
        *b = &b[n..];
        Ok(v)
    }
    let trees = u32_at(&mut b)?;
    let mut sets = Vec::new();
    for _ in 0..trees {
        let name = bytes(&mut b)?;
        let n = u32_at(&mut b)?;
        let mut writes = Vec::new();
        for _ in 0..n {
            let k = bytes(&mut b)?;
            let v = bytes(&mut b)?;
            writes.push((k, v));
        }
        sets.push((name, writes));
    }
    if !b.is_empty() {
        return Err("trailing bytes");
    }
    Ok(sets)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens (or reopens) the store's database. sled may still be
    /// releasing the lock of a handle just dropped, so retry as the store
    /// does (a plain open failed here once in CI with "could not acquire
    /// lock" under load).
    fn db(dir: &std::path::Path) -> sled::Db {
        crate::store::open_with_retry(dir).unwrap()
    }

    #[test]
    fn an_overlay_reads_its_own_writes_and_commit_applies_them_all() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(dir.path());
        let (a, b) = (db.open_tree("a").unwrap(), db.open_tree("b").unwrap());
        a.insert("k", "old").unwrap();
        let journal = Journal::open(&db).unwrap();
        let (oa, ob) = (Overlay::new(&a), Overlay::new(&b));
        assert_eq!(oa.get("k").unwrap().as_deref(), Some(&b"old"[..]));
        oa.insert("k", "new").unwrap();
        ob.insert("x", "1").unwrap();
        assert_eq!(oa.get("k").unwrap().as_deref(), Some(&b"new"[..]));
        // Nothing reaches the trees before the commit.
        assert_eq!(a.get("k").unwrap().as_deref(), Some(&b"old"[..]));
        assert_eq!(b.get("x").unwrap(), None);
        journal.commit(&[&oa, &ob]).unwrap();
        assert_eq!(a.get("k").unwrap().as_deref(), Some(&b"new"[..]));
        assert_eq!(b.get("x").unwrap().as_deref(), Some(&b"1"[..]));
        assert!(journal.tree.is_empty(), "the journal is emptied");
        assert_eq!(journal.replay().unwrap(), 0);
    }

    #[test]
    fn a_write_set_interrupted_after_its_journal_is_completed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = db(dir.path());
            let (a, b) = (db.open_tree("a").unwrap(), db.open_tree("b").unwrap());
            let journal = Journal::open(&db).unwrap();
            let (oa, ob) = (Overlay::new(&a), Overlay::new(&b));
            oa.insert("spent", "7").unwrap();
            oa.insert("query", "pending").unwrap();
            ob.insert("entry", "debited").unwrap();
            // The crash: the journal and the first key were written, the
            // rest were not.
            let sets = vec![
                (
                    &a,
                    std::mem::take(&mut *oa.writes.borrow_mut())
                        .into_iter()
                        .collect(),
                ),
                (
                    &b,
                    std::mem::take(&mut *ob.writes.borrow_mut())
                        .into_iter()
                        .collect(),
                ),
            ];
            journal.tree.insert(PENDING, encode(&sets)).unwrap();
            a.insert("query", "pending").unwrap();
            db.flush().unwrap();
        }
        let db = db(dir.path());
        let journal = Journal::open(&db).unwrap();
        assert_eq!(journal.replay().unwrap(), 3);
        let (a, b) = (db.open_tree("a").unwrap(), db.open_tree("b").unwrap());
        assert_eq!(a.get("spent").unwrap().as_deref(), Some(&b"7"[..]));
        assert_eq!(a.get("query").unwrap().as_deref(), Some(&b"pending"[..]));
        assert_eq!(b.get("entry").unwrap().as_deref(), Some(&b"debited"[..]));
        assert!(journal.tree.is_empty());
        assert_eq!(journal.replay().unwrap(), 0, "a second open finds nothing");
    }

    #[test]
    fn after_a_commit_failed_part_way_nothing_more_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(dir.path());
        let a = db.open_tree("a").unwrap();
        let journal = Journal::open(&db).unwrap();
        // As left by a storage failure between the journal and its keys.
        journal.fault.set("injected");
        let oa = Overlay::new(&a);
        oa.insert("k", "v").unwrap();
        let e = journal.commit(&[&oa]).unwrap_err().to_string();
        assert!(e.contains("until the node restarts"), "{e}");
        assert_eq!(a.get("k").unwrap(), None);
        assert!(journal.tree.is_empty());
    }

    /// A commit that fails part-way and cannot be completed in place sets
    /// the fault (every later commit is refused) and the next open
    /// completes it.
    #[test]
    fn a_commit_failed_part_way_is_refused_after_and_replayed_on_open() {
        use crate::fault::fail_point::{self, FailPoints, Point};
        let dir = tempfile::tempdir().unwrap();
        {
            let db = db(dir.path());
            let (a, b) = (db.open_tree("a").unwrap(), db.open_tree("b").unwrap());
            a.insert("spent", "1").unwrap();
            let fault = crate::fault::Fault::default();
            let journal =
                Journal::open_with(&db, fault.clone(), FailPoints::for_store(dir.path())).unwrap();
            // The journal value and one key pass, then the disk is full.
            fail_point::arm(dir.path(), Point::JournalWrite, 2, u64::MAX);
            let (oa, ob) = (Overlay::new(&a), Overlay::new(&b));
            oa.insert("spent", "7").unwrap();
            ob.insert("entry", "debited").unwrap();
            assert!(journal.commit(&[&oa, &ob]).is_err());
            assert!(fault.is_set());
            assert_eq!(a.get("spent").unwrap().as_deref(), Some(&b"7"[..]));
            assert_eq!(b.get("entry").unwrap(), None, "applied part-way");
            // The disk is fine again, but nothing more is written.
            fail_point::disarm(dir.path());
            let oa = Overlay::new(&a);
            oa.insert("spent", "9").unwrap();
            let e = journal.commit(&[&oa]).unwrap_err().to_string();
            assert!(e.contains("refuses every write"), "{e}");
            assert_eq!(a.get("spent").unwrap().as_deref(), Some(&b"7"[..]));
            db.flush().unwrap();
        }
        let db = db(dir.path());
        let journal = Journal::open(&db).unwrap();
        assert_eq!(journal.replay().unwrap(), 2);
        let (a, b) = (db.open_tree("a").unwrap(), db.open_tree("b").unwrap());
        assert_eq!(a.get("spent").unwrap().as_deref(), Some(&b"7"[..]));
        assert_eq!(b.get("entry").unwrap().as_deref(), Some(&b"debited"[..]));
    }

    /// A part-way failure the store lets complete is completed in place:
    /// the trees are whole again (a writer that does not check the fault
    /// reads consistent values), though the store stays failed.
    #[test]
    fn a_transient_part_way_failure_is_completed_in_place() {
        use crate::fault::fail_point::{self, FailPoints, Point};
        let dir = tempfile::tempdir().unwrap();
        let db = db(dir.path());
        let (a, b) = (db.open_tree("a").unwrap(), db.open_tree("b").unwrap());
        let fault = crate::fault::Fault::default();
        let journal =
            Journal::open_with(&db, fault.clone(), FailPoints::for_store(dir.path())).unwrap();
        fail_point::arm(dir.path(), Point::JournalWrite, 2, 1);
        let (oa, ob) = (Overlay::new(&a), Overlay::new(&b));
        oa.insert("spent", "7").unwrap();
        ob.insert("entry", "debited").unwrap();
        assert!(journal.commit(&[&oa, &ob]).is_err(), "its callers are told");
        assert!(fault.is_set());
        assert_eq!(a.get("spent").unwrap().as_deref(), Some(&b"7"[..]));
        assert_eq!(b.get("entry").unwrap().as_deref(), Some(&b"debited"[..]));
        assert!(journal.tree.is_empty(), "nothing left to replay");
    }

    #[test]
    fn an_unreadable_journal_stops_the_open_and_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(dir.path());
        let journal = Journal::open(&db).unwrap();
        journal
            .tree
            .insert(PENDING, &[0, 0, 0, 1, 0, 0][..])
            .unwrap();
        let e = journal.replay().unwrap_err().to_string();
        assert!(
            e.contains("journal is unreadable") && e.contains("backup"),
            "{e}"
        );
        assert!(
            journal.tree.get(PENDING).unwrap().is_some(),
            "nothing is dropped"
        );
    }
}
