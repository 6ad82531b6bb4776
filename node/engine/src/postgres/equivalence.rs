//! Engine-layer equivalence, below the privacy layer: on the same rows, the
//! PostgreSQL push-down computes exactly the aggregates of the embedded
//! engine, for a broad fixed set of queries and for random ones. No exact
//! value is served anywhere: both sides are called directly.
//!
//! Needs a PostgreSQL server: `FEDQ_TEST_POSTGRES` (set by `.ci/run`), or
//! one started by `scripts/pg-test-server.sh ensure` from the machine's
//! packages. Without either the test fails, saying how to install them.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio_postgres::types::ToSql;

use super::*;
use crate::source::{SourceConfig, SourceKind};
use crate::table::Table;
use fedq_plan::plan::plan;
use fedq_plan::schema::MISSING;

/// The test server's URL: `FEDQ_TEST_POSTGRES`, or a shared server
/// started (or reused) by `scripts/pg-test-server.sh ensure`.
pub(crate) fn test_database_url() -> String {
    if let Ok(url) = std::env::var("FEDQ_TEST_POSTGRES") {
        return url;
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/pg-test-server.sh"
    );
    let out = std::process::Command::new("bash")
        .args([script, "ensure"])
        .output()
        .expect("cannot run scripts/pg-test-server.sh");
    assert!(
        out.status.success(),
        "no PostgreSQL test server: set FEDQ_TEST_POSTGRES to a server's URL, or install PostgreSQL's server binaries (Debian/Ubuntu: apt-get install postgresql) so that scripts/pg-test-server.sh can start one.\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// How the test stores each declared column in the database; booleans
/// alternate between `boolean` and `smallint` columns to cover both.
fn db_type(i: usize, c: &Column) -> &'static str {
    match c {
        Column::Categorical { .. } => "text",
        Column::Integer { .. } => "integer",
        Column::Boolean { .. } if i.is_multiple_of(2) => "boolean",
        Column::Boolean { .. } => "smallint",
        Column::PersonId { .. } | Column::Open { .. } => "text",
    }
}

/// One database cell and the code the engine holds for it.
enum Cell {
    Text(Option<String>),
    Int(Option<i32>),
    Bool(Option<bool>),
    Small(Option<i16>),
}

/// A database value for a code, with every spelling of "missing" and some
/// values the embedded store would refuse at ingest (out of domain, out of
/// bounds), returned with the code the database source gives them.
fn cell(i: usize, c: &Column, code: i64, rng: &mut ChaCha8Rng) -> (Cell, i64) {
    let odd = rng.random_bool(0.02);
    match c {
        Column::Open { .. } => unreachable!("no open column in this test"),
        Column::Categorical { domain, .. } => {
            if odd {
                let v = ["Unknown", " Female", "female", "-99 "][rng.random_range(0..4)];
                return (Cell::Text(Some(v.into())), MISSING);
            }
            if code == MISSING {
                let v = [None, Some(""), Some("-99")][rng.random_range(0..3)];
                return (Cell::Text(v.map(str::to_string)), MISSING);
            }
            (Cell::Text(Some(domain[code as usize].clone())), code)
        }
        Column::Integer { min, max, .. } => {
            if odd {
                return if rng.random_bool(0.5) {
                    (Cell::Int(Some(*max as i32 + 50)), *max)
                } else {
                    (Cell::Int(Some(*min as i32 - 7)), *min)
                };
            }
            if code == MISSING {
                let v = [None, Some(-99)][rng.random_range(0..2)];
                return (Cell::Int(v), MISSING);
            }
            (Cell::Int(Some(code as i32)), code)
        }
        Column::Boolean { .. } if db_type(i, c) == "boolean" => {
            if code == MISSING {
                return (Cell::Bool(None), MISSING);
            }
            (Cell::Bool(Some(code == 1)), code)
        }
        Column::PersonId { .. } => unreachable!("no person column in this test"),
        Column::Boolean { .. } => {
            if odd {
                return (Cell::Small(Some(7)), MISSING);
            }
            if code == MISSING {
                let v = [None, Some(-99)][rng.random_range(0..2)];
                return (Cell::Small(v), MISSING);
            }
            (Cell::Small(Some(code as i16)), code)
        }
    }
}

/// A CTDC-shaped table of `rows` rows, loaded into a fresh PostgreSQL
/// table (in its own schema) and into an embedded [`Table`].
pub(crate) struct Loaded {
    pub(crate) schema: Schema,
    pub(crate) table: Table,
    pub(crate) relation: String,
}

async fn load(client: &Client, rows: usize, seed: u64) -> Loaded {
    load_with(client, rows, seed, None).await
}

/// As [`load`]; with `max_records`, a `personId` text column (about four
/// records a person, spelt with stray spaces sometimes) and a person-level
/// unit keeping that many records per person.
async fn load_with(client: &Client, rows: usize, seed: u64, max_records: Option<u32>) -> Loaded {
    let columns = crate::synth::ctdc_columns();
    let mut schema = Schema::from_specs("cases", &columns).unwrap();
    if let Some(k) = max_records {
        schema = schema.with_person_unit("personId", k).unwrap();
    }
    let persons = (rows / 4).max(1);
    let mut csv = Vec::new();
    crate::synth::write_csv(crate::synth::Partner::Hotline, rows, seed, &mut csv).unwrap();
    let mut reader = csv::Reader::from_reader(csv.as_slice());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ns = format!(
        "eq_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let defs: Vec<String> = schema
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} {}", statement::quote(c.name()), db_type(i, c)))
        .collect();
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {ns}; CREATE TABLE {ns}.cases ({})",
            defs.join(", ")
        ))
        .await
        .unwrap();
    let mut table = Table::new(schema.clone());
    let mut batch: Vec<Vec<Cell>> = Vec::new();
    let mut codes = Vec::new();
    let mut records = reader.records();
    loop {
        let record = records.next();
        if let Some(r) = &record {
            let r = r.as_ref().unwrap();
            let mut row = Vec::new();
            for (i, (c, raw)) in schema.columns.iter().zip(r.iter()).enumerate() {
                let (cell, code) = cell(i, c, c.encode(raw).unwrap(), &mut rng);
                row.push(cell);
                codes.push(code);
            }
            if schema.person.is_some() {
                let n = rng.random_range(0..persons);
                let id = if rng.random_bool(0.1) {
                    format!(" P-{n} ")
                } else {
                    format!("P-{n}")
                };
                codes.push(fedq_plan::schema::person_code(id.trim()));
                row.push(Cell::Text(Some(id)));
            }
            batch.push(row);
        }
        if batch.len() == 2000 || (record.is_none() && !batch.is_empty()) {
            insert(client, &ns, &schema, &batch).await;
            table.append_row_major(&codes);
            batch.clear();
            codes.clear();
        }
        if record.is_none() {
            break;
        }
    }
    Loaded {
        schema,
        table,
        relation: format!("{ns}.cases"),
    }
}

/// One INSERT ... SELECT FROM unnest($1, $2, ...) per batch: one array
/// parameter per column.
async fn insert(client: &Client, ns: &str, schema: &Schema, rows: &[Vec<Cell>]) {
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut casts = Vec::new();
    for (i, c) in schema.columns.iter().enumerate() {
        macro_rules! column {
            ($variant:ident) => {
                Box::new(
                    rows.iter()
                        .map(|r| match &r[i] {
                            Cell::$variant(v) => v.clone(),
                            _ => unreachable!(),
                        })
                        .collect::<Vec<_>>(),
                ) as Box<dyn ToSql + Sync + Send>
            };
        }
        params.push(match db_type(i, c) {
            "text" => column!(Text),
            "integer" => column!(Int),
            "boolean" => column!(Bool),
            _ => column!(Small),
        });
        casts.push(format!("${}::{}[]", i + 1, db_type(i, c)));
    }
    let refs: Vec<&(dyn ToSql + Sync)> = params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect();
    client
        .execute(
            &format!(
                "INSERT INTO {ns}.cases SELECT * FROM unnest({})",
                casts.join(", ")
            ),
            &refs,
        )
        .await
        .unwrap();
}

/// Runs a test on a one-worker runtime, with the test server's URL and a
/// temporary directory.
fn with_database<F: std::future::Future<Output = ()>>(
    test: impl FnOnce(String, tempfile::TempDir) -> F,
) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
        .block_on(test(test_database_url(), tempfile::tempdir().unwrap()))
}

pub(crate) async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

fn source(url: &str, loaded: &Loaded, dir: &Path) -> PgSource {
    std::fs::write(dir.join("db.url"), url).unwrap();
    let src = SourceConfig {
        kind: SourceKind::Postgres,
        table: loaded.relation.clone(),
        url_file: Some("db.url".into()),
        url_env: None,
        ca: None,
        statement_timeout_ms: 30_000,
    };
    PgSource::new("cases", loaded.schema.clone(), &src, dir).unwrap()
}

/// Queries covering every predicate kind, NOT/OR over missing values,
/// IS [NOT] NULL, IN, BETWEEN, every measurement, GROUP BY over 0, 1 and 2
/// columns (categorical and boolean), and sums that clamp.
const QUERIES: &[&str] = &[
    "SELECT COUNT(*) FROM cases",
    "SELECT COUNT(*), SUM(traffickMonths), AVG(yearOfRegistration) FROM cases",
    "SELECT gender, COUNT(*) FROM cases GROUP BY gender",
    "SELECT gender, ageBroad, COUNT(*) FROM cases WHERE isForcedLabour = 1 GROUP BY gender, ageBroad",
    "SELECT isSexualExploit, isForcedLabour, COUNT(*), COUNT(traffickMonths) FROM cases GROUP BY isSexualExploit, isForcedLabour",
    "SELECT citizenship, SUM(traffickMonths) FROM cases WHERE yearOfRegistration BETWEEN 2010 AND 2020 GROUP BY citizenship",
    "SELECT COUNT(*) FROM cases WHERE yearOfRegistration NOT BETWEEN 2010 AND 2020",
    "SELECT COUNT(*) FROM cases WHERE yearOfRegistration BETWEEN 2020 AND 2010",
    "SELECT COUNT(*) FROM cases WHERE NOT gender = 'Female'",
    "SELECT COUNT(*) FROM cases WHERE gender <> 'Female'",
    "SELECT COUNT(*) FROM cases WHERE NOT (gender = 'Female' OR isForcedLabour = 1)",
    "SELECT COUNT(*) FROM cases WHERE gender = 'Female' OR NOT isForcedLabour = 1",
    "SELECT COUNT(*) FROM cases WHERE NOT (ageBroad IN ('0--8', '9--17') AND traffickMonths > 12)",
    "SELECT COUNT(*) FROM cases WHERE gender IS NULL",
    "SELECT ageBroad, COUNT(*) FROM cases WHERE gender IS NOT NULL AND NOT ageBroad IS NULL GROUP BY ageBroad",
    "SELECT COUNT(*) FROM cases WHERE NOT gender IS NULL OR traffickMonths IS NULL",
    "SELECT COUNT(*) FROM cases WHERE ageBroad NOT IN ('0--8', '48+')",
    "SELECT COUNT(*) FROM cases WHERE traffickMonths IN (1, 2, 3, 500, -5)",
    "SELECT COUNT(*) FROM cases WHERE traffickMonths NOT IN (0, 120)",
    "SELECT COUNT(*) FROM cases WHERE traffickMonths < 0 OR traffickMonths >= 120",
    "SELECT COUNT(*) FROM cases WHERE traffickMonths <= 6 AND yearOfRegistration > 2015",
    "SELECT COUNT(*) FROM cases WHERE 2015 < yearOfRegistration",
    "SELECT COUNT(*) FROM cases WHERE yearOfRegistration = -9223372036854775808",
    "SELECT COUNT(*) FROM cases WHERE traffickMonths > 9223372036854775807",
    "SELECT COUNT(*) FROM cases WHERE isForcedLabour = true AND isSexualExploit = false",
    "SELECT COUNT(*) FROM cases WHERE isForcedLabour <> 1",
    "SELECT Datasource, majorityStatus, AVG(traffickMonths), COUNT(isOtherExploit) FROM cases GROUP BY Datasource, majorityStatus",
    "SELECT CountryOfExploitation, COUNT(*), SUM(yearOfRegistration) FROM cases WHERE NOT (NOT isSexualExploit = 1) GROUP BY CountryOfExploitation",
    "SELECT gender, COUNT(gender), COUNT(ageBroad) FROM cases WHERE ageBroad = '48+' GROUP BY gender",
    "SELECT MEDIAN(traffickMonths), QUANTILE(yearOfRegistration, 0.9) FROM cases",
    "SELECT gender, AVG(isForcedLabour), SUM(isSexualExploit), VARIANCE(isOtherExploit) FROM cases GROUP BY gender",
    "SELECT yearOfRegistration, COUNT(*), AVG(traffickMonths) FROM cases GROUP BY yearOfRegistration",
    "SELECT CASE WHEN traffickMonths < 6 THEN '<6m' WHEN traffickMonths < 12 THEN '6-11m' ELSE '12m+' END AS duration, COUNT(*), SUM(isForcedLabour) FROM cases GROUP BY duration",
    "SELECT gender, CASE WHEN ageBroad IN ('0--8', '9--17') THEN 'minor' WHEN ageBroad IS NOT NULL THEN 'adult' END, COUNT(*) FROM cases WHERE yearOfRegistration > 2012 GROUP BY 1, 2",
    "SELECT CASE isForcedLabour WHEN 1 THEN 'forced labour' WHEN 0 THEN 'other' END AS kind, AVG(traffickMonths) FROM cases GROUP BY kind",
    "SELECT gender, SUM(CASE WHEN ageBroad IN ('0--8', '9--17') THEN 1 ELSE 0 END), COUNT(*) FILTER (WHERE traffickMonths > 12 OR isForcedLabour = 1), AVG(CASE WHEN yearOfRegistration >= 2015 THEN 1 ELSE 0 END) FROM cases GROUP BY gender",
    "SELECT yearOfRegistration AS y, gender, COUNT(*) FROM cases WHERE yearOfRegistration >= 2010 GROUP BY y, 2",
    "SELECT gender, isForcedLabour, VARIANCE(traffickMonths), STDDEV(yearOfRegistration) FROM cases WHERE NOT ageBroad IS NULL GROUP BY gender, isForcedLabour",
    "SELECT ageBroad, HISTOGRAM(traffickMonths, 7) FROM cases WHERE isSexualExploit = 1 GROUP BY ageBroad",
    "SELECT COUNT(*) FROM cases WHERE citizenship <> CountryOfExploitation",
    "SELECT CountryOfExploitation, COUNT(*) FILTER (WHERE citizenship = CountryOfExploitation), AVG(CASE WHEN CountryOfExploitation <> citizenship THEN 1 ELSE 0 END) FROM cases GROUP BY CountryOfExploitation",
    "SELECT CASE WHEN citizenship = CountryOfExploitation THEN 'domestic' WHEN citizenship <> CountryOfExploitation THEN 'cross-border' END AS corridor, COUNT(*) FROM cases GROUP BY corridor",
    "SELECT COUNT(*) FROM cases WHERE NOT (gender = majorityStatus) OR isForcedLabour <> isSexualExploit",
    "SELECT COUNT(*) FROM cases WHERE traffickMonths < yearOfRegistration AND isForcedLabour >= isOtherExploit",
    "SELECT gender, COUNT(*) FROM cases WHERE yearOfRegistration <= traffickMonths OR isSexualExploit > isForcedLabour GROUP BY gender",
    "SELECT SUM(traffickMonths), SUM(traffickMonths + 0), COUNT(traffickMonths), SUM(yearOfRegistration), SUM(yearOfRegistration * 1), SUM(traffickMonths + yearOfRegistration) FROM cases",
    "SELECT SUM(traffickMonths + yearOfRegistration), AVG(COALESCE(traffickMonths, 0)) FROM cases",
    "SELECT gender, AVG(traffickMonths / 12), SUM(traffickMonths * 1.0), AVG(isForcedLabour + isSexualExploit) FROM cases GROUP BY gender",
    "SELECT SUM((traffickMonths - 60) * -3), AVG(COALESCE(traffickMonths, yearOfRegistration - 2000, -1) / -7) FROM cases WHERE COALESCE(traffickMonths, 0) > 6",
    "SELECT COALESCE(gender, 'Unknown') AS g, COUNT(*) FROM cases WHERE COALESCE(ageBroad, '18--20') IN ('18--20', '9--17') GROUP BY g",
    "SELECT COUNT(*) FROM cases WHERE COALESCE(gender, 'Unknown') <> 'Unknown' OR NOT COALESCE(isForcedLabour, 0) = 1",
    "SELECT COALESCE(isForcedLabour, 0), SUM(traffickMonths * traffickMonths - isOtherExploit) FROM cases GROUP BY 1",
    "SELECT SUM(-traffickMonths + 3), AVG(-(isForcedLabour - 1)) FROM cases",
    "SELECT r.region, COUNT(*), AVG(traffickMonths) FROM cases JOIN regions r ON r.country = CountryOfExploitation WHERE r.region <> 'Asia' GROUP BY r.region",
    "SELECT o.region AS origin, d.region AS destination, COUNT(*) FROM cases LEFT JOIN regions o ON citizenship = o.country LEFT JOIN regions d ON d.country = CountryOfExploitation WHERE o.region IS NULL OR d.region IS NOT NULL GROUP BY 1, 2",
    // GROUP BY a per-row number (one key per value of its derived
    // bounds) and BIN ranges over declared or derived bounds.
    "SELECT traffickMonths / 12 AS years, COUNT(*), AVG(traffickMonths) FROM cases GROUP BY years",
    "SELECT yearOfRegistration - 2000, gender, COUNT(*) FROM cases WHERE isForcedLabour = 1 GROUP BY 1, 2",
    "SELECT COALESCE(traffickMonths, -1) / 24 AS d, SUM(isSexualExploit) FROM cases GROUP BY d",
    "SELECT -traffickMonths / 7 + isSexualExploit AS x, COUNT(*) FROM cases GROUP BY x",
    "SELECT BIN(traffickMonths, 11) AS m, COUNT(*), SUM(isForcedLabour) FROM cases GROUP BY m",
    "SELECT gender, BIN(yearOfRegistration - 2000, 4), COUNT(*) FROM cases WHERE traffickMonths > 3 GROUP BY 1, 2",
    "SELECT BIN(traffickMonths * 2 - yearOfRegistration, 9) AS x, AVG(traffickMonths) FROM cases GROUP BY x",
    "SELECT BIN(isForcedLabour, 2), BIN(traffickMonths, 121), COUNT(*) FROM cases GROUP BY 1, 2",
];

/// With a person-level unit, the push-down's `ROW_NUMBER()` stage keeps
/// exactly the records the engine keeps (at most 2 per person, ordered by
/// the other columns' codes, missing last).
#[test]
fn push_down_truncates_per_person_like_the_engine() {
    with_database(|url, dir| async move {
        let client = connect(&url).await;
        let loaded = load_with(&client, 8_000, 21, Some(2)).await;
        let pg = source(&url, &loaded, dir.path());
        pg.connect().await.unwrap();
        for sql in QUERIES {
            let p = plan(sql, &loaded.schema, 100_000).unwrap();
            let db = pg
                .exact_values(&p)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            assert_eq!(db, loaded.table.exact_values(&p), "{sql}");
        }
        // Truncation really happened: fewer records count than exist.
        let count = plan("SELECT COUNT(*) FROM cases", &loaded.schema, 10).unwrap();
        let kept = loaded.table.exact_values(&count)[0][0];
        assert!(kept <= 2 * 2_000, "kept {kept} of 8000 records");
    });
}

#[test]
fn push_down_equals_the_embedded_engine() {
    with_database(|url, dir| async move {
        let client = connect(&url).await;
        let loaded = load(&client, 20_000, 11).await;
        let pg = source(&url, &loaded, dir.path());
        pg.connect().await.unwrap();
        for sql in QUERIES {
            let p = plan(sql, &loaded.schema, 100_000).unwrap();
            let db = pg
                .exact_values(&p)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            assert_eq!(db, loaded.table.exact_values(&p), "{sql}");
        }
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..300 {
            let sql = random_query(&mut rng, &loaded.schema);
            let p = plan(&sql, &loaded.schema, 100_000).unwrap_or_else(|e| panic!("{sql}: {e}"));
            let db = pg
                .exact_values(&p)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            assert_eq!(db, loaded.table.exact_values(&p), "{sql}");
        }
        assert_eq!(pg.coded_again(), 0, "every key was read raw");
    });
}

/// A partner's own coding straight from its database: the table holds the
/// partner's columns and spellings (`partner_coding::recode`: `sex` as
/// F/M/T/unknown, ages in years stored as integers, country names, yes/no
/// flags), the source reads it through the shipped mapping, and every query
/// (the fixed list and random ones) equals the embedded engine over the
/// standard-coded original of the same records. Also: stray spellings the
/// mapping cannot place are missing, and with the mapping gone the same
/// table is refused by the start-up check, naming the columns.
#[test]
fn mapped_columns_read_from_the_database_equal_the_engine() {
    with_database(|url, dir| async move {
        let client = connect(&url).await;
        let schema = Schema::from_specs("cases", &crate::synth::ctdc_columns()).unwrap();
        let mut standard = Vec::new();
        crate::synth::write_csv(crate::synth::Partner::Ngo, 12_000, 41, &mut standard).unwrap();
        let mut partner = Vec::new();
        crate::partner_coding::recode(standard.as_slice(), &mut partner).unwrap();

        // The engine: the standard-coded original.
        let mut table = Table::new(schema.clone());
        let mut codes = Vec::new();
        let mut reader = csv::Reader::from_reader(standard.as_slice());
        for r in reader.records() {
            let r = r.unwrap();
            for (c, raw) in schema.columns.iter().zip(r.iter()) {
                codes.push(c.encode(raw).unwrap());
            }
        }
        table.append_row_major(&codes);

        // The database: the partner's file as it is.
        let ns = format!(
            "mapped_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        let relation = crate::partner_coding::load_into_postgres(&client, &ns, &partner)
            .await
            .unwrap();
        // Spellings no mapping places: missing to the node (the engine's
        // original has them missing too).
        let mut strays = 0;
        for update in [
            "sex = 'stray ' || ctid::text WHERE sex IS NULL OR sex IN ('unknown', '-99')",
            "nationality = 'Atlantis' WHERE nationality IS NULL OR nationality = '-99'",
            // Both spellings of a missing age: -99 and NULL; and whole
            // numbers no band holds, missing too (a condition on ages is
            // written exactly in SQL: these must not pass it).
            "age = NULL WHERE age = -99 AND \"yearOfRegistration\" % 2 = 0",
            "age = 151 + \"yearOfRegistration\" % 40 WHERE age = -99 AND \"yearOfRegistration\" % 8 = 1",
            "age = -1 - \"yearOfRegistration\" % 7 WHERE age = -99 AND \"yearOfRegistration\" % 8 = 3",
        ] {
            strays += client
                .execute(&format!("UPDATE {ns}.cases SET {update}"), &[])
                .await
                .unwrap();
        }
        assert!(strays > 100, "{strays} stray spellings");

        let mapping = crate::partner_coding::mapping();
        let loaded = Loaded {
            schema: schema.clone(),
            table,
            relation,
        };
        // Without the mapping the partner's table does not match.
        let plain = source(&url, &loaded, dir.path());
        match plain.connect().await {
            Err(SourceError::Mismatch(why)) => assert!(
                why.contains("column gender is missing") && why.contains("ageBroad"),
                "{why}"
            ),
            other => panic!("expected a mismatch, got {other:?}"),
        }
        let pg = source(&url, &loaded, dir.path())
            .with_mapping(&mapping)
            .unwrap();
        pg.connect().await.unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let random: Vec<String> = (0..250).map(|_| random_query(&mut rng, &schema)).collect();
        // Measurements of mapped columns, computed in the node.
        const MAPPED: &[&str] = &[
            // Top-level conjuncts on mapped columns, which also filter the
            // rows of known spellings in the database (NULL ages included).
            "SELECT gender, COUNT(*) FROM cases WHERE ageBroad IS NULL AND isForcedLabour = 1 GROUP BY gender",
            "SELECT COUNT(*), SUM(traffickMonths) FROM cases WHERE NOT ageBroad IN ('0--8', '48+') AND citizenship IS NOT NULL AND NOT isSexualExploit = 1",
            "SELECT gender, VARIANCE(isForcedLabour), SUM(isSexualExploit), COUNT(isForcedLabour), COUNT(ageBroad) FROM cases GROUP BY gender",
            "SELECT HISTOGRAM(traffickMonths, 4) FROM cases WHERE citizenship <> CountryOfExploitation",
            "SELECT citizenship, AVG(isForcedLabour + traffickMonths), COUNT(*) FILTER (WHERE ageBroad IS NULL OR isSexualExploit = 0) FROM cases WHERE ageBroad IN ('9--17') OR traffickMonths > 12 GROUP BY citizenship",
            "SELECT BIN(isSexualExploit + isForcedLabour, 3), COUNT(*) FROM cases WHERE yearOfRegistration > 2012 AND NOT gender = 'Male' GROUP BY 1",
            "SELECT CASE WHEN gender = 'Female' AND yearOfRegistration > 2015 THEN 'f-late' WHEN citizenship = CountryOfExploitation THEN 'domestic' END AS k, COUNT(*), STDDEV(isSexualExploit) FROM cases GROUP BY k",
            // Mapped columns the WHERE alone reads, told TRUE in the
            // database from known spellings (a NULL age beside a stray
            // gender spelling is for the node to decide).
            "SELECT citizenship, COUNT(*) FROM cases WHERE ageBroad = '0--8' OR gender = 'Female' GROUP BY citizenship",
            "SELECT isForcedLabour, COUNT(*) FROM cases WHERE (ageBroad IS NULL OR gender = 'Male') AND (yearOfRegistration < 2014 OR NOT isSexualExploit = 1) GROUP BY isForcedLabour",
            "SELECT COUNT(*) FROM cases WHERE NOT (gender = 'Female' AND citizenship IN ('UA', 'RO')) OR ageBroad IS NOT NULL",
            // Conditions on ages in years, written exactly in SQL (a
            // number no band holds is missing, like NULL and -99).
            "SELECT gender, COUNT(*) FROM cases WHERE ageBroad IN ('0--8', '9--17') AND yearOfRegistration BETWEEN 2010 AND 2020 GROUP BY gender",
            "SELECT isForcedLabour, COUNT(*) FROM cases WHERE ageBroad IS NULL OR NOT ageBroad IN ('48+', '18--20') GROUP BY isForcedLabour",
            "SELECT COUNT(*) FILTER (WHERE ageBroad = '9--17' OR isSexualExploit = 1), COUNT(*) FROM cases WHERE ageBroad <> '0--8' OR (gender = 'Female' AND ageBroad IS NULL)",
        ];
        for sql in QUERIES
            .iter()
            .chain(MAPPED)
            .copied()
            .chain(random.iter().map(String::as_str))
        {
            let p = plan(sql, &schema, 100_000).unwrap_or_else(|e| panic!("{sql}: {e}"));
            let db = pg
                .exact_values(&p)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            assert_eq!(db, loaded.table.exact_values(&p), "{sql}");
        }

        // The operator's coverage, from the table's own values: every row
        // counted once per mapped column, the stray spellings named.
        let (coverage, strict) = pg.coverage().await.unwrap();
        let names: Vec<&str> = coverage.iter().map(|c| c.column.as_str()).collect();
        assert_eq!(
            names,
            [
                "gender",
                "ageBroad",
                "citizenship",
                "CountryOfExploitation",
                "isForcedLabour",
                "isSexualExploit"
            ]
        );
        for c in &coverage {
            assert_eq!(c.coded + c.missing + c.unmapped, 12_000, "{c:?}");
        }
        let citizenship = &coverage[2];
        assert_eq!(citizenship.source, "nationality");
        assert!(
            citizenship.unmapped > 0 && citizenship.unmapped_values[0].0 == "Atlantis",
            "{citizenship:?}"
        );
        assert!(strict.is_empty(), "{strict:?}");
        // A flag the mapping cannot place, under unmapped = "error": named.
        client
            .execute(
                &format!("UPDATE {ns}.cases SET forced_labour = 'maybe' WHERE ctid = (SELECT MIN(ctid) FROM {ns}.cases)"),
                &[],
            )
            .await
            .unwrap();
        let (_, strict) = pg.coverage().await.unwrap();
        assert_eq!(strict.len(), 1, "{strict:?}");
        assert!(
            strict[0].contains("isForcedLabour") && strict[0].contains("\"maybe\" (1 rows)"),
            "{strict:?}"
        );
    });
}

/// Categorical keys are grouped by their raw text and coded in the node:
/// hundreds of distinct stray labels (each missing to the engine) all land
/// on the missing key, and a table with more raw groups than the cap is
/// asked again with its keys coded in the database, with the same answer.
#[test]
fn raw_labels_land_on_missing_and_too_many_are_coded_in_the_database() {
    with_database(|url, dir| async move {
        let client = connect(&url).await;
        let loaded = load(&client, 6_000, 31).await;
        // Every gender and citizenship the engine holds as missing becomes
        // a label of its own in the database.
        let mut strays = 0;
        for name in ["gender", "citizenship"] {
            let i = loaded.schema.index_of(name).unwrap();
            let Column::Categorical { domain, .. } = &loaded.schema.columns[i] else {
                unreachable!()
            };
            strays += client
                .execute(
                    &format!(
                        "UPDATE {} SET {name} = 'stray ' || ctid::text WHERE {name} IS NULL OR NOT ({name} = ANY($1::text[]))",
                        loaded.relation
                    ),
                    &[domain],
                )
                .await
                .unwrap();
        }
        assert!(strays > 60, "only {strays} stray labels");
        let queries = [
            "SELECT gender, COUNT(*) FROM cases GROUP BY gender",
            "SELECT gender, citizenship, COUNT(*), SUM(traffickMonths) FROM cases WHERE isForcedLabour = 1 OR gender IS NULL GROUP BY gender, citizenship",
            "SELECT citizenship, HISTOGRAM(traffickMonths, 4) FROM cases WHERE NOT citizenship IN ('US', 'PH') GROUP BY citizenship",
            "SELECT citizenship, gender, VARIANCE(traffickMonths), COUNT(*) FILTER (WHERE gender IS NOT NULL) FROM cases GROUP BY 1, 2",
        ];
        // At the usual cap every query is answered from raw labels; at 30
        // (4 rows per cell, the floor, is 16 for gender's 3 labels and
        // missing) the GROUP BY gender has too many, and is asked again;
        // the others may be (`None`: not checked).
        for (cap, coded_again) in [
            (statement::RAW_GROUPS_MIN, [Some(false); 4]),
            (30, [Some(true), None, None, None]),
        ] {
            let pg = source(&url, &loaded, dir.path()).with_raw_groups(cap);
            pg.connect().await.unwrap();
            for (sql, again) in queries.iter().zip(coded_again) {
                let p = plan(sql, &loaded.schema, 100_000).unwrap();
                let before = pg.coded_again();
                let db = pg
                    .exact_values(&p)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                assert_eq!(db, loaded.table.exact_values(&p), "{sql} (cap {cap})");
                if let Some(again) = again {
                    assert_eq!(
                        pg.coded_again() > before,
                        again,
                        "{sql}: asked again with coded keys at cap {cap}"
                    );
                }
            }
        }
    });
}

/// A random query in the SQL subset: 0 to 2 GROUP BY columns and
/// sometimes a per-row number key (arithmetic or BIN), random
/// measurements, a random WHERE of depth up to 3.
fn random_query(rng: &mut ChaCha8Rng, schema: &Schema) -> String {
    let groupable: Vec<&Column> = schema
        .columns
        .iter()
        .filter(|c| c.group_size().is_some_and(|n| n <= 30))
        .collect();
    let integers: Vec<&Column> = schema
        .columns
        .iter()
        // Flags are numbers too (0 and 1).
        .filter(|c| matches!(c, Column::Integer { .. } | Column::Boolean { .. }))
        .collect();
    let mut group: Vec<String> = Vec::new();
    for _ in 0..rng.random_range(0..3) {
        let c = groupable[rng.random_range(0..groupable.len())].name();
        if !group.iter().any(|g| g == c) {
            group.push(c.to_string());
        }
    }
    if rng.random_bool(0.3) {
        // At most one number key: at most 61 keys, so the cells stay
        // within the test's limit.
        let c = integers[rng.random_range(0..integers.len())];
        let values = match c {
            Column::Integer { min, max, .. } => max - min + 1,
            _ => 2,
        };
        let key = if rng.random_bool(0.5) {
            format!(
                "BIN({}, {})",
                c.name(),
                rng.random_range(1..=values.min(12))
            )
        } else {
            let k = match rng.random_range(-30..30) {
                k if (-1..=1).contains(&k) => 7,
                k => k,
            };
            format!("{} / {k} + {}", c.name(), rng.random_range(-3..3))
        };
        group.insert(rng.random_range(0..=group.len()), key);
    }
    let mut items: Vec<String> = group.clone();
    items.push("COUNT(*)".into());
    for _ in 0..rng.random_range(0..3) {
        let any = schema.columns[rng.random_range(0..schema.columns.len())].name();
        let int = integers[rng.random_range(0..integers.len())].name();
        let other = integers[rng.random_range(0..integers.len())].name();
        let k = rng.random_range(-13..13);
        items.push(match rng.random_range(0..6) {
            0 => format!("COUNT({any})"),
            1 => format!("SUM({int})"),
            2 => format!("AVG({int})"),
            // Per-row arithmetic, NULL-propagating, and COALESCE.
            3 => format!("SUM({int} - {other} * {k})"),
            4 => format!(
                "AVG(COALESCE({int}, {other}, {k}) / {})",
                if k == 0 { 5 } else { k }
            ),
            _ => format!("SUM(COALESCE({int} + {k}, 0))"),
        });
    }
    let mut sql = format!("SELECT {} FROM cases", items.join(", "));
    if rng.random_bool(0.9) {
        sql.push_str(" WHERE ");
        sql.push_str(&random_predicate(rng, schema, 3));
    }
    if !group.is_empty() {
        sql.push_str(&format!(" GROUP BY {}", group.join(", ")));
    }
    sql
}

fn random_predicate(rng: &mut ChaCha8Rng, schema: &Schema, depth: usize) -> String {
    if depth > 0 && rng.random_bool(0.45) {
        let a = random_predicate(rng, schema, depth - 1);
        let b = random_predicate(rng, schema, depth - 1);
        return match rng.random_range(0..3) {
            0 => format!("({a} AND {b})"),
            1 => format!("({a} OR {b})"),
            _ => format!("NOT ({a})"),
        };
    }
    let c = &schema.columns[rng.random_range(0..schema.columns.len())];
    let name = c.name();
    // Two columns of one kind compared: numbers by value, categories by
    // label (their domains differ: most labels have no match).
    let d = &schema.columns[rng.random_range(0..schema.columns.len())];
    let numeric = |c: &Column| matches!(c, Column::Integer { .. } | Column::Boolean { .. });
    if d.name() != name && rng.random_bool(0.15) {
        if numeric(c) && numeric(d) {
            let op = ["=", "<>", "<", "<=", ">", ">="][rng.random_range(0..6)];
            return format!("{name} {op} {}", d.name());
        }
        if matches!(
            (c, d),
            (Column::Categorical { .. }, Column::Categorical { .. })
        ) {
            let op = ["=", "<>"][rng.random_range(0..2)];
            return format!("{name} {op} {}", d.name());
        }
    }
    if rng.random_bool(0.12) {
        let not = if rng.random_bool(0.5) { "NOT " } else { "" };
        return format!("{name} IS {not}NULL");
    }
    let not = if rng.random_bool(0.4) { "NOT " } else { "" };
    let kind = rng.random_range(0..4);
    match c {
        Column::Open { .. } => unreachable!("no open column in this test"),
        Column::Categorical { domain, .. } => {
            let mut lit = || format!("'{}'", domain[rng.random_range(0..domain.len())]);
            match kind {
                0 => format!("{name} = {}", lit()),
                1 => format!("{name} <> {}", lit()),
                _ => {
                    let (a, b) = (lit(), lit());
                    format!("{name} {not}IN ({a}, {b})")
                }
            }
        }
        Column::PersonId { .. } => unreachable!("no person column in this test"),
        Column::Boolean { .. } => {
            let v = ["0", "1", "true", "false"][rng.random_range(0..4)];
            let op = if rng.random_bool(0.5) { "=" } else { "<>" };
            format!("{name} {op} {v}")
        }
        Column::Integer { min, max, .. } => {
            let (min, max) = (*min, *max);
            let mut lit = || match rng.random_range(0..6) {
                0 => min - 1,
                1 => max + 1,
                2 => min,
                3 => max,
                _ => rng.random_range(min..=max),
            };
            let (a, b, c) = (lit(), lit(), lit());
            let op = ["=", "<>", "<", "<=", ">", ">="][(a as usize) % 6];
            match kind {
                0 => format!("{name} {op} {a}"),
                1 => format!("{name} {not}BETWEEN {a} AND {b}"),
                2 => format!("{name} {not}IN ({a}, {b}, {c})"),
                _ => format!("{a} < {name}"),
            }
        }
    }
}
