//! Budget limits: exhaustion refuses and releases nothing; concurrent
//! queries never spend more than the limits.

use fedq_engine::synth::Partner;
use fedq_node::config::BudgetLimits;
use fedq_pki::Role;
use fedq_proto::v1::{BudgetRequest, QueryRequest};
use fedq_tests::TestFederation;
use tonic::Code;

fn q(id: &str, epsilon: f64) -> QueryRequest {
    QueryRequest {
        query_id: id.into(),
        sql: "SELECT gender, COUNT(*) FROM cases GROUP BY gender".into(),
        epsilon,
        dry_run: false,
        rho: 0.0,
    }
}

async fn spent(
    client: &mut fedq_proto::v1::node_client::NodeClient<tonic::transport::Channel>,
) -> f64 {
    client
        .budget(BudgetRequest {})
        .await
        .unwrap()
        .into_inner()
        .budgets[0]
        .spent_by_analyst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhaustion_refuses_with_the_remaining_budget_and_releases_nothing() {
    let limits = BudgetLimits {
        keys_delta: None,
        keys_delta_per_analyst: None,
        keys_delta_total: None,
        per_analyst: 1.0,
        total: 10.0,
        per_query_max: 1.0,
        measure: Default::default(),
        delta: None,
    };
    let fed = TestFederation::start(&[(Partner::Ngo, 1000, 1)], limits).await;
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    let first = alice.query(q("a1", 0.4)).await.unwrap().into_inner();
    assert!((first.budget.unwrap().remaining_for_analyst - 0.6).abs() < 1e-9);
    alice.query(q("a2", 0.4)).await.unwrap();
    let refused = alice.query(q("a3", 0.4)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("0.2") && refused.message().contains("remaining"),
        "the refusal says what is left: {}",
        refused.message()
    );
    assert!(
        (spent(&mut alice).await - 0.8).abs() < 1e-9,
        "a refusal spends nothing"
    );
    // What is left can still be spent exactly.
    alice.query(q("a4", 0.2)).await.unwrap();
    assert!((spent(&mut alice).await - 1.0).abs() < 1e-9);
    let refused = alice.query(q("a5", 1e-6)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    // Another analyst has their own budget.
    let mut bob = fed.raw_client(0, Role::Analyst, "bob").await;
    bob.query(q("b1", 0.5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_queries_never_overspend_analyst_or_dataset_limits() {
    // Each analyst may spend 1.0, everybody together 1.5.
    let limits = BudgetLimits {
        keys_delta: None,
        keys_delta_per_analyst: None,
        keys_delta_total: None,
        per_analyst: 1.0,
        total: 1.5,
        per_query_max: 1.0,
        measure: Default::default(),
        delta: None,
    };
    let fed = TestFederation::start(&[(Partner::Hotline, 1000, 2)], limits).await;
    let mut tasks = Vec::new();
    for analyst in ["alice", "bob"] {
        for i in 0..15 {
            let mut c = fed.raw_client(0, Role::Analyst, analyst).await;
            tasks.push(tokio::spawn(async move {
                c.query(q(&format!("{analyst}-{i}"), 0.1)).await
            }));
        }
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) => assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}"),
        }
    }
    assert_eq!(ok, 15, "exactly 1.5 / 0.1 queries fit the dataset total");
    let a = spent(&mut fed.raw_client(0, Role::Analyst, "alice").await).await;
    let b = spent(&mut fed.raw_client(0, Role::Analyst, "bob").await).await;
    assert!(a <= 1.0 + 1e-9 && b <= 1.0 + 1e-9, "alice {a}, bob {b}");
    assert!((a + b - 1.5).abs() < 1e-9, "alice {a} + bob {b}");
}
