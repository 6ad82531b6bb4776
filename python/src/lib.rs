//! `fedq._native`: the coordinator library ([`fedq`]) for Python.
//!
//! The Python package `fedq` (`python/fedq/__init__.py`) is a thin layer
//! of DataFrames and exceptions over this module; everything a result
//! depends on runs here, in the same Rust code as the `fedq` command:
//! planning the query against the nodes' schemas, fanning out over mutual
//! TLS, checking every answer, combining the noisy answers and their
//! intervals, post-processing ([`fedq::query::ask`]), `--target-ci`
//! ([`fedq::query::epsilon_for_target`]), and the budget and schema
//! listings ([`fedq::output`]).
//!
//! Every method returns one JSON document, an envelope that is either
//! `{"ok": ...}` or `{"error": {"kind", "message", "nodes"}}`: the Python
//! layer turns the first into DataFrames and the second into its
//! exceptions (`kind` names the exception, `nodes` lists each node with
//! what it said, in federation order), so the exception classes are
//! ordinary Python classes that researchers can catch and inspect.

use std::path::Path;
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use serde_json::{json, Value};

use fedq::client::{new_query_id, Calls, Federation};
use fedq::output::{render_budgets, render_plan, render_schemas, Format};
use fedq::query::{ask, epsilon_for_target, QueryError};
use fedq::run::{QueryOptions, RunError};

/// A failure the Python layer raises as an exception of class `kind`.
struct Raised {
    /// `input` (a bad argument), `query` (the query is wrong: nothing was
    /// sent), `no_answer` (every node refused or was unreachable),
    /// `quorum` (fewer than `min_nodes` accepted: nothing was spent),
    /// `federation` (the federation could not be asked at all).
    kind: &'static str,
    /// The whole message, as `fedq query` prints it.
    message: String,
    /// Node name to what it said, when nodes were asked.
    nodes: Vec<(String, String)>,
}

impl Raised {
    fn new(kind: &'static str, message: impl Into<String>) -> Raised {
        Raised {
            kind,
            message: message.into(),
            nodes: Vec::new(),
        }
    }
}

/// The JSON envelope of a result.
fn envelope(result: Result<Value, Raised>) -> String {
    match result {
        Ok(v) => json!({ "ok": v }).to_string(),
        Err(r) => json!({
            "error": {
                "kind": r.kind,
                "message": r.message,
                // Pairs, in federation order (a JSON object would sort them).
                "nodes": r.nodes.into_iter().map(|(n, m)| json!([n, m])).collect::<Vec<Value>>(),
            }
        })
        .to_string(),
    }
}

/// Turns rendered JSON (from [`fedq::output`]) back into a value.
fn parsed(text: Result<String, fedq::error::OutputError>) -> Result<Value, Raised> {
    let text = text.map_err(|e| Raised::new("federation", format!("{e:#}")))?;
    serde_json::from_str(&text).map_err(|e| Raised::new("federation", e.to_string()))
}

/// The arguments of one query, as Python passed them.
struct Ask {
    sql: String,
    epsilon: Option<f64>,
    rho: Option<f64>,
    dry_run: bool,
    target_ci: Option<f64>,
    min_nodes: Option<usize>,
    timeout: Option<f64>,
    retries: u32,
    query_id: Option<String>,
    secure: bool,
}

/// A positive, finite amount named `name`, or the input error saying so.
fn positive(name: &str, v: f64, example: &str) -> Result<f64, Raised> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(Raised::new(
            "input",
            format!("{name} must be a positive, finite number such as {example} (got {v})"),
        ))
    }
}

/// A federation to query from Python: `federation.toml` loaded once (its
/// certificates read, its channels made lazily) and the async runtime the
/// calls run on.
#[pyclass(module = "fedq._native", name = "Federation", frozen)]
struct NativeFederation {
    /// The coordinator's federation: nodes, TLS identity, defaults.
    fed: Federation,
    /// The calls' runtime; Python's lock is released while they run.
    runtime: tokio::runtime::Runtime,
}

impl NativeFederation {
    /// One query, steps as `fedq query` takes them (arguments checked
    /// first, `target_ci` turned into an epsilon by a dry run).
    async fn run_query(&self, a: Ask) -> Result<Value, Raised> {
        let fed = &self.fed;
        let timeout = match a.timeout {
            Some(t) => Duration::try_from_secs_f64(positive("timeout", t, "30")?)
                .map_err(|_| Raised::new("input", format!("timeout {t} seconds is too long")))?,
            None => fed.default_timeout(),
        };
        let calls = Calls {
            timeout,
            retries: a.retries,
        };
        let nodes = fed.config.nodes.len();
        if a.min_nodes.is_some_and(|n| n == 0 || n > nodes) {
            return Err(Raised::new(
                "input",
                format!("min_nodes must be between 1 and the {nodes} nodes of the federation"),
            ));
        }
        let mut target = Value::Null;
        let (epsilon, rho) = match (a.epsilon, a.rho, a.target_ci) {
            (Some(e), None, None) => (positive("epsilon", e, "0.5")?, 0.0),
            (None, Some(r), None) => (0.0, positive("rho", r, "0.05")?),
            (None, None, Some(w)) => {
                let w = positive("target_ci", w, "25")?;
                let choice = epsilon_for_target(fed, &a.sql, w, calls)
                    .await
                    .map_err(|e| Raised::new("query", format!("{e:#}")))?;
                target = json!({
                    "target_ci": w,
                    "epsilon": choice.epsilon,
                    "expected_half_width": choice.half_width,
                    "nodes": choice.nodes,
                });
                (choice.epsilon, 0.0)
            }
            (None, None, None) => {
                return Err(Raised::new(
                    "input",
                    "give epsilon= (pure DP), rho= (zCDP) or target_ci= (the smallest epsilon whose expected 95% interval is that narrow)",
                ))
            }
            _ => {
                return Err(Raised::new(
                    "input",
                    "give only one of epsilon=, rho= and target_ci=",
                ))
            }
        };
        let opts = QueryOptions {
            secure: a.secure || self.fed.config.defaults.secure,
            epsilon,
            rho,
            dry_run: a.dry_run,
            calls,
            min_nodes: a.min_nodes,
            query_id: a.query_id.unwrap_or_else(new_query_id),
        };
        let answer = ask(fed, &a.sql, &opts).await.map_err(|e| match e {
            QueryError::Sql(why) => Raised::new("query", why),
            QueryError::Run(RunError::Query(why)) => Raised::new(
                "query",
                format!("{why}; nothing was sent to any node, nothing was spent"),
            ),
            QueryError::Run(RunError::Quorum(q)) => Raised {
                kind: "quorum",
                message: q.to_string(),
                nodes: q
                    .outcomes
                    .iter()
                    .map(|o| {
                        let said = match &o.result {
                            Ok(()) => "accepted (reservation cancelled)".to_string(),
                            Err(f) => f.to_string(),
                        };
                        (o.node.clone(), said)
                    })
                    .collect(),
            },
        })?;
        let failures: Vec<(String, String)> = answer
            .combined
            .nodes
            .iter()
            .filter_map(|n| n.failure.as_ref().map(|f| (n.node.clone(), f.to_string())))
            .collect();
        if answer.answered() == 0 {
            let lines: Vec<String> = failures.iter().map(|(n, f)| format!("{n}: {f}")).collect();
            return Err(Raised {
                kind: "no_answer",
                message: format!("no node answered:\n  {}", lines.join("\n  ")),
                nodes: failures,
            });
        }
        let plan = if a.dry_run {
            parsed(render_plan(&answer.sent, &answer.outcomes, Format::Json))?
        } else {
            Value::Null
        };
        let mut warnings = answer.audit_notes.clone();
        warnings.extend(answer.audit_warning.clone());
        Ok(json!({
            "sql": a.sql,
            "sent": answer.sent,
            "target": target,
            "combined": answer.combined,
            "plan": plan,
            "failures": failures.into_iter().map(|(n, m)| json!([n, m])).collect::<Vec<Value>>(),
            "warnings": warnings,
        }))
    }
}

#[pymethods]
impl NativeFederation {
    /// Loads `federation.toml` (paths in it are relative to its folder).
    #[new]
    fn new(path: &str) -> PyResult<Self> {
        let fed = Federation::load(Path::new(path))
            .map_err(|e| PyValueError::new_err(format!("{e:#}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| PyValueError::new_err(format!("cannot start the async runtime: {e}")))?;
        Ok(NativeFederation { fed, runtime })
    }

    /// The nodes of the federation file, in its order, as JSON
    /// (`[{"name", "endpoint"}]`).
    fn nodes(&self) -> String {
        let nodes: Vec<Value> = self
            .fed
            .config
            .nodes
            .iter()
            .map(|n| json!({"name": n.name, "endpoint": n.endpoint}))
            .collect();
        envelope(Ok(Value::Array(nodes)))
    }

    /// Runs one query; see the Python `Federation.query` for the arguments.
    #[pyo3(signature = (sql, epsilon=None, rho=None, dry_run=false, target_ci=None, min_nodes=None, timeout=None, retries=2, query_id=None, secure=false))]
    #[allow(clippy::too_many_arguments)]
    fn query(
        &self,
        py: Python<'_>,
        sql: String,
        epsilon: Option<f64>,
        rho: Option<f64>,
        dry_run: bool,
        target_ci: Option<f64>,
        min_nodes: Option<usize>,
        timeout: Option<f64>,
        retries: u32,
        query_id: Option<String>,
        secure: bool,
    ) -> String {
        let a = Ask {
            secure,
            sql,
            epsilon,
            rho,
            dry_run,
            target_ci,
            min_nodes,
            timeout,
            retries,
            query_id,
        };
        py.detach(|| envelope(self.runtime.block_on(self.run_query(a))))
    }

    /// Your budget on every node, as `fedq budget --output json` prints it.
    fn budget(&self, py: Python<'_>) -> String {
        py.detach(|| {
            let outcomes = self
                .runtime
                .block_on(self.fed.budget(self.fed.default_timeout()));
            envelope(parsed(render_budgets(&outcomes, Format::Json)))
        })
    }

    /// Every node's datasets and columns, as `fedq schema --output json`
    /// prints them.
    fn schema(&self, py: Python<'_>) -> String {
        py.detach(|| {
            let outcomes = self
                .runtime
                .block_on(self.fed.describe(self.fed.default_timeout()));
            envelope(parsed(render_schemas(&outcomes, Format::Json)))
        })
    }
}

/// The module `fedq._native`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeFederation>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
