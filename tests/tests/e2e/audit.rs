//! The audit log seen from outside, as auditors and researchers rely on it:
//! every release has its debit and its signed log entry even after SIGKILL,
//! racing queries never overspend and the log says exactly who was debited,
//! retries are logged and free, and a node that rolls its history back is
//! caught by the heads a coordinator saw.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use fedq::audit::{check, HeadsFile};
use fedq_engine::synth::Partner;
use fedq_ledger::audit::{parse_public_key, verify, Event};
use fedq_node::config::BudgetLimits;
use fedq_pki::Role;
use fedq_proto::v1::{BudgetRequest, ExportAuditRequest, QueryRequest};
use fedq_tests::{node_binary, roomy_budget, TestFederation};
use tonic::Code;

fn q(id: &str, epsilon: f64) -> QueryRequest {
    QueryRequest {
        query_id: id.into(),
        sql: "SELECT ageBroad, COUNT(*) FROM cases WHERE isForcedLabour = 1 GROUP BY ageBroad"
            .into(),
        epsilon,
        dry_run: false,
        rho: 0.0,
    }
}

fn with_auditor(fed: &mut TestFederation) {
    for n in &mut fed.nodes {
        n.config.audit.auditors = vec!["auditor".into()];
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_queries_for_the_last_budget_are_debited_exactly_when_answered() {
    let limits = BudgetLimits {
        keys_delta: None,
        keys_delta_per_analyst: None,
        keys_delta_total: None,
        per_analyst: 5.0,
        total: 100.0,
        per_query_max: 1.0,
        measure: Default::default(),
        delta: None,
    };
    let mut fed = TestFederation::start(&[(Partner::Ngo, 1000, 1)], limits).await;
    fed.stop_node(0).await;
    with_auditor(&mut fed);
    fed.start_node(0).await;
    let mut tasks = Vec::new();
    for i in 0..120 {
        let mut c = fed.raw_client(0, Role::Analyst, "alice").await;
        tasks.push(tokio::spawn(async move {
            (i, c.query(q(&format!("race-{i}"), 0.1)).await)
        }));
    }
    let mut answered = HashSet::new();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        match r {
            Ok(_) => {
                answered.insert(format!("race-{i}"));
            }
            Err(s) => assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}"),
        }
    }
    assert_eq!(answered.len(), 50, "5.0 / 0.1 queries fit");
    // A graceful stop logs the refusal summaries still being counted.
    fed.stop_node(0).await;
    fed.start_node(0).await;
    let (text, entries, key) = fed.pull_audit(0).await;
    verify(&text, &parse_public_key(&key).unwrap(), 0, None).expect("the log verifies");
    let debited: HashSet<String> = entries
        .iter()
        .filter_map(|e| match &e.event {
            Event::Debited { query_id, .. } => Some(query_id.clone()),
            _ => None,
        })
        .collect();
    let released: HashSet<String> = entries
        .iter()
        .filter_map(|e| match &e.event {
            Event::Released { query_id, .. } => Some(query_id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        debited, answered,
        "exactly the answered queries were debited"
    );
    assert_eq!(released, answered);
    // Every refusal is counted, in summaries (at most one per identity,
    // kind and minute: the race takes well under two minutes).
    let summaries: Vec<(String, u64)> = entries
        .iter()
        .filter_map(|e| match &e.event {
            Event::Refusals { reason, count, .. } => Some((reason.clone(), *count)),
            _ => None,
        })
        .collect();
    let refused: u64 = summaries.iter().map(|(_, n)| n).sum();
    assert_eq!(refused, 70, "every refusal is counted: {summaries:?}");
    assert!(summaries.len() <= 2 * 3, "{summaries:?}");
    let total: f64 = entries
        .iter()
        .filter_map(|e| match &e.event {
            Event::Debited { epsilon, .. } => Some(epsilon.value()),
            _ => None,
        })
        .sum();
    assert!(total <= 5.0 + 1e-9, "debited {total}");
    // No exact value in the log: every Released entry carries only public facts.
    for e in &entries {
        if let Event::Released { measurements, .. } = &e.event {
            assert!(measurements
                .iter()
                .all(|m| m.values == 10 && m.mechanism == "discrete_laplace"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_replayed_identically_logged_and_free() {
    let mut fed = TestFederation::start(&[(Partner::Hotline, 500, 2)], roomy_budget()).await;
    fed.stop_node(0).await;
    with_auditor(&mut fed);
    fed.start_node(0).await;
    let mut c = fed.raw_client(0, Role::Analyst, "alice").await;
    let first = c.query(q("same", 0.5)).await.unwrap().into_inner();
    let second = c.query(q("same", 0.5)).await.unwrap().into_inner();
    assert!(second.replayed && !first.replayed);
    assert_eq!(first.measurements[0].values, second.measurements[0].values);
    assert_eq!(
        first.audit_head, second.audit_head,
        "the replay carries the head of the original release"
    );
    let spent = c
        .budget(BudgetRequest {})
        .await
        .unwrap()
        .into_inner()
        .budgets[0]
        .spent_by_analyst;
    assert!((spent - 0.5).abs() < 1e-9);
    let (_, entries, _) = fed.pull_audit(0).await;
    let kinds: Vec<&str> = entries.iter().map(|e| e.event.kind()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "debited").count(), 1);
    assert_eq!(kinds.iter().filter(|k| **k == "replayed").count(), 1);
    // The head in the answer is the Released entry's, signed by the node.
    let head = first.audit_head.unwrap();
    let e = entries.iter().find(|e| e.seq == head.seq).unwrap();
    assert_eq!(e.hash, head.hash);
    assert!(matches!(e.event, Event::Released { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restored_to_an_older_log_is_caught_by_the_heads_seen() {
    let mut fed = TestFederation::start(&[(Partner::Ngo, 500, 3)], roomy_budget()).await;
    fed.stop_node(0).await;
    with_auditor(&mut fed);
    let store = fed.nodes[0].config.resolve(&fed.nodes[0].config.node.store);
    let backup = fed.dir.path().join("backup");
    copy_dir(&store, &backup);
    fed.start_node(0).await;
    let coordinator = fed.federation("alice");
    let mut heads = HeadsFile::default();
    let presented =
        std::collections::HashMap::from([("node-0".to_string(), fed.pull_audit(0).await.2)]);
    for i in 0..3 {
        let mut outcomes = coordinator
            .query(q(&format!("h{i}"), 0.2), Duration::from_secs(10))
            .await;
        heads.screen(&presented, &mut outcomes);
        assert!(
            outcomes[0].result.is_ok(),
            "{:?}",
            outcomes[0].result.as_ref().err()
        );
    }
    let (text, _, key) = fed.pull_audit(0).await;
    let known = heads.nodes.get_mut("node-0").unwrap();
    assert_eq!(known.heads.len(), 3);
    let ok = check("node-0", &text, &key, known);
    assert!(ok.consistent, "{}", ok.detail);
    // The operator restores the old store: the spent budget and the log
    // entries after the backup vanish. The node itself refuses to serve it
    // (its high-water mark is beyond the restored log).
    fed.stop_node(0).await;
    std::fs::remove_dir_all(&store).unwrap();
    copy_dir(&backup, &store);
    let refused = fedq_node::server::start(fed.nodes[0].config.clone())
        .await
        .unwrap()
        .stop()
        .await;
    let why = format!(
        "{:#}",
        refused.expect_err("a rolled-back store must not be served")
    );
    assert!(
        why.contains("rolled back") && why.contains("high-water"),
        "{why}"
    );
    // An operator who also deletes the mark gets the node to serve the old
    // store; the heads the coordinator saw still catch it.
    std::fs::remove_file(fedq_node::backup::high_water_path(&fed.nodes[0].config)).unwrap();
    fed.start_node(0).await;
    let (text, _, key) = fed.pull_audit(0).await;
    verify(&text, &parse_public_key(&key).unwrap(), 0, None)
        .expect("the rolled-back log is internally consistent");
    let caught = check(
        "node-0",
        &text,
        &key,
        heads.nodes.get_mut("node-0").unwrap(),
    );
    assert!(!caught.consistent, "the rollback must be caught");
    assert!(
        caught.detail.contains("rewritten") || caught.detail.contains("truncated"),
        "{}",
        caught.detail
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_query_storm_loses_no_debit_or_log_entry() {
    // Set up a node directory with the in-process harness, then serve it
    // from a real `fedq-node` process.
    let mut fed =
        TestFederation::start(&[(Partner::CaseManagement, 3000, 4)], roomy_budget()).await;
    fed.stop_node(0).await;
    with_auditor(&mut fed);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    fed.nodes[0].config.node.listen = format!("127.0.0.1:{port}").parse().unwrap();
    let config_path = fed.nodes[0].config.base_dir.join("node.toml");
    std::fs::write(&config_path, toml::to_string(&fed.nodes[0].config).unwrap()).unwrap();
    let binary = node_binary();
    let spawn = || {
        std::process::Command::new(&binary)
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start fedq-node")
    };
    let mut child = spawn();
    wait_ready(&fed).await;

    // The storm: 16 clients, each sending queries with fresh ids until the
    // node dies; every answer received is kept.
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for t in 0..16 {
        let mut c = fed.raw_client(0, Role::Analyst, "alice").await;
        let received = received.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                match c.query(q(&format!("storm-{t}-{i}"), 0.01)).await {
                    Ok(r) => received.lock().unwrap().push(r.into_inner()),
                    Err(_) => break,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.kill().expect("SIGKILL the node");
    child.wait().unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let received = std::mem::take(&mut *received.lock().unwrap());
    assert!(
        received.len() >= 10,
        "the storm got {} answers before the kill",
        received.len()
    );
    let spent_before = received
        .iter()
        .filter_map(|r| r.budget.as_ref().map(|b| b.spent_by_analyst))
        .fold(0.0, f64::max);

    let mut child = spawn();
    wait_ready(&fed).await;
    let mut c = fed.raw_client(0, Role::Analyst, "alice").await;
    let spent_after = c
        .budget(BudgetRequest {})
        .await
        .unwrap()
        .into_inner()
        .budgets[0]
        .spent_by_analyst;
    assert!(
        spent_after + 1e-9 >= spent_before,
        "spent went from {spent_before} down to {spent_after}"
    );
    let (text, entries, key) = fed.pull_audit(0).await;
    let _ = child.kill();
    let _ = child.wait();
    verify(&text, &parse_public_key(&key).unwrap(), 0, None)
        .expect("the chain verifies after SIGKILL");
    let mut debits: HashMap<String, usize> = HashMap::new();
    let mut releases: HashMap<String, (u64, String)> = HashMap::new();
    for e in &entries {
        match &e.event {
            Event::Debited { query_id, .. } => *debits.entry(query_id.clone()).or_default() += 1,
            Event::Released { query_id, .. } => {
                releases.insert(query_id.clone(), (e.seq, e.hash.clone()));
            }
            _ => {}
        }
    }
    for r in &received {
        assert_eq!(
            debits.get(&r.query_id),
            Some(&1),
            "{} was received: it has exactly one debit",
            r.query_id
        );
        let head = r.audit_head.as_ref().expect("answers carry the log head");
        assert_eq!(
            releases.get(&r.query_id),
            Some(&(head.seq, head.hash.clone())),
            "{} has its release entry",
            r.query_id
        );
    }
    let debited_total: f64 = entries
        .iter()
        .filter_map(|e| match &e.event {
            Event::Debited { epsilon, .. } => Some(epsilon.value()),
            _ => None,
        })
        .sum();
    assert!(
        (debited_total - spent_after).abs() < 1e-6,
        "the log ({debited_total}) and the ledger ({spent_after}) agree"
    );
}

async fn wait_ready(fed: &TestFederation) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let node = &fed.nodes[0];
    let (cert, key) = fed.client_cert(Role::Analyst, "probe");
    loop {
        if let Ok(mut c) =
            fedq_tests::connect(node, &fed.dir.path().join("ca/ca.pem"), &cert, &key).await
        {
            if c.describe(fedq_proto::v1::DescribeRequest {}).await.is_ok() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the node did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auditor_cli_verifies_summarises_and_reports_an_export() {
    let mut fed = TestFederation::start(&[(Partner::Ngo, 500, 6)], roomy_budget()).await;
    fed.stop_node(0).await;
    with_auditor(&mut fed);
    fed.start_node(0).await;
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    for i in 0..3 {
        alice.query(q(&format!("cli-{i}"), 0.25)).await.unwrap();
    }
    let _ = alice.query(q("too-much", 50.0)).await.unwrap_err();
    // An analyst may not export the log.
    let e = alice
        .export_audit(ExportAuditRequest { since_seq: 0 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // A graceful stop logs the refusal summaries still being counted.
    fed.stop_node(0).await;
    fed.start_node(0).await;
    let (text, entries, key) = fed.pull_audit(0).await;
    let dir = fed.dir.path().join("auditor");
    std::fs::create_dir_all(&dir).unwrap();
    let (log, pubkey) = (dir.join("log.jsonl"), dir.join("node.pub"));
    std::fs::write(&log, &text).unwrap();
    std::fs::write(&pubkey, &key).unwrap();
    let node = node_binary();
    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(&node)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let head = format!(
        "{}:{}",
        entries.last().unwrap().seq,
        entries.last().unwrap().hash
    );
    let (code, out) = run(&[
        "audit".as_ref(),
        "verify".as_ref(),
        "--log".as_ref(),
        log.as_os_str(),
        "--pubkey".as_ref(),
        pubkey.as_os_str(),
        "--head".as_ref(),
        head.as_ref(),
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("{} entries verified", entries.len())),
        "{out}"
    );
    // One flipped character in a field: named, exit 1.
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let victim = lines
        .iter()
        .position(|l| l.contains("\"debited\""))
        .unwrap();
    lines[victim] = lines[victim].replacen("\"epsilon\":\"0.25\"", "\"epsilon\":\"0.15\"", 1);
    let tampered = dir.join("tampered.jsonl");
    std::fs::write(&tampered, lines.join("\n")).unwrap();
    let (code, out) = run(&[
        "audit".as_ref(),
        "verify".as_ref(),
        "--log".as_ref(),
        tampered.as_os_str(),
        "--pubkey".as_ref(),
        pubkey.as_os_str(),
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("line {} (entry seq {victim})", victim + 1))
            && out.contains("edited"),
        "{out}"
    );
    // Summary and report from the export.
    let (code, out) = run(&[
        "audit".as_ref(),
        "summary".as_ref(),
        "--log".as_ref(),
        log.as_os_str(),
    ]);
    assert_eq!(code, Some(0), "{out}");
    let alice_line = out
        .lines()
        .find(|l| l.starts_with("alice"))
        .unwrap_or_else(|| panic!("{out}"));
    let cols: Vec<&str> = alice_line.split_whitespace().collect();
    assert_eq!(&cols[1..5], &["cases", "3", "1", "0.7500"], "{alice_line}");
    let html = dir.join("report.html");
    let (code, out) = run(&[
        "audit".as_ref(),
        "report".as_ref(),
        "--log".as_ref(),
        log.as_os_str(),
        "--pubkey".as_ref(),
        pubkey.as_os_str(),
        "--html".as_ref(),
        html.as_os_str(),
    ]);
    assert_eq!(code, Some(0), "{out}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains("alice") && page.contains("verified"));
    assert!(
        !page.contains("<script") && !page.contains(" src="),
        "self-contained"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_grants_and_limit_changes_are_logged() {
    let mut fed = TestFederation::start(&[(Partner::Ngo, 200, 7)], roomy_budget()).await;
    fed.stop_node(0).await;
    with_auditor(&mut fed);
    fed.nodes[0].config.datasets[0].budget.per_analyst = 3.0;
    fed.start_node(0).await;
    fed.stop_node(0).await;
    // A grant by the partner's admin, on the stopped node's store.
    {
        let cfg = &fed.nodes[0].config;
        let store = fedq_ledger::store::Store::open(&cfg.resolve(&cfg.node.store)).unwrap();
        let audit = std::sync::Arc::new(fedq_node::service::open_audit(cfg, &store).unwrap());
        let ledger = fedq_ledger::ledger::Ledger::new(store, audit);
        assert_eq!(
            ledger
                .grant("alice", "cases", 1.5, Default::default())
                .unwrap(),
            1.5
        );
    }
    fed.start_node(0).await;
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    let b = alice
        .budget(BudgetRequest {})
        .await
        .unwrap()
        .into_inner()
        .budgets[0]
        .clone();
    assert!(
        (b.remaining_for_analyst - 4.5).abs() < 1e-9,
        "3.0 configured + 1.5 granted: {b:?}"
    );
    let (text, entries, key) = fed.pull_audit(0).await;
    verify(&text, &parse_public_key(&key).unwrap(), 0, None).unwrap();
    let kinds: Vec<&str> = entries.iter().map(|e| e.event.kind()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "node_started").count(),
        3,
        "{kinds:?}"
    );
    let change = entries
        .iter()
        .find_map(|e| match &e.event {
            Event::LimitsChanged { before, after, .. } => Some((before.clone(), after.clone())),
            _ => None,
        })
        .expect("the limit change is logged");
    assert_eq!(change.0.map(|b| b.per_analyst.value()), Some(1000.0));
    assert_eq!(change.1.per_analyst.value(), 3.0);
    assert!(kinds.contains(&"budget_granted"));
}
