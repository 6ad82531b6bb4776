//! A dataset with a person-level privacy unit, through a real node over
//! mutual TLS: `Describe` states the unit, every sensitivity is multiplied
//! by the per-person bound, the person identifier can never be queried,
//! and a record without one is refused at ingest.

use std::path::Path;
use std::time::Duration;

use fedq::client::new_query_id;
use fedq_engine::synth::{self, Partner};
use fedq_node::config::PrivacyUnitConfig;
use fedq_proto::v1::{BudgetRequest, DescribeRequest, QueryRequest};
use fedq_tests::{node_config, roomy_budget, TestFederation, TestNode};

const BOUND: u32 = 2;

/// The synthetic CSV with a `personId` column: about three records a person.
fn write_csv_with_persons(path: &Path, rows: usize, blank_at: Option<usize>) {
    let mut plain = Vec::new();
    synth::write_csv(Partner::Ngo, rows, 5, &mut plain).unwrap();
    let mut r = csv::Reader::from_reader(plain.as_slice());
    let mut w = csv::Writer::from_path(path).unwrap();
    let mut header: Vec<String> = r.headers().unwrap().iter().map(String::from).collect();
    header.push("personId".into());
    w.write_record(&header).unwrap();
    for (i, rec) in r.records().enumerate() {
        let mut rec: Vec<String> = rec.unwrap().iter().map(String::from).collect();
        rec.push(if blank_at == Some(i) {
            String::new()
        } else {
            format!("P-{:05}", i % (rows / 3))
        });
        w.write_record(&rec).unwrap();
    }
    w.flush().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn person_level_unit_scales_sensitivity_and_hides_the_identifier() {
    let mut fed = TestFederation::start(&[], roomy_budget()).await;
    let node_dir = fed.dir.path().join("persons");
    std::fs::create_dir_all(&node_dir).unwrap();
    let csv = node_dir.join("cases.csv");
    write_csv_with_persons(&csv, 3000, None);
    let mut config = node_config(&fed.ca, &node_dir, "persons", roomy_budget());
    config.datasets[0].privacy_unit = Some(PrivacyUnitConfig {
        person_column: "personId".into(),
        max_records: BOUND,
    });
    let schema = config.datasets[0].schema().unwrap();
    {
        let store = fedq_ledger::store::Store::open(&config.resolve(&config.node.store)).unwrap();
        fedq_node::ingest::ingest_csv(&store, "cases", &schema, &csv, false).unwrap();

        // A record without a person identifier is refused, naming its line.
        let bad = node_dir.join("bad.csv");
        write_csv_with_persons(&bad, 300, Some(41));
        let e = fedq_node::ingest::ingest_csv(&store, "cases", &schema, &bad, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("person identifier is missing") && e.contains(":43"),
            "{e}"
        );
    }
    fed.nodes.push(TestNode {
        name: "persons".into(),
        config,
        csv,
        running: None,
    });
    fed.start_node(0).await;
    let mut client = fed.raw_client(0, fedq_pki::Role::Analyst, "alice").await;

    let d = client
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    let ds = &d.datasets[0];
    assert_eq!(
        ds.privacy_unit,
        format!("person (identified by personId, at most {BOUND} records per person)")
    );
    assert!(ds.columns.iter().all(|c| c.name != "personId"));

    // Every sensitivity is the per-record one times the bound.
    let r = client
        .query(QueryRequest {
            query_id: new_query_id(),
            sql: "SELECT COUNT(*), SUM(traffickMonths) FROM cases".into(),
            epsilon: 1.0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let b = f64::from(BOUND);
    assert_eq!(r.measurements[0].sensitivity, b);
    assert_eq!(r.measurements[1].sensitivity, 120.0 * b);
    assert!((r.measurements[0].scale - b / 0.5).abs() < 1e-9);
    // At most BOUND of each person's ~3 records count.
    let noisy = r.measurements[0].values[0] as f64;
    assert!(noisy < 1000.0 * b + 60.0, "count {noisy}");

    // The identifier can never be selected, filtered or grouped by, and
    // trying spends nothing.
    let before = client.budget(BudgetRequest {}).await.unwrap().into_inner();
    for sql in [
        "SELECT COUNT(personId) FROM cases",
        "SELECT COUNT(*) FROM cases WHERE personId = 'P-00001'",
        "SELECT personId, COUNT(*) FROM cases GROUP BY personId",
    ] {
        let e = client
            .query(QueryRequest {
                query_id: new_query_id(),
                sql: sql.into(),
                epsilon: 1.0,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(
            e.message().contains("person identifier"),
            "{sql}: {}",
            e.message()
        );
    }
    let after = client.budget(BudgetRequest {}).await.unwrap().into_inner();
    assert_eq!(
        before.budgets[0].spent_by_analyst,
        after.budgets[0].spent_by_analyst
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
}
