//! `fedq-loadgen`: end-to-end latency and throughput of a fedq federation,
//! over real mutual-TLS gRPC, with the real coordinator library.
//!
//! Three ways to use it (see `--help` of each):
//!
//! - `local`: generate N synthetic partner datasets, ingest each into its
//!   own store (timed), start the nodes in this process (timed, store to
//!   ready), restart one (timed), then measure.
//! - `prepare`: the same data, certificates, `node.toml`s and a
//!   `federation.toml` written to a directory, for real `fedq-node serve`
//!   processes (whose memory can then be read from `/proc/<pid>/status`).
//! - `run`: measure an existing federation from its `federation.toml`.
//!
//! What is measured:
//!
//! - *e2e*: one query at a time, fanned out to every node concurrently over
//!   warm connections (one `NodeClient` per node, kept open), the answers
//!   combined with `fedq::combine`. Also the same through
//!   `Federation::query`, which opens fresh connections per call.
//! - *throughput*: `--clients` concurrent clients against the first node,
//!   each over its own connection, mixing the three benchmark queries.
//!   `--mix` chooses the datasets and measures the clients query (pure DP
//!   on `cases` by default; zCDP on `cases_z`, or half the clients on each
//!   of two datasets), reported per part; `prepare --zcdp` declares them.
//!
//! Every query is a real release: it durably debits `--epsilon` (or, on a
//! zCDP dataset, `--rho`) from the analyst's budget on every node. Give the analyst enough budget, and (for
//! `run`) per-analyst `queries_per_minute` and `concurrent_queries` limits
//! that admit the load; `local` and `prepare` set them so.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand, ValueEnum};
use fedq::client::{new_query_id, Federation, Outcome};
use fedq::federation::{ClientTls, Defaults, FederationConfig, NodeEntry};
use fedq_dp::accounting::Measure;
use fedq_engine::synth::{self, Partner};
use fedq_node::config::BudgetLimits;
use fedq_pki::{Authority, Role};
use fedq_plan::schema::Schema;
use fedq_proto::v1::node_client::NodeClient;
use fedq_proto::v1::{DescribeRequest, QueryRequest};
use tokio::task::JoinSet;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The issue's benchmark queries, used in turn.
const QUERIES: [&str; 3] = [
    "SELECT COUNT(*) FROM cases WHERE isForcedLabour = 1 AND yearOfRegistration >= 2015",
    "SELECT gender, ageBroad, COUNT(*) FROM cases WHERE isSexualExploit = 1 GROUP BY gender, ageBroad",
    "SELECT AVG(traffickMonths) FROM cases WHERE isForcedLabour = 1",
];

/// The pure-DP dataset every node has (and the e2e queries use).
const PURE: &str = "cases";
/// A second pure-DP dataset over the same rows (`prepare --zcdp`).
const PURE_2: &str = "cases_p";
/// A zCDP dataset over the same rows (`prepare --zcdp`).
const ZCDP: &str = "cases_z";
/// The delta at which `cases_z` states its (epsilon, delta) equivalents.
const ZCDP_DELTA: f64 = 1e-7;

/// The throughput run's workload: which datasets its clients query, in
/// which measure. Clients are split evenly (client `c` takes part
/// `c % parts`) between the two parts of a `+` mix.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Mix {
    /// Every client queries `cases` (pure DP, `--epsilon`).
    #[default]
    Pure,
    /// Every client queries `cases_z` (zCDP, `--rho`).
    Zcdp,
    /// Half the clients query `cases`, half `cases_p` (both pure DP).
    #[value(name = "pure+pure")]
    PurePure,
    /// Half the clients query `cases` (pure DP), half `cases_z` (zCDP).
    #[value(name = "pure+zcdp")]
    PureZcdp,
}

impl Mix {
    /// The mix's parts, in order, with each query's cost.
    fn parts(self, epsilon: f64, rho: f64) -> Vec<Part> {
        let pure = |dataset| Part {
            dataset,
            epsilon,
            rho: 0.0,
        };
        let zcdp = Part {
            dataset: ZCDP,
            epsilon: 0.0,
            rho,
        };
        match self {
            Mix::Pure => vec![pure(PURE)],
            Mix::Zcdp => vec![zcdp],
            Mix::PurePure => vec![pure(PURE), pure(PURE_2)],
            Mix::PureZcdp => vec![pure(PURE), zcdp],
        }
    }

    /// The name `--mix` takes.
    fn name(self) -> &'static str {
        match self {
            Mix::Pure => "pure",
            Mix::Zcdp => "zcdp",
            Mix::PurePure => "pure+pure",
            Mix::PureZcdp => "pure+zcdp",
        }
    }
}

/// One part of a throughput mix: the dataset its clients query and what
/// each query costs (exactly one of `epsilon` and `rho` is positive).
#[derive(Clone, Copy, Debug)]
struct Part {
    dataset: &'static str,
    epsilon: f64,
    rho: f64,
}

impl Part {
    /// The `i`th benchmark query (in turn) on this part's dataset.
    fn request(&self, i: usize) -> QueryRequest {
        QueryRequest {
            rho: self.rho,
            ..request_on(i, self.dataset, self.epsilon)
        }
    }

    /// The dataset and the cost, in words.
    fn describe(&self) -> String {
        if self.rho > 0.0 {
            format!("{}, zCDP, rho {}", self.dataset, self.rho)
        } else {
            format!("{}, pure DP, epsilon {}", self.dataset, self.epsilon)
        }
    }
}

#[derive(Parser)]
#[command(
    name = "fedq-loadgen",
    about = "End-to-end latency and throughput of a fedq federation",
    after_help = "Examples:\n  fedq-loadgen local --nodes 3 --rows 1000000\n  fedq-loadgen prepare --dir /tmp/fed --nodes 1 --rows 1000000\n  fedq-loadgen run --federation /tmp/fed/federation.toml --queries 1000"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How hard to push.
#[derive(clap::Args, Clone)]
struct Load {
    /// Sequential end-to-end queries over warm connections.
    #[arg(long, default_value_t = 1000)]
    queries: usize,
    /// Sequential queries through `Federation::query` (fresh connections).
    #[arg(long, default_value_t = 100)]
    cold_queries: usize,
    /// Concurrent clients against the first node.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Duration of the throughput run, in seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Epsilon of each query (debited on every node).
    #[arg(long, default_value_t = 0.001)]
    epsilon: f64,
    /// Workload of the throughput run: `pure` (dataset `cases`, `--epsilon`),
    /// `zcdp` (dataset `cases_z`, `--rho`), or half the clients on each of
    /// two datasets, `pure+pure` (`cases` and `cases_p`) or `pure+zcdp`
    /// (`cases` and `cases_z`), reported per part. All but `pure` need the
    /// datasets of `prepare --zcdp`.
    #[arg(long, value_enum, default_value_t = Mix::Pure)]
    mix: Mix,
    /// Rho of each zCDP query of the throughput run (`--mix zcdp` or
    /// `pure+zcdp`; epsilon 0).
    #[arg(long, default_value_t = 0.0001)]
    rho: f64,
    /// Process id of the first node (a separate process, `run` only): the
    /// throughput run then reports the node's CPU time per query (Linux,
    /// from /proc/<pid>/stat).
    #[arg(long)]
    node_pid: Option<u32>,
}

#[derive(Subcommand)]
enum Command {
    /// Generate, ingest and start nodes in this process, then measure.
    Local {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Rows per node.
        #[arg(long, default_value_t = 1_000_000)]
        rows: usize,
        /// Work directory (default: a temporary one, deleted at the end).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        load: Load,
    },
    /// Write node directories and a federation.toml for real node processes.
    Prepare {
        /// Directory to create them in.
        #[arg(long)]
        dir: PathBuf,
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Rows per node.
        #[arg(long, default_value_t = 1_000_000)]
        rows: usize,
        /// Node i listens on 127.0.0.1:(base-port + i).
        #[arg(long, default_value_t = 7101)]
        base_port: u16,
        /// Also declare, over the same CSV (ingested into each), dataset
        /// `cases_p` (pure DP, the same budget as `cases`) and `cases_z`
        /// (`measure = "zcdp"`, a rho budget for long runs), for `run --mix`.
        #[arg(long)]
        zcdp: bool,
    },
    /// The coordinator's own cost of one query fanned out to every node of
    /// a federation (e.g. `fedq-simnode`'s, whose answers cost nothing):
    /// the first query (connections set up) and the rest, wall and process
    /// CPU time, the combine step, and this process's memory.
    Fanout {
        /// The federation file.
        #[arg(long)]
        federation: PathBuf,
        /// Queries after the first.
        #[arg(long, default_value_t = 20)]
        queries: usize,
        /// The query.
        #[arg(
            long,
            default_value = "SELECT gender, COUNT(*) FROM cases GROUP BY gender"
        )]
        sql: String,
        /// Epsilon of each query.
        #[arg(long, default_value_t = 0.1)]
        epsilon: f64,
        /// Two phases: a quorum of every node (Prepare, then Commit).
        #[arg(long)]
        two_phase: bool,
        /// Per-node deadline, seconds.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
    /// Measure an existing federation.
    Run {
        /// The federation file (its certificate must be an analyst's).
        #[arg(long)]
        federation: PathBuf,
        #[command(flatten)]
        load: Load,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // In-process nodes log through this (e.g. their per-stage timings with
    // RUST_LOG=fedq_node::timing=debug); quiet by default.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.command {
            Command::Local {
                nodes,
                rows,
                dir,
                load,
            } => {
                if load.node_pid.is_some() {
                    anyhow::bail!("--node-pid measures a node in its own process: `local` runs the nodes inside the load generator; use `prepare`, start the node, then `run --node-pid`");
                }
                local(nodes, rows, dir, load).await
            }
            Command::Prepare {
                dir,
                nodes,
                rows,
                base_port,
                zcdp,
            } => {
                std::fs::create_dir_all(&dir)?;
                let fed = prepare(&dir, nodes, rows, Some(base_port), zcdp)?;
                let path = dir.join("federation.toml");
                std::fs::write(&path, toml::to_string(&fed.federation)?)?;
                for n in &fed.nodes {
                    println!(
                        "start: fedq-node serve --config {}",
                        n.dir.join("node.toml").display()
                    );
                }
                println!("then:  fedq-loadgen run --federation {}", path.display());
                if zcdp {
                    println!("       (with --mix pure|zcdp|pure+pure|pure+zcdp)");
                }
                Ok(())
            }
            Command::Fanout {
                federation,
                queries,
                sql,
                epsilon,
                two_phase,
                timeout,
            } => {
                let fed = Federation::load(&federation)?;
                fanout(&fed, &sql, epsilon, queries, two_phase, timeout).await
            }
            Command::Run { federation, load } => {
                let fed = Federation::load(&federation)?;
                measure(&fed, &load).await
            }
        }
    })
}

/// A prepared node.
struct Prepared {
    dir: PathBuf,
    config: fedq_node::config::NodeConfig,
}

/// Prepared nodes and the analyst's federation file.
struct PreparedFederation {
    nodes: Vec<Prepared>,
    federation: FederationConfig,
}

/// `field` of /proc/self/status, in MB (VmRSS, VmHWM).
fn status_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// User + system CPU time of this process (Linux, /proc/self/stat).
fn own_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let Some(end) = stat.rfind(')') else {
        return Duration::ZERO;
    };
    let f: Vec<&str> = stat[end + 2..].split_whitespace().collect();
    let ticks = f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// The coordinator's cost per query over the whole federation: see
/// `Command::Fanout`.
async fn fanout(
    fed: &Federation,
    sql: &str,
    epsilon: f64,
    queries: usize,
    two_phase: bool,
    timeout: f64,
) -> anyhow::Result<()> {
    let n = fed.config.nodes.len();
    let opts = || fedq::run::QueryOptions {
        secure: false,
        epsilon,
        rho: 0.0,
        dry_run: false,
        calls: fedq::client::Calls {
            timeout: Duration::from_secs_f64(timeout),
            retries: 1,
        },
        min_nodes: two_phase.then_some(n),
        query_id: new_query_id(),
    };
    println!(
        "fan-out to {n} nodes, {}: {sql:?} at epsilon {epsilon}; RSS before {:.1} MB",
        if two_phase {
            "two phases (quorum of all)"
        } else {
            "one phase"
        },
        status_mb("VmRSS:")
    );
    let (mut wall, mut cpu, mut comb) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..=queries {
        let o = opts();
        let (t, c) = (Instant::now(), own_cpu());
        let outcomes = fedq::run::run_query(fed, sql, &o)
            .await
            .map_err(|e| anyhow::anyhow!("query {i}: {e}"))?;
        let called = t.elapsed();
        let tc = Instant::now();
        let combined = fedq::combine::combine(sql, &o.query_id, epsilon, &outcomes);
        let combine = tc.elapsed();
        let (w, c) = (t.elapsed(), own_cpu() - c);
        let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
        if i == 0 || failed > 0 {
            println!(
                "query {i}: {:.1} ms wall ({:.1} ms calls, {:.2} ms combine), {:.0} ms CPU, {failed} of {n} nodes failed{}",
                w.as_secs_f64() * 1e3,
                called.as_secs_f64() * 1e3,
                combine.as_secs_f64() * 1e3,
                c.as_secs_f64() * 1e3,
                outcomes
                    .iter()
                    .find_map(|o| o.result.as_ref().err())
                    .map(|f| format!(" (first: {f})"))
                    .unwrap_or_default()
            );
        }
        assert_eq!(combined.nodes.len(), n);
        if i > 0 {
            wall.push(w);
            cpu.push(c);
            comb.push(combine);
        }
    }
    let ms = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    let mean_cpu = cpu.iter().sum::<Duration>().as_secs_f64() * 1e3 / cpu.len().max(1) as f64;
    println!(
        "warm, {queries} queries: wall p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms; combine p50 {:.2} ms; coordinator CPU {:.0} ms per query (mean); RSS {:.1} MB, peak {:.1} MB",
        ms(&mut wall, 0.5),
        ms(&mut wall, 0.95),
        ms(&mut wall, 1.0),
        ms(&mut comb, 0.5),
        mean_cpu,
        status_mb("VmRSS:"),
        status_mb("VmHWM:")
    );
    Ok(())
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Generates each node's data, ingests it (printing the rate) and writes
/// its config; writes an analyst certificate and the federation file. With
/// `zcdp`, each node also has datasets `cases_p` (pure) and `cases_z`
/// (zCDP) over the same CSV.
fn prepare(
    dir: &Path,
    nodes: usize,
    rows: usize,
    base_port: Option<u16>,
    zcdp: bool,
) -> anyhow::Result<PreparedFederation> {
    let ca = Authority::generate("fedq-loadgen CA")?;
    ca.pem.write(&dir.join("ca"), "ca")?;
    let budget = BudgetLimits {
        keys_delta: None,
        keys_delta_per_analyst: None,
        keys_delta_total: None,
        per_analyst: 1e6,
        total: 1e7,
        per_query_max: 10.0,
        measure: Default::default(),
        delta: None,
    };
    // Rho: 1e3 is ten million queries at the default `--rho`.
    let zcdp_budget = BudgetLimits {
        per_analyst: 1e3,
        total: 1e4,
        per_query_max: 10.0,
        measure: Measure::Zcdp,
        delta: Some(ZCDP_DELTA),
        ..budget
    };
    let partners = Partner::ALL;
    let mut prepared = Vec::new();
    for i in 0..nodes {
        let name = format!("node-{i}");
        let node_dir = dir.join(&name);
        std::fs::create_dir_all(&node_dir)?;
        let csv = node_dir.join("cases.csv");
        synth::write_csv(
            partners[i % partners.len()],
            rows,
            i as u64 + 1,
            std::fs::File::create(&csv)?,
        )?;
        let mut config = fedq_tests::node_config(&ca, &node_dir, &name, budget);
        // One analyst sends every query here: lift the per-analyst rate and
        // concurrency limits, which would otherwise refuse the load itself.
        config.limits.queries_per_minute = 10_000_000;
        config.limits.concurrent_queries = 1024;
        if let Some(p) = base_port {
            config.node.listen = format!("127.0.0.1:{}", p + i as u16).parse()?;
        }
        if zcdp {
            let base = config.datasets[0].clone();
            for (dataset, budget) in [(PURE_2, budget), (ZCDP, zcdp_budget)] {
                let mut d = base.clone();
                d.name = dataset.into();
                d.budget = budget;
                config.datasets.push(d);
            }
        }
        let size = std::fs::metadata(&csv)?.len();
        for d in &config.datasets {
            let schema = Schema::from_specs(&d.name, &d.columns).map_err(anyhow::Error::msg)?;
            let start = Instant::now();
            {
                let store = fedq_ledger::store::Store::open(&config.resolve(&config.node.store))?;
                fedq_node::ingest::ingest_csv(&store, &d.name, &schema, &csv, false)?;
            }
            let secs = start.elapsed().as_secs_f64();
            let label = if d.name == PURE {
                name.clone()
            } else {
                format!("{name}, dataset {}", d.name)
            };
            println!(
                "{label}: ingested {rows} rows ({:.1} MB of CSV) in {secs:.2} s = {:.0} rows/s",
                size as f64 / 1e6,
                rows as f64 / secs
            );
        }
        std::fs::write(node_dir.join("node.toml"), toml::to_string(&config)?)?;
        prepared.push(Prepared {
            dir: node_dir,
            config,
        });
    }
    let clients = dir.join("clients");
    ca.issue(Role::Analyst, "loadgen")?
        .write(&clients, "loadgen")?;
    let federation = FederationConfig {
        tls: ClientTls {
            ca: "ca/ca.pem".into(),
            cert: "clients/loadgen.pem".into(),
            key: "clients/loadgen.key".into(),
            crl: None,
        },
        defaults: Defaults {
            timeout_secs: 30.0,
            ..Defaults::default()
        },
        nodes: prepared
            .iter()
            .map(|n| NodeEntry {
                name: n.config.node.name.clone(),
                endpoint: format!("https://{}", n.config.node.listen),
            })
            .collect(),
        base_dir: dir.to_path_buf(),
    };
    Ok(PreparedFederation {
        nodes: prepared,
        federation,
    })
}

/// Starts a node in this process and waits until it answers `Describe`.
async fn start_ready(
    config: fedq_node::config::NodeConfig,
    fed: &FederationConfig,
) -> anyhow::Result<(fedq_node::server::RunningNode, Duration)> {
    let start = Instant::now();
    let running = fedq_node::server::start(config).await?;
    let entry = NodeEntry {
        name: running.name.clone(),
        endpoint: format!("https://{}", running.addr),
    };
    let mut client = connect(fed, &entry).await?;
    client.describe(DescribeRequest {}).await?;
    Ok((running, start.elapsed()))
}

async fn local(nodes: usize, rows: usize, dir: Option<PathBuf>, load: Load) -> anyhow::Result<()> {
    let tmp;
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            d
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    println!(
        "machine: {} cores; process RSS at start {:.0} MB",
        cores(),
        rss_mb()
    );
    let mut prepared = prepare(&dir, nodes, rows, None, load.mix != Mix::Pure)?;
    println!("RSS after generating and ingesting: {:.0} MB", rss_mb());
    let mut running = Vec::new();
    for n in &mut prepared.nodes {
        let before = rss_mb();
        let (r, ready) = start_ready(n.config.clone(), &prepared.federation).await?;
        println!(
            "{}: store to ready in {:.3} s; process RSS {:.0} MB (+{:.0} MB)",
            r.name,
            ready.as_secs_f64(),
            rss_mb(),
            rss_mb() - before
        );
        n.config.node.listen = r.addr;
        running.push(r);
    }
    prepared.federation.nodes = running
        .iter()
        .map(|r| NodeEntry {
            name: r.name.clone(),
            endpoint: format!("https://{}", r.addr),
        })
        .collect();
    // Restart the first node: stop, then store to ready again.
    let first = running.remove(0);
    first.stop().await?;
    let (r, ready) = start_ready(prepared.nodes[0].config.clone(), &prepared.federation).await?;
    println!(
        "{}: restarted, store to ready in {:.3} s",
        r.name,
        ready.as_secs_f64()
    );
    running.insert(0, r);
    let fed = Federation::from_config(prepared.federation.clone())?;
    measure(&fed, &load).await?;
    println!("process RSS at the end: {:.0} MB", rss_mb());
    for r in running {
        r.stop().await?;
    }
    Ok(())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A warm client to one node, with the federation's TLS settings.
async fn connect(fed: &FederationConfig, node: &NodeEntry) -> anyhow::Result<NodeClient<Channel>> {
    let read = |p: &Path| {
        let path = fed.resolve(p);
        std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&fed.tls.ca)?))
        .identity(Identity::from_pem(
            read(&fed.tls.cert)?,
            read(&fed.tls.key)?,
        ))
        .domain_name(node.name.clone());
    let channel = Endpoint::from_shared(node.endpoint.clone())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(60))
        .timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {}", node.endpoint))?;
    Ok(NodeClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}

fn request(i: usize, epsilon: f64) -> QueryRequest {
    request_on(i, PURE, epsilon)
}

/// The `i`th benchmark query (in turn) on `dataset`, costing `epsilon`.
fn request_on(i: usize, dataset: &str, epsilon: f64) -> QueryRequest {
    let sql = QUERIES[i % QUERIES.len()];
    QueryRequest {
        query_id: new_query_id(),
        sql: if dataset == PURE {
            sql.to_string()
        } else {
            sql.replace("FROM cases", &format!("FROM {dataset}"))
        },
        epsilon,
        ..Default::default()
    }
}

/// p50, p95, p99 and max of `samples`, in milliseconds.
fn summary(label: &str, mut samples: Vec<Duration>, wall: Duration) {
    samples.sort();
    let n = samples.len();
    if n == 0 {
        println!("{label}: no samples");
        return;
    }
    let q = |p: f64| samples[((p * n as f64).ceil() as usize).clamp(1, n) - 1].as_secs_f64() * 1e3;
    println!(
        "{label}: {n} queries, p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {:.0} queries/s",
        q(0.50),
        q(0.95),
        q(0.99),
        q(1.0),
        n as f64 / wall.as_secs_f64()
    );
}

async fn measure(fed: &Federation, load: &Load) -> anyhow::Result<()> {
    let cfg = &fed.config;
    let mut clients = Vec::new();
    for n in &cfg.nodes {
        clients.push(connect(cfg, n).await?);
    }
    // Warm-up: TLS sessions, HTTP/2 windows, the nodes' first allocations.
    for i in 0..30 {
        fan_out(&clients, &cfg.nodes, request(i, load.epsilon)).await?;
    }

    let mut samples = Vec::with_capacity(load.queries);
    let mut slowest = Vec::with_capacity(load.queries);
    let mut combining = Vec::with_capacity(load.queries);
    let wall = Instant::now();
    for i in 0..load.queries {
        let req = request(i, load.epsilon);
        let start = Instant::now();
        let outcomes = fan_out(&clients, &cfg.nodes, req.clone()).await?;
        let fanned = Instant::now();
        let combined = fedq::combine::combine(&req.sql, &req.query_id, req.epsilon, &outcomes);
        std::hint::black_box(&combined);
        samples.push(start.elapsed());
        combining.push(fanned.elapsed());
        slowest.push(outcomes.iter().map(|o| o.elapsed).max().unwrap_or_default());
    }
    let wall = wall.elapsed();
    summary(
        &format!("e2e warm, {} nodes, sequential", cfg.nodes.len()),
        samples,
        wall,
    );
    summary("  of which: slowest node's call", slowest, wall);
    summary("  of which: combine (coordinator CPU)", combining, wall);

    let mut samples = Vec::with_capacity(load.cold_queries);
    let wall = Instant::now();
    for i in 0..load.cold_queries {
        let req = request(i, load.epsilon);
        let start = Instant::now();
        let outcomes = fed.query(req.clone(), fed.default_timeout()).await;
        if let Some(o) = outcomes.iter().find(|o| o.result.is_err()) {
            return Err(anyhow!("{} failed: {:?}", o.node, o.result.as_ref().err()));
        }
        std::hint::black_box(fedq::combine::combine(
            &req.sql,
            &req.query_id,
            req.epsilon,
            &outcomes,
        ));
        samples.push(start.elapsed());
    }
    summary(
        "e2e via Federation::query (new connections per query)",
        samples,
        wall.elapsed(),
    );

    // Throughput: concurrent clients, each on its own connection, against
    // the first node; client c queries part c % parts of the mix.
    let node = &cfg.nodes[0];
    let parts = load.mix.parts(load.epsilon, load.rho);
    if load.clients > 0 {
        // Warm-up of each part's dataset and measure (the e2e warm-up only
        // queried `cases`).
        let mut client = clients[0].clone();
        for part in &parts {
            for i in 0..10 {
                part_query(&mut client, part, i).await?;
            }
        }
    }
    let cpu_before = load.node_pid.map(cpu_seconds).transpose()?;
    let deadline = Instant::now() + Duration::from_secs_f64(load.seconds);
    let mut set = JoinSet::new();
    let wall = Instant::now();
    for c in 0..load.clients {
        let p = c % parts.len();
        let part = parts[p];
        let mut client = connect(cfg, node).await?;
        set.spawn(async move {
            let mut samples = Vec::new();
            let mut i = c;
            while Instant::now() < deadline {
                let start = Instant::now();
                part_query(&mut client, &part, i).await?;
                samples.push(start.elapsed());
                i += 1;
            }
            Ok::<_, anyhow::Error>((p, samples))
        });
    }
    let mut per_part: Vec<Vec<Duration>> = vec![Vec::new(); parts.len()];
    while let Some(r) = set.join_next().await {
        let (p, samples) = r??;
        per_part[p].extend(samples);
    }
    let wall = wall.elapsed();
    let all: Vec<Duration> = per_part.iter().flatten().copied().collect();
    let answered = all.len();
    let mix = match load.mix {
        Mix::Pure => String::new(),
        m => format!(", mix {}", m.name()),
    };
    summary(
        &format!(
            "throughput, {} concurrent clients on {}, mixed queries{mix}",
            load.clients, node.name
        ),
        all,
        wall,
    );
    if parts.len() > 1 || load.mix != Mix::Pure {
        for (p, (part, samples)) in parts.iter().zip(per_part).enumerate() {
            let clients = (p..load.clients).step_by(parts.len()).count();
            summary(
                &format!("  part {}: {clients} clients on {}", p + 1, part.describe()),
                samples,
                wall,
            );
        }
    }
    if let (Some(pid), Some(before)) = (load.node_pid, cpu_before) {
        let used = cpu_seconds(pid)? - before;
        println!(
            "  {} CPU: {:.2} ms per query ({:.2} s over {answered} queries, {:.0}% of one core)",
            node.name,
            used * 1e3 / answered.max(1) as f64,
            used,
            used * 100.0 / wall.as_secs_f64()
        );
    }
    Ok(())
}

/// Sends the `i`th query of `part` over `client`; an error names the part
/// (a node without the mix's datasets, see `prepare --zcdp`, says which it
/// serves).
async fn part_query(client: &mut NodeClient<Channel>, part: &Part, i: usize) -> anyhow::Result<()> {
    client.query(part.request(i)).await.map_err(|s| {
        anyhow!(
            "query on {} failed: {:?}: {}",
            part.describe(),
            s.code(),
            s.message()
        )
    })?;
    Ok(())
}

/// CPU time (user + system, all threads) process `pid` has used, in
/// seconds: fields 14 and 15 of /proc/<pid>/stat, in USER_HZ ticks (100 per
/// second on Linux).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| {
        format!("cannot read {path}: is {pid} the node's process id (Linux only)?")
    })?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("unexpected format of {path}"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| anyhow!("unexpected format of {path}"))?
            .parse::<u64>()? as f64)
    };
    // After the name, field 3 (state) is index 0: utime is 14, stime 15.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// Sends `req` to every node concurrently over the warm clients; fails on
/// the first node that does not answer.
async fn fan_out(
    clients: &[NodeClient<Channel>],
    nodes: &[NodeEntry],
    req: QueryRequest,
) -> anyhow::Result<Vec<Outcome<fedq_proto::v1::QueryResponse>>> {
    let req = Arc::new(req);
    let mut set = JoinSet::new();
    for (i, c) in clients.iter().enumerate() {
        let mut c = c.clone();
        let req = Arc::clone(&req);
        set.spawn(async move {
            let start = Instant::now();
            let r = c.query((*req).clone()).await;
            (i, r, start.elapsed())
        });
    }
    let mut outcomes: Vec<Option<Outcome<_>>> = (0..clients.len()).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        let (i, r, elapsed) = joined?;
        let response = r.map_err(|s| anyhow!("{}: {}", nodes[i].name, s.message()))?;
        outcomes[i] = Some(Outcome {
            node: nodes[i].name.clone(),
            result: Ok(response.into_inner()),
            elapsed,
        });
    }
    Ok(outcomes.into_iter().flatten().collect())
}
