//! One data standard across partners (issue 22), over real nodes and
//! mutual TLS: partners coding their records differently, mapped at ingest
//! onto the shipped CTDC standard, give the answer of one partner holding
//! every record already coded; a node on another standard (name, major
//! version, digest) or on an older minor version lacking what a query reads
//! is named and left out before anything is spent; a mapping error fails
//! the whole ingest naming the file, line and value, and stores nothing; a
//! node moves to a new minor version in place (`fedq-node migrate`),
//! keeping its answers, its spent budget and its audit log, and a
//! migration that would change what stored rows mean changes nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedq::client::{new_query_id, Calls, Failure};
use fedq::run::QueryOptions;
use fedq_engine::mapping::Mapping;
use fedq_engine::synth::{self, Partner};
use fedq_node::config::StandardRef;
use fedq_pki::{Authority, Role};
use fedq_tests::{
    audit_verify, exact_counts, export_audit_text, node_config, opendp_accuracy, roomy_budget,
    Logged, ProcessNode, TestFederation, TestNode,
};

const STANDARD_1_0: &str = include_str!("../../../deploy/standards/ctdc-cases-1.0.toml");

/// Version 1.1: a new `Datasource` category and a new column, appended.
fn standard_1_1() -> String {
    STANDARD_1_0
        .replace("version = \"1.0\"", "version = \"1.1\"")
        .replace(
            "\"Hotline\", \"NGO\"]",
            "\"Hotline\", \"NGO\", \"Government\"]",
        )
        + "\n[[datasets.columns]]\nname = \"isAbduction\"\ntype = \"boolean\"\n"
}

/// The mapping of `partner_coding::MAPPING_TOML` (`[datasets.mapping.*]`).
fn partner_mapping() -> Mapping {
    let file: toml::Table = toml::from_str(fedq_engine::partner_coding::MAPPING_TOML).unwrap();
    file["datasets"]["mapping"].clone().try_into().unwrap()
}

/// A synthetic standard-coded CSV at `path`.
fn synth_csv(path: &Path, partner: Partner, rows: usize, seed: u64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    synth::write_csv(partner, rows, seed, std::fs::File::create(path).unwrap()).unwrap();
}

/// `csv` rewritten in the partner's own coding, at `out`.
fn recode(csv: &Path, out: &Path) {
    fedq_engine::partner_coding::recode(
        std::fs::File::open(csv).unwrap(),
        std::fs::File::create(out).unwrap(),
    )
    .unwrap();
}

/// `csv` with a column `isAbduction` appended (every tenth record 1).
fn with_abduction(csv: &Path, out: &Path) {
    let mut r = csv::Reader::from_path(csv).unwrap();
    let mut w = csv::Writer::from_path(out).unwrap();
    let mut h: Vec<String> = r.headers().unwrap().iter().map(String::from).collect();
    h.push("isAbduction".into());
    w.write_record(&h).unwrap();
    for (i, rec) in r.records().enumerate() {
        let mut rec: Vec<String> = rec.unwrap().iter().map(String::from).collect();
        rec.push(if i % 10 == 0 { "1" } else { "0" }.into());
        w.write_record(&rec).unwrap();
    }
    w.flush().unwrap();
}

/// A node named `name` whose dataset `cases` follows the standard `text`,
/// read through `mapping`, with `files` ingested (the first file's copy is
/// the node's `csv`). Returns the node and each ingest's report.
fn node_following(
    root: &Path,
    ca: &Authority,
    name: &str,
    text: &str,
    mapping: Mapping,
    files: &[PathBuf],
) -> (TestNode, Vec<fedq_node::ingest::IngestReport>) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("standard.toml"), text).unwrap();
    let mut config = node_config(ca, &dir, name, roomy_budget());
    config.audit.auditors = vec!["auditor".into()];
    let ds = &mut config.datasets[0];
    ds.columns.clear();
    ds.mapping = mapping;
    ds.standard = Some(StandardRef {
        file: "standard.toml".into(),
        name: None,
        version: None,
        dataset: None,
        followed: None,
    });
    config.apply_standards().unwrap();
    config.validate().unwrap();
    let ds = &config.datasets[0];
    let schema = ds.schema().unwrap();
    let store = fedq_ledger::store::Store::open(&config.resolve(&config.node.store)).unwrap();
    let audit = fedq_node::service::open_audit(&config, &store).unwrap();
    let reports = files
        .iter()
        .map(|f| {
            fedq_node::ingest::ingest_mapped_audited(
                &store,
                &audit,
                "cases",
                &schema,
                &ds.mapping,
                f,
                false,
            )
            .unwrap()
        })
        .collect();
    store.flush().unwrap();
    drop(audit);
    drop(store);
    (
        TestNode {
            name: name.into(),
            config,
            csv: files[0].clone(),
            running: None,
        },
        reports,
    )
}

fn options(epsilon: f64) -> QueryOptions {
    QueryOptions {
        secure: false,
        epsilon,
        rho: 0.0,
        dry_run: false,
        calls: Calls {
            timeout: Duration::from_secs(30),
            retries: 1,
        },
        min_nodes: None,
        query_id: new_query_id(),
    }
}

/// Every row of a COUNT(*) GROUP BY answer of `nodes` nodes lies within
/// the noise's 1 - 1e-6 bound of the exact count (a union bound over
/// cells and nodes: a correct answer fails this less than once in a
/// million runs; a record mapped to the wrong key or left unmapped moves
/// a count by far more than the bound).
fn assert_counts_match(
    combined: &fedq::combine::Combined,
    truth: &HashMap<Vec<String>, i64>,
    epsilon: f64,
    nodes: usize,
) {
    let cells = combined.rows.len().max(1) as f64;
    let bound = nodes as f64 * opendp_accuracy(1.0 / epsilon, 1e-6 / (cells * nodes as f64));
    for k in truth.keys() {
        assert!(
            combined.rows.iter().any(|r| &r.key == k),
            "key {k:?} of the data is not in the answer"
        );
    }
    for row in &combined.rows {
        let got = row.estimates[0].as_ref().unwrap().value;
        let want = truth.get(&row.key).copied().unwrap_or(0) as f64;
        assert!(
            (got - want).abs() <= bound,
            "{:?}: {got} where the data hold {want} (bound {bound})",
            row.key
        );
    }
}

/// Which rows of a CSV a query counts, given a header-to-cell lookup.
type RowFilter = fn(&dyn Fn(&str) -> String) -> bool;

fn sum(into: &mut HashMap<Vec<String>, i64>, from: HashMap<Vec<String>, i64>) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partners_coding_differently_give_the_answer_of_one_partner_holding_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::generate("test federation CA").unwrap();
    ca.pem.write(&dir.path().join("ca"), "ca").unwrap();
    let a = dir.path().join("data/a.csv");
    let b = dir.path().join("data/b.csv");
    synth_csv(&a, Partner::Ngo, 4000, 71);
    synth_csv(&b, Partner::CaseManagement, 4000, 72);
    let a_local = dir.path().join("data/a-local.csv");
    recode(&a, &a_local);
    // The partner's file really is coded otherwise.
    let text = std::fs::read_to_string(&a_local).unwrap();
    assert!(text.starts_with("yearOfRegistration,Datasource,sex,age,majorityStatus,nationality,country_of_exploitation,forced_labour,sexual_exploitation,"));
    let unknowns = text
        .lines()
        .filter(|l| l.split(',').nth(2) == Some("unknown"))
        .count() as u64;
    assert!(unknowns > 0);

    let (local, reports) = node_following(
        dir.path(),
        &ca,
        "partner-local",
        STANDARD_1_0,
        partner_mapping(),
        std::slice::from_ref(&a_local),
    );
    // The operator's coverage report: where each column came from, and the
    // partner's unmapped spellings counted (stored as missing).
    let gender = reports[0]
        .coverage
        .iter()
        .find(|c| c.column == "gender")
        .unwrap();
    assert_eq!(gender.source, "sex");
    assert_eq!(gender.unmapped, unknowns);
    assert_eq!(
        gender.unmapped_values,
        vec![("unknown".to_string(), unknowns)]
    );
    let age = reports[0]
        .coverage
        .iter()
        .find(|c| c.column == "ageBroad")
        .unwrap();
    assert_eq!((age.source.as_str(), age.unmapped), ("age", 0));
    assert!(age.coded > 3000, "{age}");
    assert!(
        reports[0].ignored_columns.is_empty(),
        "{:?}",
        reports[0].ignored_columns
    );

    let (standard, _) = node_following(
        dir.path(),
        &ca,
        "partner-standard",
        STANDARD_1_0,
        Mapping::new(),
        std::slice::from_ref(&b),
    );
    let (pooled, _) = node_following(
        dir.path(),
        &ca,
        "pooled",
        STANDARD_1_0,
        Mapping::new(),
        &[a.clone(), b.clone()],
    );
    let mut fed = TestFederation {
        dir,
        ca,
        nodes: vec![local, standard, pooled],
    };
    for i in 0..3 {
        fed.start_node(i).await;
    }
    let two = fed.federation_of("alice", &[0, 1]);
    let one = fed.federation_of("alice", &[2]);

    // Describe states the standard, the same on every node; the unmapped
    // counts are the operator's only.
    let described = two.describe(Duration::from_secs(10)).await;
    for o in &described {
        let d = o.result.as_ref().unwrap();
        let s = d.datasets[0].standard.as_ref().unwrap();
        assert_eq!((s.name.as_str(), s.version.as_str()), ("ctdc-cases", "1.0"));
        assert_eq!(s.digest.len(), 64);
        assert!(!format!("{d:?}").contains("unknown"));
    }

    let epsilon = 2.0;
    let queries: [(&str, &[&str], RowFilter); 4] = [
        ("SELECT gender, COUNT(*) FROM cases GROUP BY gender", &["gender"], |_| true),
        (
            "SELECT ageBroad, COUNT(*) FROM cases WHERE isForcedLabour = 1 GROUP BY ageBroad",
            &["ageBroad"],
            |get| get("isForcedLabour") == "1",
        ),
        (
            "SELECT citizenship, COUNT(*) FROM cases WHERE isSexualExploit = 0 GROUP BY citizenship",
            &["citizenship"],
            |get| get("isSexualExploit") == "0",
        ),
        (
            "SELECT CountryOfExploitation, COUNT(*) FROM cases GROUP BY CountryOfExploitation",
            &["CountryOfExploitation"],
            |_| true,
        ),
    ];
    for (sql, group, filter) in queries {
        let mut truth = exact_counts(&a, group, filter);
        sum(&mut truth, exact_counts(&b, group, filter));
        for (fed_, nodes) in [(&two, 2), (&one, 1)] {
            let answer = fedq::query::ask(fed_, sql, &options(epsilon))
                .await
                .unwrap();
            assert_eq!(
                answer.answered(),
                nodes,
                "{sql}: {:?}",
                answer.combined.nodes
            );
            assert_counts_match(&answer.combined, &truth, epsilon, nodes);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_off_the_standard_are_named_and_left_out_before_anything_is_spent() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::generate("test federation CA").unwrap();
    ca.pem.write(&dir.path().join("ca"), "ca").unwrap();
    let data = dir.path().join("data");
    let mut csvs = Vec::new();
    for i in 0..5u64 {
        let p = data.join(format!("{i}.csv"));
        synth_csv(&p, Partner::ALL[i as usize % 3], 2000, 80 + i);
        csvs.push(p);
    }
    let v11 = standard_1_1();
    let v20 = STANDARD_1_0.replace("version = \"1.0\"", "version = \"2.0\"");
    // Another file under version 1.0: other bounds.
    let v10_other = STANDARD_1_0.replace("max = 120", "max = 240");
    let mut nodes = Vec::new();
    for (i, (name, text)) in [
        ("new-a", v11.as_str()),
        ("new-b", v11.as_str()),
        ("old", STANDARD_1_0),
        ("major-two", v20.as_str()),
        ("other-file", v10_other.as_str()),
    ]
    .into_iter()
    .enumerate()
    {
        let file = if text.contains("isAbduction") {
            let p = data.join(format!("{i}-abduction.csv"));
            with_abduction(&csvs[i], &p);
            p
        } else {
            csvs[i].clone()
        };
        nodes.push(node_following(dir.path(), &ca, name, text, Mapping::new(), &[file]).0);
    }
    let mut fed = TestFederation { dir, ca, nodes };
    for i in 0..5 {
        fed.start_node(i).await;
    }
    let coordinator = fed.federation("alice");
    let epsilon = 1.0;
    let left_out = |answer: &fedq::query::Answer, node: &str| -> Option<String> {
        answer
            .combined
            .nodes
            .iter()
            .find(|n| n.node == node)
            .and_then(|n| n.failure.clone())
            .map(|f| match f {
                Failure::Refused(m) | Failure::LeftOut(m) => m,
                other => panic!("{node}: {other}"),
            })
    };

    // A query on columns every 1.x version shares: the 1.x nodes answer,
    // the 2.0 node and the node with another 1.0 file are named.
    let sql = "SELECT gender, COUNT(*) FROM cases GROUP BY gender";
    let answer = fedq::query::ask(&coordinator, sql, &options(epsilon))
        .await
        .unwrap();
    assert_eq!(answer.answered(), 3, "{:?}", answer.combined.nodes);
    let why = left_out(&answer, "major-two").unwrap();
    assert!(
        why.contains("follows standard ctdc-cases 2.0")
            && why.contains("4 of the 5 nodes serving it follow standard ctdc-cases 1.x")
            && why.contains("nothing was sent"),
        "{why}"
    );
    let why = left_out(&answer, "other-file").unwrap();
    assert!(
        why.contains("two different files carry one version"),
        "{why}"
    );
    let mut truth = HashMap::new();
    for csv in &csvs[..3] {
        sum(&mut truth, exact_counts(csv, &["gender"], |_| true));
    }
    assert_counts_match(&answer.combined, &truth, epsilon, 3);

    // A category only 1.1 has: the 1.0 node is left out, naming it.
    let answer = fedq::query::ask(
        &coordinator,
        "SELECT Datasource, COUNT(*) FROM cases GROUP BY Datasource",
        &options(epsilon),
    )
    .await
    .unwrap();
    assert_eq!(answer.answered(), 2, "{:?}", answer.combined.nodes);
    let why = left_out(&answer, "old").unwrap();
    assert!(
        why.contains("follows standard ctdc-cases 1.0")
            && why.contains("Datasource (it lacks \"Government\")")
            && why.contains("standard ctdc-cases 1.1 on new-a"),
        "{why}"
    );
    // A column only 1.1 has, read in WHERE.
    let answer = fedq::query::ask(
        &coordinator,
        "SELECT COUNT(*) FROM cases WHERE isAbduction = 1",
        &options(epsilon),
    )
    .await
    .unwrap();
    assert_eq!(answer.answered(), 2, "{:?}", answer.combined.nodes);
    let why = left_out(&answer, "old").unwrap();
    assert!(
        why.contains("isAbduction (it does not declare it)"),
        "{why}"
    );

    // Nothing was spent on a node left out: the 1.0 node paid for the one
    // query it answered, the others for none.
    let budgets = coordinator.budget(Duration::from_secs(10)).await;
    let spent = |node: &str| {
        budgets
            .iter()
            .find(|o| o.node == node)
            .unwrap()
            .result
            .as_ref()
            .unwrap()
            .budgets
            .iter()
            .map(|b| b.spent_by_analyst)
            .sum::<f64>()
    };
    assert!((spent("new-a") - 3.0 * epsilon).abs() < 1e-9);
    assert!((spent("old") - epsilon).abs() < 1e-9, "{}", spent("old"));
    assert_eq!(spent("major-two"), 0.0);
    assert_eq!(spent("other-file"), 0.0);

    // `fedq schema --diff`: what differs, column by column.
    let described = coordinator.describe(Duration::from_secs(10)).await;
    let diff = fedq::output::render_schema_diff(&described, fedq::output::Format::Table).unwrap();
    for want in [
        "(standard)",
        "Datasource",
        "isAbduction",
        "traffickMonths",
        "integer 0..240",
        "ctdc-cases 2.0",
    ] {
        assert!(diff.contains(want), "{want}:\n{diff}");
    }
    assert!(
        !diff.contains("│ gender"),
        "gender is the same everywhere:\n{diff}"
    );
    let json = fedq::output::render_schema_diff(&described, fedq::output::Format::Json).unwrap();
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    let abduction = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["column"] == "isAbduction")
        .unwrap();
    assert_eq!(abduction["nodes"][2], serde_json::json!(["old", null]));
    assert_eq!(
        abduction["nodes"][0],
        serde_json::json!(["new-a", "boolean"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapping_error_fails_the_whole_ingest_naming_file_line_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::generate("test federation CA").unwrap();
    let original = dir.path().join("a.csv");
    synth_csv(&original, Partner::Hotline, 500, 9);
    let local = dir.path().join("a-local.csv");
    recode(&original, &local);
    // Line 58 (the 57th record): a forced-labour value the strict map lacks.
    let bad = dir.path().join("export-bad.csv");
    {
        let mut r = csv::Reader::from_path(&local).unwrap();
        let mut w = csv::Writer::from_path(&bad).unwrap();
        let header = r.headers().unwrap().clone();
        let at = header.iter().position(|h| h == "forced_labour").unwrap();
        w.write_record(&header).unwrap();
        for (i, rec) in r.records().enumerate() {
            let mut rec: Vec<String> = rec.unwrap().iter().map(String::from).collect();
            if i == 56 {
                rec[at] = "perhaps".into();
            }
            w.write_record(&rec).unwrap();
        }
        w.flush().unwrap();
    }

    let node_dir = dir.path().join("n");
    std::fs::create_dir_all(&node_dir).unwrap();
    std::fs::write(node_dir.join("standard.toml"), STANDARD_1_0).unwrap();
    let mut config = node_config(&ca, &node_dir, "n", roomy_budget());
    config.datasets[0].columns.clear();
    config.datasets[0].mapping = partner_mapping();
    config.datasets[0].standard = Some(StandardRef {
        file: "standard.toml".into(),
        name: Some("ctdc-cases".into()),
        version: Some("1.0".into()),
        dataset: None,
        followed: None,
    });
    config.apply_standards().unwrap();
    config.validate().unwrap();
    let ds = &config.datasets[0];
    let schema = ds.schema().unwrap();
    let store = fedq_ledger::store::Store::open(&config.resolve(&config.node.store)).unwrap();
    let audit = fedq_node::service::open_audit(&config, &store).unwrap();
    let entries = audit.lines(0).count();
    let e = fedq_node::ingest::ingest_mapped_audited(
        &store,
        &audit,
        "cases",
        &schema,
        &ds.mapping,
        &bad,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(&format!("{}:58:", bad.display()))
            && e.contains("column \"forced_labour\" (read as \"isForcedLabour\")")
            && e.contains("the value \"perhaps\"")
            && e.contains("nothing was stored"),
        "{e}"
    );
    // Nothing stored, nothing logged: no rows, no schema, no audit entry.
    assert_eq!(store.schema_digest("cases").unwrap(), None);
    assert_eq!(audit.lines(0).count(), entries);
    // The corrected file goes in whole, and only it.
    let r = fedq_node::ingest::ingest_mapped_audited(
        &store,
        &audit,
        "cases",
        &schema,
        &ds.mapping,
        &local,
        false,
    )
    .unwrap();
    assert_eq!((r.rows_added, r.rows_total), (500, 500));
    assert_eq!(audit.lines(0).count(), entries + 1);
}

// ---------------------------------------------------------------------------
// Moving a node to a new version in place (`fedq-node migrate`)
// ---------------------------------------------------------------------------

/// Version 1.1 as a node moves to it in place: [`standard_1_1`] (a new
/// `Datasource` category, appended, and the new column `isAbduction`) with
/// a new citizenship category in front, so that every stored citizenship
/// code moves and only a translation by label keeps the answers.
fn standard_1_1_recoding() -> String {
    let text = standard_1_1().replace(
        "domain = [\"PH\", \"UA\",",
        "domain = [\"AF\", \"PH\", \"UA\",",
    );
    assert!(text.contains("[\"AF\", \"PH\""), "the 1.0 file changed");
    text
}

/// The digest of the columns of dataset `cases` of a standard's text.
fn cases_digest(text: &str) -> String {
    fedq_plan::standard::Standard::parse(text)
        .unwrap()
        .dataset("cases")
        .unwrap()
        .schema
        .digest()
}

/// A node process (not started) whose dataset `cases` follows standard
/// 1.0 from `standards/ctdc-cases-1.0.toml`, with `rows` synthetic NGO
/// rows ingested by `fedq-node ingest`.
fn process_node_on_1_0(rows: usize, seed: u64) -> ProcessNode {
    ProcessNode::create(
        (Partner::Ngo, rows, seed),
        &[("cases", roomy_budget())],
        |c| {
            let dir = c.base_dir.join("standards");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("ctdc-cases-1.0.toml"), STANDARD_1_0).unwrap();
            let ds = &mut c.datasets[0];
            ds.columns.clear();
            ds.standard = Some(StandardRef {
                file: "standards/ctdc-cases-1.0.toml".into(),
                name: Some("ctdc-cases".into()),
                version: Some("1.0".into()),
                dataset: None,
                followed: None,
            });
        },
    )
}

/// What the operator does for a new version: keeps a copy of node.toml
/// (`node.toml.old`), installs the new file beside the old one
/// (`standards/ctdc-cases-1.1.toml`, holding `text`) and points node.toml
/// at it. Returns the copy's path.
fn operator_moves_to_1_1(node: &ProcessNode, text: &str) -> PathBuf {
    let old = node.config_path.with_extension("toml.old");
    std::fs::copy(&node.config_path, &old).unwrap();
    let dir = node.config_path.parent().unwrap().join("standards");
    std::fs::write(dir.join("ctdc-cases-1.1.toml"), text).unwrap();
    let config = std::fs::read_to_string(&node.config_path).unwrap();
    let new = config
        .replace("ctdc-cases-1.0.toml", "ctdc-cases-1.1.toml")
        .replace("version = \"1.0\"", "version = \"1.1\"");
    assert!(
        new.contains("file = \"standards/ctdc-cases-1.1.toml\"")
            && new.contains("version = \"1.1\""),
        "{new}"
    );
    std::fs::write(&node.config_path, new).unwrap();
    old
}

/// `fedq-node migrate --config node.toml --previous PREVIOUS`: its exit
/// code and output.
fn migrate_cli(node: &ProcessNode, previous: &Path) -> (Option<i32>, String) {
    node.cli(&[
        "migrate".as_ref(),
        "--config".as_ref(),
        node.config_path.as_os_str(),
        "--previous".as_ref(),
        previous.as_os_str(),
    ])
}

/// `fedq-node check --config CONFIG`: its exit code and output.
fn check_cli(node: &ProcessNode, config: &Path) -> (Option<i32>, String) {
    node.cli(&["check".as_ref(), "--config".as_ref(), config.as_os_str()])
}

fn query(id: &str, sql: &str, epsilon: f64) -> fedq_proto::v1::QueryRequest {
    fedq_proto::v1::QueryRequest {
        query_id: id.into(),
        sql: sql.into(),
        epsilon,
        ..Default::default()
    }
}

/// Every noisy value of the answer's first measurement lies within
/// OpenDP's bound of the exact count of its key (a correct mechanism
/// misses it less than once in a million runs, a union bound over the
/// cells); returns the answer's keys.
fn assert_noisy_counts(
    r: &fedq_proto::v1::QueryResponse,
    exact: impl Fn(&[String]) -> i64,
) -> Vec<Vec<String>> {
    let m = &r.measurements[0];
    let bound = opendp_accuracy(m.scale, 1e-6 / m.values.len() as f64);
    for (cell, &noisy) in r.cells.iter().zip(&m.values) {
        let want = exact(&cell.values);
        assert!(
            ((noisy - want) as f64).abs() <= bound,
            "{} {:?}: noisy {noisy}, exact {want}, bound {bound}",
            m.label,
            cell.values
        );
    }
    r.cells.iter().map(|c| c.values.clone()).collect()
}

/// What the analyst has spent on `cases`, by the Budget RPC.
async fn spent_by(node: &ProcessNode, analyst: &str) -> f64 {
    let mut c = node.client(Role::Analyst, analyst).await.unwrap();
    c.budget(fedq_proto::v1::BudgetRequest {})
        .await
        .unwrap()
        .into_inner()
        .budgets
        .iter()
        .find(|b| b.dataset == "cases")
        .unwrap()
        .spent_by_analyst
}

/// The node's log exported by "auditor", verified by the separate
/// verifier with `pinned` (the key read before anything changed) and the
/// `heads` seen before; its entries.
async fn export_verified(node: &ProcessNode, pinned: &str, heads: &[String]) -> Vec<Logged> {
    let mut auditor = node.client(Role::Auditor, "auditor").await.unwrap();
    let text = export_audit_text(&mut auditor, 0).await.unwrap();
    let (log, key) = (
        node.dir.path().join("export.jsonl"),
        node.dir.path().join("pinned.pub"),
    );
    std::fs::write(&log, &text).unwrap();
    std::fs::write(&key, pinned).unwrap();
    audit_verify(&log, &key, 0, heads)
        .unwrap_or_else(|e| panic!("the export does not verify: {e}"));
    text.lines().map(Logged::parse).collect()
}

/// A sled tree's keys and values, in key order.
type TreeBytes = Vec<(Vec<u8>, Vec<u8>)>;

/// The stopped node's store (trees `data`, `ledger` and `audit`, in that
/// order), byte for byte.
fn dump_store(node: &ProcessNode) -> Vec<(String, TreeBytes)> {
    let config = &node.node.config;
    let db = sled::open(config.resolve(&config.node.store)).unwrap();
    ["data", "ledger", "audit"]
        .into_iter()
        .map(|tree| {
            let kv = db
                .open_tree(tree)
                .unwrap()
                .iter()
                .map(|kv| {
                    let (k, v) = kv.unwrap();
                    (k.to_vec(), v.to_vec())
                })
                .collect();
            (tree.to_string(), kv)
        })
        .collect()
}

/// A standard's `text` without the `[[datasets.columns]]` block of
/// column `name`.
fn without_column(text: &str, name: &str) -> String {
    let at = text.find(&format!("name = \"{name}\"")).unwrap();
    let start = text[..at].rfind("[[datasets.columns]]").unwrap();
    let end = text[at..]
        .find("[[datasets.columns]]")
        .map_or(text.len(), |e| at + e);
    format!("{}{}", &text[..start], &text[end..])
}

/// `name` = "v" rows of the node's CSV (the truth, on the operator's
/// machine).
fn rows_with(node: &ProcessNode, name: &str, v: &str) -> i64 {
    exact_counts(&node.node.csv, &[name], |_| true)
        .get(&vec![v.to_string()])
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_moved_to_1_1_in_place_keeps_its_answers_its_spent_budget_and_its_audit_log() {
    let rows = 2000;
    let mut node = process_node_on_1_0(rows, 91);
    node.start(Duration::from_secs(60)).await.unwrap();
    let pinned =
        std::fs::read_to_string(node.node.config.resolve(&node.node.config.audit.public_key))
            .unwrap();
    let csv = node.node.csv.clone();
    let citizenship = exact_counts(&csv, &["citizenship"], |_| true);

    // On 1.0: an answer, and its budget spent.
    let mut alice = node.client(Role::Analyst, "alice").await.unwrap();
    let sql = "SELECT citizenship, COUNT(*) FROM cases GROUP BY citizenship";
    let r = alice
        .query(query("before", sql, 1.0))
        .await
        .unwrap()
        .into_inner();
    let keys = assert_noisy_counts(&r, |k| citizenship.get(k).copied().unwrap_or(0));
    assert_eq!(keys.len(), 21, "20 declared countries and (missing)");
    assert!((spent_by(&node, "alice").await - 1.0).abs() < 1e-9);
    let before = export_verified(&node, &pinned, &[]).await;
    let last = before.last().unwrap();
    let head = format!("{}:{}", last.seq, last.hash);
    drop(alice);
    node.stop(Duration::from_secs(30)).await.unwrap();

    // The operator moves to 1.1: the node refuses to start on it until the
    // rows are translated.
    let v11 = standard_1_1_recoding();
    let previous = operator_moves_to_1_1(&node, &v11);
    let (code, out) = check_cli(&node, &node.config_path);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("differ from the schema its rows were ingested under"),
        "{out}"
    );

    let (code, out) = migrate_cli(&node, &previous);
    assert_eq!(code, Some(0), "{out}");
    for want in [
        "dataset \"cases\": stored rows translated from ctdc-cases 1.0 to ctdc-cases 1.1",
        "column \"isAbduction\" added: missing in every stored row",
        "column \"Datasource\": categories added: \"Government\"; stored codes unchanged",
        "column \"citizenship\": categories added: \"AF\"; stored categories re-coded by label",
        "migrated 1 dataset(s) in place; budgets spent and the audit log carry over",
    ] {
        assert!(out.contains(want), "{want}:\n{out}");
    }
    // No row count, no count of any value.
    let numbers: Vec<&str> = out.split(|c: char| !c.is_ascii_digit()).collect();
    let mut counts: Vec<String> = vec![rows.to_string()];
    counts.extend(
        citizenship
            .values()
            .filter(|&&n| n >= 10)
            .map(|n| n.to_string()),
    );
    for n in &counts {
        assert!(
            !numbers.contains(&n.as_str()),
            "a count ({n}) is printed:\n{out}"
        );
    }
    let (code, out) = check_cli(&node, &node.config_path);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("follows standard ctdc-cases 1.1"), "{out}");

    // On 1.1: the same budget spent, the same answers on the old columns
    // (every stored citizenship code moved), the new key empty and the new
    // column missing in every old row.
    node.start(Duration::from_secs(60)).await.unwrap();
    assert!(
        (spent_by(&node, "alice").await - 1.0).abs() < 1e-9,
        "the spent budget came back"
    );
    let mut alice = node.client(Role::Analyst, "alice").await.unwrap();
    let r = alice
        .query(query("after", sql, 1.0))
        .await
        .unwrap()
        .into_inner();
    let keys = assert_noisy_counts(&r, |k| citizenship.get(k).copied().unwrap_or(0));
    assert_eq!(keys.len(), 22);
    assert!(keys.contains(&vec!["AF".to_string()]));
    let r = alice
        .query(query(
            "datasource",
            "SELECT Datasource, COUNT(*) FROM cases GROUP BY Datasource",
            1.0,
        ))
        .await
        .unwrap()
        .into_inner();
    let datasource = exact_counts(&csv, &["Datasource"], |_| true);
    let keys = assert_noisy_counts(&r, |k| datasource.get(k).copied().unwrap_or(0));
    assert!(keys.contains(&vec!["Government".to_string()]));
    let r = alice
        .query(query(
            "null",
            "SELECT COUNT(*) FROM cases WHERE isAbduction IS NULL",
            1.0,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_noisy_counts(&r, |_| rows as i64);
    let r = alice
        .query(query(
            "abduction",
            "SELECT isAbduction, COUNT(*) FROM cases GROUP BY isAbduction",
            1.0,
        ))
        .await
        .unwrap()
        .into_inner();
    let keys = assert_noisy_counts(&r, |k| if k[0] == "(missing)" { rows as i64 } else { 0 });
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert!((spent_by(&node, "alice").await - 5.0).abs() < 1e-9);

    // The log verifies with the key pinned at the start and still holds
    // the head seen before; the earlier entries are as they were, then the
    // migration, then the start on 1.1.
    let after = export_verified(&node, &pinned, &[head]).await;
    for (a, b) in before.iter().zip(&after) {
        assert_eq!((a.seq, &a.hash), (b.seq, &b.hash));
    }
    let migrated = &after[before.len()];
    let standard = |version: &str| {
        Some(fedq_ledger::audit::StandardVersion {
            name: "ctdc-cases".into(),
            version: version.into(),
        })
    };
    assert_eq!(
        migrated.event,
        fedq_ledger::audit::Event::Migrated {
            dataset: "cases".into(),
            from_schema: cases_digest(STANDARD_1_0),
            to_schema: cases_digest(&v11),
            from_standard: standard("1.0"),
            to_standard: standard("1.1"),
        }
    );
    assert_eq!(after[before.len() + 1].event.kind(), "node_started");
    assert_eq!(
        after
            .iter()
            .filter(|e| e.event.kind() == "migrated")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_that_would_change_what_rows_mean_changes_nothing() {
    let mut node = process_node_on_1_0(800, 92);
    node.start(Duration::from_secs(60)).await.unwrap();
    let mut alice = node.client(Role::Analyst, "alice").await.unwrap();
    alice
        .query(query("spent", "SELECT COUNT(*) FROM cases", 0.5))
        .await
        .unwrap();
    drop(alice);
    node.stop(Duration::from_secs(30)).await.unwrap();
    let stored = dump_store(&node);
    assert!(stored.iter().all(|(_, kv)| !kv.is_empty()));

    // A "1.1" that drops a category stored rows use and a column.
    let males = rows_with(&node, "gender", "Male");
    assert!(males > 0);
    let dropping = standard_1_1().replace(
        "domain = [\"Female\", \"Male\", \"Trans",
        "domain = [\"Female\", \"Trans",
    );
    let dropping = without_column(&dropping, "isOtherExploit");
    assert!(!dropping.contains("isOtherExploit") && !dropping.contains("\"Male\""));
    let previous = operator_moves_to_1_1(&node, &dropping);
    let (code, out) = migrate_cli(&node, &previous);
    assert_eq!(code, Some(1), "{out}");
    let config = node.config_path.display().to_string();
    for want in [
        "nothing was changed".to_string(),
        format!("column \"gender\": {config} drops categories that stored rows use: \"Male\" ({males} stored rows)"),
        format!("column \"isOtherExploit\" (a flag) is in {} and not in {config}", previous.display()),
        "the stored rows would change meaning: that is a major-version change".to_string(),
    ] {
        assert!(out.contains(&want), "{want}:\n{out}");
    }
    assert_eq!(dump_store(&node), stored, "the refused migration wrote");

    // --previous that is not what the rows were stored under.
    let (code, out) = migrate_cli(&node, &node.config_path);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "{config}'s columns for dataset \"cases\" are not the ones its rows were stored under"
        )) && out.contains("nothing was changed"),
        "{out}"
    );
    assert_eq!(dump_store(&node), stored, "the refused migration wrote");

    // The node still starts on the old config, and answers.
    std::fs::copy(&previous, &node.config_path).unwrap();
    let (code, out) = check_cli(&node, &node.config_path);
    assert_eq!(code, Some(0), "{out}");
    node.start(Duration::from_secs(60)).await.unwrap();
    assert!((spent_by(&node, "alice").await - 0.5).abs() < 1e-9);
    let mut alice = node.client(Role::Analyst, "alice").await.unwrap();
    let r = alice
        .query(query(
            "gender",
            "SELECT gender, COUNT(*) FROM cases GROUP BY gender",
            1.0,
        ))
        .await
        .unwrap()
        .into_inner();
    let gender = exact_counts(&node.node.csv, &["gender"], |_| true);
    assert_noisy_counts(&r, |k| gender.get(k).copied().unwrap_or(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_interrupted_after_its_audit_entry_leaves_the_old_rows_and_completes_when_run_again(
) {
    use fedq_ledger::fault::fail_point::{self, Point};
    let node = process_node_on_1_0(600, 93);
    let v11 = standard_1_1_recoding();
    let previous = operator_moves_to_1_1(&node, &v11);
    let stored = dump_store(&node);
    let (new, old) = (
        fedq_node::config::NodeConfig::load(&node.config_path).unwrap(),
        fedq_node::config::NodeConfig::load(&previous).unwrap(),
    );
    let store_dir = new.resolve(&new.node.store);

    // The rows' write fails as on a full disk, after the entry is durable.
    fail_point::arm(&store_dir, Point::Flush, 0, 1);
    let e = fedq_node::migrate::migrate(&new, &node.config_path, &old, &previous)
        .unwrap_err()
        .to_string();
    fail_point::disarm(&store_dir);
    assert!(
        e.contains("no space left on device")
            && e.contains("its audit entry was written, its rows were not changed"),
        "{e}"
    );
    // The old rows and digest, and one entry more: the migration.
    let now = dump_store(&node);
    assert_eq!(now[0], stored[0], "the rows or the digest changed");
    assert_eq!(now[1], stored[1], "the ledger changed");
    assert_eq!(
        now[2].1.len(),
        stored[2].1.len() + 1,
        "entries and the head"
    );
    let entries = {
        let store = fedq_ledger::store::Store::open(&store_dir).unwrap();
        let audit = fedq_node::service::open_audit(&new, &store).unwrap();
        audit.entries(0).collect::<Result<Vec<_>, _>>().unwrap()
    };
    assert_eq!(entries.last().unwrap().event().unwrap().kind(), "migrated");
    let (code, out) = check_cli(&node, &previous);
    assert_eq!(code, Some(0), "the old config no longer starts: {out}");
    let (code, out) = check_cli(&node, &node.config_path);
    assert_eq!(code, Some(1), "{out}");

    // Run again, it completes (and logs again).
    let (code, out) = migrate_cli(&node, &previous);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = check_cli(&node, &node.config_path);
    assert_eq!(code, Some(0), "{out}");
    let store = fedq_ledger::store::Store::open(&store_dir).unwrap();
    assert_eq!(
        store.schema_digest("cases").unwrap(),
        Some(cases_digest(&v11))
    );
    let audit = fedq_node::service::open_audit(&new, &store).unwrap();
    let kinds: Vec<String> = audit
        .entries(0)
        .map(|e| e.unwrap().event().unwrap().kind().to_string())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "migrated").count(),
        2,
        "{kinds:?}"
    );
    drop(audit);
    drop(store);
    // A third run has nothing to do and logs nothing.
    let (code, out) = migrate_cli(&node, &previous);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("its rows are stored under the declared columns already; nothing to do")
            && out.contains("nothing was changed"),
        "{out}"
    );
}
