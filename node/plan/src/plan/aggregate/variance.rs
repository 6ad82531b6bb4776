//! `VARIANCE` (`VAR_SAMP`) and `STDDEV` (`STDDEV_SAMP`): the sample
//! statistic from a noisy count, sum and centred sum of squares.
//!
//! Measurements: [`MeasurementSpec::CountPresent`], [`MeasurementSpec::Sum`]
//! and [`MeasurementSpec::SumSquares`] around the middle of the declared
//! bounds, which makes the squares' sensitivity ([`squares_sensitivity`])
//! a quarter of the raw squares'. Kernel: the engine's centred squares
//! (`fedq_engine::table`); push-down: the sum of the squared differences
//! of the clamped value from the centre, in `numeric`
//! (`fedq_engine::postgres::statement`).

use super::{Aggregate, Call, Measurements};
use crate::plan::error::PlanError;
use crate::plan::measurement::{MeasurementSpec, Output, OutputKind};
use crate::plan::row_expr::aggregate_column;

/// The most one record changes a sum of `(x - center)^2`, `x` clamped to
/// `[min, max]`: `max((min - c)^2, (max - c)^2)` (at least 1).
pub(crate) fn squares_sensitivity(center: i64, min: i64, max: i64) -> i64 {
    let d = (min - center)
        .unsigned_abs()
        .max((max - center).unsigned_abs());
    d.saturating_mul(d).clamp(1, i64::MAX as u64) as i64
}

/// `VARIANCE(col)`.
pub(crate) const VARIANCE: Aggregate = Aggregate {
    names: &["VARIANCE", "VAR_SAMP"],
    usage: "VARIANCE(col)",
    second: None,
    plan: |call, m| plan(call, m, OutputKind::Variance),
};

/// `STDDEV(col)`: the square root of the variance.
pub(crate) const STDDEV: Aggregate = Aggregate {
    names: &["STDDEV", "STDDEV_SAMP"],
    usage: "STDDEV(col)",
    second: None,
    plan: |call, m| plan(call, m, OutputKind::Stddev),
};

fn plan(call: &Call<'_>, m: &mut Measurements, kind: OutputKind) -> Result<Output, PlanError> {
    let (column, (min, max)) = aggregate_column(call.schema, call.column_arg()?, call.name, true)?;
    let count = m.add(MeasurementSpec::CountPresent { column });
    let sum = m.add(MeasurementSpec::Sum { column, min, max });
    let center = min + (max - min) / 2;
    let squares = m.add(MeasurementSpec::SumSquares {
        column,
        center,
        min,
        max,
    });
    Ok(Output {
        count_measurement: Some(count),
        bounds: Some((min, max)),
        squares: Some((squares, center)),
        ..call.output(kind, sum)
    })
}
