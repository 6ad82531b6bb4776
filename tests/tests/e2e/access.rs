//! Who gets in, and what for: certificates (missing, foreign, expired, not
//! yet valid, wrong role), the node's analyst list, per-analyst limits, a
//! CA-signed node key that never left the node, and the health service.

use std::time::{Duration, SystemTime};

use fedq_engine::synth::Partner;
use fedq_node::config::{AccessSection, AnalystAccess};
use fedq_pki::{Authority, Role};
use fedq_proto::v1::{BudgetRequest, QueryRequest};
use fedq_tests::{connect, roomy_budget, TestFederation};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::Code;

fn q(id: &str) -> QueryRequest {
    QueryRequest {
        query_id: id.into(),
        sql: "SELECT COUNT(*) FROM cases".into(),
        epsilon: 0.1,
        dry_run: false,
        rho: 0.0,
    }
}

/// Whether a query with this certificate pair gets an answer.
async fn query_with(
    fed: &TestFederation,
    pair: &fedq_pki::PemPair,
    name: &str,
) -> Result<(), String> {
    let dir = fed.dir.path().join("certs-under-test");
    pair.write(&dir, name).unwrap();
    let ca = fed.dir.path().join("ca/ca.pem");
    match connect(
        &fed.nodes[0],
        &ca,
        &dir.join(format!("{name}.pem")),
        &dir.join(format!("{name}.key")),
    )
    .await
    {
        Err(e) => Err(format!("connect: {e:?}")),
        Ok(mut c) => c
            .query(q(name))
            .await
            .map(|_| ())
            .map_err(|s| format!("{:?}: {} {:?}", s.code(), s.message(), s)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_current_certificates_from_the_federation_ca_with_the_right_role_get_in() {
    let fed = TestFederation::start(&[(Partner::Ngo, 200, 1)], roomy_budget()).await;
    let hour = Duration::from_secs(3600);
    let now = SystemTime::now();
    // The control: a valid analyst certificate is answered.
    query_with(
        &fed,
        &fed.ca.issue(Role::Analyst, "valid").unwrap(),
        "valid",
    )
    .await
    .expect("a valid certificate gets in");
    // Expired.
    let expired = fed
        .ca
        .issue_between(Role::Analyst, "expired", now - 48 * hour, now - 24 * hour)
        .unwrap();
    assert!(
        query_with(&fed, &expired, "expired").await.is_err(),
        "an expired certificate must be refused"
    );
    // Not yet valid.
    let future = fed
        .ca
        .issue_between(Role::Analyst, "future", now + 24 * hour, now + 48 * hour)
        .unwrap();
    assert!(
        query_with(&fed, &future, "future").await.is_err(),
        "a not-yet-valid certificate must be refused"
    );
    // From another CA.
    let other = Authority::generate("another CA").unwrap();
    assert!(query_with(
        &fed,
        &other.issue(Role::Analyst, "mallory").unwrap(),
        "mallory"
    )
    .await
    .is_err());
    // No client certificate at all.
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(fed.dir.path().join("ca/ca.pem")).unwrap(),
        ))
        .domain_name(fed.nodes[0].name.clone());
    let anonymous = async {
        let ch = Endpoint::from_shared(format!("https://{}", fed.nodes[0].config.node.listen))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))?;
        fedq_proto::v1::node_client::NodeClient::new(ch)
            .query(q("anon"))
            .await
            .map(|_| ())
            .map_err(|s| format!("{s:?}"))
    };
    assert!(anonymous.await.is_err(), "no client certificate, no entry");
    // Right CA, wrong role: an auditor may not query.
    let err = query_with(
        &fed,
        &fed.ca.issue(Role::Auditor, "auditor-x").unwrap(),
        "auditor-x",
    )
    .await
    .unwrap_err();
    assert!(
        err.starts_with("PermissionDenied") && err.contains("analyst certificate"),
        "{err}"
    );
    // A node certificate is a server certificate only: refused at the TLS
    // handshake, before any request (see trust.rs).
    let err = query_with(&fed, &fed.ca.issue(Role::Node, "node-x").unwrap(), "node-x")
        .await
        .unwrap_err();
    assert!(
        !err.starts_with("PermissionDenied") && !err.starts_with("Ok"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_analyst_list_binds_identities_to_datasets_and_refusals_are_logged() {
    let mut fed = TestFederation::start(&[(Partner::Hotline, 200, 2)], roomy_budget()).await;
    fed.stop_node(0).await;
    fed.nodes[0].config.access = AccessSection {
        analysts: vec![
            AnalystAccess {
                name: "alice".into(),
                datasets: vec!["cases".into()],
            },
            AnalystAccess {
                name: "carol".into(),
                datasets: vec![],
            },
        ],
    };
    fed.nodes[0].config.audit.auditors = vec!["auditor".into()];
    fed.start_node(0).await;
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    alice.query(q("a1")).await.expect("alice may query cases");
    let mut bob = fed.raw_client(0, Role::Analyst, "bob").await;
    let e = bob.query(q("b1")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("not an analyst of this node"),
        "{}",
        e.message()
    );
    let e = bob.budget(BudgetRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut carol = fed.raw_client(0, Role::Analyst, "carol").await;
    let e = carol.query(q("c1")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("may not query dataset \"cases\""),
        "{}",
        e.message()
    );
    assert!(carol
        .budget(BudgetRequest {})
        .await
        .unwrap()
        .into_inner()
        .budgets
        .is_empty());
    // Both attempts are in the audit log, in the refusal summaries that a
    // graceful stop writes (or the minute's end).
    fed.stop_node(0).await;
    fed.start_node(0).await;
    let mut auditor = fed.raw_client(0, Role::Auditor, "auditor").await;
    let mut stream = auditor
        .export_audit(fedq_proto::v1::ExportAuditRequest { since_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut refused = Vec::new();
    while let Some(line) = stream.message().await.unwrap() {
        let e = fedq_tests::Logged::parse(&line.json);
        if let fedq_ledger::audit::Event::Refusals {
            identity, example, ..
        } = e.event
        {
            refused.push((identity, example));
        }
    }
    assert!(
        refused
            .iter()
            .any(|(a, r)| a == "bob" && r.contains("not an analyst")),
        "{refused:?}"
    );
    assert!(
        refused
            .iter()
            .any(|(a, r)| a == "carol" && r.contains("may not query")),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_analysts_flood_does_not_starve_another_and_rates_are_limited() {
    let mut fed = TestFederation::start(&[(Partner::Ngo, 2000, 3)], roomy_budget()).await;
    fed.stop_node(0).await;
    fed.nodes[0].config.limits.concurrent_queries = 2;
    fed.nodes[0].config.limits.queries_per_minute = 1000;
    fed.start_node(0).await;
    // Alice floods with 40 concurrent queries: every connection is made
    // first, then all 40 are sent at once (sent while connecting, each
    // could finish before the next started on a slow machine, and none
    // would meet the limit).
    let mut clients = Vec::new();
    for _ in 0..40 {
        clients.push(fed.raw_client(0, Role::Analyst, "alice").await);
    }
    let go = std::sync::Arc::new(tokio::sync::Barrier::new(clients.len()));
    let mut flood = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        let go = std::sync::Arc::clone(&go);
        flood.push(tokio::spawn(async move {
            go.wait().await;
            c.query(q(&format!("flood-{i}"))).await
        }));
    }
    // Meanwhile Bob's query goes through.
    let mut bob = fed.raw_client(0, Role::Analyst, "bob").await;
    let started = std::time::Instant::now();
    bob.query(q("bob-1"))
        .await
        .expect("bob is not starved by alice's flood");
    let bob_took = started.elapsed();
    let mut limited = 0;
    for t in flood {
        if let Err(s) = t.await.unwrap() {
            assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
            assert!(s.message().contains("queries running"), "{}", s.message());
            limited += 1;
        }
    }
    assert!(limited > 0, "alice's flood hit her concurrency limit");
    eprintln!(
        "bob answered in {bob_took:?} during alice's flood; {limited} of alice's 40 were limited"
    );

    // A rate of 5 per minute: the sixth quick query is refused with a wait.
    fed.stop_node(0).await;
    fed.nodes[0].config.limits.queries_per_minute = 5;
    fed.start_node(0).await;
    let mut carol = fed.raw_client(0, Role::Analyst, "carol").await;
    for i in 0..5 {
        carol.query(q(&format!("rate-{i}"))).await.unwrap();
    }
    let e = carol.query(q("rate-5")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("5 queries per minute") && e.message().contains("retry in"),
        "{}",
        e.message()
    );
    let spent = carol
        .budget(BudgetRequest {})
        .await
        .unwrap()
        .into_inner()
        .budgets[0]
        .spent_by_analyst;
    assert!(
        (spent - 0.5).abs() < 1e-9,
        "the refused query spent nothing: {spent}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_key_signed_from_its_request_serves_and_the_health_service_answers() {
    // The CA lives on disk; the node makes its own key and sends only a
    // signing request.
    let fed = TestFederation::start(&[(Partner::Ngo, 200, 4)], roomy_budget()).await;
    let ca_dir = fed.dir.path().join("ca");
    fed.ca.pem.write(&ca_dir, "ca").unwrap();
    let ca = Authority::load(&ca_dir).expect("load the CA from disk");
    let (key, csr) = fedq_pki::key_and_request("node-csr").unwrap();
    let cert = ca.sign_request(Role::Node, "node-csr", &csr, 30).unwrap();
    let der = x509_der(&cert);
    let who = fedq_pki::caller_from_der(&der).unwrap();
    assert_eq!((who.name.as_str(), who.role.as_str()), ("node-csr", "node"));
    // Serve a node with that certificate and query it.
    let dir = fed.dir.path().join("node-csr");
    let mut config = fedq_tests::node_config(&fed.ca, &dir, "node-csr", roomy_budget());
    std::fs::write(dir.join("certs/node.pem"), cert).unwrap();
    std::fs::write(dir.join("certs/node.key"), key).unwrap();
    let running = fedq_node::server::start(config.clone()).await.unwrap();
    config.node.listen = running.addr;
    let node = fedq_tests::TestNode {
        name: "node-csr".into(),
        config,
        csv: Default::default(),
        running: None,
    };
    let (c, k) = fed.client_cert(Role::Analyst, "alice");
    let mut client = connect(&node, &ca_dir.join("ca.pem"), &c, &k)
        .await
        .expect("the CSR-signed node is trusted");
    client.query(q("csr")).await.unwrap();
    // Health: SERVING for the node service.
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(ca_dir.join("ca.pem")).unwrap(),
        ))
        .identity(tonic::transport::Identity::from_pem(
            std::fs::read(&c).unwrap(),
            std::fs::read(&k).unwrap(),
        ))
        .domain_name("node-csr");
    let ch = Endpoint::from_shared(format!("https://{}", running.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "fedq.v1.Node".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    running.stop().await.unwrap();
}

/// The DER bytes of a PEM certificate.
fn x509_der(pem: &str) -> Vec<u8> {
    fedq_pki::der_from_pem(pem).expect("a PEM certificate")
}
