//! From SQL text to a typed, validated query plan.
//!
//! The SQL subset is parsed with `sqlparser` and then validated against the
//! dataset's declared schema. Everything the privacy analysis needs is fixed
//! here, before any data is touched: which measurements are released, their
//! sensitivities (from declared bounds only), and the cells (the declared
//! domain cross product of the GROUP BY columns).
//!
//! Errors name the unsupported or invalid part and depend only on the query
//! and the schema, never on the data (DESIGN invariant 2).

//! The modules, in the order a query goes through them:
//!
//! - `parse`: the text to one plain SELECT, with the limits that keep
//!   any query's parse and walk shallow ([`MAX_OPERATORS`], [`MAX_NESTING`]).
//! - `joins`: a JOIN to a public lookup table rewritten over the
//!   dataset's own column (CASE buckets, IN lists).
//! - `group`: the GROUP BY, its keys and cells ([`Bucket`]s for per-row
//!   keys: CASE, COALESCE, arithmetic, `BIN(col, k)`).
//! - `aggregate`: the SELECT list's aggregates, one module per aggregate,
//!   registered in one table.
//! - `measurement`: what is released with noise ([`MeasurementSpec`]) and
//!   each measurement's sensitivity.
//! - `row_expr`: per-row numbers ([`RowExpr`]) and their bounds.
//! - `predicate`: WHERE, FILTER and CASE conditions ([`Predicate`]) and
//!   [`provably_disjoint`].
//! - `subset`: the SQL subset as the help text states it ([`SQL_SUBSET`]).
//! - `error`: [`PlanError`] and its [`PlanErrorKind`].

mod aggregate;
mod error;
mod group;
mod joins;
mod measurement;
mod parse;
mod predicate;
mod row_expr;
mod subset;

pub use error::{PlanError, PlanErrorKind};
pub use group::{Bucket, KeyRule, NumberKey};
pub use measurement::{MeasurementSpec, Output, OutputKind};
pub use parse::{dataset_of, parse, Parsed, MAX_NESTING, MAX_OPERATORS, MAX_WHERE_DEPTH};
pub use predicate::{provably_disjoint, CmpOp, Predicate};
pub use row_expr::{has_decimal, RowExpr, MAX_EXPR_BOUND};
pub use subset::{SQL_SUBSET, SQL_SUBSET_EXAMPLES};

use error::{too_large, unsupported};
use group::{grouping, is_bucket_expr};
use joins::resolve_joins;
use parse::{column_name, nesting_depth, table_name};
use predicate::predicate;

use sqlparser::ast::{Expr, SelectItem};

use crate::schema::Schema;

/// A validated query.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Dataset of the FROM clause.
    pub dataset: String,
    /// GROUP BY column indices, in order.
    pub group_by: Vec<usize>,
    /// Domain size of each GROUP BY column.
    pub group_sizes: Vec<usize>,
    /// Aggregates of the SELECT list, in order.
    pub outputs: Vec<Output>,
    /// Distinct measurements, in first-use order; the epsilon is split
    /// evenly across them.
    pub measurements: Vec<MeasurementSpec>,
    /// The WHERE clause.
    pub filter: Option<Predicate>,
    /// Records one privacy unit may contribute (1, or the dataset's
    /// per-person bound); every sensitivity is multiplied by it.
    pub contribution_bound: i64,
    /// The open-domain column grouped by, if any: then it is the only
    /// GROUP BY column, `COUNT(*)` the only measurement, and the released
    /// keys are those passing a threshold (not the declared domain).
    pub open_key: Option<usize>,
    /// GROUP BY keys computed per row (CASE buckets, numbers, BIN ranges). A `group_by` entry
    /// `schema_columns + i` is `buckets[i]` ([`Plan::bucket`]).
    pub buckets: Vec<Bucket>,
    /// How many columns the schema declares (where bucket indices start).
    pub schema_columns: usize,
}

impl Plan {
    /// The CASE bucket a `group_by` entry stands for, if it is one.
    pub fn bucket(&self, g: usize) -> Option<&Bucket> {
        g.checked_sub(self.schema_columns)
            .and_then(|i| self.buckets.get(i))
    }

    /// The name of GROUP BY entry `g` in answers.
    pub fn group_name<'a>(&'a self, schema: &'a Schema, g: usize) -> &'a str {
        match self.bucket(g) {
            Some(b) => &b.name,
            None => schema.columns[g].name(),
        }
    }

    /// The SELECT list's outputs as answers state them: the node builds its
    /// answer with this, the coordinator the answer it expects.
    pub fn output_columns(&self) -> Vec<fedq_proto::v1::OutputColumn> {
        use fedq_proto::v1::OutputKind as Wire;
        self.outputs
            .iter()
            .map(|o| fedq_proto::v1::OutputColumn {
                label: o.label.clone(),
                kind: match o.kind {
                    OutputKind::Count => Wire::Count,
                    OutputKind::Sum => Wire::Sum,
                    OutputKind::Avg => Wire::Avg,
                    OutputKind::Quantile => Wire::Quantile,
                    OutputKind::Histogram => Wire::Histogram,
                    OutputKind::Variance => Wire::Variance,
                    OutputKind::Stddev => Wire::Stddev,
                } as i32,
                measurement: o.measurement as u32,
                count_measurement: o.count_measurement.map(|c| c as u32),
                lower: o.bounds.map(|b| b.0),
                upper: o.bounds.map(|b| b.1),
                quantile: o.quantile.unwrap_or(0.0),
                square_measurement: o.squares.map(|s| s.0 as u32),
                center: o.squares.map_or(0, |s| s.1),
            })
            .collect()
    }

    /// The names of the GROUP BY entries in answers, in order.
    pub fn group_names(&self, schema: &Schema) -> Vec<String> {
        self.group_by
            .iter()
            .map(|&g| self.group_name(schema, g).to_string())
            .collect()
    }

    /// Number of released cells: the product of the GROUP BY domain sizes.
    pub fn cell_count(&self) -> usize {
        self.group_sizes.iter().product()
    }

    /// L1 sensitivity of measurement `i` under adding or removing one
    /// privacy unit: the per-record sensitivity times the records a unit
    /// may contribute (truncation enforces the bound).
    pub fn sensitivity(&self, i: usize) -> i64 {
        self.measurements[i]
            .sensitivity()
            .saturating_mul(self.contribution_bound)
    }
}

/// Parses and validates `sql` against `schema`. `max_cells` bounds the GROUP
/// BY cross product.
pub fn plan(sql: &str, schema: &Schema, max_cells: usize) -> Result<Plan, PlanError> {
    plan_parsed(&parse(sql)?, schema, max_cells)
}

/// Validates a parsed query against `schema` (see [`plan`]): the GROUP BY
/// ([`group::grouping`]), each aggregate of the SELECT list
/// ([`aggregate`], one module per aggregate), the WHERE clause
/// ([`predicate`]).
pub fn plan_parsed(parsed: &Parsed, schema: &Schema, max_cells: usize) -> Result<Plan, PlanError> {
    // A query joining a public table is planned as its rewrite over the
    // dataset's own column (CASE buckets, IN lists); others as written.
    let rewritten;
    let select: &sqlparser::ast::Select = if parsed.joins.is_empty() {
        &parsed.select
    } else {
        rewritten = resolve_joins(&parsed.select, &parsed.joins, schema)?;
        &rewritten
    };
    let dataset = table_name(&select.from)?;
    let grouping = grouping(select, schema, max_cells)?;
    let mut measurements = aggregate::Measurements::default();
    let mut outputs = Vec::new();
    for item in &select.projection {
        let expr = match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => {
                return unsupported(format!(
                    "SELECT * is not supported: fedq releases aggregates only ({}) and the GROUP BY columns",
                    aggregate::supported()
                ))
            }
        };
        if is_bucket_expr(expr) {
            let text = expr.to_string();
            if !grouping.buckets.iter().any(|b| b.text == text) {
                return unsupported(format!(
                    "SELECT {expr}: a per-row key (CASE, COALESCE, arithmetic or BIN) is selected but not grouped by; add it (or its alias, or its position) to GROUP BY"
                ));
            }
            continue;
        }
        if let Some(name) = column_name(expr) {
            let (idx, _) = schema.column(&name).map_err(PlanError::unknown_name)?;
            if !grouping.group_by.contains(&idx) {
                return unsupported(format!(
                    "column {name} is selected but not aggregated; select it only if it is in GROUP BY, or wrap it in an aggregate"
                ));
            }
            continue;
        }
        let Expr::Function(f) = expr else {
            return unsupported(format!(
                "SELECT {expr}: only aggregates ({}) and GROUP BY columns can be selected",
                aggregate::supported()
            ));
        };
        outputs.push(aggregate::output(f, expr, schema, &mut measurements)?);
    }
    let measurements = measurements.0;
    if outputs.is_empty() {
        return unsupported(format!(
            "the SELECT list has no aggregate; add one of {}",
            aggregate::supported()
        ));
    }
    if outputs.len() > 1 && outputs.iter().any(|o| o.kind == OutputKind::Histogram) {
        return unsupported("HISTOGRAM(col, k) releases one row per bin: query it on its own, without other aggregates");
    }
    let values: usize = grouping.cells.saturating_mul(
        measurements
            .iter()
            .map(MeasurementSpec::values_per_cell)
            .max()
            .unwrap_or(1),
    );
    if values > max_cells {
        return too_large(format!(
            "the query would release {values} values per measurement (cells x bins), more than this node's limit of {max_cells}; use fewer bins or group by fewer columns"
        ));
    }

    let filter = match &select.selection {
        Some(e) => {
            let depth = nesting_depth(e);
            if depth > MAX_WHERE_DEPTH {
                return too_large(format!(
                    "the WHERE clause nests {depth} levels of AND/OR/NOT, more than {MAX_WHERE_DEPTH}; use col IN (...) for long lists of alternatives"
                ));
            }
            Some(predicate(schema, e)?)
        }
        None => None,
    };

    if let Some(idx) = grouping.open_key {
        if measurements != [MeasurementSpec::CountRows] {
            return unsupported(format!(
                "GROUP BY {name}: {name} has an open domain, so only COUNT(*) can be released per key (its keys are chosen by a threshold on that count); select {name}, COUNT(*) only",
                name = schema.columns[idx].name()
            ));
        }
    }

    Ok(Plan {
        dataset,
        group_by: grouping.group_by,
        group_sizes: grouping.group_sizes,
        outputs,
        measurements,
        filter,
        contribution_bound: schema.contribution_bound(),
        open_key: grouping.open_key,
        buckets: grouping.buckets,
        schema_columns: schema.columns.len(),
    })
}

/// Number of released cells: each GROUP BY column contributes its declared
/// domain plus a "missing" key.
pub fn cell_count(plan: &Plan) -> usize {
    plan.group_sizes.iter().map(|s| s + 1).product()
}

/// Label of the "missing" key of a GROUP BY column.
pub const MISSING_KEY: &str = "(missing)";

/// The printable key of every cell, in the order of the engine's exact values (`Table::exact`).
pub fn cell_keys(plan: &Plan, schema: &Schema) -> Vec<Vec<String>> {
    let mut keys: Vec<Vec<String>> = vec![Vec::new()];
    for (&col, &size) in plan.group_by.iter().zip(&plan.group_sizes) {
        let label = |code: usize| match plan.bucket(col) {
            Some(b) => b.labels[code].clone(),
            None => schema.columns[col].key_label(code),
        };
        let mut next = Vec::with_capacity(keys.len() * (size + 1));
        for k in &keys {
            for code in 0..=size {
                let mut key = k.clone();
                key.push(if code == size {
                    MISSING_KEY.to_string()
                } else {
                    label(code)
                });
                next.push(key);
            }
        }
        keys = next;
    }
    keys
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
