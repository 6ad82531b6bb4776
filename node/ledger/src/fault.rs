//! What a node does when its store fails a write or a flush, and a
//! test-only way to make it fail.
//!
//! **Policy: stop, do not limp.** sled 0.34 remembers an I/O error (a
//! full disk, say) and fails every later operation of that database, so a
//! node cannot recover in place once space is freed: only reopening the
//! store does, and reopening replays the ledger's journal
//! ([`crate::journal`]), which completes a write that failed part-way. So
//! the first failed commit or flush sets the store's [`Fault`]: from then
//! on every ledger writer (debits, releases, reservations, give-backs,
//! grants) and every flush is refused, the server reports NOT_SERVING and
//! stops, and `fedq-node serve` exits with [`EXIT_STORE_FAILED`] so the
//! supervisor restarts it (deploy/README.md). Refusing every writer
//! matters as much as stopping: a writer that went on after a partial
//! journal write would read the half-applied values, and the replay at the
//! restart would then overwrite what it wrote (issue 16, item 10).
//!
//! **Fail points.** With the `fail-points` feature (tests only; never in a
//! release build on purpose, though a workspace build that unifies
//! features links it in dormant), [`fail_point::arm`] makes a store's
//! flushes or journal writes fail, as a full disk would, in the spirit of
//! raft-engine's `fail_point!`. Points are armed per store directory, so
//! tests running in parallel in one process do not disturb each other.

use std::sync::{Arc, OnceLock};

/// Exit code of `fedq-node serve` after its store failed a write or a
/// flush (sysexits' `EX_TEMPFAIL`: try again later). The supervisor
/// restarts the node, which replays the journal; distinct from 1 (a
/// configuration or start-up error) so that monitoring can tell a full
/// disk from a bad config.
pub const EXIT_STORE_FAILED: u8 = 75;

/// The error every write returns once the store failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the node's store failed ({0}); it refuses every write until the node restarts (the restart completes an interrupted ledger write)")]
pub struct StoreFailed(pub String);

/// Whether `e` is the store's fault, or a ledger or store error caused by
/// it: the error a node exits with [`EXIT_STORE_FAILED`] after. Checks the
/// one error, not its sources (walk `anyhow::Error::chain` for those).
pub fn is_store_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    use crate::ledger::{GrantError, LedgerError};
    use crate::store::StoreError;
    let store = |s: &StoreError| s.fault().is_some();
    e.is::<StoreFailed>()
        || e.downcast_ref::<StoreError>().is_some_and(store)
        || matches!(e.downcast_ref::<LedgerError>(), Some(LedgerError::Store(s)) if store(s))
        || matches!(e.downcast_ref::<GrantError>(), Some(GrantError::Store(s)) if store(s))
}

/// Set once, by the first failed commit or flush of a store; shared by
/// every handle on that store.
#[derive(Clone)]
pub struct Fault {
    inner: Arc<Inner>,
}

struct Inner {
    why: OnceLock<String>,
    /// Wakes the server (see [`Fault::failed`]).
    tx: tokio::sync::watch::Sender<bool>,
}

impl Default for Fault {
    fn default() -> Fault {
        Fault {
            inner: Arc::new(Inner {
                why: OnceLock::new(),
                tx: tokio::sync::watch::channel(false).0,
            }),
        }
    }
}

impl std::fmt::Debug for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Fault").field(&self.inner.why.get()).finish()
    }
}

impl Fault {
    /// Records that a write or flush failed. The first reason is kept
    /// (later failures are usually its consequences) and logged once.
    pub fn set(&self, why: impl std::fmt::Display) {
        let mut first = false;
        self.inner.why.get_or_init(|| {
            first = true;
            why.to_string()
        });
        if first {
            tracing::error!(
                error = %self.inner.why.get().map(String::as_str).unwrap_or_default(),
                "the store failed a write or a flush: refusing every write from now on; the node stops so that a restart completes it"
            );
            self.inner.tx.send_replace(true);
        }
    }

    /// Whether the store failed.
    pub fn is_set(&self) -> bool {
        self.inner.why.get().is_some()
    }

    /// `Err` once the store failed: every writer calls this, under the
    /// lock it writes under, before writing.
    pub fn check(&self) -> Result<(), StoreFailed> {
        match self.inner.why.get() {
            None => Ok(()),
            Some(why) => Err(StoreFailed(why.clone())),
        }
    }

    /// As [`Fault::check`], as a sled error (for the sled-typed paths).
    pub fn check_sled(&self) -> sled::Result<()> {
        self.check()
            .map_err(|e| sled::Error::Io(std::io::Error::other(e)))
    }

    /// Completes once the store failed (at once if it already has).
    pub async fn failed(&self) -> StoreFailed {
        let mut rx = self.inner.tx.subscribe();
        let _ = rx.wait_for(|failed| *failed).await;
        StoreFailed(self.inner.why.get().cloned().unwrap_or_default())
    }
}

/// Failure injection for tests (see the module's doc).
pub mod fail_point {
    use std::path::Path;

    /// Where a store can be made to fail.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Point {
        /// The group commit's flush (sled's flush and the `fdatasync`), as
        /// a full disk fails it.
        Flush,
        /// Each key a journaled ledger write inserts (the journal value
        /// first, then each key of the write set): a failure after the
        /// first leaves the write applied part-way.
        JournalWrite,
    }

    /// A store's fail points (a no-op without the `fail-points` feature).
    #[derive(Clone, Default)]
    pub struct FailPoints {
        #[cfg(any(test, feature = "fail-points"))]
        inner: std::sync::Arc<std::sync::Mutex<Armed>>,
    }

    #[cfg(any(test, feature = "fail-points"))]
    #[derive(Default)]
    struct Armed {
        /// Per point: hits to let pass, then failures to inject
        /// (`u64::MAX`: until disarmed).
        flush: (u64, u64),
        journal: (u64, u64),
    }

    impl FailPoints {
        /// The points armed (now or later) for the store at `dir`.
        pub fn for_store(_dir: &Path) -> FailPoints {
            #[cfg(any(test, feature = "fail-points"))]
            {
                let mut all = registry().lock().unwrap_or_else(|p| p.into_inner());
                all.entry(key(_dir)).or_default().clone()
            }
            #[cfg(not(any(test, feature = "fail-points")))]
            FailPoints::default()
        }

        /// Whether this hit of `point` must fail.
        #[inline]
        pub fn hit(&self, _point: Point) -> bool {
            #[cfg(any(test, feature = "fail-points"))]
            {
                let mut armed = self.inner.lock().unwrap_or_else(|p| p.into_inner());
                let (pass, fail) = match _point {
                    Point::Flush => &mut armed.flush,
                    Point::JournalWrite => &mut armed.journal,
                };
                if *pass > 0 {
                    *pass -= 1;
                    return false;
                }
                if *fail > 0 {
                    if *fail != u64::MAX {
                        *fail -= 1;
                    }
                    return true;
                }
                false
            }
            #[cfg(not(any(test, feature = "fail-points")))]
            false
        }

        /// The error an injected failure returns: what a full disk gives.
        pub fn error(point: Point) -> std::io::Error {
            std::io::Error::other(format!(
                "injected failure at {point:?}: no space left on device"
            ))
        }

        /// Arms `point`: after `pass` hits, the next `fail` hits fail
        /// (`u64::MAX`: every hit until disarmed).
        #[cfg(any(test, feature = "fail-points"))]
        fn set(&self, point: Point, pass: u64, fail: u64) {
            let mut armed = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            match point {
                Point::Flush => armed.flush = (pass, fail),
                Point::JournalWrite => armed.journal = (pass, fail),
            }
        }
    }

    #[cfg(any(test, feature = "fail-points"))]
    fn registry(
    ) -> &'static std::sync::Mutex<std::collections::HashMap<std::path::PathBuf, FailPoints>> {
        static ALL: std::sync::OnceLock<
            std::sync::Mutex<std::collections::HashMap<std::path::PathBuf, FailPoints>>,
        > = std::sync::OnceLock::new();
        ALL.get_or_init(Default::default)
    }

    /// The registry key of a store directory: its canonical path when it
    /// exists, so `a/../store` and `store` are one store.
    #[cfg(any(test, feature = "fail-points"))]
    fn key(dir: &Path) -> std::path::PathBuf {
        std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
    }

    /// Makes `point` of the store at `dir` fail after `pass` hits, `fail`
    /// times (`u64::MAX`: until [`disarm`]ed); takes effect at once, on a
    /// store already open too.
    #[cfg(any(test, feature = "fail-points"))]
    pub fn arm(dir: &Path, point: Point, pass: u64, fail: u64) {
        FailPoints::for_store(dir).set(point, pass, fail);
    }

    /// Disarms every point of the store at `dir`.
    #[cfg(any(test, feature = "fail-points"))]
    pub fn disarm(dir: &Path) {
        let points = FailPoints::for_store(dir);
        points.set(Point::Flush, 0, 0);
        points.set(Point::JournalWrite, 0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reason_is_kept_and_every_check_fails_after_it() {
        let f = Fault::default();
        assert!(f.check().is_ok());
        f.set("disk full");
        f.set("a consequence");
        let e = f.check().unwrap_err().to_string();
        assert!(e.contains("disk full") && !e.contains("consequence"), "{e}");
        assert!(f.clone().is_set(), "clones share the fault");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(rt.block_on(f.failed()).0, "disk full");
    }

    /// The server's exit code depends on this: 75 after the fault, however
    /// the error reached it.
    #[test]
    fn errors_caused_by_the_fault_are_store_failures() {
        use crate::ledger::{GrantError, LedgerError};
        use crate::store::StoreError;
        let failed = StoreFailed("disk full".into());
        assert!(is_store_failure(&failed));
        assert!(is_store_failure(&StoreError::NotDurable(failed.clone())));
        assert!(is_store_failure(&LedgerError::from(failed.clone())));
        assert!(is_store_failure(&GrantError::from(failed)));
        let other = StoreError::Thread(std::io::Error::other("no threads"));
        assert!(!is_store_failure(&other));
        assert!(!is_store_failure(&LedgerError::from(other)));
    }

    #[test]
    fn a_fail_point_passes_then_fails_then_passes() {
        use fail_point::*;
        let dir = tempfile::tempdir().unwrap();
        let p = FailPoints::for_store(dir.path());
        arm(dir.path(), Point::Flush, 1, 2);
        let hits: Vec<bool> = (0..4).map(|_| p.hit(Point::Flush)).collect();
        assert_eq!(hits, [false, true, true, false]);
        assert!(!p.hit(Point::JournalWrite));
        arm(dir.path(), Point::JournalWrite, 0, u64::MAX);
        assert!((0..10).all(|_| p.hit(Point::JournalWrite)));
        disarm(dir.path());
        assert!(!p.hit(Point::JournalWrite));
    }
}
