//! Federated quantiles, variances and standard deviations from the nodes'
//! noisy histograms, counts, sums and centred sums of squares. Only noisy
//! values reach this module; everything here is post-processing.

use fedq_dp::distribution::{self as dist, BinNoise};
use fedq_dp::mechanism::Noise;
use fedq_proto::v1::OutputKind;

use crate::combine::{total, Estimate, HalfWidths, OutputSpec, Parts};

/// The federated quantile: the nodes' noisy histograms are summed bin by
/// bin (each bin's noise is then the sum of the nodes' independent
/// noises), and the quantile and its interval are read off the summed
/// histogram by [`fedq_dp::distribution::quantile`].
pub(crate) fn quantile(p: &Parts, spec: &OutputSpec, alpha: f64) -> Option<Estimate> {
    let k = p.edges.len().checked_sub(1)?;
    let mut counts = vec![0i64; k];
    for (values, _) in &p.bins {
        for (c, v) in counts.iter_mut().zip(values) {
            *c = c.saturating_add(*v);
        }
    }
    // A node reporting an unknown mechanism leaves no interval to compute.
    let noises: Vec<BinNoise> = p
        .bins
        .iter()
        .map(|(_, noise)| match noise {
            Some(Noise::DiscreteLaplace { scale }) => Some(BinNoise::DiscreteLaplace(*scale)),
            Some(Noise::DiscreteGaussian { scale }) => Some(BinNoise::DiscreteGaussian(*scale)),
            None => None,
        })
        .collect::<Option<_>>()?;
    let q = dist::quantile(&p.edges, &counts, &noises, spec.quantile, alpha)?;
    Some(Estimate {
        value: q.value,
        ci_low: q.ci_low,
        ci_high: q.ci_high,
    })
}

/// Sample variance (or standard deviation) from the combined noisy count
/// `N`, sum `S` and centred sum of squares `Q = sum (x - c)^2`:
/// `var = (Q - N m^2) / (N - 1)` with `m = S / N - c`. The interval holds
/// whenever the three `1 - alpha/3` intervals of `N`, `S` and `Q` hold (a
/// union bound): it is the range of the formula over that box, cut to
/// `[0, (max - min)^2 / 4 * N / (N - 1)]`, the largest sample variance of
/// values within the declared bounds.
pub(crate) fn variance(
    p: &Parts,
    spec: &OutputSpec,
    alpha: f64,
    widths: &mut HalfWidths,
) -> Option<Estimate> {
    if p.count.is_empty() || p.squares.is_empty() {
        return None;
    }
    let each = alpha / 3.0;
    let n = total(&p.count, each, widths);
    let s = total(&p.main, each, widths);
    let q = total(&p.squares, each, widths);
    let (min, max) = spec.bounds?;
    let c = spec.center as f64;
    let ceiling = |n: f64| (max - min) as f64 * (max - min) as f64 / 4.0 * n / (n - 1.0);
    let value = if n.value > 1.0 {
        let m = s.value / n.value - c;
        ((q.value - n.value * m * m) / (n.value - 1.0)).clamp(0.0, ceiling(n.value))
    } else {
        f64::NAN
    };
    let (lo, hi) = if n.ci_low > 1.0 {
        let corners = [
            s.ci_low / n.ci_low,
            s.ci_low / n.ci_high,
            s.ci_high / n.ci_low,
            s.ci_high / n.ci_high,
        ]
        .map(|x| x - c);
        let m_min = corners.iter().copied().fold(f64::INFINITY, f64::min);
        let m_max = corners.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sq_max = m_min.powi(2).max(m_max.powi(2));
        let sq_min = if m_min <= 0.0 && m_max >= 0.0 {
            0.0
        } else {
            m_min.powi(2).min(m_max.powi(2))
        };
        let lo = q.ci_low.max(0.0) / (n.ci_high - 1.0) - n.ci_low / (n.ci_low - 1.0) * sq_max;
        let hi = q.ci_high / (n.ci_low - 1.0) - n.ci_high / (n.ci_high - 1.0) * sq_min;
        (lo.max(0.0), hi.min(ceiling(n.ci_low)))
    } else {
        (0.0, ceiling(2.0))
    };
    // A variance is never negative: when the box's range lies wholly below
    // 0 (its joint event failed), the interval is [0, 0], never an
    // inverted or negative one (whose square root, for STDDEV, is NaN).
    let hi = hi.max(0.0);
    let (lo, hi) = (lo.min(hi), hi);
    Some(if spec.kind == OutputKind::Stddev {
        Estimate {
            value: value.sqrt(),
            ci_low: lo.sqrt(),
            ci_high: hi.sqrt(),
        }
    } else {
        Estimate {
            value,
            ci_low: lo,
            ci_high: hi,
        }
    })
}
