//! The `fedq.v1.Node` gRPC service: who may call, what a query costs, and
//! the order of operations that keeps the privacy invariants.
//!
//! A query goes: identify the caller from its certificate → validate sizes
//! and the cost (epsilon or rho) → plan against the declared schema → fix every mechanism and
//! scale (nothing data-dependent so far, nothing spent) → in a blocking
//! task: durably debit (or recognise a retry) → compute exact aggregates →
//! add OpenDP noise → store the response for retries → answer. Any refusal
//! before the debit spends nothing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use fedq_proto::v1::node_server::Node;
use fedq_proto::v1::{
    AuditLine, Budget, BudgetRequest, BudgetResponse, CancelRequest, CancelResponse, CellKey,
    CommitRequest, DatasetSchema, DescribeRequest, DescribeResponse, ExportAuditRequest,
    Measurement, PrepareRequest, PrepareResponse, QueryRequest, QueryResponse, ReleasedKeys,
};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::config::{DatasetConfig, NodeConfig};
use crate::refusals::{RefusalKind, RefusalLog, Refused};
use fedq_dp::accounting::{self, Measure};
use fedq_dp::mechanism::{self, Exact, Noise};
use fedq_engine::postgres::{PgSource, SourceError};
use fedq_engine::source::Source;
use fedq_ledger::audit::{AuditKey, AuditLog, DatasetLimits, Decimal, Event, ReleasedMeasurement};
use fedq_ledger::ledger::{
    Admission, BudgetState, Computed, Debit, Durable, Hold, Ledger, LedgerError, ReleaseOf,
};
use fedq_ledger::store::Store;
use fedq_pki::{caller_from_der, Caller};
use fedq_plan::plan::cell_keys;
use fedq_plan::plan::{self, Plan};
use fedq_plan::schema::Schema;
use fedq_proto::query_digest;

crate::error::stage_error! {
    /// Why the node's state could not be opened or its start logged.
    StartError {
    }
}

impl From<fedq_engine::postgres::PgConfigError> for StartError {
    fn from(e: fedq_engine::postgres::PgConfigError) -> Self {
        StartError::Refused(e.to_string())
    }
}

impl From<fedq_ledger::ledger::MeasureError> for StartError {
    fn from(e: fedq_ledger::ledger::MeasureError) -> Self {
        StartError::Refused(e.to_string())
    }
}

impl From<sled::Error> for StartError {
    fn from(e: sled::Error) -> Self {
        StartError::io("flushing the audit log", e)
    }
}

impl StartError {
    fn refused(why: impl std::fmt::Display) -> Self {
        StartError::Refused(why.to_string())
    }
}

impl From<std::io::Error> for StartError {
    fn from(e: std::io::Error) -> Self {
        StartError::io("file operation", e)
    }
}

impl From<fedq_ledger::store::StoreError> for StartError {
    fn from(e: fedq_ledger::store::StoreError) -> Self {
        StartError::Refused(e.to_string())
    }
}

impl From<fedq_audit::AuditError> for StartError {
    fn from(e: fedq_audit::AuditError) -> Self {
        StartError::Refused(e.to_string())
    }
}

/// What this node can do, reported in `Describe` so coordinators can adapt.
pub const CAPABILITIES: &[&str] = &[
    "count",
    "count_column",
    "sum",
    "avg",
    "group_by",
    "where",
    "dry_run",
    "idempotent_query_id",
    "discrete_laplace",
    "discrete_gaussian",
    "zcdp",
    "audit_log",
    "audit_export",
    "two_phase",
    "released_keys",
    "secure_aggregation",
];

/// Smallest epsilon a query may ask for: below it an answer is pure noise
/// (and the noise of a sum could overflow the accuracy computations).
pub const MIN_EPSILON: f64 = 1e-6;

/// Smallest rho a query may ask for (the zCDP cost of `MIN_EPSILON` is
/// 5e-13): below it an answer is pure noise.
pub const MIN_RHO: f64 = 1e-12;

/// Longest accepted query id.
const MAX_QUERY_ID: usize = 128;

/// One served dataset: its declaration, validated schema and rows.
pub struct Dataset {
    /// The declaration from `node.toml`.
    pub config: DatasetConfig,
    /// The validated schema.
    pub schema: Schema,
    /// Where the rows are: the embedded store (shared read-only with query
    /// tasks) or the partner's database.
    pub source: Source,
}

/// Everything a request handler needs, shared across requests.
pub struct NodeState {
    /// The node's configuration.
    pub config: NodeConfig,
    /// Served datasets by name.
    pub datasets: HashMap<String, Dataset>,
    /// The budget ledger.
    pub ledger: Ledger,
    /// `(analyst, query id)` pairs being computed right now: a concurrent
    /// retry of the same id must wait, or it could release twice under one
    /// debit.
    in_flight: Mutex<HashSet<(String, String)>>,
    /// Per-analyst rate and concurrency limits.
    throttle: Throttle,
    /// Refusals waiting to be logged in summary form.
    refusals: RefusalLog,
    /// This node's secure-aggregation identity (its certificate key and
    /// the federation CA), set by the server once TLS is loaded; `None`:
    /// secure rounds are refused.
    pub secagg: Option<Arc<crate::tls::SecAggIdentity>>,
    /// The round keys of prepared secure-aggregation queries.
    rounds: crate::secure::Rounds,
}

impl NodeState {
    /// Opens the store and loads every configured dataset into memory.
    pub fn open(config: NodeConfig) -> Result<NodeState, StartError> {
        let store = Store::open(&config.resolve(&config.node.store))?;
        let mut datasets = HashMap::new();
        for d in &config.datasets {
            let schema = d.schema().map_err(StartError::refused)?;
            let source = match &d.source {
                None => Source::Embedded(Arc::new(store.load_table(&d.name, &schema)?)),
                Some(src) => Source::Postgres(Arc::new(
                    PgSource::new(&d.name, schema.clone(), src, &config.base_dir)?
                        .with_mapping(&d.mapping)?,
                )),
            };
            datasets.insert(
                d.name.clone(),
                Dataset {
                    config: d.clone(),
                    schema,
                    source,
                },
            );
        }
        let audit = Arc::new(open_audit(&config, &store)?);
        let ledger = Ledger::new(store, audit);
        // Before anything is logged or spent: never mix measures in a ledger.
        ledger.check_measures(
            config
                .datasets
                .iter()
                .map(|d| (d.name.as_str(), d.budget.measure)),
        )?;
        Ok(NodeState {
            config,
            datasets,
            ledger,
            in_flight: Mutex::new(HashSet::new()),
            throttle: Throttle::default(),
            refusals: RefusalLog::default(),
            secagg: None,
            rounds: crate::secure::Rounds::default(),
        })
    }

    /// Connects to every database source and checks its table against the
    /// declared schema. A table that does not match stops the start (the
    /// operator must fix the configuration or the database); an unreachable
    /// database does not: the node starts, that dataset's queries fail with
    /// a clear error and spend nothing, and each query tries again.
    pub async fn check_sources(&self) -> Result<(), StartError> {
        for (name, ds) in &self.datasets {
            let Source::Postgres(pg) = &ds.source else {
                continue;
            };
            match pg.connect().await {
                Ok(()) => {
                    tracing::info!(dataset = %name, table = %pg.relation(), "database source checked")
                }
                Err(SourceError::Mismatch(why)) => {
                    return Err(StartError::Refused(why.to_string()))
                }
                Err(e) => tracing::warn!(
                    dataset = %name,
                    table = %pg.relation(),
                    error = %e.detail(),
                    "database source unavailable at start; its queries will fail (spending nothing) until it answers"
                ),
            }
        }
        Ok(())
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.ledger.audit
    }

    /// Records that the node started, with its version, config digest and
    /// budget limits, and flushes.
    pub fn log_start(&self) -> Result<(), StartError> {
        let current: Vec<DatasetLimits> = self
            .config
            .datasets
            .iter()
            .map(|d| DatasetLimits {
                dataset: d.name.clone(),
                per_analyst: Decimal::from_f64(d.budget.per_analyst).unwrap_or_default(),
                total: Decimal::from_f64(d.budget.total).unwrap_or_default(),
                per_query_max: Decimal::from_f64(d.budget.per_query_max).unwrap_or_default(),
                measure: match d.budget.measure {
                    Measure::Pure => String::new(),
                    Measure::Zcdp => Measure::Zcdp.name().into(),
                },
                delta: d.budget.delta.and_then(Decimal::from_f64),
            })
            .collect();
        let previous = self.audit().last_limits()?;
        self.audit().append(Event::NodeStarted {
            version: env!("CARGO_PKG_VERSION").into(),
            config_sha256: self.config.source_sha256.clone(),
            audit_public_key: self.audit().key.public_hex(),
            limits: current.clone(),
        })?;
        if let Some(previous) = previous {
            for now in &current {
                let before = previous.iter().find(|p| p.dataset == now.dataset).cloned();
                if before.as_ref() != Some(now) {
                    self.audit().append(Event::LimitsChanged {
                        dataset: now.dataset.clone(),
                        before,
                        after: now.clone(),
                    })?;
                }
            }
        }
        self.audit().tree.flush()?;
        Ok(())
    }

    /// A running slot for `analyst`, or RESOURCE_EXHAUSTED (logged).
    fn slot(&self, analyst: &str) -> Result<Slot, Status> {
        self.throttle
            .enter(analyst, &self.config.limits)
            .map_err(|(kind, why)| {
                self.log_refusal((analyst, "analyst"), kind, "", &why);
                Status::resource_exhausted(why)
            })
    }

    /// Runs `work` on the blocking pool, holding `slot`, within the node's
    /// per-query deadline.
    async fn within_deadline<T: Send + 'static>(
        self: &Arc<Self>,
        slot: Slot,
        work: impl FnOnce(&NodeState) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let state = Arc::clone(self);
        let deadline = std::time::Duration::from_millis(self.config.limits.query_deadline_ms);
        let task = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            work(&state)
        });
        match tokio::time::timeout(deadline, task).await {
            Ok(joined) => joined.map_err(internal)?,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "the node did not finish within its {} ms limit; retry with the same query id to get the release if it was made (never a second debit)",
                self.config.limits.query_deadline_ms
            ))),
        }
    }

    /// Counts a refusal of `who` (name, role) for the audit log's summary
    /// of its kind (see [`crate::refusals`]): bounded, however many come.
    pub fn log_refusal(&self, who: (&str, &str), kind: RefusalKind, query_id: &str, reason: &str) {
        self.log_refusal_on(who, "", kind, query_id, reason);
    }

    /// [`NodeState::log_refusal`] of a request that named `dataset` (only
    /// a served dataset is kept: summaries stay bounded).
    pub fn log_refusal_on(
        &self,
        who: (&str, &str),
        dataset: &str,
        kind: RefusalKind,
        query_id: &str,
        reason: &str,
    ) {
        tracing::info!(identity = %who.0, role = %who.1, kind = kind.name(), reason, "refused; nothing spent");
        let dataset = if self.datasets.contains_key(dataset) {
            dataset
        } else {
            ""
        };
        let r = Refused {
            who,
            dataset,
            kind,
            query_id,
            message: reason,
        };
        self.refusals.note(self.audit(), &r, now_ms());
    }

    /// Counts a certificate refused at the TLS handshake, without writing
    /// (the handshake must not wait on the log): the sweeper logs it.
    pub fn count_handshake_refusal(&self, r: &crate::tls::HandshakeRefusal) {
        let kind = if r.reason == "revoked" {
            RefusalKind::Revoked
        } else {
            RefusalKind::NotAllowed
        };
        let message = format!(
            "certificate refused at the handshake: {} (serial {})",
            r.reason, r.serial
        );
        self.refusals.count(
            &Refused {
                who: who_of(r),
                dataset: "",
                kind,
                query_id: "",
                message: &message,
            },
            now_ms(),
        );
    }

    /// Logs the refusal summaries whose window ended (all of them when
    /// `everything`, at shutdown).
    pub fn flush_refusals(&self, everything: bool) {
        self.refusals.flush(self.audit(), now_ms(), everything);
    }
}

/// The identity and role a refused certificate states.
fn who_of(r: &crate::tls::HandshakeRefusal) -> (&str, &str) {
    (&r.name, &r.role)
}

/// Opens the node's audit log, creating its key on first use.
pub fn open_audit(config: &NodeConfig, store: &Store) -> Result<AuditLog, StartError> {
    let key = AuditKey::load_or_create(
        &config.resolve(&config.audit.key),
        &config.resolve(&config.audit.public_key),
    )?;
    Ok(AuditLog::new(store.audit.clone(), key).with_fault(store.fault().clone()))
}

/// Per-analyst rate and concurrency limits, so that one analyst's flood
/// cannot starve the others: each analyst has a token bucket refilled at
/// `queries_per_minute` and at most `concurrent_queries` running at once.
#[derive(Default)]
pub struct Throttle {
    buckets: Mutex<HashMap<String, (f64, std::time::Instant)>>,
    running: Arc<Mutex<HashMap<String, u32>>>,
}

/// One running query of an analyst; dropping it frees the slot.
pub struct Slot {
    running: Arc<Mutex<HashMap<String, u32>>>,
    analyst: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = running.get_mut(&self.analyst) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                running.remove(&self.analyst);
            }
        }
    }
}

impl Throttle {
    /// Takes a token and a running slot for `analyst`, or says which limit
    /// was hit and when to come back.
    fn enter(
        &self,
        analyst: &str,
        limits: &crate::config::Limits,
    ) -> Result<Slot, (RefusalKind, String)> {
        {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            let n = running.entry(analyst.to_string()).or_insert(0);
            if *n >= limits.concurrent_queries {
                return Err((
                    RefusalKind::Concurrency,
                    format!(
                        "you already have {} queries running on this node (its limit); wait for one to finish",
                        limits.concurrent_queries
                    ),
                ));
            }
            *n += 1;
        }
        let slot = Slot {
            running: Arc::clone(&self.running),
            analyst: analyst.to_string(),
        };
        let per_minute = f64::from(limits.queries_per_minute);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let (tokens, last) = buckets
            .entry(analyst.to_string())
            .or_insert((per_minute, now));
        *tokens =
            (*tokens + now.duration_since(*last).as_secs_f64() * per_minute / 60.0).min(per_minute);
        *last = now;
        if *tokens < 1.0 {
            // Rounded up to a tenth of a second, so never "retry in 0.0 s".
            let wait = ((1.0 - *tokens) * 600.0 / per_minute).ceil().max(1.0) / 10.0;
            return Err((
                RefusalKind::RateLimit,
                format!(
                    "rate limit: this node accepts {} queries per minute from you; retry in {wait:.1} s",
                    limits.queries_per_minute
                ),
            ));
        }
        *tokens -= 1.0;
        Ok(slot)
    }
}

/// The gRPC service.
#[derive(Clone)]
pub struct NodeService {
    state: Arc<NodeState>,
}

impl NodeService {
    /// A service over `state`.
    pub fn new(state: Arc<NodeState>) -> NodeService {
        NodeService { state }
    }
}

/// The verified caller of a request, or UNAUTHENTICATED.
fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        Status::unauthenticated("a client certificate issued by the federation CA is required")
    })?;
    let leaf = certs.first().ok_or_else(|| {
        Status::unauthenticated("a client certificate issued by the federation CA is required")
    })?;
    caller_from_der(leaf.as_ref())
        .ok_or_else(|| Status::unauthenticated("the client certificate has no subject common name"))
}

/// Checks that the caller is an analyst this node lets in (certificate role
/// and the `[access]` list). A refusal is logged and spends nothing.
fn require_analyst(state: &NodeState, c: &Caller) -> Result<(), Status> {
    let refusal = if c.role != "analyst" {
        format!(
            "certificate {:?} has role {:?}; queries need an analyst certificate",
            c.name, c.role
        )
    } else if let Err(why) = state.config.access.allows(&c.name, None) {
        why
    } else {
        return Ok(());
    };
    state.log_refusal((&c.name, &c.role), RefusalKind::NotAllowed, "", &refusal);
    Err(Status::permission_denied(refusal))
}

/// Whether a [`Budget`] states the (epsilon, delta) equivalent of a zCDP
/// analyst's total (a pure total is its own equivalent, always stated).
#[derive(Clone, Copy, PartialEq)]
enum SpentEquivalent {
    /// The Budget RPC and dry runs: converted here (OpenDP's conversion).
    Stated,
    /// Answers: left 0, for the reader to compute from `spent_by_analyst`
    /// and the answer's `cost_delta`. A new total each query is never
    /// remembered, so converting it was most of a zCDP query's extra CPU
    /// (BENCHMARKS.md, zCDP cost).
    LeftToReader,
}

fn budget_proto(
    analyst: &str,
    dataset: &DatasetConfig,
    s: BudgetState,
    equivalent: SpentEquivalent,
) -> Budget {
    let b = &dataset.budget;
    let (spent_epsilon, spent_delta) =
        if b.measure == Measure::Zcdp && equivalent == SpentEquivalent::LeftToReader {
            (0.0, 0.0)
        } else {
            b.measure
                .equivalent(s.spent_by_analyst, b.equivalence_delta())
                .unwrap_or((f64::INFINITY, b.equivalence_delta()))
        };
    Budget {
        analyst: analyst.to_string(),
        dataset: dataset.name.clone(),
        spent_by_analyst: s.spent_by_analyst,
        remaining_for_analyst: s.remaining_for_analyst,
        remaining_for_dataset: s.remaining_for_dataset,
        per_query_max: b.per_query_max,
        measure: b.measure.name().into(),
        spent_epsilon,
        spent_delta,
    }
}

/// What a query asked for: pure epsilon (discrete Laplace) or zCDP rho
/// (discrete Gaussian). [`validate_request`] guarantees exactly one.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Asked {
    Epsilon(f64),
    Rho(f64),
}

impl Asked {
    fn of(q: &QueryRequest) -> Asked {
        if q.rho > 0.0 {
            Asked::Rho(q.rho)
        } else {
            Asked::Epsilon(q.epsilon)
        }
    }

    /// The noise of one of `m` measurements, the cost split evenly.
    /// `l1` and `l2` are the measurement's sensitivities per privacy unit.
    fn noise(self, l1: i64, l2: i64, m: usize) -> Result<Noise, String> {
        match self {
            Asked::Epsilon(e) => Noise::for_epsilon(l1, e / m as f64),
            Asked::Rho(r) => Noise::for_rho(l2, r / m as f64),
        }
        .map_err(String::from)
    }

    /// What the query costs in the dataset's measure: an epsilon on a pure
    /// ledger, a rho on a zCDP ledger (an epsilon query costing
    /// `epsilon^2 / 2`, OpenDP's exact pure-to-zCDP conversion). A rho
    /// query on a pure ledger is refused: zCDP does not imply pure DP.
    fn cost(self, dataset: &str, measure: Measure) -> Result<f64, String> {
        match (self, measure) {
            (Asked::Epsilon(e), Measure::Pure) => Ok(e),
            (Asked::Rho(r), Measure::Zcdp) => Ok(r),
            (Asked::Epsilon(e), Measure::Zcdp) => accounting::pure_to_zcdp(e).map_err(String::from),
            (Asked::Rho(_), Measure::Pure) => Err(format!(
                "dataset {dataset:?} accounts its budget in pure epsilon-DP on this node, and a rho (zCDP) cost cannot be converted to pure DP; ask with epsilon (fedq query --epsilon) instead"
            )),
        }
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "internal error");
    Status::internal("the node hit an internal error; nothing was released (see the node's log)")
}

/// A number for a message: short even when huge (`1e308`, not 309 digits).
fn num(x: f64) -> String {
    Decimal::from_f64(x).map_or_else(|| x.to_string(), |d| d.to_string())
}

/// Checks a query id, before it is used or logged anywhere.
fn validate_query_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > MAX_QUERY_ID || !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(Status::invalid_argument(format!(
            "query_id must be 1 to {MAX_QUERY_ID} printable ASCII characters without spaces"
        )));
    }
    Ok(())
}

/// Checks the request fields that do not need the schema: every field a
/// log entry could hold is checked here, before anything is logged.
fn validate_request(q: &QueryRequest, max_sql: usize) -> Result<(), Status> {
    validate_query_id(&q.query_id)?;
    if q.sql.len() > max_sql {
        return Err(Status::invalid_argument(format!(
            "the SQL text is {} bytes, more than this node's limit of {max_sql}",
            q.sql.len()
        )));
    }
    for (name, v, min, example) in [
        ("epsilon", q.epsilon, MIN_EPSILON, "0.5"),
        ("rho", q.rho, MIN_RHO, "0.05"),
    ] {
        if v.is_nan() {
            return Err(Status::invalid_argument(format!(
                "{name} is NaN; give a positive number such as {example}"
            )));
        }
        if v.is_infinite() {
            return Err(Status::invalid_argument(format!("{name} is infinite, which would release exact values; give a positive finite number such as {example}")));
        }
        if v > 0.0 && v < min {
            return Err(Status::invalid_argument(format!(
                "{name} {} is below this node's minimum of {min}: the answer would be pure noise; ask for more",
                num(v)
            )));
        }
        if v < 0.0 {
            return Err(Status::invalid_argument(format!(
                "{name} must be greater than 0 (got {}); give a positive number such as {example}",
                num(v)
            )));
        }
    }
    match (q.epsilon > 0.0, q.rho > 0.0) {
        (true, true) => Err(Status::invalid_argument(format!(
            "give either epsilon (pure DP, discrete Laplace noise) or rho (zCDP, discrete Gaussian noise), not both (got epsilon {} and rho {})",
            num(q.epsilon), num(q.rho)
        ))),
        (false, false) => Err(Status::invalid_argument(
            "epsilon must be greater than 0 (got 0); give a positive epsilon such as 0.5, or a positive rho such as 0.05 for zCDP",
        )),
        _ => Ok(()),
    }
}

/// The response skeleton: everything but the noisy values and the budget.
fn describe_release(
    node: &str,
    q: &QueryRequest,
    ds: &Dataset,
    plan: &Plan,
) -> Result<QueryResponse, Status> {
    let m = plan.measurements.len();
    let asked = Asked::of(q);
    let budget = &ds.config.budget;
    let cost = asked
        .cost(&plan.dataset, budget.measure)
        .map_err(Status::invalid_argument)?;
    let (cost_epsilon, cost_delta) = budget
        .measure
        .equivalent(cost, budget.equivalence_delta())
        .map_err(internal)?;
    let (what, total, per) = match asked {
        Asked::Epsilon(e) => ("epsilon", e, e / m as f64),
        Asked::Rho(r) => ("rho", r, r / m as f64),
    };
    let mut measurements = Vec::with_capacity(m);
    for (i, spec) in plan.measurements.iter().enumerate() {
        let (bins, bin_edges) = match spec {
            plan::MeasurementSpec::Histogram { min, max, bins, .. } => {
                (*bins, fedq_dp::distribution::bin_edges(*min, *max, *bins))
            }
            _ => (1, Vec::new()),
        };
        // Per privacy unit: the per-record sensitivities times the
        // contribution bound (1, or the person bound).
        let l1 = plan.sensitivity(i);
        let l2 = spec
            .l2_sensitivity()
            .saturating_mul(plan.contribution_bound);
        let noise = asked.noise(l1, l2, m).map_err(Status::invalid_argument)?;
        let ci = noise
            .half_width(mechanism::CI_ALPHA)
            .ok()
            .filter(|c| c.is_finite() && noise.variance().is_finite());
        let Some(ci) = ci else {
            // Either end can make the accuracy incomputable: a scale so
            // large it overflows, or so small OpenDP's bounds fail.
            let why = if noise.scale() < 1.0 {
                format!("so large that the noise of {} is too small for its accuracy to be computed; ask for a smaller {what}", spec.label(&ds.schema))
            } else {
                format!(
                    "so small that the noise of {} would be unbounded; ask for a larger {what}",
                    spec.label(&ds.schema)
                )
            };
            return Err(Status::invalid_argument(format!(
                "{what} {} is {why}",
                num(total)
            )));
        };
        let gaussian = matches!(asked, Asked::Rho(_));
        measurements.push(Measurement {
            label: spec.label(&ds.schema),
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
    let mut split = if m == 1 {
        format!("all of {what} {total} to {}", measurements[0].label)
    } else {
        format!(
            "{what} {total} split evenly over {m} measurements ({}): {per} each; cells of a GROUP BY are disjoint, so each measurement covers all cells (parallel composition)",
            measurements.iter().map(|x| x.label.as_str()).collect::<Vec<_>>().join(", ")
        )
    };
    let mut cost_delta = cost_delta;
    let released_keys = match plan.open_key {
        None => None,
        Some(column) => {
            let delta = budget.keys_delta.ok_or_else(|| {
                internal("an open-domain column without budget.keys_delta passed validation")
            })?;
            let noise = Noise::reported(&measurements[0].mechanism, measurements[0].scale)
                .ok_or_else(|| internal("unknown mechanism"))?;
            let threshold = noise
                .key_threshold(plan.contribution_bound, delta)
                .map_err(Status::invalid_argument)?;
            let name = ds.schema.columns[column].name();
            cost_delta += delta;
            split.push_str(&format!(
                "; {name} has an open domain: only keys whose noisy count is at least {threshold} are released (OpenDP threshold mechanism, delta {delta:e} spent on the released-key budget)"
            ));
            Some(ReleasedKeys {
                column: name.to_string(),
                threshold,
                delta,
                note: format!(
                    "keys of {name} whose noisy count fell below {threshold} are withheld; such keys may exist, and neither which nor how many is said (that would depend on the data); to estimate how many records they hold, compare the released counts with SELECT COUNT(*)"
                ),
            })
        }
    };
    if let (Asked::Epsilon(e), Measure::Zcdp) = (asked, budget.measure) {
        split.push_str(&format!(
            "; the dataset accounts in zCDP, where epsilon {e} (pure DP) costs rho = epsilon^2/2 = {cost}"
        ));
    }
    Ok(QueryResponse {
        query_id: q.query_id.clone(),
        node_name: node.to_string(),
        dataset: plan.dataset.clone(),
        group_by: plan.group_names(&ds.schema),
        // Open-domain keys are known only once released.
        cells: if plan.open_key.is_some() {
            Vec::new()
        } else {
            cell_keys(plan, &ds.schema)
                .into_iter()
                .map(|values| CellKey { values })
                .collect()
        },
        outputs,
        measurements,
        budget: None,
        replayed: false,
        dry_run: q.dry_run,
        epsilon_split: split,
        audit_head: None,
        measure: budget.measure.name().into(),
        cost,
        cost_epsilon,
        cost_delta,
        released_keys,
        request_sha256: hex::encode(query_digest(q)),
        participant_set: String::new(),
        // Stated for dry runs too, so a coordinator can show what secure
        // aggregation would give.
        min_honest: ds
            .config
            .secure_aggregation
            .as_ref()
            .map_or(0, |s| s.min_honest),
    })
}

/// Removes an in-flight marker when the computation ends, however it ends.
struct InFlight<'a> {
    set: &'a Mutex<HashSet<(String, String)>>,
    key: (String, String),
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// Marks `(analyst, query id)` as being computed, or refuses a concurrent
/// duplicate (which could otherwise release twice under one debit).
fn enter<'a>(state: &'a NodeState, analyst: &str, query_id: &str) -> Result<InFlight<'a>, Status> {
    let key = (analyst.to_string(), query_id.to_string());
    let mut set = state.in_flight.lock().unwrap_or_else(|p| p.into_inner());
    if !set.insert(key.clone()) {
        drop(set);
        let why = format!(
            "query id {query_id:?} is being answered right now; retry it in a moment to get the same release"
        );
        state.log_refusal((analyst, "analyst"), RefusalKind::InFlight, query_id, &why);
        return Err(Status::aborted(why));
    }
    Ok(InFlight {
        set: &state.in_flight,
        key,
    })
}

/// A ledger refusal as a gRPC status, logged.
/// A ledger call's failure as the caller's status: a refusal as
/// [`refusal_status`] says it (logged with `receipt`), a store failure as
/// an internal error.
fn ledger_status(
    state: &NodeState,
    receipt: Option<&Receipt>,
    who: (&str, &str),
    query_id: &str,
    e: LedgerError,
) -> Status {
    match e {
        LedgerError::Refused(r) => refusal_status(state, receipt, who, query_id, r),
        LedgerError::Store(e) => internal(format!("{e:#}")),
    }
}

fn refusal_status(
    state: &NodeState,
    receipt: Option<&Receipt>,
    (analyst, dataset): (&str, &str),
    query_id: &str,
    refusal: fedq_ledger::ledger::Refusal,
) -> Status {
    use fedq_ledger::ledger::Refusal;
    let (kind, status) = match refusal {
        Refusal::IdReused(_) | Refusal::ReplayExpired { .. } => (
            RefusalKind::IdReused,
            Status::already_exists(refusal.to_string()),
        ),
        Refusal::Reserved(_) | Refusal::NoReservation(_) => (
            RefusalKind::Reservation,
            Status::failed_precondition(refusal.to_string()),
        ),
        _ => (
            RefusalKind::Budget,
            Status::resource_exhausted(format!("{refusal}; nothing was released or spent")),
        ),
    };
    if let Some(r) = receipt {
        r.refused();
    }
    state.log_refusal_on(
        (analyst, "analyst"),
        dataset,
        kind,
        query_id,
        status.message(),
    );
    status
}

/// Where a query's time goes on the node, logged at debug level under the
/// target `fedq_node::timing` (`RUST_LOG=fedq_node::timing=debug`) for the
/// benchmarks. It records durations only, never a value (DESIGN invariant 2).
/// Off by default: the scan's duration grows with the number of matching
/// rows, so this log is for the node's operator, never to be shipped off it.
struct StageClock {
    /// When the current stage began.
    last: std::time::Instant,
    /// Finished stages: name and microseconds.
    stages: Vec<(&'static str, u128)>,
}

impl StageClock {
    /// A clock whose first stage began at `since`; only built when the
    /// timing log is on, so queries pay nothing otherwise.
    fn start(since: std::time::Instant) -> Option<StageClock> {
        tracing::enabled!(target: "fedq_node::timing", tracing::Level::DEBUG).then(|| StageClock {
            last: since,
            stages: Vec::with_capacity(8),
        })
    }

    /// Ends the current stage under `name` and starts the next.
    fn lap(clock: &mut Option<StageClock>, name: &'static str) {
        if let Some(c) = clock {
            let now = std::time::Instant::now();
            c.stages
                .push((name, now.duration_since(c.last).as_micros()));
            c.last = now;
        }
    }

    /// Records `took` under `name` as part of the current stage (work that
    /// ran alongside it), without ending the stage.
    fn note(clock: &mut Option<StageClock>, name: &'static str, took: std::time::Duration) {
        if let Some(c) = clock {
            c.stages.push((name, took.as_micros()));
        }
    }

    /// Logs the stages of `query_id`.
    fn log(clock: Option<StageClock>, query_id: &str) {
        if let Some(c) = clock {
            let stages: Vec<String> = c
                .stages
                .iter()
                .map(|(n, us)| format!("{n}={us}us"))
                .collect();
            tracing::debug!(target: "fedq_node::timing", query_id, stages = %stages.join(" "), "query stages");
        }
    }
}

/// One planned query on its way through the pipeline: the node, who asked
/// what, the plan, and the digest its debit and release are recorded
/// under.
#[derive(Clone, Copy)]
struct Planned<'a> {
    state: &'a NodeState,
    analyst: &'a str,
    q: &'a QueryRequest,
    plan: &'a Plan,
    digest: [u8; 32],
}

impl Planned<'_> {
    /// The release the debit pays for, as the ledger records it.
    fn release_of(&self) -> ReleaseOf<'_> {
        ReleaseOf {
            analyst: self.analyst,
            dataset: &self.plan.dataset,
            query_id: &self.q.query_id,
            digest: self.digest,
            secure: None,
        }
    }
}

/// The blocking part of a one-phase query: debit, compute, add noise, record.
fn run_query(
    state: &NodeState,
    analyst: &str,
    q: &QueryRequest,
    plan: &Plan,
    response: QueryResponse,
    receipt: &Receipt,
    clock: &mut Option<StageClock>,
) -> Result<QueryResponse, Status> {
    let ds = &state.datasets[&plan.dataset];
    let _guard = enter(state, analyst, &q.query_id)?;
    let digest = query_digest(q);
    let p = Planned {
        state,
        analyst,
        q,
        plan,
        digest,
    };
    if let Source::Postgres(pg) = &ds.source {
        return run_on_database(p, pg, response, receipt);
    }
    // The exact aggregates are computed while the debit's flush is in
    // flight: only once the check and the debit are committed (a refused
    // query scans nothing), and handed back only once the debit is durable,
    // so noise is still drawn after it (DESIGN invariant 3). The exact
    // values never leave this function's callees before `release` adds
    // noise, so computing them early releases nothing.
    let pending = receipt.pending();
    let debit = Debit {
        analyst,
        dataset: &plan.dataset,
        query_id: &q.query_id,
        digest,
        amount: response.cost,
        keys_delta: response.released_keys.as_ref().map_or(0.0, |k| k.delta),
        limits: &ds.config.budget,
        received: pending.as_ref(),
    };
    let admission = state.ledger.admit_overlapping(&debit, || {
        let scan = std::time::Instant::now();
        (exact(ds, plan), scan.elapsed())
    });
    drop(pending);
    let admission = admission.map_err(|e| {
        ledger_status(
            state,
            Some(receipt),
            (analyst, &plan.dataset),
            &q.query_id,
            e,
        )
    })?;
    receipt.logged();
    StageClock::lap(clock, "debit_durable_and_exact");
    match admission {
        Computed::Replay(bytes) => replay(state, analyst, &q.query_id, &bytes),
        Computed::Debited(b, durable, (exact, scan)) => {
            StageClock::note(clock, "of_which_exact", scan);
            let exact = exact.map_err(|e| source_failed(state, &plan.dataset, &e))?;
            release(p, response, (b, durable), exact, clock, None)
        }
    }
}

/// A one-phase query on a database source: the debit is held as a
/// reservation while the database computes, so that a failure spends
/// nothing.
///
/// 1. `hold`: check and reserve the budget durably (logged `reserved`).
/// 2. Fetch the exact aggregates, bounded by the statement timeout.
/// 3. On a failure that says nothing about the rows (the database is
///    unreachable, its table does not match), give the reservation back
///    (logged `reservation_returned` with the kind of failure): nothing was
///    released. On a timeout or a failed statement, which can depend on the
///    rows, keep it spent ([`SourceError::data_dependent`]): a retry under
///    the same id resumes it.
/// 4. On success, commit the reservation (atomic with respect to the
///    expiry sweeper: exactly one of commit and expiry wins, under the
///    ledger's lock) and only then add noise and release.
///
/// A crash between 1 and 4 leaves a reservation that expires and returns
/// its budget (or, if the store is lost, budget is lost: never gained).
fn run_on_database(
    p: Planned<'_>,
    pg: &PgSource,
    response: QueryResponse,
    receipt: &Receipt,
) -> Result<QueryResponse, Status> {
    let Planned {
        state,
        analyst,
        q,
        plan,
        digest,
    } = p;
    let ds = &state.datasets[&plan.dataset];
    let expires = now_ms() + pg.hold_ms();
    let pending = receipt.pending();
    let debit = Debit {
        analyst,
        dataset: &plan.dataset,
        query_id: &q.query_id,
        digest,
        amount: response.cost,
        keys_delta: 0.0,
        limits: &ds.config.budget,
        received: pending.as_ref(),
    };
    let hold = Hold {
        sql: &q.sql,
        expires_ms: expires,
        request: (q.epsilon, q.rho),
    };
    let admission = state.ledger.hold(&debit, &hold);
    drop(pending);
    let admission = admission.map_err(|e| {
        ledger_status(
            state,
            Some(receipt),
            (analyst, &plan.dataset),
            &q.query_id,
            e,
        )
    })?;
    receipt.logged();
    match admission {
        Admission::Replay(bytes) => replay(state, analyst, &q.query_id, &bytes),
        // Debited before and never released (the node stopped after the
        // commit): the budget is spent for this id; a retry resumes it.
        Admission::Resume(b, durable) => {
            let exact = exact(ds, plan).map_err(|e| source_failed(state, &plan.dataset, &e))?;
            release(p, response, (b, durable), exact, &mut None, None)
        }
        Admission::Held(b) => {
            let exact = fetch_or_give_back(state, ds, plan, analyst, &q.query_id)?;
            match state.ledger.commit(analyst, &q.query_id, now_ms()) {
                // Committed, durably: the proof the noise step needs.
                Ok((Admission::Resume(_, durable), Some(_), _)) => {
                    release(p, response, (b, durable), exact, &mut None, None)
                }
                Err(LedgerError::Store(e)) => Err(internal(format!("{e:#}"))),
                _ => Err(held_too_long(state, &plan.dataset)),
            }
        }
        Admission::Debited(..) => Err(internal("a hold was debited without a reservation")),
    }
}

/// Exact aggregates of `plan` from the dataset's source. For a database,
/// this blocking task waits on the async fetch (bounded by the statement
/// timeout); OpenDP measurements stay in this task, as they are not `Send`.
/// Each measurement's values come wrapped in an [`Exact`], which the rest
/// of the pipeline can only hand to a mechanism.
fn exact(ds: &Dataset, plan: &Plan) -> Result<Vec<Exact>, SourceError> {
    if plan.open_key.is_some() {
        // Counted per key by `release` (config refuses open columns on
        // database sources).
        return Ok(Vec::new());
    }
    match &ds.source {
        Source::Embedded(table) => Ok(table.exact(plan)),
        Source::Postgres(pg) => tokio::runtime::Handle::current().block_on(pg.exact(plan)),
    }
}

/// Fetches the exact aggregates of a query whose budget is reserved; on
/// failure returns the reservation (nothing was released) and says why.
fn fetch_or_give_back(
    state: &NodeState,
    ds: &Dataset,
    plan: &Plan,
    analyst: &str,
    query_id: &str,
) -> Result<Vec<Exact>, Status> {
    exact(ds, plan).map_err(|e| {
        if e.data_dependent() {
            // The reservation becomes a debit (nothing released); a retry
            // under the same id resumes it without spending again.
            if let Err(le) = state.ledger.commit(analyst, query_id, now_ms()) {
                tracing::error!(error = %le, query_id, "cannot keep a reservation after a database failure; it will expire");
            }
            let status = source_failed(state, &plan.dataset, &e);
            return Status::new(
                status.code(),
                format!(
                    "{}; nothing was released, and the reserved budget stays spent, because whether a query times out or fails can depend on the data; retry with the same query id to try again without spending more",
                    status.message()
                ),
            );
        }
        let reason = format!(
            "database source failed: {}; nothing was released",
            e.public()
        );
        if let Err(le) = state.ledger.give_back(analyst, query_id, &reason, None) {
            tracing::error!(error = %le, query_id, "cannot return a reservation after a database failure; it will expire");
        }
        let mut status = source_failed(state, &plan.dataset, &e);
        status = Status::new(
            status.code(),
            format!("{}; the reserved budget was returned, nothing was spent", status.message()),
        );
        status
    })
}

/// A database source failure as a status for the analyst (the kind of
/// failure only) and a line in the operator's log (the redacted detail).
fn source_failed(state: &NodeState, dataset: &str, e: &SourceError) -> Status {
    tracing::warn!(dataset, error = %e.detail(), "database source failed");
    let msg = format!(
        "dataset {dataset:?} on node {}: {}",
        state.config.node.name,
        e.public()
    );
    match e {
        SourceError::Timeout => Status::deadline_exceeded(msg),
        SourceError::Unreachable(_) => Status::unavailable(msg),
        SourceError::Mismatch(_) | SourceError::Failed(_) => Status::failed_precondition(msg),
    }
}

/// The reservation expired while the database was computing: the sweeper
/// returned it, so nothing may be released.
fn held_too_long(state: &NodeState, dataset: &str) -> Status {
    tracing::warn!(
        dataset,
        "a database answer came after its reservation expired; discarded"
    );
    Status::deadline_exceeded(format!(
        "dataset {dataset:?} on node {}: its database answered too late; nothing was released or spent",
        state.config.node.name
    ))
}

/// Answers a retry from the stored release; nothing is spent.
fn replay(
    state: &NodeState,
    analyst: &str,
    query_id: &str,
    bytes: &[u8],
) -> Result<QueryResponse, Status> {
    let mut stored = QueryResponse::decode(bytes).map_err(internal)?;
    stored.replayed = true;
    state
        .audit()
        .append(Event::Replayed {
            analyst: analyst.into(),
            query_id: query_id.to_string(),
        })
        .map_err(internal)?;
    tracing::info!(
        analyst,
        query_id,
        "replayed a stored release; nothing spent"
    );
    Ok(stored)
}

/// Adds OpenDP noise to the exact aggregates and records the release.
/// Only called once the debit (or committed reservation) is durable: the
/// [`Durable`] proof says so, and recording the release consumes it.
fn release(
    p: Planned<'_>,
    mut response: QueryResponse,
    (budget, durable): (BudgetState, Durable),
    exact: Vec<Exact>,
    clock: &mut Option<StageClock>,
    secure: Option<&crate::secure::CheckedRound>,
) -> Result<QueryResponse, Status> {
    let Planned {
        state,
        analyst,
        q,
        plan,
        ..
    } = p;
    let ds = &state.datasets[&plan.dataset];
    if let Some(column) = plan.open_key {
        release_keys(
            ds,
            column,
            plan,
            state.config.limits.max_cells,
            &mut response,
        )
        .map_err(|e| noise_failed(&q.query_id, &e))?;
    }
    match secure {
        Some(round) => {
            crate::secure::mask_release(&state.config.node.name, round, &mut response, exact)
                .map_err(|e| noise_failed(&q.query_id, &e))?
        }
        None => {
            for (m, values) in response.measurements.iter_mut().zip(exact) {
                let noise = Noise::reported(&m.mechanism, m.scale)
                    .ok_or_else(|| internal(format!("unknown mechanism {}", m.mechanism)))?;
                m.values = noise
                    .release(&values)
                    .map_err(|e| noise_failed(&q.query_id, &e.to_string()))?;
            }
        }
    }
    StageClock::lap(clock, "noise");
    response.budget = Some(budget_proto(
        analyst,
        &ds.config,
        budget,
        SpentEquivalent::LeftToReader,
    ));
    let logged = response
        .measurements
        .iter()
        .map(|m| ReleasedMeasurement {
            label: m.label.clone(),
            mechanism: m.mechanism.clone(),
            scale: Decimal::from_f64(m.scale).unwrap_or_default(),
            epsilon: Decimal::from_f64(m.epsilon).unwrap_or_default(),
            values: m.values.len() as u64,
            rho: Decimal::from_f64(m.rho).unwrap_or_default(),
        })
        .collect();
    let of = ReleaseOf {
        secure: secure.map(|r| &r.logged),
        ..p.release_of()
    };
    state
        .ledger
        .record_release(durable, &of, logged, ds.source.audit_name(), &mut response)
        .map_err(internal)?;
    StageClock::lap(clock, "release_durable");
    tracing::info!(
        analyst,
        query_id = %q.query_id,
        dataset = %plan.dataset,
        epsilon = q.epsilon,
        rho = q.rho,
        cells = response.cells.len(),
        measurements = response.measurements.len(),
        "released"
    );
    Ok(response)
}

/// Noise failed after the debit: nothing was released, and a retry under
/// the same id resumes without a second debit.
fn noise_failed(query_id: &str, e: &str) -> Status {
    tracing::error!(query_id, error = %e, "noise failed after the debit");
    Status::internal(
        "adding noise failed; nothing was released; retry with the same query id to get a release without spending again",
    )
}

/// Releases the keys of an open-domain GROUP BY: counts the selected rows
/// per key, runs OpenDP's threshold mechanism (the noise and threshold
/// fixed in [`describe_release`]) and fills `response`'s cells with the
/// released keys, in label order (not storage order, which would say when
/// each key first arrived), and its one measurement with their noisy
/// counts. At most `max_keys` keys are returned, those with the largest
/// noisy counts (a choice made from the release alone: post-processing).
/// Only called once the debit is durable.
fn release_keys(
    ds: &Dataset,
    column: usize,
    plan: &Plan,
    max_keys: usize,
    response: &mut QueryResponse,
) -> Result<(), String> {
    let Source::Embedded(table) = &ds.source else {
        return Err("open-domain keys need an embedded dataset".into());
    };
    let threshold = response
        .released_keys
        .as_ref()
        .ok_or("no threshold was fixed")?
        .threshold;
    let m = response
        .measurements
        .first_mut()
        .ok_or("no measurement was planned")?;
    let noise = Noise::reported(&m.mechanism, m.scale).ok_or("unknown mechanism")?;
    let mut released: Vec<(u64, i64)> = noise
        .release_keys(&table.open_counts(plan), threshold)?
        .into_iter()
        .collect();
    if released.len() > max_keys {
        released.sort_unstable_by_key(|&(code, v)| (std::cmp::Reverse(v), code));
        released.truncate(max_keys);
        if let Some(k) = response.released_keys.as_mut() {
            k.note.push_str(&format!(
                "; more keys passed the threshold than this node's limit of {max_keys} released cells: only the {max_keys} with the largest noisy counts are shown"
            ));
        }
    }
    let mut rows: Vec<(String, i64)> = released
        .into_iter()
        .map(|(code, v)| {
            let label = table
                .open_label(column, code)
                .unwrap_or_else(|| format!("(unlabelled key {code:016x})"));
            (label, v)
        })
        .collect();
    rows.sort();
    response.cells = rows
        .iter()
        .map(|(k, _)| CellKey {
            values: vec![k.clone()],
        })
        .collect();
    m.values = rows.into_iter().map(|(_, v)| v).collect();
    Ok(())
}

/// A query's `query_received` audit entry, held so that it is logged in the
/// same commit as the query's first outcome: its debit or reservation (in
/// the ledger's write), its refusal or its replay. A separate commit for
/// the receipt cost a third of a query's log writes when those were sled
/// transactions (sled 0.34 writes its log buffer twice for each). The entry still
/// precedes its outcome's in the log, and every query is logged (DESIGN
/// invariant 7): a path that logs no outcome logs the receipt on its own,
/// at the latest when the receipt is dropped. A query that fails before
/// either (a crash) released and spent nothing.
struct Receipt<'a> {
    audit: &'a AuditLog,
    /// The entry, while not yet logged.
    event: std::cell::RefCell<Option<Event>>,
}

impl<'a> Receipt<'a> {
    fn new(audit: &'a AuditLog, event: Event) -> Receipt<'a> {
        Receipt {
            audit,
            event: std::cell::RefCell::new(Some(event)),
        }
    }

    /// The entry while not yet logged, for a ledger write to append first;
    /// call [`Receipt::logged`] once that write is committed.
    fn pending(&self) -> std::cell::Ref<'_, Option<Event>> {
        self.event.borrow()
    }

    /// The entry was logged (by a committed ledger write).
    fn logged(&self) {
        self.event.borrow_mut().take();
    }

    /// Logs the entry (if not yet logged), then `then`, in one commit.
    /// Best effort, as for refusals: a failure to log is itself logged.
    /// Logs the entry on its own, if not yet logged. Best effort: a
    /// failure to log is itself in the operator's log.
    fn log_now(&self) {
        let Some(event) = self.event.borrow_mut().take() else {
            return;
        };
        if let Err(e) = self.audit.append(event) {
            tracing::error!(error = %e, "cannot log a received query");
        }
    }

    /// The query was refused: its receipt is not logged (the refusal is
    /// counted in its summary instead, so refusals cannot flood the log).
    fn refused(&self) {
        self.event.borrow_mut().take();
    }
}

impl Drop for Receipt<'_> {
    fn drop(&mut self) {
        self.log_now();
    }
}

/// Everything before spending: validate the request, plan it and fix every
/// mechanism. Every field is checked before anything is logged; refusals
/// spend nothing and are counted in the refusal summaries; the returned
/// [`Receipt`] logs the accepted request with the query's outcome.
fn accept<'a>(
    state: &'a NodeState,
    who: &Caller,
    q: &QueryRequest,
) -> Result<(Plan, QueryResponse, Receipt<'a>), Status> {
    let refuse = |kind: RefusalKind, dataset: &str, s: Status| {
        state.log_refusal_on(
            (&who.name, &who.role),
            dataset,
            kind,
            &q.query_id,
            s.message(),
        );
        s
    };
    validate_request(q, state.config.limits.max_sql_bytes)
        .map_err(|s| refuse(RefusalKind::InvalidRequest, "", s))?;
    let parsed = plan::parse(&q.sql).map_err(|e| {
        refuse(
            RefusalKind::InvalidQuery,
            "",
            Status::invalid_argument(e.to_string()),
        )
    })?;
    let name = parsed.dataset().map_err(|e| {
        refuse(
            RefusalKind::InvalidQuery,
            "",
            Status::invalid_argument(e.to_string()),
        )
    })?;
    let ds = state.datasets.get(&name).ok_or_else(|| {
        let mut known: Vec<&str> = state.datasets.keys().map(String::as_str).collect();
        known.sort();
        refuse(
            RefusalKind::UnknownDataset,
            "",
            Status::not_found(format!(
                "dataset {} is not served by node {}; it serves: {}",
                quoted_prefix(&name),
                state.config.node.name,
                known.join(", ")
            )),
        )
    })?;
    state
        .config
        .access
        .allows(&who.name, Some(&name))
        .map_err(|why| {
            refuse(
                RefusalKind::NotAllowed,
                &name,
                Status::permission_denied(why),
            )
        })?;
    let plan =
        plan::plan_parsed(&parsed, &ds.schema, state.config.limits.max_cells).map_err(|e| {
            refuse(
                RefusalKind::InvalidQuery,
                &name,
                Status::invalid_argument(e.to_string()),
            )
        })?;
    let budget = &ds.config.budget;
    let cost = Asked::of(q)
        .cost(&name, budget.measure)
        .map_err(|e| refuse(RefusalKind::Cost, &name, Status::invalid_argument(e)))?;
    let max = budget.per_query_max;
    if cost > max {
        let unit = budget.measure.unit();
        let converted = if q.rho == 0.0 && unit == "rho" {
            format!(
                " (epsilon {} costs rho {} on this zCDP dataset)",
                num(q.epsilon),
                num(cost)
            )
        } else {
            String::new()
        };
        return Err(refuse(
            RefusalKind::Cost,
            &name,
            Status::invalid_argument(format!(
                "{unit} {}{converted} is above node {}'s per-query maximum of {} for dataset {name:?}; ask for at most {}",
                num(cost),
                state.config.node.name,
                num(max),
                num(max)
            )),
        ));
    }
    let response = describe_release(&state.config.node.name, q, ds, &plan)
        .map_err(|s| refuse(RefusalKind::Cost, &name, s))?;
    // Only now, with every field checked (the costs are finite, the id and
    // the SQL within their limits), is the request logged.
    let receipt = Receipt::new(
        state.audit(),
        Event::QueryReceived {
            analyst: who.name.clone(),
            query_id: q.query_id.clone(),
            dataset: name,
            sql: q.sql.clone(),
            epsilon: Decimal::from_f64(q.epsilon).unwrap_or_default(),
            dry_run: q.dry_run,
            rho: Decimal::from_f64(q.rho).unwrap_or_default(),
        },
    );
    Ok((plan, response, receipt))
}

/// A name from a request, quoted for a message, cut to 64 characters (an
/// 8 kB name is not echoed back whole).
fn quoted_prefix(name: &str) -> String {
    if name.chars().count() <= 64 {
        format!("{name:?}")
    } else {
        let cut: String = name.chars().take(64).collect();
        format!("{cut:?}... ({} bytes)", name.len())
    }
}

/// For a Commit on a database source: fetches the exact aggregates while
/// the budget is still only reserved, so that a database failure returns
/// the reservation (nothing released, nothing spent) instead of leaving a
/// debited query to resume. `None` when there is no live reservation or the
/// dataset is embedded (computed after the commit, as always).
fn prefetch_for_commit(
    state: &NodeState,
    analyst: &str,
    query_id: &str,
) -> Result<Option<Vec<Exact>>, Status> {
    let Some(r) = state
        .ledger
        .reservation(analyst, query_id, now_ms())
        .map_err(internal)?
    else {
        return Ok(None);
    };
    let Some(ds) = state.datasets.get(&r.dataset) else {
        return Ok(None);
    };
    if !matches!(ds.source, Source::Postgres(_)) {
        return Ok(None);
    }
    let plan = plan::plan(&r.sql, &ds.schema, state.config.limits.max_cells)
        .map_err(|e| internal(e.to_string()))?;
    fetch_or_give_back(state, ds, &plan, analyst, query_id).map(Some)
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn describe(
        &self,
        _req: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        let mut names: Vec<&String> = self.state.datasets.keys().collect();
        names.sort();
        let datasets = names
            .into_iter()
            .map(|n| {
                let d = &self.state.datasets[n];
                DatasetSchema {
                    name: n.clone(),
                    description: d.config.description.clone(),
                    columns: d.schema.to_proto(),
                    privacy_unit: d.config.privacy_unit_text(),
                    measure: d.config.budget.measure.name().into(),
                    delta: d.config.budget.equivalence_delta(),
                    standard: d.config.followed().map(|f| fedq_proto::v1::DataStandard {
                        name: f.name.clone(),
                        version: f.version.to_string(),
                        digest: f.digest.clone(),
                    }),
                    lookups: d.schema.lookups.iter().map(|t| t.to_proto()).collect(),
                }
            })
            .collect();
        Ok(Response::new(DescribeResponse {
            node_name: self.state.config.node.name.clone(),
            software_version: env!("CARGO_PKG_VERSION").into(),
            api_version: fedq_proto::API_VERSION,
            capabilities: CAPABILITIES.iter().map(|s| s.to_string()).collect(),
            datasets,
            audit_public_key: self.state.audit().key.public_hex(),
            audit_head: self
                .state
                .audit()
                .head()
                .map_err(internal)?
                .map(|h| h.to_proto()),
        }))
    }

    type ExportAuditStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<AuditLine, Status>> + Send>>;

    async fn export_audit(
        &self,
        req: Request<ExportAuditRequest>,
    ) -> Result<Response<Self::ExportAuditStream>, Status> {
        let who = caller(&req)?;
        let allowed = who.role == "auditor" && self.state.config.audit.auditors.contains(&who.name);
        if !allowed {
            self.state.log_refusal(
                (&who.name, &who.role),
                RefusalKind::NotAnAuditor,
                "",
                "audit export refused: not a configured auditor",
            );
            return Err(Status::permission_denied(format!(
                "certificate {:?} (role {:?}) may not export the audit log; the node's [audit] auditors list must name it and its certificate must have role auditor",
                who.name, who.role
            )));
        }
        let since = req.into_inner().since_seq;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let state = Arc::clone(&self.state);
        tokio::task::spawn_blocking(move || {
            // Only durable entries leave the node: an entry exported before
            // it reached the disk (a replay's, a dry run's receipt) could be
            // lost in a crash and its sequence number reused, and the
            // auditor holding the export would see history rewritten.
            // The head is read first: entries appended during the flush
            // are left for the next export.
            let durable = match state.audit().head() {
                Ok(head) => head.map_or(0, |h| h.seq + 1),
                Err(e) => {
                    let _ = tx.blocking_send(Err(internal(e)));
                    return;
                }
            };
            if let Err(e) = state.audit().tree.flush() {
                let _ = tx.blocking_send(Err(internal(e)));
                return;
            }
            let count = usize::try_from(durable.saturating_sub(since)).unwrap_or(usize::MAX);
            // The stored bytes, as written: an export verifies bit for bit.
            for line in state.audit().lines(since).take(count) {
                let item = line.map(|json| AuditLine { json }).map_err(internal);
                if tx.blocking_send(item).is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn query(&self, req: Request<QueryRequest>) -> Result<Response<QueryResponse>, Status> {
        let received = std::time::Instant::now();
        let who = caller(&req)?;
        require_analyst(&self.state, &who)?;
        let q = req.into_inner();
        let slot = self.state.slot(&who.name)?;
        let answer = self
            .state
            .within_deadline(slot, move |state| {
                let mut clock = StageClock::start(received);
                StageClock::lap(&mut clock, "queued");
                let (plan, mut response, receipt) = accept(state, &who, &q)?;
                StageClock::lap(&mut clock, "accept");
                if q.dry_run {
                    receipt.log_now();
                    let ds = &state.datasets[&plan.dataset];
                    let b = state
                        .ledger
                        .state(&who.name, &plan.dataset, &ds.config.budget)
                        .map_err(internal)?;
                    response.budget = Some(budget_proto(
                        &who.name,
                        &ds.config,
                        b,
                        SpentEquivalent::Stated,
                    ));
                    return Ok(response);
                }
                let answer = run_query(state, &who.name, &q, &plan, response, &receipt, &mut clock);
                StageClock::log(clock, &q.query_id);
                answer
            })
            .await?;
        Ok(Response::new(answer))
    }

    async fn prepare(
        &self,
        req: Request<PrepareRequest>,
    ) -> Result<Response<PrepareResponse>, Status> {
        let who = caller(&req)?;
        require_analyst(&self.state, &who)?;
        let PrepareRequest {
            query,
            hold_ms,
            secure_aggregation,
        } = req.into_inner();
        let invalid = |why: &str| {
            self.state
                .log_refusal((&who.name, &who.role), RefusalKind::InvalidRequest, "", why);
            Status::invalid_argument(why)
        };
        let q = query.ok_or_else(|| invalid("Prepare needs a query"))?;
        if q.dry_run {
            return Err(invalid(
                "a dry run spends nothing: send it with Query, not Prepare",
            ));
        }
        let slot = self.state.slot(&who.name)?;
        let answer = self
            .state
            .within_deadline(slot, move |state| {
                let (plan, planned, receipt) = accept(state, &who, &q)?;
                receipt.log_now();
                if plan.open_key.is_some() {
                    let why = "a GROUP BY over an open-domain column cannot be prepared in two phases yet: each node releases its own keys; run it without --min-nodes; nothing was spent";
                    state.log_refusal((&who.name, &who.role), RefusalKind::Unsupported, &q.query_id, why);
                    return Err(Status::failed_precondition(why));
                }
                let ds = &state.datasets[&plan.dataset];
                // Secure aggregation is checked before anything is reserved.
                let secure = if secure_aggregation {
                    let refuse = |why: String| {
                        state.log_refusal((&who.name, &who.role), RefusalKind::Unsupported, &q.query_id, &why);
                        Status::failed_precondition(why)
                    };
                    let policy = ds.config.secure_aggregation.as_ref().ok_or_else(|| refuse(format!(
                        "dataset {} does not take part in secure aggregation (its node.toml has no [datasets.secure_aggregation]); ask without it; nothing was reserved",
                        plan.dataset
                    )))?;
                    if q.rho.is_nan() || q.rho <= 0.0 {
                        return Err(refuse("secure aggregation releases discrete Gaussian shares: ask in rho (zCDP), not epsilon; nothing was reserved".into()));
                    }
                    let identity = state.secagg.as_ref().ok_or_else(|| refuse(
                        "this node's certificate key cannot sign round keys (see its start log), so it cannot take part in secure aggregation; nothing was reserved".into()
                    ))?;
                    Some((policy, Arc::clone(identity)))
                } else {
                    None
                };
                let hold = hold_ms.clamp(1000, state.config.limits.max_reservation_ms);
                let expires = now_ms() + hold;
                let debit = Debit {
                    analyst: &who.name,
                    dataset: &plan.dataset,
                    query_id: &q.query_id,
                    digest: query_digest(&q),
                    amount: planned.cost,
                    keys_delta: 0.0,
                    limits: &ds.config.budget,
                    received: None,
                };
                let hold = Hold {
                    sql: &q.sql,
                    expires_ms: expires,
                    request: (q.epsilon, q.rho),
                };
                let outcome = state.ledger.reserve(&debit, &hold).map_err(|e| {
                    ledger_status(state, None, (&who.name, &plan.dataset), &q.query_id, e)
                })?;
                let b = state
                    .ledger
                    .state(&who.name, &plan.dataset, &ds.config.budget)
                    .map_err(internal)?;
                let expires_at_ms = match outcome {
                    fedq_ledger::ledger::ReserveOutcome::Reserved(_, e) => e,
                    fedq_ledger::ledger::ReserveOutcome::AlreadyReleased => 0,
                };
                let round_key = match secure {
                    Some((policy, identity)) => Some(state.rounds.open(
                        &identity,
                        crate::secure::Opening {
                            node: &state.config.node.name,
                            analyst: &who.name,
                            query_id: &q.query_id,
                            digest: query_digest(&q),
                            policy,
                            expires_ms: expires_at_ms.max(expires),
                        },
                        now_ms(),
                    )?),
                    None => None,
                };
                Ok::<_, Status>(PrepareResponse {
                    query_id: q.query_id.clone(),
                    epsilon_reserved: q.epsilon,
                    rho_reserved: q.rho,
                    round_key,
                    expires_at_ms,
                    budget: Some(budget_proto(
                        &who.name,
                        &ds.config,
                        b,
                        SpentEquivalent::LeftToReader,
                    )),
                })
            })
            .await?;
        Ok(Response::new(answer))
    }

    async fn commit(&self, req: Request<CommitRequest>) -> Result<Response<QueryResponse>, Status> {
        let who = caller(&req)?;
        require_analyst(&self.state, &who)?;
        let CommitRequest {
            query_id,
            participants,
        } = req.into_inner();
        validate_query_id(&query_id).inspect_err(|s| {
            self.state.log_refusal(
                (&who.name, &who.role),
                RefusalKind::InvalidRequest,
                "",
                s.message(),
            );
        })?;
        let slot = self.state.slot(&who.name)?;
        let answer = self
            .state
            .within_deadline(slot, move |state| {
                let _guard = enter(state, &who.name, &query_id)?;
                // A secure round's participant set is checked before the
                // reservation is debited.
                let node = &state.config.node.name;
                let secure = match (&state.secagg, participants.is_empty()) {
                    (_, true) if state.rounds.is_open(&who.name, &query_id) => {
                        return Err(Status::invalid_argument(format!(
                            "query id {query_id:?} was prepared for secure aggregation: commit it with its participant set (or cancel it); nothing was released"
                        )))
                    }
                    (_, true) => None,
                    (None, false) => {
                        return Err(Status::failed_precondition(
                            "this node cannot take part in secure aggregation; nothing was released",
                        ))
                    }
                    (Some(identity), false) => Some(
                        state
                            .rounds
                            .check_commit(identity, node, &who.name, &query_id, &participants)
                            .inspect_err(|s| {
                                state.log_refusal(
                                    (&who.name, &who.role),
                                    RefusalKind::InvalidRequest,
                                    &query_id,
                                    s.message(),
                                )
                            })?,
                    ),
                };
                let prefetched = prefetch_for_commit(state, &who.name, &query_id)?;
                let (admission, reservation, digest) = state
                    .ledger
                    .commit(&who.name, &query_id, now_ms())
                    .map_err(|e| ledger_status(state, None, (&who.name, ""), &query_id, e))?;
                let durable = match admission {
                    Admission::Replay(bytes) => {
                        // One participant set per query id: a second sum
                        // over the same shares would reveal their difference.
                        let stored = QueryResponse::decode(bytes.as_slice()).map_err(internal)?;
                        let asked = secure.as_ref().map(|r| r.logged.participant_set.as_str()).unwrap_or("");
                        if stored.participant_set != asked {
                            return Err(Status::failed_precondition(format!(
                                "query id {query_id:?} was answered for another participant set; a release is given to one set only (a second sum would reveal the difference); nothing was released"
                            )));
                        }
                        return replay(state, &who.name, &query_id, &bytes);
                    }
                    Admission::Resume(_, durable) => durable,
                    Admission::Debited(..) | Admission::Held(_) => {
                        return Err(internal("a commit neither replayed nor resumed"))
                    }
                };
                let r = reservation.ok_or_else(|| {
                    Status::failed_precondition(format!(
                    "query id {query_id:?} was debited by a one-phase query; retry it with Query"
                ))
                })?;
                let q = QueryRequest {
                    query_id: query_id.clone(),
                    sql: r.sql.clone(),
                    epsilon: r.epsilon,
                    dry_run: false,
                    rho: r.rho,
                };
                let ds = state.datasets.get(&r.dataset).ok_or_else(|| {
                    internal(format!(
                        "reserved dataset {} is no longer served",
                        r.dataset
                    ))
                })?;
                let plan = plan::plan(&q.sql, &ds.schema, state.config.limits.max_cells)
                    .map_err(|e| internal(e.to_string()))?;
                let response = describe_release(&state.config.node.name, &q, ds, &plan)?;
                let b = state
                    .ledger
                    .state(&who.name, &plan.dataset, &ds.config.budget)
                    .map_err(internal)?;
                let exact = match prefetched {
                    Some(exact) => exact,
                    None => {
                        exact(ds, &plan).map_err(|e| source_failed(state, &plan.dataset, &e))?
                    }
                };
                let p = Planned {
                    state,
                    analyst: &who.name,
                    q: &q,
                    plan: &plan,
                    digest,
                };
                release(p, response, (b, durable), exact, &mut None, secure.as_ref())
            })
            .await?;
        Ok(Response::new(answer))
    }

    async fn cancel(
        &self,
        req: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let who = caller(&req)?;
        require_analyst(&self.state, &who)?;
        let query_id = req.into_inner().query_id;
        validate_query_id(&query_id).inspect_err(|s| {
            self.state.log_refusal(
                (&who.name, &who.role),
                RefusalKind::InvalidRequest,
                "",
                s.message(),
            );
        })?;
        let state = Arc::clone(&self.state);
        let returned = tokio::task::spawn_blocking(move || {
            state
                .ledger
                .give_back(&who.name, &query_id, "cancelled", None)
        })
        .await
        .map_err(internal)?
        .map_err(internal)?;
        Ok(Response::new(CancelResponse {
            query_id: String::new(),
            epsilon_returned: returned,
        }))
    }

    async fn budget(
        &self,
        req: Request<BudgetRequest>,
    ) -> Result<Response<BudgetResponse>, Status> {
        let who = caller(&req)?;
        require_analyst(&self.state, &who)?;
        let mut budgets = Vec::new();
        let mut names: Vec<&String> = self
            .state
            .datasets
            .keys()
            .filter(|n| {
                self.state
                    .config
                    .access
                    .allows(&who.name, Some(n.as_str()))
                    .is_ok()
            })
            .collect();
        names.sort();
        for n in names {
            let d = &self.state.datasets[n];
            let s = self
                .state
                .ledger
                .state(&who.name, n, &d.config.budget)
                .map_err(internal)?;
            budgets.push(budget_proto(
                &who.name,
                &d.config,
                s,
                SpentEquivalent::Stated,
            ));
        }
        Ok(Response::new(BudgetResponse {
            node_name: self.state.config.node.name.clone(),
            budgets,
        }))
    }
}
