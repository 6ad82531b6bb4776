//! Group commit: many writers, one `fsync`.
//!
//! A ledger write must be durable before anyone acts on it (a debit before
//! its release is computed, a release before its answer leaves the node:
//! DESIGN invariants 3 and 6). Flushing sled once per write costs one
//! `fsync` per write, and callers that flush one after another wait for
//! each other's `fsync`s. [`GroupCommit::wait_durable`] instead lets every
//! writer whose write has completed wait for *one* flush that started after
//! its write: while a flush runs, newcomers queue up, and the next flush
//! covers all of them at once. Under load a query's two durable points cost
//! a fraction of an `fsync` each; alone, a query still pays exactly one
//! flush per point, as before.
//!
//! **Guarantee.** [`GroupCommit::wait`] returns `Ok` only after a
//! `sled::Db::flush` followed by an `fdatasync` of sled's log file, both
//! *begun* after its [`Ticket`] was taken, have completed without error
//! (`wait_durable` takes the ticket itself). sled's flush writes everything
//! written before it started (its log is stable as a prefix); on Linux,
//! sled 0.34 ends each write with `sync_file_range`, which does not flush
//! the disk's write cache or the file's size, so a power cut could still
//! lose it: the `fdatasync` is what makes the write durable. A failed
//! flush makes no one durable: each waiter of that flush gets the error,
//! even if a later flush succeeded (a waiter checks "failed" before
//! "durable"). It also sets the store's [`Fault`]: every ticket waiting
//! or taken later fails without a flush, and the node stops
//! ([`crate::fault`]); sled 0.34 would fail every later flush anyway.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::fault::fail_point::{FailPoints, Point};
use crate::fault::{Fault, StoreFailed};
use crate::store::StoreError;

/// Shares `fsync`s among concurrent writers of one sled database.
///
/// Flushes run on one dedicated thread: a writer
/// takes a [`Ticket`] after its write, which wakes the flusher if it is
/// idle, and later waits for it. A writer can do other work between the two
/// (see [`crate::ledger::Ledger::admit_overlapping`]) without a thread of
/// its own, and while one flush runs every newcomer queues for the next,
/// which covers them all at once.
///
/// One flusher, not several: two overlapping flushers (measured with 16
/// clients, BENCHMARKS.md) gave no more throughput, since nearly all of a
/// flush is sled's own flush waiting for its earlier buffer writes in
/// order, and batches halved (3.8 → 2.4 tickets per flush).
pub struct GroupCommit {
    shared: Arc<Shared>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

/// What the writers and the flusher thread share.
struct Shared {
    db: sled::Db,
    /// sled's log file (`<store>/db`), opened read-only for `fdatasync`
    /// (which syncs the file, whichever descriptor asks).
    log: std::fs::File,
    state: Mutex<State>,
    /// Signalled when a ticket is taken or the store closes (the flusher
    /// waits on it).
    work: Condvar,
    /// Signalled whenever a flush ends (well or not).
    flushed: Condvar,
    /// The store's fault: set by a failed flush; once set, nothing more
    /// is flushed and every ticket fails.
    fault: Fault,
    /// Test-only failure injection ([`crate::fault::fail_point`]).
    fail: FailPoints,
}

/// Flush bookkeeping, guarded by [`Shared::state`].
#[derive(Default)]
struct State {
    /// Tickets handed out so far: a caller's ticket is taken after its
    /// write, so a flush that starts once ticket `t` exists covers it.
    issued: u64,
    /// The tickets covered by the flushes begun so far.
    started: u64,
    /// Every ticket up to this one is durable.
    durable: u64,
    /// Every ticket up to this one was covered by a flush that failed, or
    /// taken before the store's fault was set; always reported to its
    /// waiter as a failure, even if a later flush succeeded.
    failed: u64,
    /// Flushes run so far (for the benchmarks' fsync count).
    flushes: u64,
    /// The store is closing: the flusher ends once nothing is pending.
    closing: bool,
}

/// A writer's place in the flush queue: taken after its write, redeemed by
/// [`GroupCommit::wait`].
#[must_use = "a ticket only makes a write durable once waited for"]
pub struct Ticket(u64);

impl State {
    /// The outcome of `ticket`'s wait, once decided. "Failed" is checked
    /// first: a write whose flush failed is never reported durable, even
    /// when a later flush succeeded, since the failure may have lost or
    /// torn it (and it set the store's fault: the node stops).
    fn outcome(&self, ticket: &Ticket) -> Option<Result<(), ()>> {
        if self.failed >= ticket.0 {
            Some(Err(()))
        } else if self.durable >= ticket.0 {
            Some(Ok(()))
        } else {
            None
        }
    }
}

impl GroupCommit {
    /// Group commit over `db`, whose log file is `log`, with a fault of
    /// its own; starts the flusher thread.
    pub fn new(db: sled::Db, log: std::fs::File) -> Result<GroupCommit, StoreError> {
        GroupCommit::with_fault(db, log, Fault::default(), FailPoints::default())
    }

    /// As [`GroupCommit::new`], setting and honouring the store's `fault`.
    pub fn with_fault(
        db: sled::Db,
        log: std::fs::File,
        fault: Fault,
        fail: FailPoints,
    ) -> Result<GroupCommit, StoreError> {
        let shared = Arc::new(Shared {
            db,
            log,
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            flushed: Condvar::new(),
            fault,
            fail,
        });
        let flusher = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("fedq-flush".into())
                .spawn(move || shared.run())
                .map_err(StoreError::Thread)?
        };
        Ok(GroupCommit {
            shared,
            flusher: Some(flusher),
        })
    }

    /// Blocks until everything this thread wrote to the database before
    /// calling is durable.
    pub fn wait_durable(&self) -> Result<(), StoreError> {
        let ticket = self.ticket();
        self.wait(ticket)
    }

    /// Queues everything this thread wrote so far for the next flush, which
    /// starts now if none is running; [`GroupCommit::wait`] then blocks
    /// until it is durable.
    pub fn ticket(&self) -> Ticket {
        let mut st = self.shared.lock();
        st.issued += 1;
        let ticket = Ticket(st.issued);
        drop(st);
        self.shared.work.notify_one();
        ticket
    }

    /// Returns once a `sled::Db::flush` followed by an `fdatasync` of
    /// sled's log, both begun after `ticket` was taken, have completed
    /// without error; fails if the flush that covered it failed.
    pub fn wait(&self, ticket: Ticket) -> Result<(), StoreError> {
        let mut st = self.shared.lock();
        loop {
            if let Some(outcome) = st.outcome(&ticket) {
                return outcome.map_err(|()| {
                    StoreError::NotDurable(
                        self.shared.fault.check().err().unwrap_or_else(|| {
                            StoreFailed("flushing the store to disk failed".into())
                        }),
                    )
                });
            }
            st = self
                .shared
                .flushed
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// How many flushes (each one `fdatasync` of sled's log) ran.
    pub fn flushes(&self) -> u64 {
        self.shared.lock().flushes
    }
}

impl Shared {
    /// The flusher thread: while tickets are pending, flushes once for all
    /// of them, then wakes their waiters.
    fn run(&self) {
        let mut st = self.lock();
        loop {
            if st.issued == st.started {
                if st.closing {
                    return;
                }
                st = self.work.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let covers = st.issued;
            let batch = covers - st.started;
            st.started = covers;
            drop(st);
            let began = std::time::Instant::now();
            // After a failure nothing more is flushed: the writes since
            // may depend on what failed.
            let result = match self.fault.check() {
                Ok(()) => self.flush(),
                Err(e) => Err(StoreError::Failed(e)),
            };
            tracing::debug!(target: "fedq_node::timing", batch, us = began.elapsed().as_micros() as u64, "group flush");
            st = self.lock();
            st.flushes += 1;
            match result {
                Ok(()) => st.durable = st.durable.max(covers),
                Err(e) => {
                    self.fault
                        .set(format!("flushing the store to disk failed: {e}"));
                    st.failed = st.failed.max(covers);
                }
            }
            self.flushed.notify_all();
        }
    }

    /// One flush: sled writes its buffers, then the log file is synced.
    fn flush(&self) -> Result<(), StoreError> {
        let began = std::time::Instant::now();
        if self.fail.hit(Point::Flush) {
            return Err(sled::Error::Io(FailPoints::error(Point::Flush)).into());
        }
        self.db.flush()?;
        let sled_us = began.elapsed().as_micros() as u64;
        self.log.sync_data().map_err(sled::Error::Io)?;
        // Durations only, for the benchmarks (`fedq_node::timing`).
        tracing::debug!(target: "fedq_node::timing", sled_us, fdatasync_us = (began.elapsed().as_micros() as u64).saturating_sub(sled_us), "flush");
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for GroupCommit {
    /// Lets the flusher finish what is pending, then joins it (it holds a
    /// handle on the database, which must be closed before it can be
    /// reopened).
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.work.notify_one();
        if let Some(handle) = self.flusher.take() {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn concurrent_writers_share_flushes_and_all_become_durable() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let log = std::fs::File::open(dir.path().join("db")).unwrap();
        let gc = Arc::new(GroupCommit::new(db.clone(), log).unwrap());
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let (db, gc) = (db.clone(), Arc::clone(&gc));
                std::thread::spawn(move || {
                    for i in 0..20u32 {
                        db.insert(format!("{t}/{i}"), &i.to_be_bytes()).unwrap();
                        gc.wait_durable().unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(gc.flushes() <= 320, "{}", gc.flushes());
        assert!(gc.flushes() >= 1);
        drop((db, gc));
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        assert_eq!(db.len(), 320);
    }

    /// A waiter whose flush failed is told so even once a later flush
    /// succeeded (issue 16: the waiter checked "durable" first).
    #[test]
    fn a_waiter_checks_failed_before_durable() {
        let st = State {
            durable: 5,
            failed: 3,
            ..State::default()
        };
        assert_eq!(st.outcome(&Ticket(3)), Some(Err(())));
        assert_eq!(st.outcome(&Ticket(2)), Some(Err(())));
        assert_eq!(st.outcome(&Ticket(4)), Some(Ok(())));
        assert_eq!(st.outcome(&Ticket(6)), None);
    }

    /// One failed flush fails its waiter, sets the store's fault, and from
    /// then on nothing is flushed and every wait fails, though the disk
    /// would take writes again.
    #[test]
    fn a_failed_flush_fails_every_wait_after_it_without_flushing() {
        use crate::fault::fail_point;
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let log = std::fs::File::open(dir.path().join("db")).unwrap();
        let fault = Fault::default();
        let gc = GroupCommit::with_fault(
            db.clone(),
            log,
            fault.clone(),
            FailPoints::for_store(dir.path()),
        )
        .unwrap();
        db.insert("a", "1").unwrap();
        gc.wait_durable().unwrap();
        // One failure, then the disk is fine again.
        fail_point::arm(dir.path(), Point::Flush, 0, 1);
        db.insert("b", "2").unwrap();
        let e = format!("{:#}", gc.wait_durable().unwrap_err());
        assert!(
            e.contains("no space left") && e.contains("nothing was made durable"),
            "{e}"
        );
        assert!(fault.is_set());
        let flushes = gc.flushes();
        db.insert("c", "3").unwrap();
        let e = format!("{:#}", gc.wait_durable().unwrap_err());
        assert!(e.contains("refuses every write"), "{e}");
        let ticket = gc.ticket();
        assert!(gc.wait(ticket).is_err());
        assert_eq!(gc.flushes(), flushes + 2, "counted, but nothing flushed");
    }

    #[test]
    fn one_writer_flushes_once_per_wait() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let log = std::fs::File::open(dir.path().join("db")).unwrap();
        let gc = GroupCommit::new(db.clone(), log).unwrap();
        for i in 0..5u32 {
            db.insert(i.to_be_bytes(), &[]).unwrap();
            gc.wait_durable().unwrap();
        }
        assert_eq!(gc.flushes(), 5);
    }
}
