//! zCDP end to end: `rho` queries get discrete Gaussian noise of the
//! claimed distribution; a dataset whose ledger accounts in zCDP spends rho
//! (epsilon queries cost epsilon^2 / 2), exhausts exactly, never
//! overspends under concurrency, keeps what was spent across restarts and
//! refuses to start under another measure; answers and audit entries state
//! the native cost and its (epsilon, delta) equivalent; and the combined 95%
//! intervals of three nodes' discrete Gaussian noises cover the truth 95% of
//! the time.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use fedq::client::new_query_id;
use fedq::combine::combine;
use fedq_dp::accounting::{zcdp_to_approx, Measure};
use fedq_engine::synth::Partner;
use fedq_ledger::audit::{parse_public_key, verify, Event};
use fedq_node::config::BudgetLimits;
use fedq_pki::Role;
use fedq_proto::v1::{BudgetRequest, QueryRequest};
use fedq_tests::{exact_counts, roomy_budget, TestFederation};
use tonic::Code;

const DELTA: f64 = 1e-7;

fn zcdp(per_analyst: f64, total: f64, per_query_max: f64) -> BudgetLimits {
    BudgetLimits {
        keys_delta: None,
        keys_delta_per_analyst: None,
        keys_delta_total: None,
        per_analyst,
        total,
        per_query_max,
        measure: Measure::Zcdp,
        delta: Some(DELTA),
    }
}

const SQL: &str = "SELECT gender, COUNT(*) FROM cases GROUP BY gender";

fn rho_query(id: &str, rho: f64) -> QueryRequest {
    QueryRequest {
        query_id: id.into(),
        sql: SQL.into(),
        epsilon: 0.0,
        dry_run: false,
        rho,
    }
}

fn epsilon_query(id: &str, epsilon: f64) -> QueryRequest {
    QueryRequest {
        epsilon,
        rho: 0.0,
        ..rho_query(id, 0.0)
    }
}

type Client = fedq_proto::v1::node_client::NodeClient<tonic::transport::Channel>;

async fn budget(client: &mut Client) -> fedq_proto::v1::Budget {
    client
        .budget(BudgetRequest {})
        .await
        .unwrap()
        .into_inner()
        .budgets
        .remove(0)
}

/// The discrete Gaussian pmf on `-r..=r`, computed here by brute force.
fn dg_pmf(sigma: f64, r: i64) -> Vec<(i64, f64)> {
    let w: Vec<f64> = (-r..=r)
        .map(|x| (-((x * x) as f64) / (2.0 * sigma * sigma)).exp())
        .collect();
    let z: f64 = w.iter().sum();
    (-r..=r).zip(w).map(|(x, p)| (x, p / z)).collect()
}

/// `E[X^2]` and `sd(X^2)` of a discrete Gaussian.
fn square_moments(sigma: f64) -> (f64, f64) {
    let pmf = dg_pmf(sigma, (sigma * 40.0) as i64 + 2);
    let m2: f64 = pmf.iter().map(|(x, p)| (x * x) as f64 * p).sum();
    let m4: f64 = pmf.iter().map(|(x, p)| ((x * x) as f64).powi(2) * p).sum();
    (m2, (m4 - m2 * m2).sqrt())
}

/// Calibration. 20 GROUP BY releases of 210 cells each (n = 4200 noise
/// values, each seen exactly: the test knows every cell's count from the
/// CSV) at rho = 0.005, i.e. sigma = 10 for counts (L2 sensitivity 1). The
/// mean of X^2 has standard error sd(X^2)/sqrt(n) (about 2.2 here); the
/// test accepts when it is within 6 standard errors of the claimed
/// E[X^2]. A correct mechanism fails with probability about 2e-9 (normal
/// approximation, n in the thousands). A scale 20% off moves E[X^2] from
/// 100 to 64 or 144, i.e. by 16 or more standard errors (checked below).
#[test]
fn a_gaussian_scale_off_by_twenty_percent_would_be_detected() {
    let n = 4200.0;
    let (m, sd) = square_moments(10.0);
    for wrong in [8.0, 12.0] {
        let (m_wrong, _) = square_moments(wrong);
        assert!(
            (m_wrong - m).abs() > 6.0 * sd / f64::sqrt(n) * 2.0,
            "scale {wrong} would pass"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_count_noise_has_the_claimed_discrete_gaussian_distribution() {
    let fed = TestFederation::start(
        &[(Partner::CaseManagement, 5000, 9)],
        zcdp(100.0, 1000.0, 1.0),
    )
    .await;
    let mut client = fed.raw_client(0, Role::Analyst, "stats").await;
    let truth = exact_counts(
        &fed.nodes[0].csv,
        &["CountryOfExploitation", "ageBroad"],
        |_| true,
    );
    let sql = "SELECT CountryOfExploitation, ageBroad, COUNT(*) FROM cases GROUP BY CountryOfExploitation, ageBroad";
    let rho = 0.005;
    let mut noise = Vec::new();
    for i in 0..20 {
        let r = client
            .query(QueryRequest {
                query_id: format!("dg-noise-{i}"),
                sql: sql.into(),
                epsilon: 0.0,
                dry_run: false,
                rho,
            })
            .await
            .expect("query")
            .into_inner();
        let m = &r.measurements[0];
        assert_eq!(m.mechanism, "discrete_gaussian");
        assert!((m.scale - 10.0).abs() < 1e-9, "claimed scale {}", m.scale);
        assert_eq!((m.rho, m.epsilon, m.l2_sensitivity), (rho, 0.0, 1.0));
        let opendp = opendp::accuracy::discrete_gaussian_scale_to_accuracy(m.scale, 0.05).unwrap();
        assert_eq!(m.ci95_half_width, opendp, "the CI is OpenDP's accuracy");
        assert!((m.noise_variance / square_moments(10.0).0 - 1.0).abs() < 1e-9);
        for (cell, &v) in r.cells.iter().zip(&m.values) {
            let exact = truth.get(&cell.values).copied().unwrap_or(0);
            noise.push((v - exact) as f64);
        }
    }
    let n = noise.len() as f64;
    assert_eq!(noise.len(), 20 * 210);
    let (m2, sd2) = square_moments(10.0);
    let observed = noise.iter().map(|x| x * x).sum::<f64>() / n;
    let se = sd2 / n.sqrt();
    eprintln!(
        "discrete Gaussian through a node: mean X^2 {observed:.2}, claimed {m2:.2}, se {se:.2}"
    );
    assert!(
        (observed - m2).abs() <= 6.0 * se,
        "mean noise^2 {observed:.3}, claimed {m2:.3} (6 se = {:.3})",
        6.0 * se
    );
    // Unbiased: the mean noise is within 6 standard errors of zero.
    let mean = noise.iter().sum::<f64>() / n;
    assert!(
        mean.abs() <= 6.0 * m2.sqrt() / n.sqrt(),
        "mean noise {mean:.3}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zcdp_ledger_spends_rho_exactly_and_converts_epsilon() {
    let fed = TestFederation::start(&[(Partner::Ngo, 1000, 1)], zcdp(0.05, 1.0, 0.05)).await;
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    let first = alice
        .query(rho_query("r1", 0.02))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.measure, "zcdp");
    assert!((first.cost - 0.02).abs() < 1e-12);
    let eq = zcdp_to_approx(0.02, DELTA).unwrap();
    assert!((first.cost_epsilon - eq).abs() < 1e-12 && first.cost_delta == DELTA);
    let b = first.budget.unwrap();
    assert_eq!(b.measure, "zcdp");
    assert!((b.spent_by_analyst - 0.02).abs() < 1e-9);
    // An answer leaves the total's equivalent to the reader (0, 0), as
    // the coordinator computes it; the Budget RPC states it.
    assert_eq!((b.spent_epsilon, b.spent_delta), (0.0, 0.0));
    assert!((b.remaining_for_analyst - 0.03).abs() < 1e-9);

    alice.query(rho_query("r1b", 0.02)).await.unwrap();
    let b = budget(&mut alice).await;
    assert!((b.spent_by_analyst - 0.04).abs() < 1e-9);
    assert!((b.spent_epsilon - zcdp_to_approx(b.spent_by_analyst, DELTA).unwrap()).abs() < 1e-9);

    // 0.02 more would exceed 0.05: refused, nothing spent; the refusal
    // says what is left, in rho.
    let refused = alice.query(rho_query("r2", 0.02)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("rho") && refused.message().contains("0.01"),
        "{}",
        refused.message()
    );
    assert!((budget(&mut alice).await.spent_by_analyst - 0.04).abs() < 1e-9);
    // What is left can be spent exactly, and then nothing more.
    alice.query(rho_query("r3", 0.01)).await.unwrap();
    let b = budget(&mut alice).await;
    assert!((b.spent_by_analyst - 0.05).abs() < 1e-9 && b.remaining_for_analyst == 0.0);
    let refused = alice.query(rho_query("r4", 1e-9)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    // An epsilon query costs epsilon^2 / 2 rho (OpenDP's arithmetic,
    // rounded up to whole nano-rho) and is released with discrete Laplace
    // noise: epsilon 0.2 costs rho 0.02.
    let mut bob = fed.raw_client(0, Role::Analyst, "bob").await;
    let e = bob
        .query(epsilon_query("e1", 0.2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.measurements[0].mechanism, "discrete_laplace");
    assert!((e.measurements[0].scale - 5.0).abs() < 1e-9);
    assert!((e.cost - 0.02).abs() < 1e-12, "cost {}", e.cost);
    assert!(
        e.epsilon_split.contains("epsilon^2/2"),
        "{}",
        e.epsilon_split
    );
    let b = budget(&mut bob).await;
    assert!(
        (b.spent_by_analyst - 0.02).abs() <= 2e-9,
        "{}",
        b.spent_by_analyst
    );
    assert!(
        b.spent_by_analyst >= 0.02,
        "rounding never favours the analyst"
    );
    assert!((b.spent_epsilon - zcdp_to_approx(b.spent_by_analyst, DELTA).unwrap()).abs() < 1e-9);
    // The per-query maximum is in rho too: epsilon 0.5 costs 0.125 > 0.05.
    let refused = bob.query(epsilon_query("b1", 0.5)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("rho 0.125") && refused.message().contains("0.05"),
        "{}",
        refused.message()
    );
    // A dry run states the cost and spends nothing.
    let dry = bob
        .query(QueryRequest {
            dry_run: true,
            ..rho_query("b2", 0.03)
        })
        .await
        .unwrap()
        .into_inner();
    assert!((dry.cost - 0.03).abs() < 1e-12 && dry.measurements[0].values.is_empty());
    assert!((budget(&mut bob).await.spent_by_analyst - 0.02).abs() <= 2e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rho_requests_are_validated_and_a_pure_ledger_refuses_rho() {
    let fed = TestFederation::start(&[(Partner::Hotline, 500, 2)], roomy_budget()).await;
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    let refused = alice.query(rho_query("p1", 0.05)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("pure epsilon-DP") && refused.message().contains("--epsilon"),
        "{}",
        refused.message()
    );
    for (q, says) in [
        (
            QueryRequest {
                epsilon: 0.5,
                ..rho_query("p2", 0.05)
            },
            "not both",
        ),
        (rho_query("p3", f64::NAN), "rho is NaN"),
        (rho_query("p4", -0.1), "rho must be greater than 0"),
        (rho_query("p5", f64::INFINITY), "rho is infinite"),
        (rho_query("p6", 1e-15), "below this node's minimum"),
        (rho_query("p7", 0.0), "or a positive rho"),
    ] {
        let s = alice.query(q).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains(says), "{}", s.message());
    }
    let b = budget(&mut alice).await;
    assert_eq!(b.measure, "pure");
    assert_eq!(b.spent_by_analyst, 0.0, "refusals spend nothing");
    // A pure ledger states (epsilon, 0).
    let ok = alice
        .query(epsilon_query("p8", 0.3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (ok.measure.as_str(), ok.cost, ok.cost_epsilon, ok.cost_delta),
        ("pure", 0.3, 0.3, 0.0)
    );
    let b = ok.budget.unwrap();
    assert_eq!((b.spent_epsilon, b.spent_delta), (0.3, 0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rho_queries_never_overspend() {
    // Each analyst may spend rho 1, everybody together 0.1: exactly ten
    // queries of 0.01 fit.
    let fed = TestFederation::start(&[(Partner::Hotline, 1000, 2)], zcdp(1.0, 0.1, 0.1)).await;
    let mut tasks = Vec::new();
    for analyst in ["alice", "bob", "carol", "dan"] {
        for i in 0..4 {
            let mut c = fed.raw_client(0, Role::Analyst, analyst).await;
            tasks.push(tokio::spawn(async move {
                c.query(rho_query(&format!("{analyst}-{i}"), 0.01)).await
            }));
        }
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) => assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}"),
        }
    }
    assert_eq!(ok, 10, "exactly 0.1 / 0.01 queries fit the dataset total");
    let mut c = fed.raw_client(0, Role::Analyst, "alice").await;
    assert!(budget(&mut c).await.remaining_for_dataset.abs() < 1e-9);
}

/// Every key and value of the ledger and audit trees of node `i`'s store
/// (node stopped).
fn store_contents(fed: &TestFederation, i: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let cfg = &fed.nodes[i].config;
    let store = fedq_ledger::store::Store::open(&cfg.resolve(&cfg.node.store)).unwrap();
    store
        .ledger
        .iter()
        .chain(store.audit.iter())
        .map(|kv| {
            let (k, v) = kv.unwrap();
            (k.to_vec(), v.to_vec())
        })
        .collect()
}

/// Serves `config` as `fedq-node serve` does and expects it to stop with
/// an error before serving; returns the error.
async fn refused_start(config: fedq_node::config::NodeConfig) -> String {
    let serve = fedq_node::server::serve_until(config, std::future::pending());
    match tokio::time::timeout(Duration::from_secs(30), serve).await {
        Ok(Err(e)) => format!("{e:#}"),
        Ok(Ok(())) | Err(_) => panic!("the node started under another measure"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_keep_rho_spent_and_a_measure_change_is_refused_at_start() {
    let mut fed = TestFederation::start(&[(Partner::Ngo, 800, 4)], zcdp(1.0, 2.0, 0.5)).await;
    fed.stop_node(0).await;
    fed.nodes[0].config.audit.auditors = vec!["auditor".into()];
    fed.start_node(0).await;
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    alice.query(rho_query("s1", 0.1)).await.unwrap();
    alice.query(epsilon_query("s2", 0.4)).await.unwrap(); // rho 0.08
                                                          // A two-phase query reserves and commits rho.
    let prepared = alice
        .prepare(fedq_proto::v1::PrepareRequest {
            secure_aggregation: Default::default(),
            query: Some(rho_query("s3", 0.02)),
            hold_ms: 10_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(prepared.rho_reserved, 0.02);
    let committed = alice
        .commit(fedq_proto::v1::CommitRequest {
            participants: Default::default(),
            query_id: "s3".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(committed.measurements[0].mechanism, "discrete_gaussian");
    let spent = budget(&mut alice).await.spent_by_analyst;
    assert!((spent - 0.2).abs() <= 2e-9, "spent {spent}");

    // The audit log states native costs and totals, and still verifies;
    // the report states the total's (epsilon, delta) equivalent at the
    // logged delta (the entries leave it to the reader).
    let (text, entries, key) = fed.pull_audit(0).await;
    verify(&text, &parse_public_key(&key).unwrap(), 0, None).expect("the log verifies");
    let debits: Vec<(f64, f64, String, f64)> = entries
        .iter()
        .filter_map(|e| match &e.event {
            Event::Debited {
                epsilon,
                rho,
                measure,
                analyst_spent,
                analyst_spent_equivalent: None,
                ..
            }
            | Event::Reserved {
                epsilon,
                rho,
                measure,
                analyst_spent,
                analyst_spent_equivalent: None,
                ..
            } => Some((
                epsilon.value(),
                rho.value(),
                measure.clone(),
                analyst_spent.value(),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(debits.len(), 3, "{debits:?}");
    // (epsilon 0.4 costs 0.4^2/2 = 0.08, rounded up to whole nano-rho.)
    for (i, (rho, total)) in [(0.1, 0.1), (0.08, 0.18), (0.02, 0.2)].iter().enumerate() {
        let (e, r, m, spent) = &debits[i];
        assert_eq!((*e, m.as_str()), (0.0, "zcdp"));
        assert!(
            (r - rho).abs() <= 2e-9 && (spent - total).abs() <= 2e-9,
            "{:?}",
            debits[i]
        );
    }
    let raw: Vec<fedq_audit::Entry> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary = fedq_audit::report::summarize(&raw);
    let row = summary
        .iter()
        .find(|r| r.analyst == "alice" && r.dataset == "cases")
        .expect("alice's row");
    let (eq_e, eq_d) = row
        .spent_equivalent
        .expect("the report states the equivalent");
    assert!((eq_e - zcdp_to_approx(spent, DELTA).unwrap()).abs() < 1e-9);
    assert_eq!(eq_d, DELTA);
    let released: Vec<f64> = entries
        .iter()
        .filter_map(|e| match &e.event {
            Event::Released { measurements, .. } => Some(measurements[0].rho.value()),
            _ => None,
        })
        .collect();
    assert_eq!(released, vec![0.1, 0.0, 0.02]);

    // Restart: what was spent stays spent.
    fed.stop_node(0).await;
    fed.start_node(0).await;
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    assert_eq!(budget(&mut alice).await.spent_by_analyst, spent);

    // The same ledger under measure = "pure": refused at start, naming the
    // dataset and both measures, with the ledger and log untouched.
    fed.stop_node(0).await;
    let before = store_contents(&fed, 0);
    let mut pure = fed.nodes[0].config.clone();
    pure.datasets[0].budget.measure = Measure::Pure;
    pure.datasets[0].budget.delta = None;
    let err = refused_start(pure).await;
    assert!(
        err.contains("\"cases\"") && err.contains("\"pure\"") && err.contains("\"zcdp\""),
        "{err}"
    );
    assert_eq!(store_contents(&fed, 0), before, "the ledger is untouched");
    fed.start_node(0).await;
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    assert_eq!(budget(&mut alice).await.spent_by_analyst, spent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pure_ledger_that_spent_refuses_to_start_as_zcdp() {
    let mut fed = TestFederation::start(&[(Partner::Ngo, 300, 5)], roomy_budget()).await;
    let mut alice = fed.raw_client(0, Role::Analyst, "alice").await;
    alice.query(epsilon_query("x1", 0.5)).await.unwrap();
    fed.stop_node(0).await;
    let before = store_contents(&fed, 0);
    let mut cfg = fed.nodes[0].config.clone();
    cfg.datasets[0].budget.measure = Measure::Zcdp;
    cfg.datasets[0].budget.delta = Some(DELTA);
    let err = refused_start(cfg).await;
    assert!(err.contains("mixing measures"), "{err}");
    assert_eq!(store_contents(&fed, 0), before);
}

/// Coverage of the coordinator's combined 95% interval over repeated
/// federated discrete Gaussian queries through three real nodes.
///
/// Calibration. 300 queries of a 4 x 10 GROUP BY (N = 12,000 cells, each
/// with independent noise from each node) at rho = 0.02, i.e. sigma = 5 on
/// each node. The exact coverage q = P[|S| <= w] of the reported half-width
/// w for the sum S of three discrete Gaussian(5) noises is computed here by
/// brute force (q is at least 0.95, a little above as S is an integer).
/// The number of covered cells is Binomial(N, q): the test accepts an
/// observed fraction within 5 standard deviations (sd ~ 0.002) of q, which
/// a correct interval fails with probability below 1e-6. An interval
/// computed as if the sum were one node's noise covers only about 82%
/// (computed below): some 70 standard deviations away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_gaussian_intervals_cover_the_truth_95_percent_of_the_time() {
    let partners = [
        (Partner::Ngo, 3000, 11),
        (Partner::Hotline, 3000, 12),
        (Partner::CaseManagement, 3000, 13),
    ];
    let fed = TestFederation::start(&partners, zcdp(100.0, 1000.0, 1.0)).await;
    let coordinator = fed.federation("alice");
    let sql = "SELECT gender, ageBroad, COUNT(*) FROM cases GROUP BY gender, ageBroad";
    let mut truth: HashMap<Vec<String>, i64> = HashMap::new();
    for n in &fed.nodes {
        for (k, v) in exact_counts(&n.csv, &["gender", "ageBroad"], |_| true) {
            *truth.entry(k).or_default() += v;
        }
    }
    // Exact distribution of the sum of three discrete Gaussian(5) noises.
    let pmf = dg_pmf(5.0, 80);
    let mut sum = BTreeMap::from([(0i64, 1.0f64)]);
    for _ in 0..3 {
        let mut next = BTreeMap::new();
        for (&a, &pa) in &sum {
            for &(b, pb) in &pmf {
                *next.entry(a + b).or_insert(0.0) += pa * pb;
            }
        }
        sum = next;
    }
    let coverage = |w: f64| -> f64 {
        sum.iter()
            .filter(|(k, _)| (**k as f64).abs() <= w)
            .map(|(_, p)| p)
            .sum()
    };
    let one_node = opendp::accuracy::discrete_gaussian_scale_to_accuracy(5.0, 0.05).unwrap();
    let (mut cells, mut covered, mut covered_one, mut width) = (0usize, 0usize, 0usize, None);
    for _ in 0..300 {
        let req = QueryRequest {
            query_id: new_query_id(),
            sql: sql.into(),
            epsilon: 0.0,
            dry_run: false,
            rho: 0.02,
        };
        let outcomes = coordinator
            .query(req.clone(), Duration::from_secs(30))
            .await;
        let c = combine(sql, &req.query_id, 0.0, &outcomes);
        assert!(!c.partial, "{:?}", c.nodes);
        assert_eq!(c.mechanisms, vec!["discrete_gaussian".to_string()]);
        assert_eq!(c.rho, 0.02);
        for row in &c.rows {
            let e = row.estimates[0].expect("an estimate");
            let t = truth.get(&row.key).copied().unwrap_or(0) as f64;
            let w = (e.ci_high - e.ci_low) / 2.0;
            assert_eq!(*width.get_or_insert(w), w, "one width for every cell");
            cells += 1;
            covered += usize::from(e.ci_low <= t && t <= e.ci_high);
            covered_one += usize::from((e.value - t).abs() <= one_node);
        }
    }
    assert_eq!(cells, 300 * 40);
    let q = coverage(width.unwrap());
    assert!((0.95..0.96).contains(&q), "exact coverage {q}");
    let sd = (q * (1.0 - q) / cells as f64).sqrt();
    let observed = covered as f64 / cells as f64;
    let observed_one = covered_one as f64 / cells as f64;
    eprintln!(
        "combined discrete Gaussian CI (w = {}): coverage {observed:.4} over {cells} cells, exact {q:.4}, sd {sd:.4}; one-node CI (w = {one_node}) would cover {observed_one:.4} (exact {:.4})",
        width.unwrap(),
        coverage(one_node)
    );
    assert!(
        (observed - q).abs() <= 5.0 * sd,
        "coverage {observed:.4}, expected {q:.4} +- {:.4}",
        5.0 * sd
    );
    // The same acceptance rule rejects an interval computed as if one node.
    assert!(q - coverage(one_node) > 20.0 * sd);
    assert!(
        (observed_one - q).abs() > 5.0 * sd,
        "one-node coverage {observed_one}"
    );
}

/// What an analyst sees for `fedq query --rho`: the mechanism, the cost in
/// each node's measure with its (epsilon, delta) equivalent, and a dry run
/// that predicts the same interval; a node whose dataset is pure refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_shows_the_mechanism_and_both_costs() {
    use fedq::client::Calls;
    use fedq::output::{render, render_plan, Format};
    use fedq::run::{run_query, QueryOptions};
    let partners = [
        (Partner::Ngo, 800, 21),
        (Partner::Hotline, 800, 22),
        (Partner::CaseManagement, 800, 23),
    ];
    let mut fed = TestFederation::start(&partners, zcdp(1.0, 10.0, 0.5)).await;
    // Node 2 accounts in pure DP (nothing spent yet, so it may switch).
    fed.stop_node(2).await;
    fed.nodes[2].config.datasets[0].budget = roomy_budget();
    fed.start_node(2).await;
    let coordinator = fed.federation("alice");
    let calls = Calls {
        timeout: Duration::from_secs(30),
        retries: 1,
    };
    let opts = |dry_run: bool| QueryOptions {
        secure: false,
        epsilon: 0.0,
        rho: 0.05,
        dry_run,
        calls,
        min_nodes: None,
        query_id: new_query_id(),
    };
    let dry = run_query(&coordinator, SQL, &opts(true)).await.unwrap();
    let plan = render_plan(SQL, &dry, Format::Table).unwrap();
    let eq = zcdp_to_approx(0.05, DELTA).unwrap();
    assert!(plan.contains("discrete_gaussian"), "{plan}");
    assert!(plan.contains("would cost rho 0.05 = ("), "{plan}");
    let o = opts(false);
    let outcomes = run_query(&coordinator, SQL, &o).await.unwrap();
    let c = combine(SQL, &o.query_id, 0.0, &outcomes);
    let table = render(&c, Format::Table).unwrap();
    assert!(
        table.contains("rho 0.05 per node (discrete_gaussian)"),
        "{table}"
    );
    assert!(table.contains("cost rho 0.05 = ("), "{table}");
    assert!(table.contains(&format!("{DELTA})-DP")), "{table}");
    let node = &c.nodes[0];
    let cost = node.cost.expect("a cost");
    assert_eq!((cost.amount, cost.epsilon, cost.delta), (0.05, eq, DELTA));
    assert_eq!(node.measure.as_deref(), Some("zcdp"));
    // The node leaves the total's equivalent to the coordinator, which
    // computes OpenDP's conversion of the total at the answer's delta.
    let spent = outcomes[0]
        .result
        .as_ref()
        .unwrap()
        .budget
        .as_ref()
        .unwrap();
    assert_eq!((spent.spent_epsilon, spent.spent_delta), (0.0, 0.0));
    assert_eq!(
        node.spent_equivalent,
        Some((
            zcdp_to_approx(spent.spent_by_analyst, DELTA).unwrap(),
            DELTA
        ))
    );
    assert!(node.spent_equivalent.unwrap().0 > 0.0);
    let json = render(&c, Format::Json).unwrap();
    assert!(
        json.contains("\"rho\": 0.05") && json.contains("discrete_gaussian"),
        "{json}"
    );
    // The pure node refused, saying why; the other two were combined, and
    // the dry run predicted their combined interval.
    assert!(c.partial);
    assert!(table.contains("--epsilon"), "{table}");
    assert_eq!(c.rows[0].nodes.len(), 2);
    let w = c.rows[0].estimates[0]
        .map(|e| (e.ci_high - e.ci_low) / 2.0)
        .unwrap();
    let m = &outcomes[0].result.as_ref().unwrap().measurements[0];
    let noise = fedq_dp::mechanism::Noise::reported(&m.mechanism, m.scale).unwrap();
    assert_eq!(w, fedq::combine::noise_sum_half_width(&[noise; 2], 0.05));
    assert!(plan.contains(&format!("± {}", w as i64)), "{plan}\n{w}");
}
