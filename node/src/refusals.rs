//! Refused requests, counted and logged in summary form.
//!
//! Every refusal must reach the audit log (DESIGN invariant 7), but one
//! signed entry per refused call lets any certificate holder grow the log
//! without limit: a flood of refused calls wrote thousands of entries a
//! second. So refusals are counted in memory, per identity, dataset (one
//! this node serves, or none) and [`RefusalKind`], over a window of
//! [`WINDOW_MS`], and each window becomes one signed `refusals` entry
//! (identity, role, dataset, kind, the first message and query id, the
//! count, the first and last time) when it ends.
//!
//! **Bound.** Whatever the flood, refusals add at most one entry per
//! identity, dataset and kind per window: with `I` identities holding
//! certificates, `D` served datasets and the 14 [`RefusalKind::ALL`]
//! kinds, at most `I × (D + 1) × 14` entries a minute.
//! The pending windows are bounded in memory too ([`MAX_PENDING`]): when
//! more are open, all are logged at once. A refusal costs a map update
//! under a short lock, no disk write, so it slows nobody else down.
//!
//! **What a crash loses.** Windows still open when the process is killed
//! are not logged (a graceful stop logs them). Refusals spend and release
//! nothing, so no budget and no release goes unaccounted; the operator's
//! tracing log has each refusal as it happens.

use std::collections::HashMap;
use std::sync::Mutex;

use fedq_ledger::audit::{AuditLog, Event};

/// Length of a summary window (a minute).
pub const WINDOW_MS: u64 = 60_000;

/// Most windows kept open at once before all are logged.
pub const MAX_PENDING: usize = 4096;

/// Longest message and identity kept (characters); the rest is cut.
const MAX_TEXT: usize = 240;

/// Why a request was refused: a small, stable set, so that summaries are
/// bounded and auditors can count by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// The certificate's role or the `[access]` list does not allow the call.
    NotAllowed,
    /// An audit export by someone who is not a configured auditor.
    NotAnAuditor,
    /// The caller's rate limit.
    RateLimit,
    /// The caller's limit of concurrent queries.
    Concurrency,
    /// A request field is invalid (query id, sizes, a non-finite cost...).
    InvalidRequest,
    /// The SQL does not parse or is outside the supported subset.
    InvalidQuery,
    /// The dataset is not served here.
    UnknownDataset,
    /// The cost is above the per-query maximum, or unusable.
    Cost,
    /// An analyst or dataset budget cannot take the cost.
    Budget,
    /// A query id was used before for another query.
    IdReused,
    /// A two-phase call with no matching reservation, or one reserved.
    Reservation,
    /// The same query id is being answered right now.
    InFlight,
    /// The query is valid but not supported in this form.
    Unsupported,
    /// The certificate was revoked (refused at the handshake).
    Revoked,
}

impl RefusalKind {
    /// Every kind (the bound above counts them).
    pub const ALL: [RefusalKind; 14] = [
        RefusalKind::NotAllowed,
        RefusalKind::NotAnAuditor,
        RefusalKind::RateLimit,
        RefusalKind::Concurrency,
        RefusalKind::InvalidRequest,
        RefusalKind::InvalidQuery,
        RefusalKind::UnknownDataset,
        RefusalKind::Cost,
        RefusalKind::Budget,
        RefusalKind::IdReused,
        RefusalKind::Reservation,
        RefusalKind::InFlight,
        RefusalKind::Unsupported,
        RefusalKind::Revoked,
    ];

    /// The name written in the log.
    pub fn name(self) -> &'static str {
        match self {
            RefusalKind::NotAllowed => "not_allowed",
            RefusalKind::NotAnAuditor => "not_an_auditor",
            RefusalKind::RateLimit => "rate_limit",
            RefusalKind::Concurrency => "concurrency",
            RefusalKind::InvalidRequest => "invalid_request",
            RefusalKind::InvalidQuery => "invalid_query",
            RefusalKind::UnknownDataset => "unknown_dataset",
            RefusalKind::Cost => "cost",
            RefusalKind::Budget => "budget",
            RefusalKind::IdReused => "id_reused",
            RefusalKind::Reservation => "reservation",
            RefusalKind::InFlight => "in_flight",
            RefusalKind::Unsupported => "unsupported",
            RefusalKind::Revoked => "revoked",
        }
    }
}

/// One open window: what its entry will say.
struct Window {
    role: String,
    dataset: String,
    example: String,
    first_query_id: String,
    count: u64,
    first_ms: u64,
    last_ms: u64,
}

/// A window's identity, dataset and kind.
type Key = (String, String, RefusalKind);

/// The open windows of every identity, dataset and kind.
#[derive(Default)]
pub struct RefusalLog {
    open: Mutex<HashMap<Key, Window>>,
}

/// `text` cut to [`MAX_TEXT`] characters, saying so.
fn bounded(text: &str) -> String {
    if text.chars().count() <= MAX_TEXT {
        return text.to_string();
    }
    let cut: String = text.chars().take(MAX_TEXT).collect();
    format!("{cut}... ({} bytes in all)", text.len())
}

/// A query id as logged: printable ASCII within the accepted length, or
/// empty (an invalid id is not worth keeping; its refusal is counted).
fn loggable_id(id: &str) -> String {
    if id.len() <= 128 && id.chars().all(|c| c.is_ascii_graphic()) {
        id.to_string()
    } else {
        String::new()
    }
}

/// One refusal, as it is counted: who (identity, role), on which dataset
/// (one this node serves, or empty), of what kind, for which query id
/// (may be empty), and the message the caller was sent.
#[derive(Debug, Clone, Copy)]
pub struct Refused<'a> {
    /// Identity and role of the certificate.
    pub who: (&'a str, &'a str),
    /// A served dataset, or empty.
    pub dataset: &'a str,
    /// The kind of refusal.
    pub kind: RefusalKind,
    /// The query id, if any.
    pub query_id: &'a str,
    /// The message sent to the caller.
    pub message: &'a str,
}

impl RefusalLog {
    /// Counts one refusal at `now_ms`. Windows that ended are logged first,
    /// as is everything when too many windows are open. `dataset` must be
    /// one this node serves, or empty.
    pub fn note(&self, audit: &AuditLog, r: &Refused<'_>, now_ms: u64) {
        let Refused {
            who: (identity, role),
            dataset,
            kind,
            query_id,
            message,
        } = *r;
        let due = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            let key = (bounded(identity), dataset.to_string(), kind);
            let mut due = Vec::new();
            if open
                .get(&key)
                .is_some_and(|w| now_ms.saturating_sub(w.first_ms) >= WINDOW_MS)
            {
                due.extend(open.remove_entry(&key));
            }
            if !open.contains_key(&key) && open.len() >= MAX_PENDING {
                due.extend(open.drain());
            }
            bump(&mut open, key, role, message, query_id, now_ms);
            due
        };
        write(audit, due);
    }

    /// Counts one refusal without ever writing, for callers that must not
    /// wait on the log (the TLS handshake): an ended window keeps counting
    /// until the sweeper logs it, and when [`MAX_PENDING`] windows are open
    /// a refusal that needs a new one is only in the operator's log.
    pub fn count(&self, r: &Refused<'_>, now_ms: u64) {
        let Refused {
            who: (identity, role),
            dataset,
            kind,
            query_id,
            message,
        } = *r;
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let key = (bounded(identity), dataset.to_string(), kind);
        if !open.contains_key(&key) && open.len() >= MAX_PENDING {
            return;
        }
        bump(&mut open, key, role, message, query_id, now_ms);
    }

    /// Logs the windows that ended by `now_ms`, or all of them when
    /// `everything` (at shutdown). Called once a second by the server.
    pub fn flush(&self, audit: &AuditLog, now_ms: u64, everything: bool) {
        let due: Vec<_> = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            let keys: Vec<_> = open
                .iter()
                .filter(|(_, w)| everything || now_ms.saturating_sub(w.first_ms) >= WINDOW_MS)
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| open.remove_entry(&k))
                .collect()
        };
        write(audit, due);
    }

    /// How many windows are open (for tests and the operator).
    pub fn pending(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Counts one refusal in `key`'s window, opening it if needed.
fn bump(
    open: &mut HashMap<Key, Window>,
    key: Key,
    role: &str,
    message: &str,
    query_id: &str,
    now_ms: u64,
) {
    let dataset = key.1.clone();
    let w = open.entry(key).or_insert_with(|| Window {
        role: bounded(role),
        dataset,
        example: bounded(message),
        first_query_id: loggable_id(query_id),
        count: 0,
        first_ms: now_ms,
        last_ms: now_ms,
    });
    w.count += 1;
    w.last_ms = w.last_ms.max(now_ms);
}

/// Logs ended windows in one commit, oldest first (best effort: a failure
/// to log is itself in the operator's log).
fn write(audit: &AuditLog, mut due: Vec<(Key, Window)>) {
    if due.is_empty() {
        return;
    }
    due.sort_by_key(|((identity, dataset, kind), w)| {
        (w.first_ms, identity.clone(), dataset.clone(), kind.name())
    });
    let events: Vec<Event> = due
        .into_iter()
        .map(|((identity, _, kind), w)| Event::Refusals {
            identity,
            role: w.role,
            dataset: w.dataset,
            reason: kind.name().into(),
            example: w.example,
            first_query_id: w.first_query_id,
            count: w.count,
            first_ms: w.first_ms,
            last_ms: w.last_ms,
        })
        .collect();
    if let Err(e) = audit.append_all(&events) {
        tracing::error!(error = %e, entries = events.len(), "cannot log refusal summaries");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedq_ledger::audit::AuditKey;

    fn log() -> (tempfile::TempDir, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .unwrap();
        let key =
            AuditKey::load_or_create(&dir.path().join("audit.key"), &dir.path().join("audit.pub"))
                .unwrap();
        (dir, AuditLog::new(db.open_tree("audit").unwrap(), key))
    }

    fn summaries(audit: &AuditLog) -> Vec<(String, String, u64)> {
        audit
            .entries(0)
            .filter_map(|e| match e.unwrap().event().unwrap() {
                Event::Refusals {
                    identity,
                    reason,
                    count,
                    ..
                } => Some((identity, reason, count)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_flood_is_one_entry_per_identity_kind_and_window() {
        let (_d, audit) = log();
        let refusals = RefusalLog::default();
        let huge = "x".repeat(10_000);
        for i in 0..10_000u64 {
            let kind = if i % 2 == 0 {
                RefusalKind::RateLimit
            } else {
                RefusalKind::InvalidRequest
            };
            let r = Refused {
                who: ("mallory", "analyst"),
                dataset: "",
                kind,
                query_id: &huge,
                message: &huge,
            };
            refusals.note(&audit, &r, i);
        }
        // Nothing is written while the window is open.
        assert!(summaries(&audit).is_empty());
        refusals.flush(&audit, 10_000, false);
        assert!(summaries(&audit).is_empty());
        refusals.flush(&audit, WINDOW_MS + 1, false);
        let mut s = summaries(&audit);
        s.sort();
        assert_eq!(
            s,
            vec![
                ("mallory".into(), "invalid_request".into(), 5000),
                ("mallory".into(), "rate_limit".into(), 5000)
            ]
        );
        // Bounded text: a 10 kB message and id are not stored whole.
        let line = audit.lines(0).next().unwrap().unwrap();
        assert!(line.len() < 1000, "{}", line.len());
        assert_eq!(refusals.pending(), 0);
    }

    #[test]
    fn a_new_window_starts_after_a_minute_and_shutdown_logs_the_rest() {
        let (_d, audit) = log();
        let refusals = RefusalLog::default();
        let note = |t| {
            let r = Refused {
                who: ("eve", "auditor"),
                dataset: "",
                kind: RefusalKind::NotAllowed,
                query_id: "q",
                message: "no",
            };
            refusals.note(&audit, &r, t)
        };
        note(0);
        note(1);
        note(WINDOW_MS + 5);
        assert_eq!(
            summaries(&audit),
            vec![("eve".into(), "not_allowed".into(), 2)]
        );
        refusals.flush(&audit, WINDOW_MS + 6, true);
        assert_eq!(summaries(&audit).len(), 2);
        assert_eq!(summaries(&audit)[1].2, 1);
    }

    #[test]
    fn too_many_open_windows_are_logged_at_once() {
        let (_d, audit) = log();
        let refusals = RefusalLog::default();
        for i in 0..=MAX_PENDING {
            let id = format!("id{i}");
            let r = Refused {
                who: (&id, "analyst"),
                dataset: "cases",
                kind: RefusalKind::Budget,
                query_id: "",
                message: "no",
            };
            refusals.note(&audit, &r, 0);
        }
        assert_eq!(summaries(&audit).len(), MAX_PENDING);
        assert_eq!(refusals.pending(), 1);
    }
}
