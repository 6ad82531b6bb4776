//! `fedq-store-growth`: how much a node's store grows per answered query,
//! and how much the replay window takes back (issue 16, bounded storage).
//!
//! Starts one real node (in this process, over mutual TLS on loopback),
//! answers `--queries` queries (the three benchmark shapes of
//! `fedq-loadgen` in turn: a filtered COUNT, a two-column GROUP BY, an
//! AVG), stops it, and measures the store's logical contents (key and
//! value bytes, by tree and key prefix) and its size on disk; then removes
//! every stored answer as the sweeper does once the replay window has
//! passed (`Ledger::expire_releases`) and measures again.
//!
//! Run: `cargo run --release -p fedq-tests --bin fedq-store-growth --
//! --queries 5000`.

use std::collections::BTreeMap;
use std::path::Path;

use clap::Parser;
use fedq_engine::synth::Partner;
use fedq_ledger::ledger::Ledger;
use fedq_ledger::store::Store;
use fedq_pki::Role;
use fedq_proto::v1::QueryRequest;
use fedq_tests::{roomy_budget, TestFederation};

/// The benchmark queries of `fedq-loadgen`, used in turn.
const QUERIES: [&str; 3] = [
    "SELECT COUNT(*) FROM cases WHERE isForcedLabour = 1 AND yearOfRegistration >= 2015",
    "SELECT gender, ageBroad, COUNT(*) FROM cases WHERE isSexualExploit = 1 GROUP BY gender, ageBroad",
    "SELECT AVG(traffickMonths) FROM cases WHERE isForcedLabour = 1",
];

#[derive(Parser)]
#[command(
    name = "fedq-store-growth",
    about = "A node store's growth per query, before and after the replay window"
)]
struct Cli {
    /// Queries to answer.
    #[arg(long, default_value_t = 3000)]
    queries: usize,
    /// Rows of the node's synthetic dataset.
    #[arg(long, default_value_t = 10_000)]
    rows: usize,
}

/// Bytes of keys and values, and how many keys, by a tree's key prefix.
type Tally = BTreeMap<String, (u64, u64)>;

/// The part of a key that names its kind: up to the first `/` (ledger
/// keys), or the whole tree for trees whose keys are numbers.
fn kind(tree: &str, key: &[u8]) -> String {
    match tree {
        "ledger" => {
            let k = String::from_utf8_lossy(key);
            let kind = k.split('/').next().unwrap_or_default().to_string();
            format!("ledger {kind}/")
        }
        _ => tree.to_string(),
    }
}

/// The ledger's and the audit log's contents (the data tree holds the
/// rows, which queries do not change).
fn tally(store: &Store) -> anyhow::Result<Tally> {
    let mut t = Tally::new();
    for (name, tree) in [("ledger", &store.ledger), ("audit", &store.audit)] {
        for item in tree.iter() {
            let (k, v) = item?;
            let e = t.entry(kind(name, &k)).or_default();
            e.0 += (k.len() + v.len()) as u64;
            e.1 += 1;
        }
    }
    Ok(t)
}

fn disk_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        n += if m.is_dir() {
            disk_bytes(&e.path())
        } else {
            m.len()
        };
    }
    n
}

fn print(label: &str, t: &Tally, queries: usize) {
    println!("{label}:");
    let mut total = 0;
    for (k, (bytes, keys)) in t {
        total += bytes;
        println!(
            "  {k:<16} {keys:>8} keys {bytes:>12} bytes  {:>8.1} bytes/query",
            *bytes as f64 / queries as f64
        );
    }
    println!(
        "  {:<16} {:>8}      {total:>12} bytes  {:>8.1} bytes/query",
        "total",
        "",
        total as f64 / queries as f64
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut fed = TestFederation::start(&[(Partner::Ngo, cli.rows, 1)], roomy_budget()).await;
    fed.stop_node(0).await;
    // A load, not a flood: the per-analyst rate limit admits it.
    fed.nodes[0].config.limits.queries_per_minute = 1_000_000;
    let config = fed.nodes[0].config.clone();
    let store_dir = config.resolve(&config.node.store);
    let before = tally(&Store::open(&store_dir)?)?;
    let disk_before = disk_bytes(&store_dir);
    fed.start_node(0).await;
    let (cert, key) = fed.client_cert(Role::Analyst, "alice");
    let mut client = fedq_tests::connect(
        &fed.nodes[0],
        &fed.dir.path().join("ca/ca.pem"),
        &cert,
        &key,
    )
    .await?;
    let began = std::time::Instant::now();
    for i in 0..cli.queries {
        client
            .query(QueryRequest {
                query_id: format!("growth-{i:08}"),
                sql: QUERIES[i % QUERIES.len()].into(),
                epsilon: 0.01,
                dry_run: false,
                rho: 0.0,
            })
            .await?;
    }
    let took = began.elapsed();
    fed.stop_node(0).await;
    let diff = |after: &Tally| -> Tally {
        after
            .iter()
            .map(|(k, &(b, n))| {
                let (b0, n0) = before.get(k).copied().unwrap_or_default();
                (k.clone(), (b.saturating_sub(b0), n.saturating_sub(n0)))
            })
            .filter(|(_, (b, n))| *b > 0 || *n > 0)
            .collect()
    };
    println!(
        "{} queries answered in {:.1} s ({:.0} q/s), one node, {} rows",
        cli.queries,
        took.as_secs_f64(),
        cli.queries as f64 / took.as_secs_f64(),
        cli.rows
    );
    let store = Store::open(&store_dir)?;
    let audit = fedq_node::service::open_audit(&config, &store)?;
    let grown = tally(&store)?;
    print(
        "added by the queries, within the replay window",
        &diff(&grown),
        cli.queries,
    );
    let ledger = Ledger::new(store.clone(), std::sync::Arc::new(audit));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let removed = ledger.expire_releases(now + 1)?;
    store.flush()?;
    let after = tally(&store)?;
    println!("{removed} stored answers removed (the replay window passed)");
    print(
        "kept for ever, after the replay window",
        &diff(&after),
        cli.queries,
    );
    drop(ledger);
    drop(store);
    let disk_after = disk_bytes(&store_dir);
    println!(
        "store on disk: {} bytes before the queries, {} after the queries and the removal ({:.0} bytes/query; sled reclaims space in whole segments as it rewrites them)",
        disk_before,
        disk_after,
        (disk_after as f64 - disk_before as f64) / cli.queries as f64
    );
    Ok(())
}
