//! Three real nodes over mutual-TLS gRPC: combined results are right within
//! the claimed noise, intervals have the width the mechanism implies, and a
//! node that is down yields a partial result that names it.

use std::time::Duration;

use fedq::client::{new_query_id, Failure};
use fedq::combine::{combine, sum_half_width, ALPHA};
use fedq_engine::synth::Partner;
use fedq_proto::v1::QueryRequest;
use fedq_tests::{exact_counts, opendp_accuracy, roomy_budget, TestFederation};

const PARTNERS: [(Partner, usize, u64); 3] = [
    (Partner::Ngo, 6000, 1),
    (Partner::Hotline, 7000, 2),
    (Partner::CaseManagement, 8000, 3),
];

fn request(sql: &str, epsilon: f64) -> QueryRequest {
    QueryRequest {
        query_id: new_query_id(),
        sql: sql.into(),
        epsilon,
        dry_run: false,
        rho: 0.0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_counts_lie_within_the_claimed_noise_and_report_the_implied_ci() {
    let fed = TestFederation::start(&PARTNERS, roomy_budget()).await;
    let coordinator = fed.federation("alice");
    let sql = "SELECT gender, COUNT(*) FROM cases WHERE isForcedLabour = 1 GROUP BY gender";
    let epsilon = 0.5;
    let req = request(sql, epsilon);
    let outcomes = coordinator
        .query(req.clone(), Duration::from_secs(30))
        .await;
    let combined = combine(sql, &req.query_id, epsilon, &outcomes);
    assert!(
        !combined.partial,
        "all three nodes should answer: {:?}",
        combined.nodes
    );

    // The truth, computed from the CSVs independently of the nodes' code.
    let mut truth = std::collections::HashMap::<Vec<String>, i64>::new();
    for n in &fed.nodes {
        for (k, v) in exact_counts(&n.csv, &["gender"], |get| get("isForcedLabour") == "1") {
            *truth.entry(k).or_default() += v;
        }
    }
    // Each node's count noise has scale 1/epsilon (sensitivity 1).
    for o in &outcomes {
        let r = o.result.as_ref().unwrap();
        let m = &r.measurements[0];
        assert_eq!(m.mechanism, "discrete_laplace");
        assert!((m.scale - 1.0 / epsilon).abs() < 1e-9, "scale {}", m.scale);
        assert!((m.ci95_half_width - opendp_accuracy(m.scale, 0.05)).abs() < 1e-9);
        assert_eq!(r.cells.len(), 4, "3 declared genders plus (missing)");
    }
    // With probability 1 - 1e-6 every node's noise is below its
    // 1e-6/(3 * cells) accuracy (union bound over nodes and cells).
    let cells = combined.rows.len() as f64;
    let bound = 3.0 * opendp_accuracy(1.0 / epsilon, 1e-6 / (3.0 * cells));
    // The 95% half-width of the sum of three discrete Laplace(2) noises,
    // by brute-force enumeration here (independent of the coordinator).
    let q = (-epsilon).exp();
    let p = |x: i64| (1.0 - q) / (1.0 + q) * q.powi(x.abs() as i32);
    let mut pmf = std::collections::HashMap::<i64, f64>::new();
    for a in -80i64..=80 {
        for b in -80i64..=80 {
            for c in -80i64..=80 {
                *pmf.entry(a + b + c).or_default() += p(a) * p(b) * p(c);
            }
        }
    }
    let mut w = 0i64;
    while pmf
        .iter()
        .filter(|(k, _)| k.abs() > w)
        .map(|(_, v)| v)
        .sum::<f64>()
        > ALPHA
    {
        w += 1;
    }
    assert_eq!(sum_half_width(&[2.0, 2.0, 2.0], ALPHA), w as f64);
    for row in &combined.rows {
        let est = row.estimates[0].expect("a count");
        let exact = truth.get(&row.key).copied().unwrap_or(0) as f64;
        assert!(
            (est.value - exact).abs() <= bound,
            "{:?}: combined {} vs true {} exceeds the 1e-6 bound {}",
            row.key,
            est.value,
            exact,
            bound
        );
        assert_eq!(row.nodes.len(), 3);
        assert_eq!(
            est.ci_high - est.value,
            w as f64,
            "CI half-width for {:?}",
            row.key
        );
        assert_eq!(est.value - est.ci_low, w as f64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn average_is_within_its_interval_bounds_and_sums_add_up() {
    let fed = TestFederation::start(&PARTNERS, roomy_budget()).await;
    let coordinator = fed.federation("alice");
    let sql = "SELECT COUNT(*), SUM(traffickMonths), AVG(traffickMonths) FROM cases WHERE yearOfRegistration >= 2010";
    let req = request(sql, 3.0);
    let outcomes = coordinator
        .query(req.clone(), Duration::from_secs(30))
        .await;
    let combined = combine(sql, &req.query_id, 3.0, &outcomes);
    let r0 = outcomes[0].result.as_ref().unwrap();
    // SUM and AVG share one noisy sum: three measurements, one epsilon each.
    assert_eq!(r0.measurements.len(), 3);
    for m in &r0.measurements {
        assert!((m.epsilon - 1.0).abs() < 1e-12);
    }
    assert_eq!(
        r0.measurements[1].sensitivity, 120.0,
        "declared bounds 0..=120"
    );
    // Truth from the CSVs.
    let (mut sum, mut present) = (0i64, 0i64);
    for n in &fed.nodes {
        let mut r = csv::Reader::from_path(&n.csv).unwrap();
        let h = r.headers().unwrap().clone();
        let (yi, ti) = (
            h.iter().position(|c| c == "yearOfRegistration").unwrap(),
            h.iter().position(|c| c == "traffickMonths").unwrap(),
        );
        for rec in r.records() {
            let rec = rec.unwrap();
            if rec[yi].parse::<i64>().unwrap() >= 2010 && rec[ti] != *"-99" {
                sum += rec[ti].parse::<i64>().unwrap();
                present += 1;
            }
        }
    }
    let row = &combined.rows[0];
    let s = row.estimates[1].unwrap();
    let bound = 3.0 * opendp_accuracy(120.0, 1e-6 / 6.0);
    assert!(
        (s.value - sum as f64).abs() <= bound,
        "sum {} vs {sum}",
        s.value
    );
    let avg = row.estimates[2].unwrap();
    let true_avg = sum as f64 / present as f64;
    assert!(avg.ci_low <= avg.value && avg.value <= avg.ci_high);
    assert!(
        avg.ci_low >= 0.0 && avg.ci_high <= 120.0,
        "clamped to the declared bounds"
    );
    // With ~15k present values the mean is pinned down to well under a month.
    assert!(
        (avg.value - true_avg).abs() < 0.5,
        "avg {} vs {true_avg}",
        avg.value
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_is_down_gives_a_partial_result_naming_it() {
    let mut fed = TestFederation::start(&PARTNERS, roomy_budget()).await;
    let coordinator = fed.federation("alice");
    fed.stop_node(1).await;
    let sql = "SELECT COUNT(*) FROM cases";
    let req = request(sql, 0.5);
    let outcomes = coordinator
        .query(req.clone(), Duration::from_secs(10))
        .await;
    let combined = combine(sql, &req.query_id, 0.5, &outcomes);
    assert!(combined.partial);
    let down = &combined.nodes[1];
    assert_eq!(down.node, "node-1");
    assert!(
        matches!(down.failure, Some(Failure::Unreachable(_))),
        "{:?}",
        down.failure
    );
    assert_eq!(
        combined.rows[0].nodes,
        vec!["node-0".to_string(), "node-2".to_string()]
    );
    let rendered = fedq::output::render(&combined, fedq::output::Format::Table).unwrap();
    assert!(
        rendered.contains("PARTIAL RESULT")
            && rendered.contains("node-1")
            && rendered.contains("unreachable"),
        "{rendered}"
    );
    // The other two spent their epsilon; the down node spent nothing.
    assert_eq!(
        combined
            .nodes
            .iter()
            .filter(|n| n.epsilon_spent.is_some())
            .count(),
        2
    );
}
