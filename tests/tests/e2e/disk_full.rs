//! A full disk (issue 16, item 5): a node whose store stops taking writes
//! refuses queries without releasing anything, reports NOT_SERVING and
//! stops with the exit code its supervisor restarts it on; restarted once
//! the disk takes writes again, it serves, its log verifies and its ledger
//! equals the debits in its log. Before the fix it went on answering
//! health SERVING while every query failed until someone restarted it.
//!
//! The disk is filled by a fail point (`fedq_ledger::fault::fail_point`):
//! every flush of the node's store fails as a full disk fails it.

use std::collections::HashMap;
use std::time::Duration;

use fedq_engine::synth::Partner;
use fedq_ledger::audit::{parse_public_key, verify, Event};
use fedq_ledger::fault::fail_point::{self, Point};
use fedq_pki::Role;
use fedq_proto::v1::{BudgetRequest, QueryRequest};
use fedq_tests::{roomy_budget, TestFederation};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_check_response::ServingStatus;

fn q(id: &str, epsilon: f64) -> QueryRequest {
    QueryRequest {
        query_id: id.into(),
        sql: "SELECT gender, COUNT(*) FROM cases GROUP BY gender".into(),
        epsilon,
        dry_run: false,
        rho: 0.0,
    }
}

/// The health status of node 0's `fedq.v1.Node` service, or `None` when
/// the node does not answer (stopped).
async fn health(fed: &TestFederation) -> Option<i32> {
    let (cert, key) = fed.client_cert(Role::Analyst, "prober");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(fed.dir.path().join("ca/ca.pem")).unwrap(),
        ))
        .identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ))
        .domain_name(fed.nodes[0].name.clone());
    let ch = Endpoint::from_shared(format!("https://{}", fed.nodes[0].config.node.listen))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .ok()?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "fedq.v1.Node".into(),
        })
        .await
        .ok()
        .map(|r| r.into_inner().status)
}

/// Node 0's spent budget (alice on `cases`).
async fn spent(fed: &TestFederation) -> f64 {
    let mut c = fed.raw_client(0, Role::Analyst, "alice").await;
    c.budget(BudgetRequest {})
        .await
        .unwrap()
        .into_inner()
        .budgets[0]
        .spent_by_analyst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_node_which_restarts_whole() {
    let mut fed = TestFederation::start(&[(Partner::Ngo, 2000, 11)], roomy_budget()).await;
    fed.stop_node(0).await;
    fed.nodes[0].config.audit.auditors = vec!["auditor".into()];
    fed.start_node(0).await;
    let store = fed.nodes[0].config.resolve(&fed.nodes[0].config.node.store);
    let mut c = fed.raw_client(0, Role::Analyst, "alice").await;
    c.query(q("before", 0.5)).await.expect("answered before");
    assert_eq!(health(&fed).await, Some(ServingStatus::Serving as i32));

    // The disk fills: every flush fails from now on.
    fail_point::arm(&store, Point::Flush, 0, u64::MAX);
    let e = c.query(q("full-1", 0.25)).await.unwrap_err();
    assert_ne!(e.code(), tonic::Code::Ok);
    assert!(
        !e.message().contains("no space") && !e.message().contains("injected"),
        "the analyst sees no storage detail: {e:?}"
    );
    // NOT_SERVING (then gone), never SERVING again.
    let mut said = Vec::new();
    for _ in 0..100 {
        let h = health(&fed).await;
        said.push(h);
        if h != Some(ServingStatus::Serving as i32) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        said.contains(&Some(ServingStatus::NotServing as i32)) || said.last() == Some(&None),
        "health after the failure: {said:?}"
    );
    // Another query meanwhile is refused too (or finds the node gone).
    if let Ok(r) = c.query(q("full-2", 0.125)).await {
        panic!("answered on a failed store: {r:?}");
    }
    // The node stops by itself, with the supervisor's exit code.
    let running = fed.nodes[0].running.take().expect("running");
    let stopped = tokio::time::timeout(Duration::from_secs(30), running.wait())
        .await
        .expect("the node stops by itself after its store failed");
    let e = stopped.expect_err("a failed store is an error exit");
    assert_eq!(
        fedq_node::server::exit_code(&e),
        fedq_ledger::fault::EXIT_STORE_FAILED,
        "{e:#}"
    );

    // The disk takes writes again; the supervisor restarts the node.
    fail_point::disarm(&store);
    fed.start_node(0).await;
    assert_eq!(health(&fed).await, Some(ServingStatus::Serving as i32));
    let (text, entries, key) = fed.pull_audit(0).await;
    verify(&text, &parse_public_key(&key).unwrap(), 0, None)
        .expect("the log verifies after the failure and the restart");
    let mut debits: HashMap<String, u64> = HashMap::new();
    let mut nano = 0u64;
    let mut released = Vec::new();
    for e in &entries {
        match &e.event {
            Event::Debited {
                query_id, epsilon, ..
            } => {
                *debits.entry(query_id.clone()).or_default() += 1;
                nano += epsilon.to_nano().expect("a debit in nano-epsilon");
            }
            Event::Released { query_id, .. } => released.push(query_id.clone()),
            _ => {}
        }
    }
    assert_eq!(
        released,
        ["before"],
        "nothing was released on the full disk"
    );
    assert_eq!(
        debits.get("full-2"),
        None,
        "nothing was debited after the failure"
    );
    let spent_now = spent(&fed).await;
    assert!(
        (spent_now - nano as f64 / 1e9).abs() < 1e-9,
        "the ledger ({spent_now}) equals the debits in the log ({nano} nano)"
    );
    // A debit that reached the disk without its release is lost budget at
    // worst (0.5 + 0.25), never a gain.
    assert!(
        (0.5 - 1e-9..=0.75 + 1e-9).contains(&spent_now),
        "{spent_now}"
    );

    // It serves again; a retry of the refused query is answered, debited
    // at most once.
    let mut c = fed.raw_client(0, Role::Analyst, "alice").await;
    c.query(q("full-1", 0.25))
        .await
        .expect("a retry is answered");
    c.query(q("after", 0.5)).await.expect("answered after");
    let spent_after = spent(&fed).await;
    assert!(
        (spent_after - 1.25).abs() < 1e-9,
        "before + full-1 + after, each once: {spent_after}"
    );
    fed.stop_node(0).await;
}
