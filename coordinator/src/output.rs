//! Rendering results for people (tables) and scripts (JSON, CSV).

use crate::error::OutputError;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, Table};
use fedq_proto::v1::{column_schema::Kind, BudgetResponse, DescribeResponse};

use crate::client::Outcome;
use crate::combine::{Combined, Estimate};

/// Output formats of `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A readable table.
    Table,
    /// One JSON document.
    Json,
    /// CSV with a header line.
    Csv,
}

fn number(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    if (v - v.round()).abs() < 1e-9 && v.abs() < 1e15 {
        let s = format!("{}", v.round() as i64);
        // Thousands separators for readability.
        let (sign, digits) = s.strip_prefix('-').map(|d| ("-", d)).unwrap_or(("", &s));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else {
        format!("{v:.2}")
    }
}

/// An (epsilon, delta) equivalent's epsilon, to four significant digits.
fn equivalent_epsilon(e: f64) -> String {
    if e == 0.0 || !e.is_finite() {
        format!("{e}")
    } else {
        let digits = (3 - e.abs().log10().floor() as i32).max(0) as usize;
        format!("{e:.digits$}")
    }
}

fn interval(e: &Estimate) -> String {
    format!("[{}, {}]", number(e.ci_low), number(e.ci_high))
}

/// The text a CSV writer holds.
/// A number in CSV: as Rust prints it, and an empty field where it is
/// not finite (an average over a noisy count at or below zero), as JSON
/// writes `null` and the table `n/a`; never `NaN`, which spreadsheets and
/// CSV readers take as a number.
fn csv_number(v: f64) -> String {
    if v.is_finite() {
        v.to_string()
    } else {
        String::new()
    }
}

fn csv_text(w: csv::Writer<Vec<u8>>) -> Result<String, OutputError> {
    let bytes = w
        .into_inner()
        .map_err(|e| OutputError::Other(format!("cannot finish the CSV: {e}")))?;
    String::from_utf8(bytes).map_err(|e| OutputError::Other(format!("the CSV is not UTF-8: {e}")))
}

/// Renders a combined result.
pub fn render(c: &Combined, format: Format) -> Result<String, OutputError> {
    render_with(c, format, false)
}

/// A bar of `width` cells for `v` out of `max` (eighth-block resolution).
fn bar(v: f64, max: f64, width: usize) -> String {
    if !(v > 0.0 && max > 0.0) {
        return String::new();
    }
    const EIGHTHS: [char; 8] = ['▏', '▎', '▍', '▌', '▋', '▊', '▉', '█'];
    let eighths = ((v / max).min(1.0) * (width * 8) as f64).round() as usize;
    let mut s = "█".repeat(eighths / 8);
    if !eighths.is_multiple_of(8) {
        s.push(EIGHTHS[eighths % 8 - 1]);
    }
    s
}

/// Checks that every interval about to be shown is one the coordinator
/// can stand behind: both ends finite and `low <= high`. The answers were
/// checked against the coordinator's plan ([`crate::verify`]) and the
/// combination computes intervals from the plan's scales, so this never
/// fails; if it does (a bug, or an answer the checks missed), nothing is
/// printed and `fedq` exits with an error rather than show a result whose
/// uncertainty is meaningless.
pub fn check_intervals(c: &Combined) -> Result<(), OutputError> {
    for r in &c.rows {
        for (e, label) in r.estimates.iter().zip(&c.outputs) {
            let Some(e) = e else { continue };
            if !(e.ci_low.is_finite() && e.ci_high.is_finite() && e.ci_low <= e.ci_high) {
                return Err(OutputError::Other(format!(
                    "refusing to show the result: the 95% interval of {label} for {:?} is [{}, {}], which is not a valid interval (please report this)",
                    r.key,
                    e.ci_low,
                    e.ci_high
                )));
            }
        }
    }
    Ok(())
}

/// Renders a combined result; with `bars`, a GROUP BY table gets a small
/// bar chart of its first aggregate (for terminals). Refuses a result
/// holding an invalid interval ([`check_intervals`]).
pub fn render_with(c: &Combined, format: Format, bars: bool) -> Result<String, OutputError> {
    check_intervals(c)?;
    match format {
        Format::Json => Ok(serde_json::to_string_pretty(c)? + "\n"),
        Format::Csv => {
            let mut w = csv::Writer::from_writer(Vec::new());
            let mut header: Vec<String> = c.group_by.clone();
            for o in &c.outputs {
                header.push(o.clone());
                header.push(format!("{o} ci95_low"));
                header.push(format!("{o} ci95_high"));
            }
            header.push("nodes".into());
            w.write_record(&header)?;
            for r in &c.rows {
                let mut rec = r.key.clone();
                for e in &r.estimates {
                    match e {
                        Some(e) => rec.extend([e.value, e.ci_low, e.ci_high].map(csv_number)),
                        None => rec.extend(["", "", ""].map(String::from)),
                    }
                }
                rec.push(r.nodes.join(" "));
                w.write_record(&rec)?;
            }
            csv_text(w)
        }
        Format::Table => {
            let mut out = String::new();
            let answered = c.nodes.iter().filter(|n| n.failure.is_none()).count();
            let asked = if c.rho > 0.0 {
                format!("rho {} per node", c.rho)
            } else {
                format!("epsilon {} per node", c.epsilon)
            };
            let mechanisms = if c.mechanisms.is_empty() {
                String::new()
            } else {
                format!(" ({})", c.mechanisms.join(", "))
            };
            out.push_str(&format!(
                "{}\n{} · dataset {} · {asked}{mechanisms} · {answered}/{} nodes answered{}\n",
                c.sql,
                if c.dry_run {
                    "DRY RUN (nothing spent)"
                } else {
                    "result"
                },
                c.dataset,
                c.nodes.len(),
                if answered == 0 {
                    " · NO NODE ANSWERED (no result)"
                } else if c.partial {
                    " · PARTIAL RESULT"
                } else {
                    ""
                }
            ));
            if !c.rows.is_empty() && !c.dry_run {
                let mut t = Table::new();
                t.load_preset(UTF8_FULL_CONDENSED);
                let mut header: Vec<String> = c.group_by.clone();
                for o in &c.outputs {
                    header.push(o.clone());
                    header.push("95% CI".into());
                }
                header.push("nodes".into());
                let bars = bars && !c.group_by.is_empty();
                let max = c
                    .rows
                    .iter()
                    .filter_map(|r| r.estimates.first().copied().flatten())
                    .map(|e| e.value)
                    .fold(0.0f64, f64::max);
                if bars {
                    header.push(String::new());
                }
                t.set_header(header);
                for r in &c.rows {
                    let mut cells: Vec<Cell> = r.key.iter().map(Cell::new).collect();
                    for e in &r.estimates {
                        match e {
                            Some(e) => {
                                cells.push(
                                    Cell::new(number(e.value)).set_alignment(CellAlignment::Right),
                                );
                                cells.push(Cell::new(interval(e)));
                            }
                            None => {
                                cells.push(Cell::new("n/a"));
                                cells.push(Cell::new(""));
                            }
                        }
                    }
                    cells.push(
                        Cell::new(r.nodes.len().to_string()).set_alignment(CellAlignment::Right),
                    );
                    if bars {
                        let v = r
                            .estimates
                            .first()
                            .copied()
                            .flatten()
                            .map_or(0.0, |e| e.value);
                        cells.push(Cell::new(bar(v, max, 20)));
                    }
                    t.add_row(cells);
                }
                out.push_str(&t.to_string());
                out.push('\n');
            }
            out.push_str("nodes:\n");
            for n in &c.nodes {
                let unit = if n.measure.as_deref() == Some("zcdp") {
                    "rho"
                } else {
                    "epsilon"
                };
                match &n.failure {
                    None => out.push_str(&format!(
                        "  {:<18} {:<20} {:>7.1} ms  {}remaining {unit}: {} (you), {} (dataset){}\n",
                        n.node,
                        n.status,
                        n.elapsed_ms,
                        n.cost
                            .map(|k| format!(
                                "{} {unit} {} = ({}, {})-DP · ",
                                if c.dry_run { "would cost" } else { "cost" },
                                k.amount,
                                equivalent_epsilon(k.epsilon),
                                k.delta
                            ))
                            .unwrap_or_default(),
                        n.remaining_for_analyst
                            .map(|v| format!("{v:.3}"))
                            .unwrap_or_else(|| "?".into()),
                        n.remaining_for_dataset
                            .map(|v| format!("{v:.3}"))
                            .unwrap_or_else(|| "?".into()),
                        n.spent_equivalent
                            .map(|(e, d)| format!(
                                " · you have spent ({}, {d})-DP there",
                                equivalent_epsilon(e)
                            ))
                            .unwrap_or_default(),
                    )),
                    Some(f) => out.push_str(&format!("  {:<18} {f}\n", n.node)),
                }
            }
            if let Some(split) = c.nodes.iter().find_map(|n| n.epsilon_split.clone()) {
                out.push_str(&format!("epsilon split: {split}\n"));
            }
            if let Some(p) = &c.post_processing {
                out.push_str(&format!("post-processing: {p}\n"));
            }
            if let Some(k) = &c.released_keys {
                let thresholds: Vec<String> = k
                    .thresholds
                    .iter()
                    .map(|(n, t, d)| format!("{n} >= {t} (delta {d:e})"))
                    .collect();
                out.push_str(&format!(
                    "released keys: {}\n  thresholds: {}\n",
                    k.note,
                    thresholds.join(", ")
                ));
            }
            Ok(out)
        }
    }
}

/// Renders the nodes' schemas.
pub fn render_schemas(
    outcomes: &[Outcome<DescribeResponse>],
    format: Format,
) -> Result<String, OutputError> {
    if format == Format::Json {
        let v: Vec<serde_json::Value> = outcomes
            .iter()
            .map(|o| match &o.result {
                Ok(d) => serde_json::json!({
                    "node": o.node,
                    "software_version": d.software_version,
                    "api_version": d.api_version,
                    "capabilities": d.capabilities,
                    "datasets": d.datasets.iter().map(|ds| serde_json::json!({
                        "name": ds.name,
                        "description": ds.description,
                        "standard": ds.standard.as_ref().map(|s| serde_json::json!({"name": s.name, "version": s.version, "digest": s.digest})),
                        "privacy_unit": ds.privacy_unit,
                        "columns": ds.columns.iter().map(|c| {
                            let (ty, domain, bounds) = column_parts(c.kind.as_ref());
                            serde_json::json!({"name": c.name, "type": ty, "domain": domain, "bounds": bounds})
                        }).collect::<Vec<_>>(),
                        "lookups": ds.lookups.iter().map(|t| serde_json::json!({
                            "name": t.name, "key": t.key, "value": t.value,
                            "rows": t.rows.iter().map(|r| serde_json::json!({"value": r.value, "keys": r.keys})).collect::<Vec<_>>(),
                        })).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                }),
                Err(f) => serde_json::json!({"node": o.node, "error": f.to_string()}),
            })
            .collect();
        return Ok(serde_json::to_string_pretty(&v)? + "\n");
    }
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut out = String::new();
    if format == Format::Csv {
        w.write_record(["node", "dataset", "column", "type", "domain", "min", "max"])?;
    }
    for o in outcomes {
        match &o.result {
            Err(f) => {
                if format == Format::Table {
                    out.push_str(&format!("node {}: {f}\n\n", o.node));
                }
            }
            Ok(d) => {
                if format == Format::Table {
                    out.push_str(&format!(
                        "node {} (fedq-node {}, API v{})\n",
                        d.node_name, d.software_version, d.api_version
                    ));
                }
                for ds in &d.datasets {
                    let mut t = Table::new();
                    t.load_preset(UTF8_FULL_CONDENSED);
                    t.set_header(["column", "type", "public domain / bounds"]);
                    for c in &ds.columns {
                        let (ty, domain, bounds) = column_parts(c.kind.as_ref());
                        let shown = match (&domain, bounds) {
                            (Some(d), _) => d.join(", "),
                            (None, Some((a, b))) => format!("{a} .. {b}"),
                            _ => "0, 1".into(),
                        };
                        if format == Format::Csv {
                            let (lo, hi) = bounds
                                .map(|(a, b)| (a.to_string(), b.to_string()))
                                .unwrap_or_default();
                            w.write_record([
                                o.node.as_str(),
                                ds.name.as_str(),
                                c.name.as_str(),
                                ty,
                                domain.map(|d| d.join("|")).unwrap_or_default().as_str(),
                                lo.as_str(),
                                hi.as_str(),
                            ])?;
                        }
                        t.add_row(vec![c.name.clone(), ty.to_string(), shown]);
                    }
                    if format == Format::Table {
                        out.push_str(&format!(
                            "dataset {} (privacy unit: one {}){}{}\n{t}\n",
                            ds.name,
                            ds.privacy_unit,
                            ds.standard
                                .as_ref()
                                .map(|s| format!(
                                    ", standard {} {} (digest {})",
                                    s.name, s.version, s.digest
                                ))
                                .unwrap_or_default(),
                            if ds.description.is_empty() {
                                String::new()
                            } else {
                                format!(": {}", ds.description)
                            }
                        ));
                        // Its public lookup tables, joinable by key.
                        for l in &ds.lookups {
                            let keys: usize = l.rows.iter().map(|r| r.keys.len()).sum();
                            let values: Vec<&str> =
                                l.rows.iter().map(|r| r.value.as_str()).collect();
                            out.push_str(&format!(
                                "lookup table {} (JOIN {} x ON x.{} = column; x.{}): {keys} keys, values {}\n",
                                l.name,
                                l.name,
                                l.key,
                                l.value,
                                values.join(", ")
                            ));
                        }
                    }
                }
                if format == Format::Table {
                    out.push('\n');
                }
            }
        }
    }
    if format == Format::Csv {
        return csv_text(w);
    }
    Ok(out)
}

/// Renders `fedq schema --diff`: per dataset served by several nodes, the
/// rows (the standard, the privacy unit, each column) they do not all
/// declare the same, one column of the table per node; `-` where a node
/// does not declare the column. JSON: `[{"dataset", "column", "nodes":
/// [[node, declaration or null], ...]}]`.
pub fn render_schema_diff(
    outcomes: &[Outcome<DescribeResponse>],
    format: Format,
) -> Result<String, OutputError> {
    let diffs = crate::standard::differences(outcomes);
    match format {
        Format::Json => Ok(serde_json::to_string_pretty(&diffs)? + "\n"),
        Format::Csv => {
            let mut w = csv::Writer::from_writer(Vec::new());
            w.write_record(["dataset", "column", "node", "declaration"])?;
            for d in &diffs {
                for (n, v) in &d.nodes {
                    w.write_record([
                        d.dataset.as_str(),
                        d.column.as_str(),
                        n.as_str(),
                        v.as_deref().unwrap_or(""),
                    ])?;
                }
            }
            csv_text(w)
        }
        Format::Table => {
            let mut out = String::new();
            for o in outcomes {
                if let Err(f) = &o.result {
                    out.push_str(&format!("node {}: {f} (not compared)\n", o.node));
                }
            }
            if diffs.is_empty() {
                out.push_str(
                    "every dataset served by several nodes is declared the same on each of them\n",
                );
                return Ok(out);
            }
            let mut datasets: Vec<&str> = diffs.iter().map(|d| d.dataset.as_str()).collect();
            datasets.dedup();
            for ds in datasets {
                let rows: Vec<&crate::standard::Difference> =
                    diffs.iter().filter(|d| d.dataset == ds).collect();
                let mut t = Table::new();
                t.load_preset(UTF8_FULL_CONDENSED);
                let mut header = vec!["column".to_string()];
                header.extend(rows[0].nodes.iter().map(|(n, _)| n.clone()));
                t.set_header(header);
                for d in &rows {
                    let mut row = vec![d.column.clone()];
                    row.extend(
                        d.nodes
                            .iter()
                            .map(|(_, v)| v.clone().unwrap_or_else(|| "-".to_string())),
                    );
                    t.add_row(row);
                }
                out.push_str(&format!(
                    "dataset {ds}: {} difference(s) between the nodes serving it\n{t}\n",
                    rows.len()
                ));
            }
            Ok(out)
        }
    }
}

/// A column's type name, categorical domain and integer bounds.
type ColumnParts = (&'static str, Option<Vec<String>>, Option<(i64, i64)>);

fn column_parts(kind: Option<&Kind>) -> ColumnParts {
    match kind {
        Some(Kind::Categorical(c)) if c.open => (
            "categorical (open)",
            Some(vec![
                "open domain: GROUP BY releases only keys above a threshold".into(),
            ]),
            None,
        ),
        Some(Kind::Categorical(c)) => ("categorical", Some(c.domain.clone()), None),
        Some(Kind::Integer(i)) => ("integer", None, Some((i.min, i.max))),
        Some(Kind::Boolean(_)) => ("boolean", None, None),
        None => ("unknown", None, None),
    }
}

/// Renders the caller's budgets. JSON is one object per node and dataset
/// with snake_case keys and numbers as JSON numbers (`spent_by_you`,
/// `remaining_for_you`, `remaining_for_dataset`, `per_query_max`, in the
/// ledger's `measure`: epsilon for `pure`, rho for `zcdp`; `spent_epsilon`
/// and `spent_delta`, the (epsilon, delta)-DP equivalent of what you spent),
/// or `{"node", "error"}` for a node that did not answer.
pub fn render_budgets(
    outcomes: &[Outcome<BudgetResponse>],
    format: Format,
) -> Result<String, OutputError> {
    if format == Format::Json {
        let mut v: Vec<serde_json::Value> = Vec::new();
        for o in outcomes {
            match &o.result {
                Ok(b) => v.extend(b.budgets.iter().map(|x| {
                    serde_json::json!({
                        "node": o.node,
                        "dataset": x.dataset,
                        "measure": if x.measure.is_empty() { "pure" } else { x.measure.as_str() },
                        "spent_by_you": x.spent_by_analyst,
                        "remaining_for_you": x.remaining_for_analyst,
                        "remaining_for_dataset": x.remaining_for_dataset,
                        "per_query_max": x.per_query_max,
                        "spent_epsilon": x.spent_epsilon,
                        "spent_delta": x.spent_delta,
                    })
                })),
                Err(f) => v.push(serde_json::json!({"node": o.node, "error": f.to_string()})),
            }
        }
        return Ok(serde_json::to_string_pretty(&v)? + "\n");
    }
    let mut rows: Vec<[String; 6]> = Vec::new();
    for o in outcomes {
        match &o.result {
            Ok(b) => {
                for x in &b.budgets {
                    // zCDP ledgers count rho; say so, with the (epsilon,
                    // delta) equivalent of what was spent.
                    let (unit, spent_eq) = if x.measure == "zcdp" {
                        (
                            " rho",
                            format!(
                                " = ({}, {})-DP",
                                equivalent_epsilon(x.spent_epsilon),
                                x.spent_delta
                            ),
                        )
                    } else {
                        ("", String::new())
                    };
                    rows.push([
                        o.node.clone(),
                        x.dataset.clone(),
                        format!("{:.4}{unit}{spent_eq}", x.spent_by_analyst),
                        format!("{:.4}{unit}", x.remaining_for_analyst),
                        format!("{:.4}{unit}", x.remaining_for_dataset),
                        format!("{}{unit}", x.per_query_max),
                    ]);
                }
            }
            Err(f) => rows.push([
                o.node.clone(),
                format!("({f})"),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]),
        }
    }
    let header = [
        "node",
        "dataset",
        "spent by you",
        "remaining for you",
        "remaining (dataset)",
        "per-query max",
    ];
    render_rows(&header, &rows, format)
}

/// Renders a dry run: per node and combined, the cost, mechanism, scale and
/// expected 95% interval half-width of every measurement. Nothing in it
/// depends on data.
pub fn render_plan(
    sql: &str,
    outcomes: &[Outcome<fedq_proto::v1::QueryResponse>],
    format: Format,
) -> Result<String, OutputError> {
    let answered: Vec<&fedq_proto::v1::QueryResponse> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().ok())
        .collect();
    let labels: Vec<String> = answered
        .first()
        .map(|r| r.measurements.iter().map(|m| m.label.clone()).collect())
        .unwrap_or_default();
    // (label, node, epsilon or rho, mechanism, scale, half-width)
    let mut rows: Vec<(String, String, f64, String, f64, f64)> = Vec::new();
    for label in &labels {
        let mut noises = Vec::new();
        for r in &answered {
            if let Some(m) = r.measurements.iter().find(|m| &m.label == label) {
                rows.push((
                    label.clone(),
                    r.node_name.clone(),
                    m.epsilon + m.rho,
                    m.mechanism.clone(),
                    m.scale,
                    m.ci95_half_width,
                ));
                noises.push(fedq_dp::mechanism::Noise::reported(&m.mechanism, m.scale));
            }
        }
        let count = noises.len();
        let combined = noises
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .map_or(f64::INFINITY, |n| {
                crate::combine::noise_sum_half_width(&n, crate::combine::ALPHA)
            });
        rows.push((
            label.clone(),
            format!("combined ({count} nodes)"),
            f64::NAN,
            String::new(),
            f64::NAN,
            combined,
        ));
        // What secure aggregation would give, when every node offers it:
        // each adds a share of one release's noise.
        if let Some(secure) = crate::secure::dry_run_half_width(&answered, label) {
            rows.push((
                label.clone(),
                format!("combined, --secure ({count} nodes)"),
                f64::NAN,
                String::new(),
                f64::NAN,
                secure,
            ));
        }
    }
    let cells = answered.first().map_or(0, |r| r.cells.len());
    match format {
        Format::Json => {
            let v = serde_json::json!({
                "sql": sql,
                "dry_run": true,
                "cells": cells,
                "measurements": rows.iter().map(|(l, n, e, m, sc, hw)| serde_json::json!({
                    "measurement": l, "node": n,
                    "epsilon": (e.is_finite() && m != "discrete_gaussian").then_some(*e),
                    "rho": (e.is_finite() && m == "discrete_gaussian").then_some(*e),
                    "mechanism": (!m.is_empty()).then_some(m),
                    "scale": sc.is_finite().then_some(*sc), "ci95_half_width": hw,
                })).collect::<Vec<_>>(),
                "nodes": outcomes.iter().map(|o| serde_json::json!({
                    "node": o.node,
                    "status": match &o.result { Ok(_) => "accepted".to_string(), Err(f) => f.to_string() },
                    "remaining_for_analyst": o.result.as_ref().ok().and_then(|r| r.budget.as_ref()).map(|b| b.remaining_for_analyst),
                })).collect::<Vec<_>>(),
            });
            Ok(serde_json::to_string_pretty(&v)? + "\n")
        }
        Format::Csv => {
            let mut w = csv::Writer::from_writer(Vec::new());
            w.write_record([
                "measurement",
                "node",
                "epsilon_or_rho",
                "mechanism",
                "scale",
                "ci95_half_width",
            ])?;
            for (l, n, e, m, sc, hw) in &rows {
                let num = |x: &f64| {
                    if x.is_finite() {
                        x.to_string()
                    } else {
                        String::new()
                    }
                };
                w.write_record([
                    l.clone(),
                    n.clone(),
                    num(e),
                    m.clone(),
                    num(sc),
                    hw.to_string(),
                ])?;
            }
            csv_text(w)
        }
        Format::Table => {
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            t.set_header([
                "measurement",
                "node",
                "epsilon / rho",
                "mechanism",
                "scale",
                "expected 95% CI",
            ]);
            for (l, n, e, m, sc, hw) in &rows {
                let num = |x: &f64| {
                    if x.is_finite() {
                        format!("{x:.4}")
                    } else {
                        String::new()
                    }
                };
                t.add_row(vec![
                    l.clone(),
                    n.clone(),
                    num(e),
                    m.clone(),
                    num(sc),
                    format!("± {}", number(hw.ceil())),
                ]);
            }
            let mut out = format!("{sql}\nDRY RUN: nothing was spent · {cells} cell(s) per measurement · the intervals depend only on the mechanism\n{t}\n");
            for o in outcomes {
                match &o.result {
                    Ok(r) => {
                        let left = r
                            .budget
                            .as_ref()
                            .map(|b| format!("{:.3}", b.remaining_for_analyst))
                            .unwrap_or_else(|| "?".into());
                        out.push_str(&format!(
                            "  {:<18} would accept · {}your remaining {} there: {left}\n",
                            o.node,
                            if r.measure.is_empty() {
                                String::new()
                            } else {
                                format!(
                                    "would cost {} {} = ({}, {})-DP · ",
                                    if r.measure == "zcdp" {
                                        "rho"
                                    } else {
                                        "epsilon"
                                    },
                                    r.cost,
                                    equivalent_epsilon(r.cost_epsilon),
                                    r.cost_delta
                                )
                            },
                            if r.measure == "zcdp" {
                                "rho"
                            } else {
                                "epsilon"
                            }
                        ));
                    }
                    Err(f) => out.push_str(&format!("  {:<18} {f}\n", o.node)),
                }
            }
            Ok(out)
        }
    }
}

/// Renders `fedq nodes`.
pub fn render_nodes(
    fed: &crate::client::Federation,
    outcomes: &[Outcome<DescribeResponse>],
    format: Format,
) -> Result<String, OutputError> {
    let rows: Vec<[String; 7]> = fed
        .config
        .nodes
        .iter()
        .zip(outcomes)
        .map(|(n, o)| match &o.result {
            Ok(d) => [
                n.name.clone(),
                n.endpoint.clone(),
                "reachable".into(),
                d.software_version.clone(),
                format!("v{}", d.api_version),
                d.capabilities.join(" "),
                format!("{:.1}", o.elapsed.as_secs_f64() * 1e3),
            ],
            Err(f) => [
                n.name.clone(),
                n.endpoint.clone(),
                f.to_string(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ],
        })
        .collect();
    let header = [
        "node",
        "endpoint",
        "status",
        "software",
        "api",
        "capabilities",
        "rtt_ms",
    ];
    render_rows(&header, &rows, format)
}

/// Renders string rows under `header` as a table, CSV, or JSON objects whose
/// keys are the header names with spaces as underscores.
fn render_rows<const N: usize>(
    header: &[&str; N],
    rows: &[[String; N]],
    format: Format,
) -> Result<String, OutputError> {
    match format {
        Format::Json => {
            let v: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| {
                    serde_json::Value::Object(
                        header
                            .iter()
                            .zip(r.iter())
                            .map(|(h, v)| {
                                (h.replace(' ', "_"), serde_json::Value::String(v.clone()))
                            })
                            .collect(),
                    )
                })
                .collect();
            Ok(serde_json::to_string_pretty(&v)? + "\n")
        }
        Format::Csv => {
            let mut w = csv::Writer::from_writer(Vec::new());
            w.write_record(header)?;
            for r in rows {
                w.write_record(r)?;
            }
            csv_text(w)
        }
        Format::Table => {
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            t.set_header(header.to_vec());
            for r in rows {
                t.add_row(r.to_vec());
            }
            Ok(format!("{t}\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::combine::{Combined, Estimate, Row};

    /// An estimate that is not a number (an average over a noisy count at
    /// or below zero) is an empty CSV field, `null` in JSON and `n/a` in
    /// the table: the three formats agree.
    #[test]
    fn a_value_that_is_not_a_number_is_empty_in_csv_null_in_json() {
        let nan = Estimate {
            value: f64::NAN,
            ci_low: 0.0,
            ci_high: 120.0,
        };
        let count = Estimate {
            value: -3.0,
            ci_low: -9.5,
            ci_high: 3.5,
        };
        let c = Combined {
            sql: "SELECT ageBroad, COUNT(*), AVG(traffickMonths) FROM cases GROUP BY ageBroad"
                .into(),
            query_id: "q".into(),
            epsilon: 1.0,
            rho: 0.0,
            mechanisms: Vec::new(),
            dataset: "cases".into(),
            group_by: vec!["ageBroad".into()],
            outputs: vec!["COUNT(*)".into(), "AVG(traffickMonths)".into()],
            rows: vec![Row {
                key: vec!["48+".into()],
                estimates: vec![Some(count), Some(nan)],
                nodes: vec!["a".into()],
            }],
            nodes: Vec::new(),
            partial: false,
            dry_run: false,
            released_keys: None,
            post_processing: None,
        };
        let csv_text = render(&c, Format::Csv).unwrap();
        let line = csv_text.lines().nth(1).unwrap();
        assert_eq!(line, "48+,-3,-9.5,3.5,,0,120,a", "{csv_text}");
        let json: serde_json::Value =
            serde_json::from_str(&render(&c, Format::Json).unwrap()).unwrap();
        assert!(json["rows"][0]["estimates"][1]["value"].is_null(), "{json}");
        let table = render(&c, Format::Table).unwrap();
        assert!(table.contains("n/a"), "{table}");
    }
}
