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
//! **Guarantee.** `wait_durable` returns `Ok` only after a `sled::Db::flush`
//! followed by an `fdatasync` of sled's log file, both *begun* after the
//! call began, have completed without error. sled's flush writes everything
//! written before it started (its log is stable as a prefix); on Linux,
//! sled 0.34 ends each write with `sync_file_range`, which does not flush
//! the disk's write cache or the file's size, so a power cut could still
//! lose it: the `fdatasync` is what makes the write durable. A failed
//! flush makes no one durable: each waiter of that flush gets the error.

use std::sync::{Condvar, Mutex};

/// Shares `fsync`s among concurrent writers of one sled database.
pub struct GroupCommit {
    db: sled::Db,
    /// sled's log file (`<store>/db`), opened read-only for `fdatasync`
    /// (which syncs the file, whichever descriptor asks).
    log: std::fs::File,
    state: Mutex<State>,
    /// Signalled whenever a flush ends (well or not).
    flushed: Condvar,
}

/// Flush bookkeeping, guarded by [`GroupCommit::state`].
#[derive(Default)]
struct State {
    /// Tickets handed out so far: a caller's ticket is taken after its
    /// write, so a flush that starts once ticket `t` exists covers it.
    issued: u64,
    /// Every ticket up to this one is durable.
    durable: u64,
    /// A flush is running (its leader released the lock for the `fsync`).
    flushing: bool,
    /// Flushes that ended in an error so far; waiters of a failed flush see
    /// this change and report the failure instead of waiting on.
    failures: u64,
    /// Flushes run so far (for the benchmarks' fsync count).
    flushes: u64,
}

impl GroupCommit {
    /// Group commit over `db`, whose log file is `log`.
    pub fn new(db: sled::Db, log: std::fs::File) -> GroupCommit {
        GroupCommit {
            db,
            log,
            state: Mutex::new(State::default()),
            flushed: Condvar::new(),
        }
    }

    /// Blocks until everything this thread wrote to the database before
    /// calling is durable: joins the next flush, or runs it when none is
    /// running (the caller then flushes for everyone queued behind it).
    pub fn wait_durable(&self) -> anyhow::Result<()> {
        let mut st = self.lock();
        st.issued += 1;
        let ticket = st.issued;
        let failures_at_start = st.failures;
        loop {
            if st.durable >= ticket {
                return Ok(());
            }
            if !st.flushing {
                // Lead a flush covering every ticket issued so far.
                st.flushing = true;
                let covers = st.issued;
                drop(st);
                let result = self.flush();
                st = self.lock();
                st.flushing = false;
                st.flushes += 1;
                match result {
                    Ok(()) => st.durable = st.durable.max(covers),
                    Err(_) => st.failures += 1,
                }
                self.flushed.notify_all();
                result?;
                continue;
            }
            st = self.flushed.wait(st).unwrap_or_else(|p| p.into_inner());
            // A flush ended. If it failed, it may have been the one that
            // covered this ticket: report it rather than hide an I/O error.
            if st.durable < ticket && st.failures != failures_at_start && !st.flushing {
                anyhow::bail!("flushing the store to disk failed; nothing was made durable");
            }
        }
    }

    /// One flush: sled writes its buffers, then the log file is synced.
    fn flush(&self) -> anyhow::Result<()> {
        self.db.flush()?;
        self.log.sync_data()?;
        Ok(())
    }

    /// How many flushes (each one `fdatasync` of sled's log) ran.
    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
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
        let gc = Arc::new(GroupCommit::new(db.clone(), log));
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

    #[test]
    fn one_writer_flushes_once_per_wait() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let log = std::fs::File::open(dir.path().join("db")).unwrap();
        let gc = GroupCommit::new(db.clone(), log);
        for i in 0..5u32 {
            db.insert(i.to_be_bytes(), &[]).unwrap();
            gc.wait_durable().unwrap();
        }
        assert_eq!(gc.flushes(), 5);
    }
}
