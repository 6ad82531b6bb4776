//! `SUM` and `AVG` of an integer column, a flag (0 or 1: its average is a
//! prevalence) or a per-row expression (`SUM(a + b)`,
//! `AVG(COALESCE(x, 0))`).
//!
//! Measurements: [`MeasurementSpec::Sum`] of the column clamped to its
//! declared bounds, or [`MeasurementSpec::SumOf`] of the expression clamped
//! to bounds derived by interval arithmetic ([`crate::plan::RowExpr::bounds`]);
//! AVG divides by the count of non-missing values
//! ([`MeasurementSpec::CountPresent`] or [`MeasurementSpec::CountOf`]).
//! Sensitivity [`sensitivity`]. Kernel: the engine's clamped sums
//! (`fedq_engine::table`); push-down: `SUM` of the value clamped with
//! `LEAST`/`GREATEST` (`fedq_engine::postgres::statement`).

use super::{Aggregate, Call, Measurements};
use crate::plan::error::PlanError;
use crate::plan::measurement::{MeasurementSpec, Output, OutputKind};
use crate::plan::parse::column_name;
use crate::plan::row_expr::{aggregate_column, row_expression};

/// The most one record changes a sum of values clamped to `[min, max]`:
/// `max(|min|, |max|)` (at least 1), from the declared bounds alone.
pub(crate) fn sensitivity(min: i64, max: i64) -> i64 {
    min.unsigned_abs().max(max.unsigned_abs()).max(1) as i64
}

/// `SUM(col)`, `SUM(expression)`.
pub(crate) const SUM: Aggregate = Aggregate {
    names: &["SUM"],
    usage: "SUM(col)",
    second: None,
    plan: |call, m| plan(call, m, false),
};

/// `AVG(col)`, `AVG(expression)`: a noisy sum over a noisy count.
pub(crate) const AVG: Aggregate = Aggregate {
    names: &["AVG"],
    usage: "AVG(col)",
    second: None,
    plan: |call, m| plan(call, m, true),
};

fn plan(call: &Call<'_>, m: &mut Measurements, avg: bool) -> Result<Output, PlanError> {
    let e = call.column_arg()?;
    let (sum, count, bounds) = if column_name(e).is_none() {
        let (expr, (min, max)) = row_expression(call.schema, e, call.name)?;
        let text = e.to_string();
        let sum = m.add(MeasurementSpec::SumOf {
            expr: expr.clone(),
            text: text.clone(),
            min,
            max,
        });
        let count = avg.then(|| m.add(MeasurementSpec::CountOf { expr, text }));
        (sum, count, (min, max))
    } else {
        let (column, (min, max)) = aggregate_column(call.schema, e, call.name, true)?;
        let sum = m.add(MeasurementSpec::Sum { column, min, max });
        let count = avg.then(|| m.add(MeasurementSpec::CountPresent { column }));
        (sum, count, (min, max))
    };
    let kind = if avg {
        OutputKind::Avg
    } else {
        OutputKind::Sum
    };
    Ok(Output {
        count_measurement: count,
        bounds: Some(bounds),
        ..call.output(kind, sum)
    })
}
