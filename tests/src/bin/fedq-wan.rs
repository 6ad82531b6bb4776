//! `fedq-wan`: end-to-end latency of one-phase and two-phase queries over
//! a shaped network (issue 21). Real `fedq-node` processes, each in its own
//! network namespace behind a link with delay, jitter and loss each way
//! ([`fedq_tests::netns`]: TUN devices and a packet relay in this process,
//! as `tc netem` would do); the real coordinator library
//! (`fedq::query::ask`) in this process.
//!
//! For each round trip time: cold queries (a new `Federation` each: TCP
//! and TLS set-up, Describe, then the query) and warm ones (one
//! `Federation`, connections and descriptions kept), one phase and two
//! phases (`--min-nodes` = every node) interleaved; p50 and p95 of each,
//! against the target: phases x RTT plus the node time (the same query's
//! warm p50 over an unshaped link), plus, cold, the connection's set-up
//! (TCP and TLS 1.3: 2 RTT).
//!
//! Needs root (network namespaces) and a release `fedq-node` next to this
//! binary:
//!
//! ```sh
//! cargo build --release -p fedq-tests -p fedq-node --bin fedq-wan --bin fedq-node
//! target/release/fedq-wan
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use fedq::client::{new_query_id, Calls, Federation};
use fedq::run::QueryOptions;
use fedq_tests::netns::{self, NetFederation, Shape};
use fedq_tests::roomy_budget;

/// End-to-end latency of one- and two-phase queries at several round trip
/// times with loss, nodes in network namespaces (needs root)
#[derive(Parser)]
#[command(after_help = "Example (the BENCHMARKS.md table):\n  \
target/release/fedq-wan --nodes 3 --rtt-ms 50,150,300 --loss 1 --warm 30 --cold 5")]
struct Cli {
    /// Nodes, each a `fedq-node` process in its own namespace.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Round trip times to measure, milliseconds, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "50,150,300")]
    rtt_ms: Vec<u64>,
    /// Packets lost each way, percent.
    #[arg(long, default_value_t = 1.0)]
    loss: f64,
    /// Jitter each way, milliseconds (netem's uniform jitter).
    #[arg(long, default_value_t = 2)]
    jitter_ms: u64,
    /// Warm queries per kind (one phase, two phases) and RTT.
    #[arg(long, default_value_t = 30)]
    warm: usize,
    /// Cold queries (a new Federation each) per kind and RTT.
    #[arg(long, default_value_t = 5)]
    cold: usize,
    /// Synthetic rows per node.
    #[arg(long, default_value_t = 20_000)]
    rows: usize,
    /// The query.
    #[arg(
        long,
        default_value = "SELECT gender, COUNT(*) FROM cases GROUP BY gender"
    )]
    sql: String,
    /// The `fedq-node` binary (default: next to this one).
    #[arg(long)]
    node_binary: Option<PathBuf>,
}

/// Latencies of one kind of query.
#[derive(Default)]
struct Samples(Vec<Duration>);

impl Samples {
    fn quantile(&self, q: f64) -> Duration {
        let mut v = self.0.clone();
        v.sort();
        if v.is_empty() {
            return Duration::ZERO;
        }
        let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e3)
}

/// One query, timed; an error unless every node answered.
async fn timed(
    fed: &Federation,
    sql: &str,
    nodes: usize,
    two_phase: bool,
) -> anyhow::Result<Duration> {
    let opts = QueryOptions {
        secure: false,
        epsilon: 0.01,
        rho: 0.0,
        dry_run: false,
        calls: Calls {
            timeout: Duration::from_secs(30),
            retries: 2,
        },
        min_nodes: two_phase.then_some(nodes),
        query_id: new_query_id(),
    };
    let start = Instant::now();
    let answer = fedq::query::ask(fed, sql, &opts)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let took = start.elapsed();
    if answer.answered() != nodes {
        bail!(
            "{} of {nodes} nodes answered: {:?}",
            answer.answered(),
            answer
                .combined
                .nodes
                .iter()
                .filter_map(|n| n.failure.as_ref().map(|f| format!("{}: {f}", n.node)))
                .collect::<Vec<_>>()
        );
    }
    Ok(took)
}

/// Cold and warm samples of both kinds at the current shape.
struct Run {
    cold: [Samples; 2],
    warm: [Samples; 2],
}

async fn measure(lab: &NetFederation, cli: &Cli, cold: usize, warm: usize) -> anyhow::Result<Run> {
    let mut run = Run {
        cold: Default::default(),
        warm: Default::default(),
    };
    for i in 0..cold {
        for (k, two) in [(0, false), (1, true)] {
            let fresh = lab.federation("wan-bench", Duration::from_secs(30));
            run.cold[k].0.push(
                timed(&fresh, &cli.sql, cli.nodes, two)
                    .await
                    .with_context(|| format!("cold query {i}"))?,
            );
        }
    }
    let fed = lab.federation("wan-bench", Duration::from_secs(30));
    timed(&fed, &cli.sql, cli.nodes, false)
        .await
        .context("warm-up")?;
    for i in 0..warm {
        // Interleaved, in a different order each time.
        let order = if i % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for two in order {
            let took = timed(&fed, &cli.sql, cli.nodes, two)
                .await
                .with_context(|| format!("warm query {i}"))?;
            run.warm[usize::from(two)].0.push(took);
        }
    }
    Ok(run)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.nodes == 0 || cli.warm == 0 || cli.rtt_ms.is_empty() {
        bail!("--nodes, --warm and --rtt-ms must be positive");
    }
    if !(0.0..100.0).contains(&cli.loss) {
        bail!("--loss must be a percentage in [0, 100)");
    }
    if let Some(why) = netns::unavailable() {
        bail!("fedq-wan needs network namespaces: {why}");
    }
    let binary = match &cli.node_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join("fedq-node"))
            .ok_or_else(|| anyhow!("no directory for this binary"))?,
    };
    if !binary.exists() {
        bail!(
            "no fedq-node at {}: build it with `cargo build --release -p fedq-tests -p fedq-node --bin fedq-wan --bin fedq-node`, or give --node-binary",
            binary.display()
        );
    }
    let unshaped = Shape::rtt(Duration::ZERO, Duration::ZERO, 0.0);
    let budget = roomy_budget();
    let lab = NetFederation::start(cli.nodes, cli.rows, budget, unshaped, &binary)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    println!(
        "fedq-wan: {} fedq-node processes in their own namespaces, {} rows each; {:?} at epsilon 0.01",
        cli.nodes, cli.rows, cli.sql
    );
    let base = measure(&lab, &cli, 0, cli.warm).await?;
    let node_time = [base.warm[0].quantile(0.5), base.warm[1].quantile(0.5)];
    println!(
        "node time (unshaped link, warm p50): one phase {} ms, two phases {} ms",
        ms(node_time[0]),
        ms(node_time[1])
    );
    println!();
    println!("| RTT | loss each way | phases | cold p50 / max | cold target | warm p50 / p95 | warm target | warm p50 met? |");
    println!("|---|---|---|---|---|---|---|---|");
    for &rtt_ms in &cli.rtt_ms {
        let rtt = Duration::from_millis(rtt_ms);
        let shape = Shape::rtt(rtt, Duration::from_millis(cli.jitter_ms), cli.loss);
        for n in &lab.nodes {
            n.link.shape(shape).map_err(|e| anyhow!("{e}"))?;
        }
        let run = measure(&lab, &cli, cli.cold, cli.warm).await?;
        for (k, node) in node_time.iter().enumerate() {
            let phases = k as u32 + 1;
            let warm_target = rtt * phases + *node;
            let cold_target = warm_target + rtt * 2;
            let p50 = run.warm[k].quantile(0.5);
            println!(
                "| {rtt_ms} ms | {}% | {} | {} / {} ms | {} ms | {} / {} ms | {} ms | {} |",
                cli.loss,
                if k == 0 { "one" } else { "two" },
                ms(run.cold[k].quantile(0.5)),
                ms(run.cold[k].quantile(1.0)),
                ms(cold_target),
                ms(p50),
                ms(run.warm[k].quantile(0.95)),
                ms(warm_target),
                if p50 <= warm_target { "yes" } else { "no" }
            );
        }
    }
    println!();
    println!(
        "cold: a new Federation per query (TCP + TLS 1.3 set-up, Describe, then the query); warm: one Federation, {} queries per kind, interleaved. Targets: phases x RTT + node time (+ 2 RTT set-up cold; a cold query also describes the nodes, 1 RTT more).",
        cli.warm
    );
    Ok(())
}
