//! The GROUP BY: columns, aliases and positions of the SELECT list, and
//! keys computed per row ([`Bucket`]): CASE and COALESCE buckets,
//! arithmetic over integer columns, `BIN(col, k)` ranges; and the cells
//! they make.

use super::error::{invalid, too_large, unbounded, unsupported, PlanError};
use super::parse::{column_name, is_missing_marker, number_literal};
use super::predicate::{predicate, where_column, CmpOp, Predicate};
use super::row_expr::{has_decimal, row_expression, RowExpr};
use super::MISSING_KEY;
use sqlparser::ast::{
    BinaryOperator, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, SelectItem,
    UnaryOperator, Value,
};

use crate::schema::{Column, Schema, MAX_BINS, MAX_INTEGER_GROUP_KEYS};

/// A GROUP BY key computed per row from declared columns alone: a CASE
/// (`CASE WHEN c1 THEN 'a' ... [ELSE 'z'] END`, whose domain is its
/// literal labels, public because they are in the query), or a number
/// (`traffickMonths / 12`, `BIN(traffickMonths, 12)`, whose domain
/// follows from the declared bounds by interval arithmetic). Either way
/// every key is known before any data is read, every record lands in
/// exactly one cell, and the sensitivities are those of any GROUP BY
/// (DESIGN invariant 4).
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// Its name in answers: the alias, or the expression as written.
    pub name: String,
    /// The expression as written (matched against the SELECT list).
    pub text: String,
    /// The keys' labels, each once; a cell's key code is the label's
    /// index (the (missing) key comes after them).
    pub labels: Vec<String>,
    /// How a row's key is computed.
    pub rule: KeyRule,
}

/// How a per-row GROUP BY key ([`Bucket`]) is computed for a row.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyRule {
    /// A CASE (or a COALESCE over a category, planned as one).
    Case {
        /// In order: a row takes the label of the first condition that is
        /// TRUE for it (SQL's CASE; an unknown condition does not match).
        branches: Vec<(Predicate, usize)>,
        /// The ELSE label; without ELSE a row no condition matches is
        /// (missing).
        otherwise: Option<usize>,
    },
    /// A per-row number: one key per value, or equal-width ranges.
    Number(NumberKey),
}

/// A GROUP BY key from a per-row number ([`RowExpr`]): one key per value
/// of its derived bounds (`GROUP BY traffickMonths / 12`), or `k`
/// equal-width ranges over them (`GROUP BY BIN(traffickMonths, 12)`),
/// by `fedq_dp::distribution::bin_of`, which the engine, the push-down
/// and the coordinator's bin edges share. A missing value (NULL under
/// SQL's rules, see [`RowExpr`]) is the (missing) key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumberKey {
    /// The number.
    pub expr: RowExpr,
    /// Its lower bound, by interval arithmetic over the declared bounds.
    pub min: i64,
    /// Its upper bound.
    pub max: i64,
    /// `Some(k)`: `k` equal-width ranges (`BIN`); `None`: one key per
    /// value.
    pub bins: Option<u64>,
}

impl NumberKey {
    /// The key code of value `v` (within the bounds by construction;
    /// clamped all the same, as every value is).
    pub fn key(&self, v: i128) -> usize {
        let v = v.clamp(i128::from(self.min), i128::from(self.max)) as i64;
        match self.bins {
            Some(k) => fedq_dp::distribution::bin_of(v, self.min, self.max, k),
            None => (v - self.min) as usize,
        }
    }

    /// The keys' labels: each value; or each range as the integers it
    /// holds, `[low, high)` (`fedq_dp::distribution::bin_edges`), the
    /// last closed at the upper bound: `[120, 132]`.
    pub fn labels(&self) -> Vec<String> {
        match self.bins {
            None => (self.min..=self.max).map(|v| v.to_string()).collect(),
            Some(k) => {
                let edges = fedq_dp::distribution::bin_edges(self.min, self.max, k);
                (0..k as usize)
                    .map(|i| {
                        if i + 1 == k as usize {
                            format!("[{}, {}]", edges[i], self.max)
                        } else {
                            format!("[{}, {})", edges[i], edges[i + 1])
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Most branches a CASE bucket may have.
pub(crate) const MAX_CASE_BRANCHES: usize = 64;

/// The per-row key expression a GROUP BY item stands for (itself, or the
/// selected expression its alias or position names), with its name in
/// answers.
pub(crate) fn group_case<'a>(
    projection: &'a [SelectItem],
    e: &'a Expr,
) -> Option<(&'a Expr, String)> {
    if is_bucket_expr(e) {
        // Grouped as written; named after a selected alias of the same CASE.
        let text = e.to_string();
        let alias = projection.iter().find_map(|item| match item {
            SelectItem::ExprWithAlias { expr, alias } if expr.to_string() == text => {
                Some(alias.value.clone())
            }
            _ => None,
        });
        return Some((e, alias.unwrap_or(text)));
    }
    let item = if let Some(n) = number_literal(e) {
        if n.fract() != 0.0 || n < 1.0 {
            return None;
        }
        projection.get(n as usize - 1)?
    } else {
        let name = column_name(e)?;
        projection.iter().find(|item| {
            matches!(item, SelectItem::ExprWithAlias { alias, .. } if alias.value.eq_ignore_ascii_case(&name))
        })?
    };
    match item {
        SelectItem::ExprWithAlias { expr: c, alias } if is_bucket_expr(c) => {
            Some((c, alias.value.clone()))
        }
        SelectItem::UnnamedExpr(c) if is_bucket_expr(c) => Some((c, c.to_string())),
        _ => None,
    }
}

/// Whether a GROUP BY key is computed per row: a CASE, a COALESCE, a
/// `BIN(...)`, or arithmetic over columns.
pub(crate) fn is_bucket_expr(e: &Expr) -> bool {
    coalesce_args(e).is_some()
        || call_args(e, "BIN").is_some()
        || matches!(e, Expr::Case { .. })
        || is_arithmetic(e)
}

/// Whether `e` is per-row arithmetic (`+ - * /`, a unary minus) over
/// columns, literals, COALESCE and casts, reading at least one column: a
/// candidate GROUP BY key ([`row_expression`] plans it, or says why not).
/// Aggregates are never part of one (`SUM(x) / COUNT(*)` is not a key).
fn is_arithmetic(e: &Expr) -> bool {
    let (mut operator, mut column) = (false, false);
    let mut stack = vec![e];
    while let Some(x) = stack.pop() {
        match x {
            Expr::BinaryOp { left, op, right } => {
                if !matches!(
                    op,
                    BinaryOperator::Plus
                        | BinaryOperator::Minus
                        | BinaryOperator::Multiply
                        | BinaryOperator::Divide
                ) {
                    return false;
                }
                operator = true;
                stack.push(left);
                stack.push(right);
            }
            Expr::UnaryOp {
                op: UnaryOperator::Minus,
                expr,
            } => {
                operator = true;
                stack.push(expr);
            }
            Expr::Nested(inner) | Expr::Cast { expr: inner, .. } => stack.push(inner),
            Expr::Identifier(_) | Expr::CompoundIdentifier(_) => column = true,
            Expr::Value(_) if number_literal(x).is_some() => {}
            _ => match coalesce_args(x) {
                Some(args) => stack.extend(args),
                None => return false,
            },
        }
    }
    operator && column
}

/// The arguments of `COALESCE(...)`, if `e` is one.
pub(crate) fn coalesce_args(e: &Expr) -> Option<Vec<&Expr>> {
    call_args(e, "COALESCE")
}

/// The arguments of a call of `name` (plain, unnamed), if `e` is one.
fn call_args<'a>(e: &'a Expr, name: &str) -> Option<Vec<&'a Expr>> {
    let Expr::Function(f) = e else { return None };
    if !f.name.to_string().eq_ignore_ascii_case(name) || f.over.is_some() || f.filter.is_some() {
        return None;
    }
    let FunctionArguments::List(list) = &f.args else {
        return None;
    };
    list.args
        .iter()
        .map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(x)) => Some(x),
            _ => None,
        })
        .collect()
}

/// The text of a literal (a quoted string, or a number as written), for
/// COALESCE's default.
pub(crate) fn literal_text(e: &Expr) -> Option<String> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(t) => Some(t.clone()),
            Value::Number(n, _) => Some(n.clone()),
            _ => None,
        },
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => literal_text(expr).map(|t| format!("-{t}")),
        _ => None,
    }
}

/// `COALESCE(category, 'label')` as a GROUP BY key: each declared value
/// is its own key, and a missing value takes `'label'` (a declared value,
/// or a new key named in the query). Built as a CASE bucket over the
/// declared domain, so its keys come from the schema and the query only.
pub(crate) fn coalesce_bucket(
    schema: &Schema,
    e: &Expr,
    name: String,
) -> Result<Bucket, PlanError> {
    let (column, col, default) = match coalesce_args(e).as_deref() {
        Some([c, d]) => {
            let (column, col) = where_column(schema, c)?;
            let default = literal_text(d).filter(|t| !is_missing_marker(d) && t != MISSING_KEY);
            (column, col, default)
        }
        _ => None.ok_or_else(|| {
            PlanError::unsupported(format!(
                "GROUP BY {e}: a COALESCE key is COALESCE(column, 'label') over a categorical column or a flag"
            ))
        })?,
    };
    let Some(default) = default else {
        return invalid(format!(
            "GROUP BY {e}: the second argument must be a literal label other than the missing value"
        ));
    };
    if let Column::Integer { .. } = col {
        // A number with a default: one key per value of the COALESCE.
        return number_bucket(schema, e, name);
    }
    let mut labels: Vec<String> = (0..col.group_size().unwrap_or(0))
        .map(|code| col.key_label(code))
        .collect();
    if !matches!(col, Column::Categorical { .. } | Column::Boolean { .. }) {
        return unsupported(format!(
            "GROUP BY {e}: COALESCE as a key applies to a categorical column, a flag or an integer column; {} is {}",
            col.name(),
            col.kind_name()
        ));
    }
    let branches = (0..labels.len())
        .map(|code| {
            (
                Predicate::Cmp {
                    column,
                    op: CmpOp::Eq,
                    value: code as i64,
                },
                code,
            )
        })
        .collect();
    let otherwise = match labels.iter().position(|l| *l == default) {
        Some(i) => i,
        None => {
            labels.push(default);
            labels.len() - 1
        }
    };
    Ok(Bucket {
        name,
        text: e.to_string(),
        labels,
        rule: KeyRule::Case {
            branches,
            otherwise: Some(otherwise),
        },
    })
}

/// A key from a per-row number ([`NumberKey`]): `e` is arithmetic over
/// integer columns and flags (one key per value of its bounds, derived
/// from the declared bounds, at most [`MAX_INTEGER_GROUP_KEYS`]), or
/// `BIN(x, k)` (`k` equal-width ranges over the bounds of `x`, 1 to the
/// number of values and at most [`MAX_BINS`]).
fn number_bucket(schema: &Schema, e: &Expr, name: String) -> Result<Bucket, PlanError> {
    let (arg, bins, fname) = match call_args(e, "BIN") {
        Some(args) => match args.as_slice() {
            [x, k] => (*x, Some(*k), "BIN"),
            _ => {
                return invalid(format!(
                    "{e}: BIN takes an integer column (or per-row arithmetic over them) and a number of bins, e.g. BIN(traffickMonths, 12)"
                ))
            }
        },
        None => (e, None, "GROUP BY "),
    };
    if has_decimal(arg) {
        return unsupported(format!(
            "GROUP BY {e}: a key is a whole number; write integer arithmetic (traffickMonths / 12 divides as integers, truncating), or BIN(column, k) for k equal-width ranges"
        ));
    }
    if let Some(c) = column_name(arg) {
        let (_, col) = schema.column(&c).map_err(PlanError::unknown_name)?;
        if !matches!(col, Column::Integer { .. } | Column::Boolean { .. }) {
            return unbounded(format!(
                "{e}: {c} is {}; {fname} needs an integer column with declared bounds (group by the category itself: GROUP BY {c})",
                col.kind_name()
            ));
        }
    }
    let (expr, (min, max)) = row_expression(schema, arg, fname)?;
    let values = (i128::from(max) - i128::from(min) + 1) as u64;
    let bins = match bins {
        None if values > MAX_INTEGER_GROUP_KEYS => {
            return too_large(format!(
                "GROUP BY {e}: the expression takes {values} values ({min} to {max}, from the declared bounds), more than the {MAX_INTEGER_GROUP_KEYS} keys a GROUP BY of a number may have; group by BIN({e}, k) for k equal-width ranges, or by a CASE of ranges"
            ))
        }
        None => None,
        Some(k) => {
            let limit = values.min(MAX_BINS);
            match number_literal(k).filter(|x| x.fract() == 0.0 && *x >= 1.0 && *x <= limit as f64) {
                Some(x) => Some(x as u64),
                None => {
                    return invalid(format!(
                        "{e}: the number of bins must be a whole number from 1 to {limit} ({} takes {values} values, {min} to {max}, from the declared bounds{})",
                        arg,
                        if values > MAX_BINS { format!("; at most {MAX_BINS} bins") } else { String::new() }
                    ))
                }
            }
        }
    };
    let key = NumberKey {
        expr,
        min,
        max,
        bins,
    };
    Ok(Bucket {
        name,
        text: e.to_string(),
        labels: key.labels(),
        rule: KeyRule::Number(key),
    })
}

/// A per-row key: a CASE bucket (every condition a WHERE condition over
/// declared columns, every result a literal label), a COALESCE, or a
/// number ([`number_bucket`]).
pub(crate) fn bucket(schema: &Schema, e: &Expr, name: String) -> Result<Bucket, PlanError> {
    if coalesce_args(e).is_some() {
        return coalesce_bucket(schema, e, name);
    }
    if call_args(e, "BIN").is_some() || is_arithmetic(e) {
        return number_bucket(schema, e, name);
    }
    let Expr::Case {
        operand,
        conditions,
        else_result,
        ..
    } = e
    else {
        return invalid(format!("GROUP BY {e}: expected a CASE expression"));
    };
    if conditions.len() > MAX_CASE_BRANCHES {
        return too_large(format!(
            "{e}: a CASE may have at most {MAX_CASE_BRANCHES} branches"
        ));
    }
    let mut labels: Vec<String> = Vec::new();
    let mut label_of = |r: &Expr| -> Result<usize, PlanError> {
        let text = match r {
            Expr::Value(v) => match &v.value {
                Value::SingleQuotedString(t) => t.clone(),
                Value::Number(n, _) => n.clone(),
                _ => return Err(bad_label(e, r)),
            },
            Expr::UnaryOp {
                op: UnaryOperator::Minus,
                expr,
            } => match number_literal(expr) {
                Some(_) => r.to_string(),
                None => return Err(bad_label(e, r)),
            },
            _ => return Err(bad_label(e, r)),
        };
        if text == MISSING_KEY {
            return unsupported(format!(
                "{e}: {MISSING_KEY} is the label of rows no branch matches; choose another"
            ));
        }
        Ok(match labels.iter().position(|l| *l == text) {
            Some(i) => i,
            None => {
                labels.push(text);
                labels.len() - 1
            }
        })
    };
    let mut branches = Vec::with_capacity(conditions.len());
    for w in conditions {
        // `CASE x WHEN v THEN ...` is `CASE WHEN x = v THEN ...`.
        let condition = match operand {
            Some(x) => Expr::BinaryOp {
                left: x.clone(),
                op: BinaryOperator::Eq,
                right: Box::new(w.condition.clone()),
            },
            None => w.condition.clone(),
        };
        let p = predicate(schema, &condition)
            .map_err(|why| why.at(format_args!("{e}: in WHEN {}", w.condition)))?;
        branches.push((p, label_of(&w.result)?));
    }
    let otherwise = match else_result {
        Some(r) => Some(label_of(r)?),
        None => None,
    };
    Ok(Bucket {
        name,
        text: e.to_string(),
        labels,
        rule: KeyRule::Case {
            branches,
            otherwise,
        },
    })
}

pub(crate) fn bad_label(case: &Expr, r: &Expr) -> PlanError {
    PlanError::invalid(format!(
        "{case}: THEN {r}: a CASE's results must be literal labels (e.g. THEN '6-11 months'), so the keys it releases are known from the query alone"
    ))
}

/// The column a GROUP BY item names: a column, an alias of a selected
/// column (`SELECT citizenship AS c ... GROUP BY c`), or the position of a
/// selected column (`GROUP BY 1`).
pub(crate) fn group_column(projection: &[SelectItem], e: &Expr) -> Option<String> {
    let selected = |item: &SelectItem| match item {
        SelectItem::UnnamedExpr(x) | SelectItem::ExprWithAlias { expr: x, .. } => column_name(x),
        _ => None,
    };
    if let Some(n) = number_literal(e) {
        if n.fract() != 0.0 || n < 1.0 {
            return None;
        }
        return projection.get(n as usize - 1).and_then(selected);
    }
    let name = column_name(e)?;
    let aliased = projection.iter().find_map(|item| match item {
        SelectItem::ExprWithAlias { expr, alias } if alias.value.eq_ignore_ascii_case(&name) => {
            column_name(expr)
        }
        _ => None,
    });
    Some(aliased.unwrap_or(name))
}

/// The GROUP BY of a query: its entries (schema columns, then CASE
/// buckets), their domain sizes and the cells they make.
pub(crate) struct Grouping {
    /// GROUP BY entries in order: a schema column's index, or
    /// `schema.columns.len() + i` for `buckets[i]`.
    pub(crate) group_by: Vec<usize>,
    /// Domain size of each entry (without the (missing) key).
    pub(crate) group_sizes: Vec<usize>,
    /// The open-domain column grouped by (alone), if any.
    pub(crate) open_key: Option<usize>,
    /// The per-row keys grouped by.
    pub(crate) buckets: Vec<Bucket>,
    /// Cells released: the product of the domain sizes, each plus a
    /// (missing) key.
    pub(crate) cells: usize,
}

/// Plans the GROUP BY of `select`: columns (categorical, boolean, integer
/// over its declared bounds, one open-domain column alone), aliases and
/// positions of the SELECT list, CASE and COALESCE buckets; refused beyond
/// `max_cells` cells.
pub(crate) fn grouping(
    select: &sqlparser::ast::Select,
    schema: &Schema,
    max_cells: usize,
) -> Result<Grouping, PlanError> {
    let group_exprs = match &select.group_by {
        GroupByExpr::Expressions(exprs, modifiers) => {
            if !modifiers.is_empty() {
                return unsupported("GROUP BY modifiers (ROLLUP, CUBE, ...) are not supported");
            }
            exprs.as_slice()
        }
        GroupByExpr::All(_) => {
            return unsupported("GROUP BY ALL is not supported; list the columns")
        }
    };
    let mut group_by = Vec::new();
    let mut open_key = None;
    let mut buckets: Vec<Bucket> = Vec::new();
    for e in group_exprs {
        if let Some((case, name)) = group_case(&select.projection, e) {
            let b = bucket(schema, case, name)?;
            if buckets.iter().any(|x| x.text == b.text) {
                return unsupported(format!("GROUP BY lists {} twice", b.name));
            }
            group_by.push(schema.columns.len() + buckets.len());
            buckets.push(b);
            continue;
        }
        let name = group_column(&select.projection, e).ok_or_else(|| {
            PlanError::unsupported(format!(
                "GROUP BY {e}: group by a column, its alias or its position in the SELECT list, a CASE with literal labels, arithmetic over integer columns (traffickMonths / 12), or BIN(column, k)"
            ))
        })?;
        let (idx, col) = schema.column(&name).map_err(PlanError::unknown_name)?;
        if let Column::Open { .. } = col {
            if group_exprs.len() != 1 {
                return unsupported(format!(
                    "GROUP BY {name}: {name} has an open domain and can only be grouped by alone; drop the other GROUP BY columns (filter on them in WHERE instead)"
                ));
            }
            open_key = Some(idx);
            group_by.push(idx);
            continue;
        }
        if col.group_size().is_none() {
            return too_large(match col {
                Column::Integer { min, max, .. } => format!(
                    "GROUP BY {name}: {name} has {} possible values ({min} to {max}), more than the {MAX_INTEGER_GROUP_KEYS} keys a GROUP BY of an integer column may have; group by BIN({name}, k) for k equal-width ranges, or by a CASE of ranges",
                    (max - min) as u64 + 1
                ),
                _ => format!("GROUP BY {name}: {name} cannot be grouped by"),
            });
        }
        if group_by.contains(&idx) {
            return unsupported(format!("GROUP BY lists {name} twice"));
        }
        group_by.push(idx);
    }
    if open_key.is_some() && !buckets.is_empty() {
        return unsupported(
            "an open-domain column is grouped by alone; drop the per-row key (CASE, arithmetic or BIN; filter in WHERE instead)",
        );
    }
    let group_sizes: Vec<usize> = group_by
        .iter()
        .map(|&i| match i.checked_sub(schema.columns.len()) {
            Some(b) => buckets[b].labels.len(),
            None => schema.columns[i].group_size().unwrap_or(0),
        })
        .collect();
    let cells = group_sizes
        .iter()
        .try_fold(1usize, |acc, &n| acc.checked_mul(n + 1))
        .unwrap_or(usize::MAX);
    if cells > max_cells {
        return too_large(format!(
            "GROUP BY would release {cells} cells (the product of the declared domain sizes, each plus a (missing) key), more than this node's limit of {max_cells}; group by fewer or smaller columns"
        ));
    }

    Ok(Grouping {
        group_by,
        group_sizes,
        open_key,
        buckets,
        cells,
    })
}
