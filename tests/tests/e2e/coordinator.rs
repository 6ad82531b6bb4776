//! The coordinator as a researcher relies on it: deadlines, retries that
//! never spend twice, quorums that spend nothing when not met, reservations
//! that expire, dry runs that match the real mechanism, outputs that agree.

use std::time::{Duration, Instant};

use fedq::client::{new_query_id, Calls, Failure};
use fedq::combine::{combine, sum_half_width, ALPHA};
use fedq::federation::NodeEntry;
use fedq::output::{render, Format};
use fedq::run::{run_query, QueryOptions};
use fedq_engine::synth::Partner;
use fedq_ledger::audit::Event;
use fedq_pki::Role;
use fedq_proto::v1::{BudgetRequest, ExportAuditRequest, PrepareRequest, QueryRequest};
use fedq_tests::{roomy_budget, TestFederation};

const SQL: &str = "SELECT gender, COUNT(*) FROM cases GROUP BY gender";

fn opts(epsilon: f64, calls: Calls) -> QueryOptions {
    QueryOptions {
        secure: false,
        epsilon,
        rho: 0.0,
        dry_run: false,
        calls,
        min_nodes: None,
        query_id: new_query_id(),
    }
}

/// A "node" that accepts TCP connections and never says a word.
async fn black_hole() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (format!("https://{addr}"), task)
}

async fn spent(fed: &TestFederation, i: usize, analyst: &str) -> f64 {
    let mut c = fed.raw_client(i, Role::Analyst, analyst).await;
    c.budget(BudgetRequest {})
        .await
        .unwrap()
        .into_inner()
        .budgets[0]
        .spent_by_analyst
}

async fn log_kinds(fed: &TestFederation, i: usize, query_id: &str) -> Vec<String> {
    let mut c = fed.raw_client(i, Role::Auditor, "auditor").await;
    let mut stream = c
        .export_audit(ExportAuditRequest { since_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut kinds = Vec::new();
    while let Some(line) = stream.message().await.unwrap() {
        let e = fedq_tests::Logged::parse(&line.json);
        let id = match &e.event {
            Event::Debited { query_id, .. }
            | Event::Released { query_id, .. }
            | Event::Reserved { query_id, .. }
            | Event::ReservationReturned { query_id, .. }
            | Event::Replayed { query_id, .. } => Some(query_id.clone()),
            _ => None,
        };
        if id.as_deref() == Some(query_id) {
            kinds.push(e.event.kind().to_string());
        }
    }
    kinds
}

async fn with_auditor(partners: &[(Partner, usize, u64)]) -> TestFederation {
    let mut fed = TestFederation::start(partners, roomy_budget()).await;
    for i in 0..fed.nodes.len() {
        fed.stop_node(i).await;
        fed.nodes[i].config.audit.auditors = vec!["auditor".into()];
        fed.start_node(i).await;
    }
    fed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_answers_is_cut_at_the_deadline_and_a_quorum_spends_nothing() {
    let fed = with_auditor(&[(Partner::Ngo, 400, 1), (Partner::Hotline, 400, 2)]).await;
    let (endpoint, hole) = black_hole().await;
    let mut coordinator = fed.federation("alice");
    coordinator.config.nodes.push(NodeEntry {
        name: "silent".into(),
        endpoint,
    });
    let calls = Calls {
        timeout: Duration::from_secs(2),
        retries: 2,
    };

    // Without a quorum: partial, naming the silent node, at the deadline.
    let o = opts(0.5, calls);
    let started = Instant::now();
    let outcomes = run_query(&coordinator, SQL, &o).await.unwrap();
    let took = started.elapsed();
    let c = combine(SQL, &o.query_id, 0.5, &outcomes);
    assert!(c.partial);
    assert!(
        matches!(c.nodes[2].failure, Some(Failure::TimedOut(_))),
        "{:?}",
        c.nodes[2]
    );
    assert!(
        took < Duration::from_secs(8),
        "finished at the deadline, not later: {took:?}"
    );
    assert_eq!(c.rows[0].nodes.len(), 2);

    // With a quorum of 3: refused before any release; budgets unchanged.
    let before = [spent(&fed, 0, "alice").await, spent(&fed, 1, "alice").await];
    let mut q = opts(0.5, calls);
    q.min_nodes = Some(3);
    let fedq::run::RunError::Quorum(failure) = run_query(&coordinator, SQL, &q).await.unwrap_err()
    else {
        panic!("expected a quorum failure")
    };
    assert_eq!((failure.accepted, failure.needed), (2, 3));
    assert!(
        failure.to_string().contains("nothing was released"),
        "{failure}"
    );
    assert!(failure.cancel_failed.is_empty());
    for (i, was) in before.iter().enumerate() {
        assert!(
            (spent(&fed, i, "alice").await - was).abs() < 1e-12,
            "node {i}'s budget changed"
        );
        assert_eq!(
            log_kinds(&fed, i, &q.query_id).await,
            vec!["reserved", "reservation_returned"]
        );
    }
    // A quorum of 2 is met by the two live nodes: released, debited once each.
    let mut q = opts(0.5, calls);
    q.min_nodes = Some(2);
    let outcomes = run_query(&coordinator, SQL, &q).await.unwrap();
    assert_eq!(outcomes.iter().filter(|o| o.result.is_ok()).count(), 2);
    for i in 0..2 {
        assert_eq!(
            log_kinds(&fed, i, &q.query_id).await,
            vec!["reserved", "released"]
        );
    }
    hole.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_fails_once_then_recovers_is_retried_and_debited_once() {
    let mut fed = with_auditor(&[(Partner::Ngo, 400, 3), (Partner::CaseManagement, 400, 4)]).await;
    let coordinator = fed.federation("alice");
    fed.stop_node(1).await;
    let o = opts(
        0.5,
        Calls {
            timeout: Duration::from_secs(20),
            retries: 4,
        },
    );
    let query = {
        let coordinator = coordinator.clone();
        let o = o.clone();
        tokio::spawn(async move { run_query(&coordinator, SQL, &o).await })
    };
    // The node comes back while the coordinator is backing off.
    tokio::time::sleep(Duration::from_millis(400)).await;
    fed.start_node(1).await;
    let outcomes = query.await.unwrap().unwrap();
    assert!(
        outcomes.iter().all(|o| o.result.is_ok()),
        "{:?}",
        outcomes.iter().map(|o| &o.result).collect::<Vec<_>>().len()
    );
    for i in 0..2 {
        assert_eq!(
            log_kinds(&fed, i, &o.query_id).await,
            vec!["debited", "released"],
            "node {i}"
        );
        assert!((spent(&fed, i, "alice").await - 0.5).abs() < 1e-9);
    }
    // Running the same id again (a retry after a lost answer) replays.
    let again = run_query(&coordinator, SQL, &o).await.unwrap();
    assert!(again.iter().all(|o| o.result.as_ref().unwrap().replayed));
    assert!((spent(&fed, 1, "alice").await - 0.5).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncommitted_reservation_expires_and_returns_its_budget() {
    let fed = with_auditor(&[(Partner::Hotline, 300, 5)]).await;
    let mut c = fed.raw_client(0, Role::Analyst, "alice").await;
    let id = new_query_id();
    let r = c
        .prepare(PrepareRequest {
            secure_aggregation: Default::default(),
            query: Some(QueryRequest {
                query_id: id.clone(),
                sql: SQL.into(),
                epsilon: 0.7,
                dry_run: false,
                rho: 0.0,
            }),
            hold_ms: 1000,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        (r.budget.unwrap().spent_by_analyst - 0.7).abs() < 1e-9,
        "reserved counts as spent"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while spent(&fed, 0, "alice").await > 0.0 {
        assert!(Instant::now() < deadline, "the reservation never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        log_kinds(&fed, 0, &id).await,
        vec!["reserved", "reservation_returned"]
    );
    let e = c
        .commit(fedq_proto::v1::CommitRequest {
            query_id: id,
            participants: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("no live reservation"),
        "{}",
        e.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_spends_nothing_and_predicts_the_real_interval() {
    let fed = TestFederation::start(
        &[
            (Partner::Ngo, 300, 6),
            (Partner::Hotline, 300, 7),
            (Partner::CaseManagement, 300, 8),
        ],
        roomy_budget(),
    )
    .await;
    let coordinator = fed.federation("alice");
    let calls = Calls {
        timeout: Duration::from_secs(10),
        retries: 0,
    };
    let mut dry = opts(0.5, calls);
    dry.dry_run = true;
    let planned = run_query(&coordinator, SQL, &dry).await.unwrap();
    for i in 0..3 {
        assert_eq!(
            spent(&fed, i, "alice").await,
            0.0,
            "a dry run spends nothing"
        );
    }
    let scales: Vec<f64> = planned
        .iter()
        .map(|o| o.result.as_ref().unwrap().measurements[0].scale)
        .collect();
    assert!(planned
        .iter()
        .all(|o| o.result.as_ref().unwrap().measurements[0].values.is_empty()));
    let expected = sum_half_width(&scales, ALPHA);
    let real = opts(0.5, calls);
    let outcomes = run_query(&coordinator, SQL, &real).await.unwrap();
    let c = combine(SQL, &real.query_id, 0.5, &outcomes);
    for row in &c.rows {
        let e = row.estimates[0].unwrap();
        assert_eq!(
            e.ci_high - e.value,
            expected,
            "the dry run's interval is the real one's"
        );
    }
    let plan = fedq::output::render_plan(SQL, &planned, Format::Json).unwrap();
    let v: serde_json::Value = serde_json::from_str(&plan).unwrap();
    let combined = v["measurements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["node"].as_str().unwrap().starts_with("combined"))
        .unwrap();
    assert_eq!(combined["ci95_half_width"].as_f64().unwrap(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_csv_carry_the_same_numbers_as_the_table() {
    let fed = TestFederation::start(
        &[(Partner::Ngo, 300, 9), (Partner::Hotline, 300, 10)],
        roomy_budget(),
    )
    .await;
    let coordinator = fed.federation("alice");
    let sql = "SELECT ageBroad, COUNT(*), AVG(traffickMonths) FROM cases GROUP BY ageBroad";
    let o = opts(
        1.0,
        Calls {
            timeout: Duration::from_secs(10),
            retries: 0,
        },
    );
    let outcomes = run_query(&coordinator, sql, &o).await.unwrap();
    let c = combine(sql, &o.query_id, 1.0, &outcomes);
    let table = render(&c, Format::Table).unwrap();
    let json: serde_json::Value = serde_json::from_str(&render(&c, Format::Json).unwrap()).unwrap();
    let csv_text = render(&c, Format::Csv).unwrap();
    let mut reader = csv::Reader::from_reader(csv_text.as_bytes());
    let header = reader.headers().unwrap().clone();
    assert_eq!(&header[0], "ageBroad");
    assert_eq!(&header[1], "COUNT(*)");
    let records: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(records.len(), rows.len());
    assert_eq!(rows.len(), 10, "9 age bands and (missing)");
    for (rec, row) in records.iter().zip(rows) {
        let key = row["key"][0].as_str().unwrap();
        assert_eq!(&rec[0], key);
        let count = row["estimates"][0]["value"].as_f64().unwrap();
        assert_eq!(rec[1].parse::<f64>().unwrap(), count);
        // serde_json's default float parser may be one ulp off the printed
        // shortest form; the CSV and JSON texts themselves agree.
        let avg = row["estimates"][1]["value"].as_f64();
        match (rec[4].parse::<f64>().ok(), avg) {
            (Some(a), Some(b)) => assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{a} vs {b}"),
            (a, b) => assert_eq!(a, b),
        }
        // The table shows the same count (with thousands separators) on the key's line.
        let line = table
            .lines()
            .find(|l| l.contains(&format!(" {key} ")))
            .unwrap_or_else(|| panic!("{key} in\n{table}"));
        let shown = fedq_tests::thousands(count as i64);
        assert!(line.contains(&shown), "{line} should show {shown}");
        if let Some(a) = avg {
            let shown = if a.fract() == 0.0 {
                fedq_tests::thousands(a as i64)
            } else {
                format!("{a:.2}")
            };
            assert!(
                line.contains(&format!(" {shown} ")),
                "{line} should show {shown}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_nodes_answer_one_query() {
    let partners: Vec<(Partner, usize, u64)> = (0..30)
        .map(|i| (Partner::ALL[i % 3], 200, i as u64))
        .collect();
    let fed = TestFederation::start(&partners, roomy_budget()).await;
    let coordinator = fed.federation("alice");
    let o = opts(
        0.5,
        Calls {
            timeout: Duration::from_secs(30),
            retries: 1,
        },
    );
    let started = Instant::now();
    let outcomes = run_query(&coordinator, SQL, &o).await.unwrap();
    let took = started.elapsed();
    let c = combine(SQL, &o.query_id, 0.5, &outcomes);
    assert!(
        !c.partial,
        "{:?}",
        c.nodes
            .iter()
            .filter(|n| n.failure.is_some())
            .collect::<Vec<_>>()
    );
    assert!(c.rows.iter().all(|r| r.nodes.len() == 30));
    let slowest = outcomes.iter().map(|o| o.elapsed).max().unwrap();
    eprintln!("30-node fan-out (debug build): {took:?} in all, slowest node call {slowest:?}");
}

/// A coordinator reuses each node's Describe for a while (half the calls
/// of a query); a node that changes what it declares meanwhile (here: its
/// ledger's measure) is not trusted on the stale description: its answer
/// disagrees, is left out and named, and the next query describes it
/// afresh and uses it again, without a new `Federation`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_changes_its_declaration_is_described_afresh() {
    let mut fed = TestFederation::start(
        &[(Partner::Ngo, 400, 41), (Partner::Hotline, 400, 42)],
        roomy_budget(),
    )
    .await;
    let coordinator = fed.federation("alice");
    let calls = Calls {
        timeout: Duration::from_secs(20),
        retries: 1,
    };
    // A dry run describes both nodes (and spends nothing).
    let mut dry = opts(0.2, calls);
    dry.dry_run = true;
    run_query(&coordinator, SQL, &dry).await.unwrap();
    // Node 1 now accounts in zCDP (nothing spent there yet, so it may).
    fed.stop_node(1).await;
    fed.nodes[1].config.datasets[0].budget = fedq_node::config::BudgetLimits {
        measure: fedq_dp::accounting::Measure::Zcdp,
        delta: Some(1e-7),
        ..roomy_budget()
    };
    fed.start_node(1).await;
    let mut moved = coordinator.clone();
    moved.config.nodes[1].endpoint = format!("https://{}", fed.nodes[1].config.node.listen);
    // Its answer states another measure than the kept description: left
    // out, named; node 0 still answers.
    let o = opts(0.2, calls);
    let c = combine(
        SQL,
        &o.query_id,
        0.2,
        &run_query(&moved, SQL, &o).await.unwrap(),
    );
    assert!(c.nodes[0].failure.is_none(), "{:?}", c.nodes[0]);
    match &c.nodes[1].failure {
        Some(Failure::LeftOut(why)) => assert!(why.contains("node-1"), "{why}"),
        other => panic!("a stale description must not vouch for an answer: {other:?}"),
    }
    // The next query describes it again and uses it.
    let o = opts(0.2, calls);
    let c = combine(
        SQL,
        &o.query_id,
        0.2,
        &run_query(&moved, SQL, &o).await.unwrap(),
    );
    assert!(!c.partial, "{:?}", c.nodes);
    assert_eq!(c.nodes[1].measure.as_deref(), Some("zcdp"));
}
