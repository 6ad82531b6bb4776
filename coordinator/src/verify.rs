//! Checking every node answer against the coordinator's own plan
//! (DESIGN invariant 9: the coordinator trusts no claim it can check).
//!
//! A node is a partner's server: buggy, misconfigured or malicious, it may
//! answer with a smaller noise scale than its privacy cost allows (which
//! shrinks everyone's intervals), another layout, other bin edges, a dry
//! run, or an answer to another query. Everything in an answer except the
//! noisy values themselves follows from public facts: the SQL and cost the
//! coordinator sent, and the schema the node declared in `Describe`. So the
//! coordinator plans the query itself with the node's own planner
//! ([`fedq_plan::plan`]), derives every measurement's mechanism and scale
//! with the node's own functions ([`fedq_dp::mechanism::Noise`]), and
//! [`verify_answer`] compares. An answer that disagrees is left out of the
//! combination, named with what disagreed; one that agrees has its layout
//! and scales replaced by the coordinator's ([`Expected::adopt`]), so that
//! nothing downstream (combination, intervals, output) reads a number the
//! node chose except its noisy values.
//!
//! What cannot be checked: the noisy values themselves (they are noise on
//! data only the node sees), the node's budget figures, its words
//! (`epsilon_split`, `released_keys.note`) and, for an open-domain GROUP BY,
//! which keys it released (their shape and threshold are checked).

use crate::client::{Failure, Outcome};
use fedq_dp::accounting::{self, Measure};
use fedq_dp::mechanism::{Noise, CI_ALPHA};
use fedq_plan::plan::{self, MeasurementSpec, Plan};
use fedq_plan::schema::{ColumnSpec, ColumnType, Schema};
use fedq_proto::v1::{
    column_schema::Kind, DatasetSchema, DescribeResponse, Measurement, OutputColumn, OutputKind,
    QueryRequest, QueryResponse,
};
use std::collections::HashMap;

/// Relative tolerance when comparing a stated scale (or any other derived
/// float) with the coordinator's: both sides run the same deterministic
/// code, so any real difference is far larger than rounding.
pub const RELATIVE_TOLERANCE: f64 = 1e-9;

/// Longest piece of a node's text quoted in a message: a hostile node must
/// not be able to flood the researcher's terminal through our errors.
const QUOTED: usize = 80;

/// What disagreed between a node's answer and the coordinator's plan.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Disagreement {
    /// The answer is to another query id.
    #[error("query id {got} where {sent} was sent")]
    QueryId {
        /// The answer's id (quoted, shortened).
        got: String,
        /// The id sent (quoted).
        sent: String,
    },
    /// The answer is to another request (SQL, cost or dry-run flag).
    #[error("request_sha256 {got} where the request sent has {expected} (an answer to another SQL text, cost or dry-run flag)")]
    RequestDigest {
        /// The digest stated (quoted, shortened).
        got: String,
        /// The digest of the request sent.
        expected: String,
    },
    /// The answer names another node than the one at this endpoint.
    #[error("node_name {got} where this endpoint is {expected:?}")]
    NodeName {
        /// The name stated (quoted, shortened).
        got: String,
        /// The federation file's name of the endpoint.
        expected: String,
    },
    /// A dry run where a release was asked, or the other way round.
    #[error("dry_run {got} where {asked} was asked")]
    DryRun {
        /// The flag stated.
        got: bool,
        /// The flag sent.
        asked: bool,
    },
    /// A number that must be finite is not.
    #[error("{what} is {value}, not a finite number")]
    NonFinite {
        /// Which field.
        what: String,
        /// Its value (NaN or an infinity).
        value: f64,
    },
    /// The queried dataset is not among those the node described.
    #[error("its Describe lists no dataset {0}")]
    UnknownDataset(String),
    /// The node's declared schema is not one a node could serve.
    #[error("its declared schema of {dataset} cannot be read: {why}")]
    Schema {
        /// The dataset (quoted).
        dataset: String,
        /// What is wrong with it.
        why: String,
    },
    /// The coordinator's planner refuses the query on the node's schema,
    /// so the node should have refused it too.
    #[error("the coordinator cannot plan the query on its declared schema: {0}")]
    Plan(String),
    /// A field of the layout differs from the plan's.
    #[error("{what} is {got} where the plan gives {expected}")]
    Field {
        /// Which field, e.g. `measurement 0 mechanism`.
        what: String,
        /// The stated value (shortened).
        got: String,
        /// The plan's value.
        expected: String,
    },
    /// A noise scale differs from the plan's.
    #[error("measurement {index} scale {got} where the plan gives {expected} ({why})")]
    Scale {
        /// Measurement index.
        index: usize,
        /// The stated scale.
        got: f64,
        /// The coordinator's scale.
        expected: f64,
        /// How the plan's scale follows from the cost and sensitivity.
        why: String,
    },
    /// A measurement holds another number of values than the plan's cells
    /// times bins.
    #[error("measurement {index} has {got} values where the plan gives {expected} ({why})")]
    ValueCount {
        /// Measurement index.
        index: usize,
        /// Values stated.
        got: usize,
        /// Values the plan gives.
        expected: usize,
        /// Cells times bins, in words.
        why: String,
    },
    /// Another number of cells than the declared domains give.
    #[error("{got} cells where the plan gives {expected} (the declared GROUP BY domains, each with a (missing) key)")]
    CellCount {
        /// Cells stated.
        got: usize,
        /// Cells of the plan.
        expected: usize,
    },
    /// A cell key differs from the plan's.
    #[error("cell {index} is {got} where the plan gives {expected:?}")]
    Cell {
        /// Cell index.
        index: usize,
        /// The stated key (shortened).
        got: String,
        /// The plan's key.
        expected: Vec<String>,
    },
    /// The released keys of an open-domain GROUP BY are not well formed.
    #[error("released keys: {0}")]
    ReleasedKeys(String),
    /// The node's declared schema gives another combination layout (bounds,
    /// centre, quantile, bin edges) than most nodes' schemas do, so its
    /// answer cannot be added to theirs.
    #[error("its declared schema gives {what} where most nodes' give {expected} ({reference}'s); answers over different layouts cannot be combined")]
    Layout {
        /// What differs, with this node's value.
        what: String,
        /// The reference layout's value.
        expected: String,
        /// A node holding the reference layout.
        reference: String,
    },
}

/// `s` quoted, cut to [`QUOTED`] characters.
fn quoted(s: &str) -> String {
    if s.chars().count() <= QUOTED {
        format!("{s:?}")
    } else {
        let cut: String = s.chars().take(QUOTED).collect();
        format!("{cut:?}... ({} bytes)", s.len())
    }
}

/// Cells of a declared-domain GROUP BY: each column's domain plus a
/// (missing) key, as `fedq_plan::plan::cell_count` counts them, but
/// saturating: a hostile schema must not overflow the coordinator.
fn cell_count(plan: &Plan) -> usize {
    plan.group_sizes
        .iter()
        .try_fold(1usize, |acc, &n| acc.checked_mul(n.saturating_add(1)))
        .unwrap_or(usize::MAX)
}

/// Whether `a` and `b` agree within [`RELATIVE_TOLERANCE`] (never for NaN).
fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= RELATIVE_TOLERANCE * a.abs().max(b.abs())
}

fn field(what: impl Into<String>, got: impl ToString, expected: impl ToString) -> Disagreement {
    let got = got.to_string();
    Disagreement::Field {
        what: what.into(),
        got: if got.chars().count() > QUOTED {
            quoted(&got)
        } else {
            got
        },
        expected: expected.to_string(),
    }
}

/// The node's public schema of one dataset, rebuilt from `Describe` into
/// the node crate's [`Schema`], so that the coordinator plans with exactly
/// the node's planner. The person-level privacy unit (which multiplies
/// every sensitivity) is read from `privacy_unit`, whose wording the node
/// fixes (`DatasetConfig::privacy_unit_text`); a wording this coordinator
/// does not know leaves the plan, and so the answer, uncheckable.
pub fn schema_from_proto(ds: &DatasetSchema) -> Result<Schema, String> {
    let mut specs = Vec::with_capacity(ds.columns.len());
    for c in &ds.columns {
        let mut spec = ColumnSpec {
            name: c.name.clone(),
            kind: ColumnType::Boolean,
            domain: None,
            min: None,
            max: None,
            open: None,
            bins: None,
        };
        match &c.kind {
            Some(Kind::Categorical(k)) => {
                spec.kind = ColumnType::Categorical;
                if k.open {
                    spec.open = Some(true);
                }
                // An open column with a domain is invalid: keep the domain
                // so that the schema's own validation says so.
                if !k.open || !k.domain.is_empty() {
                    spec.domain = Some(k.domain.clone());
                }
            }
            Some(Kind::Integer(i)) => {
                spec.kind = ColumnType::Integer;
                spec.min = Some(i.min);
                spec.max = Some(i.max);
                spec.bins = Some(
                    u32::try_from(i.bins)
                        .map_err(|_| format!("column {}: {} bins", quoted(&c.name), i.bins))?,
                );
            }
            Some(Kind::Boolean(_)) => {}
            None => return Err(format!("column {} has no type", quoted(&c.name))),
        }
        specs.push(spec);
    }
    let schema = Schema::from_specs(&ds.name, &specs)?;
    let schema = match person_unit(&ds.privacy_unit)? {
        None => schema,
        Some((column, max_records)) => schema.with_person_unit(&column, max_records)?,
    };
    // The dataset's public lookup tables, so that a join to one is planned
    // as the node plans it.
    let lookups = ds
        .lookups
        .iter()
        .map(fedq_plan::lookup::Lookup::from_proto)
        .collect::<Result<Vec<_>, _>>()?;
    schema.with_lookups(lookups)
}

/// Reads `privacy_unit` as the node words it: `record`, or `person
/// (identified by <column>, at most <n> records per person)`.
fn person_unit(text: &str) -> Result<Option<(String, u32)>, String> {
    if text == "record" {
        return Ok(None);
    }
    let unknown = || {
        format!(
            "privacy unit {} is not one this coordinator knows",
            quoted(text)
        )
    };
    let inner = text
        .strip_prefix("person (identified by ")
        .and_then(|r| r.strip_suffix(" records per person)"))
        .ok_or_else(unknown)?;
    let (column, n) = inner.rsplit_once(", at most ").ok_or_else(unknown)?;
    let n: u32 = n.parse().map_err(|_| unknown())?;
    Ok(Some((column.to_string(), n)))
}

/// What a query asked for: its cost in one of the two measures.
#[derive(Debug, Clone, Copy)]
enum Asked {
    Epsilon(f64),
    Rho(f64),
}

impl Asked {
    /// As the node reads a request: rho if positive, else epsilon.
    fn of(q: &QueryRequest) -> Asked {
        if q.rho > 0.0 {
            Asked::Rho(q.rho)
        } else {
            Asked::Epsilon(q.epsilon)
        }
    }
}

/// The answer the coordinator expects from one node: the node's response
/// skeleton as its own `describe_release` would build it (no values, no
/// budget), derived here from the request and the node's public schema.
#[derive(Debug, Clone)]
pub struct Expected {
    skeleton: QueryResponse,
    plan: Plan,
    schema: Schema,
    asked: Asked,
}

/// Builds the expected answer to `request` on the dataset `ds` as the node
/// described it. Mirrors `fedq_node::service::describe_release` with the
/// same functions: the planner, the sensitivities, `Noise::for_epsilon` /
/// `Noise::for_rho` over the cost split evenly, `bin_edges`, and the
/// ledger measure's cost conversions.
fn expect(request: &QueryRequest, ds: &DatasetSchema) -> Result<Expected, Disagreement> {
    let schema = schema_from_proto(ds).map_err(|why| Disagreement::Schema {
        dataset: quoted(&ds.name),
        why,
    })?;
    // The node enforced its own cell limit when it accepted the query; the
    // coordinator's cost is bounded by the answer it compares against (see
    // `check_cells`), so no limit is applied here.
    let plan = plan::plan(&request.sql, &schema, usize::MAX)
        .map_err(|e| Disagreement::Plan(e.to_string()))?;
    let m = plan.measurements.len();
    if m == 0 {
        return Err(Disagreement::Plan("the plan has no measurement".into()));
    }
    let asked = Asked::of(request);
    let measure = Measure::parse(&ds.measure).ok_or_else(|| Disagreement::Schema {
        dataset: quoted(&ds.name),
        why: format!(
            "ledger measure {} is neither pure nor zcdp",
            quoted(&ds.measure)
        ),
    })?;
    let cost = match (asked, measure) {
        (Asked::Epsilon(e), Measure::Pure) => e,
        (Asked::Rho(r), Measure::Zcdp) => r,
        (Asked::Epsilon(e), Measure::Zcdp) => {
            accounting::pure_to_zcdp(e).map_err(|e| Disagreement::Plan(e.into()))?
        }
        (Asked::Rho(_), Measure::Pure) => return Err(Disagreement::Plan(
            "a rho query on a dataset whose ledger is pure epsilon-DP, which the node must refuse"
                .into(),
        )),
    };
    // An open-domain GROUP BY adds the node's keys delta, stated in the
    // answer: see `check_released_keys`.
    let (cost_epsilon, cost_delta) = measure
        .equivalent(cost, ds.delta)
        .map_err(|e| Disagreement::Plan(e.into()))?;
    let mut measurements = Vec::with_capacity(m);
    for (i, spec) in plan.measurements.iter().enumerate() {
        let (bins, bin_edges) = match spec {
            MeasurementSpec::Histogram { min, max, bins, .. } => {
                (*bins, fedq_dp::distribution::bin_edges(*min, *max, *bins))
            }
            _ => (1, Vec::new()),
        };
        let l1 = plan.sensitivity(i);
        let l2 = spec
            .l2_sensitivity()
            .saturating_mul(plan.contribution_bound);
        let (noise, per) = match asked {
            Asked::Epsilon(e) => (Noise::for_epsilon(l1, e / m as f64), e / m as f64),
            Asked::Rho(r) => (Noise::for_rho(l2, r / m as f64), r / m as f64),
        };
        let noise = noise.map_err(|e| Disagreement::Plan(format!("measurement {i}: {e}")))?;
        let ci = noise
            .half_width(CI_ALPHA)
            .map_err(|e| Disagreement::Plan(format!("measurement {i}: {e}")))?;
        if !(ci.is_finite() && noise.variance().is_finite()) {
            return Err(Disagreement::Plan(format!(
                "measurement {i}: the cost is so small that the noise would be unbounded, which the node must refuse"
            )));
        }
        let gaussian = matches!(asked, Asked::Rho(_));
        measurements.push(Measurement {
            label: spec.label(&schema),
            mechanism: noise.name().into(),
            scale: noise.scale(),
            sensitivity: l1 as f64,
            epsilon: if gaussian { 0.0 } else { per },
            noise_variance: noise.variance(),
            ci95_half_width: ci,
            values: Vec::new(),
            bins,
            bin_edges,
            rho: if gaussian { per } else { 0.0 },
            l2_sensitivity: if gaussian { l2 as f64 } else { 0.0 },
            masked: Vec::new(),
        });
    }
    let outputs = plan.output_columns();
    let group_by = plan.group_names(&schema);
    Ok(Expected {
        skeleton: QueryResponse {
            query_id: request.query_id.clone(),
            dataset: plan.dataset.clone(),
            group_by,
            outputs,
            measurements,
            dry_run: request.dry_run,
            measure: measure.name().into(),
            cost,
            cost_epsilon,
            cost_delta,
            request_sha256: hex::encode(fedq_proto::query_digest(request)),
            ..Default::default()
        },
        plan,
        schema,
        asked,
    })
}

/// Checks `answer`, the answer of the node at federation entry `node` to
/// `request`, against the coordinator's own plan of `request` on the
/// schema the node declared in `described`. Returns the expected answer
/// (for [`Expected::adopt`] and [`Expected::layout`]) or the first thing
/// that disagrees.
///
/// Checked: the query id, the request digest, the node name and dry-run
/// flag; that every stated number is finite; the dataset, GROUP BY columns,
/// cell keys (all of them, in order), outputs (kinds, measurement indices,
/// bounds, centre, quantile); every measurement's label, mechanism, scale,
/// sensitivities, share of the cost, noise variance, interval half-width,
/// bins and bin edges; the number of values (cells times bins, none in a
/// dry run); the ledger measure and cost. For an open-domain GROUP BY,
/// whose keys the node chooses, the shape only: one key column, no key
/// twice, the threshold the node's delta gives, and no value below it.
pub fn verify_answer(
    node: &str,
    request: &QueryRequest,
    described: &DescribeResponse,
    answer: &QueryResponse,
) -> Result<Expected, Disagreement> {
    verify_with(&mut Expectations::new(request), node, described, answer)
}

/// What every answer to one request is checked against, computed once per
/// query rather than once per node: the request's digest and dataset, and
/// the expected answer per distinct declared schema (nodes of one
/// federation usually declare the same, so a fan-out to 1,000 nodes plans
/// the query once, not 1,000 times).
pub struct Expectations<'r> {
    request: &'r QueryRequest,
    digest: String,
    dataset: Result<String, Disagreement>,
    by_schema: HashMap<Vec<u8>, Result<Expected, Disagreement>>,
}

impl<'r> Expectations<'r> {
    /// Nothing planned yet.
    pub fn new(request: &'r QueryRequest) -> Self {
        Expectations {
            request,
            digest: hex::encode(fedq_proto::query_digest(request)),
            dataset: plan::dataset_of(&request.sql).map_err(|e| Disagreement::Plan(e.to_string())),
            by_schema: HashMap::new(),
        }
    }

    /// The expected answer on `ds`, planned once per distinct schema.
    fn on(&mut self, ds: &DatasetSchema) -> Result<Expected, Disagreement> {
        use prost::Message;
        let request = self.request;
        self.by_schema
            .entry(ds.encode_to_vec())
            .or_insert_with(|| expect(request, ds))
            .clone()
    }
}

/// [`verify_answer`] with the per-query work in `ex`.
pub fn verify_with(
    ex: &mut Expectations<'_>,
    node: &str,
    described: &DescribeResponse,
    answer: &QueryResponse,
) -> Result<Expected, Disagreement> {
    let request = ex.request;
    if answer.query_id != request.query_id {
        return Err(Disagreement::QueryId {
            got: quoted(&answer.query_id),
            sent: quoted(&request.query_id),
        });
    }
    if answer.request_sha256 != ex.digest {
        return Err(Disagreement::RequestDigest {
            got: quoted(&answer.request_sha256),
            expected: ex.digest.clone(),
        });
    }
    if answer.node_name != node {
        return Err(Disagreement::NodeName {
            got: quoted(&answer.node_name),
            expected: node.to_string(),
        });
    }
    if answer.dry_run != request.dry_run {
        return Err(Disagreement::DryRun {
            got: answer.dry_run,
            asked: request.dry_run,
        });
    }
    check_finite(answer)?;
    let dataset = ex.dataset.clone()?;
    let ds = described
        .datasets
        .iter()
        .find(|d| d.name == dataset)
        .ok_or_else(|| Disagreement::UnknownDataset(quoted(&dataset)))?;
    let mut expected = ex.on(ds)?;
    let want = &expected.skeleton;
    if answer.dataset != want.dataset {
        return Err(field(
            "dataset",
            quoted(&answer.dataset),
            quoted(&want.dataset),
        ));
    }
    if answer.group_by != want.group_by {
        return Err(field(
            "group_by",
            format!("{:?}", answer.group_by),
            format!("{:?}", want.group_by),
        ));
    }
    check_outputs(&answer.outputs, &want.outputs)?;
    if expected.plan.open_key.is_none() {
        if answer.released_keys.is_some() {
            return Err(field(
                "released_keys",
                "set",
                "none (every GROUP BY column has a declared domain)",
            ));
        }
        check_cells(&expected, answer)?;
    }
    check_measurements(&expected, answer)?;
    if answer.measure != want.measure {
        return Err(field("measure", quoted(&answer.measure), &want.measure));
    }
    if !close(answer.cost, want.cost) {
        return Err(field("cost", answer.cost, want.cost));
    }
    if !close(answer.cost_epsilon, want.cost_epsilon) {
        return Err(field(
            "cost_epsilon",
            answer.cost_epsilon,
            want.cost_epsilon,
        ));
    }
    if expected.plan.open_key.is_some() {
        let delta = check_released_keys(&expected, answer)?;
        expected.skeleton.cost_delta += delta;
    }
    if !close(answer.cost_delta, expected.skeleton.cost_delta) {
        return Err(field(
            "cost_delta",
            answer.cost_delta,
            expected.skeleton.cost_delta,
        ));
    }
    Ok(expected)
}

/// Every float of the answer that the coordinator reads or shows. Names
/// are formatted only for the one reported, so a hostile answer with very
/// many measurements costs a pass over its numbers and nothing more.
fn check_finite(a: &QueryResponse) -> Result<(), Disagreement> {
    let bad = |what: String, value: f64| Err(Disagreement::NonFinite { what, value });
    for (what, v) in [
        ("cost", a.cost),
        ("cost_epsilon", a.cost_epsilon),
        ("cost_delta", a.cost_delta),
    ] {
        if !v.is_finite() {
            return bad(what.into(), v);
        }
    }
    if let Some(k) = a.released_keys.as_ref().filter(|k| !k.delta.is_finite()) {
        return bad("released_keys delta".into(), k.delta);
    }
    for (i, o) in a.outputs.iter().enumerate() {
        if !o.quantile.is_finite() {
            return bad(format!("output {i} quantile"), o.quantile);
        }
    }
    for (i, m) in a.measurements.iter().enumerate() {
        for (what, v) in [
            ("scale", m.scale),
            ("sensitivity", m.sensitivity),
            ("epsilon", m.epsilon),
            ("noise_variance", m.noise_variance),
            ("ci95_half_width", m.ci95_half_width),
            ("rho", m.rho),
            ("l2_sensitivity", m.l2_sensitivity),
        ] {
            if !v.is_finite() {
                return bad(format!("measurement {i} {what}"), v);
            }
        }
    }
    Ok(())
}

fn check_outputs(got: &[OutputColumn], want: &[OutputColumn]) -> Result<(), Disagreement> {
    if got.len() != want.len() {
        return Err(field("the number of outputs", got.len(), want.len()));
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g == w {
            continue;
        }
        let at = |f: &str| format!("output {i} {f}");
        let opt = |v: Option<i64>| v.map_or("none".to_string(), |v| v.to_string());
        let idx = |v: Option<u32>| v.map_or("none".to_string(), |v| v.to_string());
        return Err(if g.label != w.label {
            field(at("label"), quoted(&g.label), quoted(&w.label))
        } else if g.kind != w.kind {
            let name = |k: i32| {
                OutputKind::try_from(k).map_or(format!("kind {k}"), |k| k.as_str_name().into())
            };
            field(at("kind"), name(g.kind), name(w.kind))
        } else if g.measurement != w.measurement {
            field(at("measurement"), g.measurement, w.measurement)
        } else if g.count_measurement != w.count_measurement {
            field(
                at("count_measurement"),
                idx(g.count_measurement),
                idx(w.count_measurement),
            )
        } else if g.square_measurement != w.square_measurement {
            field(
                at("square_measurement"),
                idx(g.square_measurement),
                idx(w.square_measurement),
            )
        } else if g.lower != w.lower {
            field(at("lower bound"), opt(g.lower), opt(w.lower))
        } else if g.upper != w.upper {
            field(at("upper bound"), opt(g.upper), opt(w.upper))
        } else if g.quantile != w.quantile {
            field(at("quantile"), g.quantile, w.quantile)
        } else {
            field(at("center"), g.center, w.center)
        });
    }
    Ok(())
}

fn check_measurements(expected: &Expected, answer: &QueryResponse) -> Result<(), Disagreement> {
    let want = &expected.skeleton.measurements;
    let got = &answer.measurements;
    if got.len() != want.len() {
        return Err(field("the number of measurements", got.len(), want.len()));
    }
    let m = want.len();
    let plural = if m == 1 { "" } else { "s" };
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let at = |f: &str| format!("measurement {i} {f}");
        if g.label != w.label {
            return Err(field(at("label"), quoted(&g.label), quoted(&w.label)));
        }
        if g.mechanism != w.mechanism {
            return Err(field(at("mechanism"), quoted(&g.mechanism), &w.mechanism));
        }
        if g.sensitivity != w.sensitivity {
            return Err(field(at("sensitivity"), g.sensitivity, w.sensitivity));
        }
        if g.l2_sensitivity != w.l2_sensitivity {
            return Err(field(
                at("l2_sensitivity"),
                g.l2_sensitivity,
                w.l2_sensitivity,
            ));
        }
        if !close(g.epsilon, w.epsilon) {
            return Err(field(at("epsilon"), g.epsilon, w.epsilon));
        }
        if !close(g.rho, w.rho) {
            return Err(field(at("rho"), g.rho, w.rho));
        }
        if !close(g.scale, w.scale) {
            let why = match expected.asked {
                Asked::Epsilon(e) => format!(
                    "epsilon {e} over {m} measurement{plural}, sensitivity {}",
                    w.sensitivity
                ),
                Asked::Rho(r) => format!(
                    "rho {r} over {m} measurement{plural}, L2 sensitivity {}",
                    w.l2_sensitivity
                ),
            };
            return Err(Disagreement::Scale {
                index: i,
                got: g.scale,
                expected: w.scale,
                why,
            });
        }
        if !close(g.noise_variance, w.noise_variance) {
            return Err(field(
                at("noise_variance"),
                g.noise_variance,
                w.noise_variance,
            ));
        }
        if !close(g.ci95_half_width, w.ci95_half_width) {
            return Err(field(
                at("ci95_half_width"),
                g.ci95_half_width,
                w.ci95_half_width,
            ));
        }
        if g.bins != w.bins {
            return Err(field(at("bins"), g.bins, w.bins));
        }
        if g.bin_edges.len() != w.bin_edges.len() {
            return Err(field(
                at("number of bin edges"),
                g.bin_edges.len(),
                w.bin_edges.len(),
            ));
        }
        if let Some(b) = (0..w.bin_edges.len()).find(|&b| g.bin_edges[b] != w.bin_edges[b]) {
            return Err(field(
                at(&format!("bin edge {b}")),
                g.bin_edges[b],
                w.bin_edges[b],
            ));
        }
        let cells = if expected.plan.open_key.is_some() {
            answer.cells.len()
        } else {
            cell_count(&expected.plan)
        };
        let (values, why) = if answer.dry_run {
            (0, "a dry run releases no value".to_string())
        } else {
            let k = usize::try_from(w.bins).unwrap_or(usize::MAX).max(1);
            (
                cells.saturating_mul(k),
                format!("{cells} cells x {k} bin{}", if k == 1 { "" } else { "s" }),
            )
        };
        if g.values.len() != values {
            return Err(Disagreement::ValueCount {
                index: i,
                got: g.values.len(),
                expected: values,
                why,
            });
        }
    }
    Ok(())
}

/// The cells of a declared-domain GROUP BY: exactly the plan's keys, in
/// order. Their count is compared first, so a schema declaring a huge
/// cross product costs the coordinator nothing unless the answer holds as
/// many cells (bounded by the answer's size).
fn check_cells(expected: &Expected, answer: &QueryResponse) -> Result<(), Disagreement> {
    let n = cell_count(&expected.plan);
    if answer.cells.len() != n {
        return Err(Disagreement::CellCount {
            got: answer.cells.len(),
            expected: n,
        });
    }
    let keys = fedq_plan::plan::cell_keys(&expected.plan, &expected.schema);
    for (index, (got, want)) in answer.cells.iter().zip(keys).enumerate() {
        if got.values != want {
            return Err(Disagreement::Cell {
                index,
                got: quoted(&format!("{:?}", got.values)),
                expected: want,
            });
        }
    }
    Ok(())
}

/// The released keys of an open-domain GROUP BY: the node chooses them
/// (those whose noisy count passed its threshold), so only their shape is
/// checked. Returns the delta they spent (the node's `keys_delta`, which
/// it alone knows; the threshold must be the one that delta gives).
fn check_released_keys(expected: &Expected, answer: &QueryResponse) -> Result<f64, Disagreement> {
    let bad = |s: String| Err(Disagreement::ReleasedKeys(s));
    let Some(k) = &answer.released_keys else {
        return bad("missing, where the GROUP BY column has an open domain".into());
    };
    let column = expected
        .skeleton
        .group_by
        .first()
        .cloned()
        .unwrap_or_default();
    if k.column != column {
        return bad(format!(
            "column {} where the plan gives {column:?}",
            quoted(&k.column)
        ));
    }
    if !(k.delta > 0.0 && k.delta < 1.0) {
        return bad(format!("delta {} is not in (0, 1)", k.delta));
    }
    let Some(noise) = expected
        .skeleton
        .measurements
        .first()
        .and_then(|m| Noise::reported(&m.mechanism, m.scale))
    else {
        return bad("the plan has no count to threshold".into());
    };
    let threshold = noise
        .key_threshold(expected.plan.contribution_bound, k.delta)
        .map_err(|e| Disagreement::ReleasedKeys(e.into()))?;
    if k.threshold != threshold {
        return bad(format!(
            "threshold {} where delta {:e} gives {threshold}",
            k.threshold, k.delta
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(answer.cells.len());
    for (i, c) in answer.cells.iter().enumerate() {
        if c.values.len() != 1 {
            return bad(format!("cell {i} has {} key values, not 1", c.values.len()));
        }
        if !seen.insert(&c.values[0]) {
            return bad(format!("key {} is released twice", quoted(&c.values[0])));
        }
    }
    if let Some(v) = answer
        .measurements
        .first()
        .and_then(|m| m.values.iter().find(|&&v| v < threshold))
    {
        return bad(format!(
            "a released count {v} is below the threshold {threshold}"
        ));
    }
    Ok(k.delta)
}

impl Expected {
    /// Replaces everything in `answer` that the plan determines by the
    /// coordinator's own values: the layout, every scale and derived
    /// figure. Called only after [`verify_answer`] accepted `answer`, so
    /// nothing changes but the last bits of the floats; after it, only the
    /// noisy values, budgets, words and the audit head are the node's.
    pub fn adopt(&self, answer: &mut QueryResponse) {
        let s = &self.skeleton;
        answer.dataset = s.dataset.clone();
        answer.group_by = s.group_by.clone();
        answer.outputs = s.outputs.clone();
        for (a, w) in answer.measurements.iter_mut().zip(&s.measurements) {
            let values = std::mem::take(&mut a.values);
            *a = Measurement {
                values,
                ..w.clone()
            };
        }
        answer.measure = s.measure.clone();
        answer.cost = s.cost;
        answer.cost_epsilon = s.cost_epsilon;
        answer.cost_delta = s.cost_delta;
    }

    /// What the combination of this answer with others depends on besides
    /// the values: the GROUP BY columns and, per output, its kind and the
    /// bounds, centre, quantile and bin edges the combination uses.
    pub fn layout(&self) -> Layout {
        let s = &self.skeleton;
        Layout {
            group_by: s.group_by.clone(),
            outputs: s
                .outputs
                .iter()
                .map(|o| {
                    let kind = OutputKind::try_from(o.kind).unwrap_or(OutputKind::Unspecified);
                    let edges = s
                        .measurements
                        .get(o.measurement as usize)
                        .map(|m| m.bin_edges.clone())
                        .unwrap_or_default();
                    OutputLayout {
                        label: o.label.clone(),
                        kind,
                        bounds: matches!(
                            kind,
                            OutputKind::Avg
                                | OutputKind::Variance
                                | OutputKind::Stddev
                                | OutputKind::Quantile
                                | OutputKind::Histogram
                        )
                        .then(|| o.lower.zip(o.upper))
                        .flatten(),
                        center: matches!(kind, OutputKind::Variance | OutputKind::Stddev)
                            .then_some(o.center),
                        quantile: (kind == OutputKind::Quantile).then_some(o.quantile),
                        edges,
                    }
                })
                .collect(),
        }
    }
}

/// The part of a plan that answers must share to be combined (see
/// [`Expected::layout`]). Cells may differ: rows are combined by key.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    group_by: Vec<String>,
    outputs: Vec<OutputLayout>,
}

#[derive(Debug, Clone, PartialEq)]
struct OutputLayout {
    label: String,
    kind: OutputKind,
    bounds: Option<(i64, i64)>,
    center: Option<i64>,
    quantile: Option<f64>,
    edges: Vec<i64>,
}

impl Layout {
    /// The first difference from `reference`, as (this layout's value, the
    /// reference's), or `None` when they agree.
    pub fn difference(&self, reference: &Layout) -> Option<(String, String)> {
        if self.group_by != reference.group_by {
            return Some((
                format!("GROUP BY {:?}", self.group_by),
                format!("{:?}", reference.group_by),
            ));
        }
        if self.outputs.len() != reference.outputs.len() {
            return Some((
                format!("{} outputs", self.outputs.len()),
                reference.outputs.len().to_string(),
            ));
        }
        for (a, b) in self.outputs.iter().zip(&reference.outputs) {
            let l = &a.label;
            let show = |v: &dyn std::fmt::Debug| format!("{v:?}");
            if a.kind != b.kind || a.label != b.label {
                return Some((format!("output {l}"), b.label.clone()));
            }
            if a.bounds != b.bounds {
                return Some((
                    format!("bounds {} for {l}", show(&a.bounds)),
                    show(&b.bounds),
                ));
            }
            if a.center != b.center {
                return Some((
                    format!("centre {} for {l}", show(&a.center)),
                    show(&b.center),
                ));
            }
            if a.quantile != b.quantile {
                return Some((
                    format!("quantile {} for {l}", show(&a.quantile)),
                    show(&b.quantile),
                ));
            }
            if a.edges != b.edges {
                return Some((
                    format!(
                        "{} bin edges {}.. for {l}",
                        a.edges.len(),
                        show(&a.edges.first())
                    ),
                    format!("{} bin edges {}..", b.edges.len(), show(&b.edges.first())),
                ));
            }
        }
        None
    }
}

/// Among the layouts of the answers that passed [`verify_answer`] (in
/// federation order), the one most answers share (the earliest on a tie):
/// the coordinator's plan for the combination. Returns its index.
pub fn reference_layout(layouts: &[Layout]) -> Option<usize> {
    // Each distinct layout by its first index, with its count: linear in
    // the answers when they agree (as honest ones do).
    let mut distinct: Vec<(usize, usize)> = Vec::new();
    for (i, l) in layouts.iter().enumerate() {
        match distinct.iter_mut().find(|(first, _)| layouts[*first] == *l) {
            Some((_, n)) => *n += 1,
            None => distinct.push((i, 1)),
        }
    }
    // The most common; on a tie, the one seen first.
    let mut best: Option<(usize, usize)> = None;
    for &(first, n) in &distinct {
        if best.is_none_or(|(_, b)| n > b) {
            best = Some((first, n));
        }
    }
    best.map(|(i, _)| i)
}

/// Checks every answer to `request` against the coordinator's own plan on
/// the schema its node declared (`described` gives a node's Describe by
/// federation name; [`verify_answer`]), then against the layout most
/// answers share ([`reference_layout`]): answers over different bounds,
/// centres or bin edges cannot be added up. An answer that fails either is
/// turned into [`Failure::LeftOut`], naming the node and what disagreed,
/// and is then left out of the combination exactly like a node that failed;
/// one that passes has its layout and scales replaced by the coordinator's
/// ([`Expected::adopt`]), so that the combination takes them from the
/// coordinator's plan, never from a node. Failures pass through unchanged.
pub fn check_outcomes<'a>(
    request: &QueryRequest,
    outcomes: Vec<Outcome<QueryResponse>>,
    described: impl Fn(&str) -> Option<&'a DescribeResponse>,
) -> Vec<Outcome<QueryResponse>> {
    let left_out = |node: &str, why: &dyn std::fmt::Display| {
        Failure::LeftOut(format!("node {node:?}: answer left out: {why}"))
    };
    let mut checked: Vec<(Outcome<QueryResponse>, Option<Layout>)> = Vec::new();
    let mut ex = Expectations::new(request);
    for mut o in outcomes {
        let Ok(answer) = &mut o.result else {
            checked.push((o, None));
            continue;
        };
        let verdict: Result<Expected, String> = match described(&o.node) {
            Some(d) => verify_with(&mut ex, &o.node, d, answer).map_err(|e| e.to_string()),
            None => Err("the coordinator did not get its Describe (its declared schemas), so it cannot check the answer".into()),
        };
        match verdict {
            Ok(expected) => {
                expected.adopt(answer);
                checked.push((o, Some(expected.layout())));
            }
            Err(why) => {
                tracing::warn!(node = %o.node, %why, "answer left out");
                o.result = Err(left_out(&o.node, &why));
                checked.push((o, None));
            }
        }
    }
    let layouts: Vec<Layout> = checked.iter().filter_map(|(_, l)| l.clone()).collect();
    if let Some(r) = reference_layout(&layouts) {
        let reference = &layouts[r];
        let holder = checked
            .iter()
            .filter(|(_, l)| l.is_some())
            .nth(r)
            .map(|(o, _)| o.node.clone())
            .unwrap_or_default();
        for (o, layout) in &mut checked {
            if let Some((what, expected)) = layout.as_ref().and_then(|l| l.difference(reference)) {
                let why = Disagreement::Layout {
                    what,
                    expected,
                    reference: holder.clone(),
                };
                tracing::warn!(node = %o.node, %why, "answer left out");
                o.result = Err(left_out(&o.node, &why));
            }
        }
    }
    checked.into_iter().map(|(o, _)| o).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedq_engine::synth;

    fn described(privacy_unit: &str, measure: &str) -> DescribeResponse {
        let schema = Schema::from_specs("cases", &synth::ctdc_columns()).unwrap();
        DescribeResponse {
            node_name: "n".into(),
            datasets: vec![DatasetSchema {
                name: "cases".into(),
                columns: schema.to_proto(),
                privacy_unit: privacy_unit.into(),
                measure: measure.into(),
                delta: if measure == "zcdp" { 1e-7 } else { 0.0 },
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn request(sql: &str, epsilon: f64, rho: f64) -> QueryRequest {
        QueryRequest {
            query_id: "q1".into(),
            sql: sql.into(),
            epsilon,
            dry_run: false,
            rho,
        }
    }

    /// An honest answer: the expected skeleton with values filled in.
    fn honest(d: &DescribeResponse, q: &QueryRequest) -> QueryResponse {
        let e = expect(q, &d.datasets[0]).unwrap();
        let mut a = e.skeleton.clone();
        a.node_name = "n".into();
        a.cells = fedq_plan::plan::cell_keys(&e.plan, &e.schema)
            .into_iter()
            .map(|values| fedq_proto::v1::CellKey { values })
            .collect();
        for m in &mut a.measurements {
            m.values = vec![7; a.cells.len() * m.bins.max(1) as usize];
        }
        a
    }

    const SQL: &str = "SELECT gender, COUNT(*), AVG(traffickMonths), VARIANCE(traffickMonths) FROM cases GROUP BY gender";

    #[test]
    fn schema_round_trips_through_describe() {
        let schema = Schema::from_specs("cases", &synth::ctdc_columns()).unwrap();
        let ds = &described("record", "pure").datasets[0];
        assert_eq!(schema_from_proto(ds).unwrap(), schema);
        let person = schema_from_proto(&DatasetSchema {
            privacy_unit: "person (identified by pid, at most 3 records per person)".into(),
            ..ds.clone()
        })
        .unwrap();
        assert_eq!(person.contribution_bound(), 3);
        assert!(schema_from_proto(&DatasetSchema {
            privacy_unit: "household".into(),
            ..ds.clone()
        })
        .unwrap_err()
        .contains("household"));
    }

    /// One plan per distinct declared schema, whatever the number of
    /// nodes; a node declaring another schema gets its own, and the
    /// verdicts are those of `verify_answer`.
    #[test]
    fn the_query_is_planned_once_per_distinct_schema() {
        let d = described("record", "pure");
        let q = request(SQL, 0.5, 0.0);
        let a = honest(&d, &q);
        let mut ex = Expectations::new(&q);
        for _ in 0..50 {
            verify_with(&mut ex, "n", &d, &a).unwrap();
        }
        assert_eq!(ex.by_schema.len(), 1);
        let z = described("record", "zcdp");
        let e = verify_with(&mut ex, "n", &z, &a).unwrap_err();
        assert_eq!(e, verify_answer("n", &q, &z, &a).unwrap_err());
        assert_eq!(ex.by_schema.len(), 2);
    }

    #[test]
    fn an_honest_answer_passes_and_tampered_ones_are_named() {
        let d = described("record", "pure");
        let q = request(SQL, 0.5, 0.0);
        let a = honest(&d, &q);
        verify_answer("n", &q, &d, &a).unwrap();

        let mut t = a.clone();
        t.measurements[0].scale /= 2.0;
        let e = verify_answer("n", &q, &d, &t).unwrap_err();
        assert!(matches!(e, Disagreement::Scale { index: 0, .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("epsilon 0.5 over 4 measurements, sensitivity 1"),
            "{text}"
        );

        let mut t = a.clone();
        t.cells.push(fedq_proto::v1::CellKey {
            values: vec!["Other".into()],
        });
        assert!(matches!(
            verify_answer("n", &q, &d, &t),
            Err(Disagreement::CellCount { .. })
        ));
        let mut t = a.clone();
        t.cells.swap(0, 1);
        assert!(matches!(
            verify_answer("n", &q, &d, &t),
            Err(Disagreement::Cell { index: 0, .. })
        ));
        let mut t = a.clone();
        t.dry_run = true;
        assert!(matches!(
            verify_answer("n", &q, &d, &t),
            Err(Disagreement::DryRun { .. })
        ));
        let mut t = a.clone();
        t.query_id = "other".into();
        assert!(matches!(
            verify_answer("n", &q, &d, &t),
            Err(Disagreement::QueryId { .. })
        ));
        let mut t = a.clone();
        t.request_sha256 = "00".repeat(32);
        assert!(matches!(
            verify_answer("n", &q, &d, &t),
            Err(Disagreement::RequestDigest { .. })
        ));
        // An answer to the same id with another cost carries that cost's
        // digest: caught even if every other field were rewritten.
        let other = request(SQL, 1.0, 0.0);
        let t = honest(&d, &other);
        assert!(matches!(
            verify_answer("n", &q, &d, &t),
            Err(Disagreement::RequestDigest { .. })
        ));
        let e = verify_answer("m", &q, &d, &a).unwrap_err();
        assert!(matches!(e, Disagreement::NodeName { .. }), "{e}");
        let mut t = a.clone();
        t.measurements[2].ci95_half_width = f64::NAN;
        assert!(matches!(
            verify_answer("n", &q, &d, &t),
            Err(Disagreement::NonFinite { .. })
        ));
        let mut t = a.clone();
        t.outputs[2].center += 1;
        let e = verify_answer("n", &q, &d, &t).unwrap_err();
        assert!(e.to_string().contains("output 2 center"), "{e}");
        let mut t = a.clone();
        t.outputs[1].upper = Some(1_000);
        let e = verify_answer("n", &q, &d, &t).unwrap_err();
        assert!(e.to_string().contains("output 1 upper bound"), "{e}");
        let mut t = a.clone();
        t.measurements[1].values.pop();
        assert!(matches!(
            verify_answer("n", &q, &d, &t),
            Err(Disagreement::ValueCount { index: 1, .. })
        ));
        let mut t = a.clone();
        t.measurements[0].mechanism = "discrete_gaussian".into();
        let e = verify_answer("n", &q, &d, &t).unwrap_err();
        assert!(e.to_string().contains("measurement 0 mechanism"), "{e}");
    }

    #[test]
    fn bin_edges_and_quantiles_are_checked() {
        let d = described("record", "pure");
        let q = request("SELECT MEDIAN(traffickMonths) FROM cases", 1.0, 0.0);
        let a = honest(&d, &q);
        verify_answer("n", &q, &d, &a).unwrap();
        let mut t = a.clone();
        t.measurements[0].bin_edges[3] += 1;
        let e = verify_answer("n", &q, &d, &t).unwrap_err();
        assert!(e.to_string().contains("measurement 0 bin edge 3"), "{e}");
        let mut t = a.clone();
        t.outputs[0].quantile = 0.9;
        let e = verify_answer("n", &q, &d, &t).unwrap_err();
        assert!(e.to_string().contains("output 0 quantile"), "{e}");
    }

    #[test]
    fn rho_scales_follow_the_discrete_gaussian() {
        let d = described("record", "zcdp");
        let q = request(SQL, 0.0, 0.2);
        let a = honest(&d, &q);
        verify_answer("n", &q, &d, &a).unwrap();
        let want = Noise::for_rho(1, 0.2 / 4.0).unwrap().scale();
        assert_eq!(a.measurements[0].scale, want);
        let mut t = a.clone();
        t.measurements[0].scale *= 1.0 + 1e-6;
        let e = verify_answer("n", &q, &d, &t).unwrap_err();
        assert!(e.to_string().contains("rho 0.2 over 4 measurements"), "{e}");
        // Within rounding: accepted.
        let mut t = a.clone();
        t.measurements[0].scale *= 1.0 + 1e-13;
        verify_answer("n", &q, &d, &t).unwrap();
        // A rho query on a pure ledger cannot have been answered honestly.
        let pure = described("record", "pure");
        assert!(matches!(
            verify_answer("n", &q, &pure, &a),
            Err(Disagreement::Plan(_))
        ));
    }

    #[test]
    fn a_person_unit_multiplies_the_scale() {
        let d = described(
            "person (identified by pid, at most 4 records per person)",
            "pure",
        );
        let q = request("SELECT COUNT(*) FROM cases", 1.0, 0.0);
        let a = honest(&d, &q);
        assert_eq!(a.measurements[0].sensitivity, 4.0);
        let record = described("record", "pure");
        let e = verify_answer("n", &q, &record, &a).unwrap_err();
        assert!(e.to_string().contains("sensitivity"), "{e}");
    }

    #[test]
    fn adopt_keeps_values_and_takes_the_plans_numbers() {
        let d = described("record", "pure");
        let q = request(SQL, 0.5, 0.0);
        let mut a = honest(&d, &q);
        a.measurements[0].scale *= 1.0 + 1e-12;
        let e = verify_answer("n", &q, &d, &a).unwrap();
        let values = a.measurements[0].values.clone();
        e.adopt(&mut a);
        assert_eq!(a.measurements[0].values, values);
        assert_eq!(a.measurements[0].scale, e.skeleton.measurements[0].scale);
    }

    #[test]
    fn open_domain_keys_are_checked_for_shape_and_threshold() {
        use fedq_proto::v1::{CategoricalColumn, ColumnSchema, ReleasedKeys};
        let d = DescribeResponse {
            datasets: vec![DatasetSchema {
                name: "cases".into(),
                columns: vec![ColumnSchema {
                    name: "citizenship".into(),
                    kind: Some(Kind::Categorical(CategoricalColumn {
                        domain: Vec::new(),
                        open: true,
                    })),
                }],
                privacy_unit: "record".into(),
                measure: "pure".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let q = request(
            "SELECT citizenship, COUNT(*) FROM cases GROUP BY citizenship",
            1.0,
            0.0,
        );
        let e = expect(&q, &d.datasets[0]).unwrap();
        let noise = Noise::reported(
            &e.skeleton.measurements[0].mechanism,
            e.skeleton.measurements[0].scale,
        )
        .unwrap();
        let delta = 1e-6;
        let threshold = noise.key_threshold(1, delta).unwrap();
        let mut a = e.skeleton.clone();
        a.node_name = "n".into();
        a.cells = ["FR", "NG"]
            .map(|k| fedq_proto::v1::CellKey {
                values: vec![k.into()],
            })
            .to_vec();
        a.measurements[0].values = vec![threshold, threshold + 40];
        a.cost_delta += delta;
        a.released_keys = Some(ReleasedKeys {
            column: "citizenship".into(),
            threshold,
            delta,
            note: String::new(),
        });
        verify_answer("n", &q, &d, &a).unwrap();

        let rejected = |t: &QueryResponse| match verify_answer("n", &q, &d, t) {
            Err(Disagreement::ReleasedKeys(why)) => why,
            other => panic!("{other:?}"),
        };
        let mut t = a.clone();
        t.cells[1].values[0] = "FR".into();
        assert!(rejected(&t).contains("twice"));
        let mut t = a.clone();
        t.measurements[0].values[0] = threshold - 1;
        assert!(rejected(&t).contains("below the threshold"));
        let mut t = a.clone();
        if let Some(k) = &mut t.released_keys {
            k.threshold -= 1;
        }
        assert!(rejected(&t).contains("threshold"));
        let mut t = a.clone();
        t.released_keys = None;
        assert!(rejected(&t).contains("missing"));
        let mut t = a.clone();
        t.measurements[0].values.push(threshold);
        assert!(matches!(
            verify_answer("n", &q, &d, &t),
            Err(Disagreement::ValueCount { .. })
        ));
    }

    #[test]
    fn the_reference_layout_is_the_most_common() {
        let d = described("record", "pure");
        let q = request("SELECT MEDIAN(traffickMonths) FROM cases", 1.0, 0.0);
        let a = expect(&q, &d.datasets[0]).unwrap().layout();
        let mut other = d.clone();
        if let Some(Kind::Integer(i)) = other.datasets[0]
            .columns
            .iter_mut()
            .find(|c| c.name == "traffickMonths")
            .and_then(|c| c.kind.as_mut())
        {
            i.max += 10;
        }
        let b = expect(&q, &other.datasets[0]).unwrap().layout();
        assert!(b.difference(&a).is_some());
        assert_eq!(
            reference_layout(&[b.clone(), a.clone(), a.clone()]),
            Some(1)
        );
        assert_eq!(reference_layout(&[b.clone(), a.clone()]), Some(0));
        assert_eq!(reference_layout(&[]), None);
    }
}
