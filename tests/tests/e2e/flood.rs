//! A flood of refused calls grows the audit log by a bounded amount and
//! does not starve another analyst (DESIGN invariant 7: "no flood can grow
//! the log without limit"; issue 16, item 3).
//!
//! For five seconds, identities that the node must refuse hammer one
//! `fedq-node serve` process, two calls in flight each: an auditor
//! certificate calling Query, an analyst over its budget (and then over its
//! rate limit), an analyst sending a negative epsilon (then rate-limited),
//! an analyst naming an unknown dataset (then rate-limited), and an auditor
//! the node does not list exporting the log. Meanwhile another analyst,
//! carol, sends a query every 250 ms.
//!
//! The bound: refusals are summarised, at most one `refusals` entry per
//! identity, reason and minute (flushed at the minute's end and at
//! shutdown), besides the entries of the queries the node answered. Five
//! identities with at most two reasons each, over at most two minutes
//! (five seconds can straddle a minute's end), make at most 20 entries;
//! the test asserts no two summaries share an identity, reason and minute,
//! and fewer than 50 entries in all from the flood. Before summaries, every
//! refused call wrote its own entries: thousands per second.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedq_engine::synth::Partner;
use fedq_node::config::BudgetLimits;
use fedq_pki::Role;
use fedq_proto::v1::QueryRequest;
use fedq_tests::{audit_verify, export_audit_text, roomy_budget, ProcessNode};
use serde_json::Value;
use tonic::Code;

const FLOOD: Duration = Duration::from_secs(5);
/// At most this many entries from the whole flood (see the module doc).
const FLOOD_BOUND: usize = 50;
/// carol's queries, one every 250 ms during the flood.
const CAROL_QUERIES: usize = 20;

fn query(id: &str, sql: &str, epsilon: f64) -> QueryRequest {
    QueryRequest {
        query_id: id.into(),
        sql: sql.into(),
        epsilon,
        dry_run: false,
        rho: 0.0,
    }
}

/// What a flooding identity sends; every call must be refused.
#[derive(Clone, Copy, Debug)]
enum Flood {
    /// A valid query from an auditor certificate.
    QueryAsAuditor,
    /// A valid query costing more than the analyst's whole budget.
    OverBudget,
    /// A negative epsilon.
    NegativeEpsilon,
    /// A dataset the node does not serve.
    UnknownDataset,
    /// ExportAudit from an auditor certificate the node does not list.
    ExportUnlisted,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_calls_adds_a_bounded_number_of_log_entries_and_others_are_served() {
    let limits = BudgetLimits {
        per_analyst: 0.5,
        per_query_max: 1.0,
        ..roomy_budget()
    };
    let mut node = ProcessNode::create((Partner::Ngo, 500, 5), &[("cases", limits)], |c| {
        c.limits.queries_per_minute = 60;
        c.limits.concurrent_queries = 4;
    });
    node.start(Duration::from_secs(30)).await.unwrap();
    let pubkey = {
        let cfg = &node.node.config;
        cfg.resolve(&cfg.audit.public_key)
    };
    let mut auditor = node.client(Role::Auditor, "auditor").await.unwrap();
    let before = export_audit_text(&mut auditor, 0).await.unwrap();
    let start_seq = before.lines().count();

    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicU64::new(0));
    let wrong = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut flooders = Vec::new();
    for (role, name, kind) in [
        (Role::Auditor, "auditor", Flood::QueryAsAuditor),
        (Role::Analyst, "flooder", Flood::OverBudget),
        (Role::Analyst, "dave", Flood::NegativeEpsilon),
        (Role::Analyst, "erin", Flood::UnknownDataset),
        (Role::Auditor, "eve", Flood::ExportUnlisted),
    ] {
        for lane in 0..2 {
            let mut c = node.client(role, name).await.unwrap();
            let (stop, refused, wrong) = (stop.clone(), refused.clone(), wrong.clone());
            flooders.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let id = format!("{name}-{lane}-{i}");
                    let sql = "SELECT gender, COUNT(*) FROM cases GROUP BY gender";
                    let got = match kind {
                        Flood::QueryAsAuditor => c.query(query(&id, sql, 0.1)).await.map(|_| ()),
                        Flood::OverBudget => c.query(query(&id, sql, 0.9)).await.map(|_| ()),
                        Flood::NegativeEpsilon => c.query(query(&id, sql, -1.0)).await.map(|_| ()),
                        Flood::UnknownDataset => c
                            .query(query(&id, "SELECT COUNT(*) FROM nosuchdataset", 0.1))
                            .await
                            .map(|_| ()),
                        Flood::ExportUnlisted => export_audit_text(&mut c, 0).await.map(|_| ()),
                    };
                    match got {
                        Err(s)
                            if ![Code::Internal, Code::Unknown, Code::Unavailable]
                                .contains(&s.code()) =>
                        {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            let mut w = wrong.lock().unwrap();
                            if w.len() < 5 {
                                w.push(format!("{name} {kind:?}: {other:?}"));
                            }
                        }
                    }
                }
            }));
        }
    }

    // carol queries meanwhile, and must be served every time.
    let mut carol = node.client(Role::Analyst, "carol").await.unwrap();
    let began = Instant::now();
    let mut latencies = Vec::new();
    let mut carol_failures = Vec::new();
    for i in 0..CAROL_QUERIES {
        let at = began + FLOOD * i as u32 / CAROL_QUERIES as u32;
        tokio::time::sleep_until(at.into()).await;
        let sent = Instant::now();
        let r = carol
            .query(query(
                &format!("carol-{i}"),
                "SELECT ageBroad, COUNT(*) FROM cases GROUP BY ageBroad",
                0.01,
            ))
            .await;
        latencies.push(sent.elapsed());
        if let Err(s) = r {
            carol_failures.push(format!("carol-{i}: {:?} {}", s.code(), s.message()));
        }
    }
    tokio::time::sleep_until((began + FLOOD).into()).await;
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.await.unwrap();
    }
    let refused = refused.load(Ordering::Relaxed);
    let wrong = wrong.lock().unwrap().clone();
    latencies.sort();
    let (p50, max) = (
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
    );
    eprintln!(
        "flood: {refused} refused calls in {FLOOD:?}; carol's latency p50 {p50:?}, max {max:?}"
    );

    // Summaries pending at the end are flushed at shutdown.
    node.stop(Duration::from_secs(20)).await.unwrap();
    node.start(Duration::from_secs(30)).await.unwrap();
    let mut auditor = node.client(Role::Auditor, "auditor").await.unwrap();
    let after = export_audit_text(&mut auditor, 0).await.unwrap();
    let file = node.dir.path().join("after-flood.jsonl");
    std::fs::write(&file, &after).unwrap();
    audit_verify(&file, &pubkey, 0, &[]).expect("the log verifies after the flood");
    node.stop(Duration::from_secs(20)).await.unwrap();

    assert!(
        wrong.is_empty(),
        "calls that should have been refused were not (or failed): {wrong:?}"
    );
    assert!(
        refused >= 200,
        "only {refused} refused calls in {FLOOD:?}: not a flood"
    );
    assert!(
        carol_failures.is_empty(),
        "carol was not served during the flood: {carol_failures:?}"
    );
    assert!(
        max < Duration::from_secs(2),
        "carol waited {max:?} for an answer during the flood"
    );

    let mut carol_entries = 0;
    let mut flood_entries = Vec::new();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for line in after.lines().skip(start_seq) {
        let v: Value = serde_json::from_str(line).unwrap();
        let event = match &v["event"] {
            Value::String(s) => serde_json::from_str(s).unwrap(),
            other => other.clone(),
        };
        let kind = event["type"].as_str().unwrap_or("?").to_string();
        let identity = event["identity"]
            .as_str()
            .or(event["analyst"].as_str())
            .unwrap_or("")
            .to_string();
        *kinds.entry(kind.clone()).or_default() += 1;
        if kind == "node_started" || kind == "limits_changed" {
            continue;
        }
        if identity == "carol" && kind != "refusals" && kind != "refused" {
            carol_entries += 1;
            continue;
        }
        let time_ms = v["time_ms"].as_u64().unwrap_or(0);
        flood_entries.push((kind, identity, event, time_ms));
    }
    eprintln!(
        "flood: the log grew by {} entries from the flood and {carol_entries} from carol's queries; entries by type {kinds:?}",
        flood_entries.len()
    );
    assert!(
        flood_entries.len() < FLOOD_BOUND,
        "{refused} refused calls grew the log by {} entries (bound: one refusals summary per identity, reason and minute, < {FLOOD_BOUND} in all); entries by type: {kinds:?}",
        flood_entries.len()
    );
    let mut windows = HashSet::new();
    for (kind, identity, event, time_ms) in &flood_entries {
        assert_eq!(
            kind, "refusals",
            "a refused call was logged on its own, not summarised: {event}"
        );
        let reason = event["reason"].as_str().unwrap_or("").to_string();
        let first = event["first_ms"].as_u64().unwrap_or(*time_ms);
        assert!(
            windows.insert((identity.clone(), reason.clone(), first / 60_000)),
            "two refusals summaries for {identity}, {reason} in the same minute"
        );
    }
    let counted: u64 = flood_entries
        .iter()
        .filter_map(|(_, _, e, _)| e["count"].as_u64())
        .sum();
    assert_eq!(
        counted, refused,
        "the summaries count {counted} refusals; {refused} calls were refused"
    );
    assert!(
        carol_entries <= 4 * CAROL_QUERIES,
        "carol's {CAROL_QUERIES} queries wrote {carol_entries} entries"
    );
}
