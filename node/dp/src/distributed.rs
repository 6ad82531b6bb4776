//! The distributed discrete Gaussian: each of `n` nodes adds a discrete
//! Gaussian *share* of the noise to its values, the shares are summed
//! under secure aggregation, and only the sum is released. Kairouz, Liu
//! and Steinke, "The Distributed Discrete Gaussian Mechanism for Federated
//! Learning with Secure Aggregation", ICML 2021 (arXiv 2102.06387),
//! Theorem 1 and Proposition 14.
//!
//! # The bound used, and why it is enough
//!
//! Let `Z = Z_1 + ... + Z_n` with `Z_i ~ N_Z(0, σ²)` independent (the
//! discrete Gaussian with parameter σ, as OpenDP's `make_gaussian` samples
//! on integers), added to a vector of dimension `d` whose L2 sensitivity
//! is `Δ`. With `τ = 10 Σ_{k=1}^{n-1} exp(-2π²σ² k/(k+1))`, the paper
//! shows (Proposition 14, third form) Rényi DP of order α at most
//! `(α/2) (Δ/(√n σ) + τ √d)²` for every α > 1: that is ρ-zCDP with
//!
//! ```text
//! ρ = ½ (Δ / (√n σ) + τ √d)²
//! ```
//!
//! For `n = 1`, τ = 0 and this is the discrete Gaussian's own `Δ²/(2σ²)`,
//! the bound OpenDP's privacy map states ([`crate::mechanism`]). A sum is
//! never guaranteed by more shares than the honest ones: a node
//! calibrates its share for the smallest number `t` of honest participants
//! its dataset's policy relies on, and the shares of further participants
//! are independent noise added on top (post-processing), which cannot
//! weaken the guarantee. [`share_scale`] finds the smallest σ with
//! `ρ(σ, t) ≤` the release's ρ.
//!
//! Only zCDP is offered: a pure-DP path (discrete Laplace as a sum of
//! shares, e.g. differences of Pólya variables) would need an exact
//! negative-binomial sampler, which OpenDP does not provide, so it is
//! refused (the noise must come from OpenDP, DESIGN invariant 1).

use crate::error::DpError;
use std::f64::consts::PI;

/// The τ of Theorem 1 for the sum of `n` shares of parameter `sigma`: how
/// far the sum is from a discrete Gaussian, in the paper's measure.
pub fn tau(sigma: f64, n: u32) -> f64 {
    let s2 = sigma * sigma;
    10.0 * (1..n)
        .map(|k| {
            let k = k as f64;
            (-2.0 * PI * PI * s2 * k / (k + 1.0)).exp()
        })
        .sum::<f64>()
}

/// The zCDP ρ of releasing a vector of dimension `dim` and L2 sensitivity
/// `l2` plus the sum of `n` independent discrete Gaussian shares of
/// parameter `sigma` each (see the module doc).
pub fn rho_of_sum(l2: i64, sigma: f64, n: u32, dim: usize) -> f64 {
    let n = n.max(1);
    let a = l2 as f64 / ((n as f64).sqrt() * sigma) + tau(sigma, n) * (dim as f64).sqrt();
    a * a / 2.0
}

/// The smallest share parameter σ (within one part in 10^9) such that the
/// sum of the shares of `t` honest participants makes the release of a
/// vector of dimension `dim` and L2 sensitivity `l2` ρ-zCDP. Starts from
/// the Gaussian value `l2 / sqrt(2 ρ t)` (τ = 0) and grows σ until τ's
/// term fits too, then bisects.
pub fn share_scale(l2: i64, rho: f64, t: u32, dim: usize) -> Result<f64, DpError> {
    if !(rho.is_finite() && rho > 0.0) {
        return Err(DpError::Invalid(format!(
            "rho must be positive and finite, got {rho}"
        )));
    }
    if t == 0 {
        return Err(DpError::Invalid(
            "the number of honest participants must be at least 1".into(),
        ));
    }
    if l2 <= 0 {
        return Err(DpError::Invalid(format!(
            "the L2 sensitivity must be positive, got {l2}"
        )));
    }
    let fits = |s: f64| rho_of_sum(l2, s, t, dim) <= rho;
    let mut low = l2 as f64 / (2.0 * rho * t as f64).sqrt();
    if fits(low) {
        // τ's term is below float resolution here: the Gaussian value.
        return Ok(low);
    }
    let mut high = low;
    for _ in 0..200 {
        high *= 1.25;
        if fits(high) {
            break;
        }
    }
    if !fits(high) {
        return Err(DpError::Invalid(format!(
            "no share scale makes {t} shares of a {dim}-value release {rho}-zCDP"
        )));
    }
    while (high - low) / high > 1e-9 {
        let mid = (low + high) / 2.0;
        if fits(mid) {
            high = mid;
        } else {
            low = mid;
        }
    }
    Ok(high)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mechanism::discrete_gaussian_scale;

    #[test]
    fn one_share_is_the_discrete_gaussian() {
        for (l2, rho) in [(1, 0.5), (3, 0.01), (100, 2.0)] {
            let ours = share_scale(l2, rho, 1, 10).unwrap();
            let opendp = discrete_gaussian_scale(l2, rho).unwrap();
            assert!(
                (ours - opendp).abs() / opendp < 1e-9,
                "{l2} {rho}: {ours} vs OpenDP {opendp}"
            );
        }
    }

    #[test]
    fn shares_meet_the_bound_and_are_near_the_central_scale() {
        for t in [2u32, 3, 10, 30] {
            for dim in [1usize, 100, 10_000] {
                for (l2, rho) in [(1i64, 0.05), (1, 0.5), (12, 0.1)] {
                    let s = share_scale(l2, rho, t, dim).unwrap();
                    assert!(rho_of_sum(l2, s, t, dim) <= rho);
                    // Minimal: a little less noise breaks the bound.
                    assert!(rho_of_sum(l2, s * (1.0 - 1e-6), t, dim) > rho);
                    // The summed variance is about the central one: t σ² ≥
                    // the central σ², and close to it once σ is not tiny.
                    let central = discrete_gaussian_scale(l2, rho).unwrap();
                    let summed = s * (t as f64).sqrt();
                    assert!(summed >= central * (1.0 - 1e-9), "{t} {dim} {l2} {rho}");
                    if s > 1.5 {
                        assert!(
                            summed < central * 1.01,
                            "{t} {dim} {l2} {rho}: {summed} vs {central}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn tau_vanishes_for_wide_shares_and_not_for_narrow_ones() {
        assert_eq!(tau(1.0, 1), 0.0);
        assert!(tau(0.3, 5) > 1.0);
        assert!(tau(3.0, 100) < 1e-30);
    }

    /// The pmf of the sum of `n` independent discrete Gaussians of
    /// parameter `sigma`, on `-reach..=reach` (index `x + reach`), computed
    /// here from `e^{-x^2/(2 sigma^2)}` independently of the sampler.
    fn summed_pmf(sigma: f64, n: u32, reach: i64) -> Vec<f64> {
        let one_reach = (sigma * 12.0).ceil() as i64 + 2;
        let one: Vec<f64> = (-one_reach..=one_reach)
            .map(|x| (-((x * x) as f64) / (2.0 * sigma * sigma)).exp())
            .collect();
        let z: f64 = one.iter().sum();
        let one: Vec<f64> = one.iter().map(|w| w / z).collect();
        let mut sum = vec![1.0];
        for _ in 0..n {
            let mut next = vec![0.0; sum.len() + one.len() - 1];
            for (i, a) in sum.iter().enumerate() {
                for (j, b) in one.iter().enumerate() {
                    next[i + j] += a * b;
                }
            }
            sum = next;
        }
        // sum[i] is P[S = i - n * one_reach].
        let offset = n as i64 * one_reach;
        (-reach..=reach)
            .map(|x| {
                usize::try_from(x + offset)
                    .ok()
                    .and_then(|i| sum.get(i))
                    .copied()
                    .unwrap_or(0.0)
            })
            .collect()
    }

    /// The chi-square statistic of `samples` against `pmf` (on
    /// `-reach..=reach`), over cells merged from the outside in until each
    /// expects at least 20 samples; returns it with its degrees of freedom.
    fn chi_square(samples: &[i64], pmf: &[f64], reach: i64) -> (f64, usize) {
        let n = samples.len() as f64;
        let mut observed = vec![0.0; pmf.len()];
        for &s in samples {
            let i = (s.clamp(-reach, reach) + reach) as usize;
            observed[i] += 1.0;
        }
        // Cells: the central values with enough expectation, each tail
        // (including everything beyond `reach`) merged into one cell.
        let mut expected = pmf.to_vec();
        let lost = 1.0 - pmf.iter().sum::<f64>();
        expected[0] += lost / 2.0;
        let last = expected.len() - 1;
        expected[last] += lost / 2.0;
        let mut cells: Vec<(f64, f64)> = Vec::new();
        let (mut lo, mut hi) = (0usize, last);
        let (mut acc_o, mut acc_e) = (0.0, 0.0);
        while lo < hi && (acc_e + expected[lo]) * n < 20.0 {
            acc_o += observed[lo];
            acc_e += expected[lo];
            lo += 1;
        }
        cells.push((acc_o + observed[lo], acc_e + expected[lo]));
        let (mut tail_o, mut tail_e) = (0.0, 0.0);
        while hi > lo && (tail_e + expected[hi]) * n < 20.0 {
            tail_o += observed[hi];
            tail_e += expected[hi];
            hi -= 1;
        }
        for i in lo + 1..hi {
            cells.push((observed[i], expected[i]));
        }
        cells.push((tail_o + observed[hi], tail_e + expected[hi]));
        let stat = cells
            .iter()
            .map(|&(o, e)| (o - n * e).powi(2) / (n * e))
            .sum();
        (stat, cells.len() - 1)
    }

    /// The chi-square quantile with `df` degrees of freedom that is
    /// exceeded with probability about `Phi(-z)` (Wilson and Hilferty's
    /// cube-root approximation, within a percent or two of the exact
    /// quantile for these `df`).
    fn chi_square_critical(df: usize, z: f64) -> f64 {
        let k = df as f64;
        let c = 2.0 / (9.0 * k);
        k * (1.0 - c + z * c.sqrt()).powi(3)
    }

    /// The noise of a secure sum, drawn as the nodes draw it: each of `t`
    /// shares from OpenDP (`Noise::DiscreteGaussian { scale: share }`) at
    /// the share scale calibrated for `t` honest participants, added up.
    /// Calibrated distribution test (STYLE.md): N = 100,000 sums per case,
    /// three checks, each with a false-failure probability below 1e-7 for
    /// a correct mechanism (so below 1e-6 for the whole test):
    ///
    /// - the sample variance is within 5.5 standard deviations of `t`
    ///   times the share's variance (the sd of a sample variance is
    ///   `sigma^2 sqrt((kurtosis - 1) / N)`; kurtosis 3 here, plus 10%);
    /// - the chi-square statistic against the exact pmf of the sum of `t`
    ///   discrete Gaussians (convolved here) is below its Wilson–Hilferty
    ///   quantile at z = 5.5 (p about 2e-8);
    /// - the share of sums inside the *central* 95% interval (OpenDP's
    ///   discrete Gaussian at the central scale for the same rho) is within
    ///   5.5 binomial sd of that pmf's mass there, and that mass is at
    ///   least 94.5% (95% less half a percent; integer values make it
    ///   more): the sum is as accurate as one central release.
    ///
    /// And each check can fail: the same test run on the sum of `t - 1`
    /// shares (a participant's share missing, variance 1 - 1/t smaller)
    /// fails the variance and chi-square checks by a wide margin.
    #[test]
    fn the_sum_of_shares_has_the_central_distribution() {
        use crate::mechanism::{Exact, Noise};
        const N: usize = 100_000;
        const Z: f64 = 5.5;
        for (l2, rho, t) in [(1i64, 0.05, 3u32), (2, 0.2, 5)] {
            let share = share_scale(l2, rho, t, 1).unwrap();
            let draws: Vec<Vec<i64>> = (0..t)
                .map(|_| {
                    Noise::DiscreteGaussian { scale: share }
                        .release(&Exact::new(vec![0i64; N]))
                        .unwrap()
                })
                .collect();
            let sum_of = |shares: &[Vec<i64>]| -> Vec<i64> {
                (0..N).map(|i| shares.iter().map(|s| s[i]).sum()).collect()
            };
            let central = Noise::for_rho(l2, rho).unwrap();
            let half = central.half_width(0.05).unwrap();
            let share_var = Noise::DiscreteGaussian { scale: share }.variance();
            // (variance ok, chi-square ok, coverage) of `t_used` shares.
            let check = |t_used: u32| -> (bool, bool, f64) {
                let s = sum_of(&draws[..t_used as usize]);
                let n = N as f64;
                let mean = s.iter().sum::<i64>() as f64 / n;
                let var = s.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
                // Claimed: t shares.
                let claimed = t as f64 * share_var;
                let sd = claimed * (2.2 / n).sqrt();
                let var_ok = (var - claimed).abs() <= Z * sd;
                let reach = (share * (t as f64).sqrt() * 8.0).ceil() as i64;
                let pmf = summed_pmf(share, t, reach);
                let (stat, df) = chi_square(&s, &pmf, reach);
                let chi_ok = stat <= chi_square_critical(df, Z);
                let inside = s.iter().filter(|&&x| (x as f64).abs() < half).count() as f64 / n;
                eprintln!(
                    "l2 {l2} rho {rho}: {t_used} of {t} shares of scale {share:.4}: variance {var:.3} (claimed {claimed:.3} +- {:.3}), chi-square {stat:.1} on {df} df (critical {:.1}), central 95% interval +-{half:.2} covers {inside:.4}",
                    Z * sd,
                    chi_square_critical(df, Z)
                );
                (var_ok, chi_ok, inside)
            };
            let (var_ok, chi_ok, inside) = check(t);
            assert!(var_ok, "l2 {l2} rho {rho} t {t}: variance");
            assert!(chi_ok, "l2 {l2} rho {rho} t {t}: chi-square");
            let reach = (share * (t as f64).sqrt() * 8.0).ceil() as i64;
            let pmf = summed_pmf(share, t, reach);
            let mass: f64 = (-reach..=reach)
                .zip(&pmf)
                .filter(|(x, _)| (*x as f64).abs() < half)
                .map(|(_, p)| p)
                .sum();
            assert!(
                mass >= 0.945,
                "the central interval holds only {mass} of the sum's mass"
            );
            let sd = (mass * (1.0 - mass) / N as f64).sqrt();
            assert!(
                (inside - mass).abs() <= Z * sd,
                "coverage {inside} vs {mass} +- {}",
                Z * sd
            );
            // A share missing: caught.
            let (var_ok, chi_ok, _) = check(t - 1);
            assert!(!var_ok && !chi_ok, "t - 1 shares pass for {t}");
        }
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(share_scale(1, f64::NAN, 3, 1).is_err());
        assert!(share_scale(1, -1.0, 3, 1).is_err());
        assert!(share_scale(1, 0.5, 0, 1).is_err());
        assert!(share_scale(0, 0.5, 3, 1).is_err());
    }
}
