//! Partner onboarding: what a partner's administrator does from deploy/ and
//! its runbook keeps working. Backups restore spent budget faithfully and an
//! older backup never replaces a newer ledger; a store written by another
//! build is refused without touching its ledger; `synth` output ingests with
//! the schema it prints, through the real binaries; the openssl certificate
//! script makes certificates the node and coordinator accept; the compose
//! file and systemd unit pass their tools where those tools exist.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fedq_engine::synth::Partner;
use fedq_ledger::ledger::Ledger;
use fedq_ledger::store::{Store, FORMAT_VERSION};
use fedq_node::backup::{self, Mark};
use fedq_node::config::{BudgetLimits, NodeConfig};
use fedq_pki::{Authority, Role};
use fedq_proto::v1::{BudgetRequest, DescribeRequest, QueryRequest};
use fedq_tests::{node_binary, node_config, TestFederation, TestNode};

fn limits() -> BudgetLimits {
    BudgetLimits {
        keys_delta: None,
        keys_delta_per_analyst: None,
        keys_delta_total: None,
        per_analyst: 5.0,
        total: 20.0,
        per_query_max: 1.0,
        measure: Default::default(),
        delta: None,
    }
}

fn q(id: &str, epsilon: f64) -> QueryRequest {
    QueryRequest {
        query_id: id.into(),
        sql: "SELECT gender, COUNT(*) FROM cases GROUP BY gender".into(),
        epsilon,
        dry_run: false,
        rho: 0.0,
    }
}

/// Opens a stopped node's store, ledger and audit log.
fn open_ledger(config: &NodeConfig) -> Ledger {
    let store = Store::open(&config.resolve(&config.node.store)).expect("open the store");
    let audit = fedq_node::service::open_audit(config, &store).expect("open the audit log");
    Ledger::new(store, std::sync::Arc::new(audit))
}

/// What `analyst` has spent on `cases`, read from the stopped node's store.
fn spent_on_disk(config: &NodeConfig, analyst: &str) -> f64 {
    open_ledger(config)
        .analysts("cases")
        .unwrap()
        .into_iter()
        .find(|(a, _, _)| a == analyst)
        .map_or(0.0, |(_, spent, _)| spent)
}

/// The stopped node's audit head.
fn head_on_disk(config: &NodeConfig) -> Option<Mark> {
    open_ledger(config)
        .audit
        .head()
        .unwrap()
        .as_ref()
        .map(Mark::from)
}

fn store_dir(config: &NodeConfig) -> PathBuf {
    config.resolve(&config.node.store)
}

/// Files beside the store directory (restore's staging and kept stores).
fn siblings(config: &NodeConfig) -> Vec<String> {
    let dir = store_dir(config);
    let parent = dir.parent().unwrap();
    let mut names: Vec<String> = std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("store"))
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore_keep_spent_budget_and_stored_releases() {
    let mut fed = TestFederation::start(&[(Partner::Ngo, 500, 1)], limits()).await;
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    let first = alice.query(q("q1", 0.5)).await.unwrap().into_inner();
    drop(alice);
    fed.stop_node(0).await;

    let config = fed.nodes[0].config.clone();
    let out = fed.dir.path().join("backup-1");
    let report = backup::backup(&config, &out).expect("backup a stopped node");
    let head = head_on_disk(&config).expect("the log is not empty");
    assert_eq!(report.manifest.audit_head.as_ref(), Some(&head));
    assert_eq!(report.manifest.store_format, FORMAT_VERSION);
    let cases = &report.manifest.ledger[0];
    assert!((cases.spent_epsilon - 0.5).abs() < 1e-9, "{cases:?}");
    assert_eq!(
        backup::read_high_water(&config).unwrap(),
        Some(head.clone()),
        "a backup raises the high-water mark"
    );

    // The disk is lost: the store goes, the mark beside it survives.
    std::fs::remove_dir_all(store_dir(&config)).unwrap();
    let restored = backup::restore(&config, &out).expect("restore the backup");
    assert!(restored.replaced.is_none());
    assert!(!restored.installed_audit_key, "the node kept its own key");
    assert_eq!(head_on_disk(&config), Some(head));
    assert!((spent_on_disk(&config, "alice") - 0.5).abs() < 1e-9);

    fed.start_node(0).await;
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    let budget = alice.budget(BudgetRequest {}).await.unwrap().into_inner();
    assert!(
        (budget.budgets[0].spent_by_analyst - 0.5).abs() < 1e-9,
        "the restored node still counts what alice spent: {budget:?}"
    );
    let replay = alice.query(q("q1", 0.5)).await.unwrap().into_inner();
    assert!(
        replay.replayed,
        "a retry is answered from the stored release"
    );
    assert_eq!(
        replay.measurements, first.measurements,
        "the same noisy values as before the backup"
    );
    let budget = alice.budget(BudgetRequest {}).await.unwrap().into_inner();
    assert!((budget.budgets[0].spent_by_analyst - 0.5).abs() < 1e-9);
    alice.query(q("q2", 0.25)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restoring_a_backup_older_than_the_high_water_mark_is_refused_and_changes_nothing() {
    let mut fed = TestFederation::start(
        &[(Partner::Ngo, 400, 2), (Partner::Hotline, 400, 3)],
        limits(),
    )
    .await;
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    alice.query(q("q1", 0.5)).await.unwrap();
    fed.stop_node(0).await;
    let config = fed.nodes[0].config.clone();
    let old = fed.dir.path().join("backup-old");
    backup::backup(&config, &old).unwrap();

    // More queries are answered after the backup.
    fed.start_node(0).await;
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    alice.query(q("q2", 0.5)).await.unwrap();
    drop(alice);
    fed.stop_node(0).await;

    let head = head_on_disk(&config).unwrap();
    let mark = backup::read_high_water(&config).unwrap();
    let before = siblings(&config);
    let err = format!(
        "{:#}",
        backup::restore(&config, &old).expect_err("an older backup is refused")
    );
    assert!(
        err.contains("refused") && err.contains("hand back") && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(
        err.contains(&head.seq.to_string()),
        "names the entry reached: {err}"
    );
    assert_eq!(head_on_disk(&config), Some(head.clone()), "store untouched");
    assert!((spent_on_disk(&config, "alice") - 1.0).abs() < 1e-9);
    assert_eq!(backup::read_high_water(&config).unwrap(), mark);
    assert_eq!(siblings(&config), before, "no staging or kept store left");

    // The node's shutdown raises the mark; a newer backup is taken too.
    backup::raise_high_water(&config, &open_ledger(&config).audit).unwrap();
    assert_eq!(
        backup::read_high_water(&config).unwrap(),
        Some(head.clone())
    );
    let new = fed.dir.path().join("backup-new");
    backup::backup(&config, &new).unwrap();

    // Deleting the store does not make the old backup acceptable: the mark
    // beside the store remembers how far the ledger had got.
    std::fs::remove_dir_all(store_dir(&config)).unwrap();
    let err = format!("{:#}", backup::restore(&config, &old).unwrap_err());
    assert!(
        err.contains("refused") && err.contains("high-water mark"),
        "{err}"
    );
    assert!(!store_dir(&config).exists(), "nothing was created");

    // A node started on an empty store after that would hand back budget:
    // the start-up check refuses it.
    let err = format!(
        "{:#}",
        backup::raise_high_water(&config, &open_ledger(&config).audit).unwrap_err()
    );
    assert!(err.contains("rolled back or replaced"), "{err}");
    std::fs::remove_dir_all(store_dir(&config)).unwrap();

    // Another node's backup is refused, even though it is newer.
    fed.stop_node(1).await;
    let other = fed.dir.path().join("backup-other");
    backup::backup(&fed.nodes[1].config, &other).unwrap();
    let err = format!("{:#}", backup::restore(&config, &other).unwrap_err());
    assert!(err.contains("another node's backup"), "{err}");

    // The newer backup restores, with every debit.
    backup::restore(&config, &new).expect("the newest backup restores");
    assert_eq!(head_on_disk(&config), Some(head));
    assert!((spent_on_disk(&config, "alice") - 1.0).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_written_by_another_format_version_is_refused_and_keeps_its_ledger() {
    let mut fed = TestFederation::start(&[(Partner::CaseManagement, 300, 4)], limits()).await;
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    alice.query(q("q1", 0.75)).await.unwrap();
    drop(alice);
    fed.stop_node(0).await;
    let config = fed.nodes[0].config.clone();
    let dir = store_dir(&config);

    let dump = |db: &sled::Db, tree: &str| -> Vec<(Vec<u8>, Vec<u8>)> {
        db.open_tree(tree)
            .unwrap()
            .iter()
            .map(|kv| {
                let (k, v) = kv.unwrap();
                (k.to_vec(), v.to_vec())
            })
            .collect()
    };
    let (ledger_before, audit_before) = {
        let db = sled::open(&dir).unwrap();
        db.open_tree("data")
            .unwrap()
            .insert("meta/format", &99u64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
        (dump(&db, "ledger"), dump(&db, "audit"))
    };
    assert!(!ledger_before.is_empty());

    let err = match Store::open(&dir) {
        Ok(_) => panic!("a store of format 99 must be refused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("format version 99")
            && err.contains(&format!("reads version {FORMAT_VERSION}")),
        "names both versions: {err}"
    );
    assert!(err.contains("nothing was changed"), "{err}");
    // Starting the node fails the same way rather than serving an empty ledger.
    let err = match fedq_node::service::NodeState::open(config.clone()) {
        Ok(_) => panic!("the node must refuse the store"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("format version 99"), "{err}");

    let db = sled::open(&dir).unwrap();
    assert_eq!(
        db.open_tree("data").unwrap().get("meta/format").unwrap(),
        Some(sled::IVec::from(&99u64.to_be_bytes())),
        "the format marker was not reset"
    );
    assert_eq!(
        dump(&db, "ledger"),
        ledger_before,
        "the ledger is untouched"
    );
    assert_eq!(
        dump(&db, "audit"),
        audit_before,
        "the audit log is untouched"
    );
    db.open_tree("data")
        .unwrap()
        .insert("meta/format", &FORMAT_VERSION.to_be_bytes())
        .unwrap();
    db.flush().unwrap();
    drop(db);
    assert!((spent_on_disk(&config, "alice") - 0.75).abs() < 1e-9);
}

/// Runs the real `fedq-node` binary.
fn fedq_node(args: &[&str], dir: &Path) -> Output {
    Command::new(node_binary())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run fedq-node")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn synth_output_ingests_with_its_printed_schema_through_the_binaries() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let synth = |out: &str| {
        let o = fedq_node(
            &[
                "synth",
                "--profile",
                "ctdc",
                "--partner",
                "hotline",
                "--rows",
                "1500",
                "--seed",
                "9",
                "--out",
                out,
            ],
            d,
        );
        assert!(o.status.success(), "synth failed: {}", text(&o.stderr));
        text(&o.stdout)
    };
    let schema = synth("cases.csv");
    assert_eq!(synth("again.csv"), schema);
    assert_eq!(
        std::fs::read(d.join("cases.csv")).unwrap(),
        std::fs::read(d.join("again.csv")).unwrap(),
        "the same seed writes the same file"
    );

    let ca = Authority::generate("onboarding CA").unwrap();
    ca.issue(Role::Node, "partner-1")
        .unwrap()
        .write(&d.join("certs"), "node")
        .unwrap();
    std::fs::write(d.join("certs/ca.pem"), &ca.pem.cert).unwrap();
    let node_toml = format!(
        "[node]\nname = \"partner-1\"\nlisten = \"127.0.0.1:0\"\nstore = \"store\"\n\n\
         [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/node.pem\"\nkey = \"certs/node.key\"\n\n\
         [[datasets]]\nname = \"cases\"\n\n\
         [datasets.budget]\nper_analyst = 5.0\ntotal = 20.0\nper_query_max = 1.0\n\n{schema}"
    );
    std::fs::write(d.join("node.toml"), node_toml).unwrap();

    let check = fedq_node(&["check", "--config", "node.toml"], d);
    assert!(check.status.success(), "{}", text(&check.stderr));
    let ingest = fedq_node(
        &[
            "ingest",
            "--config",
            "node.toml",
            "--dataset",
            "cases",
            "--csv",
            "cases.csv",
        ],
        d,
    );
    assert!(ingest.status.success(), "{}", text(&ingest.stderr));
    assert!(
        text(&ingest.stdout).contains("ingested 1500 rows"),
        "{}",
        text(&ingest.stdout)
    );

    // Backup and restore from the command line, as the runbook shows.
    let b1 = fedq_node(&["backup", "--config", "node.toml", "--out", "b1"], d);
    assert!(b1.status.success(), "{}", text(&b1.stderr));
    assert!(d.join("b1/manifest.json").exists());
    let grant = fedq_node(
        &[
            "budget",
            "grant",
            "--config",
            "node.toml",
            "--analyst",
            "alice",
            "--dataset",
            "cases",
            "--epsilon",
            "1",
        ],
        d,
    );
    assert!(grant.status.success(), "{}", text(&grant.stderr));
    let old = fedq_node(&["restore", "--config", "node.toml", "--from", "b1"], d);
    assert_eq!(old.status.code(), Some(1), "an older backup is refused");
    assert!(
        text(&old.stderr).contains("refused"),
        "{}",
        text(&old.stderr)
    );
    let b2 = fedq_node(&["backup", "--config", "node.toml", "--out", "b2"], d);
    assert!(b2.status.success(), "{}", text(&b2.stderr));
    let new = fedq_node(&["restore", "--config", "node.toml", "--from", "b2"], d);
    assert!(new.status.success(), "{}", text(&new.stderr));

    // A node that holds the store (a running node) blocks backup clearly.
    let held = Store::open(&d.join("store")).unwrap();
    let busy = fedq_node(&["backup", "--config", "node.toml", "--out", "b3"], d);
    drop(held);
    assert_eq!(busy.status.code(), Some(1));
    assert!(
        text(&busy.stderr).contains("stop the node first"),
        "{}",
        text(&busy.stderr)
    );
}

/// Whether `program` runs on this machine with `args`.
fn tool_works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_the_openssl_script_are_accepted_by_node_and_client() {
    if !tool_works("openssl", &["version"]) {
        eprintln!("SKIPPED: openssl is not installed; deploy/certs.sh needs it");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let script = deploy_dir().join("certs.sh");
    let run = |args: &[&str]| {
        let o = Command::new("sh")
            .arg(&script)
            .args(args)
            .output()
            .expect("run certs.sh");
        assert!(o.status.success(), "certs.sh {args:?}: {}", text(&o.stderr));
    };
    let pki_s = pki.to_str().unwrap();
    run(&["ca", pki_s]);
    run(&["issue", pki_s, "node", "partner-1"]);
    run(&["issue", pki_s, "analyst", "alice@uni"]);

    let node_dir = dir.path().join("partner-1");
    // node_config writes rcgen certificates; replace them with the script's.
    let scratch_ca = Authority::generate("scratch").unwrap();
    let config = node_config(&scratch_ca, &node_dir, "partner-1", limits());
    for (from, to) in [
        ("ca.pem", "ca.pem"),
        ("partner-1.pem", "node.pem"),
        ("partner-1.key", "node.key"),
    ] {
        std::fs::copy(pki.join(from), node_dir.join("certs").join(to)).unwrap();
    }
    let running = fedq_node::server::start(config.clone()).await.unwrap();
    let mut node = TestNode {
        name: "partner-1".into(),
        config,
        csv: PathBuf::new(),
        running: None,
    };
    node.config.node.listen = running.addr;
    let mut client = fedq_tests::connect(
        &node,
        &pki.join("ca.pem"),
        &pki.join("alice@uni.pem"),
        &pki.join("alice@uni.key"),
    )
    .await
    .expect("mutual TLS with openssl-made certificates");
    let described = client
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.node_name, "partner-1");
    let budget = client.budget(BudgetRequest {}).await.unwrap().into_inner();
    assert_eq!(budget.budgets[0].analyst, "alice@uni", "CN is the analyst");
    running.stop().await.unwrap();
}

#[test]
fn compose_file_is_accepted_by_docker_compose() {
    if !tool_works("docker", &["compose", "version"]) {
        eprintln!("SKIPPED: `docker compose` is not available here (no compose plugin); cannot check deploy/compose.yaml");
        return;
    }
    let o = Command::new("docker")
        .args(["compose", "-f"])
        .arg(deploy_dir().join("compose.yaml"))
        .args(["config", "--quiet"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "docker compose config: {}",
        text(&o.stderr)
    );
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    if !tool_works("systemd-analyze", &["--version"]) {
        eprintln!(
            "SKIPPED: systemd-analyze is not installed; cannot check deploy/fedq-node.service"
        );
        return;
    }
    // verify checks that ExecStart's binary exists: point it at the one built.
    let unit = std::fs::read_to_string(deploy_dir().join("fedq-node.service")).unwrap();
    assert!(unit.contains("/usr/local/bin/fedq-node"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fedq-node.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/fedq-node", node_binary().to_str().unwrap()),
    )
    .unwrap();
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = text(&o.stderr);
    if !o.status.success() && stderr.contains("Failed to connect to bus") {
        eprintln!("SKIPPED: systemd-analyze cannot run here: {stderr}");
        return;
    }
    assert!(o.status.success(), "systemd-analyze verify: {stderr}");
    assert!(
        !stderr.contains(&path.display().to_string()),
        "warnings about the unit: {stderr}"
    );
}
