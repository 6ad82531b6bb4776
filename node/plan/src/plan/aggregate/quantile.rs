//! `MEDIAN(col)` and `QUANTILE(col, q)`, also spelled
//! `QUANTILE_CONT(col, q)`, `QUANTILE_DISC(col, q)` and
//! `PERCENTILE_CONT(q) WITHIN GROUP (ORDER BY col)`: read off a noisy
//! histogram over the column's declared bins (a noisy CDF; see
//! `fedq_dp::distribution`).
//!
//! Measurement: [`MeasurementSpec::Histogram`] with the column's declared
//! `bins`; sensitivity 1 (a record falls in one bin of one cell). Kernel
//! and push-down: those of [`super::histogram`].

use super::{second_number, Aggregate, Call, Measurements};
use crate::plan::error::{invalid, PlanError};
use crate::plan::measurement::{MeasurementSpec, Output, OutputKind};
use crate::plan::row_expr::aggregate_column;
use crate::schema::Column;

/// `MEDIAN(col)`: the 0.5 quantile.
pub(crate) const MEDIAN: Aggregate = Aggregate {
    names: &["MEDIAN"],
    usage: "MEDIAN(col)",
    second: None,
    plan: |call, m| plan(call, m, Some(0.5)),
};

/// `QUANTILE(col, q)` and its other spellings.
pub(crate) const QUANTILE: Aggregate = Aggregate {
    names: &[
        "QUANTILE",
        "QUANTILE_CONT",
        "QUANTILE_DISC",
        "PERCENTILE_CONT",
        "PERCENTILE_DISC",
    ],
    usage: "QUANTILE(col, q)",
    second: Some("QUANTILE(traffickMonths, 0.9)"),
    plan: |call, m| plan(call, m, second_number(call)),
};

fn plan(call: &Call<'_>, m: &mut Measurements, q: Option<f64>) -> Result<Output, PlanError> {
    let (column, (min, max)) = aggregate_column(call.schema, call.column_arg()?, call.name, true)?;
    let Some(q) = q.filter(|q| (0.0..=1.0).contains(q)) else {
        return invalid(format!(
            "{}: the quantile must be a number from 0 to 1, e.g. 0.5 for the median",
            call.expr
        ));
    };
    let Column::Integer { bins, .. } = &call.schema.columns[column] else {
        return invalid(format!(
            "{}: {} needs an integer column",
            call.expr, call.name
        ));
    };
    let h = m.add(MeasurementSpec::Histogram {
        column,
        min,
        max,
        bins: *bins,
    });
    Ok(Output {
        bounds: Some((min, max)),
        quantile: Some(q),
        ..call.output(OutputKind::Quantile, h)
    })
}
