//! Released keys: GROUP BY an open-domain column through real nodes over
//! mutual TLS. Frequent keys come back near their true counts, keys held by
//! a single record never do, WHERE on a value never seen matches nothing
//! without saying so, the threshold's delta is debited on its own budget
//! (and refused, spending nothing, once that budget is gone), the audit
//! log states it, and the labels survive a restart.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use fedq::client::new_query_id;
use fedq::combine::combine;
use fedq_engine::synth::{self, Partner};
use fedq_ledger::audit::Event;
use fedq_node::config::BudgetLimits;
use fedq_pki::Role;
use fedq_plan::schema::{ColumnSpec, ColumnType, Schema};
use fedq_proto::v1::{
    column_schema::Kind, BudgetRequest, DescribeRequest, PrepareRequest, QueryRequest,
};
use fedq_tests::{node_config, roomy_budget, TestFederation, TestNode};

const COLUMN: &str = "nationalityText";
const ROWS: usize = 2000;
/// Released-key delta per query, and per analyst (five open queries).
const KEYS_DELTA: f64 = 1e-6;
const KEYS_PER_ANALYST: f64 = 5e-6;

/// The open column's value of row `i` on node `node`: 60% Filipino, 25%
/// Ukrainian, 10% Moldovan, 5% missing; the first five rows hold a value
/// no other record has.
fn nationality(node: usize, i: usize) -> String {
    if i < 5 {
        return format!("Rare-{node}-{i}");
    }
    match i % 20 {
        0..=11 => "Filipino",
        12..=16 => "Ukrainian",
        17 | 18 => "Moldovan",
        _ => "",
    }
    .to_string()
}

/// The synthetic CSV plus the open column.
fn write_csv(path: &Path, node: usize, seed: u64) {
    let mut plain = Vec::new();
    synth::write_csv(Partner::Ngo, ROWS, seed, &mut plain).unwrap();
    let mut r = csv::Reader::from_reader(plain.as_slice());
    let mut w = csv::Writer::from_path(path).unwrap();
    let mut header: Vec<String> = r.headers().unwrap().iter().map(String::from).collect();
    header.push(COLUMN.into());
    w.write_record(&header).unwrap();
    for (i, rec) in r.records().enumerate() {
        let mut rec: Vec<String> = rec.unwrap().iter().map(String::from).collect();
        rec.push(nationality(node, i));
        w.write_record(&rec).unwrap();
    }
    w.flush().unwrap();
}

/// The same node on a zCDP ledger: `--rho` asks for the Gaussian threshold
/// mechanism, and the stated delta adds the threshold's to the
/// conversion's. More keys pass than the node's cell limit: the largest
/// are kept, and the answer says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rho_releases_keys_with_the_gaussian_threshold() {
    let mut fed = TestFederation::start(&[], budget()).await;
    let dir = fed.dir.path().join("open-z");
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("cases.csv");
    write_csv(&csv, 0, 7);
    let limits = BudgetLimits {
        measure: fedq_dp::accounting::Measure::Zcdp,
        delta: Some(1e-7),
        ..budget()
    };
    let mut config = node_config(&fed.ca, &dir, "open-z", limits);
    config.datasets[0].columns.push(open_column());
    // Four keys pass the threshold (Filipino, Ukrainian, Moldovan,
    // (missing)); the node releases at most three cells.
    config.limits.max_cells = 3;
    config.validate().unwrap();
    let schema = Schema::from_specs("cases", &config.datasets[0].columns).unwrap();
    {
        let store = fedq_ledger::store::Store::open(&config.resolve(&config.node.store)).unwrap();
        fedq_node::ingest::ingest_csv(&store, "cases", &schema, &csv, false).unwrap();
    }
    fed.nodes.push(TestNode {
        name: "open-z".into(),
        config,
        csv,
        running: None,
    });
    fed.start_node(0).await;
    let mut client = fed.raw_client(0, Role::Analyst, "alice").await;
    let r = client
        .query(QueryRequest {
            query_id: new_query_id(),
            sql: GROUPED.into(),
            rho: 0.5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.measurements[0].mechanism, "discrete_gaussian");
    let keys: Vec<&str> = r.cells.iter().map(|c| c.values[0].as_str()).collect();
    assert!(
        keys.contains(&"Filipino") && keys.contains(&"Moldovan"),
        "{keys:?}"
    );
    assert!(keys.iter().all(|k| !k.starts_with("Rare-")), "{keys:?}");
    assert!(r.cost_delta > KEYS_DELTA && r.cost_delta < KEYS_DELTA + 1e-7 + 1e-15);
    assert_eq!(keys, ["Filipino", "Moldovan", "Ukrainian"], "the 3 largest");
    let k = r.released_keys.unwrap();
    assert!(k.threshold > 5, "threshold {}", k.threshold);
    assert!(k.note.contains("limit of 3"), "{}", k.note);
}

fn open_column() -> ColumnSpec {
    ColumnSpec {
        name: COLUMN.into(),
        kind: ColumnType::Categorical,
        open: Some(true),
        domain: None,
        min: None,
        max: None,
        bins: None,
    }
}

fn budget() -> BudgetLimits {
    BudgetLimits {
        keys_delta: Some(KEYS_DELTA),
        keys_delta_per_analyst: Some(KEYS_PER_ANALYST),
        keys_delta_total: Some(1e-4),
        ..roomy_budget()
    }
}

/// `n` nodes with the open column, ingested and started.
async fn federation(n: usize) -> TestFederation {
    let mut fed = TestFederation::start(&[], budget()).await;
    for i in 0..n {
        let name = format!("open-{i}");
        let dir = fed.dir.path().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("cases.csv");
        write_csv(&csv, i, 10 + i as u64);
        let mut config = node_config(&fed.ca, &dir, &name, budget());
        config.audit.auditors = vec!["auditor".into()];
        config.datasets[0].columns.push(open_column());
        config.validate().unwrap();
        let schema = Schema::from_specs("cases", &config.datasets[0].columns).unwrap();
        let store = fedq_ledger::store::Store::open(&config.resolve(&config.node.store)).unwrap();
        fedq_node::ingest::ingest_csv(&store, "cases", &schema, &csv, false).unwrap();
        drop(store);
        fed.nodes.push(TestNode {
            name,
            config,
            csv,
            running: None,
        });
        fed.start_node(i).await;
    }
    fed
}

fn request(sql: &str) -> QueryRequest {
    QueryRequest {
        query_id: new_query_id(),
        sql: sql.into(),
        epsilon: 1.0,
        ..Default::default()
    }
}

const GROUPED: &str = "SELECT nationalityText, COUNT(*) FROM cases GROUP BY nationalityText";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frequent_keys_are_released_across_nodes_and_rare_ones_never() {
    let fed = federation(2).await;
    let coordinator = fed.federation("alice");
    let req = request(GROUPED);
    let outcomes = coordinator
        .query(req.clone(), Duration::from_secs(30))
        .await;
    let combined = combine(GROUPED, &req.query_id, 1.0, &outcomes);
    assert!(!combined.partial, "{:?}", combined.nodes);

    let mut truth: HashMap<String, f64> = HashMap::new();
    for node in 0..2 {
        for i in 0..ROWS {
            let v = nationality(node, i);
            let key = if v.is_empty() { "(missing)".into() } else { v };
            *truth.entry(key).or_default() += 1.0;
        }
    }
    let keys: Vec<&str> = combined.rows.iter().map(|r| r.key[0].as_str()).collect();
    for expected in ["(missing)", "Filipino", "Moldovan", "Ukrainian"] {
        assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
    }
    // A key of one record passes a threshold at delta 1e-6 with
    // probability at most 1e-6.
    assert!(keys.iter().all(|k| !k.starts_with("Rare-")), "{keys:?}");
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "rows are in key order");
    for r in &combined.rows {
        let e = r.estimates[0].expect("an estimate");
        let t = truth[&r.key[0]];
        // Two nodes' discrete Laplace noise at scale 1: 3 half-widths of
        // the 95% interval is beyond any plausible draw.
        let half = (e.ci_high - e.ci_low) / 2.0;
        assert!(
            (e.value - t).abs() <= 3.0 * half,
            "{}: {} vs truth {t} (half-width {half})",
            r.key[0],
            e.value
        );
        assert_eq!(r.nodes.len(), 2, "{} released by both nodes", r.key[0]);
    }
    let note = combined
        .released_keys
        .as_ref()
        .expect("a released-keys note");
    assert_eq!(note.column, COLUMN);
    assert_eq!(note.thresholds.len(), 2);
    for (_, threshold, delta) in &note.thresholds {
        assert!(*threshold > 10, "threshold {threshold}");
        assert_eq!(*delta, KEYS_DELTA);
    }
    let text = fedq::output::render_with(&combined, fedq::output::Format::Table, false).unwrap();
    assert!(
        text.contains("withheld by every node are not shown"),
        "{text}"
    );

    // Each node states the cost with the threshold's delta included.
    for o in &outcomes {
        let r = o.result.as_ref().unwrap();
        assert_eq!(r.cost_delta, KEYS_DELTA);
        let k = r.released_keys.as_ref().unwrap();
        assert!(k.note.contains("neither which nor how many"), "{}", k.note);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_values_filter_silently_and_the_delta_budget_is_enforced() {
    let mut fed = federation(1).await;
    let mut client = fed.raw_client(0, Role::Analyst, "alice").await;

    // Describe says the column is open, without listing values.
    let d = client
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    let col = d.datasets[0]
        .columns
        .iter()
        .find(|c| c.name == COLUMN)
        .unwrap();
    match &col.kind {
        Some(Kind::Categorical(c)) => assert!(c.open && c.domain.is_empty()),
        other => panic!("{other:?}"),
    }

    let count = |r: &fedq_proto::v1::QueryResponse| r.measurements[0].values[0] as f64;
    // A value never ingested matches nothing, and no error says so.
    let none = client
        .query(request(
            "SELECT COUNT(*) FROM cases WHERE nationalityText = 'Atlantean'",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(count(&none).abs() <= 20.0, "count {}", count(&none));
    let filipino = client
        .query(request(
            "SELECT COUNT(*) FROM cases WHERE nationalityText IN ('Filipino', 'Atlantean')",
        ))
        .await
        .unwrap()
        .into_inner();
    let truth = (5..ROWS).filter(|i| i % 20 <= 11).count() as f64;
    assert!(
        (count(&filipino) - truth).abs() <= 20.0,
        "{}",
        count(&filipino)
    );

    // What cannot be asked is refused, saying why, and spends nothing.
    let spent = |b: fedq_proto::v1::BudgetResponse| b.budgets[0].spent_by_analyst;
    let before = spent(client.budget(BudgetRequest {}).await.unwrap().into_inner());
    for (sql, needle) in [
        (
            "SELECT nationalityText, gender, COUNT(*) FROM cases GROUP BY nationalityText, gender",
            "grouped by alone",
        ),
        (
            "SELECT nationalityText, SUM(traffickMonths) FROM cases GROUP BY nationalityText",
            "only COUNT(*)",
        ),
        (
            "SELECT COUNT(*) FROM cases WHERE nationalityText < 'M'",
            "only =, <> and IN",
        ),
        (
            "SELECT COUNT(*) FROM cases WHERE nationalityText = 3",
            "quoted string",
        ),
    ] {
        let e = client.query(request(sql)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{sql}");
        assert!(e.message().contains(needle), "{sql}: {}", e.message());
    }
    let e = client
        .prepare(PrepareRequest {
            secure_aggregation: Default::default(),
            query: Some(request(GROUPED)),
            hold_ms: 5000,
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("two phases"), "{}", e.message());
    assert_eq!(
        spent(client.budget(BudgetRequest {}).await.unwrap().into_inner()),
        before
    );

    // Five open-key releases fit the analyst's delta budget; the sixth is
    // refused and spends no epsilon; declared domains still work.
    for _ in 0..5 {
        let r = client.query(request(GROUPED)).await.unwrap().into_inner();
        assert!(r.cells.iter().any(|c| c.values == ["Filipino"]));
    }
    let before = spent(client.budget(BudgetRequest {}).await.unwrap().into_inner());
    let e = client.query(request(GROUPED)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(
        e.message().contains("delta") && e.message().contains("nothing was released or spent"),
        "{}",
        e.message()
    );
    assert_eq!(
        spent(client.budget(BudgetRequest {}).await.unwrap().into_inner()),
        before
    );
    client
        .query(request(
            "SELECT gender, COUNT(*) FROM cases GROUP BY gender",
        ))
        .await
        .unwrap();

    // The audit log states each release's delta and the analyst's total.
    let (_, entries, _) = fed.pull_audit(0).await;
    let deltas: Vec<(f64, f64)> = entries
        .into_iter()
        .filter_map(|e| match e.event {
            Event::Debited {
                keys_delta,
                analyst_keys_delta_spent,
                ..
            } if keys_delta.value() > 0.0 => {
                Some((keys_delta.value(), analyst_keys_delta_spent.value()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(deltas.len(), 5, "{deltas:?}");
    for (i, (d, total)) in deltas.iter().enumerate() {
        assert_eq!(*d, KEYS_DELTA);
        assert!((total - KEYS_DELTA * (i + 1) as f64).abs() < 1e-15);
    }

    // The labels are in the store: after a restart keys still read as text.
    fed.stop_node(0).await;
    fed.start_node(0).await;
    let mut bob = fed.raw_client(0, Role::Analyst, "bob").await;
    let r = bob.query(request(GROUPED)).await.unwrap().into_inner();
    let keys: Vec<&str> = r.cells.iter().map(|c| c.values[0].as_str()).collect();
    assert!(keys.contains(&"Ukrainian"), "{keys:?}");
}

#[test]
fn an_overlong_open_value_fails_the_whole_ingest() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("cases.csv");
    write_csv(&csv, 0, 3);
    let mut text = std::fs::read_to_string(&csv).unwrap();
    text.push_str(&format!("{}\n", text.lines().nth(1).unwrap()));
    // Make the appended last row's open value too long.
    let long = "x".repeat(300);
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let last = lines.pop().unwrap();
    let (head, _) = last.rsplit_once(',').unwrap();
    lines.push(format!("{head},{long}"));
    std::fs::write(&csv, lines.join("\n") + "\n").unwrap();
    let mut columns = synth::ctdc_columns();
    columns.push(open_column());
    let schema = Schema::from_specs("cases", &columns).unwrap();
    let store = fedq_ledger::store::Store::open(&dir.path().join("store")).unwrap();
    let e = fedq_node::ingest::ingest_csv(&store, "cases", &schema, &csv, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!(":{}", ROWS + 2))
            && e.contains("more than 200")
            && e.contains("nothing was stored"),
        "{e}"
    );
    let table = store.load_table("cases", &schema).unwrap();
    assert_eq!(table.heap_bytes(), 0, "no row was stored");
}

/// Misdeclared open columns and released-key budgets are refused at
/// config load, each saying what to change.
#[test]
fn bad_open_declarations_are_refused_with_what_to_do() {
    let ca = fedq_pki::Authority::generate("ca").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = || {
        let mut c = node_config(&ca, dir.path(), "n", budget());
        c.datasets[0].columns.push(open_column());
        c
    };
    good().validate().unwrap();
    let refused = |c: fedq_node::config::NodeConfig, needle: &str| {
        let e = c.validate().unwrap_err();
        assert!(e.contains(needle), "{needle}: {e}");
    };
    let mut c = good();
    c.datasets[0].budget.keys_delta = None;
    refused(c, "keys_delta is missing");
    let mut c = good();
    c.datasets[0].budget.keys_delta = Some(f64::NAN);
    refused(c, "must be in (0, 0.001]");
    let mut c = good();
    c.datasets[0].budget.keys_delta_per_analyst = Some(1e-9);
    refused(
        c,
        "keys_delta <= keys_delta_per_analyst <= keys_delta_total",
    );
    let mut c = node_config(&ca, dir.path(), "n", budget());
    refused(
        c.clone(),
        "only applies to datasets with an open-domain column",
    );
    c.datasets[0].budget = roomy_budget();
    let mut spec = open_column();
    spec.domain = Some(vec!["a".into()]);
    c.datasets[0].columns.push(spec);
    c.datasets[0].budget = budget();
    refused(c, "an open column declares no domain");
    let mut c = good();
    let last = c.datasets[0].columns.len() - 1;
    c.datasets[0].columns[last].kind = ColumnType::Integer;
    refused(c, "`open` applies to categorical columns only");
}
