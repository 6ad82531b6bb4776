//! `fedq-secure-bench`: what secure aggregation (issue 18) buys and costs,
//! measured on real in-process nodes over mutual-TLS gRPC.
//!
//! Three measurements, printed as Markdown tables for BENCHMARKS.md:
//!
//! 1. **Accuracy.** The combined 95% interval half-width of a 40-cell
//!    GROUP BY (`gender` x `ageBroad`, 4 x 10 cells) at the same per-node
//!    rho, secure (every node's `min_honest` = k, so the k shares make one
//!    central release) against today's mode (every node adds a whole
//!    release's noise), from real answers combined by `fedq::combine`;
//!    with the half-width a more cautious `min_honest` = 3 would give
//!    (computed, not queried).
//! 2. **Latency and CPU** per query of a secure query against a plain
//!    two-phase one (`min_nodes` = k), over the same nodes: wall time
//!    (median and 90th percentile) and the process's CPU time (nodes and
//!    coordinator share the process) per query.
//! 3. **Pairwise masking** on one node as the set grows: checking every
//!    participant's announcement (certificate chain and signature) and
//!    masking a 40-value release (one X25519 agreement, HKDF and ChaCha20
//!    stream per peer). `fedq-secagg` caps a set at 64; beyond that the
//!    node's work is measured as masking over ceil((k - 1) / 63) sets of
//!    64 (the same number of pairwise masks) and checking k announcements.
//!
//! Every query is a real release: each node debits `--rho` per query.
//!
//! Example (release build; a few minutes on 2 cores):
//!
//! ```text
//! cargo run --release -p fedq-tests --bin fedq-secure-bench -- --queries 30
//! ```

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use clap::Parser;
use fedq::client::{new_query_id, Calls};
use fedq::combine::{combine_at, noise_sum_half_width};
use fedq::run::{run_query, QueryOptions};
use fedq_dp::accounting::Measure;
use fedq_dp::distributed::share_scale;
use fedq_dp::mechanism::Noise;
use fedq_engine::synth::Partner;
use fedq_node::config::{BudgetLimits, SecureAggregationConfig};
use fedq_pki::{der_from_pem, Authority, Role};
use fedq_secagg::{check, Announcement, ParticipantSet, Round, RoundKey, Signer};
use fedq_tests::TestFederation;

/// The 40-cell GROUP BY (4 genders with missing, 10 age bands with
/// missing).
const SQL: &str = "SELECT gender, ageBroad, COUNT(*) FROM cases GROUP BY gender, ageBroad";

/// Values masked per node in the masking measurement (one per cell).
const CELLS: usize = 40;

#[derive(Parser, Debug)]
#[command(
    about = "Secure aggregation's accuracy gain, latency, CPU and masking cost, on in-process nodes",
    after_help = "Example:\n  cargo run --release -p fedq-tests --bin fedq-secure-bench -- --queries 30"
)]
struct Args {
    /// Federation sizes for the accuracy and latency measurements.
    #[arg(long, value_delimiter = ',', default_value = "3,10,30")]
    nodes: Vec<usize>,
    /// Timed queries per mode and size (after one warm-up query each).
    #[arg(long, default_value_t = 30)]
    queries: usize,
    /// Rows of synthetic data per node.
    #[arg(long, default_value_t = 2000)]
    rows: usize,
    /// Per-node rho of every query.
    #[arg(long, default_value_t = 0.05)]
    rho: f64,
    /// Participant counts for the masking measurement.
    #[arg(long, value_delimiter = ',', default_value = "3,10,30,100,300,1000")]
    mask_sizes: Vec<usize>,
    /// Skip the federation measurements (1 and 2).
    #[arg(long)]
    masking_only: bool,
}

fn budget() -> BudgetLimits {
    BudgetLimits {
        keys_delta: None,
        keys_delta_per_analyst: None,
        keys_delta_total: None,
        per_analyst: 1e6,
        total: 1e7,
        per_query_max: 10.0,
        measure: Measure::Zcdp,
        delta: Some(1e-7),
    }
}

/// CPU time (user + system) of this process so far.
fn cpu() -> Duration {
    // SAFETY: rusage is plain integers (all-zero is valid), and getrusage
    // writes into the struct we own.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let t = |v: libc::timeval| Duration::new(v.tv_sec as u64, v.tv_usec as u32 * 1000);
    t(u.ru_utime) + t(u.ru_stime)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// One mode's figures at one size.
struct Timing {
    /// The 95% half-width of the first cell (every cell has the same).
    half_width: f64,
    p50_ms: f64,
    p90_ms: f64,
    cpu_ms: f64,
}

/// How a query is run.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// One phase (`Query` on every node).
    OnePhase,
    /// Two phases (`Prepare`, then `Commit`; `min_nodes` = k).
    TwoPhase,
    /// Secure aggregation (two phases with round keys and masked shares).
    Secure,
}

async fn measure(
    coordinator: &fedq::client::Federation,
    k: usize,
    mode: Mode,
    args: &Args,
) -> anyhow::Result<Timing> {
    let opts = || QueryOptions {
        secure: matches!(mode, Mode::Secure),
        epsilon: 0.0,
        rho: args.rho,
        dry_run: false,
        calls: Calls {
            timeout: Duration::from_secs(60),
            retries: 0,
        },
        min_nodes: match mode {
            Mode::OnePhase => None,
            Mode::TwoPhase | Mode::Secure => Some(k),
        },
        query_id: new_query_id(),
    };
    let mut wall = Vec::with_capacity(args.queries);
    let mut half_width = f64::NAN;
    let mut cpu_total = Duration::ZERO;
    for i in 0..=args.queries {
        let o = opts();
        let (c0, t0) = (cpu(), Instant::now());
        let outcomes = run_query(coordinator, SQL, &o)
            .await
            .map_err(|e| anyhow!("{k} nodes, {mode:?}: {e}"))?;
        let took = t0.elapsed();
        let used = cpu() - c0;
        let c = combine_at(SQL, &o.query_id, 0.0, &outcomes, 0.05);
        if c.partial {
            return Err(anyhow!(
                "{k} nodes, {mode:?}: not every node answered: {:?}",
                c.nodes
            ));
        }
        if c.rows.len() != CELLS {
            return Err(anyhow!("{} cells, {CELLS} expected", c.rows.len()));
        }
        let e = c.rows[0].estimates[0].context("an estimate")?;
        half_width = (e.ci_high - e.ci_low) / 2.0;
        // The first query warms connections and the schema cache.
        if i > 0 {
            wall.push(took.as_secs_f64() * 1000.0);
            cpu_total += used;
        }
    }
    wall.sort_by(f64::total_cmp);
    Ok(Timing {
        half_width,
        p50_ms: percentile(&wall, 0.5),
        p90_ms: percentile(&wall, 0.9),
        cpu_ms: cpu_total.as_secs_f64() * 1000.0 / args.queries as f64,
    })
}

/// The combined 95% half-width and the standard deviation of the sum of
/// `k` shares calibrated for `t` honest participants (one cell of the
/// 40-cell release, L2 sensitivity 1).
fn secure_noise(k: usize, t: u32, rho: f64) -> anyhow::Result<(f64, f64)> {
    let share = Noise::DiscreteGaussian {
        scale: share_scale(1, rho, t, CELLS).map_err(|e| anyhow!(e))?,
    };
    Ok((
        noise_sum_half_width(&vec![share; k], 0.05),
        (k as f64 * share.variance()).sqrt(),
    ))
}

/// The standard deviation of the sum of `k` central releases (today's
/// mode: each node adds a whole release's noise).
fn plain_sd(k: usize, rho: f64) -> anyhow::Result<f64> {
    let central = Noise::for_rho(1, rho).map_err(|e| anyhow!(e))?;
    Ok((k as f64 * central.variance()).sqrt())
}

async fn federation_figures(args: &Args) -> anyhow::Result<()> {
    let kinds = [Partner::Ngo, Partner::Hotline, Partner::CaseManagement];
    let mut accuracy = Vec::new();
    let mut latency = Vec::new();
    for &k in &args.nodes {
        let partners: Vec<(Partner, usize, u64)> = (0..k)
            .map(|i| (kinds[i % 3], args.rows, 100 + i as u64))
            .collect();
        let t0 = Instant::now();
        let mut fed = TestFederation::start(&partners, budget()).await;
        for i in 0..k {
            fed.stop_node(i).await;
            fed.nodes[i].config.datasets[0].secure_aggregation = Some(SecureAggregationConfig {
                min_honest: k as u32,
            });
            fed.start_node(i).await;
        }
        eprintln!("{k} nodes up in {:.1} s", t0.elapsed().as_secs_f64());
        let coordinator = fed.federation("bench");
        let one = measure(&coordinator, k, Mode::OnePhase, args).await?;
        let plain = measure(&coordinator, k, Mode::TwoPhase, args).await?;
        let secure = measure(&coordinator, k, Mode::Secure, args).await?;
        let (_, secure_sd) = secure_noise(k, k as u32, args.rho)?;
        let (cautious, cautious_sd) = secure_noise(k, 3.min(k as u32), args.rho)?;
        let today_sd = plain_sd(k, args.rho)?;
        let central = Noise::for_rho(1, args.rho)
            .map_err(|e| anyhow!(e))?
            .half_width(0.05)
            .map_err(|e| anyhow!(e))?;
        eprintln!(
            "{k} nodes: half-width plain {:.2}, secure {:.2}; p50 {:.1} / {:.1} ms",
            plain.half_width, secure.half_width, plain.p50_ms, secure.p50_ms
        );
        accuracy.push(format!(
            "| {k} | {:.0} (sd {today_sd:.2}) | {:.0} (sd {secure_sd:.2}) | {:.2}x ({:.2}x) | {:.2} | {central:.0} | {cautious:.0} (sd {cautious_sd:.2}) | {:.2}x |",
            plain.half_width,
            secure.half_width,
            plain.half_width / secure.half_width,
            today_sd / secure_sd,
            (k as f64).sqrt(),
            today_sd / cautious_sd,
        ));
        latency.push(format!(
            "| {k} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:+.1} | {:.1} | {:.1} | {:+.1} |",
            one.p50_ms,
            plain.p50_ms,
            plain.p90_ms,
            secure.p50_ms,
            secure.p90_ms,
            secure.p50_ms - plain.p50_ms,
            plain.cpu_ms,
            secure.cpu_ms,
            secure.cpu_ms - plain.cpu_ms,
        ));
        for i in 0..k {
            fed.stop_node(i).await;
        }
    }
    println!(
        "\nAccuracy: 95% half-width of one cell of `{SQL}` (40 cells), rho {} per node\n",
        args.rho
    );
    println!("| nodes k | today (each node a whole release) | secure, min_honest = k | gain in half-width (in sd) | sqrt(k) | one central release | secure, min_honest = 3 (computed) | gain in sd at min_honest 3 |");
    println!("|---|---|---|---|---|---|---|---|");
    for l in &accuracy {
        println!("{l}");
    }
    println!("\nGain in noise sd (today / secure with min_honest = k) by per-node rho, computed from `share_scale` (40 cells, L2 sensitivity 1)\n");
    println!("| rho | k = 3 | 10 | 30 | 64 |");
    println!("|---|---|---|---|---|");
    for rho in [0.5, 0.05, 0.005] {
        let mut line = format!("| {rho} |");
        for k in [3usize, 10, 30, 64] {
            let (_, sd) = secure_noise(k, k as u32, rho)?;
            line.push_str(&format!(
                " {:.2}x (sqrt {:.2}) |",
                plain_sd(k, rho)? / sd,
                (k as f64).sqrt()
            ));
        }
        println!("{line}");
    }
    println!(
        "\nLatency and CPU per query ({} queries per mode and size, after one warm-up; CPU of the whole process: nodes and coordinator)\n",
        args.queries
    );
    println!("| nodes | one-phase p50 ms | plain two-phase p50 ms | p90 ms | secure p50 ms | p90 ms | secure - two-phase p50 | two-phase CPU ms/query | secure CPU ms/query | extra CPU ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for l in &latency {
        println!("{l}");
    }
    Ok(())
}

/// One participant of the masking measurement.
struct Participant {
    name: String,
    cert: Vec<u8>,
    signer: Signer,
}

/// The median of `reps` timings of `f`, in milliseconds.
fn median_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    t.sort_by(f64::total_cmp);
    percentile(&t, 0.5)
}

fn masking_figures(args: &Args) -> anyhow::Result<()> {
    let max = args.mask_sizes.iter().copied().max().unwrap_or(0);
    if max < 2 {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let ca = Authority::generate("bench CA")?;
    // Node 0's identity as the node loads it (its verifier checks the
    // others against the CA, as a round does).
    let config = fedq_tests::node_config(&ca, dir.path(), "node-0", budget());
    let tls = fedq_node::tls::load(&config)?;
    let own_identity = tls.secagg().context("node-0 cannot sign round keys")?;
    let verifier = own_identity.node_verifier()?;
    let t0 = Instant::now();
    let mut others = Vec::with_capacity(max - 1);
    for i in 1..max {
        let name = format!("node-{i}");
        let pair = ca.issue(Role::Node, &name)?;
        let cert = der_from_pem(&pair.cert).context("certificate PEM")?;
        let key = der_from_pem(&pair.key).context("key PEM")?;
        others.push(Participant {
            name,
            cert,
            signer: Signer::from_pkcs8(&key).map_err(|e| anyhow!("{e}"))?,
        });
    }
    eprintln!(
        "{} participant certificates in {:.1} s",
        max - 1,
        t0.elapsed().as_secs_f64()
    );
    let digest = [7u8; 32];
    let round = Round {
        query_id: "bench-round",
        request_digest: &digest,
    };
    let own_key = RoundKey::generate();
    let own = own_identity
        .signer
        .announce(round, "node-0", &own_identity.certificate, &own_key)
        .map_err(|e| anyhow!("{e}"))?;
    let announced: Vec<Announcement> = others
        .iter()
        .map(|p| {
            p.signer
                .announce(round, &p.name, &p.cert, &RoundKey::generate())
        })
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("{e}"))?;
    let values: Vec<i64> = (0..CELLS as i64).collect();
    println!("\nPairwise masking on one node, a 40-value release (median of repeated runs)\n");
    println!(
        "| participants k | check all k announcements ms | mask ms | total ms | per peer ms | announcements relayed to each node, KB |"
    );
    println!("|---|---|---|---|---|---|");
    for &k in &args.mask_sizes {
        if k < 2 {
            continue;
        }
        let peers = &announced[..k - 1];
        let mut members = vec![own.clone()];
        members.extend_from_slice(peers);
        // Sets of at most 64, each with node 0 (one set when k <= 64).
        let sets: Vec<ParticipantSet> = peers
            .chunks(fedq_secagg::MAX_PARTICIPANTS - 1)
            .map(|chunk| {
                let mut m = vec![own.clone()];
                m.extend_from_slice(chunk);
                ParticipantSet::new(round, m)
            })
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow!("{e}"))?;
        let reps = (3000 / k).clamp(3, 200);
        let mut failed = None;
        let check_ms = median_ms(reps, || {
            let r = if sets.len() == 1 {
                sets[0].check_all(round, &verifier)
            } else {
                members.iter().try_for_each(|a| check(a, round, &verifier))
            };
            if let Err(e) = r {
                failed = Some(e);
            }
        });
        if let Some(e) = failed {
            return Err(anyhow!("{k} participants: {e}"));
        }
        let mut masked = 0;
        let mask_ms = median_ms(reps, || {
            for s in &sets {
                masked += s
                    .mask("node-0", &own_key, &values)
                    .map(|m| m.len())
                    .unwrap_or(0);
            }
        });
        if masked == 0 {
            return Err(anyhow!("{k} participants: masking failed"));
        }
        let relayed: usize = members
            .iter()
            .map(|a| a.node.len() + a.certificate.len() + a.key.len() + a.signature.len())
            .sum();
        println!(
            "| {k} | {check_ms:.2} | {mask_ms:.2} | {:.2} | {:.3} | {:.0} |",
            check_ms + mask_ms,
            (check_ms + mask_ms) / (k - 1) as f64,
            relayed as f64 / 1000.0
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.masking_only {
        federation_figures(&args).await?;
    }
    masking_figures(&args)
}
