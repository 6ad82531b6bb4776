//! `HISTOGRAM(col, k)`: noisy counts of `k` equal-width bins over the
//! column's declared bounds, one row per bin; queried alone.
//!
//! Measurement: [`MeasurementSpec::Histogram`], `k` values per cell
//! (`fedq_dp::distribution::bin_of`); sensitivity 1: a record falls in one
//! bin of one cell. Kernel: the engine's per-cell bin counts
//! (`fedq_engine::table`); push-down: one `COUNT(*) FILTER` per bin
//! (`fedq_engine::postgres::statement`). Shared by
//! [`super::quantile`], which reads quantiles off it.

use super::{second_number, Aggregate, Call, Measurements};
use crate::plan::error::{invalid, PlanError};
use crate::plan::measurement::{MeasurementSpec, Output, OutputKind};
use crate::plan::row_expr::aggregate_column;
use crate::schema::{Column, MAX_BINS};

/// `HISTOGRAM(col, k)`.
pub(crate) const HISTOGRAM: Aggregate = Aggregate {
    names: &["HISTOGRAM"],
    usage: "HISTOGRAM(col, k)",
    second: Some("HISTOGRAM(traffickMonths, 12)"),
    plan,
};

fn plan(call: &Call<'_>, m: &mut Measurements) -> Result<Output, PlanError> {
    let (column, (min, max)) = aggregate_column(call.schema, call.column_arg()?, call.name, true)?;
    if !matches!(call.schema.columns[column], Column::Integer { .. }) {
        return invalid(format!(
            "{}: HISTOGRAM needs an integer column; for a flag or a category, GROUP BY it and COUNT(*)",
            call.expr
        ));
    }
    let values = (max - min) as u64 + 1;
    let limit = values.min(MAX_BINS);
    let Some(bins) = second_number(call)
        .filter(|k| k.fract() == 0.0 && *k >= 1.0 && *k <= limit as f64)
        .map(|k| k as u64)
    else {
        return invalid(format!(
            "{}: the number of bins must be a whole number from 1 to {limit} (the column has {values} possible values)",
            call.expr
        ));
    };
    let h = m.add(MeasurementSpec::Histogram {
        column,
        min,
        max,
        bins,
    });
    Ok(Output {
        bounds: Some((min, max)),
        ..call.output(OutputKind::Histogram, h)
    })
}
