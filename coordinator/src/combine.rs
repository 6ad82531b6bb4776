//! Combining the nodes' noisy answers into one federated estimate.
//!
//! Per cell key: counts and sums add up across nodes; so do the independent
//! noises (discrete Laplace or discrete Gaussian, as each node reports),
//! whose sum's 95% interval is computed from the distribution of the sum,
//! by convolution (see [`sum_half_width`]). Means are
//! derived from the combined sum and the combined count. Only noisy values
//! ever reach this module.

use std::collections::{BTreeMap, HashMap};

use fedq_dp::accounting::Measure;
use fedq_dp::mechanism::Noise;
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

/// The (epsilon, delta) equivalent of an answer's `spent_by_analyst`. A
/// zCDP node leaves it to the reader in answers (`spent_delta` 0; one
/// conversion per query was most of its extra CPU): it is OpenDP's
/// conversion at the dataset's delta, which the answer's `cost_delta`
/// states.
fn spent_equivalent(b: &fedq_proto::v1::Budget, delta: f64) -> (f64, f64) {
    if b.measure == Measure::Zcdp.name() && b.spent_delta == 0.0 && b.spent_by_analyst > 0.0 {
        let epsilon = Measure::Zcdp
            .equivalent(b.spent_by_analyst, delta)
            .map_or(f64::INFINITY, |(e, _)| e);
        (epsilon, delta)
    } else {
        (b.spent_epsilon, b.spent_delta)
    }
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
    /// True when some nodes contributed and some did not (false when none
    /// did: that is no result at all, not a partial one).
    pub partial: bool,
    /// True for a dry run: no values, nothing spent.
    pub dry_run: bool,
    /// For a GROUP BY over an open-domain column: how its keys were
    /// released, and what that means for the rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub released_keys: Option<KeysNote>,
    /// ORDER BY, LIMIT, HAVING or ROUND applied by the coordinator
    /// ([`crate::post`]), and what that means.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub post_processing: Option<String>,
}

/// How the keys of an open-domain GROUP BY were released across nodes.
#[derive(Debug, Clone, Serialize)]
pub struct KeysNote {
    /// The open-domain column.
    pub column: String,
    /// Each answering node's threshold (smallest noisy count it releases)
    /// and the delta the release spent there.
    pub thresholds: Vec<(String, i64, f64)>,
    /// What the rows mean, in words.
    pub note: String,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// One node's contribution to one cell of one measurement.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Part {
    pub(crate) value: i64,
    /// The noise the node says it added (`None`: a mechanism this
    /// coordinator does not know, so no interval).
    pub(crate) noise: Option<Noise>,
}

/// Every node's contributions to one output in one cell.
#[derive(Debug, Default)]
pub(crate) struct Parts {
    /// The count (COUNT) or sum (SUM, AVG, VARIANCE, STDDEV).
    pub(crate) main: Vec<Part>,
    /// AVG, VARIANCE, STDDEV: the count of non-missing values.
    pub(crate) count: Vec<Part>,
    /// VARIANCE, STDDEV: the centred sum of squares.
    pub(crate) squares: Vec<Part>,
    /// QUANTILE, HISTOGRAM: each node's bin counts for the cell and noise.
    pub(crate) bins: Vec<(Vec<i64>, Option<Noise>)>,
    /// QUANTILE, HISTOGRAM: the bins' edges.
    pub(crate) edges: Vec<i64>,
}

/// What an output asks for: from the first answer, whose layout is the
/// coordinator's own plan (see [`combine`]).
pub(crate) struct OutputSpec {
    pub(crate) kind: OutputKind,
    pub(crate) bounds: Option<(i64, i64)>,
    pub(crate) quantile: f64,
    pub(crate) center: i64,
}

/// Combines per-node outcomes of one query.
///
/// The layout (GROUP BY columns, outputs, bounds, centre, quantile, bin
/// edges) and every noise scale are read from the answers, so `outcomes`
/// must come from [`crate::run::run_query`]: it checked each answer against
/// the coordinator's own plan, left out those that disagree or whose layout
/// differs from most nodes', and replaced the layout and scales of the
/// others by the plan's ([`crate::verify`]). Every answer combined here
/// then carries the same, coordinator-derived layout.
pub fn combine(
    sql: &str,
    query_id: &str,
    epsilon: f64,
    outcomes: &[Outcome<QueryResponse>],
) -> Combined {
    combine_at(sql, query_id, epsilon, outcomes, ALPHA)
}

/// [`combine`] with `1 - alpha` intervals instead of 95% ones: for
/// quantities derived from several aggregates ([`crate::post`]), whose
/// interval holds when all of theirs do (a union bound).
pub fn combine_at(
    sql: &str,
    query_id: &str,
    epsilon: f64,
    outcomes: &[Outcome<QueryResponse>],
    alpha: f64,
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
                        .map(|b| spent_equivalent(b, r.cost_delta)),
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
                        Failure::LeftOut(_) => "left out",
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

    // key -> (output index -> per-node parts of its measurements), plus
    // contributing nodes.
    type Cell = (Vec<Parts>, Vec<String>);
    let mut order: Vec<Vec<String>> = Vec::new();
    let mut cells: BTreeMap<Vec<String>, Cell> = BTreeMap::new();
    for r in &answered {
        for (ci, key) in r.cells.iter().enumerate() {
            let entry = cells.entry(key.values.clone()).or_insert_with(|| {
                order.push(key.values.clone());
                (
                    (0..outputs.len()).map(|_| Parts::default()).collect(),
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
                let parts = &mut entry.0[oi];
                if let Some(m) = r.measurements.get(out.measurement as usize) {
                    if m.bins > 1 || !m.bin_edges.is_empty() {
                        let k = m.bins.max(1) as usize;
                        if let Some(values) = m.values.get(ci * k..(ci + 1) * k) {
                            parts
                                .bins
                                .push((values.to_vec(), Noise::reported(&m.mechanism, m.scale)));
                            parts.edges = m.bin_edges.clone();
                        }
                    } else if let Some(p) = part(out.measurement) {
                        parts.main.push(p);
                    }
                }
                if let Some(p) = out.count_measurement.and_then(part) {
                    parts.count.push(p);
                }
                if let Some(p) = out.square_measurement.and_then(part) {
                    parts.squares.push(p);
                }
            }
        }
    }
    let kinds: Vec<OutputSpec> = first
        .map(|r| {
            r.outputs
                .iter()
                .map(|o| OutputSpec {
                    kind: OutputKind::try_from(o.kind).unwrap_or(OutputKind::Unspecified),
                    bounds: o.lower.zip(o.upper),
                    quantile: o.quantile,
                    center: o.center,
                })
                .collect()
        })
        .unwrap_or_default();
    let mut widths = HalfWidths::default();
    let mut group_by = group_by;
    let histogram = kinds.len() == 1 && kinds[0].kind == OutputKind::Histogram;
    let mut rows = Vec::new();
    for key in order {
        let (parts, contributors) = cells.remove(&key).unwrap_or_default();
        if histogram {
            // One row per bin: the bin is one more key column.
            let p = &parts[0];
            for b in 0..p.edges.len().saturating_sub(1) {
                let mut k = key.clone();
                k.push(format!("{}..{}", p.edges[b], p.edges[b + 1] - 1));
                let bin: Vec<Part> = p
                    .bins
                    .iter()
                    .filter_map(|(v, noise)| {
                        v.get(b).map(|&value| Part {
                            value,
                            noise: *noise,
                        })
                    })
                    .collect();
                rows.push(Row {
                    key: k,
                    estimates: vec![
                        (!dry_run && !bin.is_empty()).then(|| total(&bin, alpha, &mut widths))
                    ],
                    nodes: contributors.clone(),
                });
            }
            continue;
        }
        let estimates = parts
            .iter()
            .zip(&kinds)
            .map(|(p, spec)| {
                if dry_run || (p.main.is_empty() && p.bins.is_empty()) {
                    return None;
                }
                match spec.kind {
                    OutputKind::Avg => average(&p.main, &p.count, spec.bounds, alpha, &mut widths),
                    OutputKind::Quantile => crate::distribution::quantile(p, spec, alpha),
                    OutputKind::Variance | OutputKind::Stddev => {
                        crate::distribution::variance(p, spec, alpha, &mut widths)
                    }
                    _ => Some(total(&p.main, alpha, &mut widths)),
                }
            })
            .collect();
        rows.push(Row {
            key,
            estimates,
            nodes: contributors,
        });
    }
    let released_keys = answered
        .iter()
        .find_map(|r| r.released_keys.as_ref())
        .map(|k| {
            // Each node released its own keys: order rows by key, not by
            // which node answered first.
            rows.sort_by(|a, b| a.key.cmp(&b.key));
            KeysNote {
                column: k.column.clone(),
                thresholds: answered
                    .iter()
                    .filter_map(|r| {
                        r.released_keys
                            .as_ref()
                            .map(|k| (r.node_name.clone(), k.threshold, k.delta))
                    })
                    .collect(),
                note: format!(
                    "{} has an open domain: each node released only the keys whose noisy count reached its threshold. A row sums the nodes that released that key (its `nodes`), so a key withheld by some nodes is under-counted there; keys withheld by every node are not shown, and whether any exist is not said (that would depend on the data).",
                    k.column
                ),
            }
        });
    if histogram {
        if let Some(r) = answered.first() {
            let column = r.outputs[0].label.clone();
            group_by.push(format!("{column} bin"));
        }
    }
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
        partial: !answered.is_empty() && answered.len() < outcomes.len(),
        nodes,
        dry_run,
        released_keys,
        post_processing: None,
    }
}

/// Half-widths computed so far while combining one query. Every cell of a
/// measurement has the same scales on every node, so a GROUP BY needs one
/// [`sum_half_width`] per measurement, not one per cell.
#[derive(Default)]
pub(crate) struct HalfWidths(HashMap<(Vec<u64>, u64), f64>);

impl HalfWidths {
    /// [`noise_sum_half_width`] of `noises` at `alpha`, computed once.
    fn get(&mut self, noises: &[Noise], alpha: f64) -> f64 {
        let key = (noises.iter().map(noise_key).collect(), alpha.to_bits());
        *self
            .0
            .entry(key)
            .or_insert_with(|| noise_sum_half_width(noises, alpha))
    }
}

/// Sum of the parts with the interval of the summed noise.
pub(crate) fn total(parts: &[Part], alpha: f64, widths: &mut HalfWidths) -> Estimate {
    let value: i64 = parts
        .iter()
        .map(|p| p.value)
        .fold(0i64, i64::saturating_add);
    let noises: Option<Vec<Noise>> = parts.iter().map(|p| p.noise).collect();
    let w = noises.map_or(f64::INFINITY, |n| widths.get(&n, alpha));
    Estimate {
        value: value as f64,
        ci_low: value as f64 - w,
        ci_high: value as f64 + w,
    }
}

/// Mean from a combined noisy sum and count. The interval holds the true
/// mean whenever both the sum's and the count's `1 - alpha/2` intervals
/// hold (a union bound), and is cut to the column's declared bounds.
fn average(
    sum: &[Part],
    count: &[Part],
    bounds: Option<(i64, i64)>,
    alpha: f64,
    widths: &mut HalfWidths,
) -> Option<Estimate> {
    if count.is_empty() {
        return None;
    }
    let each = alpha / 2.0;
    let s = total(sum, each, widths);
    let c = total(count, each, widths);
    let (lo_b, hi_b) = bounds
        .map(|(a, b)| (a as f64, b as f64))
        .unwrap_or((f64::NEG_INFINITY, f64::INFINITY));
    let value = if c.value > 0.0 {
        (s.value / c.value).clamp(lo_b, hi_b)
    } else {
        f64::NAN
    };
    // Both ends are cut to the bounds (not just the near one): when the
    // noisy sum's whole interval lies outside them (the union bound's event
    // failed, which happens about 5% of the time with heavy noise), cutting
    // only the low end to the lower bound left `low > high`, an interval
    // that was printed. Cut both, the interval becomes the nearest bound,
    // where the (clamped) estimate then lies too.
    let cut = |x: f64| x.max(lo_b).min(hi_b);
    let (ci_low, ci_high) = if c.ci_low > 0.0 {
        let lows = [s.ci_low / c.ci_low, s.ci_low / c.ci_high];
        let highs = [s.ci_high / c.ci_low, s.ci_high / c.ci_high];
        (
            cut(lows.iter().copied().fold(f64::INFINITY, f64::min)),
            cut(highs.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
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
/// `fedq_dp::mechanism`). Several: the distribution of the sum is
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
            // The grid step: each node's value is within h/2 of its bin, so
            // the sum is within k h / 2 of the binned sum (the slack added
            // at the end). At most sd/100, and sd/(4k) for many nodes, so
            // that the slack stays under an eighth of sd however many
            // nodes there are.
            let k = noises.len() as f64;
            let h = (sd / (100.0f64).max(4.0 * k)).floor().max(1.0) as i64;
            let (dist, dropped) = sum_distribution(noises, h, POWER_FROM);
            let w = half_width_bins(&dist, alpha - dropped);
            let slack = if h == 1 {
                0.0
            } else {
                noises.len() as f64 * h as f64 / 2.0
            };
            (w * h) as f64 + slack
        }
    }
}

/// The smallest `w` (in bins) with `P[|S| > w] <= budget` for the
/// distribution `dist` of `S` (bin 0 in the middle).
fn half_width_bins(dist: &[f64], budget: f64) -> i64 {
    let center = (dist.len() / 2) as i64;
    let mut outside: f64 = dist.iter().sum::<f64>();
    let mut w = 0i64;
    outside -= dist[center as usize];
    while outside > budget && w < center {
        w += 1;
        outside -= dist[(center - w) as usize] + dist[(center + w) as usize];
    }
    w
}

/// The distribution of the sum of `noises` binned on the grid of step `h`
/// (bin 0 in the middle) and the mass it leaves out of any tail (see
/// [`noise_sum_half_width`]). Groups of at least `power_from` equal noises
/// are summed by repeated squaring, the others one at a time.
fn sum_distribution(noises: &[Noise], h: i64, power_from: usize) -> (Vec<f64>, f64) {
    // Many nodes usually carry the same noise (same mechanism and
    // scale): such a group's sum is one binned pmf raised to the
    // group's size by repeated squaring, O(log k) convolutions of
    // length about sqrt(k) (by FFT) instead of k of them.
    let mut group_size: HashMap<u64, usize> = HashMap::new();
    for n in noises {
        *group_size.entry(noise_key(n)).or_default() += 1;
    }
    let mut dropped = 0.0;
    let mut dist: Vec<f64> = vec![1.0];
    for n in noises {
        let size = group_size.get(&noise_key(n)).copied().unwrap_or(1);
        if size >= power_from {
            // The whole group at its first member; later members skipped.
            group_size.insert(noise_key(n), 0);
            let (pmf, lost) = binned_pmf(n, h);
            let sum = power(Dist { pmf, lost }, size);
            let both = times(
                &Dist {
                    pmf: dist,
                    lost: 0.0,
                },
                &sum,
            );
            dist = both.pmf;
            dropped += both.lost;
            continue;
        }
        if size == 0 {
            continue;
        }
        // Bins b = round(x / h): x in [b h - floor(h/2), b h + ceil(h/2) - 1].
        match *n {
            // Geometric away from its centre: linear-time convolution.
            Noise::DiscreteLaplace { scale: s } => {
                let (kernel, lost) = laplace_kernel(s, h);
                dropped += lost;
                dist = kernel.convolve(&dist);
            }
            Noise::DiscreteGaussian { .. } => {
                let (pmf, lost) = binned_pmf(n, h);
                dropped += lost;
                dist = direct_convolution(&dist, &pmf);
            }
        }
        // The tails the running sum can no longer bring into the
        // interval are dropped as they form (their mass counted in
        // `dropped`, so the bound stays one), keeping the work
        // about linear in the nodes rather than quadratic.
        dropped += trim_tails(&mut dist, TAIL_TRIM);
    }
    (dist, dropped)
}

/// Groups of at least this many nodes with the same noise are summed by
/// repeated squaring ([`power`]); smaller ones one node at a time (a
/// linear-time step each for the discrete Laplace), which is as fast there
/// and keeps small federations' intervals exactly as before.
const POWER_FROM: usize = 16;

/// The identity of a noise for grouping: mechanism and scale, bit for bit.
fn noise_key(n: &Noise) -> u64 {
    match n {
        Noise::DiscreteLaplace { scale } => scale.to_bits() << 1,
        Noise::DiscreteGaussian { scale } => scale.to_bits() << 1 | 1,
    }
}

/// A discrete Laplace noise of scale `s` binned on the grid of step `h`
/// (bins `b = round(x / h)`), as the linear-time kernel, and the mass it
/// leaves out beyond its reach (both tails; `q^reach < 1e-12`).
fn laplace_kernel(s: f64, h: i64) -> (Binned, f64) {
    let q = (-1.0 / s).exp();
    let reach = (s * 28.0) as i64 + h;
    let k = reach / h + 1;
    let lo_edge = |b: i64| b * h - h / 2;
    let bin = |b: i64| upper_tail(q, lo_edge(b)) - upper_tail(q, lo_edge(b + 1));
    let kernel = Binned {
        center: bin(0),
        right: bin(1),
        left: bin(-1),
        ratio: geometric(q, h),
        reach: k as usize,
    };
    (kernel, 2.0 * upper_tail(q, lo_edge(k + 1)))
}

/// One node's noise binned on the grid of step `h`, as a pmf with bin 0 in
/// the middle, and what it leaves out of the bound: the tail mass beyond its
/// reach, and for a discrete Gaussian twice the error bound of its tails (an
/// error of at most e in each noise's distribution function moves each tail
/// of the sum by at most the sum of the e's).
fn binned_pmf(n: &Noise, h: i64) -> (Vec<f64>, f64) {
    match *n {
        Noise::DiscreteLaplace { scale } => {
            let (kernel, lost) = laplace_kernel(scale, h);
            (kernel.convolve(&[1.0]), lost)
        }
        Noise::DiscreteGaussian { .. } => {
            let k = (n.reach() + h) / h + 1;
            let edges: Vec<i64> = (-k..=k + 1).map(|b| b * h - h / 2).collect();
            let (tails, err) = n.upper_tails(&edges);
            let pmf: Vec<f64> = tails.windows(2).map(|t| t[0] - t[1]).collect();
            let lost = (1.0 - tails[0]) + tails[tails.len() - 1] + 2.0 * err;
            (pmf, lost)
        }
    }
}

/// A computed distribution of a sum of binned noises (bin 0 in the middle
/// of `pmf`) and a bound on what it leaves out: every tail of the true
/// distribution exceeds the same tail of `pmf` by at most `lost` (tails
/// dropped, the noises' own error bounds, floating-point error of the
/// convolutions).
struct Dist {
    /// Bin masses, symmetric about the middle bin up to rounding.
    pmf: Vec<f64>,
    /// Upper bound on the mass missing from any tail.
    lost: f64,
}

/// The distribution of `n` independent copies of `base` summed, by
/// repeated squaring (binary powering): `base^n` from the squares `base^(2^j)`
/// of the bits of `n`. Each product's far tails are dropped as they form
/// (at most [`TAIL_TRIM`] a side, counted in `lost`), as in the one-by-one
/// sum; the rounding slack of the grid is the caller's (each node's value
/// is within h/2 of its bin however the sum is formed).
fn power(base: Dist, mut n: usize) -> Dist {
    let mut result: Option<Dist> = None;
    let mut square = base;
    loop {
        if n & 1 == 1 {
            result = Some(match result {
                None => Dist {
                    pmf: square.pmf.clone(),
                    lost: square.lost,
                },
                Some(r) => times(&r, &square),
            });
        }
        n >>= 1;
        if n == 0 {
            break;
        }
        square = times(&square, &square);
    }
    result.unwrap_or(Dist {
        pmf: vec![1.0],
        lost: 0.0,
    })
}

/// The distribution of the sum of two independent sums, its far tails
/// trimmed. What each left out adds up (plus their product, as either may
/// be a sub-probability), and so does the product's floating-point error.
fn times(a: &Dist, b: &Dist) -> Dist {
    let (mut pmf, err) = if a.pmf.len().min(b.pmf.len()) <= DIRECT_UP_TO {
        (direct_convolution(&a.pmf, &b.pmf), 0.0)
    } else {
        fft_convolution(&a.pmf, &b.pmf)
    };
    let trimmed = trim_tails(&mut pmf, TAIL_TRIM);
    Dist {
        pmf,
        lost: a.lost + b.lost + a.lost * b.lost + err + trimmed,
    }
}

/// Below this length the direct convolution is cheaper than an FFT (and
/// exact up to ordinary rounding).
const DIRECT_UP_TO: usize = 64;

fn direct_convolution(a: &[f64], b: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; a.len() + b.len() - 1];
    for (i, &x) in a.iter().enumerate() {
        if x == 0.0 {
            continue;
        }
        for (j, &y) in b.iter().enumerate() {
            out[i + j] += x * y;
        }
    }
    out
}

/// The convolution of two non-negative sequences by FFT, and a bound on
/// its error in total (L1) mass.
///
/// The error bound: a radix-2 FFT of length N with accurate twiddle factors
/// is within `log2(N) eta` (relative, 2-norm) of the exact transform, eta
/// about 7 unit roundoffs (Higham, Accuracy and Stability of Numerical
/// Algorithms, 2nd ed., Theorem 24.2); through the forward transform, the
/// pointwise product and the inverse transform, the output is within
/// `3 (log2(N) + 2) eta (|a|_2 + |b|_2)` of the exact convolution in the
/// 2-norm, for sequences of total mass at most about one. We take eta as 16
/// unit roundoffs (more than twice the theorem's), turn the 2-norm into a
/// bound per bin, set to zero every bin at or below it (their total, which
/// is what zeroing changes, counted too, so that the far tails that are
/// only rounding noise can be trimmed) and bound the L1 error by
/// `sqrt(len)` times the 2-norm bound (Cauchy-Schwarz).
fn fft_convolution(a: &[f64], b: &[f64]) -> (Vec<f64>, f64) {
    let len = a.len() + b.len() - 1;
    let size = len.next_power_of_two();
    // a in the real part, b in the imaginary part: one forward transform.
    let mut x = vec![Complex::default(); size];
    for (i, &v) in a.iter().enumerate() {
        x[i].re = v;
    }
    for (i, &v) in b.iter().enumerate() {
        x[i].im = v;
    }
    fft(&mut x, false);
    // A_k = (X_k + conj X_{-k}) / 2, B_k = (X_k - conj X_{-k}) / 2i, and
    // the product A_k B_k = (X_k^2 - conj(X_{-k})^2) / 4i.
    let product: Vec<Complex> = (0..size)
        .map(|k| {
            let xk = x[k];
            let xm = x[(size - k) % size].conj();
            let d = xk.mul(xk).sub(xm.mul(xm));
            // d / 4i = -i d / 4
            Complex {
                re: d.im / 4.0,
                im: -d.re / 4.0,
            }
        })
        .collect();
    let mut y = product;
    fft(&mut y, true);
    let norm = |v: &[f64]| v.iter().map(|t| t * t).sum::<f64>().sqrt();
    let log2 = size.trailing_zeros() as f64;
    let eta = 16.0 * f64::EPSILON / 2.0;
    let bound = 3.0 * (log2 + 2.0) * eta * (norm(a) + norm(b));
    let mut zeroed = 0.0;
    let out: Vec<f64> = y[..len]
        .iter()
        .map(|c| {
            let v = c.re / size as f64;
            if v <= bound {
                zeroed += v.max(0.0);
                0.0
            } else {
                v
            }
        })
        .collect();
    (out, (len as f64).sqrt() * bound + zeroed)
}

/// A complex number, for [`fft`] (the only place the coordinator needs one).
#[derive(Debug, Clone, Copy, Default)]
struct Complex {
    re: f64,
    im: f64,
}

impl Complex {
    fn mul(self, o: Complex) -> Complex {
        Complex {
            re: self.re * o.re - self.im * o.im,
            im: self.re * o.im + self.im * o.re,
        }
    }
    fn add(self, o: Complex) -> Complex {
        Complex {
            re: self.re + o.re,
            im: self.im + o.im,
        }
    }
    fn sub(self, o: Complex) -> Complex {
        Complex {
            re: self.re - o.re,
            im: self.im - o.im,
        }
    }
    fn conj(self) -> Complex {
        Complex {
            re: self.re,
            im: -self.im,
        }
    }
}

/// In-place iterative radix-2 FFT (`x.len()` a power of two); `inverse`
/// without the 1/N factor. Twiddle factors are computed each from its own
/// angle (not by repeated multiplication), so each is accurate to a unit
/// roundoff or so, as the error bound of [`fft_convolution`] assumes.
fn fft(x: &mut [Complex], inverse: bool) {
    let n = x.len();
    let mut j = 0usize;
    for i in 1..n {
        let mut bit = n >> 1;
        while j & bit != 0 {
            j ^= bit;
            bit >>= 1;
        }
        j |= bit;
        if i < j {
            x.swap(i, j);
        }
    }
    let sign = if inverse { 1.0 } else { -1.0 };
    let twiddles: Vec<Complex> = (0..n / 2)
        .map(|t| {
            let (s, c) = (sign * 2.0 * std::f64::consts::PI * t as f64 / n as f64).sin_cos();
            Complex { re: c, im: s }
        })
        .collect();
    let mut len = 2;
    while len <= n {
        let stride = n / len;
        for start in (0..n).step_by(len) {
            for t in 0..len / 2 {
                let w = twiddles[t * stride];
                let u = x[start + t];
                let v = x[start + t + len / 2].mul(w);
                x[start + t] = u.add(v);
                x[start + t + len / 2] = u.sub(v);
            }
        }
        len <<= 1;
    }
}

/// Mass below which a running sum's outer bins are dropped (on each
/// side): over 1,000 nodes at most 2e-13 of the interval's alpha.
const TAIL_TRIM: f64 = 1e-16;

/// Drops the same number of outer bins from both ends of the symmetric
/// distribution `dist` (so its centre stays its middle), as many as hold at
/// most `limit` mass on each side; returns the mass dropped.
fn trim_tails(dist: &mut Vec<f64>, limit: f64) -> f64 {
    let (mut left, mut right, mut t) = (0.0, 0.0, 0usize);
    while 2 * (t + 1) < dist.len() {
        let (l, r) = (left + dist[t], right + dist[dist.len() - 1 - t]);
        if l > limit || r > limit {
            break;
        }
        (left, right, t) = (l, r, t + 1);
    }
    if t > 0 {
        dist.truncate(dist.len() - t);
        dist.drain(..t);
    }
    left + right
}

/// Tail `P[X >= k]` of a discrete Laplace variable with parameter
/// `q = e^{-1/scale}`: `q^k / (1 + q)` for `k >= 1`.
fn upper_tail(q: f64, k: i64) -> f64 {
    if k <= 0 {
        // P[X >= k] = 1 - P[X <= k - 1] = 1 - P[X >= 1 - k] by symmetry.
        1.0 - upper_tail(q, 1 - k)
    } else {
        geometric(q, k) / (1.0 + q)
    }
}

/// `q^k` for `k >= 0`; beyond `i32::MAX` (scales of 1e8 and more) by
/// `powf`, where `powi`'s exponent would have to be cut (and the tail made
/// far too heavy).
fn geometric(q: f64, k: i64) -> f64 {
    match i32::try_from(k) {
        Ok(k) => q.powi(k),
        Err(_) => q.powf(k as f64),
    }
}

/// One node's noise binned on the grid of [`sum_half_width`]: bins `1..=reach`
/// on either side of the centre hold a geometric sequence (bin `b + 1` is
/// bin `b` times `ratio = q^h`, since the discrete Laplace mass of a bin is
/// `q^(lower edge) (1 - q^h) / (1 + q)`), which is what makes convolving with
/// it linear in the length of the distribution.
struct Binned {
    /// Mass of bin 0.
    center: f64,
    /// Mass of bin 1 (bins `2..=reach` follow geometrically).
    right: f64,
    /// Mass of bin -1 (bins `-reach..=-2` follow geometrically).
    left: f64,
    /// `q^h`, the ratio between neighbouring bins away from the centre.
    ratio: f64,
    /// Bins kept on each side.
    reach: usize,
}

impl Binned {
    /// The distribution of `X + N` (bins), given that of `X` in `x` (bin 0
    /// at index 0) and `N` this noise: the same sums as the direct
    /// convolution `out[i + reach + d] += x[i] * mass(d)`, computed for each
    /// geometric side as a running sum that is multiplied by `ratio` at each
    /// step, gains the next value of `x` and loses the one `reach` bins back
    /// (whose weight, `ratio^reach < 1e-12`, is too small for the
    /// subtraction to lose precision). O(len(x) + reach) instead of
    /// O(len(x) * reach): the direct convolution took hundreds of
    /// milliseconds per query for three nodes (see BENCHMARKS.md).
    fn convolve(&self, x: &[f64]) -> Vec<f64> {
        let k = self.reach;
        let n = x.len();
        let at = |i: isize| {
            if i >= 0 && (i as usize) < n {
                x[i as usize]
            } else {
                0.0
            }
        };
        let r = self.ratio;
        let rk = r.powi(k.min(i32::MAX as usize) as i32);
        let mut out = vec![0.0; n + 2 * k];
        for (i, &v) in x.iter().enumerate() {
            out[i + k] += self.center * v;
        }
        // Right side: out[m] += right * y[p], p = m - k, with
        // y[p] = sum_{d=1..k} r^(d-1) x[p-d];  y[p+1] = x[p] + r y[p] - r^k x[p-k].
        let mut y = 0.0;
        for (m, o) in out.iter_mut().enumerate() {
            let p = m as isize - k as isize;
            *o += self.right * y;
            y = (at(p) + r * y - rk * at(p - k as isize)).max(0.0);
        }
        // Left side: out[m] += left * z[p], p = m - k, with
        // z[p] = sum_{d=1..k} r^(d-1) x[p+d];  z[p-1] = x[p] + r z[p] - r^k x[p+k].
        let mut z = 0.0;
        for (m, o) in out.iter_mut().enumerate().rev() {
            let p = m as isize - k as isize;
            *o += self.left * z;
            z = (at(p) + r * z - rk * at(p + k as isize)).max(0.0);
        }
        out
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

    /// Issue 16: an honest three-node AVG printed `[0, -1.79]` (its noisy
    /// sum's interval lay wholly below the lower bound). Both ends are cut
    /// to the bounds now, and a variance's to `[0, ...]`.
    #[test]
    fn intervals_outside_the_bounds_are_cut_never_inverted() {
        let mut w = HalfWidths::default();
        let part = |value, scale| Part {
            value,
            noise: Some(laplace(scale)),
        };
        let e = average(
            &[part(-5000, 480.0)],
            &[part(300, 4.0)],
            Some((0, 120)),
            ALPHA,
            &mut w,
        )
        .unwrap();
        assert_eq!((e.value, e.ci_low, e.ci_high), (0.0, 0.0, 0.0), "{e:?}");
        let e = average(
            &[part(90_000, 480.0)],
            &[part(300, 4.0)],
            Some((0, 120)),
            ALPHA,
            &mut w,
        )
        .unwrap();
        assert_eq!(
            (e.value, e.ci_low, e.ci_high),
            (120.0, 120.0, 120.0),
            "{e:?}"
        );
        for kind in [OutputKind::Variance, OutputKind::Stddev] {
            let parts = Parts {
                main: vec![part(18_000, 480.0)],
                count: vec![part(300, 4.0)],
                squares: vec![part(-10_000_000, 10_000.0)],
                ..Parts::default()
            };
            let spec = OutputSpec {
                kind,
                bounds: Some((0, 120)),
                quantile: 0.0,
                center: 60,
            };
            let e = crate::distribution::variance(&parts, &spec, ALPHA, &mut w).unwrap();
            assert!(
                e.ci_low.is_finite() && e.ci_high.is_finite() && e.ci_low <= e.ci_high,
                "{kind:?}: {e:?}"
            );
            assert_eq!((e.ci_low, e.ci_high), (0.0, 0.0), "{kind:?}: {e:?}");
        }
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

    /// The direct O(n m) convolution the linear-time [`Binned::convolve`]
    /// replaced, on the same grid: the reference it must agree with.
    fn direct_half_width(scales: &[f64], alpha: f64) -> f64 {
        let sd: f64 = scales
            .iter()
            .map(|&s| fedq_dp::mechanism::discrete_laplace_variance(s))
            .sum::<f64>()
            .sqrt();
        let h = (sd / (100.0f64).max(4.0 * scales.len() as f64))
            .floor()
            .max(1.0) as i64;
        let mut dropped = 0.0;
        let mut dist: Vec<f64> = vec![1.0];
        for &s in scales {
            let q = (-1.0 / s).exp();
            let reach = (s * 28.0) as i64 + h;
            let k = reach / h + 1;
            let lo_edge = |b: i64| b * h - h / 2;
            let pmf: Vec<f64> = (-k..=k)
                .map(|b| upper_tail(q, lo_edge(b)) - upper_tail(q, lo_edge(b + 1)))
                .collect();
            dropped += 2.0 * upper_tail(q, lo_edge(k + 1));
            let mut next = vec![0.0; dist.len() + pmf.len() - 1];
            for (i, &a) in dist.iter().enumerate() {
                for (j, &b) in pmf.iter().enumerate() {
                    next[i + j] += a * b;
                }
            }
            dist = next;
        }
        let center = (dist.len() / 2) as i64;
        let budget = alpha - dropped;
        let mut outside: f64 = dist.iter().sum::<f64>() - dist[center as usize];
        let mut w = 0i64;
        while outside > budget && w < center {
            w += 1;
            outside -= dist[(center - w) as usize] + dist[(center + w) as usize];
        }
        let slack = if h == 1 {
            0.0
        } else {
            scales.len() as f64 * h as f64 / 2.0
        };
        (w * h) as f64 + slack
    }

    /// Half-widths scale with the noise, also past `i32::MAX` grid steps
    /// (a scale of 1e9 once made the dropped tail mass 0.117 and the
    /// interval ten times too wide), and for many nodes, whose running
    /// sum's far tails are dropped as they form.
    #[test]
    fn huge_scales_and_many_nodes_scale_as_the_noise_does() {
        for k in [2usize, 3, 30] {
            let small = sum_half_width(&vec![1e6; k], 0.05);
            let huge = sum_half_width(&vec![1e9; k], 0.05);
            let ratio = huge / small;
            assert!(
                (ratio / 1000.0 - 1.0).abs() < 0.01,
                "{k} nodes: {huge} / {small}"
            );
        }
        // 1,000 nodes: about sqrt(1000) times one node's spread, and the
        // same whether or not the tails are dropped on the way (within a
        // grid step per node of slack).
        let one = sum_half_width(&[50.0], 0.05);
        let many = sum_half_width(&[50.0; 1000], 0.05);
        let sd = (1000.0f64 * 2.0 * 50.0 * 50.0).sqrt();
        assert!(
            many > 1.9 * sd && many < 2.2 * sd,
            "{many} vs sd {sd} (one node {one})"
        );
    }

    #[test]
    fn linear_convolution_agrees_with_the_direct_one() {
        let cases: [&[f64]; 9] = [
            &[2.0, 2.0],
            &[0.5, 3.0, 7.5],
            &[1000.0, 1000.0],
            &[1000.0, 1000.0, 1000.0],
            &[2000.0, 2000.0, 2000.0],
            &[240_000.0, 240_000.0, 240_000.0],
            &[10.0, 1000.0, 50.0],
            &[100.0; 10],
            &[1e-3, 1e9],
        ];
        for scales in cases {
            for alpha in [0.05, 0.025] {
                assert_eq!(
                    sum_half_width(scales, alpha),
                    direct_half_width(scales, alpha),
                    "{scales:?} at {alpha}"
                );
            }
        }
    }

    /// Binary powering of equal noises gives the distribution (and so the
    /// interval) that summing them one at a time does: 37 nodes in groups
    /// of equal scales, both mechanisms, on the integer grid and on a
    /// coarser one, and 1,000 equal nodes (the fan-out benchmark's case).
    #[test]
    fn powered_sums_match_one_by_one() {
        let mut mixed = vec![laplace(10.0); 19];
        mixed.extend(vec![gaussian(40.0); 16]);
        mixed.extend([laplace(7.0), gaussian(3.0)]);
        let mut coarse = vec![laplace(2_000.0); 20];
        coarse.extend(vec![gaussian(5_000.0); 17]);
        let cases = [mixed, coarse, vec![laplace(10.0); 1000]];
        for noises in cases {
            let sd: f64 = noises.iter().map(Noise::variance).sum::<f64>().sqrt();
            let h = (sd / (100.0f64).max(4.0 * noises.len() as f64))
                .floor()
                .max(1.0) as i64;
            let (powered, lost_p) = sum_distribution(&noises, h, POWER_FROM);
            let (one_by_one, lost_s) = sum_distribution(&noises, h, usize::MAX);
            let label = format!("{} nodes, h = {h}", noises.len());
            // The same per-node tail bounds (1e-5 of them for the large
            // discrete Gaussians' approximate tails), plus the products'
            // trimmed tails and FFT error: tiny next to alpha.
            assert!(
                lost_p < 1e-5 && (lost_p - lost_s).abs() < 1e-8,
                "{label}: lost {lost_p} against {lost_s}"
            );
            // Same centre; every bin within 1e-12 where either has mass.
            let (cp, cs) = (powered.len() / 2, one_by_one.len() / 2);
            let reach = cp.max(cs);
            let at = |d: &[f64], c: usize, i: isize| {
                let j = c as isize + i;
                if j >= 0 && (j as usize) < d.len() {
                    d[j as usize]
                } else {
                    0.0
                }
            };
            let mut worst = 0.0f64;
            for i in -(reach as isize)..=reach as isize {
                worst = worst.max((at(&powered, cp, i) - at(&one_by_one, cs, i)).abs());
            }
            assert!(worst < 1e-12, "{label}: bins differ by {worst}");
            let total: f64 = powered.iter().sum();
            assert!((total - 1.0).abs() < 1e-9, "{label}: mass {total}");
            for alpha in [0.05, 0.01, 0.05 / 3.0] {
                let wp = half_width_bins(&powered, alpha - lost_p);
                let ws = half_width_bins(&one_by_one, alpha - lost_s);
                assert!(
                    (wp - ws).abs() <= 1,
                    "{label} at {alpha}: {wp} vs {ws} bins"
                );
            }
        }
    }

    /// The FFT convolution agrees with the direct one, and its stated
    /// error bound covers the difference.
    #[test]
    fn fft_convolution_agrees_with_the_direct_one() {
        let (kernel, _) = laplace_kernel(30.0, 1);
        let a = kernel.convolve(&[1.0]);
        let b = direct_convolution(&a, &a);
        let (fast, err) = fft_convolution(&a, &b);
        let exact = direct_convolution(&a, &b);
        assert_eq!(fast.len(), exact.len());
        let l1: f64 = fast.iter().zip(&exact).map(|(x, y)| (x - y).abs()).sum();
        assert!(l1 <= err, "L1 difference {l1} above the bound {err}");
        assert!(err < 1e-10, "bound {err}");
    }

    #[test]
    fn binned_convolution_is_a_distribution() {
        let q: f64 = (-1.0f64 / 3.0).exp();
        let h = 2;
        let lo_edge = |b: i64| b * h - h / 2;
        let bin = |b: i64| upper_tail(q, lo_edge(b)) - upper_tail(q, lo_edge(b + 1));
        let kernel = Binned {
            center: bin(0),
            right: bin(1),
            left: bin(-1),
            ratio: q.powi(h as i32),
            reach: 60,
        };
        let once = kernel.convolve(&[1.0]);
        for (i, m) in once.iter().enumerate() {
            let b = i as i64 - 60;
            assert!((m - bin(b)).abs() < 1e-15, "bin {b}: {m} vs {}", bin(b));
        }
        let twice = kernel.convolve(&once);
        assert!((twice.iter().sum::<f64>() - 1.0).abs() < 1e-9);
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
            .map(|_| {
                noise
                    .release(&fedq_dp::mechanism::Exact::new(vec![0i64; n]))
                    .unwrap()
            })
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
