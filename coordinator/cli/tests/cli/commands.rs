//! The real binaries, as a researcher and a partner use them: `fedq demo`,
//! then `fedq-node serve` for each demo node and `fedq schema | query |
//! budget` against them, plus what bad input at the command line gives.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fedq_cli::demo::QUERIES;
use serde_json::Value;

/// The demo's nodes, in federation order.
const NODES: [&str; 3] = ["ngo-north", "hotline-central", "casework-south"];

/// The node that `fedq demo` stops to show a partial result.
const STOPPED_IN_DEMO: &str = "hotline-central";

const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

fn fedq() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_fedq"))
}

/// The `fedq-node` binary (another package of the workspace): a sibling of
/// `fedq`, built first if it is missing or older than its sources.
fn fedq_node() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = fedq().with_file_name(format!("fedq-node{}", std::env::consts::EXE_SUFFIX));
        if !path.exists() || older_than_sources(&path) {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "-p", "fedq-node", "--bin", "fedq-node"])
                .current_dir(WORKSPACE)
                .status()
                .expect("run cargo build for fedq-node");
            assert!(status.success(), "building fedq-node failed");
        }
        assert!(path.exists(), "no fedq-node binary at {}", path.display());
        path
    })
}

/// Whether any source of the node (or the protocol) changed after `bin` was built.
fn older_than_sources(bin: &Path) -> bool {
    fn newest(dir: &Path) -> std::time::SystemTime {
        let mut t = std::time::UNIX_EPOCH;
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p = e.path();
                let m = if p.is_dir() {
                    newest(&p)
                } else {
                    e.metadata().and_then(|m| m.modified()).unwrap_or(t)
                };
                t = t.max(m);
            }
        }
        t
    }
    let built = std::fs::metadata(bin)
        .and_then(|m| m.modified())
        .unwrap_or(std::time::UNIX_EPOCH);
    let root = Path::new(WORKSPACE);
    [
        "node",
        "proto/src",
        "proto/fedq",
        "proto/Cargo.toml",
        "Cargo.lock",
    ]
    .iter()
    .map(|p| {
        let p = root.join(p);
        if p.is_dir() {
            newest(&p)
        } else {
            std::fs::metadata(&p)
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH)
        }
    })
    .any(|t| t > built)
}

/// What a finished command gave.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status.code(),
            self.stdout,
            self.stderr
        )
    }
}

/// Runs `bin args` to completion, killing it (and failing) after `limit`.
fn run(bin: &Path, args: &[&str], limit: Duration) -> Run {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).unwrap();
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} {args:?} did not finish within {limit:?}\n--- stdout\n{}\n--- stderr\n{}",
                bin.display(),
                out.join().unwrap(),
                err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Run {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// Runs `fedq demo --dir dir` and checks it finished well.
fn run_demo(dir: &Path) -> Run {
    let started = Instant::now();
    let r = run(
        fedq(),
        &["demo", "--dir", path_str(dir)],
        Duration::from_secs(600),
    );
    assert_eq!(
        r.code(),
        Some(0),
        "fedq demo failed after {:?}:\n{r}",
        started.elapsed()
    );
    eprintln!("fedq demo took {:.1} s", started.elapsed().as_secs_f64());
    r
}

/// `fedq-node serve` children, killed when dropped (also on panic).
struct Nodes {
    children: Vec<(String, Child)>,
}

impl Nodes {
    fn start(dir: &Path) -> Nodes {
        let mut nodes = Nodes {
            children: Vec::new(),
        };
        for name in NODES {
            let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
            let child = Command::new(fedq_node())
                .args([
                    "serve",
                    "--config",
                    path_str(&dir.join(name).join("node.toml")),
                ])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start fedq-node serve");
            nodes.children.push((name.to_string(), child));
        }
        nodes
    }

    fn kill(&mut self, name: &str) {
        let i = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .expect("a running node");
        let (_, mut child) = self.children.remove(i);
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops a node gracefully (SIGTERM) and returns how it exited.
    fn terminate(&mut self, name: &str) -> ExitStatus {
        let i = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .expect("a running node");
        let (_, mut child) = self.children.remove(i);
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {name} failed");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > Duration::from_secs(15) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{name} did not stop within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fails if a node exited on its own (port taken, store locked, ...).
    fn assert_running(&mut self, dir: &Path) {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait().unwrap() {
                let log =
                    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
                panic!("fedq-node serve for {name} exited with {status}:\n{log}");
            }
        }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The lines of a node status list (`  <node>  <status> ...`) in `text`.
fn status_line<'a>(text: &'a str, node: &str) -> Option<&'a str> {
    text.lines()
        .find(|l| l.trim_start().starts_with(&format!("{node} ")))
}

#[test]
fn demo_runs_every_example_and_leaves_a_usable_federation() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_demo(dir.path());
    let out = &r.stdout;

    // Every example query's result, in order, each with its table and every
    // node answering; then the partial result with one node stopped.
    let partial_at = out
        .find("to show a partial result")
        .unwrap_or_else(|| panic!("no partial-result section:\n{r}"));
    let (full, partial) = out.split_at(partial_at);
    let mut sections = Vec::new();
    let mut from = 0;
    for (sql, epsilon) in QUERIES {
        let at = from
            + full[from..]
                .find(sql)
                .unwrap_or_else(|| panic!("example {sql:?} not shown (in order):\n{r}"));
        sections.push((sql, epsilon, at));
        from = at + sql.len();
    }
    for (k, &(sql, epsilon, at)) in sections.iter().enumerate() {
        let end = sections.get(k + 1).map(|s| s.2).unwrap_or(full.len());
        let s = &full[at..end];
        assert!(
            s.contains("95% CI"),
            "no table with a 95% CI for {sql:?}:\n{s}"
        );
        assert!(s.contains(&format!("epsilon {epsilon} per node")), "{s}");
        assert!(s.contains("3/3 nodes answered"), "{s}");
        assert!(!s.contains("PARTIAL RESULT"), "{s}");
        for node in NODES {
            let line = status_line(s, node)
                .unwrap_or_else(|| panic!("no status line for {node} in:\n{s}"));
            assert!(
                line.contains("answered"),
                "{node} did not answer {sql:?}: {line}"
            );
        }
    }
    let (sql0, _) = QUERIES[0];
    assert!(partial.contains(sql0), "{partial}");
    assert!(
        partial.contains("PARTIAL RESULT") && partial.contains("2/3 nodes answered"),
        "{partial}"
    );
    assert!(partial.contains("95% CI"), "{partial}");
    for node in NODES {
        let line = status_line(partial, node)
            .unwrap_or_else(|| panic!("no status line for {node} in:\n{partial}"));
        if node == STOPPED_IN_DEMO {
            assert!(line.contains("unreachable"), "{line}");
        } else {
            assert!(line.contains("answered"), "{line}");
        }
    }
    assert!(out.trim_end().ends_with("all nodes stopped."), "{r}");

    // The federation it leaves behind.
    assert!(dir.path().join("federation.toml").is_file());
    for node in NODES {
        let toml = dir.path().join(node).join("node.toml");
        assert!(toml.is_file(), "{} missing", toml.display());
    }
    let config = dir.path().join("ngo-north/node.toml");
    let check = run(
        fedq_node(),
        &["check", "--config", path_str(&config)],
        Duration::from_secs(60),
    );
    assert_eq!(check.code(), Some(0), "{check}");
    assert!(check.stdout.contains("OK"), "{check}");
}

fn json(r: &Run) -> Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{r}"))
}

/// The `spent_by_you` of every node in `fedq budget --output json`, after
/// checking that every object has the documented snake_case keys and that
/// its amounts are JSON numbers (not strings).
fn spent_by_node(v: &Value) -> Vec<(String, f64)> {
    v.as_array()
        .expect("an array of budgets")
        .iter()
        .map(|b| {
            let keys: Vec<&str> = b
                .as_object()
                .unwrap_or_else(|| panic!("not an object: {b}"))
                .keys()
                .map(String::as_str)
                .collect();
            for key in &keys {
                assert!(
                    key.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                    "key {key:?} is not snake_case in {b}"
                );
            }
            for key in [
                "spent_by_you",
                "remaining_for_you",
                "remaining_for_dataset",
                "per_query_max",
                "spent_epsilon",
                "spent_delta",
            ] {
                assert!(b[key].is_number(), "{key} is not a JSON number in {b}");
            }
            assert_eq!(b["measure"], "pure", "{b}");
            (
                b["node"].as_str().unwrap().to_string(),
                b["spent_by_you"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn nodes_served_by_hand_answer_fedq_query_schema_and_budget() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let demo = run_demo(d);
    let fed_toml = d.join("federation.toml");
    let fed = path_str(&fed_toml);
    let quick = Duration::from_secs(60);

    // Ingest runs on a stopped node. A bad row fails with file:line.
    let ngo_config = d.join("ngo-north/node.toml");
    let ngo_csv = d.join("ngo-north/cases.csv");
    let text = std::fs::read_to_string(&ngo_csv).unwrap();
    let mut lines: Vec<String> = text.lines().take(20).map(str::to_string).collect();
    let gender = lines[0].split(',').position(|h| h == "gender").unwrap();
    let mut cells: Vec<String> = lines[6].split(',').map(str::to_string).collect();
    cells[gender] = "Femal".into();
    lines[6] = cells.join(",");
    let bad = d.join("bad.csv");
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let ingest = |csv: &Path| {
        run(
            fedq_node(),
            &[
                "ingest",
                "--config",
                path_str(&ngo_config),
                "--dataset",
                "cases",
                "--csv",
                path_str(csv),
            ],
            quick,
        )
    };
    let r = ingest(&bad);
    assert_eq!(r.code(), Some(1), "{r}");
    assert!(
        r.stderr.contains(&format!("{}:7:", bad.display())),
        "no file:line in stderr:\n{r}"
    );
    assert!(r.stderr.contains("gender"), "{r}");
    // The file the demo ingested is refused a second time.
    let r = ingest(&ngo_csv);
    assert_eq!(r.code(), Some(1), "{r}");
    assert!(r.stderr.contains("already ingested"), "{r}");

    // Serve the demo nodes by hand, on the ports in their node.toml.
    let mut nodes = Nodes::start(d);
    let schema = wait_for_schema(fed, &mut nodes, d);
    assert!(
        schema.stdout.contains("traffickMonths") && schema.stdout.contains("0 .. 120"),
        "{schema}"
    );
    for node in NODES {
        assert!(schema.stdout.contains(&format!("node {node}")), "{schema}");
    }

    // A query with JSON output: every declared gender plus (missing).
    let sql = "SELECT gender, COUNT(*) FROM cases GROUP BY gender";
    let query = |extra: &[&str], sql: &str| {
        let mut args = vec!["query", "--federation", fed];
        args.extend_from_slice(extra);
        args.push(sql);
        run(fedq(), &args, quick)
    };
    let r = query(&["--epsilon", "0.5", "--output", "json"], sql);
    assert_eq!(r.code(), Some(0), "{r}");
    let v = json(&r);
    assert_eq!(v["partial"], Value::Bool(false), "{r}");
    assert_eq!(v["epsilon"].as_f64(), Some(0.5));
    let rows = v["rows"].as_array().expect("rows");
    let mut keys: Vec<&str> = rows
        .iter()
        .map(|row| row["key"][0].as_str().unwrap())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "(missing)",
            "Female",
            "Male",
            "Trans/Transgender/NonConforming"
        ],
        "{r}"
    );
    for row in rows {
        assert_eq!(row["nodes"].as_array().unwrap().len(), 3, "{row}");
        let e = &row["estimates"][0];
        let (lo, val, hi) = (
            e["ci_low"].as_f64().unwrap(),
            e["value"].as_f64().unwrap(),
            e["ci_high"].as_f64().unwrap(),
        );
        assert!(lo < val && val < hi, "{row}");
    }
    for n in v["nodes"].as_array().unwrap() {
        assert_eq!(n["status"], "answered", "{n}");
        assert_eq!(n["epsilon_spent"].as_f64(), Some(0.5), "{n}");
    }

    // CSV output.
    let r = query(&["--epsilon", "0.5", "--output", "csv"], sql);
    assert_eq!(r.code(), Some(0), "{r}");
    let mut lines = r.stdout.lines();
    assert!(
        lines.next().unwrap_or("").starts_with("gender,COUNT(*)"),
        "{r}"
    );
    assert_eq!(lines.count(), 4, "{r}");

    // A retry with the same --query-id replays the release and spends nothing.
    let retry = [
        "--epsilon",
        "0.5",
        "--output",
        "json",
        "--query-id",
        "cli-retry-1",
    ];
    let first = json(&query(&retry, sql));
    let again_run = query(&retry, sql);
    assert_eq!(again_run.code(), Some(0), "{again_run}");
    let again = json(&again_run);
    assert_eq!(
        again["rows"], first["rows"],
        "a retry must return the same release"
    );
    for n in again["nodes"].as_array().unwrap() {
        assert_eq!(n["replayed"], Value::Bool(true), "{n}");
        assert_eq!(n["status"], "answered (replayed)", "{n}");
        assert!(n.get("epsilon_spent").is_none(), "{n}");
    }

    // Bad input: rejected with exit 1 and a message, nothing spent.
    for eps in ["NaN", "-1", "0", "inf"] {
        let r = query(&["--epsilon", eps], "SELECT COUNT(*) FROM cases");
        assert_eq!(r.code(), Some(1), "--epsilon {eps}: {r}");
        assert!(r.stderr.contains("epsilon"), "--epsilon {eps}: {r}");
    }
    let r = query(&["--epsilon", "0.5"], "SELEC COUNT(*) FROM cases");
    assert_eq!(r.code(), Some(1), "{r}");
    assert!(r.stderr.contains("syntax"), "{r}");
    // Above the nodes' per-query maximum (2.0): refused by every node.
    let r = query(&["--epsilon", "2.5"], "SELECT COUNT(*) FROM cases");
    assert_eq!(r.code(), Some(1), "{r}");
    assert!(r.stderr.contains("per-query maximum"), "{r}");
    // A bad command line is exit 2.
    let r = run(
        fedq(),
        &["query", "--federation", fed, "SELECT COUNT(*) FROM cases"],
        quick,
    );
    assert_eq!(r.code(), Some(2), "missing --epsilon: {r}");

    // The budget: the demo's queries (the last one without the node it
    // stopped) plus the three releases above at 0.5 each.
    let demo_spent: f64 = QUERIES.iter().map(|q| q.1).sum();
    let expected = |node: &str| {
        demo_spent
            + if node == STOPPED_IN_DEMO {
                0.0
            } else {
                QUERIES[0].1
            }
            + 1.5
    };
    let r = run(
        fedq(),
        &["budget", "--federation", fed, "--output", "json"],
        quick,
    );
    assert_eq!(r.code(), Some(0), "{r}");
    let spent = spent_by_node(&json(&r));
    assert_eq!(
        spent.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
        NODES
    );
    for (node, s) in &spent {
        assert!(
            (s - expected(node)).abs() < 1e-9,
            "{node}: spent {s}, expected {}:\n{r}",
            expected(node)
        );
    }
    let table = run(fedq(), &["budget", "--federation", fed], quick);
    assert_eq!(table.code(), Some(0), "{table}");
    for node in NODES {
        let line = table
            .stdout
            .lines()
            .find(|l| l.contains(node))
            .unwrap_or_else(|| panic!("{table}"));
        assert!(line.contains(&format!("{:.4}", expected(node))), "{line}");
    }

    // One node down: a partial result, exit 3, naming it.
    nodes.kill("casework-south");
    let r = query(&["--epsilon", "0.5", "--timeout", "10"], sql);
    assert_eq!(r.code(), Some(3), "{r}");
    assert!(
        r.stdout.contains("PARTIAL RESULT") && r.stdout.contains("2/3 nodes answered"),
        "{r}"
    );
    let line = status_line(&r.stdout, "casework-south").unwrap_or_else(|| panic!("{r}"));
    assert!(line.contains("unreachable"), "{line}");
    let r = run(
        fedq(),
        &["budget", "--federation", fed, "--output", "json"],
        quick,
    );
    assert_eq!(r.code(), Some(3), "{r}");

    // SIGTERM stops a node gracefully (exit 0) and releases its store: a new
    // file can be ingested, and the nodes served again still know what was
    // spent (casework-south too, which was killed outright).
    for node in ["ngo-north", "hotline-central"] {
        let status = nodes.terminate(node);
        let log = std::fs::read_to_string(d.join(format!("{node}.log"))).unwrap_or_default();
        assert!(
            status.success(),
            "{node} exited with {status} on SIGTERM:\n{log}"
        );
    }
    drop(nodes);
    let more = d.join("more.csv");
    let r = run(
        fedq_node(),
        &[
            "synth",
            "--partner",
            "ngo",
            "--rows",
            "500",
            "--seed",
            "99",
            "--out",
            path_str(&more),
        ],
        quick,
    );
    assert_eq!(r.code(), Some(0), "{r}");
    let demo_rows: u64 = demo
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("ngo-north ") && l.contains("synthetic rows ingested"))
        .and_then(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "synthetic")?;
            words.get(at.checked_sub(1)?)?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no ingest line for ngo-north in the demo's output:\n{demo}"));
    let r = ingest(&more);
    assert_eq!(r.code(), Some(0), "{r}");
    assert!(
        r.stdout.contains(&format!(
            "ingested 500 rows into \"cases\" ({} rows in total)",
            demo_rows + 500
        )),
        "{r}"
    );

    let mut nodes = Nodes::start(d);
    wait_for_schema(fed, &mut nodes, d);
    let r = run(
        fedq(),
        &["budget", "--federation", fed, "--output", "json"],
        quick,
    );
    assert_eq!(r.code(), Some(0), "{r}");
    for (node, s) in spent_by_node(&json(&r)) {
        let want = expected(&node) + if node == "casework-south" { 0.0 } else { 0.5 };
        assert!(
            (s - want).abs() < 1e-9,
            "{node} after restart: spent {s}, expected {want}:\n{r}"
        );
    }
    drop(nodes);
}

/// Runs `fedq schema` until every node answers (at most 20 s) and returns
/// the successful run.
fn wait_for_schema(fed: &str, nodes: &mut Nodes, dir: &Path) -> Run {
    let started = Instant::now();
    loop {
        let r = run(
            fedq(),
            &["schema", "--federation", fed],
            Duration::from_secs(60),
        );
        if r.code() == Some(0) {
            eprintln!("nodes up after {:.1} s", started.elapsed().as_secs_f64());
            return r;
        }
        nodes.assert_running(dir);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the nodes did not all answer `fedq schema` within 20 s:\n{r}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
