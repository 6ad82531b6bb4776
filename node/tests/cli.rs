//! The `fedq-node` binary's own command line: help, and clear refusals of
//! bad configuration. (Building this test also builds the binary that the
//! end-to-end tests run as a real process.)

use std::process::Command;

fn node(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fedq-node"))
        .args(args)
        .output()
        .expect("run fedq-node");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn help_lists_the_commands_with_exit_codes() {
    let (code, out) = node(&["--help"]);
    assert_eq!(code, 0);
    for cmd in [
        "serve",
        "ingest",
        "migrate",
        "init",
        "check",
        "audit",
        "budget",
        "synth",
        "Exit codes",
    ] {
        assert!(out.contains(cmd), "--help should mention {cmd}: {out}");
    }
}

#[test]
fn check_names_what_is_wrong_with_a_config() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("node.toml");
    std::fs::write(&bad, "[node]\nname = \"n\"\nlisten = \"127.0.0.1:1\"\nstore = \"s\"\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n[limits]\nmax_cells = 0\n").unwrap();
    let (code, out) = node(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("limits must be positive"), "{out}");
    std::fs::write(
        &bad,
        "[node]\nname = \"n\"\nlisten = \"127.0.0.1:1\"\nstore = \"s\"\nstroe = 1\n",
    )
    .unwrap();
    let (code, out) = node(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("stroe"), "a misspelt key is named: {out}");
    let (code, out) = node(&[
        "check",
        "--config",
        dir.path().join("missing.toml").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(out.contains("cannot read node config"), "{out}");
}

/// A node directory that `check` passes: a federation CA, the node's
/// certificate and key, the synthetic CTDC dataset `cases` ingested into
/// the store, and its audit key created. Returns the config file.
fn ready_node(dir: &std::path::Path) -> std::path::PathBuf {
    use fedq_node::config::{
        BudgetLimits, DatasetConfig, Limits, NodeConfig, NodeSection, TlsSection,
    };
    use fedq_pki::{Authority, Role};
    let ca = Authority::generate("cli test CA").unwrap();
    let certs = dir.join("certs");
    ca.issue(Role::Node, "node-a")
        .unwrap()
        .write(&certs, "node")
        .unwrap();
    std::fs::write(certs.join("ca.pem"), &ca.pem.cert).unwrap();
    let cfg = NodeConfig {
        node: NodeSection {
            name: "node-a".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            store: "store".into(),
        },
        tls: TlsSection {
            ca: "certs/ca.pem".into(),
            cert: "certs/node.pem".into(),
            key: "certs/node.key".into(),
            crl: None,
        },
        limits: Limits::default(),
        audit: Default::default(),
        source_sha256: String::new(),
        access: Default::default(),
        datasets: vec![DatasetConfig {
            name: "cases".into(),
            description: String::new(),
            budget: BudgetLimits {
                keys_delta: None,
                keys_delta_per_analyst: None,
                keys_delta_total: None,
                per_analyst: 1.0,
                total: 10.0,
                per_query_max: 1.0,
                measure: Default::default(),
                delta: None,
            },
            columns: fedq_engine::synth::ctdc_columns(),
            privacy_unit: None,
            source: None,
            secure_aggregation: None,
            standard: None,
            mapping: Default::default(),
            lookups: Vec::new(),
        }],
        base_dir: dir.to_path_buf(),
    };
    let path = dir.join("node.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let csv = dir.join("cases.csv");
    let at = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (code, out) = node(&[
        "synth",
        "--partner",
        "ngo",
        "--rows",
        "300",
        "--seed",
        "3",
        "--out",
        &at(&csv),
    ]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = node(&["init", "--config", &at(&path)]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = node(&[
        "ingest",
        "--config",
        &at(&path),
        "--dataset",
        "cases",
        "--csv",
        &at(&csv),
    ]);
    assert_eq!(code, 0, "{out}");
    path
}

/// The `error:` line of an output.
fn error_line(out: &str) -> String {
    out.lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default()
        .to_string()
}

/// `check` fails exactly where `serve` then would (issue 16, item 6): for
/// each break, both exit 1 with the same error, naming the `node.toml` key
/// at fault; before, `check` said OK to all of these.
#[test]
fn check_fails_where_serve_would_naming_the_field() {
    type Break = fn(&std::path::Path);
    let breaks: [(&str, Break, &str); 6] = [
        (
            "garbage TLS key",
            |d| std::fs::write(d.join("certs/node.key"), "not a key\n").unwrap(),
            "tls.key",
        ),
        (
            "garbage CA file",
            |d| std::fs::write(d.join("certs/ca.pem"), "garbage\n").unwrap(),
            "tls.ca",
        ),
        (
            "corrupt audit key",
            |d| std::fs::write(d.join("audit.key"), "00ff-not-a-key\n").unwrap(),
            "audit.key",
        ),
        (
            "store path that is a file",
            |d| {
                std::fs::remove_dir_all(d.join("store")).unwrap();
                std::fs::write(d.join("store"), "a file\n").unwrap();
            },
            "node.store",
        ),
        (
            "schema changed after ingest",
            |d| {
                let path = d.join("node.toml");
                let text = std::fs::read_to_string(&path).unwrap();
                // One more age band than the rows were ingested under.
                let changed = text.replacen("\"48+\"", "\"48+\", \"99+\"", 1);
                assert_ne!(changed, text, "the schema has an ageBroad domain");
                std::fs::write(&path, changed).unwrap();
            },
            "ingested under",
        ),
        (
            "a certificate without node.name",
            |d| {
                let path = d.join("node.toml");
                let text = std::fs::read_to_string(&path).unwrap();
                std::fs::write(&path, text.replacen("\"node-a\"", "\"node-b\"", 1)).unwrap();
            },
            "node.name",
        ),
    ];
    for (what, break_it, field) in breaks {
        let dir = tempfile::tempdir().unwrap();
        let config = ready_node(dir.path());
        let config = config.to_str().unwrap();
        let (code, out) = node(&["check", "--config", config]);
        assert_eq!(code, 0, "{what}: a ready node passes check: {out}");
        break_it(dir.path());
        let (code, out) = node(&["check", "--config", config]);
        assert_eq!(code, 1, "{what}: check must fail: {out}");
        assert!(out.contains(field), "{what}: check names {field}: {out}");
        assert!(!out.contains(": OK"), "{what}: {out}");
        assert!(
            !out.contains("no root trust anchors"),
            "{what}: rustls' words, not ours: {out}"
        );
        let (serve_code, serve_out) = node(&["serve", "--config", config]);
        assert_eq!(serve_code, 1, "{what}: serve fails too: {serve_out}");
        assert_eq!(
            error_line(&serve_out),
            error_line(&out),
            "{what}: serve fails where check did"
        );
    }
}

/// An ingest error quotes at most the start of a huge cell, with its
/// length, never the cell (issue 16, item 12: a 10 MB cell made a 10 MB
/// message).
#[test]
fn an_ingest_error_quotes_a_huge_cell_in_short() {
    let dir = tempfile::tempdir().unwrap();
    let config = ready_node(dir.path());
    let csv = dir.path().join("cases.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    let header = text.lines().next().unwrap();
    let gender = header.split(',').position(|c| c == "gender").unwrap();
    let mut row: Vec<String> = text
        .lines()
        .nth(1)
        .unwrap()
        .split(',')
        .map(String::from)
        .collect();
    row[gender] = "x".repeat(1 << 20);
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, format!("{header}\n{}\n", row.join(","))).unwrap();
    let (code, out) = node(&[
        "ingest",
        "--config",
        config.to_str().unwrap(),
        "--dataset",
        "cases",
        "--csv",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.len() < 4096, "a short message: {} bytes", out.len());
    assert!(
        out.contains(&format!("\"{}\"... ({} bytes)", "x".repeat(64), 1 << 20)),
        "the start and the length: {out}"
    );
    assert!(out.contains("gender"), "the column is named: {out}");
}

/// A node following the shipped CTDC standard, read through the partner
/// mapping of `fedq_engine::partner_coding` (with strict yes/no flags), its
/// keys created and nothing ingested; and a 400-row export in the partner's
/// own coding. Returns the config, the export and how many of its genders
/// are "unknown" (unmapped).
fn mapped_node(d: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, usize) {
    use fedq_pki::{Authority, Role};
    let at = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let ca = Authority::generate("cli test CA").unwrap();
    ca.issue(Role::Node, "node-a")
        .unwrap()
        .write(&d.join("certs"), "node")
        .unwrap();
    std::fs::write(d.join("certs/ca.pem"), &ca.pem.cert).unwrap();
    std::fs::write(
        d.join("ctdc.toml"),
        include_str!("../../deploy/standards/ctdc-cases-1.0.toml"),
    )
    .unwrap();
    let config = d.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"node-a\"\nlisten = \"127.0.0.1:0\"\nstore = \"store\"\n\
             [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/node.pem\"\nkey = \"certs/node.key\"\n\
             [[datasets]]\nname = \"cases\"\n\
             [datasets.budget]\nper_analyst = 1.0\ntotal = 10.0\nper_query_max = 1.0\n\
             [datasets.standard]\nfile = \"ctdc.toml\"\nversion = \"1.0\"\n{}",
            fedq_engine::partner_coding::MAPPING_TOML
        ),
    )
    .unwrap();
    let standard_csv = d.join("standard.csv");
    let (code, out) = node(&[
        "synth",
        "--partner",
        "hotline",
        "--rows",
        "400",
        "--seed",
        "4",
        "--out",
        &at(&standard_csv),
    ]);
    assert_eq!(code, 0, "{out}");
    let local = d.join("export.csv");
    fedq_engine::partner_coding::recode(
        std::fs::File::open(&standard_csv).unwrap(),
        std::fs::File::create(&local).unwrap(),
    )
    .unwrap();
    let unknowns = std::fs::read_to_string(&local)
        .unwrap()
        .lines()
        .filter(|l| l.split(',').nth(2) == Some("unknown"))
        .count();
    assert!(unknowns > 0);
    let (code, out) = node(&["init", "--config", &at(&config)]);
    assert_eq!(code, 0, "{out}");
    (config, local, unknowns)
}

/// A node following the shipped standard with a partner mapping: `check`
/// states the standard and how each column is read, `ingest` prints the
/// coverage per column (the unmapped spellings counted, for the operator),
/// and a value a strict map lacks fails the ingest naming file, line and
/// value, storing nothing.
#[test]
fn check_and_ingest_report_the_standard_and_the_mapping_coverage() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let at = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (config, local, unknowns) = mapped_node(d);

    let (code, out) = node(&["check", "--config", &at(&config)]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("dataset \"cases\": follows standard ctdc-cases 1.0 (digest "),
        "{out}"
    );
    assert!(out.contains("gender <- sex: values F -> Female, M -> Male, T -> Trans/Transgender/NonConforming; reaches 3 of 3 declared values; other values -> missing (counted)"), "{out}");
    assert!(
        out.contains("citizenship <- nationality: country_to_iso2; reaches 20 of 20"),
        "{out}"
    );
    assert!(
        out.contains("yearOfRegistration: read as declared"),
        "{out}"
    );

    // A strict map meets a value it lacks: the whole file is refused.
    let text = std::fs::read_to_string(&local).unwrap();
    let bad = d.join("bad.csv");
    let mut lines: Vec<&str> = text.lines().collect();
    let fixed = lines[10]
        .replacen(",yes,", ",oui,", 1)
        .replacen(",no,", ",non,", 1);
    lines[10] = &fixed;
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let (code, out) = node(&[
        "ingest",
        "--config",
        &at(&config),
        "--dataset",
        "cases",
        "--csv",
        &at(&bad),
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains(&format!("{}:11:", bad.display())) && out.contains("nothing was stored"),
        "{out}"
    );
    assert!(out.contains("\"oui\"") || out.contains("\"non\""), "{out}");

    let (code, out) = node(&[
        "ingest",
        "--config",
        &at(&config),
        "--dataset",
        "cases",
        "--csv",
        &at(&local),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ingested 400 rows into \"cases\" (400 rows in total)"),
        "{out}"
    );
    assert!(out.contains("coverage per column:"), "{out}");
    assert!(
        out.contains("unmapped -> missing") && out.contains(&format!("\"unknown\" x{unknowns}")),
        "{out}"
    );
    assert!(out.contains("ageBroad <- age: "), "{out}");
}

/// The stopped node's store and config (the test must drop the store
/// before running the binary again: the store is opened exclusively).
fn open_store(
    config: &std::path::Path,
) -> (fedq_node::config::NodeConfig, fedq_ledger::store::Store) {
    let cfg = fedq_node::config::NodeConfig::load(config).unwrap();
    let store = fedq_ledger::store::Store::open(&cfg.resolve(&cfg.node.store)).unwrap();
    (cfg, store)
}

/// Whether the stopped node's dataset `cases` holds exactly `rows` rows,
/// loaded as `serve` loads them.
fn holds_rows(config: &std::path::Path, rows: u64) -> bool {
    let (cfg, store) = open_store(config);
    let schema = cfg.dataset("cases").unwrap().schema().unwrap();
    store.load_table("cases", &schema).unwrap().has_rows(rows)
}

/// The stopped node's audit head: sequence number and hash.
fn audit_head(config: &std::path::Path) -> Option<(u64, String)> {
    let (cfg, store) = open_store(config);
    let audit = fedq_node::service::open_audit(&cfg, &store).unwrap();
    audit.head().unwrap().map(|h| (h.seq, h.hash))
}

/// The coverage block `ingest` and `check --csv` print: the heading, one
/// line per column, and the ignored columns.
fn coverage_lines(out: &str) -> Vec<String> {
    out.lines()
        .skip_while(|l| *l != "coverage per column:")
        .take_while(|l| {
            *l == "coverage per column:"
                || l.starts_with("  ")
                || l.starts_with("ignored undeclared columns:")
        })
        .map(String::from)
        .collect()
}

/// The header and the rows of a CSV file, by line.
fn header_and_rows(csv: &std::path::Path) -> (String, Vec<String>) {
    let text = std::fs::read_to_string(csv).unwrap();
    let mut lines = text.lines().map(String::from);
    let header = lines.next().unwrap();
    (header, lines.collect())
}

fn write_csv(path: &std::path::Path, header: &str, rows: &[String]) {
    std::fs::write(path, format!("{header}\n{}\n", rows.join("\n"))).unwrap();
}

/// `check --dataset --csv` reads a partner-coded file as `ingest` would
/// and prints the rows it would add and the very coverage lines the real
/// ingest of the file then prints; it creates no store, adds no row, writes
/// no audit entry and does not record the file (the real ingest is not
/// refused as a duplicate afterwards).
#[test]
fn check_csv_dry_runs_ingest_with_its_coverage_storing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let at = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (config, local, _) = mapped_node(d);
    let (header, rows) = header_and_rows(&local);
    assert_eq!(rows.len(), 400);
    let first = d.join("first.csv");
    let second = d.join("second.csv");
    write_csv(&first, &header, &rows[..150]);
    write_csv(&second, &header, &rows[150..]);
    let second_unknowns = rows[150..]
        .iter()
        .filter(|l| l.split(',').nth(2) == Some("unknown"))
        .count();
    assert!(second_unknowns > 0);
    let run = |cmd: &str, csv: &std::path::Path| {
        node(&[
            cmd,
            "--config",
            &at(&config),
            "--dataset",
            "cases",
            "--csv",
            &at(csv),
        ])
    };

    // No store yet: the dry run creates none.
    let (code, out) = run("check", &first);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "dry run: ingesting {} into \"cases\" would add 150 rows; file sha256 ",
            first.display()
        )),
        "{out}"
    );
    assert!(out.contains("; nothing was stored"), "{out}");
    assert!(out.contains(": OK"), "{out}");
    assert!(!d.join("store").exists(), "the dry run created a store");

    let (code, out) = run("ingest", &first);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ingested 150 rows into \"cases\" (150 rows in total)"),
        "{out}"
    );
    let head = audit_head(&config);
    assert!(head.is_some(), "the ingest is in the audit log");
    assert!(holds_rows(&config, 150));

    let (code, dry) = run("check", &second);
    assert_eq!(code, 0, "{dry}");
    assert!(dry.contains("would add 250 rows"), "{dry}");
    assert!(
        dry.contains(&format!("\"unknown\" x{second_unknowns}")),
        "the unmapped values are counted: {dry}"
    );
    assert!(!dry.contains("already ingested"), "{dry}");
    assert_eq!(
        audit_head(&config),
        head,
        "the dry run wrote no audit entry"
    );
    assert!(holds_rows(&config, 150), "the dry run stored no row");

    // Not recorded as ingested: the real ingest goes ahead, and reports
    // the same coverage.
    let (code, real) = run("ingest", &second);
    assert_eq!(code, 0, "{real}");
    assert!(
        real.contains("ingested 250 rows into \"cases\" (400 rows in total)"),
        "{real}"
    );
    let coverage = coverage_lines(&real);
    assert!(coverage.len() > 10, "{real}");
    assert!(
        coverage.iter().any(|l| l.starts_with("  gender <- sex: ")),
        "{real}"
    );
    assert_eq!(
        coverage_lines(&dry),
        coverage,
        "dry run: {dry}\ningest: {real}"
    );
    assert!(holds_rows(&config, 400));
    assert_ne!(audit_head(&config), head);

    // A file already ingested: the dry run still reports it, and says that
    // ingest would refuse it.
    let head = audit_head(&config);
    let (code, out) = run("check", &second);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("already ingested into \"cases\"") && out.contains("--allow-duplicate"),
        "{out}"
    );
    assert_eq!(coverage_lines(&out), coverage);
    assert_eq!(audit_head(&config), head);
    assert!(holds_rows(&config, 400));
}

/// A malformed row, or a value a strict map (`unmapped = "error"`) lacks,
/// fails `check --csv` with ingest's own message, naming the file, line and
/// value, and changes nothing in the store.
#[test]
fn check_csv_fails_as_ingest_would_naming_the_line_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let at = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (config, local, _) = mapped_node(d);
    let (header, rows) = header_and_rows(&local);
    let first = d.join("first.csv");
    write_csv(&first, &header, &rows[..100]);
    let run = |cmd: &str, csv: &std::path::Path| {
        node(&[
            cmd,
            "--config",
            &at(&config),
            "--dataset",
            "cases",
            "--csv",
            &at(csv),
        ])
    };
    let (code, out) = run("ingest", &first);
    assert_eq!(code, 0, "{out}");
    let head = audit_head(&config);
    assert!(head.is_some());
    assert!(holds_rows(&config, 100));

    let mut rest: Vec<String> = rows[100..].to_vec();
    // Line 11 (the header is line 1): a yes/no flag the map lacks.
    let before = rest[9].clone();
    rest[9] = before.replacen(",yes,", ",oui,", 1);
    if rest[9] == before {
        rest[9] = before.replacen(",no,", ",oui,", 1);
    }
    assert_ne!(rest[9], before, "the row has a yes/no flag: {before}");
    let strict = d.join("strict.csv");
    write_csv(&strict, &header, &rest);
    // Line 6: one field short.
    let mut rest: Vec<String> = rows[100..].to_vec();
    rest[4] = rest[4].rsplit_once(',').unwrap().0.to_string();
    let short = d.join("short.csv");
    write_csv(&short, &header, &rest);

    for (bad, line, says) in [
        (
            &strict,
            11,
            "the value \"oui\" is not in [datasets.mapping.",
        ),
        (&short, 6, "fields, the header has"),
    ] {
        let (code, out) = run("check", bad);
        assert_eq!(code, 1, "{out}");
        let error = error_line(&out);
        assert!(
            error.starts_with(&format!("error: {}:{line}: ", bad.display())),
            "{out}"
        );
        assert!(error.contains(says), "{out}");
        assert!(error.ends_with("nothing was stored"), "{out}");
        assert!(!out.contains("would add") && !out.contains(": OK"), "{out}");
        assert_eq!(audit_head(&config), head, "{}", bad.display());
        assert!(holds_rows(&config, 100), "{}", bad.display());
        // The very message ingest gives.
        let (code, ingest_out) = run("ingest", bad);
        assert_eq!(code, 1, "{ingest_out}");
        assert_eq!(error_line(&ingest_out), error);
        assert_eq!(audit_head(&config), head);
        assert!(holds_rows(&config, 100));
    }
}

/// `check --csv` is refused for a dataset answered from a database (it has
/// no CSV ingest) and, as `ingest` refuses it, for an undeclared dataset;
/// --dataset and --csv come together.
#[test]
fn check_csv_is_refused_for_a_database_source_or_an_unknown_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let at = |p: &std::path::Path| p.to_str().unwrap().to_string();
    std::fs::write(
        d.join("ctdc.toml"),
        include_str!("../../deploy/standards/ctdc-cases-1.0.toml"),
    )
    .unwrap();
    let config = d.join("node.toml");
    let dataset = |name: &str| {
        format!(
            "[[datasets]]\nname = \"{name}\"\n\
             [datasets.budget]\nper_analyst = 1.0\ntotal = 10.0\nper_query_max = 1.0\n\
             [datasets.standard]\nfile = \"ctdc.toml\"\nversion = \"1.0\"\ndataset = \"cases\"\n"
        )
    };
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"node-a\"\nlisten = \"127.0.0.1:0\"\nstore = \"store\"\n\
             [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/node.pem\"\nkey = \"certs/node.key\"\n\
             {}{}\
             [datasets.source]\nkind = \"postgres\"\ntable = \"public.cases\"\nurl_env = \"FEDQ_CLI_TEST_NO_DB\"\n",
            dataset("cases"),
            dataset("hotline")
        ),
    )
    .unwrap();
    let csv = d.join("export.csv");
    std::fs::write(&csv, "gender\nFemale\n").unwrap();
    let run = |cmd: &str, name: &str| {
        node(&[
            cmd,
            "--config",
            &at(&config),
            "--dataset",
            name,
            "--csv",
            &at(&csv),
        ])
    };

    let (code, out) = run("check", "hotline");
    assert_eq!(code, 1, "{out}");
    let error = error_line(&out);
    assert!(
        error.contains("dataset \"hotline\" answers from the database table public.cases ([datasets.source] in ")
            && error.contains("it has no CSV ingest"),
        "{out}"
    );
    assert!(
        !out.contains("coverage per column") && !out.contains(": OK"),
        "{out}"
    );
    assert!(!d.join("store").exists());

    let (code, out) = run("check", "case");
    assert_eq!(code, 1, "{out}");
    let error = error_line(&out);
    assert!(
        error.contains("dataset \"case\" is not declared in ")
            && error.ends_with("declared: cases, hotline"),
        "{out}"
    );
    let (code, ingest_out) = run("ingest", "case");
    assert_eq!(code, 1, "{ingest_out}");
    assert_eq!(error_line(&ingest_out), error, "the message ingest gives");

    let (code, out) = node(&["check", "--config", &at(&config), "--dataset", "cases"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--csv"), "{out}");
    let (code, out) = node(&["check", "--config", &at(&config), "--csv", &at(&csv)]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--dataset"), "{out}");
}
