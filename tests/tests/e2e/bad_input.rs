//! Bad input gets a clear error that says what is wrong, and spends nothing.

use fedq_engine::synth::Partner;
use fedq_pki::{Authority, Role};
use fedq_proto::v1::{BudgetRequest, QueryRequest};
use fedq_tests::{connect, TestFederation};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_queries_are_refused_clearly_and_spend_nothing() {
    let limits = fedq_node::config::BudgetLimits {
        keys_delta: None,
        keys_delta_per_analyst: None,
        keys_delta_total: None,
        per_analyst: 5.0,
        total: 10.0,
        per_query_max: 1.0,
        measure: Default::default(),
        delta: None,
    };
    let fed = TestFederation::start(&[(Partner::Ngo, 500, 1)], limits).await;
    let mut c = fed.raw_client(0, Role::Analyst, "alice").await;
    let ok_sql = "SELECT COUNT(*) FROM cases";
    let cases: Vec<(&str, f64, Code, &str)> = vec![
        (
            "SELEC COUNT(*) FROM cases",
            0.5,
            Code::InvalidArgument,
            "syntax",
        ),
        (
            "SELECT COUNT(*) FROM cases WHERE nope = 1",
            0.5,
            Code::InvalidArgument,
            "unknown column \"nope\"",
        ),
        (
            "SELECT COUNT(*) FROM victims",
            0.5,
            Code::NotFound,
            "dataset \"victims\" is not served",
        ),
        (
            "SELECT * FROM cases",
            0.5,
            Code::InvalidArgument,
            "SELECT *",
        ),
        (
            "SELECT COUNT(*) FROM cases GROUP BY traffickMonths * 100",
            0.5,
            Code::InvalidArgument,
            "BIN(traffickMonths * 100, k)",
        ),
        (
            "SELECT COUNT(*) FROM cases WHERE gender = 'female'",
            0.5,
            Code::InvalidArgument,
            "declared domain of gender",
        ),
        (ok_sql, 0.0, Code::InvalidArgument, "greater than 0"),
        (ok_sql, -1.0, Code::InvalidArgument, "greater than 0"),
        (ok_sql, f64::NAN, Code::InvalidArgument, "NaN"),
        (ok_sql, f64::INFINITY, Code::InvalidArgument, "infinite"),
        (ok_sql, 1.5, Code::InvalidArgument, "per-query maximum of 1"),
    ];
    for (i, (sql, epsilon, code, needle)) in cases.into_iter().enumerate() {
        let e = c
            .query(QueryRequest {
                query_id: format!("bad-{i}"),
                sql: sql.into(),
                epsilon,
                dry_run: false,
                rho: 0.0,
            })
            .await
            .expect_err(sql);
        assert_eq!(e.code(), code, "{sql} / {epsilon}: {}", e.message());
        assert!(
            e.message().contains(needle),
            "{sql} / {epsilon}: {:?} should mention {needle:?}",
            e.message()
        );
    }
    // Oversized SQL.
    let long = format!(
        "SELECT COUNT(*) FROM cases WHERE {}",
        vec!["traffickMonths > 1"; 1000].join(" OR ")
    );
    let e = c
        .query(QueryRequest {
            query_id: "long".into(),
            sql: long,
            epsilon: 0.5,
            dry_run: false,
            rho: 0.0,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted
        ),
        "{e:?}"
    );
    // An oversized request is refused by the transport limit.
    let huge = "x".repeat(200 * 1024);
    let e = c
        .query(QueryRequest {
            query_id: "huge".into(),
            sql: huge,
            epsilon: 0.5,
            dry_run: false,
            rho: 0.0,
        })
        .await
        .unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    // A bad query id.
    let e = c
        .query(QueryRequest {
            query_id: String::new(),
            sql: ok_sql.into(),
            epsilon: 0.5,
            dry_run: false,
            rho: 0.0,
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("query_id"));
    // Nothing was spent by any of it; a dry run spends nothing either.
    let dry = c
        .query(QueryRequest {
            query_id: "dry".into(),
            sql: ok_sql.into(),
            epsilon: 0.5,
            dry_run: true,
            rho: 0.0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        dry.dry_run && dry.measurements[0].values.is_empty() && dry.measurements[0].scale == 2.0
    );
    let b = c.budget(BudgetRequest {}).await.unwrap().into_inner();
    assert_eq!(b.budgets[0].spent_by_analyst, 0.0);
    // And the node still answers a good query.
    c.query(QueryRequest {
        query_id: "good".into(),
        sql: ok_sql.into(),
        epsilon: 0.5,
        dry_run: false,
        rho: 0.0,
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_certificates_are_refused() {
    let fed = TestFederation::start(&[(Partner::Ngo, 200, 1)], fedq_tests::roomy_budget()).await;
    let q = || QueryRequest {
        query_id: "x".into(),
        sql: "SELECT COUNT(*) FROM cases".into(),
        epsilon: 0.5,
        dry_run: false,
        rho: 0.0,
    };
    // A certificate from another CA: the TLS handshake or the first call fails.
    let other = Authority::generate("someone else's CA").unwrap();
    let dir = fed.dir.path().join("other");
    other
        .issue(Role::Analyst, "mallory")
        .unwrap()
        .write(&dir, "mallory")
        .unwrap();
    let ca = fed.dir.path().join("ca/ca.pem");
    match connect(
        &fed.nodes[0],
        &ca,
        &dir.join("mallory.pem"),
        &dir.join("mallory.key"),
    )
    .await
    {
        Err(_) => {}
        Ok(mut c) => {
            let e = c.query(q()).await.unwrap_err();
            // Refused by the node's TLS layer: the handshake alert (UnknownCA)
            // or the closed connection surfaces, depending on timing.
            assert!(
                matches!(
                    e.code(),
                    Code::Unknown | Code::Unavailable | Code::Cancelled
                ),
                "{e:?}"
            );
        }
    }
    // A node certificate (right CA, a server's) may not query: refused at
    // the handshake (the connection may be set up before the node's alert
    // arrives, so the refusal can surface at the first call).
    let (cert, key) = fed.client_cert(Role::Node, "node-x");
    let ca = fed.dir.path().join("ca/ca.pem");
    if let Ok(mut as_node) = fedq_tests::connect(&fed.nodes[0], &ca, &cert, &key).await {
        let e = as_node.query(q()).await.unwrap_err();
        assert!(
            matches!(
                e.code(),
                Code::Unknown | Code::Unavailable | Code::Cancelled
            ),
            "{e:?}"
        );
    }
}
