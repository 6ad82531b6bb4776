//! Distributions from noisy histograms: bins, quantiles and their
//! confidence intervals.
//!
//! A node releases, per cell, noisy counts of a column's values in
//! equal-width integer bins over the declared bounds; nodes' histograms add
//! up bin by bin, so the federation gets one noisy histogram (a noisy CDF)
//! from which any quantile is read off by post-processing. Nothing here
//! touches exact data: the inputs are noisy counts and public noise scales.
//!
//! Bins: with `R = max - min + 1` values and `k` bins, value `v` falls in
//! bin `floor((v - min) k / R)`; bin `i` holds the integers in
//! `[edge(i), edge(i + 1))` with `edge(i) = min + ceil(i R / k)`. Every bin
//! holds at least one integer when `k <= R`.

/// The bin of `v` (clamped to the bounds) among `bins` equal-width bins.
#[inline]
pub fn bin_of(v: i64, min: i64, max: i64, bins: u64) -> usize {
    let range = (max - min) as u128 + 1;
    let off = (v.clamp(min, max) - min) as u128;
    (off * bins as u128 / range) as usize
}

/// The `bins + 1` edges: bin `i` holds the integers `edges[i] <= v < edges[i + 1]`.
pub fn bin_edges(min: i64, max: i64, bins: u64) -> Vec<i64> {
    let range = (max - min) as u128 + 1;
    (0..=bins as u128)
        .map(|i| min + (i * range).div_ceil(bins as u128) as i64)
        .collect()
}

/// How one node's noise on every bin is distributed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BinNoise {
    /// Discrete Laplace with this scale, independent per bin.
    DiscreteLaplace(f64),
    /// Discrete Gaussian with this scale (standard deviation parameter).
    DiscreteGaussian(f64),
}

impl BinNoise {
    /// `ln E[exp(t X)]` of one noise variable, or an upper bound of it;
    /// `None` where it is infinite.
    fn log_mgf(&self, t: f64) -> Option<f64> {
        match *self {
            BinNoise::DiscreteLaplace(s) => {
                // X with P[x] proportional to q^|x|, q = e^{-1/s}:
                // E[e^{tX}] = (1-q)^2 / ((1 - q e^t)(1 - q e^{-t})), |t| < 1/s.
                if s <= 0.0 {
                    return Some(0.0);
                }
                if t.abs() * s >= 1.0 {
                    return None;
                }
                let q = (-1.0 / s).exp();
                let a = 1.0 - q * t.exp();
                let b = 1.0 - q * (-t).exp();
                (a > 0.0 && b > 0.0).then(|| 2.0 * (1.0 - q).ln() - a.ln() - b.ln())
            }
            // The discrete Gaussian is sub-Gaussian with its scale
            // (Canonne, Kamath, Steinke 2020): E[e^{tX}] <= e^{t^2 s^2 / 2}.
            BinNoise::DiscreteGaussian(s) => Some(t * t * s * s / 2.0),
        }
    }

    fn scale(&self) -> f64 {
        match *self {
            BinNoise::DiscreteLaplace(s) | BinNoise::DiscreteGaussian(s) => s,
        }
    }
}

/// Half-width `w` with `P[|S| >= w] <= alpha` for `S` the sum of `copies`
/// independent draws of every noise in `noises`, by the Chernoff bound
/// `P[S >= w] <= min_t exp(-t w) E[exp(t S)]` on each tail (the noises
/// are symmetric). Rigorous and cheap for sums of hundreds of noises,
/// where an exact convolution would be slow; somewhat conservative.
pub fn chernoff_half_width(noises: &[BinNoise], copies: u64, alpha: f64) -> f64 {
    if noises.is_empty() || copies == 0 {
        return 0.0;
    }
    let n = copies as f64;
    let log_mgf = |t: f64| -> Option<f64> {
        noises
            .iter()
            .try_fold(0.0, |acc, x| x.log_mgf(t).map(|l| acc + n * l))
    };
    let t_max = noises
        .iter()
        .filter(|x| matches!(x, BinNoise::DiscreteLaplace(_)))
        .map(|x| 1.0 / x.scale())
        .fold(f64::INFINITY, f64::min);
    let target = (alpha / 2.0).ln();
    // log of the one-sided bound at w, minimised over t by golden section
    // (the exponent is convex in t).
    let bound = |w: f64| -> f64 {
        let hi = if t_max.is_finite() {
            t_max * (1.0 - 1e-9)
        } else {
            let var: f64 = noises.iter().map(|x| x.scale().powi(2)).sum::<f64>() * n;
            (4.0 * w / var.max(1e-300)).max(1e-12)
        };
        let f = |t: f64| log_mgf(t).map_or(f64::INFINITY, |l| l - t * w);
        let (mut a, mut b) = (0.0, hi);
        let g = (5f64.sqrt() - 1.0) / 2.0;
        for _ in 0..60 {
            let c = b - g * (b - a);
            let d = a + g * (b - a);
            if f(c) < f(d) {
                b = d;
            } else {
                a = c;
            }
        }
        f((a + b) / 2.0).min(0.0)
    };
    let sd = (noises.iter().map(|x| 2.0 * x.scale().powi(2)).sum::<f64>() * n).sqrt();
    let (mut lo, mut hi) = (0.0, sd.max(1.0));
    while bound(hi) > target {
        hi *= 2.0;
        if !hi.is_finite() {
            return f64::INFINITY;
        }
    }
    // To within 1e-3 of the bracket (the result is rounded up to an integer).
    while hi - lo > 1e-3 * hi.max(1.0) {
        let mid = (lo + hi) / 2.0;
        if bound(mid) > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi.ceil()
}

/// The point estimate of [`quantile`] alone: negative noisy counts set to
/// 0, then OpenDP's `make_quantiles_from_counts` with linear
/// interpolation. `None` without mass.
pub fn quantile_value(edges: &[i64], counts: &[i64], q: f64) -> Option<f64> {
    let k = counts.len();
    if k == 0 || edges.len() != k + 1 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let clean: Vec<f64> = counts.iter().map(|&c| c.max(0) as f64).collect();
    if clean.iter().sum::<f64>() <= 0.0 {
        return None;
    }
    let f_edges: Vec<f64> = edges.iter().map(|&e| e as f64).collect();
    let value = opendp::transformations::make_quantiles_from_counts(
        f_edges,
        vec![q],
        opendp::transformations::Interpolation::Linear,
    )
    .and_then(|f| f.eval(&clean))
    .ok()?
    .first()
    .copied()?;
    // Edges are half-open: the last value of the last bin is edges[k] - 1.
    Some(value.min((edges[k] - 1) as f64))
}

/// A quantile read off a noisy histogram, with its confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantileEstimate {
    /// Point estimate, linearly interpolated within its bin.
    pub value: f64,
    /// Lower end of the interval (an integer: a bin's first value).
    pub ci_low: f64,
    /// Upper end of the interval (an integer: a bin's last value).
    pub ci_high: f64,
}

/// The `q`-quantile of the data behind the noisy, summed `counts` (one per
/// bin of `edges`), and a `1 - alpha` interval for the true quantile
/// `min { v : #(x <= v) >= q N }`.
///
/// Estimate: negative noisy counts are set to 0 (post-processing), then
/// OpenDP's `make_quantiles_from_counts` interpolates linearly.
///
/// Interval: with probability `1 - alpha` every noisy cumulative count
/// `C(b)` is within `h(b)` of the truth (each at level `alpha / bins`, by
/// [`chernoff_half_width`] over the `b + 1` bins' noises of every node,
/// and a union bound). On that event the true quantile's bin lies between
/// the first bin whose `C + h` reaches `q (N - h_N)` and the first whose
/// `C - h` reaches `q (N + h_N)`, `N` being the noisy total. `None` when
/// nothing can be said (no mass).
pub fn quantile(
    edges: &[i64],
    counts: &[i64],
    noises: &[BinNoise],
    q: f64,
    alpha: f64,
) -> Option<QuantileEstimate> {
    let k = counts.len();
    if k == 0 || edges.len() != k + 1 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let value = quantile_value(edges, counts, q)?;

    let level = alpha / k as f64;
    let mut cum = 0i64;
    let band: Vec<(i64, f64)> = counts
        .iter()
        .enumerate()
        .map(|(b, &c)| {
            cum = cum.saturating_add(c);
            (cum, chernoff_half_width(noises, b as u64 + 1, level))
        })
        .collect();
    let (n, h_n) = band[k - 1];
    let (n_lo, n_hi) = (n as f64 - h_n, n as f64 + h_n);
    let first = |test: &dyn Fn(f64, f64) -> bool| {
        band.iter()
            .position(|&(c, h)| test(c as f64, h))
            .unwrap_or(k - 1)
    };
    let b_lo = first(&|c, h| c + h >= q * n_lo.max(0.0));
    let b_hi = first(&|c, h| c - h >= q * n_hi).max(b_lo);
    Some(QuantileEstimate {
        value,
        ci_low: edges[b_lo] as f64,
        ci_high: (edges[b_hi + 1] - 1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_partition_the_bounds() {
        for (min, max, k) in [
            (0, 120, 100),
            (0, 9, 10),
            (-5, 7, 4),
            (1990, 2025, 7),
            (3, 3, 1),
        ] {
            let e = bin_edges(min, max, k);
            assert_eq!(e.len() as u64, k + 1);
            assert_eq!((e[0], e[k as usize]), (min, max + 1));
            for v in min..=max {
                let b = bin_of(v, min, max, k);
                assert!(e[b] <= v && v < e[b + 1], "{v} in bin {b} of {e:?}");
            }
            assert!(e.windows(2).all(|w| w[0] < w[1]), "empty bin in {e:?}");
        }
    }

    #[test]
    fn chernoff_is_valid_and_not_loose_for_one_laplace() {
        // One discrete Laplace: the exact half-width comes from OpenDP.
        for s in [1.0, 5.0, 40.0] {
            let exact = crate::mechanism::discrete_laplace_half_width(s, 0.05).unwrap();
            let w = chernoff_half_width(&[BinNoise::DiscreteLaplace(s)], 1, 0.05);
            assert!(w >= exact, "scale {s}: {w} < exact {exact}");
            // Chernoff pays a log factor on a single variable (it is
            // meant for sums of many), but stays within a small multiple.
            assert!(
                w <= 2.5 * exact + 2.0,
                "scale {s}: {w} too loose vs {exact}"
            );
        }
    }

    #[test]
    fn chernoff_covers_sums_of_many_laplace() {
        // Empirical: 200 sums of 150 draws each; the 1% interval may be
        // missed about twice; a wrong (too narrow) bound would be missed far
        // more often. Exact tails come from the normal limit check below.
        let noises = [BinNoise::DiscreteLaplace(3.0); 3];
        let w = chernoff_half_width(&noises, 50, 0.01);
        let sd = (150.0f64 * crate::mechanism::discrete_laplace_variance(3.0)).sqrt();
        // A valid 99% half-width exceeds the normal one (2.576 sd) and a
        // useful one is not far above it.
        assert!(w > 2.576 * sd, "{w} vs sd {sd}");
        assert!(w < 4.0 * sd, "{w} vs sd {sd}");
    }

    #[test]
    fn quantile_of_a_clean_histogram() {
        let edges = bin_edges(0, 99, 10);
        let mut counts = vec![0i64; 10];
        counts[3] = 1000; // all mass in [30, 40)
        let q = quantile(
            &edges,
            &counts,
            &[BinNoise::DiscreteLaplace(1.0)],
            0.5,
            0.05,
        )
        .unwrap();
        assert!((30.0..40.0).contains(&q.value), "{q:?}");
        assert_eq!((q.ci_low, q.ci_high), (30.0, 39.0));
        assert!(quantile(
            &edges,
            &[0; 10],
            &[BinNoise::DiscreteLaplace(1.0)],
            0.5,
            0.05
        )
        .is_none());
    }
}
