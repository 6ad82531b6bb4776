//! Bounded storage (issue 16): a released answer is kept for the node's
//! replay window, replayed at no cost inside it, and removed after it; a
//! retry of its id after the window is refused (never answered again with
//! fresh noise, which would be a second release under one debit), spends
//! nothing, survives a restart, and the release's entries stay in a log
//! that still verifies.

use std::time::Duration;

use fedq_engine::synth::Partner;
use fedq_ledger::audit::Event;
use fedq_pki::Role;
use fedq_proto::v1::{BudgetRequest, QueryRequest};
use fedq_tests::{audit_verify, export_audit_text, roomy_budget, Logged, ProcessNode};
use tonic::Code;

const WINDOW_MS: u64 = 2_000;

fn q(id: &str, sql: &str) -> QueryRequest {
    QueryRequest {
        query_id: id.into(),
        sql: sql.into(),
        epsilon: 0.25,
        dry_run: false,
        rho: 0.0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_the_replay_window_is_refused_and_spends_nothing() {
    let mut node = ProcessNode::create((Partner::Ngo, 300, 5), &[("cases", roomy_budget())], |c| {
        c.limits.query_deadline_ms = WINDOW_MS;
        c.limits.replay_window_ms = WINDOW_MS;
    });
    node.start(Duration::from_secs(30)).await.unwrap();
    let mut c = node.client(Role::Analyst, "alice").await.unwrap();
    let sql = "SELECT gender, COUNT(*) FROM cases GROUP BY gender";
    let first = c.query(q("q1", sql)).await.unwrap().into_inner();
    let spent = |b: fedq_proto::v1::BudgetResponse| b.budgets[0].spent_by_analyst;
    let after_first = spent(c.budget(BudgetRequest {}).await.unwrap().into_inner());

    // Inside the window: the same answer again, nothing spent.
    let again = c.query(q("q1", sql)).await.unwrap().into_inner();
    assert!(again.replayed, "a retry inside the window is a replay");
    assert_eq!(
        again.measurements, first.measurements,
        "a replay is the stored answer, the same noisy values"
    );

    // After the window (and a sweep, once a second): refused, and a
    // different query under the id is still refused as a reused id.
    tokio::time::sleep(Duration::from_millis(WINDOW_MS + 2_500)).await;
    let late = c.query(q("q1", sql)).await.unwrap_err();
    assert_eq!(late.code(), Code::AlreadyExists, "{late:?}");
    assert!(
        late.message().contains("replay window") && late.message().contains("new query id"),
        "the refusal says why and what to do: {}",
        late.message()
    );
    let other = c
        .query(q("q1", "SELECT COUNT(*) FROM cases"))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists);
    assert!(other.message().contains("different query"), "{other:?}");
    assert_eq!(
        spent(c.budget(BudgetRequest {}).await.unwrap().into_inner()),
        after_first,
        "refused retries spend nothing"
    );

    // Still refused after a restart: the removal is in the store.
    node.stop(Duration::from_secs(20)).await.unwrap();
    node.start(Duration::from_secs(30)).await.unwrap();
    let mut c = node.client(Role::Analyst, "alice").await.unwrap();
    let restarted = c.query(q("q1", sql)).await.unwrap_err();
    assert_eq!(restarted.code(), Code::AlreadyExists, "{restarted:?}");
    // A new id is answered as usual.
    c.query(q("q2", sql)).await.unwrap();

    // One release of q1 in the log, which verifies with the node's key.
    let mut auditor = node.client(Role::Auditor, "auditor").await.unwrap();
    let text = export_audit_text(&mut auditor, 0).await.unwrap();
    let released_q1 = text
        .lines()
        .map(Logged::parse)
        .filter(|l| matches!(&l.event, Event::Released { query_id, .. } if query_id == "q1"))
        .count();
    assert_eq!(released_q1, 1, "q1 was released exactly once");
    let file = node.dir.path().join("export.jsonl");
    std::fs::write(&file, &text).unwrap();
    let cfg = &node.node.config;
    let pubkey = cfg.resolve(&cfg.audit.public_key);
    audit_verify(&file, &pubkey, 0, &[]).expect("the log verifies");
    node.stop(Duration::from_secs(20)).await.unwrap();
}
