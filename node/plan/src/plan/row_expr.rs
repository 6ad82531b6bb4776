//! Per-row numbers ([`RowExpr`]): integer columns, flags and integer
//! literals under `+ - *`, `/` by a literal and COALESCE, with bounds from
//! the declared bounds by interval arithmetic, which are the sensitivity of
//! their sum; and the column an aggregate takes (`aggregate_column`).

use super::error::{too_large, unbounded, unsupported, PlanError};
use super::parse::{column_name, number_literal};
use sqlparser::ast::{
    BinaryOperator, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, UnaryOperator, Value,
};

use crate::schema::{Column, Schema};

/// A number computed per row from declared integer columns and flags:
/// `traffickMonths + 1`, `COALESCE(traffickMonths, 0)`, `a * b`,
/// `traffickMonths / 12`. NULL (missing) propagates as in SQL: an
/// operation on a missing value is missing, and COALESCE takes its first
/// non-missing argument. Its bounds follow from the declared bounds alone
/// ([`RowExpr::bounds`]), so a sum of it has a sensitivity from public
/// metadata (DESIGN invariant 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowExpr {
    /// A column's value: an integer (clamped to its declared bounds) or a
    /// flag as 0 or 1.
    Column(usize),
    /// A literal integer.
    Const(i64),
    /// `COALESCE(a, b, ...)`: the first argument that is not missing.
    Coalesce(Vec<RowExpr>),
    /// `a + b`.
    Add(Box<RowExpr>, Box<RowExpr>),
    /// `a - b`.
    Sub(Box<RowExpr>, Box<RowExpr>),
    /// `a * b`.
    Mul(Box<RowExpr>, Box<RowExpr>),
    /// `a / k` for a non-zero integer literal `k`: integer division
    /// truncating toward zero, as SQL divides integers.
    Div(Box<RowExpr>, i64),
}

/// `x / k` truncating toward zero, saturating (`i128::MIN / -1`). The
/// evaluation and the bounds both saturate, and saturation is monotone, so
/// every value stays within the bounds; an expression whose bounds
/// saturate is refused anyway (beyond ±2^40).
pub(crate) fn div(x: i128, k: i64) -> i128 {
    x.checked_div(i128::from(k)).unwrap_or(i128::MAX)
}

/// Largest magnitude a per-row expression's bounds may reach: a sum of
/// such values over 2^22 rows still fits an `i64`, as declared bounds do
/// (see `schema.rs`).
pub const MAX_EXPR_BOUND: i128 = 1 << 40;

impl RowExpr {
    /// The value for one row, given each column's value (`None`: missing).
    /// Computed in `i128`: within [`MAX_EXPR_BOUND`] for values within
    /// their declared bounds, so it cannot overflow.
    pub fn eval(&self, value: &dyn Fn(usize) -> Option<i64>) -> Option<i128> {
        Some(match self {
            RowExpr::Column(c) => i128::from(value(*c)?),
            RowExpr::Const(k) => i128::from(*k),
            RowExpr::Coalesce(args) => return args.iter().find_map(|a| a.eval(value)),
            RowExpr::Add(a, b) => a.eval(value)?.saturating_add(b.eval(value)?),
            RowExpr::Sub(a, b) => a.eval(value)?.saturating_sub(b.eval(value)?),
            RowExpr::Mul(a, b) => a.eval(value)?.saturating_mul(b.eval(value)?),
            RowExpr::Div(a, k) => div(a.eval(value)?, *k),
        })
    }

    /// The interval every value lies in, by interval arithmetic over the
    /// declared bounds of its columns (flags: 0 to 1). Public metadata
    /// only. `None` when a column has no numeric bounds.
    pub fn bounds(&self, schema: &Schema) -> Option<(i128, i128)> {
        Some(match self {
            RowExpr::Column(c) => match &schema.columns[*c] {
                Column::Integer { min, max, .. } => (i128::from(*min), i128::from(*max)),
                Column::Boolean { .. } => (0, 1),
                _ => return None,
            },
            RowExpr::Const(k) => (i128::from(*k), i128::from(*k)),
            RowExpr::Coalesce(args) => {
                let mut b: Option<(i128, i128)> = None;
                for a in args {
                    let (lo, hi) = a.bounds(schema)?;
                    b = Some(b.map_or((lo, hi), |(l, h)| (l.min(lo), h.max(hi))));
                }
                b?
            }
            RowExpr::Add(a, b) | RowExpr::Sub(a, b) | RowExpr::Mul(a, b) => {
                let (x, y) = (a.bounds(schema)?, b.bounds(schema)?);
                let ends = match self {
                    RowExpr::Add(..) => {
                        let (lo, hi) = (x.0.saturating_add(y.0), x.1.saturating_add(y.1));
                        [lo, hi, lo, hi]
                    }
                    RowExpr::Sub(..) => {
                        let (lo, hi) = (x.0.saturating_sub(y.1), x.1.saturating_sub(y.0));
                        [lo, hi, lo, hi]
                    }
                    _ => [
                        x.0.saturating_mul(y.0),
                        x.0.saturating_mul(y.1),
                        x.1.saturating_mul(y.0),
                        x.1.saturating_mul(y.1),
                    ],
                };
                (
                    ends.iter().copied().min().unwrap_or(0),
                    ends.iter().copied().max().unwrap_or(0),
                )
            }
            RowExpr::Div(a, k) => {
                // Truncating division by a constant is monotone.
                let (lo, hi) = a.bounds(schema)?;
                let (x, y) = (div(lo, *k), div(hi, *k));
                (x.min(y), x.max(y))
            }
        })
    }

    /// The columns it reads, each once.
    pub fn columns(&self) -> Vec<usize> {
        let mut out = Vec::new();
        let mut stack = vec![self];
        while let Some(e) = stack.pop() {
            match e {
                RowExpr::Column(c) => {
                    if !out.contains(c) {
                        out.push(*c)
                    }
                }
                RowExpr::Const(_) => {}
                RowExpr::Coalesce(args) => stack.extend(args),
                RowExpr::Add(a, b) | RowExpr::Sub(a, b) | RowExpr::Mul(a, b) => {
                    stack.push(a);
                    stack.push(b);
                }
                RowExpr::Div(a, _) => stack.push(a),
            }
        }
        out
    }
}

/// Most operators and COALESCE arguments one per-row expression may hold.
pub(crate) const MAX_EXPR_NODES: usize = 32;

/// The per-row expression an aggregate sums (see [`RowExpr`]), with its
/// bounds: integer columns and flags, integer literals, `+ - *`, division
/// by a non-zero integer literal, COALESCE; `* 1.0` (a cast to a decimal)
/// changes nothing. Anything else is refused saying why and what to write.
pub(crate) fn row_expression(
    schema: &Schema,
    e: &Expr,
    fname: &str,
) -> Result<(RowExpr, (i64, i64)), PlanError> {
    let mut nodes = 0usize;
    let row = row_expr(schema, e, fname, &mut nodes)?;
    let (lo, hi) = row.bounds(schema).ok_or_else(|| {
        PlanError::unbounded(format!(
            "{fname}({e}): the expression has no declared bounds (it needs integer columns or flags)"
        ))
    })?;
    if lo < -MAX_EXPR_BOUND || hi > MAX_EXPR_BOUND {
        return unbounded(format!(
            "{fname}({e}): the expression's bounds, [{lo}, {hi}] from the declared bounds, exceed ±2^40, so its sum's sensitivity would be unusable; aggregate the columns separately (SUM(a) + SUM(b) is applied to the released sums)"
        ));
    }
    Ok((row, (lo as i64, hi as i64)))
}

/// Whether a number literal written with a decimal point or an exponent
/// (a SQL numeric, not an integer) occurs in `e`.
pub fn has_decimal(e: &Expr) -> bool {
    let mut stack = vec![e];
    while let Some(e) = stack.pop() {
        match e {
            Expr::Value(v) => {
                if let Value::Number(n, _) = &v.value {
                    if n.contains(['.', 'e', 'E']) {
                        return true;
                    }
                }
            }
            Expr::BinaryOp { left, right, .. } => {
                stack.push(left);
                stack.push(right);
            }
            Expr::UnaryOp { expr, .. } | Expr::Nested(expr) | Expr::Cast { expr, .. } => {
                stack.push(expr)
            }
            Expr::Function(f) => {
                if let FunctionArguments::List(l) = &f.args {
                    for a in &l.args {
                        if let FunctionArg::Unnamed(FunctionArgExpr::Expr(x)) = a {
                            stack.push(x);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    false
}

pub(crate) fn row_expr(
    schema: &Schema,
    e: &Expr,
    fname: &str,
    nodes: &mut usize,
) -> Result<RowExpr, PlanError> {
    *nodes += 1;
    if *nodes > MAX_EXPR_NODES {
        return too_large(format!(
            "{fname}(...): a per-row expression may hold at most {MAX_EXPR_NODES} operators, columns and literals"
        ));
    }
    let operand = |x: &Expr, nodes: &mut usize| row_expr(schema, x, fname, nodes).map(Box::new);
    // A literal: an integer, or a decimal equal to one (`* 1.0`).
    let whole =
        |x: &Expr| number_literal(x).filter(|v| v.fract() == 0.0 && v.abs() < 2f64.powi(40));
    match e {
        Expr::Nested(inner) => row_expr(schema, inner, fname, nodes),
        _ if column_name(e).is_some() => {
            let name = column_name(e).unwrap_or_default();
            let (idx, col) = schema.column(&name).map_err(PlanError::unknown_name)?;
            match col {
                Column::Integer { .. } | Column::Boolean { .. } => Ok(RowExpr::Column(idx)),
                _ => unbounded(format!(
                    "{fname}(... {name} ...): {name} is {}; per-row arithmetic takes integer columns with declared bounds and flags (for a category, count its rows: SUM(CASE WHEN {name} = '...' THEN 1 ELSE 0 END))",
                    col.kind_name()
                )),
            }
        }
        Expr::Value(_) | Expr::UnaryOp { op: UnaryOperator::Minus, .. } if number_literal(e).is_some() => {
            match whole(e) {
                Some(v) => Ok(RowExpr::Const(v as i64)),
                None => unsupported(format!(
                    "{fname}(... {e} ...): per-row arithmetic takes integer literals; for a fraction, apply it to the aggregate (e.g. {fname}(traffickMonths) / 12.0), which fedq query computes from the released value"
                )),
            }
        }
        Expr::BinaryOp { left, op, right } => {
            // `x * 1.0`, `1.0 * x`, `x / 1.0`: a cast to a decimal, no change.
            let is_one = |x: &Expr| number_literal(x) == Some(1.0);
            match op {
                BinaryOperator::Multiply if is_one(right) => return row_expr(schema, left, fname, nodes),
                BinaryOperator::Multiply if is_one(left) => return row_expr(schema, right, fname, nodes),
                BinaryOperator::Divide if is_one(right) => return row_expr(schema, left, fname, nodes),
                _ => {}
            }
            match op {
                BinaryOperator::Plus => Ok(RowExpr::Add(operand(left, nodes)?, operand(right, nodes)?)),
                BinaryOperator::Minus => Ok(RowExpr::Sub(operand(left, nodes)?, operand(right, nodes)?)),
                BinaryOperator::Multiply => Ok(RowExpr::Mul(operand(left, nodes)?, operand(right, nodes)?)),
                // Integer division only when both sides are integers, as
                // SQL: a decimal on either side (`x * 1.0 / 12`, `x / 12.0`)
                // divides exactly, which a sum of integers cannot hold.
                BinaryOperator::Divide => match whole(right)
                    .filter(|_| !has_decimal(left) && !has_decimal(right))
                {
                    Some(k) if k != 0.0 => Ok(RowExpr::Div(operand(left, nodes)?, k as i64)),
                    _ => unsupported(format!(
                        "{fname}({e}): per-row division is by a non-zero integer literal only (integer division, as SQL divides integers); for a ratio or a fraction, divide the aggregates (e.g. {fname}(traffickMonths) / 12.0 or SUM(a) / SUM(b)), which fedq query computes from the released values"
                    )),
                },
                other => unsupported(format!(
                    "{fname}({e}): operator {other} is not supported in a per-row expression; use + - * and / by an integer literal"
                )),
            }
        }
        Expr::Function(f) if f.name.to_string().eq_ignore_ascii_case("COALESCE") => {
            let FunctionArguments::List(list) = &f.args else {
                return unsupported(format!("{e}: COALESCE takes two or more arguments"));
            };
            let args = list
                .args
                .iter()
                .map(|a| match a {
                    FunctionArg::Unnamed(FunctionArgExpr::Expr(x)) => row_expr(schema, x, fname, nodes),
                    _ => unsupported(format!("{e}: COALESCE takes expressions")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            if args.len() < 2 {
                return unsupported(format!("{e}: COALESCE takes two or more arguments"));
            }
            Ok(RowExpr::Coalesce(args))
        }
        Expr::Cast { expr, .. } => row_expr(schema, expr, fname, nodes),
        // `-x` is `0 - x` (missing stays missing).
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => Ok(RowExpr::Sub(
            Box::new(RowExpr::Const(0)),
            operand(expr, nodes)?,
        )),
        Expr::Case { .. } => unsupported(format!(
            "{fname}({e}): a CASE inside an aggregate is supported as a count or a share of the rows meeting one condition: SUM(CASE WHEN c THEN 1 ELSE 0 END), AVG(CASE WHEN c THEN 1 ELSE 0 END)"
        )),
        other => unbounded(format!(
            "{fname}({other}): per-row expressions are integer columns, flags and integer literals with + - *, / by an integer literal, and COALESCE; this one cannot be bounded from the declared metadata"
        )),
    }
}

pub(crate) fn aggregate_column(
    schema: &Schema,
    e: &Expr,
    fname: &str,
    numeric: bool,
) -> Result<(usize, (i64, i64)), PlanError> {
    let name = column_name(e).ok_or_else(|| {
        PlanError::unsupported(format!(
            "{fname}({e}): only a plain column can be aggregated"
        ))
    })?;
    let (idx, col) = schema.column(&name).map_err(PlanError::unknown_name)?;
    match col {
        Column::Integer { min, max, .. } => Ok((idx, (*min, *max))),
        // A flag as a number: 0 or 1 (AVG is its prevalence).
        Column::Boolean { .. } => Ok((idx, (0, 1))),
        _ if !numeric => Ok((idx, (0, 0))),
        _ => unbounded(format!(
            "{fname}({name}): {name} is not an integer or boolean column; {fname} needs an integer column with declared bounds, or a flag (0 or 1)"
        )),
    }
}
