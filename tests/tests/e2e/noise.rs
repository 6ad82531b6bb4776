//! The noise on released counts has the claimed discrete Laplace scale.
//!
//! Calibration. Many GROUP BY releases against one node (large budget); the
//! test knows every cell's exact count (from the CSV), so it sees each
//! noise value. For discrete Laplace with scale t, q = e^{-1/t}:
//! E|X| = 2q / (1 - q^2) and E[X^2] = 2q / (1 - q)^2. With n samples the
//! mean of |X| has standard error sd(|X|)/sqrt(n). The test accepts when
//! the observed mean of |X| is within 6 standard errors of the claim:
//! a correct mechanism fails with probability about 2e-9 (normal
//! approximation; n is in the thousands), well under one in a million.
//! With n = 20 * 210 = 4200 and t = 10 a scale off by 20% moves the mean
//! of |X| by about 2.0, i.e. about 13 standard errors: it fails reliably.

use fedq_engine::synth::Partner;
use fedq_pki::Role;
use fedq_proto::v1::QueryRequest;
use fedq_tests::{exact_counts, roomy_budget, TestFederation};

/// Mean of |X| and standard deviation of |X| for discrete Laplace(scale).
fn abs_moments(scale: f64) -> (f64, f64) {
    let q = (-1.0 / scale).exp();
    let mean_abs = 2.0 * q / (1.0 - q * q);
    let second = 2.0 * q / ((1.0 - q) * (1.0 - q));
    (mean_abs, (second - mean_abs * mean_abs).sqrt())
}

#[test]
fn scale_off_by_twenty_percent_would_be_detected() {
    // The acceptance rule below, applied to the expectation under a wrong
    // scale, must reject: this keeps the test from being toothless.
    let n = 4200.0;
    let (m, sd) = abs_moments(10.0);
    for wrong in [8.0, 12.0] {
        let (m_wrong, _) = abs_moments(wrong);
        assert!(
            (m_wrong - m).abs() > 6.0 * sd / f64::sqrt(n) * 1.5,
            "scale {wrong} would pass"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_count_noise_has_the_claimed_discrete_laplace_scale() {
    let fed = TestFederation::start(&[(Partner::CaseManagement, 5000, 9)], roomy_budget()).await;
    let mut client = fed.raw_client(0, Role::Analyst, "stats").await;
    let truth = exact_counts(
        &fed.nodes[0].csv,
        &["CountryOfExploitation", "ageBroad"],
        |_| true,
    );
    let sql = "SELECT CountryOfExploitation, ageBroad, COUNT(*) FROM cases GROUP BY CountryOfExploitation, ageBroad";
    let epsilon = 0.1;
    let mut noise = Vec::new();
    for i in 0..20 {
        let r = client
            .query(QueryRequest {
                query_id: format!("noise-{i}"),
                sql: sql.into(),
                epsilon,
                dry_run: false,
                rho: 0.0,
            })
            .await
            .expect("query")
            .into_inner();
        let m = &r.measurements[0];
        assert!((m.scale - 10.0).abs() < 1e-9, "claimed scale {}", m.scale);
        assert_eq!(m.values.len(), r.cells.len());
        for (cell, &v) in r.cells.iter().zip(&m.values) {
            let exact = truth.get(&cell.values).copied().unwrap_or(0);
            noise.push((v - exact) as f64);
        }
    }
    let n = noise.len() as f64;
    assert_eq!(
        noise.len(),
        20 * 210,
        "21 countries (20 + missing) x 10 age keys per release"
    );
    let (mean_abs, sd_abs) = abs_moments(10.0);
    let observed = noise.iter().map(|x| x.abs()).sum::<f64>() / n;
    let se = sd_abs / n.sqrt();
    assert!(
        (observed - mean_abs).abs() <= 6.0 * se,
        "mean |noise| {observed:.3}, claimed {mean_abs:.3} (6 se = {:.3})",
        6.0 * se
    );
    // Unbiased: the mean noise is within 6 standard errors of zero.
    let sd = (2.0 * (-0.1f64).exp() / (1.0 - (-0.1f64).exp()).powi(2)).sqrt();
    let mean = noise.iter().sum::<f64>() / n;
    assert!(mean.abs() <= 6.0 * sd / n.sqrt(), "mean noise {mean:.3}");
    // Not the same noise twice: releases are independent draws.
    assert!(noise.windows(2).any(|w| w[0] != w[1]));
}
