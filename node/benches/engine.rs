//! Criterion benches of the node-side query path over a synthetic
//! CTDC-shaped dataset (1,000,000 rows by default; set `FEDQ_BENCH_ROWS`).
//!
//! - `scan/*`: the compact columnar engine alone (`Table::exact`).
//! - `node_side/*`: everything a node does for a query except the ledger
//!   and gRPC: plan the SQL, fix the scales with OpenDP's privacy map, scan,
//!   add OpenDP noise. The ledger's durable debit is benched in
//!   `mechanism.rs`.
//!
//! Run: `cargo bench -p fedq-node --features bench-internals --bench engine`.

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use fedq_dp::mechanism;
use fedq_engine::synth::{self, Partner};
use fedq_engine::table::Table;
use fedq_ledger::store::Store;
use fedq_plan::plan::plan;
use fedq_plan::schema::Schema;

/// The three node-side queries, plus an unfiltered GROUP BY.
const QUERIES: [(&str, &str); 4] = [
    (
        "filtered_count",
        "SELECT COUNT(*) FROM cases WHERE isForcedLabour = 1 AND yearOfRegistration >= 2015",
    ),
    (
        "group_by_gender_age",
        "SELECT gender, ageBroad, COUNT(*) FROM cases WHERE isSexualExploit = 1 GROUP BY gender, ageBroad",
    ),
    (
        "avg_months",
        "SELECT AVG(traffickMonths) FROM cases WHERE isForcedLabour = 1",
    ),
    (
        "group_by_citizenship_all_rows",
        "SELECT citizenship, COUNT(*), SUM(traffickMonths) FROM cases GROUP BY citizenship",
    ),
];

fn rows() -> usize {
    std::env::var("FEDQ_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// Generates, ingests and loads the dataset the way a node does.
fn load(rows: usize) -> Table {
    let dir = tempfile::tempdir().expect("temp dir");
    let csv = dir.path().join("cases.csv");
    let file = std::fs::File::create(&csv).expect("create csv");
    synth::write_csv(Partner::CaseManagement, rows, 1, file).expect("write csv");
    let schema = Schema::from_specs("cases", &synth::ctdc_columns()).expect("schema");
    let store = Store::open(&dir.path().join("store")).expect("store");
    fedq_node::ingest::ingest_csv(&store, "cases", &schema, &csv, false).expect("ingest");
    let start = Instant::now();
    let table = store.load_table("cases", &schema).expect("load");
    eprintln!(
        "loaded {rows} rows in {:.3} s; columns hold {:.1} MB",
        start.elapsed().as_secs_f64(),
        table.heap_bytes() as f64 / 1e6
    );
    table
}

fn bench(c: &mut Criterion) {
    let rows = rows();
    let table = load(rows);
    let schema = table.schema.clone();
    let mut scan = c.benchmark_group(format!("scan_{rows}"));
    for (name, sql) in QUERIES {
        let p = plan(sql, &schema, 10_000).expect("plan");
        scan.bench_function(name, |b| b.iter(|| black_box(table.exact_for_bench(&p))));
    }
    scan.finish();
    eprintln!(
        "bitmaps cached after the scans (present, key, plane): {:.1} MB",
        table.cached_bytes() as f64 / 1e6
    );
    let mut node = c.benchmark_group(format!("node_side_{rows}"));
    for (name, sql) in QUERIES {
        node.bench_function(name, |b| {
            b.iter(|| {
                let p = plan(sql, &schema, 10_000).expect("plan");
                let epsilon = 1.0 / p.measurements.len() as f64;
                let exact = table.exact_for_bench(&p);
                let released: Vec<Vec<i64>> = p
                    .measurements
                    .iter()
                    .zip(exact)
                    .map(|(m, values)| {
                        let scale = mechanism::discrete_laplace_scale(m.sensitivity(), epsilon)
                            .expect("scale");
                        mechanism::Noise::DiscreteLaplace { scale }
                            .release(&mechanism::Exact::new(values))
                            .expect("noise")
                    })
                    .collect();
                black_box(released)
            })
        });
    }
    node.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
