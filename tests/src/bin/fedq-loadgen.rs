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
//!
//! Every query is a real release: it durably debits `--epsilon` from the
//! analyst's budget on every node. Give the analyst enough budget, and (for
//! `run`) per-analyst `queries_per_minute` and `concurrent_queries` limits
//! that admit the load; `local` and `prepare` set them so.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand};
use fedq::client::{new_query_id, Federation, Outcome};
use fedq::federation::{ClientTls, Defaults, FederationConfig, NodeEntry};
use fedq_node::config::BudgetLimits;
use fedq_node::pki::{Authority, Role};
use fedq_node::schema::Schema;
use fedq_node::synth::{self, Partner};
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
            } => {
                std::fs::create_dir_all(&dir)?;
                let fed = prepare(&dir, nodes, rows, Some(base_port))?;
                let path = dir.join("federation.toml");
                std::fs::write(&path, toml::to_string(&fed.federation)?)?;
                for n in &fed.nodes {
                    println!(
                        "start: fedq-node serve --config {}",
                        n.dir.join("node.toml").display()
                    );
                }
                println!("then:  fedq-loadgen run --federation {}", path.display());
                Ok(())
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
/// its config; writes an analyst certificate and the federation file.
fn prepare(
    dir: &Path,
    nodes: usize,
    rows: usize,
    base_port: Option<u16>,
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
        let schema =
            Schema::from_specs("cases", &config.datasets[0].columns).map_err(anyhow::Error::msg)?;
        let size = std::fs::metadata(&csv)?.len();
        let start = Instant::now();
        {
            let store = fedq_node::store::Store::open(&config.resolve(&config.node.store))?;
            fedq_node::ingest::ingest_csv(&store, "cases", &schema, &csv, false)?;
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{name}: ingested {rows} rows ({:.1} MB of CSV) in {secs:.2} s = {:.0} rows/s",
            size as f64 / 1e6,
            rows as f64 / secs
        );
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
    let mut prepared = prepare(&dir, nodes, rows, None)?;
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
    QueryRequest {
        query_id: new_query_id(),
        sql: QUERIES[i % QUERIES.len()].to_string(),
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
    // the first node.
    let node = &cfg.nodes[0];
    let cpu_before = load.node_pid.map(cpu_seconds).transpose()?;
    let deadline = Instant::now() + Duration::from_secs_f64(load.seconds);
    let mut set = JoinSet::new();
    let epsilon = load.epsilon;
    let wall = Instant::now();
    for c in 0..load.clients {
        let mut client = connect(cfg, node).await?;
        set.spawn(async move {
            let mut samples = Vec::new();
            let mut i = c;
            while Instant::now() < deadline {
                let start = Instant::now();
                client.query(request(i, epsilon)).await?;
                samples.push(start.elapsed());
                i += 1;
            }
            Ok::<_, tonic::Status>(samples)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r??);
    }
    let answered = all.len();
    summary(
        &format!(
            "throughput, {} concurrent clients on {}, mixed queries",
            load.clients, node.name
        ),
        all,
        wall.elapsed(),
    );
    if let (Some(pid), Some(before)) = (load.node_pid, cpu_before) {
        let used = cpu_seconds(pid)? - before;
        println!(
            "  {} CPU: {:.2} ms per query ({:.2} s over {answered} queries, {:.0}% of one core)",
            node.name,
            used * 1e3 / answered.max(1) as f64,
            used,
            used * 100.0 / wall.elapsed().as_secs_f64()
        );
    }
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
