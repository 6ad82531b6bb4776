//! Noise, only from OpenDP (DESIGN invariant 1).
//!
//! A measurement's noise is a [`Noise`]: discrete Laplace (pure DP, asked
//! for with epsilon) or discrete Gaussian (zCDP, asked for with rho). Every
//! released vector goes through [`Noise::release`], which builds the OpenDP
//! measurement and invokes it; OpenDP's samplers draw from OpenSSL's CSPRNG
//! (`use-openssl`).
//!
//! - Discrete Laplace: `opendp::measurements::make_laplace` over
//!   `VectorDomain<AtomDomain<i64>>`, `L1Distance<i64>`, `MaxDivergence`.
//!   **Guarantee.** For an input vector whose L1 sensitivity under adding or
//!   removing one privacy unit is at most `sensitivity`, the release is
//!   `epsilon`-DP, where the scale is chosen so that OpenDP's own privacy
//!   map reports a loss of at most `epsilon` at `d_in = sensitivity`
//!   ([`discrete_laplace_scale`] checks this with the measurement's `map`).
//! - Discrete Gaussian: `opendp::measurements::make_gaussian` over the same
//!   domain, `L2Distance<i64>`, `ZeroConcentratedDivergence`.
//!   **Guarantee.** For an input vector whose L2 sensitivity is at most
//!   `l2_sensitivity`, the release is `rho`-zCDP, the scale being checked
//!   the same way against OpenDP's map ([`discrete_gaussian_scale`]).
//!
//! `Measurement` is neither `Send` nor `Sync` in OpenDP 0.16, so it is built
//! and invoked inside the caller's (blocking) task and never stored.

use crate::error::DpError;
use opendp::domains::{AtomDomain, MapDomain, VectorDomain};
use opendp::measurements::{
    make_gaussian, make_gaussian_threshold, make_laplace, make_laplace_threshold,
};
use opendp::measures::{Approximate, MaxDivergence, ZeroConcentratedDivergence};
use opendp::metrics::{AbsoluteDistance, L01InfDistance, L02InfDistance, L1Distance, L2Distance};

/// Name of the mechanism as reported to analysts.
pub const DISCRETE_LAPLACE: &str = "discrete_laplace";

/// Name of the discrete Gaussian mechanism as reported to analysts.
pub const DISCRETE_GAUSSIAN: &str = "discrete_gaussian";

/// The noise of one measurement: which OpenDP mechanism and its scale.
/// Everything the node and the coordinator need to know about a noise
/// distribution (sampling, variance, tails, intervals) is here.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Noise {
    /// Discrete Laplace with this scale (pure epsilon-DP).
    DiscreteLaplace {
        /// Scale t: `P[X = x]` is proportional to `e^{-|x|/t}`.
        scale: f64,
    },
    /// Discrete Gaussian with this scale (rho-zCDP).
    DiscreteGaussian {
        /// Scale sigma: `P[X = x]` is proportional to `e^{-x^2/(2 sigma^2)}`.
        scale: f64,
    },
}

impl Noise {
    /// Discrete Laplace noise giving `epsilon`-DP at L1 sensitivity `l1`.
    pub fn for_epsilon(l1: i64, epsilon: f64) -> Result<Noise, DpError> {
        Ok(Noise::DiscreteLaplace {
            scale: discrete_laplace_scale(l1, epsilon)?,
        })
    }

    /// Discrete Gaussian noise giving `rho`-zCDP at L2 sensitivity `l2`.
    pub fn for_rho(l2: i64, rho: f64) -> Result<Noise, DpError> {
        Ok(Noise::DiscreteGaussian {
            scale: discrete_gaussian_scale(l2, rho)?,
        })
    }

    /// The noise a node reported by mechanism name and scale (coordinator).
    pub fn reported(mechanism: &str, scale: f64) -> Option<Noise> {
        match mechanism {
            DISCRETE_LAPLACE => Some(Noise::DiscreteLaplace { scale }),
            DISCRETE_GAUSSIAN => Some(Noise::DiscreteGaussian { scale }),
            _ => None,
        }
    }

    /// The mechanism's name as reported to analysts.
    pub fn name(&self) -> &'static str {
        match self {
            Noise::DiscreteLaplace { .. } => DISCRETE_LAPLACE,
            Noise::DiscreteGaussian { .. } => DISCRETE_GAUSSIAN,
        }
    }

    /// The scale (t or sigma).
    pub fn scale(&self) -> f64 {
        match *self {
            Noise::DiscreteLaplace { scale } | Noise::DiscreteGaussian { scale } => scale,
        }
    }

    /// Adds this noise to each value, with OpenDP. On failure returns a
    /// message that contains no value of the input. The only way out of an
    /// [`Exact`].
    pub fn release(&self, exact: &Exact) -> Result<Vec<i64>, DpError> {
        match *self {
            Noise::DiscreteLaplace { scale } => release_discrete_laplace(&exact.0, scale),
            Noise::DiscreteGaussian { scale } => release_discrete_gaussian(&exact.0, scale),
        }
    }

    /// Variance of the noise added to each value.
    pub fn variance(&self) -> f64 {
        match *self {
            Noise::DiscreteLaplace { scale } => discrete_laplace_variance(scale),
            Noise::DiscreteGaussian { scale } => discrete_gaussian_variance(scale),
        }
    }

    /// Half-width `a` of the `1 - alpha` interval of one value,
    /// `P[|noise| >= a] <= alpha`, from `opendp::accuracy`.
    pub fn half_width(&self, alpha: f64) -> Result<f64, DpError> {
        match *self {
            Noise::DiscreteLaplace { scale } => discrete_laplace_half_width(scale, alpha),
            Noise::DiscreteGaussian { scale } => discrete_gaussian_half_width(scale, alpha),
        }
    }

    /// `P[X >= k]` for each `k` of `ks`, together with a bound on the
    /// absolute error of each (0 when they are computed exactly). Used by
    /// the coordinator to convolve the noises of several nodes.
    pub fn upper_tails(&self, ks: &[i64]) -> (Vec<f64>, f64) {
        match *self {
            Noise::DiscreteLaplace { scale } => (
                ks.iter()
                    .map(|&k| discrete_laplace_upper_tail(scale, k))
                    .collect(),
                0.0,
            ),
            Noise::DiscreteGaussian { scale } => discrete_gaussian_upper_tails(scale, ks),
        }
    }

    /// A distance beyond which the noise has less than 1e-12 mass in each
    /// tail: `P[X >= reach] < 1e-12`.
    pub fn reach(&self) -> i64 {
        match *self {
            // q^reach < 1e-12 for q = e^{-1/t}.
            Noise::DiscreteLaplace { scale } => (scale * 28.0) as i64 + 1,
            // e^{-r^2 / (2 sigma^2)} < 1e-12 for r = 7.5 sigma.
            Noise::DiscreteGaussian { scale } => (scale * 7.5) as i64 + 2,
        }
    }
}

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
pub fn discrete_laplace_scale(sensitivity: i64, epsilon: f64) -> Result<f64, DpError> {
    if !(epsilon.is_finite() && epsilon > 0.0) {
        return Err(DpError::Invalid(format!(
            "epsilon must be positive and finite, got {epsilon}"
        )));
    }
    let mut scale = sensitivity as f64 / epsilon;
    // OpenDP rounds its map conservatively (upwards); nudge the scale up
    // until the reported loss fits.
    for _ in 0..64 {
        let m = measurement(scale).map_err(|e| DpError::opendp("cannot build the mechanism", e))?;
        let loss = m
            .map(&sensitivity)
            .map_err(|e| DpError::opendp("cannot compute the privacy loss", e))?;
        if loss <= epsilon {
            return Ok(scale);
        }
        scale *= 1.0 + 1e-12;
    }
    Err(DpError::NoScale(format!(
        "no discrete Laplace scale fits epsilon {epsilon}"
    )))
}

/// OpenDP's vector discrete Gaussian measurement under zCDP.
type VectorGaussian = opendp::core::Measurement<
    VectorDomain<AtomDomain<i64>>,
    L2Distance<i64>,
    ZeroConcentratedDivergence,
    Vec<i64>,
>;

fn gaussian(scale: f64) -> opendp::error::Fallible<VectorGaussian> {
    make_gaussian(
        VectorDomain::new(AtomDomain::<i64>::default()),
        L2Distance::<i64>::default(),
        scale,
        None,
    )
}

/// The smallest scale (up to float rounding) whose OpenDP privacy map gives
/// a loss of at most `rho` (zCDP) for a vector of L2 sensitivity `l2`:
/// about `l2 / sqrt(2 rho)`.
pub fn discrete_gaussian_scale(l2: i64, rho: f64) -> Result<f64, DpError> {
    if !(rho.is_finite() && rho > 0.0) {
        return Err(DpError::Invalid(format!(
            "rho must be positive and finite, got {rho}"
        )));
    }
    let mut scale = l2 as f64 / (2.0 * rho).sqrt();
    for _ in 0..64 {
        let m = gaussian(scale).map_err(|e| DpError::opendp("cannot build the mechanism", e))?;
        let loss = m
            .map(&l2)
            .map_err(|e| DpError::opendp("cannot compute the privacy loss", e))?;
        if loss <= rho {
            return Ok(scale);
        }
        scale *= 1.0 + 1e-12;
    }
    Err(DpError::NoScale(format!(
        "no discrete Gaussian scale fits rho {rho}"
    )))
}

/// Adds discrete Gaussian noise of `scale` to each value, with OpenDP.
/// On failure returns a message that contains no value of the input.
fn release_discrete_gaussian(exact: &Vec<i64>, scale: f64) -> Result<Vec<i64>, DpError> {
    let m = gaussian(scale).map_err(|e| DpError::opendp("cannot build the mechanism", e))?;
    m.invoke(exact)
        .map_err(|e| DpError::opendp("the noise sampler failed", e))
}

/// Below this scale, discrete Gaussian quantities are computed by summing
/// the probability mass function term by term (exact up to float rounding);
/// above it, from the continuous normal with a stated error bound.
const DG_EXACT_SCALE: f64 = 200.0;

/// Unnormalised discrete Gaussian weights `e^{-x^2/(2 sigma^2)}` for
/// `x = 0, 1, ...` until they vanish (`x` up to about 39 sigma).
fn dg_weights(scale: f64) -> Vec<f64> {
    let n = (scale * 39.0) as usize + 2;
    (0..n)
        .map(|x| (-((x * x) as f64) / (2.0 * scale * scale)).exp())
        .collect()
}

/// Variance of discrete Gaussian noise with `scale` sigma. Below
/// [`DG_EXACT_SCALE`] it is summed exactly from the pmf (it is less than
/// sigma^2 for small sigma); above, it is sigma^2 (the relative difference
/// is below `e^{-2 pi^2 sigma^2}` by Poisson summation, i.e. zero in f64).
/// The sum is remembered by scale, as the half-width is (an answer's
/// scale depends only on the query's cost and sensitivity).
pub fn discrete_gaussian_variance(scale: f64) -> f64 {
    if scale > DG_EXACT_SCALE {
        return scale * scale;
    }
    static MEMO: std::sync::OnceLock<crate::memo::Memo> = std::sync::OnceLock::new();
    MEMO.get_or_init(|| crate::memo::Memo::new(4096))
        .get_or(scale, 0.0, || Ok(discrete_gaussian_variance_summed(scale)))
        .unwrap_or(f64::NAN)
}

fn discrete_gaussian_variance_summed(scale: f64) -> f64 {
    let w = dg_weights(scale);
    let z = w[0] + 2.0 * w[1..].iter().sum::<f64>();
    let second: f64 = w
        .iter()
        .enumerate()
        .map(|(x, p)| 2.0 * (x * x) as f64 * p)
        .sum();
    second / z
}

/// `P[X >= k]` for discrete Gaussian `X` with `scale` sigma, for each `k`
/// of `ks`, and a bound on the absolute error of each. Up to
/// [`DG_EXACT_SCALE`]: summed from the pmf (error 0 beyond float
/// rounding). Above: the continuous normal tail at `k - 1/2` (midpoint
/// rule); summing `e^{-x^2/2 sigma^2}` over integers instead of
/// integrating it differs by at most `(1/24) int |f''| <= 0.05 / sigma^2`
/// for the normalised density f, plus 1e-7 for [`erfc`]'s rounding; that
/// sum is returned as the error bound (at most 1.3e-6 here).
pub fn discrete_gaussian_upper_tails(scale: f64, ks: &[i64]) -> (Vec<f64>, f64) {
    if scale > DG_EXACT_SCALE {
        let tail = |k: i64| 0.5 * erfc((k as f64 - 0.5) / (scale * std::f64::consts::SQRT_2));
        return (
            ks.iter().map(|&k| tail(k)).collect(),
            0.05 / (scale * scale) + 1e-7,
        );
    }
    let w = dg_weights(scale);
    // suffix[j] = sum of w[x] for x >= j.
    let mut suffix = vec![0.0; w.len() + 1];
    for j in (0..w.len()).rev() {
        suffix[j] = suffix[j + 1] + w[j];
    }
    let z = 2.0 * suffix[0] - w[0];
    let tail = |k: i64| suffix[k.clamp(0, w.len() as i64) as usize] / z;
    let tails = ks
        .iter()
        .map(|&k| if k >= 1 { tail(k) } else { 1.0 - tail(1 - k) })
        .collect();
    (tails, 0.0)
}

/// The complementary error function, for `x >= 0`, with relative error
/// below 1.2e-7 (Numerical Recipes' Chebyshev fit `erfcc`); for `x < 0`,
/// `2 - erfc(-x)`.
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// Half-width `a` of the `1 - alpha` interval of discrete Gaussian noise:
/// `P[|X| >= a] <= alpha`. OpenDP's `discrete_gaussian_scale_to_accuracy`
/// (which sums the pmf exactly) up to a scale of 1e5; beyond, where that
/// sum would take millions of terms, the continuous normal's quantile
/// from OpenDP's `gaussian_scale_to_accuracy`, rounded up and widened by
/// one (the discrete and continuous distributions differ by far less than
/// the mass that widening adds).
///
/// OpenDP's exact sum evaluates `exp` term by term (about 39 × scale
/// terms), about a millisecond at ordinary scales and once per answered
/// measurement, so results are remembered by `(scale, alpha)` (an answer's
/// scale depends only on the query's cost and sensitivity).
pub fn discrete_gaussian_half_width(scale: f64, alpha: f64) -> Result<f64, DpError> {
    static MEMO: std::sync::OnceLock<crate::memo::Memo> = std::sync::OnceLock::new();
    MEMO.get_or_init(|| crate::memo::Memo::new(4096))
        .get_or(scale, alpha, || {
            discrete_gaussian_half_width_uncached(scale, alpha)
        })
}

fn discrete_gaussian_half_width_uncached(scale: f64, alpha: f64) -> Result<f64, DpError> {
    let exact = scale <= 1e5;
    let r = if exact {
        opendp::accuracy::discrete_gaussian_scale_to_accuracy(scale, alpha)
    } else {
        opendp::accuracy::gaussian_scale_to_accuracy(scale, alpha).map(|a| a.ceil() + 1.0)
    };
    r.map_err(|e| DpError::opendp("cannot compute the accuracy", e))
}

/// Tail `P[X >= k]` of discrete Laplace noise with `scale` t, `q = e^{-1/t}`:
/// `q^k / (1 + q)` for `k >= 1`.
pub fn discrete_laplace_upper_tail(scale: f64, k: i64) -> f64 {
    let q = (-1.0 / scale).exp();
    if k <= 0 {
        1.0 - discrete_laplace_upper_tail(scale, 1 - k)
    } else {
        q.powi(k.min(i32::MAX as i64) as i32) / (1.0 + q)
    }
}

/// Adds discrete Laplace noise of `scale` to each value, with OpenDP.
/// On failure returns a message that contains no value of the input.
fn release_discrete_laplace(exact: &Vec<i64>, scale: f64) -> Result<Vec<i64>, DpError> {
    let m = measurement(scale).map_err(|e| DpError::opendp("cannot build the mechanism", e))?;
    m.invoke(exact)
        .map_err(|e| DpError::opendp("the noise sampler failed", e))
}

/// Variance of discrete Laplace noise with `scale` t:
/// `2 e^{-1/t} / (1 - e^{-1/t})^2`.
pub fn discrete_laplace_variance(scale: f64) -> f64 {
    let q = (-1.0 / scale).exp();
    2.0 * q / ((1.0 - q) * (1.0 - q))
}

/// Half-width `a` of the `1 - alpha` confidence interval of one value:
/// `P[|noise| >= a] <= alpha`, from `opendp::accuracy`.
pub fn discrete_laplace_half_width(scale: f64, alpha: f64) -> Result<f64, DpError> {
    opendp::accuracy::discrete_laplacian_scale_to_accuracy(scale, alpha)
        .map_err(|e| DpError::opendp("cannot compute the accuracy", e))
}

/// Exact aggregates on their way to a mechanism (one value per released
/// value, in the plan's order): the only input [`Noise::release`] takes.
///
/// **Guarantee.** It has no `Debug`, `Display`, `Clone`, `Serialize` or
/// accessor: outside this crate its values cannot be read, printed,
/// logged, compared or sent, so an exact answer leaves the node only
/// through noise (DESIGN invariant 2). The engine makes one with
/// [`Exact::new`] and hands it to the pipeline, which can only release it.
pub struct Exact(Vec<i64>);

impl Exact {
    /// Wraps the engine's exact values.
    pub fn new(values: Vec<i64>) -> Exact {
        Exact(values)
    }

    /// How many values (public: the plan fixes it).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The exact counts per key of an open-domain GROUP BY, on their way to
/// the threshold mechanism ([`Noise::release_keys`]); opaque as [`Exact`] is.
pub struct ExactKeyCounts(KeyCounts);

impl ExactKeyCounts {
    /// Wraps the engine's exact counts per key.
    pub fn new(counts: KeyCounts) -> ExactKeyCounts {
        ExactKeyCounts(counts)
    }
}

/// Keys of an open-domain GROUP BY and their counts (keys are stored
/// codes, see `fedq_engine::table::Table::open_counts`).
pub type KeyCounts = std::collections::HashMap<u64, i64>;

type KeyDomain = MapDomain<AtomDomain<u64>, AtomDomain<i64>>;

/// How far apart two counts of one key are.
type KeyMetric = AbsoluteDistance<i64>;

/// A thresholded release of key counts under metric `MI`, approximate in
/// measure `MO`.
type KeysMeasurement<MI, MO> = opendp::core::Measurement<KeyDomain, MI, Approximate<MO>, KeyCounts>;

fn key_domain() -> KeyDomain {
    MapDomain::new(AtomDomain::<u64>::default(), AtomDomain::<i64>::default())
}

/// Released keys: OpenDP's thresholded mechanisms over a map of counts.
///
/// `make_laplace_threshold` (Approximate<MaxDivergence>, with discrete
/// Laplace noise) or `make_gaussian_threshold`
/// (Approximate<ZeroConcentratedDivergence>, discrete Gaussian) add noise
/// to every key present in the data and release only the keys whose noisy
/// count is at least the threshold. **Guarantee**: when one privacy unit
/// changes at most `bound` keys, each by at most `bound`, the release is
/// (epsilon, delta)-DP, or (rho, delta)-approximate zCDP, where
/// epsilon/rho is that of the plain mechanism at the same scale and L1/L2
/// sensitivity `bound`, and delta bounds the chance that a key present
/// only because of that unit passes the threshold
/// ([`Noise::threshold_delta`], OpenDP's map corrected for an off-by-one).
/// [`Noise::key_threshold`] picks the smallest threshold whose delta is at
/// most the dataset's `keys_delta`.
impl Noise {
    /// The delta of a thresholded release at `threshold`, for a unit that
    /// changes up to `bound` keys by up to `bound` each, from OpenDP's
    /// privacy map of the thresholded mechanism.
    ///
    /// **Off by one in OpenDP 0.16, corrected here.** The mechanism keeps
    /// a key when its noisy count is `>= threshold`, so a key whose count
    /// is `bound` in one dataset and absent from its neighbour is released
    /// with probability `P[Z >= threshold - bound]`; but the map bounds it
    /// with OpenDP's tail functions, which bound `P[Z > threshold - bound]`
    /// (one step less). Our black-box test measured 0.0355 against a
    /// claimed 0.02 at scale 1. So the map is evaluated at an L-inf (and
    /// L1/L2, which cap it) sensitivity of `bound + 1`: its delta is then
    /// `1 - (1 - P[Z >= threshold - bound])^bound`, the true chance that
    /// any of the unit's keys passes. (The epsilon/rho part is not taken
    /// from this map: it is the plain mechanism's at L1/L2 `bound`, as for
    /// every measurement.)
    pub fn threshold_delta(&self, bound: i64, threshold: i64) -> Result<f64, DpError> {
        let keys = u32::try_from(bound)
            .map_err(|_| DpError::Invalid("the contribution bound is too large".into()))?;
        let shifted = bound.saturating_add(1);
        let d_in = (keys, shifted, shifted);
        let fail = |e: opendp::error::Error| DpError::opendp("OpenDP threshold map", e);
        let (_, delta) = match *self {
            Noise::DiscreteLaplace { scale } => laplace_keys(scale, threshold)
                .and_then(|m| m.map(&d_in))
                .map_err(fail)?,
            Noise::DiscreteGaussian { scale } => gaussian_keys(scale, threshold)
                .and_then(|m| m.map(&d_in))
                .map_err(fail)?,
        };
        Ok(delta)
    }

    /// The smallest threshold at which [`Noise::threshold_delta`] reports a
    /// delta of at most `delta` (found by bisection over OpenDP's map,
    /// which only shrinks as the threshold grows). Public: depends only on
    /// the noise, the bound and the dataset's declared delta.
    pub fn key_threshold(&self, bound: i64, delta: f64) -> Result<i64, DpError> {
        if !(delta > 0.0 && delta < 1.0) {
            return Err(DpError::Invalid(format!(
                "keys_delta must be in (0, 1), not {delta}"
            )));
        }
        let ok = |t: i64| -> Result<bool, DpError> { Ok(self.threshold_delta(bound, t)? <= delta) };
        // The threshold must exceed the (shifted) L-inf sensitivity.
        let mut lo = bound + 1;
        if ok(lo)? {
            return Ok(lo);
        }
        let mut hi = bound.saturating_add(64);
        while !ok(hi)? {
            if hi > 1 << 50 {
                return Err(DpError::Invalid(format!(
                    "no threshold reaches keys_delta {delta} at this noise scale"
                )));
            }
            hi = hi.saturating_mul(2);
        }
        // Invariant: !ok(lo), ok(hi).
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if ok(mid)? {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Ok(hi)
    }

    /// Adds this noise to every key's count and keeps the keys whose noisy
    /// count is at least `threshold`, with OpenDP. On failure returns a
    /// message that contains no value of the input.
    pub fn release_keys(
        &self,
        counts: &ExactKeyCounts,
        threshold: i64,
    ) -> Result<KeyCounts, DpError> {
        let counts = &counts.0;
        let fail = |e: opendp::error::Error| DpError::opendp("the threshold mechanism failed", e);
        match *self {
            Noise::DiscreteLaplace { scale } => laplace_keys(scale, threshold)
                .and_then(|m| m.invoke(counts))
                .map_err(fail),
            Noise::DiscreteGaussian { scale } => gaussian_keys(scale, threshold)
                .and_then(|m| m.invoke(counts))
                .map_err(fail),
        }
    }
}

/// OpenDP's thresholded discrete Laplace over key counts (Approximate
/// pure DP).
fn laplace_keys(
    scale: f64,
    threshold: i64,
) -> opendp::error::Fallible<KeysMeasurement<L01InfDistance<KeyMetric>, MaxDivergence>> {
    make_laplace_threshold(key_domain(), Default::default(), scale, threshold, None)
}

/// OpenDP's thresholded discrete Gaussian over key counts (Approximate
/// zCDP).
fn gaussian_keys(
    scale: f64,
    threshold: i64,
) -> opendp::error::Fallible<KeysMeasurement<L02InfDistance<KeyMetric>, ZeroConcentratedDivergence>>
{
    make_gaussian_threshold(key_domain(), Default::default(), scale, threshold, None)
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
        let noisy = Noise::DiscreteLaplace { scale: 5.0 }
            .release(&Exact::new(exact))
            .unwrap();
        assert_eq!(noisy.len(), 200);
        assert!(noisy.iter().any(|&v| v != 1000), "no noise was added");
    }

    #[test]
    fn gaussian_scale_meets_rho() {
        // rho = (l2 / sigma)^2 / 2.
        let s = discrete_gaussian_scale(1, 0.005).unwrap();
        assert!((s - 10.0).abs() < 1e-9, "{s}");
        let s = discrete_gaussian_scale(120, 0.5).unwrap();
        assert!((s - 120.0).abs() < 1e-9, "{s}");
        assert!(discrete_gaussian_scale(1, f64::NAN).is_err());
        assert!(discrete_gaussian_scale(1, -1.0).is_err());
        let n = Noise::for_rho(1, 0.005).unwrap();
        assert_eq!(n.name(), DISCRETE_GAUSSIAN);
        assert_eq!(Noise::reported(n.name(), n.scale()), Some(n));
    }

    #[test]
    fn gaussian_variance_and_tails_agree_with_the_pmf() {
        // Small scale: strictly below sigma^2, summed exactly.
        let v = discrete_gaussian_variance(0.5);
        let brute: f64 = {
            let w: Vec<f64> = (-20i64..=20)
                .map(|x| (-(x * x) as f64 / 0.5).exp())
                .collect();
            let z: f64 = w.iter().sum();
            (-20i64..=20)
                .zip(&w)
                .map(|(x, p)| (x * x) as f64 * p)
                .sum::<f64>()
                / z
        };
        assert!((v - brute).abs() < 1e-12 && v < 0.25, "{v} {brute}");
        assert!((discrete_gaussian_variance(10.0) / 100.0 - 1.0).abs() < 1e-12);
        // Remembered: the same bits as the sum, at every call.
        for scale in [0.5, 3.7, 10.0, 199.0] {
            let summed = discrete_gaussian_variance_summed(scale);
            for _ in 0..2 {
                assert_eq!(
                    discrete_gaussian_variance(scale).to_bits(),
                    summed.to_bits()
                );
            }
        }
        // Tails: symmetric, P[X >= 0] + P[X >= 1] = 1.
        let (t, e) = discrete_gaussian_upper_tails(3.0, &[0, 1, 2, -1]);
        assert_eq!(e, 0.0);
        assert!((t[0] + t[1] - 1.0).abs() < 1e-12);
        assert!((t[3] + t[2] - 1.0).abs() < 1e-12);
        // The approximation above DG_EXACT_SCALE agrees with the exact sum
        // just below it, within its stated error (scale 200 vs 200.0001).
        let ks = [1, 100, 300, 500];
        let (exact, _) = discrete_gaussian_upper_tails(200.0, &ks);
        let (approx, err) = discrete_gaussian_upper_tails(200.0 + 1e-9, &ks);
        for (a, b) in exact.iter().zip(&approx) {
            assert!((a - b).abs() <= err, "{a} {b} {err}");
        }
    }

    #[test]
    fn gaussian_half_width_covers_95_percent() {
        for scale in [0.7, 3.0, 10.0, 150.0] {
            let a = discrete_gaussian_half_width(scale, 0.05).unwrap();
            let (t, _) = discrete_gaussian_upper_tails(scale, &[a as i64]);
            assert!(
                2.0 * t[0] <= 0.05,
                "scale {scale}: P[|X| >= {a}] = {}",
                2.0 * t[0]
            );
            let (t, _) = discrete_gaussian_upper_tails(scale, &[a as i64 - 1]);
            assert!(2.0 * t[0] > 0.05, "scale {scale}: {a} is not the smallest");
        }
        // Beyond the exact range: rounded-up continuous quantile plus one.
        let a = discrete_gaussian_half_width(1e6, 0.05).unwrap();
        assert!((a - 1.959_964e6).abs() < 10.0, "{a}");
    }

    /// The released discrete Gaussian noise has the claimed distribution.
    ///
    /// Calibration: n = 100,000 draws at sigma = 10 (one OpenDP invocation
    /// over a zero vector). The Dvoretzky-Kiefer-Wolfowitz inequality
    /// bounds `P[sup_k |F_n(k) - F(k)| > eps] <= 2 e^{-2 n eps^2}` for any
    /// distribution (no approximation); with eps = 0.0095 that is 2.9e-8,
    /// so a correct mechanism fails less than once in thirty million runs.
    /// A scale 20% off moves the CDF by at least 0.035 somewhere (checked
    /// below), far beyond eps.
    #[test]
    fn released_gaussian_noise_has_the_claimed_distribution() {
        let (n, sigma, eps) = (100_000usize, 10.0, 0.0095);
        assert!(2.0 * (-2.0 * n as f64 * eps * eps).exp() < 1e-7);
        let ks: Vec<i64> = (-60..=60).collect();
        let cdf = |scale: f64| -> Vec<f64> {
            // F(k) = P[X <= k] = 1 - P[X >= k + 1].
            let next: Vec<i64> = ks.iter().map(|k| k + 1).collect();
            let (t, _) = discrete_gaussian_upper_tails(scale, &next);
            t.iter().map(|x| 1.0 - x).collect()
        };
        let claimed = cdf(sigma);
        for wrong in [0.8 * sigma, 1.2 * sigma] {
            let d = cdf(wrong)
                .iter()
                .zip(&claimed)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(d > eps + 0.025, "scale {wrong} would pass: {d}");
        }
        let noise = Noise::DiscreteGaussian { scale: sigma }
            .release(&Exact::new(vec![0i64; n]))
            .unwrap();
        let mut sorted = noise.clone();
        sorted.sort_unstable();
        let worst = ks
            .iter()
            .zip(&claimed)
            .map(|(&k, f)| {
                let below = sorted.partition_point(|&x| x <= k) as f64 / n as f64;
                (below - f).abs()
            })
            .fold(0.0, f64::max);
        eprintln!("discrete Gaussian(10), n = {n}: sup |F_n - F| = {worst:.5} (accept <= {eps})");
        assert!(worst <= eps, "sup |F_n - F| = {worst}");
        // Beyond +-60 (6 sigma) the claimed mass is 2e-9 per side.
        assert!(sorted[0] >= -80 && sorted[n - 1] <= 80);
    }

    /// `P[noise >= d]` for each `d` of `ds`, exactly.
    fn upper_tails(noise: Noise, ds: &[i64]) -> Vec<f64> {
        match noise {
            Noise::DiscreteLaplace { scale } => ds
                .iter()
                .map(|&d| discrete_laplace_upper_tail(scale, d))
                .collect(),
            Noise::DiscreteGaussian { scale } => discrete_gaussian_upper_tails(scale, ds).0,
        }
    }

    /// Releases `keys` keys at each count `threshold - d` (for each `d` of
    /// `offsets`), `rounds` times, and returns how often each group's
    /// keys were released.
    fn release_rates(
        noise: Noise,
        threshold: i64,
        offsets: &[i64],
        keys: u64,
        rounds: usize,
    ) -> Vec<f64> {
        let mut counts = KeyCounts::new();
        for (g, &d) in offsets.iter().enumerate() {
            for k in 0..keys {
                counts.insert(g as u64 * keys + k, threshold - d);
            }
        }
        let counts = ExactKeyCounts::new(counts);
        let mut hits = vec![0u64; offsets.len()];
        for _ in 0..rounds {
            let out = noise.release_keys(&counts, threshold).unwrap();
            for (k, v) in &out {
                assert!(*v >= threshold, "released a key below the threshold");
                hits[(k / keys) as usize] += 1;
            }
        }
        hits.iter()
            .map(|&h| h as f64 / (keys as f64 * rounds as f64))
            .collect()
    }

    /// Calibrated test of the threshold mechanisms' released distribution:
    /// a key whose count is `d` below the threshold is released with
    /// probability `P[noise >= d]`. 20,000 keys per offset; each rate must
    /// lie within 5 binomial sd of the exact one (a false alarm about once
    /// in 3.5 million), and the rates a 20% larger scale would give must
    /// lie more than 5 sd away from the observed ones, so a scale off by
    /// 20% would be caught.
    #[test]
    fn threshold_mechanisms_release_keys_with_the_claimed_probability() {
        let offsets = [-2, 0, 2, 4];
        for (noise, wrong) in [
            (
                Noise::DiscreteLaplace { scale: 2.0 },
                Noise::DiscreteLaplace { scale: 2.4 },
            ),
            (
                Noise::DiscreteGaussian { scale: 2.0 },
                Noise::DiscreteGaussian { scale: 2.4 },
            ),
        ] {
            let n = 20_000.0;
            let rates = release_rates(noise, 50, &offsets, 2_000, 10);
            let exact = upper_tails(noise, &offsets);
            let off = upper_tails(wrong, &offsets);
            let mut caught = false;
            for ((r, p), w) in rates.iter().zip(&exact).zip(&off) {
                let sd = (p * (1.0 - p) / n).sqrt();
                assert!(
                    (r - p).abs() <= 5.0 * sd,
                    "{noise:?}: released {r}, expected {p} (sd {sd})"
                );
                caught |= (r - w).abs() > 5.0 * sd;
            }
            assert!(caught, "{noise:?}: a 20% larger scale would not be caught");
        }
    }

    /// The threshold is the smallest at which OpenDP's map reports at
    /// most the asked delta, and it grows with the bound and shrinks with
    /// a larger delta.
    #[test]
    fn key_threshold_is_the_smallest_meeting_delta() {
        for noise in [
            Noise::DiscreteLaplace { scale: 1.0 },
            Noise::DiscreteGaussian { scale: 3.0 },
        ] {
            for bound in [1, 3] {
                let t = noise.key_threshold(bound, 1e-8).unwrap();
                assert!(noise.threshold_delta(bound, t).unwrap() <= 1e-8);
                assert!(noise.threshold_delta(bound, t - 1).unwrap() > 1e-8);
                assert!(noise.key_threshold(bound, 1e-4).unwrap() < t);
            }
            assert!(noise.key_threshold(3, 1e-8).unwrap() > noise.key_threshold(1, 1e-8).unwrap());
        }
        assert!(Noise::DiscreteLaplace { scale: 1.0 }
            .key_threshold(1, 0.0)
            .is_err());
        assert!(Noise::DiscreteLaplace { scale: 1.0 }
            .key_threshold(1, f64::NAN)
            .is_err());
    }

    /// Black-box privacy test of released keys: on neighbouring datasets
    /// that differ by one record whose key is unique, that key's release
    /// is the only distinguishing event, so its frequency is an empirical
    /// delta. At a delta large enough to observe (0.02), over 40,000
    /// releases, the frequency must stay below delta + 5 sd; with the
    /// threshold two lower than the one chosen, it must exceed delta (so
    /// the test can fail).
    #[test]
    fn a_unique_key_is_released_with_probability_at_most_delta() {
        let delta = 0.02;
        for noise in [
            Noise::DiscreteLaplace { scale: 1.0 },
            Noise::DiscreteGaussian { scale: 1.5 },
        ] {
            let t = noise.key_threshold(1, delta).unwrap();
            let n = 40_000.0;
            let sd = (delta * (1.0 - delta) / n).sqrt();
            let rate = release_rates(noise, t, &[t - 1], 4_000, 10)[0];
            assert!(
                rate <= delta + 5.0 * sd,
                "{noise:?}: empirical delta {rate} > {delta}"
            );
            let lax = release_rates(noise, t - 2, &[t - 3], 4_000, 10)[0];
            assert!(
                lax > delta + 5.0 * sd,
                "{noise:?}: a lax threshold went unnoticed ({lax})"
            );
        }
    }
}
