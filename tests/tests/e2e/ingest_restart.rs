//! Ingest is all or nothing and says exactly where a file is wrong; a node
//! restarted on its store keeps the budget it has spent; a retried query id
//! replays the stored release without a new debit (DESIGN invariants 3 and 6).

use std::path::{Path, PathBuf};
use std::time::Duration;

use fedq_engine::synth::{self, Partner};
use fedq_ledger::store::Store;
use fedq_node::config::BudgetLimits;
use fedq_node::ingest::ingest_csv;
use fedq_pki::Role;
use fedq_plan::schema::Schema;
use fedq_proto::v1::node_client::NodeClient;
use fedq_proto::v1::{BudgetRequest, QueryRequest, QueryResponse};
use fedq_tests::TestFederation;
use tonic::transport::Channel;

// ---------------------------------------------------------------------------
// Ingest
// ---------------------------------------------------------------------------

fn schema() -> Schema {
    Schema::from_specs("cases", &synth::ctdc_columns()).unwrap()
}

/// A valid synthetic CSV as records (header first).
fn valid_records(rows: usize, seed: u64) -> Vec<Vec<String>> {
    let mut buf = Vec::new();
    synth::write_csv(Partner::Ngo, rows, seed, &mut buf).unwrap();
    let mut r = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(buf.as_slice());
    r.records()
        .map(|rec| rec.unwrap().iter().map(str::to_string).collect())
        .collect()
}

/// Writes records as CSV (one line per record: synthetic cells hold no
/// newlines) and returns the path.
fn write_records(dir: &Path, name: &str, records: &[Vec<String>]) -> PathBuf {
    let path = dir.join(name);
    let mut w = csv::WriterBuilder::new()
        .flexible(true)
        .from_path(&path)
        .unwrap();
    for r in records {
        w.write_record(r).unwrap();
    }
    w.flush().unwrap();
    path
}

fn write_valid(dir: &Path, name: &str, rows: usize, seed: u64) -> PathBuf {
    write_records(dir, name, &valid_records(rows, seed))
}

fn col_index(records: &[Vec<String>], name: &str) -> usize {
    records[0]
        .iter()
        .position(|h| h == name)
        .unwrap_or_else(|| panic!("no column {name}"))
}

/// One corruption of one line of an otherwise valid file.
struct BadCase {
    what: &'static str,
    /// 1-based line of the file (the header is line 1).
    line: usize,
    /// The column the error must name, for cell errors.
    column: Option<&'static str>,
    /// Something else the message must say.
    says: &'static str,
    corrupt: fn(&mut Vec<String>, &[String]),
}

fn set(row: &mut [String], header: &[String], column: &str, value: &str) {
    let i = header.iter().position(|h| h == column).unwrap();
    row[i] = value.to_string();
}

#[test]
fn an_ingest_with_one_bad_row_stores_nothing_and_says_where() {
    let cases = [
        BadCase {
            what: "a non-integer in an integer column",
            line: 5,
            column: Some("traffickMonths"),
            says: "not an integer",
            corrupt: |row, h| set(row, h, "traffickMonths", "abc"),
        },
        BadCase {
            what: "a categorical value outside the declared domain",
            line: 2,
            column: Some("gender"),
            says: "Femal",
            corrupt: |row, h| set(row, h, "gender", "Femal"),
        },
        BadCase {
            what: "an integer outside its declared bounds",
            line: 31,
            column: Some("traffickMonths"),
            says: "500",
            corrupt: |row, h| set(row, h, "traffickMonths", "500"),
        },
        BadCase {
            what: "one field too many",
            line: 7,
            column: None,
            says: "fields",
            corrupt: |row, _| row.push("extra".into()),
        },
        BadCase {
            what: "one field too few",
            line: 12,
            column: None,
            says: "fields",
            corrupt: |row, _| {
                row.pop();
            },
        },
        BadCase {
            what: "a boolean cell \"2\"",
            line: 41,
            column: Some("isForcedLabour"),
            says: "boolean",
            corrupt: |row, h| set(row, h, "isForcedLabour", "2"),
        },
        BadCase {
            what: "a bad cell on the last line",
            line: 51,
            column: Some("yearOfRegistration"),
            says: "not an integer",
            corrupt: |row, h| set(row, h, "yearOfRegistration", "20x0"),
        },
    ];
    let schema = schema();
    for case in &cases {
        let dir = tempfile::tempdir().unwrap();
        let mut records = valid_records(50, 7);
        let header = records[0].clone();
        (case.corrupt)(&mut records[case.line - 1], &header);
        let bad = write_records(dir.path(), "bad.csv", &records);
        let store = Store::open(&dir.path().join("store")).unwrap();

        let err = ingest_csv(&store, "cases", &schema, &bad, false)
            .expect_err(&format!("{}: the ingest should fail", case.what))
            .to_string();
        let file = bad.display().to_string();
        assert!(
            err.contains(&file),
            "{}: the message should name the file {file}: {err}",
            case.what
        );
        assert!(
            err.contains(&format!("{file}:{}:", case.line)),
            "{}: the message should point at line {} as {file}:{}: : {err}",
            case.what,
            case.line,
            case.line
        );
        if let Some(col) = case.column {
            assert!(
                err.contains(col),
                "{}: the message should name column {col}: {err}",
                case.what
            );
        }
        assert!(
            err.contains(case.says),
            "{}: the message should say {:?}: {err}",
            case.what,
            case.says
        );

        // Nothing was stored: no schema recorded, and a valid file ingested
        // afterwards is all there is.
        assert_eq!(
            store.schema_digest("cases").unwrap(),
            None,
            "{}: something was stored",
            case.what
        );
        let good = write_valid(dir.path(), "good.csv", 100, 8);
        let report = ingest_csv(&store, "cases", &schema, &good, false).unwrap();
        assert_eq!(report.rows_added, 100, "{}", case.what);
        assert_eq!(
            report.rows_total, 100,
            "{}: rows from the failed ingest were stored",
            case.what
        );
    }
}

#[test]
fn a_failed_ingest_after_a_good_one_leaves_the_earlier_rows_alone() {
    let dir = tempfile::tempdir().unwrap();
    let schema = schema();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let first = write_valid(dir.path(), "first.csv", 100, 1);
    assert_eq!(
        ingest_csv(&store, "cases", &schema, &first, false)
            .unwrap()
            .rows_total,
        100
    );
    let digest = store.schema_digest("cases").unwrap();
    assert!(digest.is_some());

    let mut records = valid_records(100, 2);
    let h = records[0].clone();
    set(&mut records[100], &h, "ageBroad", "17--19");
    let bad = write_records(dir.path(), "bad.csv", &records);
    let err = ingest_csv(&store, "cases", &schema, &bad, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("{}:101:", bad.display())) && err.contains("ageBroad"),
        "{err}"
    );
    assert_eq!(store.schema_digest("cases").unwrap(), digest);

    let second = write_valid(dir.path(), "second.csv", 100, 3);
    assert_eq!(
        ingest_csv(&store, "cases", &schema, &second, false)
            .unwrap()
            .rows_total,
        200
    );
}

#[test]
fn the_same_file_twice_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let schema = schema();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let a = write_valid(dir.path(), "a.csv", 100, 1);
    let r = ingest_csv(&store, "cases", &schema, &a, false).unwrap();
    assert_eq!((r.rows_added, r.rows_total), (100, 100));

    let err = ingest_csv(&store, "cases", &schema, &a, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already ingested"), "{err}");
    assert!(err.contains(&a.display().to_string()), "{err}");
    // The same bytes under another name are the same file.
    let copy = dir.path().join("a-copy.csv");
    std::fs::copy(&a, &copy).unwrap();
    let err = ingest_csv(&store, "cases", &schema, &copy, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already ingested"), "{err}");

    // Nothing was added by the refusals: another file brings the total to 200.
    let b = write_valid(dir.path(), "b.csv", 100, 2);
    let r = ingest_csv(&store, "cases", &schema, &b, false).unwrap();
    assert_eq!((r.rows_added, r.rows_total), (100, 200));

    // Explicitly allowed, the same file is added again.
    let r = ingest_csv(&store, "cases", &schema, &a, true).unwrap();
    assert_eq!((r.rows_added, r.rows_total), (100, 300));

    // And it all survives reopening the store.
    drop(store);
    let store = Store::open(&dir.path().join("store")).unwrap();
    let err = ingest_csv(&store, "cases", &schema, &b, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already ingested"), "{err}");
    let c = write_valid(dir.path(), "c.csv", 10, 3);
    assert_eq!(
        ingest_csv(&store, "cases", &schema, &c, false)
            .unwrap()
            .rows_total,
        310
    );
}

#[test]
fn a_header_missing_a_declared_column_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let schema = schema();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let mut records = valid_records(20, 1);
    let i = col_index(&records, "traffickMonths");
    for r in &mut records {
        r.remove(i);
    }
    let path = write_records(dir.path(), "no-months.csv", &records);
    let err = ingest_csv(&store, "cases", &schema, &path, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("traffickMonths"), "{err}");
    assert!(err.contains(&format!("{}:1:", path.display())), "{err}");
    assert_eq!(store.schema_digest("cases").unwrap(), None);

    // Undeclared extra columns, on the other hand, are ignored and reported.
    let mut records = valid_records(20, 1);
    for (k, r) in records.iter_mut().enumerate() {
        r.push(if k == 0 {
            "internalNotes".into()
        } else {
            format!("note {k}")
        });
    }
    let path = write_records(dir.path(), "extra.csv", &records);
    let r = ingest_csv(&store, "cases", &schema, &path, false).unwrap();
    assert_eq!(r.rows_total, 20);
    assert_eq!(r.ignored_columns, vec!["internalNotes".to_string()]);
}

/// Spreadsheet exports (Excel on Windows) come with CRLF line ends and often
/// a UTF-8 byte-order mark; they must ingest, and errors must point at the
/// same lines as in an LF file.
#[test]
fn crlf_and_bom_files_ingest_and_report_the_right_line() {
    let dir = tempfile::tempdir().unwrap();
    let schema = schema();
    let as_crlf = |records: &[Vec<String>]| {
        let lf = write_records(dir.path(), "tmp.csv", records);
        let text = std::fs::read_to_string(lf).unwrap();
        format!("\u{feff}{}", text.replace('\n', "\r\n"))
    };

    let good = dir.path().join("excel.csv");
    std::fs::write(&good, as_crlf(&valid_records(30, 1))).unwrap();
    let store = Store::open(&dir.path().join("store-good")).unwrap();
    let r = ingest_csv(&store, "cases", &schema, &good, false).unwrap();
    assert_eq!((r.rows_added, r.rows_total), (30, 30));
    assert!(
        r.ignored_columns.is_empty(),
        "the BOM must not garble the first header: {:?}",
        r.ignored_columns
    );

    for (line, bad_cell) in [(2usize, true), (9, true), (17, false)] {
        let mut records = valid_records(30, 2);
        let h = records[0].clone();
        if bad_cell {
            set(&mut records[line - 1], &h, "gender", "Femal");
        } else {
            records[line - 1].push("extra".into());
        }
        let bad = dir.path().join(format!("excel-bad-{line}.csv"));
        std::fs::write(&bad, as_crlf(&records)).unwrap();
        let store = Store::open(&dir.path().join(format!("store-{line}"))).unwrap();
        let err = ingest_csv(&store, "cases", &schema, &bad, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("{}:{line}:", bad.display())),
            "a CRLF file with a bad row on line {line} must report line {line}: {err}"
        );
        assert_eq!(store.schema_digest("cases").unwrap(), None);
    }
}

// ---------------------------------------------------------------------------
// Restart and retries, over real mutual-TLS gRPC
// ---------------------------------------------------------------------------

fn limits() -> BudgetLimits {
    BudgetLimits {
        keys_delta: None,
        keys_delta_per_analyst: None,
        keys_delta_total: None,
        per_analyst: 2.0,
        total: 10.0,
        per_query_max: 1.0,
        measure: Default::default(),
        delta: None,
    }
}

fn req(query_id: &str, sql: &str, epsilon: f64) -> QueryRequest {
    QueryRequest {
        query_id: query_id.into(),
        sql: sql.into(),
        epsilon,
        dry_run: false,
        rho: 0.0,
    }
}

async fn spent(client: &mut NodeClient<Channel>) -> f64 {
    let r = client
        .budget(BudgetRequest {})
        .await
        .expect("budget")
        .into_inner();
    let b = r
        .budgets
        .iter()
        .find(|b| b.dataset == "cases")
        .expect("a budget for dataset cases");
    b.spent_by_analyst
}

fn assert_eps(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() < 1e-9,
        "{what}: spent {got}, expected {want}"
    );
}

async fn query(client: &mut NodeClient<Channel>, r: QueryRequest) -> QueryResponse {
    client.query(r).await.expect("query").into_inner()
}

fn values(r: &QueryResponse) -> Vec<Vec<i64>> {
    r.measurements.iter().map(|m| m.values.clone()).collect()
}

/// Stops and restarts node 0, failing rather than hanging.
async fn restart(fed: &mut TestFederation) {
    tokio::time::timeout(Duration::from_secs(30), fed.stop_node(0))
        .await
        .expect("the node stops within 30 s");
    tokio::time::timeout(Duration::from_secs(30), fed.start_node(0))
        .await
        .expect("the node starts within 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_answers_again_and_keeps_the_budget_spent() {
    let mut fed = TestFederation::start(&[(Partner::Ngo, 2000, 5)], limits()).await;
    let sql = "SELECT gender, COUNT(*) FROM cases GROUP BY gender";
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    assert_eps(spent(&mut alice).await, 0.0, "before any query");
    let r = query(&mut alice, req("r1", sql, 0.5)).await;
    assert!(!r.replayed);
    assert_eq!(r.cells.len(), 4);
    assert_eps(
        r.budget.as_ref().unwrap().spent_by_analyst,
        0.5,
        "in the answer",
    );
    assert_eps(spent(&mut alice).await, 0.5, "after the first query");
    drop(alice);

    restart(&mut fed).await;

    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    assert_eps(spent(&mut alice).await, 0.5, "after the restart");
    let r = query(&mut alice, req("r2", sql, 0.5)).await;
    assert!(!r.replayed);
    assert_eq!(r.cells.len(), 4);
    assert_eps(
        r.budget.as_ref().unwrap().spent_by_analyst,
        1.0,
        "in the second answer",
    );
    let b = r.budget.as_ref().unwrap();
    assert_eps(b.remaining_for_analyst, 1.0, "remaining for alice");
    assert_eps(b.remaining_for_dataset, 9.0, "remaining for the dataset");
    assert_eps(spent(&mut alice).await, 1.0, "after the second query");
    drop(alice);

    // The limit counts what was spent before the restart: 2.0 - 1.0 leaves
    // room for 1.0, and not a bit more.
    restart(&mut fed).await;
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    let s = alice
        .query(req("r3", sql, 1.0))
        .await
        .expect("exactly the remaining budget");
    assert_eps(
        s.into_inner().budget.unwrap().spent_by_analyst,
        2.0,
        "at the limit",
    );
    let e = alice
        .query(req("r4", sql, 0.1))
        .await
        .expect_err("over the limit");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert_eps(spent(&mut alice).await, 2.0, "after the refusal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_query_id_replays_the_release_without_spending_even_after_a_restart() {
    let mut fed = TestFederation::start(&[(Partner::Ngo, 2000, 6)], limits()).await;
    // 4 genders x 10 age groups: 40 noisy cells, so two independent releases
    // coincide with negligible probability.
    let sql = "SELECT gender, ageBroad, COUNT(*) FROM cases GROUP BY gender, ageBroad";
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;

    let first = query(&mut alice, req("q-1", sql, 0.5)).await;
    assert!(!first.replayed);
    assert_eq!(first.cells.len(), 40);
    assert_eps(spent(&mut alice).await, 0.5, "after the first release");

    let again = query(&mut alice, req("q-1", sql, 0.5)).await;
    assert!(again.replayed, "the retry should be marked as replayed");
    assert_eq!(
        values(&again),
        values(&first),
        "the retry must return the stored noisy values"
    );
    assert_eq!(again.cells, first.cells);
    assert_eps(spent(&mut alice).await, 0.5, "after the retry");
    drop(alice);

    restart(&mut fed).await;

    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    let after = query(&mut alice, req("q-1", sql, 0.5)).await;
    assert!(after.replayed, "the stored release survives a restart");
    assert_eq!(values(&after), values(&first));
    assert_eps(
        spent(&mut alice).await,
        0.5,
        "after the retry across the restart",
    );

    // The same id for a different query is refused and spends nothing.
    let other_sql = "SELECT COUNT(*) FROM cases";
    let e = alice
        .query(req("q-1", other_sql, 0.5))
        .await
        .expect_err("a different SQL under a used id");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    let e = alice
        .query(req("q-1", sql, 0.25))
        .await
        .expect_err("a different epsilon under a used id");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    assert_eps(spent(&mut alice).await, 0.5, "after the refused reuses");
    // The refusals did not disturb the stored release.
    let still = query(&mut alice, req("q-1", sql, 0.5)).await;
    assert!(still.replayed);
    assert_eq!(values(&still), values(&first));

    // Another analyst's ids are their own: bob's "q-1" is a fresh release
    // debited to bob only.
    let mut bob = fed.raw_client(0, Role::Analyst, "bob").await;
    let b1 = query(&mut bob, req("q-1", sql, 0.5)).await;
    assert!(
        !b1.replayed,
        "bob's first use of q-1 is not a replay of alice's"
    );
    assert_ne!(
        values(&b1),
        values(&first),
        "bob must get his own noise, not alice's release"
    );
    assert_eps(
        b1.budget.as_ref().unwrap().spent_by_analyst,
        0.5,
        "bob in his answer",
    );
    assert_eps(
        b1.budget.as_ref().unwrap().remaining_for_dataset,
        9.0,
        "dataset after both",
    );
    assert_eps(spent(&mut bob).await, 0.5, "bob");
    assert_eps(spent(&mut alice).await, 0.5, "alice after bob's query");
    // And bob's own retry replays bob's release.
    let b2 = query(&mut bob, req("q-1", sql, 0.5)).await;
    assert!(b2.replayed);
    assert_eq!(values(&b2), values(&b1));
    assert_eps(spent(&mut bob).await, 0.5, "bob after his retry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_of_one_query_id_debit_once_and_release_one_answer() {
    let fed = TestFederation::start(&[(Partner::Hotline, 2000, 7)], limits()).await;
    let sql = "SELECT gender, ageBroad, COUNT(*) FROM cases GROUP BY gender, ageBroad";
    let alice = fed.raw_client(0, Role::Analyst, "alice").await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut c = alice.clone();
        tasks.spawn(async move { c.query(req("same-id", sql, 0.5)).await });
    }
    let mut answers = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok(resp) => answers.push(resp.into_inner()),
            // A retry racing the first computation is told to retry later,
            // or turned away by the node's per-analyst concurrency limit.
            Err(s) => assert!(
                matches!(
                    s.code(),
                    tonic::Code::Aborted | tonic::Code::ResourceExhausted
                ),
                "{s:?}"
            ),
        }
    }
    assert!(
        !answers.is_empty(),
        "at least one of the concurrent requests must be answered"
    );
    assert_eq!(
        answers.iter().filter(|a| !a.replayed).count(),
        1,
        "exactly one fresh release; the others replay it or are told to retry"
    );
    let first = values(&answers[0]);
    for a in &answers {
        assert_eq!(
            values(a),
            first,
            "every answer to one query id is the same release"
        );
    }
    let mut alice = alice;
    assert_eps(
        spent(&mut alice).await,
        0.5,
        "one debit for all the concurrent retries",
    );
    let later = query(&mut alice, req("same-id", sql, 0.5)).await;
    assert!(later.replayed);
    assert_eq!(values(&later), first);
}
