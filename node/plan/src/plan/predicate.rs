//! Conditions: WHERE, FILTER and CASE conditions planned into a
//! [`Predicate`] over value codes with SQL's three-valued logic, literals
//! coded against the declared domains, and [`provably_disjoint`] (parallel
//! composition of the parts of a UNION ALL).

use super::error::{invalid, unsupported, PlanError};
use super::group::{coalesce_args, literal_text};
use super::parse::{column_name, is_missing_marker};
use sqlparser::ast::{BinaryOperator, Expr, UnaryOperator, Value};

use crate::schema::{parse_bool, Column, Schema};

/// Comparison operators of the WHERE clause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `=`
    Eq,
    /// `<>` or `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

/// A WHERE condition over value codes, with SQL's three-valued logic: a
/// condition on a missing value is unknown, and unknown rows are excluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Predicate {
    /// Both hold.
    And(Box<Predicate>, Box<Predicate>),
    /// Either holds.
    Or(Box<Predicate>, Box<Predicate>),
    /// The negation (unknown stays unknown).
    Not(Box<Predicate>),
    /// `col op value`.
    Cmp {
        /// Column index.
        column: usize,
        /// Operator.
        op: CmpOp,
        /// Code of the literal.
        value: i64,
    },
    /// `col [NOT] IN (...)`.
    In {
        /// Column index.
        column: usize,
        /// Codes of the literals.
        values: Vec<i64>,
        /// `NOT IN`.
        negated: bool,
    },
    /// `col [NOT] BETWEEN low AND high`.
    Between {
        /// Column index.
        column: usize,
        /// Inclusive lower literal.
        low: i64,
        /// Inclusive upper literal.
        high: i64,
        /// `NOT BETWEEN`.
        negated: bool,
    },
    /// `col IS [NOT] NULL`: whether the value is missing (never unknown).
    IsMissing {
        /// Column index.
        column: usize,
        /// `IS NOT NULL`.
        negated: bool,
    },
    /// `left op right`: two columns of the same row compared (for example
    /// `citizenship <> CountryOfExploitation`, the cross-border cases).
    /// Unknown when either value is missing (SQL's three-valued logic: a
    /// missing citizenship is neither equal nor unequal to any country).
    /// Numbers (integers, clamped to their declared bounds, and flags as 0
    /// and 1) compare by value; categories by label, through `relabel`.
    Columns {
        /// Column index of the left side.
        left: usize,
        /// Operator (only `=` and `<>` for categories).
        op: CmpOp,
        /// Column index of the right side.
        right: usize,
        /// Categories: for each code of `left`, the code of `right` with
        /// the same label, or -1 if `right` declares no such label (then
        /// the two are never equal). `None`: the codes compare as they
        /// are (numbers, or two open-domain columns, whose codes are
        /// hashes of their text). Built from the declared domains only.
        relabel: Option<Vec<i64>>,
    },
}

impl CmpOp {
    /// Whether `a op b` holds (codes in WHERE; noisy values in the
    /// coordinator's HAVING).
    pub fn holds<T: PartialOrd>(self, a: T, b: T) -> bool {
        match self {
            CmpOp::Eq => a == b,
            CmpOp::Ne => a != b,
            CmpOp::Lt => a < b,
            CmpOp::Le => a <= b,
            CmpOp::Gt => a > b,
            CmpOp::Ge => a >= b,
        }
    }

    /// The operator with its sides swapped (`a < b` is `b > a`).
    pub fn flipped(self) -> CmpOp {
        match self {
            CmpOp::Lt => CmpOp::Gt,
            CmpOp::Le => CmpOp::Ge,
            CmpOp::Gt => CmpOp::Lt,
            CmpOp::Ge => CmpOp::Le,
            o => o,
        }
    }

    /// SQL spelling.
    pub fn sql(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "<>",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

pub(crate) fn predicate(schema: &Schema, e: &Expr) -> Result<Predicate, PlanError> {
    match e {
        Expr::Nested(inner) => predicate(schema, inner),
        Expr::UnaryOp { op: UnaryOperator::Not, expr } => {
            Ok(Predicate::Not(Box::new(predicate(schema, expr)?)))
        }
        Expr::BinaryOp { left, op: BinaryOperator::And, right } => Ok(Predicate::And(
            Box::new(predicate(schema, left)?),
            Box::new(predicate(schema, right)?),
        )),
        Expr::BinaryOp { left, op: BinaryOperator::Or, right } => Ok(Predicate::Or(
            Box::new(predicate(schema, left)?),
            Box::new(predicate(schema, right)?),
        )),
        Expr::BinaryOp { left, op, right } => {
            let op = match op {
                BinaryOperator::Eq => CmpOp::Eq,
                BinaryOperator::NotEq => CmpOp::Ne,
                BinaryOperator::Lt => CmpOp::Lt,
                BinaryOperator::LtEq => CmpOp::Le,
                BinaryOperator::Gt => CmpOp::Gt,
                BinaryOperator::GtEq => CmpOp::Ge,
                other => {
                    return unsupported(format!(
                        "operator {other} in WHERE is not supported; use =, <>, <, <=, >, >=, IN, BETWEEN, IS NULL, AND, OR, NOT"
                    ))
                }
            };
            if let Some(p) = coalesce_condition(schema, e, left, op, right)? {
                return Ok(p);
            }
            // Accept both `col op literal` and `literal op col`.
            let (col_expr, lit, op) = if column_name(left).is_some() {
                (left, right, op)
            } else if column_name(right).is_some() {
                (right, left, op.flipped())
            } else {
                return invalid(format!("{e}: a comparison needs a column on one side and a literal or another column on the other"));
            };
            if column_name(lit).is_some() {
                return columns_predicate(schema, e, col_expr, op, lit);
            }
            let (column, col) = where_column(schema, col_expr)?;
            // '-99' (and -99, and '') is how the source files write a missing
            // value, and what ingest stores as missing: `col = '-99'` is
            // `col IS NULL`, `col <> '-99'` is `col IS NOT NULL`.
            if matches!(op, CmpOp::Eq | CmpOp::Ne) && is_missing_marker(lit) {
                return Ok(Predicate::IsMissing {
                    column,
                    negated: op == CmpOp::Ne,
                });
            }
            if matches!(col, Column::Categorical { .. } | Column::Boolean { .. } | Column::Open { .. })
                && !matches!(op, CmpOp::Eq | CmpOp::Ne)
            {
                return unsupported(format!(
                    "{e}: {} is not an integer column; only =, <> and IN apply to it",
                    col.name()
                ));
            }
            let value = literal(col, lit)?;
            Ok(Predicate::Cmp { column, op, value })
        }
        Expr::InList { expr, list, negated } if coalesce_args(expr).is_some() => {
            // COALESCE(col, d) IN (a, b): an OR of equalities.
            let mut alternatives = list.iter().map(|l| {
                coalesce_condition(schema, e, expr, CmpOp::Eq, l)
                    .and_then(|p| p.ok_or_else(|| PlanError::invalid(format!("{e}: expected COALESCE(column, literal)"))))
            });
            let first = alternatives
                .next()
                .ok_or_else(|| PlanError::invalid(format!("{e}: the IN list is empty")))??;
            let any = alternatives.try_fold(first, |acc, p| {
                p.map(|p| Predicate::Or(Box::new(acc), Box::new(p)))
            })?;
            Ok(if *negated { Predicate::Not(Box::new(any)) } else { any })
        }
        Expr::InList { expr, list, negated } => {
            let (column, col) = where_column(schema, expr)?;
            if list.is_empty() {
                return invalid(format!("{e}: the IN list is empty"));
            }
            let values = list.iter().map(|l| literal(col, l)).collect::<Result<_, _>>()?;
            Ok(Predicate::In { column, values, negated: *negated })
        }
        Expr::Between { expr, negated, low, high } => {
            let (column, col) = where_column(schema, expr)?;
            if !matches!(col, Column::Integer { .. }) {
                return unsupported(format!("{e}: BETWEEN applies to integer columns only"));
            }
            Ok(Predicate::Between {
                column,
                low: literal(col, low)?,
                high: literal(col, high)?,
                negated: *negated,
            })
        }
        Expr::IsNull(inner) | Expr::IsNotNull(inner) => {
            let (column, _) = where_column(schema, inner)?;
            Ok(Predicate::IsMissing { column, negated: matches!(e, Expr::IsNotNull(_)) })
        }
        Expr::Subquery(_) | Expr::InSubquery { .. } | Expr::Exists { .. } => {
            unsupported("subqueries are not supported")
        }
        other => unsupported(format!(
            "WHERE {other}: not supported; use comparisons of a column with a literal, IN, BETWEEN, IS [NOT] NULL, AND, OR, NOT"
        )),
    }
}

/// `COALESCE(col, d) op literal` (either side): for a present value the
/// comparison of the value, for a missing one the (constant) comparison of
/// `d`, so it is `col op literal OR col IS NULL` when `d op literal` holds
/// and `col op literal AND col IS NOT NULL` when it does not: exactly
/// SQL's value, never unknown. `None` when neither side is a COALESCE.
pub(crate) fn coalesce_condition(
    schema: &Schema,
    e: &Expr,
    left: &Expr,
    op: CmpOp,
    right: &Expr,
) -> Result<Option<Predicate>, PlanError> {
    let (c, lit, op) = if coalesce_args(left).is_some() {
        (left, right, op)
    } else if coalesce_args(right).is_some() {
        (right, left, op.flipped())
    } else {
        return Ok(None);
    };
    let shape = || {
        PlanError::unsupported(format!(
            "{e}: in a condition, COALESCE is COALESCE(column, literal) compared with a literal"
        ))
    };
    let args = coalesce_args(c).ok_or_else(shape)?;
    let [col_e, d] = args.as_slice() else {
        return Err(shape());
    };
    if column_name(col_e).is_none() || is_missing_marker(d) {
        return Err(shape());
    }
    let (Some(d_text), Some(lit_text)) = (literal_text(d), literal_text(lit)) else {
        return Err(shape());
    };
    let (column, col) = where_column(schema, col_e)?;
    let holds = match col {
        Column::Categorical { .. } | Column::Open { .. } => match op {
            CmpOp::Eq => d_text == lit_text,
            CmpOp::Ne => d_text != lit_text,
            _ => {
                return unsupported(format!(
                    "{e}: {} is not an integer column; only =, <> and IN apply to it",
                    col.name()
                ))
            }
        },
        _ => op.holds(literal(col, d)?, literal(col, lit)?),
    };
    let missing = |negated| Predicate::IsMissing { column, negated };
    // A label the domain does not declare, equal to the default: only the
    // missing rows take it.
    let undeclared =
        matches!(col, Column::Categorical { domain, .. } if !domain.contains(&lit_text));
    let present = if undeclared && d_text == lit_text {
        return Ok(Some(missing(op == CmpOp::Ne)));
    } else {
        Predicate::Cmp {
            column,
            op,
            value: literal(col, lit)?,
        }
    };
    Ok(Some(if holds {
        Predicate::Or(Box::new(present), Box::new(missing(false)))
    } else {
        Predicate::And(Box::new(present), Box::new(missing(true)))
    }))
}

/// `left op right` over two columns of the same row (see
/// [`Predicate::Columns`]): numbers with numbers (any operator),
/// categories with categories by label (`=` and `<>`). What may be
/// compared, and how labels correspond, follows from the declared schema
/// alone.
pub(crate) fn columns_predicate(
    schema: &Schema,
    e: &Expr,
    left: &Expr,
    op: CmpOp,
    right: &Expr,
) -> Result<Predicate, PlanError> {
    let (l, lc) = where_column(schema, left)?;
    let (r, rc) = where_column(schema, right)?;
    let numeric = |c: &Column| matches!(c, Column::Integer { .. } | Column::Boolean { .. });
    let text = |c: &Column| matches!(c, Column::Categorical { .. } | Column::Open { .. });
    if let Some(c) = [lc, rc]
        .into_iter()
        .find(|c| matches!(c, Column::PersonId { .. }))
    {
        return unsupported(format!(
            "{e}: {} is the person identifier of the privacy unit; it cannot be queried",
            c.name()
        ));
    }
    if l == r {
        return unsupported(format!(
            "{e}: compares {} with itself; write {} IS NOT NULL (or IS NULL) instead",
            lc.name(),
            lc.name()
        ));
    }
    if numeric(lc) && numeric(rc) {
        return Ok(Predicate::Columns {
            left: l,
            op,
            right: r,
            relabel: None,
        });
    }
    if !(text(lc) && text(rc)) {
        return unsupported(format!(
            "{e}: {} is {} and {} is {}: only numbers (integer columns, flags) compare with numbers, and categories with categories",
            lc.name(),
            lc.kind_name(),
            rc.name(),
            rc.kind_name()
        ));
    }
    if !matches!(op, CmpOp::Eq | CmpOp::Ne) {
        return unsupported(format!(
            "{e}: categories compare with = and <> only (by label); {} has no order",
            lc.name()
        ));
    }
    // Categories compare by label. A categorical side's codes are mapped
    // to the other side's codes (or, against an open-domain column, to the
    // hash of the label, which is how an open column codes its text).
    let relabel = match (lc, rc) {
        (Column::Categorical { domain: a, .. }, Column::Categorical { domain: b, .. }) => Some(
            a.iter()
                .map(|x| b.iter().position(|y| y == x).map_or(-1, |i| i as i64))
                .collect(),
        ),
        (Column::Categorical { domain, .. }, Column::Open { .. }) => Some(
            domain
                .iter()
                .map(|x| crate::schema::open_code(x.trim()))
                .collect(),
        ),
        (Column::Open { .. }, Column::Categorical { .. }) => {
            return columns_predicate(schema, e, right, op, left)
        }
        _ => None,
    };
    Ok(Predicate::Columns {
        left: l,
        op,
        right: r,
        relabel,
    })
}

pub(crate) fn where_column<'s>(
    schema: &'s Schema,
    e: &Expr,
) -> Result<(usize, &'s Column), PlanError> {
    let name = column_name(e).ok_or_else(|| {
        PlanError::invalid(format!(
            "{e}: expected a column name (expressions on columns are not supported)"
        ))
    })?;
    schema.column(&name).map_err(PlanError::unknown_name)
}

/// Turns a literal into the code it would have in `col`. Validation uses the
/// declared domain only.
pub(crate) fn literal(col: &Column, e: &Expr) -> Result<i64, PlanError> {
    let (text, quoted) = match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => (s.clone(), true),
            Value::Number(n, _) => (n.clone(), false),
            Value::Boolean(b) => (if *b { "1" } else { "0" }.to_string(), false),
            Value::Null => {
                return unsupported(format!(
                    "comparison with NULL is never true; use {} IS NULL",
                    col.name()
                ))
            }
            other => return unsupported(format!("literal {other} is not supported")),
        },
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match expr.as_ref() {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => (format!("-{n}"), false),
                _ => return invalid(format!("{e}: expected a number")),
            },
            _ => return invalid(format!("{e}: expected a literal")),
        },
        other => return invalid(format!("{other}: expected a literal value")),
    };
    match col {
        Column::Categorical { name, domain } => {
            if !quoted {
                return unsupported(format!(
                    "{name} is categorical: compare it with a quoted string, e.g. {name} = '{}'",
                    domain[0]
                ));
            }
            domain
                .iter()
                .position(|d| *d == text)
                .map(|i| i as i64)
                .ok_or_else(|| {
                    let hint = crate::schema::closest(&text, domain.iter().map(String::as_str))
                        .map(|d| format!(" (did you mean {d:?}? values are case-sensitive)"))
                        .unwrap_or_default();
                    PlanError::invalid(format!(
                        "{text:?} is not in the declared domain of {name}{hint}: expected {}",
                        col.expectation()
                            .trim_end_matches(", or -99/empty for missing")
                    ))
                })
        }
        Column::Integer { name, .. } => {
            if quoted {
                return unsupported(format!(
                    "{name} is an integer column: compare it with a number, not a string"
                ));
            }
            text.parse::<i64>().map_err(|_| {
                PlanError::invalid(format!(
                    "{text}: {name} is an integer column; expected an integer literal"
                ))
            })
        }
        Column::Boolean { name } => parse_bool(&text).map(i64::from).ok_or_else(|| {
            PlanError::unsupported(format!(
                "{text:?}: {name} is boolean; compare it with 0, 1, true or false"
            ))
        }),
        // Any text: a value never seen matches nothing. Saying whether a
        // value occurs would reveal the data (DESIGN invariant 2).
        Column::Open { name } => {
            if !quoted {
                return unsupported(format!(
                    "{name} is categorical: compare it with a quoted string, e.g. {name} = 'text'"
                ));
            }
            Ok(crate::schema::open_code(text.trim()))
        }
        Column::PersonId { name } => Err(PlanError::unknown_name(format!(
            "{name} is the person identifier of the privacy unit; it cannot be queried"
        ))),
    }
}

/// Whether no record can satisfy both WHERE clauses, proven from the
/// query and the declared schema alone (never from the data): some column
/// has, in each clause, a top-level AND term over that column only, and no
/// value of the column (missing included) makes both terms TRUE. Such
/// queries release disjoint sets of records, so parallel composition
/// applies: together they cost what one of them costs. `false` whenever
/// this cannot be shown (then their costs add up), and always for a
/// person-level privacy unit (one person's records may fall on both sides).
pub fn provably_disjoint(a: Option<&Predicate>, b: Option<&Predicate>, schema: &Schema) -> bool {
    let (Some(a), Some(b)) = (a, b) else {
        return false;
    };
    if schema.person.is_some() {
        return false;
    }
    let (ta, tb) = (single_column_terms(a), single_column_terms(b));
    ta.iter().any(|(c, x)| {
        tb.iter()
            .filter(|(d, _)| d == c)
            .any(|(_, y)| never_both(*c, x, y, schema))
    })
}

/// The top-level AND terms of `p` that read one column, with it.
pub(crate) fn single_column_terms(p: &Predicate) -> Vec<(usize, &Predicate)> {
    let mut terms = Vec::new();
    let mut stack = vec![p];
    while let Some(p) = stack.pop() {
        if let Predicate::And(x, y) = p {
            stack.push(x);
            stack.push(y);
        } else if let Some(c) = only_column(p) {
            terms.push((c, p));
        }
    }
    terms
}

/// The one column `p` reads, if it reads exactly one.
pub(crate) fn only_column(p: &Predicate) -> Option<usize> {
    let mut column = None;
    let mut stack = vec![p];
    while let Some(p) = stack.pop() {
        let c = match p {
            Predicate::And(x, y) | Predicate::Or(x, y) => {
                stack.push(x);
                stack.push(y);
                continue;
            }
            Predicate::Not(x) => {
                stack.push(x);
                continue;
            }
            Predicate::Columns { .. } => return None,
            Predicate::Cmp { column, .. }
            | Predicate::In { column, .. }
            | Predicate::Between { column, .. }
            | Predicate::IsMissing { column, .. } => *column,
        };
        if column.is_some_and(|x| x != c) {
            return None;
        }
        column = Some(c);
    }
    column
}

/// The literal codes `p` compares with.
pub(crate) fn literals(p: &Predicate, out: &mut Vec<i64>) {
    match p {
        Predicate::And(x, y) | Predicate::Or(x, y) => {
            literals(x, out);
            literals(y, out);
        }
        Predicate::Not(x) => literals(x, out),
        Predicate::Cmp { value, .. } => out.push(*value),
        Predicate::In { values, .. } => out.extend(values),
        Predicate::Between { low, high, .. } => out.extend([*low, *high]),
        Predicate::IsMissing { .. } | Predicate::Columns { .. } => {}
    }
}

/// Whether no value of column `c` makes both `x` and `y` (terms over `c`
/// alone) TRUE. A term over one column is constant between the literals
/// it compares with, so the values checked are the missing value, the
/// declared ends, every literal and its neighbours, and a value equal to
/// no literal: that covers every case.
pub(crate) fn never_both(c: usize, x: &Predicate, y: &Predicate, schema: &Schema) -> bool {
    let mut lits = Vec::new();
    literals(x, &mut lits);
    literals(y, &mut lits);
    let (lo, hi) = match &schema.columns[c] {
        Column::Categorical { domain, .. } => (0, domain.len() as i64 - 1),
        Column::Boolean { .. } => (0, 1),
        Column::Integer { min, max, .. } => (*min, *max),
        Column::Open { .. } => (0, i64::MAX),
        Column::PersonId { .. } => return false,
    };
    let fresh = lits
        .iter()
        .copied()
        .filter(|&v| v != MISSING_CODE)
        .max()
        .unwrap_or(0)
        .saturating_add(1);
    let mut values = vec![MISSING_CODE, lo, hi, fresh.clamp(lo, hi)];
    for v in lits.into_iter().filter(|&v| v != MISSING_CODE) {
        for w in [v.saturating_sub(1), v, v.saturating_add(1)] {
            values.push(w.clamp(lo, hi));
        }
    }
    values
        .into_iter()
        .all(|v| !(truth_at(x, v) == Some(true) && truth_at(y, v) == Some(true)))
}

pub(crate) const MISSING_CODE: i64 = crate::schema::MISSING;

/// The value of a one-column term when the column holds `v` (`None`:
/// unknown), in SQL's three-valued logic as the engines evaluate it.
pub(crate) fn truth_at(p: &Predicate, v: i64) -> Option<bool> {
    let known = |f: &dyn Fn() -> bool| (v != MISSING_CODE).then(f);
    match p {
        Predicate::And(x, y) => match (truth_at(x, v), truth_at(y, v)) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        },
        Predicate::Or(x, y) => match (truth_at(x, v), truth_at(y, v)) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        },
        Predicate::Not(x) => truth_at(x, v).map(|t| !t),
        Predicate::Cmp { op, value, .. } => known(&|| op.holds(v, *value)),
        Predicate::In {
            values, negated, ..
        } => known(&|| values.contains(&v) != *negated),
        Predicate::Between {
            low, high, negated, ..
        } => known(&|| (*low <= v && v <= *high) != *negated),
        Predicate::IsMissing { negated, .. } => Some((v == MISSING_CODE) != *negated),
        Predicate::Columns { .. } => None,
    }
}
