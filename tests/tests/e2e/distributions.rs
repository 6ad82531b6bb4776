//! Quantiles, histograms, variances and standard deviations through three
//! real nodes over mutual TLS: the federated values agree with the truth
//! computed independently from the CSVs, and the 95% intervals cover the
//! truth as often as they claim over repeated federated queries.

use std::sync::Arc;
use std::time::Duration;

use fedq::client::new_query_id;
use fedq::combine::{combine, combine_at, sum_half_width, Combined};
use fedq_engine::synth::Partner;
use fedq_proto::v1::QueryRequest;
use fedq_tests::{roomy_budget, TestFederation};

const PARTNERS: [(Partner, usize, u64); 3] = [
    (Partner::Ngo, 5000, 11),
    (Partner::Hotline, 6000, 12),
    (Partner::CaseManagement, 7000, 13),
];

fn request(sql: &str, epsilon: f64) -> QueryRequest {
    QueryRequest {
        query_id: new_query_id(),
        sql: sql.into(),
        epsilon,
        ..Default::default()
    }
}

/// Significance of the intervals that one draw is checked against: a single
/// 95% interval misses the truth one time in twenty, so a test that checks
/// a few of them once would fail about every fifth run. At 1e-6 a miss
/// means the interval is wrong; coverage at 95% is checked over many
/// draws in `federated_intervals_cover_the_truth_as_claimed`.
const ONE_DRAW_ALPHA: f64 = 1e-6;

async fn run(fed: &fedq::client::Federation, sql: &str, epsilon: f64) -> Combined {
    let req = request(sql, epsilon);
    let outcomes = fed.query(req.clone(), Duration::from_secs(60)).await;
    let c = combine_at(sql, &req.query_id, epsilon, &outcomes, ONE_DRAW_ALPHA);
    assert!(!c.partial, "every node should answer {sql}: {:?}", c.nodes);
    c
}

/// Every present traffickMonths value of the three CSVs (optionally only
/// rows with isForcedLabour = 1), with its gender; read here, independently
/// of the node's code.
fn months(fed: &TestFederation, forced_only: bool) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for n in &fed.nodes {
        let mut r = csv::Reader::from_path(&n.csv).unwrap();
        let h = r.headers().unwrap().clone();
        let col = |name: &str| h.iter().position(|x| x == name).unwrap();
        let (m, g, f) = (col("traffickMonths"), col("gender"), col("isForcedLabour"));
        for rec in r.records() {
            let rec = rec.unwrap();
            let v = rec.get(m).unwrap();
            if v.is_empty() || v == "-99" || (forced_only && rec.get(f).unwrap() != "1") {
                continue;
            }
            out.push((rec.get(g).unwrap().to_string(), v.parse().unwrap()));
        }
    }
    out
}

/// The smallest value v with #(x <= v) >= q n (the definition the
/// intervals cover).
fn true_quantile(values: &[i64], q: f64) -> i64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).max(1);
    v[rank - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quantiles_histograms_and_variances_agree_with_the_data() {
    let fed = TestFederation::start(&PARTNERS, roomy_budget()).await;
    let coordinator = fed.federation("alice");
    let forced: Vec<i64> = months(&fed, true).into_iter().map(|x| x.1).collect();

    // Median and 0.9 quantile share one histogram measurement.
    let sql = "SELECT MEDIAN(traffickMonths), QUANTILE(traffickMonths, 0.9) FROM cases WHERE isForcedLabour = 1";
    let c = run(&coordinator, sql, 4.0).await;
    let r = &c.rows[0];
    for (i, q) in [0.5, 0.9].into_iter().enumerate() {
        let truth = true_quantile(&forced, q) as f64;
        let e = r.estimates[i].expect("a quantile estimate");
        // 100 bins over 0..=120: a bin is at most 2 values wide; the noise
        // (scale 0.25 per bin) is negligible next to thousands of records.
        assert!(
            (e.value - truth).abs() <= 2.0,
            "q {q}: estimate {} vs truth {truth}",
            e.value
        );
        assert!(
            e.ci_low <= truth && truth <= e.ci_high && e.ci_high - e.ci_low <= 6.0,
            "q {q}: interval [{}, {}] vs truth {truth}",
            e.ci_low,
            e.ci_high
        );
    }

    // A 12-bin histogram: one row per bin, each within a 1e-7 bound.
    let sql = "SELECT HISTOGRAM(traffickMonths, 12) FROM cases WHERE isForcedLabour = 1";
    let c = run(&coordinator, sql, 2.0).await;
    assert_eq!(c.rows.len(), 12);
    assert_eq!(c.group_by, vec!["HISTOGRAM(traffickMonths, 12) bin"]);
    let edges = fedq_dp::distribution::bin_edges(0, 120, 12);
    let bound = sum_half_width(&[0.5; 3], 1e-7);
    for (b, row) in c.rows.iter().enumerate() {
        assert_eq!(row.key, vec![format!("{}..{}", edges[b], edges[b + 1] - 1)]);
        let truth = forced
            .iter()
            .filter(|&&v| edges[b] <= v && v < edges[b + 1])
            .count() as f64;
        let e = row.estimates[0].unwrap();
        assert!(
            (e.value - truth).abs() <= bound,
            "bin {b}: {} vs {truth} (bound {bound})",
            e.value
        );
    }

    // Variance and standard deviation per gender.
    let all = months(&fed, false);
    let sql = "SELECT gender, VARIANCE(traffickMonths), STDDEV(traffickMonths) FROM cases GROUP BY gender";
    let c = run(&coordinator, sql, 6.0).await;
    let mut checked = 0;
    for row in &c.rows {
        let v: Vec<f64> = all
            .iter()
            .filter(|(g, _)| *g == row.key[0])
            .map(|x| x.1 as f64)
            .collect();
        if v.len() < 500 {
            continue;
        }
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let (ve, se) = (row.estimates[0].unwrap(), row.estimates[1].unwrap());
        assert!(
            (ve.value - var).abs() <= 0.05 * var,
            "{:?}: variance {} vs {var}",
            row.key,
            ve.value
        );
        assert!(
            ve.ci_low <= var && var <= ve.ci_high,
            "{:?}: {ve:?} vs {var}",
            row.key
        );
        assert!((se.value - var.sqrt()).abs() <= 0.03 * var.sqrt());
        assert!(se.ci_low <= var.sqrt() && var.sqrt() <= se.ci_high);
        checked += 1;
    }
    assert!(checked >= 2, "at least two genders have enough records");

    // Bad arguments are refused with what to do, nothing spent.
    for (sql, expect) in [
        (
            "SELECT QUANTILE(traffickMonths, 1.5) FROM cases",
            "from 0 to 1",
        ),
        (
            "SELECT HISTOGRAM(traffickMonths, 0) FROM cases",
            "whole number from 1 to 121",
        ),
        (
            "SELECT HISTOGRAM(traffickMonths, 12), COUNT(*) FROM cases",
            "on its own",
        ),
        ("SELECT MEDIAN(gender) FROM cases", "integer column"),
        (
            "SELECT VARIANCE(traffickMonths, 2) FROM cases",
            "exactly one argument",
        ),
    ] {
        let req = request(sql, 1.0);
        let outcomes = coordinator.query(req, Duration::from_secs(30)).await;
        for o in &outcomes {
            let e = o.result.as_ref().expect_err(sql).to_string();
            assert!(e.contains(expect), "{sql}: {e}");
        }
    }
}

/// Over repeated federated queries, the combined 95% interval of a COUNT
/// (exact convolution of the three nodes' discrete Laplace noises) covers
/// the truth 95% of the time or more, and so does the median's
/// (conservative: Chernoff band and union bound). The acceptance region is
/// four binomial standard deviations below 95%. The same check rejects the
/// mistake of using one node's interval for the federated sum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_intervals_cover_the_truth_as_claimed() {
    const RUNS: usize = 240;
    let fed = TestFederation::start(&PARTNERS, roomy_budget()).await;
    let coordinator = Arc::new(fed.federation("alice"));
    let forced: Vec<i64> = months(&fed, true).into_iter().map(|x| x.1).collect();
    let true_count = {
        let mut n = 0;
        for node in &fed.nodes {
            n += fedq_tests::exact_counts(&node.csv, &[], |get| get("isForcedLabour") == "1")
                .values()
                .sum::<i64>();
        }
        n as f64
    };
    let true_median = true_quantile(&forced, 0.5) as f64;
    let sql = "SELECT COUNT(*), MEDIAN(traffickMonths) FROM cases WHERE isForcedLabour = 1";

    let mut tasks = tokio::task::JoinSet::new();
    let results = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    for worker in 0..4 {
        let coordinator = coordinator.clone();
        let results = results.clone();
        tasks.spawn(async move {
            for _ in (worker..RUNS).step_by(4) {
                let req = request(sql, 0.2);
                let outcomes = coordinator
                    .query(req.clone(), Duration::from_secs(60))
                    .await;
                let single = outcomes[0].result.as_ref().unwrap().measurements[0].ci95_half_width;
                let c = combine(sql, &req.query_id, 0.2, &outcomes);
                assert!(!c.partial);
                results
                    .lock()
                    .await
                    .push((c.rows[0].estimates.clone(), single));
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let results = results.lock().await;
    assert_eq!(results.len(), RUNS);
    let (mut count_in, mut median_in, mut naive_in) = (0, 0, 0);
    for (est, single) in results.iter() {
        let (c, m) = (est[0].unwrap(), est[1].unwrap());
        count_in += usize::from(c.ci_low <= true_count && true_count <= c.ci_high);
        median_in += usize::from(m.ci_low <= true_median && true_median <= m.ci_high);
        naive_in += usize::from((c.value - true_count).abs() <= *single);
    }
    let sd = (0.95f64 * 0.05 / RUNS as f64).sqrt();
    let floor = 0.95 - 4.0 * sd;
    let rate = |k: usize| k as f64 / RUNS as f64;
    println!(
        "coverage over {RUNS} federated queries: COUNT {:.3}, MEDIAN {:.3}, one-node interval {:.3} (floor {floor:.3})",
        rate(count_in),
        rate(median_in),
        rate(naive_in)
    );
    assert!(rate(count_in) >= floor, "COUNT coverage {}", rate(count_in));
    assert!(
        rate(median_in) >= floor,
        "MEDIAN coverage {}",
        rate(median_in)
    );
    // One node's interval for a sum of three noises covers ~78%: the test
    // would catch that mistake.
    assert!(
        rate(naive_in) < floor,
        "one-node interval coverage {}",
        rate(naive_in)
    );
}
