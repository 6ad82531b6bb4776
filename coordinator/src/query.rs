//! A researcher's query from the SQL they wrote to the combined result:
//! the one path that `fedq query` and the Python package (`python/`) both
//! run, so that planning, combination and intervals are the same code
//! wherever a researcher asks.
//!
//! 1. [`crate::post::split`] takes ORDER BY, LIMIT, HAVING, ROUND and
//!    formulas out of the query (post-processing, no privacy cost);
//! 2. [`crate::run::run_query`] plans the rest locally against the nodes'
//!    schemas, sends it and checks every answer;
//! 3. the audit heads of the answers are checked against the pinned keys
//!    ([`crate::audit::screen_answers`], not for a dry run);
//! 4. [`crate::combine`] combines the answers and the post-processing is
//!    applied to the combined rows.
//!
//! [`epsilon_for_target`] is `--target-ci`: the smallest epsilon whose
//! expected combined interval is narrow enough, from a dry run.

use fedq_dp::mechanism::Noise;
use fedq_proto::v1::QueryResponse;

use crate::client::{new_query_id, Calls, Federation, Outcome};
use crate::combine::{combine, combine_at, noise_sum_half_width, sum_half_width, Combined, ALPHA};
use crate::run::{run_query, QueryOptions, RunError};

/// What a query gave: the combined result and every node's answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The SQL the nodes were sent (the written query without its
    /// post-processing clauses).
    pub sent: String,
    /// The combined, post-processed result (for a dry run: no values, the
    /// nodes' costs).
    pub combined: Combined,
    /// Every node's outcome, in federation order (a dry run's per-node
    /// mechanisms, scales and expected intervals are in these).
    pub outcomes: Vec<Outcome<QueryResponse>>,
    /// What checking the answers' audit heads found (a node left out for a
    /// head signed with another key, a key pinned now).
    pub audit_notes: Vec<String>,
    /// The heads could not be recorded (the heads file is unwritable).
    pub audit_warning: Option<String>,
}

impl Answer {
    /// How many nodes answered.
    pub fn answered(&self) -> usize {
        self.combined
            .nodes
            .iter()
            .filter(|n| n.failure.is_none())
            .count()
    }
}

/// Why a query gave no result.
#[derive(Debug, Clone)]
pub enum QueryError {
    /// The query is wrong (SQL outside the subset, a typo, a clause the
    /// coordinator cannot apply), said once; nothing was spent unless the
    /// message says otherwise.
    Sql(String),
    /// Refused before any node released anything ([`RunError`]): planned
    /// locally and wrong for every node, or a quorum not reached.
    Run(RunError),
}

impl std::fmt::Display for QueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueryError::Sql(why) => f.write_str(why),
            QueryError::Run(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for QueryError {}

/// Runs the researcher's query `written` on the federation with `opts`
/// (steps 1 to 4 of the module doc). `Ok` even when no node answered: the
/// result's nodes say why each did not.
pub async fn ask(
    fed: &Federation,
    written: &str,
    opts: &QueryOptions,
) -> Result<Answer, QueryError> {
    // A UNION ALL: its parts, asked as one query or one by one.
    if let Some(parts) = crate::compose::union_parts(written)
        .map_err(|e| QueryError::Sql(format!("{e}; nothing was sent or spent")))?
    {
        return Box::pin(crate::compose::ask_union(fed, &parts, opts)).await;
    }
    let (sent, post) = crate::post::split(written)
        .map_err(|e| QueryError::Sql(format!("{e}; nothing was sent or spent")))?;
    let mut outcomes = run_query(fed, &sent, opts).await.map_err(QueryError::Run)?;
    let (mut audit_notes, mut audit_warning) = (Vec::new(), None);
    if !opts.dry_run {
        // Every head checked against its node's pinned audit key (pinned at
        // the first answer); a mismatch is left out.
        match crate::audit::screen_answers(fed, &mut outcomes).await {
            Ok(notes) => audit_notes = notes,
            Err(e) => {
                audit_warning = Some(format!("could not record the nodes' audit heads: {e:#}"))
            }
        }
    }
    let mut combined = combine(&sent, &opts.query_id, opts.epsilon, &outcomes);
    if let Some(p) = &post {
        // A formula over several aggregates reads them at wider intervals,
        // so that its own holds with 95%.
        let components = p
            .alpha(combined.rows.len())
            .map(|alpha| combine_at(&sent, &opts.query_id, opts.epsilon, &outcomes, alpha));
        crate::post::apply(&mut combined, p, components.as_ref()).map_err(QueryError::Sql)?;
    }
    Ok(Answer {
        sent,
        combined,
        outcomes,
        audit_notes,
        audit_warning,
    })
}

/// The epsilon [`epsilon_for_target`] picked.
#[derive(Debug, Clone, Copy)]
pub struct EpsilonChoice {
    /// Epsilon per node (3 significant digits, rounded up).
    pub epsilon: f64,
    /// The expected combined 95% interval half-width it gives (the widest
    /// over the query's measurements).
    pub half_width: f64,
    /// Nodes that accepted the dry run it was computed from.
    pub nodes: usize,
}

/// Why no epsilon could be chosen for a target interval (nothing was
/// spent: the choice is made from a dry run).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TargetError(pub String);

/// The smallest epsilon (3 significant digits, rounded up) whose expected
/// combined 95% CI half-width is at most `target` for every measurement of
/// `written`, from a dry run (nothing spent, nothing data-dependent), capped
/// by the most a node allows the analyst now.
pub async fn epsilon_for_target(
    fed: &Federation,
    written: &str,
    target: f64,
    calls: Calls,
) -> Result<EpsilonChoice, TargetError> {
    if !(target.is_finite() && target > 0.0) {
        return Err(TargetError(format!(
            "the target CI must be a positive number (got {target})"
        )));
    }
    let (sent, _) = crate::post::split(written).map_err(TargetError)?;
    let probe = 1e-3;
    let opts = QueryOptions {
        secure: false,
        epsilon: probe,
        rho: 0.0,
        dry_run: true,
        calls,
        min_nodes: None,
        query_id: new_query_id(),
    };
    let outcomes = run_query(fed, &sent, &opts)
        .await
        .map_err(|q| TargetError(q.to_string()))?;
    let plans: Vec<&QueryResponse> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().ok())
        .collect();
    if plans.is_empty() {
        let why: Vec<String> = outcomes
            .iter()
            .filter_map(|o| o.result.as_ref().err().map(|f| format!("{}: {f}", o.node)))
            .collect();
        return Err(TargetError(format!(
            "no node accepted the dry run:\n  {}",
            why.join("\n  ")
        )));
    }
    let cap = plans
        .iter()
        .filter_map(|r| {
            r.budget.as_ref().map(|b| {
                let most = b.per_query_max.min(b.remaining_for_analyst);
                // A zCDP dataset counts rho; epsilon costs epsilon^2/2 there.
                if b.measure == "zcdp" {
                    (2.0 * most).sqrt()
                } else {
                    most
                }
            })
        })
        .fold(f64::INFINITY, f64::min);
    // Each measurement's scale is sensitivity / (epsilon / m) on every node.
    let half_width = |eps: f64| -> f64 {
        let m = plans[0].measurements.len();
        (0..m)
            .map(|i| {
                let scales: Vec<f64> = plans
                    .iter()
                    .filter_map(|r| r.measurements.get(i))
                    .map(|x| x.sensitivity * m as f64 / eps)
                    .collect();
                sum_half_width(&scales, ALPHA)
            })
            .fold(0.0, f64::max)
    };
    if !cap.is_finite() || half_width(cap) > target {
        return Err(TargetError(format!(
            "even epsilon {cap} (the most a node allows you now) gives an expected 95% CI of ± {:.1}; ask for a wider target CI",
            half_width(cap)
        )));
    }
    let (mut lo, mut hi) = (1e-6_f64, cap);
    for _ in 0..60 {
        let mid = (lo * hi).sqrt();
        if half_width(mid) <= target {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let digits = 10f64.powi(2 - hi.log10().floor() as i32);
    let epsilon = ((hi * digits).ceil() / digits).min(cap);
    Ok(EpsilonChoice {
        epsilon,
        half_width: half_width(epsilon),
        nodes: plans.len(),
    })
}

/// The rho [`secure_rho_for_target`] picked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecureChoice {
    /// Rho per node (3 significant digits, rounded up).
    pub rho: f64,
    /// The expected combined 95% CI half-width with secure aggregation.
    pub half_width: f64,
    /// The same rho's half-width without secure aggregation (every node
    /// adding a whole release's noise), for comparison.
    pub plain_half_width: f64,
    /// Nodes that accepted the dry run it was computed from.
    pub nodes: usize,
}

/// The smallest rho per node (3 significant digits, rounded up) whose
/// expected combined 95% CI half-width with secure aggregation
/// (`--secure`) is at most `target` for every measurement of `written`,
/// from a rho dry run (nothing spent), capped by the most every node
/// allows the analyst now. `None` when some node cannot take part (a pure
/// DP dataset, or one without `[datasets.secure_aggregation]`): what
/// `--target-ci` shows beside its epsilon, so the gain is seen before
/// anything is spent.
pub async fn secure_rho_for_target(
    fed: &Federation,
    written: &str,
    target: f64,
    calls: Calls,
) -> Result<Option<SecureChoice>, TargetError> {
    if !(target.is_finite() && target > 0.0) {
        return Err(TargetError(format!(
            "the target CI must be a positive number (got {target})"
        )));
    }
    let (sent, _) = crate::post::split(written).map_err(TargetError)?;
    let opts = QueryOptions {
        secure: false,
        epsilon: 0.0,
        rho: 1e-3,
        dry_run: true,
        calls,
        min_nodes: None,
        query_id: new_query_id(),
    };
    let outcomes = run_query(fed, &sent, &opts)
        .await
        .map_err(|q| TargetError(q.to_string()))?;
    if outcomes.iter().any(|o| o.result.is_err()) {
        return Ok(None);
    }
    let plans: Vec<&QueryResponse> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().ok())
        .collect();
    if plans.is_empty() || plans.iter().any(|r| r.min_honest == 0) {
        return Ok(None);
    }
    let cap = plans
        .iter()
        .filter_map(|r| {
            r.budget
                .as_ref()
                .map(|b| b.per_query_max.min(b.remaining_for_analyst))
        })
        .fold(f64::INFINITY, f64::min);
    let m = plans[0].measurements.len();
    // The half-widths at rho per node: each measurement gets rho / m, its
    // share scale from each node's own min_honest; the worst measurement.
    let widths = |rho: f64| -> Option<(f64, f64)> {
        let mut worst = (0.0f64, 0.0f64);
        for i in 0..m {
            let mut shares = Vec::new();
            let mut whole = Vec::new();
            for r in &plans {
                let x = r.measurements.get(i)?;
                let values = r.cells.len().max(1) * x.bins.max(1) as usize;
                let l2 = x.l2_sensitivity as i64;
                let s = crate::secure::share_noise(l2, rho / m as f64, r.min_honest, values)?;
                shares.push(s);
                whole.push(Noise::for_rho(l2, rho / m as f64).ok()?);
            }
            worst.0 = worst.0.max(noise_sum_half_width(&shares, ALPHA));
            worst.1 = worst.1.max(noise_sum_half_width(&whole, ALPHA));
        }
        Some(worst)
    };
    let fits = |rho: f64| widths(rho).is_some_and(|w| w.0 <= target);
    if !cap.is_finite() || !fits(cap) {
        return Ok(None);
    }
    let (mut lo, mut hi) = (1e-9_f64, cap);
    for _ in 0..60 {
        let mid = (lo * hi).sqrt();
        if fits(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let digits = 10f64.powi(2 - hi.log10().floor() as i32);
    let rho = ((hi * digits).ceil() / digits).min(cap);
    Ok(
        widths(rho).map(|(half_width, plain_half_width)| SecureChoice {
            rho,
            half_width,
            plain_half_width,
            nodes: plans.len(),
        }),
    )
}
