//! Criterion benches of the privacy path: OpenDP's discrete Laplace (scale
//! fixing, noise, accuracy) and the ledger's durable debit.
//!
//! Run: `cargo bench -p fedq-node --bench mechanism`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use fedq_dp::mechanism;
use fedq_ledger::ledger::Ledger;
use fedq_ledger::store::Store;
use fedq_node::config::BudgetLimits;

fn noise(c: &mut Criterion) {
    let mut g = c.benchmark_group("discrete_laplace");
    g.bench_function("scale_for_epsilon", |b| {
        b.iter(|| mechanism::discrete_laplace_scale(black_box(120), black_box(0.5)))
    });
    g.bench_function("ci95_half_width", |b| {
        b.iter(|| mechanism::discrete_laplace_half_width(black_box(240.0), 0.05))
    });
    for cells in [1usize, 40, 1000] {
        for scale in [2.0f64, 240.0] {
            let exact = mechanism::Exact::new(vec![12_345i64; cells]);
            let noise = mechanism::Noise::DiscreteLaplace { scale };
            g.bench_with_input(
                BenchmarkId::new(format!("release_scale_{scale}"), cells),
                &exact,
                |b, exact| b.iter(|| noise.release(exact)),
            );
        }
    }
    g.finish();
}

/// One query's ledger work: the durable check-and-debit with its audit
/// entry (`admit`, one flush) and the durable record of the release with its
/// audit entry (`record_release`, one more flush), on this machine's disk.
fn ledger(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).expect("temp dir");
    let store = Store::open(&dir.path().join("store")).expect("store");
    let key = fedq_ledger::audit::AuditKey::load_or_create(
        &dir.path().join("audit.key"),
        &dir.path().join("audit.pub"),
    )
    .expect("audit key");
    let audit = std::sync::Arc::new(fedq_ledger::audit::AuditLog::new(store.audit.clone(), key));
    let ledger = Ledger::new(store, audit);
    let limits = BudgetLimits {
        keys_delta: None,
        keys_delta_per_analyst: None,
        keys_delta_total: None,
        per_analyst: 1e12,
        total: 1e12,
        per_query_max: 1.0,
        measure: Default::default(),
        delta: None,
    };
    let response = fedq_proto::v1::QueryResponse {
        query_id: "q".into(),
        epsilon_split: "x".repeat(600),
        ..Default::default()
    };
    let mut n = 0u64;
    let mut g = c.benchmark_group("ledger");
    g.bench_function("admit_then_record_release", |b| {
        b.iter(|| {
            n += 1;
            let id = format!("q{n}");
            let digest = [(n % 251) as u8; 32];
            let fedq_ledger::ledger::Admission::Debited(_, durable) = ledger
                .admit(&fedq_ledger::ledger::Debit {
                    analyst: "alice",
                    dataset: "cases",
                    query_id: &id,
                    digest,
                    amount: 0.01,
                    keys_delta: 0.0,
                    limits: &limits,
                    received: None,
                })
                .expect("admitted")
            else {
                panic!("not a fresh debit")
            };
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
        })
    });
    g.finish();
}

criterion_group!(benches, noise, ledger);
criterion_main!(benches);
