//! The breaks of issue 16, retried the way they were found: ordinary
//! queries at awkward costs, a request with a non-finite cost, and an
//! ingest, against a real node process; after each, the exported log must
//! verify with the separate `fedq-node audit verify` binary and the key
//! read at the start, and the node must restart.

use std::time::Duration;

use fedq_engine::synth::Partner;
use fedq_pki::Role;
use fedq_proto::v1::QueryRequest;
use fedq_tests::{audit_verify, export_audit_text, roomy_budget, Logged, ProcessNode};

fn q(id: &str, sql: &str, epsilon: f64) -> QueryRequest {
    QueryRequest {
        query_id: id.into(),
        sql: sql.into(),
        epsilon,
        ..Default::default()
    }
}

/// Exports the log as "auditor", writes it beside the pinned key and runs
/// the verifier binary on it; returns the entries.
async fn export_and_verify(node: &ProcessNode, pinned: &str, step: &str) -> Vec<Logged> {
    let mut auditor = node.client(Role::Auditor, "auditor").await.unwrap();
    let text = export_audit_text(&mut auditor, 0)
        .await
        .unwrap_or_else(|s| panic!("{step}: the export failed: {s:?}"));
    let dir = node.dir.path();
    let (log, key) = (dir.join("export.jsonl"), dir.join("pinned.pub"));
    std::fs::write(&log, &text).unwrap();
    std::fs::write(&key, pinned).unwrap();
    audit_verify(&log, &key, 0, &[])
        .unwrap_or_else(|e| panic!("{step}: the export does not verify: {e}"));
    text.lines().map(Logged::parse).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_and_non_finite_queries_leave_a_log_that_verifies_and_a_node_that_restarts() {
    let mut node = ProcessNode::create(
        (Partner::Ngo, 400, 16),
        &[("cases", roomy_budget())],
        |_| {},
    );
    node.start(Duration::from_secs(60)).await.unwrap();
    let pinned =
        std::fs::read_to_string(node.node.config.resolve(&node.node.config.audit.public_key))
            .unwrap();

    // The ingest (done by `fedq-node ingest` in `create`) is logged, with
    // the file's digest and no row count.
    let entries = export_and_verify(&node, &pinned, "after ingest").await;
    let ingested: Vec<_> = entries
        .iter()
        .filter(|e| e.event.kind() == "ingested")
        .collect();
    assert_eq!(ingested.len(), 1, "{entries:?}");
    assert!(
        matches!(
            ingested[0].event,
            fedq_ledger::audit::Event::Ingested {
                rows: None,
                rows_total: None,
                ..
            }
        ),
        "an exact row count is logged: {:?}",
        ingested[0].event
    );

    // The queries of the report, each of which broke the log.
    let mut alice = node.client(Role::Analyst, "alice").await.unwrap();
    let asked = [
        ("SELECT VARIANCE(traffickMonths) FROM cases", 0.3),
        ("SELECT COUNT(*) FROM cases", 1.1),
        ("SELECT AVG(traffickMonths) FROM cases", 0.15),
        ("SELECT gender, COUNT(*) FROM cases GROUP BY gender", 1e-6),
        ("SELECT SUM(traffickMonths) FROM cases", 1.0 / 3.0),
        ("SELECT MEDIAN(traffickMonths) FROM cases", 0.1),
    ];
    for (i, (sql, epsilon)) in asked.iter().enumerate() {
        alice
            .query(q(&format!("ordinary-{i}"), sql, *epsilon))
            .await
            .unwrap_or_else(|s| panic!("{sql} at {epsilon}: {s:?}"));
        export_and_verify(&node, &pinned, &format!("after {sql} at epsilon {epsilon}")).await;
    }

    // Non-finite and negative costs on Query and Prepare: refused, and
    // nothing is logged that could not be read back.
    for (i, bad) in [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        -0.0,
        -1.0,
        1e308,
    ]
    .into_iter()
    .enumerate()
    {
        let e = alice
            .query(q(&format!("bad-{i}"), "SELECT COUNT(*) FROM cases", bad))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}: {e:?}");
        assert!(e.message().len() < 400, "{}", e.message());
        let rho = QueryRequest {
            rho: bad,
            epsilon: 0.0,
            ..q(&format!("bad-rho-{i}"), "SELECT COUNT(*) FROM cases", 0.0)
        };
        let e = alice
            .prepare(fedq_proto::v1::PrepareRequest {
                secure_aggregation: Default::default(),
                query: Some(rho),
                hold_ms: 5000,
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                e.code(),
                tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
            ),
            "{bad}: {e:?}"
        );
    }
    export_and_verify(&node, &pinned, "after non-finite costs").await;

    // The node restarts from its store, and the log still verifies with
    // the key pinned at the start; the refusals are there, summarised.
    node.stop(Duration::from_secs(30)).await.unwrap();
    node.start(Duration::from_secs(60)).await.unwrap();
    let entries = export_and_verify(&node, &pinned, "after a restart").await;
    let refused: u64 = entries
        .iter()
        .filter_map(|e| match &e.event {
            fedq_ledger::audit::Event::Refusals { count, .. } => Some(*count),
            _ => None,
        })
        .sum();
    assert_eq!(refused, 12, "every refusal is counted");
    assert!(
        entries
            .iter()
            .all(|e| e.event.kind() != "query_received"
                || !format!("{:?}", e.event).contains("bad-")),
        "a refused request was logged as received"
    );
    node.stop(Duration::from_secs(30)).await.unwrap();
}
