//! Counts and shares of the rows meeting a condition, in the spellings
//! researchers use: `COUNT(*) FILTER (WHERE c)`,
//! `SUM(CASE WHEN c THEN 1 ELSE 0 END)`, `COUNT(CASE WHEN c THEN 1 END)`,
//! and `AVG(CASE WHEN c THEN 1 ELSE 0 END)` (the share of rows meeting it).
//!
//! Measurement: [`MeasurementSpec::CountWhere`] (the condition planned as
//! a WHERE clause), sensitivity 1 as for any count; a share divides it by
//! [`MeasurementSpec::CountRows`]. Kernel: the engine's count over the
//! condition's bitmap (`fedq_engine::table`); push-down: `COUNT(*) FILTER
//! (WHERE ...)`.

use sqlparser::ast::{Expr, Function, FunctionArg, FunctionArgExpr, FunctionArguments, Value};

use super::Measurements;
use crate::plan::error::{unsupported, PlanError};
use crate::plan::measurement::{MeasurementSpec, Output, OutputKind};
use crate::plan::parse::number_literal;
use crate::plan::predicate::predicate;
use crate::schema::Schema;

/// The output of `f` (named `fname`, upper case, written as `expr`) if it
/// is a count or share of the rows meeting a condition; `None` for any
/// other call.
pub(crate) fn output(
    fname: &str,
    f: &Function,
    expr: &Expr,
    schema: &Schema,
    measurements: &mut Measurements,
) -> Result<Option<Output>, PlanError> {
    let Some((kind, condition)) = conditional_count(fname, f, expr)? else {
        return Ok(None);
    };
    let text = condition.to_string();
    let condition = predicate(schema, &condition).map_err(|why| why.at(expr))?;
    let measurement = measurements.add(MeasurementSpec::CountWhere { condition, text });
    let (count_measurement, bounds) = match kind {
        OutputKind::Avg => (
            Some(measurements.add(MeasurementSpec::CountRows)),
            Some((0, 1)),
        ),
        _ => (None, None),
    };
    Ok(Some(Output {
        label: expr.to_string(),
        kind,
        measurement,
        count_measurement,
        bounds,
        quantile: None,
        squares: None,
    }))
}

/// `COUNT(*) FILTER (WHERE c)`, `SUM(CASE WHEN c THEN 1 ELSE 0 END)` (or
/// without the ELSE), `COUNT(CASE WHEN c THEN 1 END)`: a count of the rows
/// where `c` is TRUE; `AVG(CASE WHEN c THEN 1 ELSE 0 END)`: their share.
/// `None` for any other aggregate; an error for a CASE inside an aggregate
/// in any other form, saying which forms are supported.
fn conditional_count(
    fname: &str,
    f: &sqlparser::ast::Function,
    expr: &Expr,
) -> Result<Option<(OutputKind, Expr)>, PlanError> {
    let args: Vec<&FunctionArgExpr> = match &f.args {
        FunctionArguments::List(list) if list.duplicate_treatment.is_none() => list
            .args
            .iter()
            .filter_map(|a| match a {
                FunctionArg::Unnamed(a) => Some(a),
                _ => None,
            })
            .collect(),
        _ => return Ok(None),
    };
    if let Some(filter) = &f.filter {
        return Ok(match (fname, args.as_slice()) {
            ("COUNT", [FunctionArgExpr::Wildcard]) => Some((OutputKind::Count, (**filter).clone())),
            _ => None,
        });
    }
    let [FunctionArgExpr::Expr(Expr::Case {
        operand: None,
        conditions,
        else_result,
        ..
    })] = args.as_slice()
    else {
        return Ok(None);
    };
    let one = |e: &Expr| number_literal(e) == Some(1.0);
    let zero = |e: Option<&Expr>| e.is_some_and(|e| number_literal(e) == Some(0.0));
    let null = |e: Option<&Expr>| {
        e.is_none_or(|e| matches!(e, Expr::Value(v) if matches!(v.value, Value::Null)))
    };
    let form = match (fname, conditions.as_slice()) {
        ("SUM", [w])
            if one(&w.result) && (zero(else_result.as_deref()) || null(else_result.as_deref())) =>
        {
            Some((OutputKind::Count, w.condition.clone()))
        }
        ("COUNT", [w]) if null(else_result.as_deref()) => {
            Some((OutputKind::Count, w.condition.clone()))
        }
        ("AVG", [w]) if one(&w.result) && zero(else_result.as_deref()) => {
            Some((OutputKind::Avg, w.condition.clone()))
        }
        _ => None,
    };
    match form {
        Some(f) => Ok(Some(f)),
        None => unsupported(format!(
            "{expr}: a CASE inside an aggregate is supported as a count or a share of the rows meeting one condition: SUM(CASE WHEN c THEN 1 ELSE 0 END), COUNT(CASE WHEN c THEN 1 END), AVG(CASE WHEN c THEN 1 ELSE 0 END), or COUNT(*) FILTER (WHERE c); to break a count down by several labels, GROUP BY the CASE"
        )),
    }
}
