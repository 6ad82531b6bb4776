//! A dataset whose rows stay in the partner's PostgreSQL database, end to
//! end: real nodes over mutual TLS, the real test database (see
//! `fedq_tests::test_database_url`), the audit log pulled by an auditor.
//!
//! - queries are answered from the database (COUNT, GROUP BY, AVG) and the
//!   `released` entry names the source;
//! - an unreachable database gives a clear error, spends nothing, and the
//!   log shows the reservation returned;
//! - the start-up check names every mismatched column;
//! - injection through values, dataset names and identifiers is refused or
//!   inert, and the table keeps all its rows.

use fedq_engine::synth::Partner;
use fedq_ledger::audit::Event;
use fedq_node::config::NodeConfig;
use fedq_pki::Role;
use fedq_proto::v1::node_client::NodeClient;
use fedq_proto::v1::{BudgetRequest, ExportAuditRequest, QueryRequest, QueryResponse};
use fedq_tests::Logged;
use fedq_tests::{
    database_client, exact_counts, load_csv_into_postgres, node_config, opendp_accuracy,
    roomy_budget, test_database_url, TestFederation,
};
use tonic::transport::Channel;
use tonic::Code;

fn q(id: &str, sql: &str, epsilon: f64) -> QueryRequest {
    QueryRequest {
        query_id: id.into(),
        sql: sql.into(),
        epsilon,
        ..Default::default()
    }
}

/// Node 0's audit log, pulled by "auditor".
async fn pull(fed: &TestFederation) -> Vec<Logged> {
    let mut c = fed.raw_client(0, Role::Auditor, "auditor").await;
    let mut stream = c
        .export_audit(ExportAuditRequest { since_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut entries = Vec::new();
    while let Some(line) = stream.message().await.unwrap() {
        entries.push(Logged::parse(&line.json));
    }
    entries
}

async fn spent(client: &mut NodeClient<Channel>) -> f64 {
    client
        .budget(BudgetRequest {})
        .await
        .unwrap()
        .into_inner()
        .budgets[0]
        .spent_by_analyst
}

/// Checks every noisy value of measurement `m` against the exact value,
/// within OpenDP's bound at a level that a correct mechanism misses less
/// than once in a million runs (union bound over the cells).
fn assert_close(r: &QueryResponse, m: usize, exact: impl Fn(&[String]) -> i64) {
    let meas = &r.measurements[m];
    let bound = opendp_accuracy(meas.scale, 1e-7 / meas.values.len() as f64);
    for (cell, &noisy) in r.cells.iter().zip(&meas.values) {
        let want = exact(&cell.values);
        assert!(
            ((noisy - want) as f64).abs() <= bound,
            "{} {:?}: noisy {noisy}, exact {want}, bound {bound}",
            meas.label,
            cell.values
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_dataset_answers_count_group_by_and_avg_and_logs_its_source() {
    let fed = TestFederation::start_postgres((Partner::Ngo, 3000, 7), roomy_budget(), |_| {}).await;
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    let csv = &fed.nodes[0].csv;

    let r = alice
        .query(q(
            "grouped",
            "SELECT gender, ageBroad, COUNT(*) FROM cases WHERE isForcedLabour = 1 GROUP BY gender, ageBroad",
            10.0,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.cells.len(),
        4 * 10,
        "every declared key, (missing) included"
    );
    let exact = exact_counts(csv, &["gender", "ageBroad"], |get| {
        get("isForcedLabour") == "1"
    });
    assert_close(&r, 0, |key| exact.get(key).copied().unwrap_or(0));

    let r = alice
        .query(q(
            "avg",
            "SELECT COUNT(*), AVG(traffickMonths) FROM cases WHERE yearOfRegistration BETWEEN 2010 AND 2020",
            10.0,
        ))
        .await
        .unwrap()
        .into_inner();
    // Exact values from the CSV, computed here independently of the node.
    let mut reader = csv::Reader::from_path(csv).unwrap();
    let headers = reader.headers().unwrap().clone();
    let at = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let (year, months) = (at("yearOfRegistration"), at("traffickMonths"));
    let (mut rows, mut sum, mut present) = (0i64, 0i64, 0i64);
    for rec in reader.records() {
        let rec = rec.unwrap();
        let Ok(y) = rec[year].parse::<i64>() else {
            continue;
        };
        if y == -99 || !(2010..=2020).contains(&y) {
            continue;
        }
        rows += 1;
        if let Ok(m) = rec[months].parse::<i64>() {
            if m != -99 {
                sum += m;
                present += 1;
            }
        }
    }
    let labels: Vec<&str> = r.measurements.iter().map(|m| m.label.as_str()).collect();
    assert_eq!(
        labels,
        ["COUNT(*)", "SUM(traffickMonths)", "COUNT(traffickMonths)"]
    );
    assert_close(&r, 0, |_| rows);
    assert_close(&r, 1, |_| sum);
    assert_close(&r, 2, |_| present);

    let entries = pull(&fed).await;
    let released: Vec<(&str, Option<&str>)> = entries
        .iter()
        .filter_map(|e| match &e.event {
            Event::Released {
                query_id, source, ..
            } => Some((query_id.as_str(), source.as_deref())),
            _ => None,
        })
        .collect();
    assert_eq!(
        released,
        [("grouped", Some("postgres")), ("avg", Some("postgres"))]
    );
    assert!(
        (spent(&mut alice).await - 20.0).abs() < 1e-9,
        "each release spent its epsilon once"
    );
}

/// Points the node's source at a loopback port where nothing listens.
fn dead_database(config: &mut NodeConfig) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = config.base_dir.join("dead.url");
    std::fs::write(
        &path,
        format!("postgres://fedq:s3cret-password@127.0.0.1:{port}/cases"),
    )
    .unwrap();
    let source = config.datasets[0].source.as_mut().unwrap();
    source.url_file = Some(path);
    source.statement_timeout_ms = 2000;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_gives_a_clear_error_and_spends_nothing() {
    // The node starts anyway: the dataset's queries fail until it answers.
    let fed =
        TestFederation::start_postgres((Partner::Hotline, 200, 3), roomy_budget(), dead_database)
            .await;
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    for attempt in 0..2 {
        // The same id twice: a retry after a returned reservation runs afresh.
        let e = alice
            .query(q(
                "down",
                "SELECT gender, COUNT(*) FROM cases GROUP BY gender",
                1.0,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "attempt {attempt}: {e:?}");
        assert!(
            e.message().contains("database is unreachable")
                && e.message().contains("nothing was spent"),
            "{}",
            e.message()
        );
        assert!(!e.message().contains("s3cret"), "{}", e.message());
        assert_eq!(spent(&mut alice).await, 0.0, "nothing spent");
    }
    let entries = pull(&fed).await;
    let kinds: Vec<&str> = entries
        .iter()
        .filter(|e| match &e.event {
            Event::Reserved { query_id, .. } | Event::ReservationReturned { query_id, .. } => {
                query_id == "down"
            }
            Event::Released { .. } | Event::Debited { .. } => true,
            _ => false,
        })
        .map(|e| e.event.kind())
        .collect();
    assert_eq!(
        kinds,
        [
            "reserved",
            "reservation_returned",
            "reserved",
            "reservation_returned"
        ],
        "held, returned, never released"
    );
    for e in &entries {
        if let Event::ReservationReturned { reason, .. } = &e.event {
            assert_eq!(
                reason,
                "database source failed: its database is unreachable; nothing was released"
            );
        }
    }
    let text = format!("{entries:?}");
    assert!(
        !text.contains("s3cret"),
        "the URL's password is never logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_check_names_every_mismatched_column() {
    let url = test_database_url();
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("cases.csv");
    fedq_engine::synth::write_csv(Partner::Ngo, 50, 1, std::fs::File::create(&csv).unwrap())
        .unwrap();
    let table = load_csv_into_postgres(&url, &csv).await;
    let client = database_client(&url).await;
    client
        .batch_execute(&format!(
            r#"ALTER TABLE {table} ALTER COLUMN "ageBroad" TYPE integer USING NULL;
               ALTER TABLE {table} DROP COLUMN "traffickMonths";
               ALTER TABLE {table} RENAME COLUMN "gender" TO "Gender""#
        ))
        .await
        .unwrap();
    let ca = fedq_pki::Authority::generate("ca").unwrap();
    let mut config = node_config(&ca, dir.path(), "node-0", roomy_budget());
    std::fs::write(dir.path().join("db.url"), &url).unwrap();
    config.datasets[0].source = Some(fedq_node::config::SourceConfig {
        kind: fedq_node::config::SourceKind::Postgres,
        table,
        url_file: Some("db.url".into()),
        url_env: None,
        ca: None,
        statement_timeout_ms: 10_000,
    });
    let e = fedq_node::server::start(config)
        .await
        .unwrap()
        .stop()
        .await
        .expect_err("a mismatched table stops the node");
    let msg = format!("{e:#}");
    for want in [
        "column ageBroad is declared categorical but the database column is integer",
        "column traffickMonths is missing",
        "column gender is missing",
        "the database has Gender; names are case-sensitive",
    ] {
        assert!(msg.contains(want), "{want:?} in {msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injection_through_values_names_and_identifiers_is_refused_or_inert() {
    const HOSTILE: &str = "NGO'; DROP TABLE cases; --";
    let fed = TestFederation::start_postgres((Partner::Ngo, 500, 5), roomy_budget(), |c| {
        // A declared category that is itself an injection attempt: bound as
        // a parameter, it is only ever compared.
        let ds = c.datasets[0]
            .columns
            .iter_mut()
            .find(|c| c.name == "Datasource")
            .unwrap();
        ds.domain.as_mut().unwrap().push(HOSTILE.into());
    })
    .await;
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    let refused = [
        "SELECT COUNT(*) FROM cases WHERE gender = '''; DROP TABLE cases; --'",
        "SELECT COUNT(*) FROM cases WHERE gender = 'Female'; DROP TABLE cases; --",
        "SELECT COUNT(*) FROM \"cases; DROP TABLE cases; --\"",
        "SELECT COUNT(*) FROM cases WHERE \"gender\"\" = 'x'; DROP TABLE cases; --\" = 'Female'",
        "SELECT COUNT(*) FROM cases WHERE traffickMonths = 1 OR 1 = 1",
        "SELECT COUNT(*) FROM cases WHERE traffickMonths = pg_sleep(10)",
        "SELECT COUNT(*) FROM public.cases",
        "SELECT COUNT(*) FROM cases WHERE gender = 'Female' UNION SELECT COUNT(*) FROM pg_user",
    ];
    for (i, sql) in refused.iter().enumerate() {
        let e = alice
            .query(q(&format!("r{i}"), sql, 1.0))
            .await
            .unwrap_err();
        assert!(
            matches!(e.code(), Code::InvalidArgument | Code::NotFound),
            "{sql}: {e:?}"
        );
    }
    // Inert: the hostile category is a value like any other.
    let r = alice
        .query(q(
            "inert",
            "SELECT Datasource, COUNT(*) FROM cases WHERE Datasource IN ('NGO', 'NGO''; DROP TABLE cases; --') GROUP BY Datasource",
            10.0,
        ))
        .await
        .unwrap()
        .into_inner();
    let keys: Vec<&str> = r.cells.iter().map(|c| c.values[0].as_str()).collect();
    assert!(keys.contains(&HOSTILE), "{keys:?}");
    let exact = exact_counts(&fed.nodes[0].csv, &["Datasource"], |get| {
        get("Datasource") == "NGO"
    });
    assert_close(&r, 0, |key| exact.get(key).copied().unwrap_or(0));
    assert!(
        (spent(&mut alice).await - 10.0).abs() < 1e-9,
        "refusals spend nothing"
    );

    // Odd names in node.toml are refused before anything connects.
    let mut config = fed.nodes[0].config.clone();
    config.datasets[0].source.as_mut().unwrap().table = "cases; DROP TABLE cases".into();
    assert!(config
        .validate()
        .unwrap_err()
        .contains("is not a plain identifier"));
    let mut config = fed.nodes[0].config.clone();
    config.datasets[0].columns[0].name = "gender\"; DROP TABLE cases; --".into();
    assert!(config
        .validate()
        .unwrap_err()
        .contains("is not a plain identifier"));

    // The table is still there with every row.
    let table = fed.nodes[0].config.datasets[0]
        .source
        .as_ref()
        .unwrap()
        .table
        .clone();
    let client = database_client(&test_database_url()).await;
    let n: i64 = client
        .query_one(&format!("SELECT COUNT(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 500);
}

/// A private PostgreSQL server in `dir` (started with the test script), so
/// that this test can turn TLS on and stop it.
fn private_server(dir: &std::path::Path) -> String {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg-test-server.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg("start")
        .arg(dir)
        .output()
        .expect("run scripts/pg-test-server.sh");
    assert!(
        out.status.success(),
        "this test starts its own PostgreSQL server and needs the server binaries (apt-get install postgresql): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Stops the private server when dropped, whatever the test did.
struct Stop<'a>(&'a std::path::Path);

impl Stop<'_> {
    fn now(&self) -> bool {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg-test-server.sh");
        std::process::Command::new("bash")
            .arg(&script)
            .arg("stop")
            .arg(self.0)
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.now();
    }
}

/// Writes `server.crt`/`server.key` into the server's data directory,
/// owned by the server's user as PostgreSQL requires.
fn install_server_certificate(data: &std::path::Path, pair: &fedq_pki::PemPair) {
    use std::os::unix::fs::PermissionsExt;
    let (crt, key) = (data.join("server.crt"), data.join("server.key"));
    std::fs::write(&crt, &pair.cert).unwrap();
    std::fs::write(&key, &pair.key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let owner = std::fs::metadata(data).unwrap();
    use std::os::unix::fs::MetadataExt;
    for p in [&crt, &key] {
        std::os::unix::fs::chown(p, Some(owner.uid()), Some(owner.gid())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_database_and_a_database_that_stops() {
    let dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let server = dir.path().join("pg");
    let url = private_server(&server);
    let stop = Stop(&server);
    let db_ca = fedq_pki::Authority::generate("database CA").unwrap();
    // The node reaches the database at 127.0.0.1: its certificate must say
    // so (node certificates carry loopback names only when asked for).
    let now = std::time::SystemTime::now();
    let day = std::time::Duration::from_secs(86_400);
    install_server_certificate(
        &server.join("data"),
        &db_ca
            .issue_with_names(
                Role::Node,
                "db",
                &["localhost".into(), "127.0.0.1".into()],
                now - day,
                now + day,
            )
            .unwrap(),
    );
    let admin = database_client(&url).await;
    admin
        .batch_execute("ALTER SYSTEM SET ssl = on")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let csv = dir.path().join("cases.csv");
    fedq_engine::synth::write_csv(Partner::Ngo, 300, 9, std::fs::File::create(&csv).unwrap())
        .unwrap();
    let table = load_csv_into_postgres(&url, &csv).await;
    std::fs::write(dir.path().join("db-ca.pem"), &db_ca.pem.cert).unwrap();

    let fed = TestFederation::start_postgres((Partner::Ngo, 10, 1), roomy_budget(), |c| {
        let url_file = c.base_dir.join("private.url");
        std::fs::write(&url_file, &url).unwrap();
        let src = c.datasets[0].source.as_mut().unwrap();
        src.url_file = Some(url_file);
        src.table = table.clone();
        src.ca = Some(dir.path().join("db-ca.pem"));
    })
    .await;
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    let r = alice
        .query(q(
            "tls",
            "SELECT isForcedLabour, COUNT(*) FROM cases GROUP BY isForcedLabour",
            10.0,
        ))
        .await
        .unwrap()
        .into_inner();
    let exact = exact_counts(&csv, &["isForcedLabour"], |_| true);
    assert_close(&r, 0, |key| exact.get(key).copied().unwrap_or(0));
    let tls_sessions: i64 = admin
        .query_one(
            "SELECT COUNT(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE ssl AND application_name = 'fedq-node'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tls_sessions, 1, "the node's session is encrypted");

    // The database stops: a clear error, nothing spent, the hold returned.
    drop(admin);
    assert!(stop.now(), "the test server stops");
    let e = alice
        .query(q("stopped", "SELECT COUNT(*) FROM cases", 1.0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("nothing was spent"), "{}", e.message());
    assert!((spent(&mut alice).await - 10.0).abs() < 1e-9);
    let returned = pull(&fed)
        .await
        .into_iter()
        .filter(|e| {
            matches!(&e.event, Event::ReservationReturned { query_id, .. } if query_id == "stopped")
        })
        .count();
    assert_eq!(returned, 1);
}

/// A partner answering from its own database in its own coding (`sex` as
/// F/M/T, ages in years, country names, yes/no flags), read through the
/// shipped mapping in the node: the answers are those of the
/// standard-coded original (checked against exact values from it, at
/// OpenDP's bound), including a comparison of two mapped columns and a
/// condition mixing mapped and unmapped ones; the release names the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_database_in_its_own_coding_answers_through_the_mapping() {
    let fed = TestFederation::start_postgres_with(
        (Partner::CaseManagement, 3000, 17),
        true,
        roomy_budget(),
        |_| {},
    )
    .await;
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    let csv = &fed.nodes[0].csv;

    let r = alice
        .query(q(
            "cross-border",
            "SELECT gender, ageBroad, COUNT(*) FROM cases WHERE citizenship <> CountryOfExploitation AND (isForcedLabour = 1 OR yearOfRegistration > 2015) GROUP BY gender, ageBroad",
            10.0,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.cells.len(), 4 * 10);
    let present = |v: &str| v != "-99" && !v.is_empty();
    let exact = exact_counts(csv, &["gender", "ageBroad"], |get| {
        let (c, e) = (get("citizenship"), get("CountryOfExploitation"));
        let year = get("yearOfRegistration").parse::<i64>().ok();
        present(&c)
            && present(&e)
            && c != e
            && (get("isForcedLabour") == "1" || year.is_some_and(|y| y != -99 && y > 2015))
    });
    assert!(
        exact.values().sum::<i64>() > 100,
        "the condition keeps rows: {exact:?}"
    );
    assert_close(&r, 0, |key| exact.get(key).copied().unwrap_or(0));

    let r = alice
        .query(q(
            "by-country",
            "SELECT citizenship, COUNT(*) FROM cases WHERE isSexualExploit = 1 GROUP BY citizenship",
            10.0,
        ))
        .await
        .unwrap()
        .into_inner();
    let exact = exact_counts(csv, &["citizenship"], |get| get("isSexualExploit") == "1");
    assert_close(&r, 0, |key| exact.get(key).copied().unwrap_or(0));

    let entries = pull(&fed).await;
    let sources: Vec<Option<&str>> = entries
        .iter()
        .filter_map(|e| match &e.event {
            Event::Released { source, .. } => Some(source.as_deref()),
            _ => None,
        })
        .collect();
    assert_eq!(sources, [Some("postgres"), Some("postgres")]);
}
