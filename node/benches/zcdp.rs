//! The cost of zCDP accounting against pure DP (issue 16, item 9).
//!
//! - criterion `zcdp_conversion`: one rho -> (epsilon, delta) conversion,
//!   OpenDP's own search, the node's ([`accounting::zcdp_to_approx`]) on a
//!   new total, and a remembered one.
//! - `cpu per query`: the node's per-query privacy accounting (the durable
//!   check-and-debit with its audit entry, the answer's cost equivalent,
//!   the durable release record), in process CPU time per
//!   query, for a pure and a zCDP dataset; and the same zCDP work with
//!   OpenDP's conversion three times per query, as before the memo.
//! - `throughput`: one analyst's pure-DP queries per second through the
//!   ledger, alone and while another analyst debits a zCDP dataset of the
//!   same node as fast as it can.
//!
//! - `sweep`: the node's conversion equals OpenDP's bit for bit over random
//!   (rho, delta) (`FEDQ_BENCH_SWEEP`, default 1000).
//!
//! Run: `cargo bench -p fedq-node --bench zcdp` (`FEDQ_BENCH_QUERIES`,
//! default 2000; `FEDQ_BENCH_SECONDS`, default 5; `FEDQ_BENCH_ONLY`, the
//! name of the one CPU case to run).

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use fedq_dp::accounting::{self, Measure};
use fedq_ledger::ledger::Ledger;
use fedq_ledger::store::Store;
use fedq_node::config::BudgetLimits;

const DELTA: f64 = 1e-7;

fn limits(measure: Measure) -> BudgetLimits {
    BudgetLimits {
        keys_delta: None,
        keys_delta_per_analyst: None,
        keys_delta_total: None,
        per_analyst: 1e9,
        total: 1e9,
        per_query_max: 1.0,
        measure,
        delta: (measure == Measure::Zcdp).then_some(DELTA),
    }
}

fn ledger(dir: &std::path::Path) -> Ledger {
    let store = Store::open(&dir.join("store")).expect("store");
    let key = fedq_ledger::audit::AuditKey::load_or_create(
        &dir.join("audit.key"),
        &dir.join("audit.pub"),
    )
    .expect("audit key");
    let audit = Arc::new(fedq_ledger::audit::AuditLog::new(store.audit.clone(), key));
    Ledger::new(store, audit)
}

fn env(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User + system CPU time of this process (Linux, /proc/self/stat).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which ends with ')'): utime is the
    // 12th, stime the 13th, in clock ticks (100 per second).
    let rest = &stat[stat.rfind(')').expect("stat") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

fn conversions(c: &mut Criterion) {
    let mut g = c.benchmark_group("zcdp_conversion");
    let mut n = 0u64;
    g.bench_function("opendp_search", |b| {
        b.iter(|| {
            n += 1;
            accounting::zcdp_to_approx_opendp(black_box(0.25 + n as f64 * 1e-9), DELTA)
        })
    });
    let mut n = 0u64;
    g.bench_function("node_new_total", |b| {
        b.iter(|| {
            n += 1;
            // A total never converted before: the memo misses.
            accounting::zcdp_to_approx(black_box(0.5 + n as f64 * 1e-9), DELTA)
        })
    });
    g.bench_function("node_remembered", |b| {
        b.iter(|| accounting::zcdp_to_approx(black_box(0.005), DELTA))
    });
    g.finish();
}

/// What each query's accounting converts, besides the ledger's own.
#[derive(Clone, Copy, PartialEq)]
enum Conversions {
    /// As the service does now: the query's cost through
    /// `Measure::equivalent` (remembered: costs repeat); the analyst's new
    /// total is not converted (entries and answers leave it to readers).
    Node,
    /// As before: OpenDP's search for the ledger's entry, the budget and
    /// the cost, three times per query, nothing remembered.
    OpenDpThrice,
}

/// Process CPU time per query of the accounting path, `queries` queries.
fn cpu_per_query(measure: Measure, conv: Conversions, queries: u64) -> (Duration, Duration) {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).expect("temp dir");
    let ledger = ledger(dir.path());
    let l = limits(measure);
    // --epsilon 0.1 on a pure dataset; --rho 0.005 on a zCDP one.
    let amount = match measure {
        Measure::Pure => 0.1,
        Measure::Zcdp => 0.005,
    };
    let response = fedq_proto::v1::QueryResponse {
        query_id: "q".into(),
        epsilon_split: "x".repeat(600),
        ..Default::default()
    };
    let run = |from: u64, to: u64| {
        for n in from..to {
            let id = format!("q{n}");
            let digest = [(n % 251) as u8; 32];
            let fedq_ledger::ledger::Admission::Debited(state, durable) = ledger
                .admit(&fedq_ledger::ledger::Debit {
                    analyst: "alice",
                    dataset: "cases",
                    query_id: &id,
                    digest,
                    amount,
                    keys_delta: 0.0,
                    limits: &l,
                    received: None,
                })
                .expect("admitted")
            else {
                panic!("not a fresh debit")
            };
            match conv {
                Conversions::Node => {
                    black_box(state.spent_by_analyst);
                    black_box(l.measure.equivalent(amount, l.equivalence_delta()).unwrap());
                }
                Conversions::OpenDpThrice => {
                    for rho in [state.spent_by_analyst, state.spent_by_analyst, amount] {
                        black_box(accounting::zcdp_to_approx_opendp(rho, DELTA).unwrap());
                    }
                }
            }
            ledger
                .record_release(
                    durable,
                    &fedq_ledger::ledger::ReleaseOf {
                        analyst: "alice",
                        query_id: &id,
                        dataset: "cases",
                        digest,
                        secure: None,
                    },
                    vec![],
                    None,
                    &mut response.clone(),
                )
                .expect("record");
        }
    };
    run(0, 50); // warm-up
    let (cpu, wall) = (process_cpu(), Instant::now());
    run(50, 50 + queries);
    (
        (process_cpu() - cpu) / queries as u32,
        wall.elapsed() / queries as u32,
    )
}

/// Pure-DP queries per second of one analyst (4 client threads) through
/// the ledger (debit, release record), for `seconds`, with or without
/// another analyst's zCDP debits (2 client threads) on the same node.
fn pure_throughput(with_zcdp_load: bool, seconds: f64) -> (f64, f64) {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).expect("temp dir");
    let ledger = ledger(dir.path());
    let (pure, zcdp) = (limits(Measure::Pure), limits(Measure::Zcdp));
    let stop = AtomicBool::new(false);
    let (pure_done, zcdp_done) = (AtomicU64::new(0), AtomicU64::new(0));
    let response = fedq_proto::v1::QueryResponse::default();
    let query = |analyst: &str, dataset: &str, id: String, amount: f64, l: &BudgetLimits| {
        let digest = [7; 32];
        let fedq_ledger::ledger::Admission::Debited(state, durable) = ledger
            .admit(&fedq_ledger::ledger::Debit {
                analyst,
                dataset,
                query_id: &id,
                digest,
                amount,
                keys_delta: 0.0,
                limits: l,
                received: None,
            })
            .expect("admitted")
        else {
            panic!("not a fresh debit")
        };
        black_box(state.spent_by_analyst);
        black_box(l.measure.equivalent(amount, l.equivalence_delta()).unwrap());
        ledger
            .record_release(
                durable,
                &fedq_ledger::ledger::ReleaseOf {
                    analyst,
                    query_id: &id,
                    dataset,
                    digest,
                    secure: None,
                },
                vec![],
                None,
                &mut response.clone(),
            )
            .expect("record");
    };
    std::thread::scope(|s| {
        for t in 0..4 {
            let (stop, done, query, pure) = (&stop, &pure_done, &query, &pure);
            s.spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    query("alice", "cases", format!("p{t}-{i}"), 0.1, pure);
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            });
        }
        if with_zcdp_load {
            for t in 0..2 {
                let (stop, done, query, zcdp) = (&stop, &zcdp_done, &query, &zcdp);
                s.spawn(move || {
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        query("bob", "cases_z", format!("z{t}-{i}"), 0.005, zcdp);
                        done.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                });
            }
        }
        std::thread::sleep(Duration::from_secs_f64(seconds));
        stop.store(true, Ordering::Relaxed);
    });
    (
        pure_done.load(Ordering::Relaxed) as f64 / seconds,
        zcdp_done.load(Ordering::Relaxed) as f64 / seconds,
    )
}

/// The node's conversion against OpenDP's, bit for bit, over `n` random
/// (rho, delta): rho log-uniform in [1e-8, 10], delta in [1e-15, 1e-3].
fn sweep(n: u64) {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64
    };
    for _ in 0..n {
        let rho = 10f64.powf(-8.0 + 9.0 * next());
        let delta = 10f64.powf(-15.0 + 12.0 * next());
        let (got, want) = (
            accounting::zcdp_to_approx(rho, delta),
            accounting::zcdp_to_approx_opendp(rho, delta),
        );
        assert_eq!(
            got.as_ref().map(|v| v.to_bits()),
            want.as_ref().map(|v| v.to_bits()),
            "rho {rho:e} delta {delta:e}"
        );
    }
    println!("sweep: {n} random (rho, delta): the node's conversion is OpenDP's, bit for bit");
}

fn main() {
    sweep(env("FEDQ_BENCH_SWEEP", 1000.0) as u64);
    let mut c = Criterion::default().configure_from_args();
    conversions(&mut c);
    c.final_summary();

    let queries = env("FEDQ_BENCH_QUERIES", 2000.0) as u64;
    let seconds = env("FEDQ_BENCH_SECONDS", 5.0);
    // Only the CPU case of this name (all if empty).
    let only = std::env::var("FEDQ_BENCH_ONLY").unwrap_or_default();
    println!("\ncpu per query ({queries} queries; process CPU time; wall per query)");
    for (name, measure, conv) in [
        ("pure, --epsilon 0.1", Measure::Pure, Conversions::Node),
        ("zcdp, --rho 0.005", Measure::Zcdp, Conversions::Node),
        (
            "zcdp, --rho 0.005, OpenDP x3 (before)",
            Measure::Zcdp,
            Conversions::OpenDpThrice,
        ),
    ] {
        if !only.is_empty() && name != only {
            continue;
        }
        let (cpu, wall) = cpu_per_query(measure, conv, queries);
        println!(
            "  {name:<40} cpu {:>7.3} ms   wall {:>7.3} ms",
            cpu.as_secs_f64() * 1e3,
            wall.as_secs_f64() * 1e3
        );
    }
    println!("\nthroughput ({seconds} s each; 4 pure clients, 2 zCDP clients)");
    for with in [false, true] {
        let (p, z) = pure_throughput(with, seconds);
        println!(
            "  pure alone={:<5}  pure {p:>7.0} q/s   zcdp {z:>7.0} q/s",
            !with
        );
    }
}
