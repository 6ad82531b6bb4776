//! Combining the nodes' noisy answers into one federated estimate.
//!
//! Per cell key: counts and sums add up across nodes; so do the independent
//! noises (discrete Laplace or discrete Gaussian, as each node reports),
//! whose sum's 95% interval is computed from the distribution of the sum,
//! by convolution (see [`sum_half_width`]). Means are
//! derived from the combined sum and the combined count. Only noisy values
//! ever reach this module.

use std::collections::BTreeMap;

use fedq_node::mechanism::Noise;
use fedq_proto::v1::{OutputKind, QueryResponse};
use serde::Serialize;

use crate::client::{Failure, Outcome};

/// Significance of every reported interval (95% confidence).
pub const ALPHA: f64 = 0.05;

/// A combined value and its confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    /// Point estimate (sum of noisy values, or their ratio for AVG).
    pub value: f64,
    /// Lower end of the 95% interval.
    pub ci_low: f64,
    /// Upper end of the 95% interval.
    pub ci_high: f64,
}

/// One output row: a cell key and one estimate per SELECT aggregate.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// GROUP BY values (empty without GROUP BY).
    pub key: Vec<String>,
    /// Estimates, in the order of [`Combined::outputs`].
    pub estimates: Vec<Option<Estimate>>,
    /// Nodes whose answer includes this key.
    pub nodes: Vec<String>,
}

/// How one node fared.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// Node name.
    pub node: String,
    /// `answered`, or what went wrong.
    pub status: String,
    /// Why, when not answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// Epsilon this query spent on the node (an epsilon query).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon_spent: Option<f64>,
    /// The node's ledger measure for the dataset: `pure` or `zcdp`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measure: Option<String>,
    /// What this query cost on the node, in its measure (epsilon or rho),
    /// and that cost's (epsilon, delta)-DP equivalent. For a dry run, what
    /// it would cost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
    /// The (epsilon, delta)-DP equivalent of everything you have spent on
    /// the dataset at this node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spent_equivalent: Option<(f64, f64)>,
    /// The analyst's remaining epsilon on the dataset at this node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining_for_analyst: Option<f64>,
    /// The dataset's remaining epsilon (all analysts) at this node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining_for_dataset: Option<f64>,
    /// How the node split the epsilon.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon_split: Option<String>,
    /// The answer was replayed from an earlier release of the same id.
    pub replayed: bool,
    /// Milliseconds the call took.
    pub elapsed_ms: f64,
}

/// A privacy cost in a ledger's measure and its (epsilon, delta) equivalent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Cost {
    /// In the node's measure: epsilon (pure) or rho (zcdp).
    pub amount: f64,
    /// (epsilon, delta)-DP equivalent: epsilon.
    pub epsilon: f64,
    /// (epsilon, delta)-DP equivalent: delta (0 for pure DP).
    pub delta: f64,
}

/// A federated result.
#[derive(Debug, Clone, Serialize)]
pub struct Combined {
    /// The SQL as sent.
    pub sql: String,
    /// The query id used on every node.
    pub query_id: String,
    /// Epsilon asked of each node (0 for a rho query).
    pub epsilon: f64,
    /// Rho (zCDP) asked of each node (0 for an epsilon query).
    #[serde(skip_serializing_if = "is_zero")]
    pub rho: f64,
    /// The noise mechanisms the nodes used, e.g. `discrete_gaussian`.
    pub mechanisms: Vec<String>,
    /// Dataset queried.
    pub dataset: String,
    /// GROUP BY column names.
    pub group_by: Vec<String>,
    /// Labels of the SELECT aggregates.
    pub outputs: Vec<String>,
    /// Rows, one per cell key, in the first answering node's order.
    pub rows: Vec<Row>,
    /// Every node's status, in federation order.
    pub nodes: Vec<NodeStatus>,
    /// True when some node did not contribute.
    pub partial: bool,
    /// True for a dry run: no values, nothing spent.
    pub dry_run: bool,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// One node's contribution to one cell of one measurement.
#[derive(Clone, Copy)]
struct Part {
    value: i64,
    /// The noise the node says it added (`None`: a mechanism this
    /// coordinator does not know, so no interval).
    noise: Option<Noise>,
}

/// Combines per-node outcomes of one query.
pub fn combine(
    sql: &str,
    query_id: &str,
    epsilon: f64,
    outcomes: &[Outcome<QueryResponse>],
) -> Combined {
    let answered: Vec<&QueryResponse> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().ok())
        .collect();
    let nodes: Vec<NodeStatus> = outcomes
        .iter()
        .map(|o| {
            let elapsed_ms = o.elapsed.as_secs_f64() * 1e3;
            match &o.result {
                Ok(r) => NodeStatus {
                    node: o.node.clone(),
                    status: if r.replayed {
                        "answered (replayed)".into()
                    } else {
                        "answered".into()
                    },
                    failure: None,
                    epsilon_spent: (!r.dry_run && !r.replayed && epsilon > 0.0).then_some(epsilon),
                    measure: (!r.measure.is_empty()).then(|| r.measure.clone()),
                    cost: (!r.measure.is_empty() && !r.replayed).then_some(Cost {
                        amount: r.cost,
                        epsilon: r.cost_epsilon,
                        delta: r.cost_delta,
                    }),
                    spent_equivalent: r
                        .budget
                        .as_ref()
                        .filter(|b| !b.measure.is_empty())
                        .map(|b| (b.spent_epsilon, b.spent_delta)),
                    remaining_for_analyst: r.budget.as_ref().map(|b| b.remaining_for_analyst),
                    remaining_for_dataset: r.budget.as_ref().map(|b| b.remaining_for_dataset),
                    epsilon_split: Some(r.epsilon_split.clone()),
                    replayed: r.replayed,
                    elapsed_ms,
                },
                Err(f) => NodeStatus {
                    node: o.node.clone(),
                    status: match f {
                        Failure::Unreachable(_) => "unreachable",
                        Failure::TimedOut(_) => "timed out",
                        Failure::Refused(_) => "refused",
                    }
                    .into(),
                    failure: Some(f.clone()),
                    epsilon_spent: None,
                    measure: None,
                    cost: None,
                    spent_equivalent: None,
                    remaining_for_analyst: None,
                    remaining_for_dataset: None,
                    epsilon_split: None,
                    replayed: false,
                    elapsed_ms,
                },
            }
        })
        .collect();
    let first = answered.first();
    let dataset = first.map(|r| r.dataset.clone()).unwrap_or_default();
    let group_by = first.map(|r| r.group_by.clone()).unwrap_or_default();
    let outputs: Vec<String> = first
        .map(|r| r.outputs.iter().map(|o| o.label.clone()).collect())
        .unwrap_or_default();
    let dry_run = first.is_some_and(|r| r.dry_run);
    let rho = first.map_or(0.0, |r| r.measurements.iter().map(|m| m.rho).sum());
    let mut mechanisms: Vec<String> = answered
        .iter()
        .flat_map(|r| r.measurements.iter().map(|m| m.mechanism.clone()))
        .collect();
    mechanisms.sort();
    mechanisms.dedup();

    // key -> (output index -> per-node parts of the main measurement and,
    // for AVG, of the count), plus contributing nodes.
    type Cell = (Vec<(Vec<Part>, Vec<Part>)>, Vec<String>);
    let mut order: Vec<Vec<String>> = Vec::new();
    let mut cells: BTreeMap<Vec<String>, Cell> = BTreeMap::new();
    for r in &answered {
        for (ci, key) in r.cells.iter().enumerate() {
            let entry = cells.entry(key.values.clone()).or_insert_with(|| {
                order.push(key.values.clone());
                (
                    (0..outputs.len())
                        .map(|_| (Vec::new(), Vec::new()))
                        .collect(),
                    Vec::new(),
                )
            });
            entry.1.push(r.node_name.clone());
            for (oi, out) in r.outputs.iter().enumerate().take(outputs.len()) {
                let part = |mi: u32| {
                    r.measurements.get(mi as usize).and_then(|m| {
                        m.values.get(ci).map(|&value| Part {
                            value,
                            noise: Noise::reported(&m.mechanism, m.scale),
                        })
                    })
                };
                if let Some(p) = part(out.measurement) {
                    entry.0[oi].0.push(p);
                }
                if let Some(p) = out.count_measurement.and_then(part) {
                    entry.0[oi].1.push(p);
                }
            }
        }
    }
    let kinds: Vec<(OutputKind, Option<(i64, i64)>)> = first
        .map(|r| {
            r.outputs
                .iter()
                .map(|o| {
                    let bounds = o.lower.zip(o.upper);
                    (
                        OutputKind::try_from(o.kind).unwrap_or(OutputKind::Unspecified),
                        bounds,
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let rows = order
        .into_iter()
        .map(|key| {
            let (parts, contributors) = cells.remove(&key).unwrap_or_default();
            let estimates = parts
                .iter()
                .zip(&kinds)
                .map(|((main, count), (kind, bounds))| {
                    if dry_run || main.is_empty() {
                        return None;
                    }
                    match kind {
                        OutputKind::Avg => average(main, count, *bounds),
                        _ => Some(total(main, ALPHA)),
                    }
                })
                .collect();
            Row {
                key,
                estimates,
                nodes: contributors,
            }
        })
        .collect();
    Combined {
        sql: sql.to_string(),
        query_id: query_id.to_string(),
        epsilon,
        rho,
        mechanisms,
        dataset,
        group_by,
        outputs,
        rows,
        partial: answered.len() < outcomes.len(),
        nodes,
        dry_run,
    }
}

/// Sum of the parts with the interval of the summed noise.
fn total(parts: &[Part], alpha: f64) -> Estimate {
    let value: i64 = parts
        .iter()
        .map(|p| p.value)
        .fold(0i64, i64::saturating_add);
    let noises: Option<Vec<Noise>> = parts.iter().map(|p| p.noise).collect();
    let w = noises.map_or(f64::INFINITY, |n| noise_sum_half_width(&n, alpha));
    Estimate {
        value: value as f64,
        ci_low: value as f64 - w,
        ci_high: value as f64 + w,
    }
}

/// Mean from a combined noisy sum and count. The interval holds the true
/// mean whenever both the sum's and the count's `1 - ALPHA/2` intervals
/// hold (a union bound), and is cut to the column's declared bounds.
fn average(sum: &[Part], count: &[Part], bounds: Option<(i64, i64)>) -> Option<Estimate> {
    if count.is_empty() {
        return None;
    }
    let each = ALPHA / 2.0;
    let s = total(sum, each);
    let c = total(count, each);
    let (lo_b, hi_b) = bounds
        .map(|(a, b)| (a as f64, b as f64))
        .unwrap_or((f64::NEG_INFINITY, f64::INFINITY));
    let value = if c.value > 0.0 {
        (s.value / c.value).clamp(lo_b, hi_b)
    } else {
        f64::NAN
    };
    let (ci_low, ci_high) = if c.ci_low > 0.0 {
        let lows = [s.ci_low / c.ci_low, s.ci_low / c.ci_high];
        let highs = [s.ci_high / c.ci_low, s.ci_high / c.ci_high];
        (
            lows.iter().copied().fold(f64::INFINITY, f64::min).max(lo_b),
            highs
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max)
                .min(hi_b),
        )
    } else {
        (lo_b, hi_b)
    };
    Some(Estimate {
        value,
        ci_low,
        ci_high,
    })
}

/// [`noise_sum_half_width`] of discrete Laplace noises with these scales.
pub fn sum_half_width(scales: &[f64], alpha: f64) -> f64 {
    let noises: Vec<Noise> = scales
        .iter()
        .map(|&scale| Noise::DiscreteLaplace { scale })
        .collect();
    noise_sum_half_width(&noises, alpha)
}

/// Half-width `w` such that the sum of independent noises (discrete
/// Laplace or discrete Gaussian, in any mix) lies in `[-w, w]` with
/// probability at least `1 - alpha`.
///
/// One noise: OpenDP's accuracy for its mechanism (via
/// `fedq_node::mechanism`). Several: the distribution of the sum is
/// computed by convolving the noises' probability mass functions on a grid
/// of width `h` (1 when the noise is small, so the result is exact;
/// otherwise about 1/100 of the sum's standard deviation, with `n h / 2`
/// added so the rounding can only widen the interval). Mass beyond 1e-12
/// in each tail of each noise is dropped and counted as lying outside the
/// interval; where a noise's tails are computed approximately (discrete
/// Gaussian of scale above 200), twice its stated error bound is also
/// taken from `alpha` (an error of at most e in each noise's distribution
/// function moves each tail of the sum by at most the sum of the e's).
pub fn noise_sum_half_width(noises: &[Noise], alpha: f64) -> f64 {
    match noises {
        [] => 0.0,
        [n] => n.half_width(alpha).unwrap_or(f64::INFINITY),
        _ => {
            let sd: f64 = noises.iter().map(Noise::variance).sum::<f64>().sqrt();
            if !sd.is_finite()
                || noises
                    .iter()
                    .any(|n| !(n.scale().is_finite() && n.scale() > 0.0))
            {
                return f64::INFINITY;
            }
            if sd > 1e12 {
                // Far beyond integer grids: the noise is continuous to any
                // useful precision, and its quantiles scale with it.
                let c = sd / 1e6;
                let scaled: Vec<Noise> = noises
                    .iter()
                    .map(|n| match *n {
                        Noise::DiscreteLaplace { scale } => {
                            Noise::DiscreteLaplace { scale: scale / c }
                        }
                        Noise::DiscreteGaussian { scale } => {
                            Noise::DiscreteGaussian { scale: scale / c }
                        }
                    })
                    .collect();
                return c * noise_sum_half_width(&scaled, alpha);
            }
            let h = (sd / 100.0).floor().max(1.0) as i64;
            let mut dropped = 0.0;
            let mut dist: Vec<f64> = vec![1.0];
            for n in noises {
                // Bins b = round(x / h): x in [b h - floor(h/2), b h + ceil(h/2) - 1].
                let k = (n.reach() + h) / h + 1;
                let edges: Vec<i64> = (-k..=k + 1).map(|b| b * h - h / 2).collect();
                let (tails, err) = n.upper_tails(&edges);
                let pmf: Vec<f64> = tails.windows(2).map(|t| t[0] - t[1]).collect();
                dropped += (1.0 - tails[0]) + tails[tails.len() - 1] + 2.0 * err;
                let mut next = vec![0.0; dist.len() + pmf.len() - 1];
                for (i, &a) in dist.iter().enumerate() {
                    if a == 0.0 {
                        continue;
                    }
                    for (j, &b) in pmf.iter().enumerate() {
                        next[i + j] += a * b;
                    }
                }
                dist = next;
            }
            let center = (dist.len() / 2) as i64;
            // Smallest w (in bins) with P[|S| > w] <= alpha - dropped.
            let budget = alpha - dropped;
            let mut outside: f64 = dist.iter().sum::<f64>();
            let mut w = 0i64;
            outside -= dist[center as usize];
            while outside > budget && w < center {
                w += 1;
                outside -= dist[(center - w) as usize] + dist[(center + w) as usize];
            }
            let slack = if h == 1 {
                0.0
            } else {
                noises.len() as f64 * h as f64 / 2.0
            };
            (w * h) as f64 + slack
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn laplace(scale: f64) -> Noise {
        Noise::DiscreteLaplace { scale }
    }

    fn gaussian(scale: f64) -> Noise {
        Noise::DiscreteGaussian { scale }
    }

    #[test]
    fn one_scale_matches_opendp() {
        let w = sum_half_width(&[2.0], 0.05);
        let expected = opendp::accuracy::discrete_laplacian_scale_to_accuracy(2.0, 0.05).unwrap();
        assert_eq!(w, expected);
    }

    #[test]
    fn convolution_agrees_with_brute_force_for_small_scales() {
        // Brute force the sum of two discrete Laplace(2) by enumeration.
        let q: f64 = (-0.5f64).exp();
        let p = |x: i64| (1.0 - q) / (1.0 + q) * q.powi(x.abs() as i32);
        let mut pmf = std::collections::HashMap::new();
        for a in -200i64..=200 {
            for b in -200i64..=200 {
                *pmf.entry(a + b).or_insert(0.0) += p(a) * p(b);
            }
        }
        let outside = |w: i64| {
            pmf.iter()
                .filter(|(k, _)| k.abs() > w)
                .map(|(_, v)| v)
                .sum::<f64>()
        };
        let mut w = 0;
        while outside(w) > 0.05 {
            w += 1;
        }
        assert_eq!(sum_half_width(&[2.0, 2.0], 0.05), w as f64);
    }

    #[test]
    fn wider_with_more_nodes_and_close_to_normal_for_many() {
        let one = sum_half_width(&[100.0], 0.05);
        let three = sum_half_width(&[100.0; 3], 0.05);
        assert!(three > one);
        // Three Laplace(100): sd = 100 * sqrt(6); the 95% half-width lies
        // between the normal approximation and a Chebyshev bound.
        let sd = 100.0 * 6f64.sqrt();
        assert!(three > 1.9 * sd && three < 4.48 * sd, "{three}");
    }

    /// The pmf of a discrete Gaussian(sigma) on -r..=r, by brute force.
    fn dg_pmf(sigma: f64, r: i64) -> Vec<(i64, f64)> {
        let w: Vec<f64> = (-r..=r)
            .map(|x| (-((x * x) as f64) / (2.0 * sigma * sigma)).exp())
            .collect();
        let z: f64 = w.iter().sum();
        (-r..=r).zip(w).map(|(x, p)| (x, p / z)).collect()
    }

    fn dl_pmf(scale: f64, r: i64) -> Vec<(i64, f64)> {
        let q = (-1.0 / scale).exp();
        (-r..=r)
            .map(|x| (x, (1.0 - q) / (1.0 + q) * q.powi(x.abs() as i32)))
            .collect()
    }

    /// The exact distribution of a sum of independent noises, by brute force.
    fn convolve(parts: &[Vec<(i64, f64)>]) -> std::collections::BTreeMap<i64, f64> {
        let mut dist = std::collections::BTreeMap::from([(0i64, 1.0)]);
        for p in parts {
            let mut next = std::collections::BTreeMap::new();
            for (&a, &pa) in &dist {
                for &(b, pb) in p {
                    *next.entry(a + b).or_insert(0.0) += pa * pb;
                }
            }
            dist = next;
        }
        dist
    }

    fn smallest_95(dist: &std::collections::BTreeMap<i64, f64>) -> i64 {
        let outside = |w: i64| {
            dist.iter()
                .filter(|(k, _)| k.abs() > w)
                .map(|(_, v)| v)
                .sum::<f64>()
        };
        let mut w = 0;
        while outside(w) > 0.05 {
            w += 1;
        }
        w
    }

    #[test]
    fn gaussian_and_mixed_convolutions_agree_with_brute_force() {
        let three = convolve(&[dg_pmf(3.0, 60), dg_pmf(3.0, 60), dg_pmf(3.0, 60)]);
        assert_eq!(
            noise_sum_half_width(&[gaussian(3.0); 3], 0.05),
            smallest_95(&three) as f64
        );
        let mixed = convolve(&[dg_pmf(4.0, 80), dl_pmf(2.0, 80)]);
        assert_eq!(
            noise_sum_half_width(&[gaussian(4.0), laplace(2.0)], 0.05),
            smallest_95(&mixed) as f64
        );
        // One node: OpenDP's discrete Gaussian accuracy.
        assert_eq!(
            noise_sum_half_width(&[gaussian(3.0)], 0.05),
            opendp::accuracy::discrete_gaussian_scale_to_accuracy(3.0, 0.05).unwrap()
        );
        // Large scales (binned grid, approximate tails): close to the normal
        // quantile of the sum, never below it by more than a grid step.
        let w = noise_sum_half_width(&[gaussian(1000.0); 3], 0.05);
        let normal = 1.959_964 * 1000.0 * 3f64.sqrt();
        assert!(w >= normal - 1.0 && w <= normal * 1.02, "{w} vs {normal}");
    }

    /// Coverage of the combined 95% interval of the sum of three nodes'
    /// noises, with noise drawn by OpenDP (the nodes' own sampler).
    ///
    /// Calibration: N = 20,000 federated cells. The exact coverage q of
    /// the interval (P[|S| <= w], at least 0.95 and a little above it as S
    /// is an integer) is computed here by brute force; the number of cells
    /// covered is Binomial(N, q), so the observed fraction lies within 5
    /// standard deviations (sd = sqrt(q (1 - q) / N) ~ 0.0015) of q except
    /// with probability below 1e-6. The same rule applied to the interval
    /// of one node alone (coverage about 0.8 for three nodes) fails by
    /// more than 100 standard deviations: an interval computed as if the
    /// sum were one node's noise is caught.
    fn check_coverage(noise: Noise, pmf: Vec<(i64, f64)>) {
        let n = 20_000usize;
        let w = noise_sum_half_width(&[noise; 3], ALPHA);
        let dist = convolve(&[pmf.clone(), pmf.clone(), pmf]);
        let exact = |w: f64| -> f64 {
            dist.iter()
                .filter(|(k, _)| (**k as f64).abs() <= w)
                .map(|(_, v)| v)
                .sum()
        };
        let q = exact(w);
        assert!((0.95..0.96).contains(&q), "exact coverage {q}");
        let one = noise.half_width(ALPHA).unwrap();
        let q_one = exact(one);
        let sd = (q * (1.0 - q) / n as f64).sqrt();
        assert!(
            q - q_one > 10.0 * sd,
            "one-node interval would pass: {q_one}"
        );
        let draws: Vec<Vec<i64>> = (0..3)
            .map(|_| noise.release(&vec![0i64; n]).unwrap())
            .collect();
        let covered = (0..n)
            .filter(|&i| ((draws[0][i] + draws[1][i] + draws[2][i]) as f64).abs() <= w)
            .count();
        let observed = covered as f64 / n as f64;
        let covered_one = (0..n)
            .filter(|&i| ((draws[0][i] + draws[1][i] + draws[2][i]) as f64).abs() <= one)
            .count() as f64
            / n as f64;
        eprintln!(
            "{}: combined w = {w}, coverage {observed:.4} (exact {q:.4}, sd {sd:.4}); one-node w = {one}: {covered_one:.4} (exact {q_one:.4})",
            noise.name()
        );
        assert!(
            (observed - q).abs() <= 5.0 * sd,
            "coverage {observed:.4}, exact {q:.4} (5 sd = {:.4})",
            5.0 * sd
        );
        assert!(
            (covered_one - q).abs() > 5.0 * sd,
            "one-node coverage {covered_one}"
        );
    }

    #[test]
    fn combined_gaussian_interval_covers_95_percent() {
        check_coverage(gaussian(10.0), dg_pmf(10.0, 120));
    }

    #[test]
    fn combined_laplace_interval_covers_95_percent() {
        check_coverage(laplace(4.0), dl_pmf(4.0, 200));
    }
}
