//! Running one query across the federation, robustly.
//!
//! 1. **Capabilities.** Every node is asked what it speaks (`Describe`);
//!    a node on another API version, or lacking a capability the query
//!    needs, is left out and the result says which node lacks what.
//!    Then the data standard ([`crate::standard::screen`]): a node whose
//!    dataset follows another standard (name or major version), or declares
//!    a column the query reads differently from the newest version the
//!    others follow, is left out and named, before anything is spent.
//! 2. **One phase** (default): `Query` on every eligible node, retried with
//!    the same query id on failures that may pass (the node replays a
//!    release it already made, so a retry never spends twice).
//! 3. **Two phases** (`min_nodes`): `Prepare` everywhere (validate and
//!    durably reserve the budget); if fewer than `min_nodes` accept, every
//!    reservation is cancelled and nothing is spent anywhere (a reservation
//!    whose cancel is lost expires on its node and returns its budget);
//!    otherwise `Commit` on the nodes that accepted.
//! 4. **Checks.** Every answer is checked against the coordinator's own
//!    plan, derived from the schema the node declared in step 1
//!    ([`crate::verify`]); an answer that disagrees, or whose layout differs
//!    from most nodes', is left out like a node that failed, and its
//!    outcome names the node and what disagreed.

use std::collections::HashMap;
use std::time::Duration;

use fedq_proto::v1::{
    CancelRequest, CommitRequest, DescribeResponse, PrepareRequest, PrepareResponse, QueryRequest,
    QueryResponse,
};

use crate::client::{Calls, Failure, Federation, Outcome};
use crate::federation::NodeEntry;
use crate::verify;

/// How to run a query.
#[derive(Debug, Clone)]
pub struct QueryOptions {
    /// Privacy cost per node, pure epsilon-DP (discrete Laplace); 0 when
    /// `rho` is given.
    pub epsilon: f64,
    /// Privacy cost per node, rho-zCDP (discrete Gaussian); 0 when
    /// `epsilon` is given.
    pub rho: f64,
    /// Plan only: spend nothing.
    pub dry_run: bool,
    /// Per-node deadline and retries.
    pub calls: Calls,
    /// Release only if at least this many nodes accept (two phases).
    pub min_nodes: Option<usize>,
    /// The query id sent to every node.
    pub query_id: String,
    /// Secure aggregation (two phases, rho only): each node releases a
    /// masked share of the noise, and only the sum is in the clear
    /// ([`crate::secure`]).
    pub secure: bool,
}

/// A quorum that was not reached: nothing was released or kept spent.
#[derive(Debug, Clone)]
pub struct QuorumFailure {
    /// Nodes that accepted (and whose reservations were cancelled).
    pub accepted: usize,
    /// Nodes needed.
    pub needed: usize,
    /// Every node's outcome of Prepare (or of the capability check).
    pub outcomes: Vec<Outcome<()>>,
    /// Nodes whose cancel did not get through (their reservation expires).
    pub cancel_failed: Vec<String>,
}

impl std::fmt::Display for QuorumFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "only {} node(s) accepted the query, {} needed (--min-nodes); nothing was released and every reservation was cancelled:",
            self.accepted, self.needed
        )?;
        for o in &self.outcomes {
            match &o.result {
                Ok(()) => writeln!(f, "  {:<18} accepted (reservation cancelled)", o.node)?,
                Err(e) => writeln!(f, "  {:<18} {e}", o.node)?,
            }
        }
        if !self.cancel_failed.is_empty() {
            write!(
                f,
                "  (the cancel did not reach {}; their reservations expire on their own and return the budget)",
                self.cancel_failed.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Capabilities a query needs from every node it goes to.
fn required(opts: &QueryOptions) -> Vec<&'static str> {
    let mut caps = vec!["idempotent_query_id"];
    if opts.dry_run {
        caps.push("dry_run");
    }
    if opts.min_nodes.is_some() {
        caps.push("two_phase");
    }
    if opts.rho > 0.0 {
        caps.push("zcdp");
    }
    if opts.secure {
        caps.push("two_phase");
        caps.push("secure_aggregation");
    }
    caps
}

/// Asks every node what it speaks; returns the eligible nodes and, for the
/// others, why they are left out.
pub async fn eligible(
    fed: &Federation,
    caps: &[&str],
    calls: Calls,
) -> (Vec<NodeEntry>, Vec<Outcome<()>>) {
    let (ok, left_out) = described(fed, caps, calls).await;
    (ok.into_iter().map(|(entry, _)| entry).collect(), left_out)
}

/// What every node that answers `Describe` and speaks this API declares
/// (its public schemas), for planning across several queries.
pub async fn descriptions(fed: &Federation, calls: Calls) -> Vec<DescribeResponse> {
    let (ok, _) = described(fed, &[], calls).await;
    ok.into_iter().map(|(_, d)| d).collect()
}

/// [`eligible`], keeping each eligible node's description: its declared
/// schemas are what its answer is checked against.
async fn described(
    fed: &Federation,
    caps: &[&str],
    calls: Calls,
) -> (Vec<(NodeEntry, DescribeResponse)>, Vec<Outcome<()>>) {
    let described = fed.described(calls).await;
    let mut ok = Vec::new();
    let mut left_out = Vec::new();
    for (entry, o) in fed.config.nodes.iter().zip(described) {
        let verdict = match o.result {
            Err(f) => Err(f),
            Ok(d) if d.api_version != fedq_proto::API_VERSION => Err(Failure::Refused(format!(
                "skipped: node speaks API v{} (fedq-node {}), this fedq speaks v{}; upgrade the older side",
                d.api_version,
                d.software_version,
                fedq_proto::API_VERSION
            ))),
            Ok(d) => {
                let missing: Vec<&str> = caps.iter().copied().filter(|c| !d.capabilities.iter().any(|x| x == c)).collect();
                if missing.is_empty() {
                    Ok(d)
                } else {
                    Err(Failure::Refused(format!(
                        "skipped: node lacks {} (fedq-node {}), which this query needs; upgrade it or query without that option",
                        missing.join(", "),
                        d.software_version
                    )))
                }
            }
        };
        match verdict {
            Ok(d) => ok.push((entry.clone(), d)),
            Err(f) => left_out.push(Outcome {
                node: o.node,
                result: Err(f),
                elapsed: o.elapsed,
            }),
        }
    }
    (ok, left_out)
}

/// Puts outcomes back in federation order.
fn in_order<T>(fed: &Federation, parts: Vec<Outcome<T>>) -> Vec<Outcome<T>> {
    // A node whose answer was left out may have changed what it declares:
    // describe it afresh next time.
    for o in &parts {
        if matches!(o.result, Err(Failure::LeftOut(_))) {
            fed.forget_description(&o.node);
        }
    }
    // Linear in the number of nodes (a fan-out to 1,000 nodes must not
    // compare every name with every other).
    let rank: HashMap<&str, usize> = fed
        .config
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let mut ranked: Vec<(usize, Outcome<T>)> = parts
        .into_iter()
        .filter_map(|o| rank.get(o.node.as_str()).map(|&r| (r, o)))
        .collect();
    ranked.sort_by_key(|(r, _)| *r);
    ranked.into_iter().map(|(_, o)| o).collect()
}

/// Each described node's Describe by name, for the answer checks.
fn by_name(described: &[(NodeEntry, DescribeResponse)]) -> HashMap<&str, &DescribeResponse> {
    described
        .iter()
        .map(|(e, d)| (e.name.as_str(), d))
        .collect()
}

/// Why [`run_query`] released nothing anywhere.
#[derive(Debug, Clone)]
pub enum RunError {
    /// The query is wrong for every node that serves its dataset (planned
    /// here, from the schemas they describe): said once, nothing was sent.
    Query(String),
    /// A quorum was asked for and not reached; nothing is spent anywhere.
    Quorum(QuorumFailure),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Query(why) => {
                write!(f, "{why}; nothing was sent to any node, nothing was spent")
            }
            RunError::Quorum(q) => write!(f, "{q}"),
        }
    }
}

/// Plans `sql` here against every described node's public schema, so that
/// a mistake common to all (a typo, a value outside a domain, SQL outside
/// the subset) is said once, before any node is asked. `Ok` as soon as one
/// node serving the dataset can answer it (nodes may declare different
/// schemas; the others then refuse on their own), and when no node could
/// be described (their failures are the answer).
pub fn plan_locally(
    described: &[(NodeEntry, fedq_proto::v1::DescribeResponse)],
    sql: &str,
) -> Result<(), String> {
    if described.is_empty() {
        return Ok(());
    }
    let dataset = fedq_plan::plan::dataset_of(sql).map_err(|e| e.to_string())?;
    let mut errors: Vec<(String, String)> = Vec::new();
    let mut serving = 0;
    for (entry, d) in described {
        let Some(ds) = d.datasets.iter().find(|ds| ds.name == dataset) else {
            continue;
        };
        serving += 1;
        let planned = crate::verify::schema_from_proto(ds).and_then(|schema| {
            fedq_plan::plan::plan(sql, &schema, usize::MAX).map_err(|e| e.to_string())
        });
        match planned {
            Ok(_) => return Ok(()),
            Err(why) => errors.push((entry.name.clone(), why)),
        }
    }
    if serving == 0 {
        let mut served: Vec<&str> = described
            .iter()
            .flat_map(|(_, d)| d.datasets.iter().map(|ds| ds.name.as_str()))
            .collect();
        served.sort_unstable();
        served.dedup();
        let hint = crate::closest_name(&dataset, &served)
            .map(|n| format!(" (did you mean {n:?}?)"))
            .unwrap_or_default();
        return Err(format!(
            "dataset {dataset:?} is not served by any node{hint}; the nodes serve: {}",
            served.join(", ")
        ));
    }
    let (first_node, first) = &errors[0];
    let others: Vec<&str> = errors
        .iter()
        .filter(|(_, why)| why != first)
        .map(|(n, _)| n.as_str())
        .collect();
    Err(if others.is_empty() {
        first.clone()
    } else {
        format!(
            "{first} (on {first_node}; {} declare other schemas and refuse it differently: see fedq schema --federation ...)",
            others.join(", ")
        )
    })
}

/// Runs `sql` on the federation. `Err` when the query is wrong for every
/// node ([`plan_locally`]: nothing was sent), or when a quorum was asked
/// for and not reached (nothing is spent anywhere).
pub async fn run_query(
    fed: &Federation,
    sql: &str,
    opts: &QueryOptions,
) -> Result<Vec<Outcome<QueryResponse>>, RunError> {
    let (described, mut left_out) = described(fed, &required(opts), opts.calls).await;
    // Nodes off the federation's data standard are left out before
    // anything is sent or spent.
    let (described, off_standard) = crate::standard::screen(described, sql);
    left_out.extend(off_standard);
    plan_locally(&described, sql).map_err(RunError::Query)?;
    let nodes: Vec<NodeEntry> = described.iter().map(|(e, _)| e.clone()).collect();
    let request = QueryRequest {
        query_id: opts.query_id.clone(),
        sql: sql.to_string(),
        epsilon: opts.epsilon,
        dry_run: opts.dry_run,
        rho: opts.rho,
    };
    let failed = |v: &[Outcome<()>]| -> Vec<Outcome<QueryResponse>> {
        v.iter()
            .map(|o| Outcome {
                node: o.node.clone(),
                result: Err(o.result.clone().unwrap_err_or_refused()),
                elapsed: o.elapsed,
            })
            .collect()
    };
    if opts.secure && (opts.rho.is_nan() || opts.rho <= 0.0) {
        return Err(RunError::Query(
            "secure aggregation releases discrete Gaussian shares: ask in rho (--rho), not epsilon; nothing was sent or spent".into(),
        ));
    }
    // Secure aggregation always runs in two phases: the keys are
    // exchanged at Prepare.
    let min_nodes = match (opts.secure, opts.min_nodes) {
        (true, m) => Some(m.unwrap_or(2).max(2)),
        (false, m) => m,
    };
    let Some(needed) = min_nodes.filter(|_| !opts.dry_run) else {
        let sent = request.clone();
        let answered = fed
            .call_nodes(&nodes, opts.calls, move |mut c| {
                let r = sent.clone();
                async move { c.query(r).await }
            })
            .await;
        let mut all = failed(&left_out);
        let by_name = by_name(&described);
        all.extend(verify::check_outcomes(&request, answered, |node| {
            by_name.get(node).copied()
        }));
        return Ok(in_order(fed, all));
    };
    // Phase 1: reserve everywhere.
    let hold_ms = (opts.calls.timeout.as_millis() as u64)
        .saturating_mul(3)
        .max(10_000);
    let prepare = PrepareRequest {
        query: Some(request.clone()),
        hold_ms,
        secure_aggregation: opts.secure,
    };
    let prepared = fed
        .call_nodes(&nodes, opts.calls, move |mut c| {
            let r = prepare.clone();
            async move { c.prepare(r).await }
        })
        .await;
    let accepted: Vec<NodeEntry> = nodes
        .iter()
        .zip(&prepared)
        .filter(|(_, o)| o.result.is_ok())
        .map(|(n, _)| n.clone())
        .collect();
    // Secure aggregation: the round keys of every node that accepted, and
    // at least as many nodes as the most demanding one's min_honest.
    let relay = if opts.secure {
        let keys: Vec<(String, PrepareResponse)> = prepared
            .iter()
            .filter_map(|o| o.result.as_ref().ok().map(|p| (o.node.clone(), p.clone())))
            .collect();
        Some(crate::secure::relay(&request, &keys))
    } else {
        None
    };
    let needed = match &relay {
        Some(Ok(r)) => needed.max(r.min_honest as usize),
        // No round can start: nothing is committed.
        Some(Err(_)) => usize::MAX,
        None => needed,
    };
    if accepted.len() < needed {
        let id = opts.query_id.clone();
        let cancels = fed
            .call_nodes(
                &accepted,
                Calls {
                    timeout: Duration::from_secs(5),
                    retries: 2,
                },
                move |mut c| {
                    let r = CancelRequest {
                        query_id: id.clone(),
                    };
                    async move { c.cancel(r).await }
                },
            )
            .await;
        let mut outcomes: Vec<Outcome<()>> = left_out;
        let no_round = match &relay {
            Some(Err(why)) => Some(why.clone()),
            _ => None,
        };
        outcomes.extend(prepared.into_iter().map(|o| Outcome {
            node: o.node,
            result: match (&no_round, o.result) {
                (Some(why), Ok(_)) => Err(Failure::LeftOut(format!(
                    "secure aggregation cannot start: {why}"
                ))),
                (_, r) => r.map(|_| ()),
            },
            elapsed: o.elapsed,
        }));
        return Err(RunError::Quorum(QuorumFailure {
            accepted: accepted.len(),
            needed,
            outcomes: in_order(fed, outcomes),
            cancel_failed: cancels
                .into_iter()
                .filter(|o| o.result.is_err())
                .map(|o| o.node)
                .collect(),
        }));
    }
    // Phase 2: release where accepted.
    let id = opts.query_id.clone();
    let relay = relay.and_then(Result::ok);
    let participants = relay
        .as_ref()
        .map(|r| r.participants.clone())
        .unwrap_or_default();
    let mut committed = fed
        .call_nodes(&accepted, opts.calls, move |mut c| {
            let r = CommitRequest {
                query_id: id.clone(),
                participants: participants.clone(),
            };
            async move { c.commit(r).await }
        })
        .await;
    // Secure aggregation: the masked shares summed before the checks.
    let unmasked = match &relay {
        Some(r) => match crate::secure::unmask(r, &mut committed) {
            Ok(u) => Some(u),
            Err(why) => {
                crate::secure::abandon(
                    &mut committed,
                    &format!("secure aggregation round abandoned: {why}; the shares cannot be summed, and the releases are spent; ask again with a new query id"),
                );
                None
            }
        },
        None => None,
    };
    let mut all = failed(&left_out);
    all.extend(prepared.into_iter().filter(|o| o.result.is_err()).map(|o| {
        Outcome {
            node: o.node,
            result: Err(o
                .result
                .err()
                .unwrap_or_else(|| Failure::Refused("did not accept".into()))),
            elapsed: o.elapsed,
        }
    }));
    let by_name = by_name(&described);
    let mut checked =
        verify::check_outcomes(&request, committed, |node| by_name.get(node).copied());
    if let Some(u) = unmasked {
        crate::secure::restore(u, &mut checked);
    }
    all.extend(checked);
    Ok(in_order(fed, all))
}

/// Turns `Result<(), Failure>` of a left-out node into its failure.
trait FailureOf {
    fn unwrap_err_or_refused(self) -> Failure;
}

impl FailureOf for Result<(), Failure> {
    fn unwrap_err_or_refused(self) -> Failure {
        self.err()
            .unwrap_or_else(|| Failure::Refused("left out".into()))
    }
}
