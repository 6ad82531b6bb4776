//! The PostgreSQL push-down against the embedded engine, at the engine
//! layer (exact aggregates, no noise, nothing served).
//!
//! Loads synthetic CTDC-shaped rows into a PostgreSQL table (`COPY` of one
//! block, then copied up to `FEDQ_BENCH_DB_ROWS`, 10,000,000 by default)
//! and into the embedded engine (`FEDQ_BENCH_ROWS`, 1,000,000 by default),
//! then times one GROUP BY with a WHERE on each, `FEDQ_BENCH_RUNS` times
//! (default 15), and prints p50 and p95. With `FEDQ_BENCH_KEEP=1` the
//! table is kept afterwards and reused by the next run if it has the
//! expected number of rows.
//!
//! Needs a PostgreSQL server: `FEDQ_TEST_POSTGRES`, or one started with
//! `scripts/pg-test-server.sh ensure`. Run:
//!
//! ```sh
//! FEDQ_TEST_POSTGRES=$(scripts/pg-test-server.sh ensure) \
//!   cargo bench -p fedq-node --features bench-internals --bench postgres
//! ```

use std::time::{Duration, Instant};

use fedq_engine::postgres::PgSource;
use fedq_engine::synth::{self, Partner};
use fedq_engine::table::Table;
use fedq_node::config::{SourceConfig, SourceKind};
use fedq_plan::plan::plan;
use fedq_plan::schema::{Column, Schema};

const QUERY: &str = "SELECT gender, ageBroad, COUNT(*) FROM cases \
     WHERE isForcedLabour = 1 AND yearOfRegistration BETWEEN 2010 AND 2020 \
     GROUP BY gender, ageBroad";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn psql() -> String {
    let dirs = std::fs::read_dir("/usr/lib/postgresql").expect("PostgreSQL binaries");
    let mut bins: Vec<_> = dirs
        .flatten()
        .map(|d| d.path().join("bin/psql"))
        .filter(|p| p.exists())
        .collect();
    bins.sort();
    bins.pop().expect("psql").display().to_string()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn report(what: &str, mut times: Vec<Duration>) {
    times.sort();
    println!(
        "{what}: p50 {:.1} ms, p95 {:.1} ms, min {:.1} ms ({} runs)",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.95).as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times.len()
    );
}

fn main() {
    let url = std::env::var("FEDQ_TEST_POSTGRES")
        .expect("set FEDQ_TEST_POSTGRES (e.g. $(scripts/pg-test-server.sh ensure))");
    let embedded_rows = env("FEDQ_BENCH_ROWS", 1_000_000);
    let db_rows = env("FEDQ_BENCH_DB_ROWS", 10_000_000);
    let runs = env("FEDQ_BENCH_RUNS", 15);
    let dir = tempfile::tempdir().expect("temp dir");
    let schema = Schema::from_specs("cases", &synth::ctdc_columns()).expect("schema");
    let p = plan(QUERY, &schema, 100_000).expect("plan");
    println!("query: {QUERY}");

    // The embedded engine, loaded from codes as ingest encodes them.
    let csv = dir.path().join("cases.csv");
    let block = embedded_rows.min(db_rows);
    synth::write_csv(
        Partner::CaseManagement,
        block,
        1,
        std::fs::File::create(&csv).unwrap(),
    )
    .unwrap();
    let mut table = Table::new(schema.clone());
    let mut reader = csv::Reader::from_path(&csv).unwrap();
    let mut codes = Vec::new();
    for rec in reader.records() {
        let rec = rec.unwrap();
        for (c, raw) in schema.columns.iter().zip(rec.iter()) {
            codes.push(c.encode(raw).unwrap());
        }
    }
    table.append_row_major(&codes);
    drop(codes);

    // The database: COPY the same block, then copy it up to `db_rows`.
    let defs: Vec<String> = schema
        .columns
        .iter()
        .map(|c| {
            let t = match c {
                Column::Categorical { .. } | Column::Open { .. } | Column::PersonId { .. } => {
                    "text"
                }
                Column::Integer { .. } | Column::Boolean { .. } => "smallint",
            };
            format!("\"{}\" {t}", c.name())
        })
        .collect();
    let setup = format!(
        "DROP SCHEMA IF EXISTS bench CASCADE; CREATE SCHEMA bench; \
         CREATE TABLE bench.cases ({}); \
         \\copy bench.cases FROM '{}' WITH (FORMAT csv, HEADER true)",
        defs.join(", "),
        csv.display()
    );
    let started = Instant::now();
    let psql = psql();
    let run_psql = |sql: &str| {
        let out = std::process::Command::new(&psql)
            .args([
                url.as_str(),
                "-v",
                "ON_ERROR_STOP=1",
                "-q",
                "-At",
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let copies = db_rows / block;
    let keep = std::env::var("FEDQ_BENCH_KEEP").is_ok();
    let present = run_psql("SELECT to_regclass('bench.cases') IS NOT NULL");
    let reuse = keep
        && present == "t"
        && run_psql("SELECT COUNT(*) FROM bench.cases") == (copies * block).to_string();
    if !reuse {
        for stmt in setup.split("; ") {
            run_psql(stmt);
        }
        run_psql("CREATE TABLE bench.block AS SELECT * FROM bench.cases");
        for _ in 1..copies {
            run_psql("INSERT INTO bench.cases SELECT * FROM bench.block");
        }
        run_psql("DROP TABLE bench.block");
        run_psql("VACUUM ANALYZE bench.cases");
    }
    println!(
        "{} {} rows in PostgreSQL in {:.0} s; {} rows in the embedded engine",
        if reuse { "reused" } else { "loaded" },
        copies * block,
        started.elapsed().as_secs_f64(),
        block
    );

    std::fs::write(dir.path().join("db.url"), &url).unwrap();
    let source = SourceConfig {
        kind: SourceKind::Postgres,
        table: "bench.cases".into(),
        url_file: Some("db.url".into()),
        url_env: None,
        ca: None,
        statement_timeout_ms: 600_000,
    };
    let pg = PgSource::new("cases", schema.clone(), &source, dir.path()).expect("source");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(pg.connect()).expect("connect and check");
    // One warm-up each (page cache, connection, statement plan).
    rt.block_on(pg.exact(&p)).expect("push-down");
    std::hint::black_box(table.exact_for_bench(&p));

    let mut db = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        std::hint::black_box(rt.block_on(pg.exact(&p)).expect("push-down"));
        db.push(t.elapsed());
    }
    report(&format!("postgres push-down, {} rows", copies * block), db);
    let mut embedded = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        std::hint::black_box(table.exact_for_bench(&p));
        embedded.push(t.elapsed());
    }
    report(&format!("embedded engine, {block} rows"), embedded);
    if !keep {
        run_psql("DROP SCHEMA bench CASCADE");
    }
}
