//! Noise, only from OpenDP (DESIGN invariant 1).
//!
//! Every released vector goes through [`release_discrete_laplace`], which
//! builds OpenDP's vector discrete Laplace measurement
//! (`opendp::measurements::make_laplace` over `VectorDomain<AtomDomain<i64>>`
//! with the `L1Distance<i64>` metric and the `MaxDivergence` measure, i.e.
//! pure epsilon-DP) and invokes it. OpenDP's samplers draw from OpenSSL's
//! CSPRNG (`use-openssl`).
//!
//! **Guarantee.** For an input vector whose L1 sensitivity under adding or
//! removing one privacy unit is at most `sensitivity`, the release is
//! `epsilon`-DP, where the scale is chosen so that OpenDP's own privacy map
//! reports a loss of at most `epsilon` at `d_in = sensitivity`
//! ([`discrete_laplace_scale`] checks this with the measurement's `map`).
//!
//! `Measurement` is neither `Send` nor `Sync` in OpenDP 0.16, so it is built
//! and invoked inside the caller's (blocking) task and never stored.

use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_laplace;
use opendp::measures::MaxDivergence;
use opendp::metrics::L1Distance;

/// Name of the mechanism as reported to analysts.
pub const DISCRETE_LAPLACE: &str = "discrete_laplace";

/// Significance of reported intervals: they are 95% confidence intervals.
pub const CI_ALPHA: f64 = 0.05;

/// OpenDP's vector discrete Laplace measurement under pure DP.
type VectorLaplace = opendp::core::Measurement<
    VectorDomain<AtomDomain<i64>>,
    L1Distance<i64>,
    MaxDivergence,
    Vec<i64>,
>;

fn measurement(scale: f64) -> opendp::error::Fallible<VectorLaplace> {
    make_laplace(
        VectorDomain::new(AtomDomain::<i64>::default()),
        L1Distance::<i64>::default(),
        scale,
        None,
    )
}

/// The smallest scale (up to float rounding) whose OpenDP privacy map gives
/// a loss of at most `epsilon` for a vector of L1 sensitivity `sensitivity`.
pub fn discrete_laplace_scale(sensitivity: i64, epsilon: f64) -> Result<f64, String> {
    if !(epsilon.is_finite() && epsilon > 0.0) {
        return Err(format!(
            "epsilon must be positive and finite, got {epsilon}"
        ));
    }
    let mut scale = sensitivity as f64 / epsilon;
    // OpenDP rounds its map conservatively (upwards); nudge the scale up
    // until the reported loss fits.
    for _ in 0..64 {
        let m = measurement(scale)
            .map_err(|e| format!("cannot build the mechanism: {:?}", e.variant))?;
        let loss = m
            .map(&sensitivity)
            .map_err(|e| format!("cannot compute the privacy loss: {:?}", e.variant))?;
        if loss <= epsilon {
            return Ok(scale);
        }
        scale *= 1.0 + 1e-12;
    }
    Err(format!("no discrete Laplace scale fits epsilon {epsilon}"))
}

/// Adds discrete Laplace noise of `scale` to each value, with OpenDP.
/// On failure returns a message that contains no value of the input.
pub fn release_discrete_laplace(exact: &Vec<i64>, scale: f64) -> Result<Vec<i64>, String> {
    let m =
        measurement(scale).map_err(|e| format!("cannot build the mechanism: {:?}", e.variant))?;
    m.invoke(exact)
        .map_err(|e| format!("the noise sampler failed ({:?})", e.variant))
}

/// Variance of discrete Laplace noise with `scale` t:
/// `2 e^{-1/t} / (1 - e^{-1/t})^2`.
pub fn discrete_laplace_variance(scale: f64) -> f64 {
    let q = (-1.0 / scale).exp();
    2.0 * q / ((1.0 - q) * (1.0 - q))
}

/// Half-width `a` of the `1 - alpha` confidence interval of one value:
/// `P[|noise| >= a] <= alpha`, from `opendp::accuracy`.
pub fn discrete_laplace_half_width(scale: f64, alpha: f64) -> Result<f64, String> {
    opendp::accuracy::discrete_laplacian_scale_to_accuracy(scale, alpha)
        .map_err(|e| format!("cannot compute the accuracy: {:?}", e.variant))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_meets_epsilon_exactly_enough() {
        let s = discrete_laplace_scale(1, 0.5).unwrap();
        assert!((s - 2.0).abs() < 1e-9, "{s}");
        let s = discrete_laplace_scale(120, 0.25).unwrap();
        assert!((s - 480.0).abs() < 1e-6, "{s}");
        assert!(discrete_laplace_scale(1, f64::NAN).is_err());
        assert!(discrete_laplace_scale(1, 0.0).is_err());
    }

    #[test]
    fn variance_matches_large_scale_laplace() {
        // For large scales the discrete Laplace approaches 2 t^2.
        let v = discrete_laplace_variance(100.0);
        assert!((v / 20_000.0 - 1.0).abs() < 1e-3, "{v}");
    }

    #[test]
    fn release_changes_values_by_noise() {
        let exact = vec![1000i64; 200];
        let noisy = release_discrete_laplace(&exact, 5.0).unwrap();
        assert_eq!(noisy.len(), 200);
        assert!(noisy.iter().any(|&v| v != 1000), "no noise was added");
    }
}
