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

/// A node following the shipped standard with a partner mapping: `check`
/// states the standard and how each column is read, `ingest` prints the
/// coverage per column (the unmapped spellings counted, for the operator),
/// and a value a strict map lacks fails the ingest naming file, line and
/// value, storing nothing.
#[test]
fn check_and_ingest_report_the_standard_and_the_mapping_coverage() {
    use fedq_pki::{Authority, Role};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
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
