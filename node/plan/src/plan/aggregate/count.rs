//! `COUNT(*)` and `COUNT(col)`.
//!
//! Measurements: [`MeasurementSpec::CountRows`] (records in the cell) and
//! [`MeasurementSpec::CountPresent`] (records whose column is not
//! missing). Sensitivity [`SENSITIVITY`]: a record falls in one cell.
//! Kernel: the engine's per-cell counts (`fedq_engine::table`); push-down:
//! `COUNT(*)` and `COUNT(col)` (`fedq_engine::postgres::statement`).

use sqlparser::ast::FunctionArgExpr;

use super::{Aggregate, Call, Measurements};
use crate::plan::error::PlanError;
use crate::plan::measurement::{MeasurementSpec, Output, OutputKind};
use crate::plan::row_expr::aggregate_column;

/// The most one record changes a count: it is in one cell, once.
pub(crate) const SENSITIVITY: i64 = 1;

/// `COUNT(*)`, `COUNT(col)`.
pub(crate) const COUNT: Aggregate = Aggregate {
    names: &["COUNT"],
    usage: "COUNT(*), COUNT(col)",
    second: None,
    plan,
};

fn plan(call: &Call<'_>, m: &mut Measurements) -> Result<Output, PlanError> {
    let spec = match call.arg {
        FunctionArgExpr::Wildcard => MeasurementSpec::CountRows,
        _ => {
            let (column, _) = aggregate_column(call.schema, call.column_arg()?, call.name, false)?;
            MeasurementSpec::CountPresent { column }
        }
    };
    Ok(call.output(OutputKind::Count, m.add(spec)))
}
