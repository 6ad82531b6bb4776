//! Post-processing in the coordinator: what researchers write after the
//! aggregates (`ORDER BY ... DESC LIMIT 10`, `HAVING COUNT(*) >= 100`,
//! `ROUND(AVG(x), 1)`), applied to the combined noisy answers.
//!
//! **Guarantee.** Nothing here reaches a node or reads anything but the
//! released (noisy) values and their intervals, so it costs no privacy:
//! differential privacy is closed under post-processing. Nodes are sent
//! the query without these clauses ([`split`]), answer every cell of the
//! declared domain as always, and [`apply`] then filters, sorts, cuts and
//! rounds the combined rows. Orders and cuts are of noisy values: a row
//! near the cut may rank differently from its true value, which is why
//! every row keeps its interval; rounding widens an interval outwards,
//! never narrows it.

use std::cmp::Ordering;

use sqlparser::ast::{
    BinaryOperator, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, LimitClause,
    OrderByKind, SelectItem, SetExpr, Statement, Value,
};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;

use crate::combine::{Combined, Estimate, Row};

/// What [`split`] took out of a query, to apply to its combined answer.
#[derive(Debug, Clone, PartialEq)]
pub struct PostProcess {
    /// HAVING conditions (all must hold), on released values.
    pub having: Vec<(Target, Cmp, f64)>,
    /// ORDER BY keys, in order, with `true` for DESC.
    pub order_by: Vec<(Target, bool)>,
    /// LIMIT.
    pub limit: Option<usize>,
    /// ROUND(aggregate, digits) in the SELECT list.
    pub round: Vec<(Target, i32)>,
    /// Arithmetic over aggregates in the SELECT list (ratios, percentages),
    /// computed from the released aggregates, with their labels.
    pub derived: Vec<(String, Formula)>,
    /// Aggregates sent to the nodes only as parts of a formula (not shown).
    pub hidden: Vec<Target>,
    /// The SELECT list as written (normalised), the order results are
    /// shown in once the formulas are computed.
    pub select_order: Vec<String>,
    /// The clauses as written, for the note shown with the result.
    pub text: String,
}

/// A column or an aggregate of the SELECT list, by its normalised text
/// (upper case, no spaces), resolved against the result's columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target(String);

/// A comparison of HAVING: the planner's comparison operators, applied
/// to noisy values.
pub type Cmp = fedq_plan::plan::CmpOp;

fn norm(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase()
}

/// Splits `sql` into the query the nodes answer and the post-processing
/// the coordinator applies to the combined answer. A query without ORDER
/// BY, LIMIT, HAVING or ROUND is returned unchanged (byte for byte: its
/// digest, and so retries under the same id, are as before); otherwise the
/// nodes get the query re-written without them. A query the planner would
/// refuse anyway is returned unchanged too, for the nodes to explain.
pub fn split(sql: &str) -> Result<(String, Option<PostProcess>), String> {
    let Ok(mut statements) = Parser::parse_sql(&GenericDialect {}, sql) else {
        return Ok((sql.to_string(), None));
    };
    let [Statement::Query(query)] = statements.as_mut_slice() else {
        return Ok((sql.to_string(), None));
    };
    let SetExpr::Select(select) = query.body.as_mut() else {
        return Ok((sql.to_string(), None));
    };
    let mut post = PostProcess {
        having: Vec::new(),
        order_by: Vec::new(),
        limit: None,
        round: Vec::new(),
        derived: Vec::new(),
        hidden: Vec::new(),
        select_order: Vec::new(),
        text: String::new(),
    };
    let mut clauses = Vec::new();
    // ROUND(aggregate[, digits]) in the SELECT list: the nodes release the
    // aggregate; the coordinator rounds it.
    for item in select.projection.iter_mut() {
        let e = match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
            _ => continue,
        };
        if let Some((inner, digits)) = round_of(e)? {
            clauses.push(format!("{e}"));
            post.round.push((Target(norm(&inner.to_string())), digits));
            *e = inner;
        }
    }
    // The SELECT list as written (ROUND aside), for aliases and positions.
    let written: Vec<(Option<String>, String)> = select
        .projection
        .iter()
        .filter_map(|item| match item {
            SelectItem::UnnamedExpr(e) => Some((None, norm(&e.to_string()))),
            SelectItem::ExprWithAlias { expr, alias } => Some((
                Some(alias.value.to_ascii_uppercase()),
                norm(&expr.to_string()),
            )),
            _ => None,
        })
        .collect();
    // Arithmetic over aggregates (ratios, percentages): the nodes release
    // the aggregates; the coordinator computes the formula. A formula's
    // item is replaced by the first of its aggregates not selected
    // otherwise, and the others are appended, once each.
    let selected: Vec<String> = written.iter().map(|(_, e)| e.clone()).collect();
    post.select_order = selected.clone();
    let mut appended: Vec<Expr> = Vec::new();
    let mut dropped: Vec<usize> = Vec::new();
    for (i, item) in select.projection.iter_mut().enumerate() {
        let e = match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
            _ => continue,
        };
        let mut parts = Vec::new();
        let Some(f) = formula(e, &mut parts) else {
            continue;
        };
        if matches!(f, Formula::Agg(_)) || parts.is_empty() {
            continue;
        }
        let label = e.to_string();
        clauses.push(label.clone());
        post.derived.push((label, f));
        let mut replaced = false;
        for part in parts {
            let t = norm(&part.to_string());
            let shown = selected.contains(&t) || post.hidden.iter().any(|h| h.0 == t);
            if shown {
                continue;
            }
            post.hidden.push(Target(t));
            if replaced {
                appended.push(part);
            } else {
                *e = part;
                replaced = true;
            }
        }
        if !replaced {
            dropped.push(i);
        }
    }
    let mut i = 0;
    select.projection.retain(|_| {
        i += 1;
        !dropped.contains(&(i - 1))
    });
    select
        .projection
        .extend(appended.into_iter().map(SelectItem::UnnamedExpr));
    let items = written;
    let target = |e: &Expr, clause: &str| -> Result<Target, String> {
        if let Expr::Value(v) = e {
            if let Value::Number(n, _) = &v.value {
                let i: usize = n.parse().map_err(|_| {
                    format!("{clause} {n}: a position in the SELECT list is a whole number")
                })?;
                return items
                    .get(i.wrapping_sub(1))
                    .map(|(_, t)| Target(t.clone()))
                    .ok_or_else(|| {
                        format!(
                            "{clause} {i}: the SELECT list has {} items, numbered from 1",
                            items.len()
                        )
                    });
            }
        }
        let t = norm(&e.to_string());
        let by_alias = items
            .iter()
            .find(|(alias, _)| alias.as_deref() == Some(t.as_str()));
        Ok(Target(by_alias.map_or(t, |(_, x)| x.clone())))
    };
    if let Some(h) = select.having.take() {
        clauses.push(format!("HAVING {h}"));
        let mut conditions = Vec::new();
        conjuncts(&h, &mut conditions);
        for c in conditions {
            let Expr::BinaryOp { left, op, right } = c else {
                return Err(format!(
                    "HAVING {c}: compare an aggregate of the SELECT list with a number, e.g. HAVING COUNT(*) >= 100 (conditions joined with AND)"
                ));
            };
            let cmp = match op {
                BinaryOperator::Eq => Cmp::Eq,
                BinaryOperator::NotEq => Cmp::Ne,
                BinaryOperator::Lt => Cmp::Lt,
                BinaryOperator::LtEq => Cmp::Le,
                BinaryOperator::Gt => Cmp::Gt,
                BinaryOperator::GtEq => Cmp::Ge,
                _ => {
                    return Err(format!(
                        "HAVING {c}: use =, <>, <, <=, > or >= between an aggregate and a number"
                    ))
                }
            };
            let x = number(right).ok_or_else(|| {
                format!(
                    "HAVING {c}: the right-hand side must be a number, e.g. HAVING COUNT(*) >= 100"
                )
            })?;
            let t = target(left, "HAVING")?;
            if !items.iter().any(|(_, x)| *x == t.0) {
                return Err(format!(
                    "HAVING {left}: {left} is not in the SELECT list; the coordinator filters on released values, so select it too"
                ));
            }
            post.having.push((t, cmp, x));
        }
    }
    if let Some(order) = query.order_by.take() {
        clauses.push(format!("{order}"));
        let OrderByKind::Expressions(exprs) = &order.kind else {
            return Err("ORDER BY ALL is not supported; name the columns or aggregates".into());
        };
        for o in exprs {
            let desc = o.options.asc == Some(false);
            post.order_by.push((target(&o.expr, "ORDER BY")?, desc));
        }
    }
    if let Some(limit) = query.limit_clause.take() {
        clauses.push(format!("{limit}"));
        let LimitClause::LimitOffset {
            limit: Some(l),
            offset: None,
            limit_by,
        } = &limit
        else {
            return Err(format!(
                "{limit}: only LIMIT n is supported (no OFFSET); the coordinator cuts the sorted rows"
            ));
        };
        if !limit_by.is_empty() {
            return Err("LIMIT ... BY is not supported".into());
        }
        let n = number(l)
            .filter(|n| n.fract() == 0.0 && *n >= 0.0)
            .ok_or_else(|| format!("LIMIT {l}: the limit must be a whole number"))?;
        post.limit = Some(n as usize);
    }
    if clauses.is_empty() {
        return Ok((sql.to_string(), None));
    }
    post.text = clauses.join(" ");
    Ok((statements[0].to_string(), Some(post)))
}

/// A value with the range it lies in: `(value, low, high)`.
type Ranged = (f64, f64, f64);

/// Arithmetic over released aggregates, evaluated per row by [`apply`].
#[derive(Debug, Clone, PartialEq)]
pub enum Formula {
    /// An aggregate of the query, by its normalised text.
    Agg(String),
    /// A number.
    Num(f64),
    /// `a + b`, `a - b`, `a * b`, `a / b`.
    Op(char, Box<Formula>, Box<Formula>),
    /// `-a`.
    Neg(Box<Formula>),
    /// `SUM(agg) OVER ()`: the aggregate summed over every row of the
    /// result (a share's denominator), by its normalised text.
    Total(String),
}

/// The formula of `e` if it is arithmetic over aggregates and numbers,
/// collecting its aggregates (in order, each once) into `parts`; `None`
/// for anything else (left for the planner to accept or explain).
fn formula(e: &Expr, parts: &mut Vec<Expr>) -> Option<Formula> {
    match e {
        Expr::Nested(inner) => formula(inner, parts),
        Expr::Function(f) if f.over.is_some() => {
            // SUM(aggregate) OVER (): the total of the result's rows.
            let Some(sqlparser::ast::WindowType::WindowSpec(w)) = &f.over else {
                return None;
            };
            let plain = w.window_name.is_none()
                && w.partition_by.is_empty()
                && w.order_by.is_empty()
                && w.window_frame.is_none();
            let FunctionArguments::List(list) = &f.args else {
                return None;
            };
            let [FunctionArg::Unnamed(FunctionArgExpr::Expr(inner @ Expr::Function(g)))] =
                list.args.as_slice()
            else {
                return None;
            };
            if !plain || !f.name.to_string().eq_ignore_ascii_case("SUM") || g.over.is_some() {
                return None;
            }
            let t = norm(&inner.to_string());
            if !parts.iter().any(|p| norm(&p.to_string()) == t) {
                parts.push(inner.clone());
            }
            Some(Formula::Total(t))
        }
        Expr::Function(f) if exact_scaling(f).is_some() => {
            // SUM or AVG of `x / 12.0` or `x * 0.5`: exactly the aggregate
            // of x scaled, which the nodes release as integers.
            let (inner, op, k) = exact_scaling(f)?;
            let t = norm(&inner.to_string());
            if !parts.iter().any(|p| norm(&p.to_string()) == t) {
                parts.push(inner);
            }
            Some(Formula::Op(
                op,
                Box::new(Formula::Agg(t)),
                Box::new(Formula::Num(k)),
            ))
        }
        // Per-row functions (a GROUP BY key such as COALESCE(x, -1) / 24
        // or BIN(x, 4)) are the nodes', not aggregates to compute over.
        Expr::Function(f)
            if ["COALESCE", "BIN"]
                .iter()
                .any(|n| f.name.to_string().eq_ignore_ascii_case(n)) =>
        {
            None
        }
        Expr::Function(_) => {
            let t = norm(&e.to_string());
            if !parts.iter().any(|p| norm(&p.to_string()) == t) {
                parts.push(e.clone());
            }
            Some(Formula::Agg(t))
        }
        Expr::Value(_) => number(e).map(Formula::Num),
        Expr::UnaryOp {
            op: sqlparser::ast::UnaryOperator::Minus,
            expr,
        } => Some(Formula::Neg(Box::new(formula(expr, parts)?))),
        Expr::BinaryOp { left, op, right } => {
            let op = match op {
                BinaryOperator::Plus => '+',
                BinaryOperator::Minus => '-',
                BinaryOperator::Multiply => '*',
                BinaryOperator::Divide => '/',
                _ => return None,
            };
            Some(Formula::Op(
                op,
                Box::new(formula(left, parts)?),
                Box::new(formula(right, parts)?),
            ))
        }
        _ => None,
    }
}

/// `SUM(x / k)`, `AVG(x / k)` with a decimal on either side (an exact
/// division, as SQL does for numerics), or `SUM(x * k)`, `AVG(k * x)` with
/// a fractional `k`: `(SUM(x), '/', k)` and so on. Linear, so the scaled
/// aggregate of x is exactly the value asked for, and its interval scales
/// with it. `None` for anything else (integer division stays per row).
fn exact_scaling(f: &sqlparser::ast::Function) -> Option<(Expr, char, f64)> {
    let name = f.name.to_string().to_ascii_uppercase();
    if !matches!(name.as_str(), "SUM" | "AVG") || f.filter.is_some() || f.over.is_some() {
        return None;
    }
    let FunctionArguments::List(list) = &f.args else {
        return None;
    };
    if list.duplicate_treatment.is_some() {
        return None;
    }
    let [FunctionArg::Unnamed(FunctionArgExpr::Expr(arg))] = list.args.as_slice() else {
        return None;
    };
    let mut e = arg;
    while let Expr::Nested(inner) = e {
        e = inner;
    }
    let Expr::BinaryOp { left, op, right } = e else {
        return None;
    };
    let (x, op, k) = match op {
        BinaryOperator::Divide => {
            let k = number(right).filter(|k| *k != 0.0)?;
            let decimal = fedq_plan::plan::has_decimal(left) || fedq_plan::plan::has_decimal(right);
            decimal.then_some((left, '/', k))?
        }
        BinaryOperator::Multiply => match (number(left), number(right)) {
            (_, Some(k)) if k.fract() != 0.0 => (left, '*', k),
            (Some(k), _) if k.fract() != 0.0 => (right, '*', k),
            _ => return None,
        },
        _ => return None,
    };
    let mut g = f.clone();
    if let FunctionArguments::List(l) = &mut g.args {
        l.args = vec![FunctionArg::Unnamed(FunctionArgExpr::Expr((**x).clone()))];
    }
    Some((Expr::Function(g), op, k))
}

impl Formula {
    /// How many distinct aggregates it reads.
    pub fn aggregates(&self) -> usize {
        let mut seen = Vec::new();
        self.collect(&mut seen);
        seen.len()
    }

    fn collect<'a>(&'a self, seen: &mut Vec<&'a str>) {
        match self {
            Formula::Agg(t) => {
                if !seen.contains(&t.as_str()) {
                    seen.push(t)
                }
            }
            Formula::Num(_) | Formula::Total(_) => {}
            Formula::Op(_, a, b) => {
                a.collect(seen);
                b.collect(seen);
            }
            Formula::Neg(a) => a.collect(seen),
        }
    }

    /// How many `SUM(...) OVER ()` totals it reads.
    fn totals(&self) -> usize {
        match self {
            Formula::Total(_) => 1,
            Formula::Agg(_) | Formula::Num(_) => 0,
            Formula::Op(_, a, b) => a.totals() + b.totals(),
            Formula::Neg(a) => a.totals(),
        }
    }

    /// How many released values its interval rests on, for a result of
    /// `rows` rows: its row's aggregates, and every row's for a total.
    fn cells(&self, rows: usize) -> usize {
        self.aggregates() + self.totals() * rows
    }

    /// Its value and the range it takes over the aggregates' intervals
    /// (interval arithmetic; `None` when a divisor's interval holds 0, or
    /// an aggregate has no value).
    fn eval(
        &self,
        get: &dyn Fn(&str) -> Option<Ranged>,
        total: &dyn Fn(&str) -> Option<Ranged>,
    ) -> Option<Ranged> {
        Some(match self {
            Formula::Agg(t) => get(t)?,
            Formula::Total(t) => total(t)?,
            Formula::Num(x) => (*x, *x, *x),
            Formula::Neg(a) => {
                let (v, lo, hi) = a.eval(get, total)?;
                (-v, -hi, -lo)
            }
            Formula::Op(op, a, b) => {
                let (x, xl, xh) = a.eval(get, total)?;
                let (y, yl, yh) = b.eval(get, total)?;
                match op {
                    '+' => (x + y, xl + yl, xh + yh),
                    '-' => (x - y, xl - yh, xh - yl),
                    '*' => {
                        let c = [xl * yl, xl * yh, xh * yl, xh * yh];
                        (
                            x * y,
                            c.iter().copied().fold(f64::INFINITY, f64::min),
                            c.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                        )
                    }
                    _ => {
                        if yl <= 0.0 && yh >= 0.0 {
                            return None;
                        }
                        let c = [xl / yl, xl / yh, xh / yl, xh / yh];
                        (
                            x / y,
                            c.iter().copied().fold(f64::INFINITY, f64::min),
                            c.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                        )
                    }
                }
            }
        })
    }
}

/// `ROUND(x)` or `ROUND(x, d)`: `x` and `d`.
fn round_of(e: &Expr) -> Result<Option<(Expr, i32)>, String> {
    let Expr::Function(f) = e else {
        return Ok(None);
    };
    if !f.name.to_string().eq_ignore_ascii_case("ROUND") {
        return Ok(None);
    }
    let FunctionArguments::List(list) = &f.args else {
        return Ok(None);
    };
    let args: Vec<&Expr> = list
        .args
        .iter()
        .filter_map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
            _ => None,
        })
        .collect();
    let (inner, digits) = match args.as_slice() {
        [x] => (*x, 0.0),
        [x, d] => (
            *x,
            number(d)
                .filter(|d| d.fract() == 0.0 && (-15.0..=15.0).contains(d))
                .ok_or_else(|| {
                    format!("{e}: the digits of ROUND must be a whole number from -15 to 15")
                })?,
        ),
        _ => {
            return Err(format!(
                "{e}: ROUND takes an aggregate and the digits, e.g. ROUND(AVG(traffickMonths), 1)"
            ))
        }
    };
    if formula(inner, &mut Vec::new()).is_none_or(|f| f.aggregates() == 0) {
        return Err(format!(
            "{e}: ROUND applies to an aggregate, e.g. ROUND(AVG(traffickMonths), 1); the coordinator rounds the released value"
        ));
    }
    Ok(Some((inner.clone(), digits as i32)))
}

fn conjuncts<'a>(e: &'a Expr, out: &mut Vec<&'a Expr>) {
    match e {
        Expr::Nested(inner) => conjuncts(inner, out),
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            conjuncts(left, out);
            conjuncts(right, out);
        }
        other => out.push(other),
    }
}

fn number(e: &Expr) -> Option<f64> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.parse().ok(),
            _ => None,
        },
        Expr::UnaryOp {
            op: sqlparser::ast::UnaryOperator::Minus,
            expr,
        } => number(expr).map(|x| -x),
        Expr::Nested(inner) => number(inner),
        _ => None,
    }
}

impl PostProcess {
    /// The confidence at which a formula's aggregates must be combined so
    /// that its interval, the range of the formula over theirs, holds with
    /// 95% (a union bound over the `k` released values it rests on: `0.05
    /// / k` each); `rows` is the number of rows of the combined result (a
    /// `SUM(...) OVER ()` total rests on every row's value). `None` when no
    /// formula reads more than one value.
    pub fn alpha(&self, rows: usize) -> Option<f64> {
        let k = self
            .derived
            .iter()
            .map(|(_, f)| f.cells(rows.max(1)))
            .max()?;
        (k > 1).then(|| crate::combine::ALPHA / k as f64)
    }
}

/// Computes `p`'s formulas into new outputs of `c`, then drops the
/// aggregates that were asked only for them.
fn derive(c: &mut Combined, p: &PostProcess, components: Option<&Combined>) -> Result<(), String> {
    if p.derived.is_empty() {
        return Ok(());
    }
    let index = |c: &Combined, t: &str| c.outputs.iter().position(|o| norm(o) == t);
    let mut columns: Vec<Vec<Option<Estimate>>> = Vec::new();
    for (label, f) in &p.derived {
        let wide = if f.cells(c.rows.len().max(1)) > 1 {
            components.ok_or_else(|| {
                format!("{label}: its aggregates' wider intervals are missing (combine them at PostProcess::alpha)")
            })?
        } else {
            &*c
        };
        if wide.rows.len() != c.rows.len() {
            return Err(format!(
                "{label}: the answer changed between its two combinations"
            ));
        }
        let column = c
            .rows
            .iter()
            .zip(&wide.rows)
            .map(|(row, wrow)| {
                let get = |t: &str| -> Option<Ranged> {
                    let v = row.estimates.get(index(c, t)?)?.as_ref()?.value;
                    let w = wrow.estimates.get(index(wide, t)?)?.as_ref()?;
                    Some((v, w.ci_low, w.ci_high))
                };
                // A total: the sum of every row's value, its range the sum
                // of their (wide) intervals' ends.
                let total = |t: &str| -> Option<Ranged> {
                    let (i, wi) = (index(c, t)?, index(wide, t)?);
                    c.rows.iter().zip(&wide.rows).try_fold(
                        (0.0, 0.0, 0.0),
                        |(v, lo, hi), (r, w)| {
                            let x = r.estimates.get(i)?.as_ref()?.value;
                            let e = w.estimates.get(wi)?.as_ref()?;
                            Some((v + x, lo + e.ci_low, hi + e.ci_high))
                        },
                    )
                };
                f.eval(&get, &total).and_then(|(value, lo, hi)| {
                    (value.is_finite() && lo.is_finite() && hi.is_finite()).then_some(Estimate {
                        value,
                        ci_low: lo.min(value),
                        ci_high: hi.max(value),
                    })
                })
            })
            .collect();
        columns.push(column);
    }
    for ((label, _), column) in p.derived.iter().zip(columns) {
        c.outputs.push(label.clone());
        for (row, e) in c.rows.iter_mut().zip(column) {
            row.estimates.push(e);
        }
    }
    let mut hidden: Vec<usize> = p.hidden.iter().filter_map(|t| index(c, &t.0)).collect();
    hidden.sort_unstable_by(|a, b| b.cmp(a));
    for i in hidden {
        c.outputs.remove(i);
        for row in &mut c.rows {
            if i < row.estimates.len() {
                row.estimates.remove(i);
            }
        }
    }
    // Back in the order of the SELECT list as written.
    let rank = |label: &str| {
        p.select_order
            .iter()
            .position(|w| *w == norm(label))
            .unwrap_or(usize::MAX)
    };
    let mut order: Vec<usize> = (0..c.outputs.len()).collect();
    order.sort_by_key(|&i| rank(&c.outputs[i]));
    c.outputs = order.iter().map(|&i| c.outputs[i].clone()).collect();
    for row in &mut c.rows {
        if row.estimates.len() == order.len() {
            row.estimates = order.iter().map(|&i| row.estimates[i]).collect();
        }
    }
    Ok(())
}

/// Where a target's values are in a combined result.
#[derive(Clone, Copy)]
enum Column {
    Key(usize),
    Output(usize),
}

fn resolve(c: &Combined, t: &Target) -> Result<Column, String> {
    if let Some(i) = c.group_by.iter().position(|g| norm(g) == t.0) {
        return Ok(Column::Key(i));
    }
    if let Some(i) = c.outputs.iter().position(|o| norm(o) == t.0) {
        return Ok(Column::Output(i));
    }
    let mut known: Vec<&str> = c.group_by.iter().map(String::as_str).collect();
    known.extend(c.outputs.iter().map(String::as_str));
    Err(format!(
        "{}: not a column or aggregate of the result (it has {})",
        t.0,
        known.join(", ")
    ))
}

/// The released value of a row (NaN when the row has none).
fn value(r: &Row, i: usize) -> f64 {
    r.estimates
        .get(i)
        .and_then(|e| e.as_ref())
        .map_or(f64::NAN, |e| e.value)
}

fn order(a: &Row, b: &Row, col: Column, desc: bool) -> Ordering {
    let o = match col {
        Column::Output(i) => {
            let (x, y) = (value(a, i), value(b, i));
            // Rows without a value come last either way.
            match (x.is_nan(), y.is_nan()) {
                (true, true) => return Ordering::Equal,
                (true, false) => return Ordering::Greater,
                (false, true) => return Ordering::Less,
                _ => x.total_cmp(&y),
            }
        }
        Column::Key(i) => {
            let (x, y) = (&a.key[i], &b.key[i]);
            // Numbers by value; BIN ranges (`[low, high)`) by their low end.
            let number = |k: &str| {
                k.parse::<f64>().ok().or_else(|| {
                    let low = k.strip_prefix('[')?.split(',').next()?;
                    low.trim().parse::<f64>().ok()
                })
            };
            match (number(x), number(y)) {
                (Some(x), Some(y)) => x.total_cmp(&y),
                _ => x.cmp(y),
            }
        }
    };
    if desc {
        o.reverse()
    } else {
        o
    }
}

/// Applies `p` to `c`'s rows: the formulas, then HAVING, then ORDER BY
/// (stable), then LIMIT, then ROUND; and says so in `c.post_processing`.
/// A dry run has no values: only the note is set. `components` is the same
/// answer combined with `1 - alpha` intervals at [`PostProcess::alpha`]
/// (needed when a formula reads several aggregates).
pub fn apply(
    c: &mut Combined,
    p: &PostProcess,
    components: Option<&Combined>,
) -> Result<(), String> {
    derive(c, p, components)?;
    let having: Vec<(Column, Cmp, f64)> = p
        .having
        .iter()
        .map(|(t, cmp, x)| Ok((resolve(c, t)?, *cmp, *x)))
        .collect::<Result<_, String>>()?;
    let order_by: Vec<(Column, bool)> = p
        .order_by
        .iter()
        .map(|(t, d)| Ok((resolve(c, t)?, *d)))
        .collect::<Result<_, String>>()?;
    let round: Vec<(usize, i32)> = p
        .round
        .iter()
        .map(|(t, d)| match resolve(c, t)? {
            Column::Output(i) => Ok((i, *d)),
            Column::Key(_) => Err(format!(
                "ROUND({}): round an aggregate, not a GROUP BY column",
                t.0
            )),
        })
        .collect::<Result<_, String>>()?;
    let formulas = if p.derived.is_empty() {
        String::new()
    } else {
        "; a formula over several aggregates has the range of the formula over their intervals, each at 1 - 0.05/k for k aggregates, so it holds with at least 95% (a union bound); a ratio whose divisor's interval holds 0 has no value".to_string()
    };
    c.post_processing = Some(format!(
        "{}: applied by the coordinator to the combined noisy values (post-processing: no privacy cost; orders and cuts are of noisy values, so a row near the cut may rank differently from its true value; rounded intervals are widened outwards{formulas})",
        p.text
    ));
    if c.dry_run {
        return Ok(());
    }
    c.rows.retain(|r| {
        having.iter().all(|&(col, cmp, x)| match col {
            Column::Output(i) => cmp.holds(value(r, i), x),
            Column::Key(i) => r.key[i].parse::<f64>().is_ok_and(|v| cmp.holds(v, x)),
        })
    });
    c.rows.sort_by(|a, b| {
        order_by
            .iter()
            .map(|&(col, desc)| order(a, b, col, desc))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    });
    if let Some(n) = p.limit {
        c.rows.truncate(n);
    }
    for r in &mut c.rows {
        for &(i, digits) in &round {
            if let Some(Some(e)) = r.estimates.get_mut(i) {
                let f = 10f64.powi(digits);
                e.value = (e.value * f).round() / f;
                e.ci_low = (e.ci_low * f).floor() / f;
                e.ci_high = (e.ci_high * f).ceil() / f;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_without_post_processing_is_sent_unchanged() {
        let sql = "select gender,  COUNT(*) FROM cases   GROUP BY gender";
        assert_eq!(split(sql).unwrap(), (sql.to_string(), None));
    }

    #[test]
    fn order_limit_having_and_round_are_taken_out_for_the_coordinator() {
        let (core, post) = split(
            "SELECT citizenship, COUNT(*) AS n, ROUND(AVG(traffickMonths), 1) FROM cases \
             GROUP BY citizenship HAVING COUNT(*) >= 100 AND n < 5000 ORDER BY n DESC, 1 LIMIT 10",
        )
        .unwrap();
        assert_eq!(
            core,
            "SELECT citizenship, COUNT(*) AS n, AVG(traffickMonths) FROM cases GROUP BY citizenship"
        );
        let p = post.unwrap();
        assert_eq!(
            p.having,
            vec![
                (Target("COUNT(*)".into()), Cmp::Ge, 100.0),
                (Target("COUNT(*)".into()), Cmp::Lt, 5000.0)
            ]
        );
        assert_eq!(
            p.order_by,
            vec![
                (Target("COUNT(*)".into()), true),
                (Target("CITIZENSHIP".into()), false)
            ]
        );
        assert_eq!(p.limit, Some(10));
        assert_eq!(p.round, vec![(Target("AVG(TRAFFICKMONTHS)".into()), 1)]);
    }

    #[test]
    fn bin_ranges_and_numbers_order_by_value() {
        let row = |k: &str| Row {
            key: vec![k.to_string()],
            estimates: Vec::new(),
            nodes: Vec::new(),
        };
        let mut rows: Vec<Row> = ["[13, 25)", "[108, 120]", "[0, 13)", "(missing)"]
            .map(row)
            .into();
        rows.sort_by(|a, b| order(a, b, Column::Key(0), false));
        let keys: Vec<&str> = rows.iter().map(|r| r.key[0].as_str()).collect();
        assert_eq!(keys, ["(missing)", "[0, 13)", "[13, 25)", "[108, 120]"]);
        let mut rows: Vec<Row> = ["10", "9", "-1"].map(row).into();
        rows.sort_by(|a, b| order(a, b, Column::Key(0), true));
        let keys: Vec<&str> = rows.iter().map(|r| r.key[0].as_str()).collect();
        assert_eq!(keys, ["10", "9", "-1"]);
    }

    #[test]
    fn per_row_keys_are_sent_as_written() {
        for sql in [
            "SELECT COALESCE(traffickMonths, -1) / 24 AS d, COUNT(*) FROM cases GROUP BY d",
            "SELECT BIN(traffickMonths, 4) + 1, COUNT(*) FROM cases GROUP BY 1",
            "SELECT traffickMonths / 12 AS y, COUNT(*) FROM cases GROUP BY y",
        ] {
            let (core, post) = split(sql).unwrap();
            assert_eq!(core, sql);
            assert!(post.is_none(), "{sql}");
        }
    }

    #[test]
    fn formulas_send_their_aggregates_and_keep_their_labels() {
        let (core, post) = split(
            "SELECT gender, SUM(isForcedLabour) / COUNT(isForcedLabour) AS share, COUNT(*), \
             ROUND(100.0 * AVG(isForcedLabour), 1) AS pct FROM cases GROUP BY gender ORDER BY pct DESC",
        )
        .unwrap();
        assert_eq!(
            core,
            "SELECT gender, SUM(isForcedLabour) AS share, COUNT(*), AVG(isForcedLabour) AS pct, COUNT(isForcedLabour) FROM cases GROUP BY gender"
        );
        let p = post.unwrap();
        assert_eq!(p.derived.len(), 2);
        assert_eq!(p.derived[1].0, "100.0 * AVG(isForcedLabour)");
        assert_eq!(
            p.hidden,
            vec![
                Target("SUM(ISFORCEDLABOUR)".into()),
                Target("COUNT(ISFORCEDLABOUR)".into()),
                Target("AVG(ISFORCEDLABOUR)".into())
            ]
        );
        assert_eq!(
            p.order_by,
            vec![(Target("100.0*AVG(ISFORCEDLABOUR)".into()), true)]
        );
        assert_eq!(
            p.round,
            vec![(Target("100.0*AVG(ISFORCEDLABOUR)".into()), 1)]
        );
        // Two aggregates in one formula: each at 97.5%.
        assert_eq!(p.alpha(1), Some(0.025));
    }

    /// `SUM(agg) OVER ()` is the total of the result's rows: the nodes are
    /// sent the aggregate, and the union bound covers every row's value.
    #[test]
    fn a_share_of_the_total_is_a_formula_over_every_row() {
        let (core, post) = split(
            "SELECT gender, COUNT(*) * 1.0 / SUM(COUNT(*)) OVER () AS share FROM cases GROUP BY gender",
        )
        .unwrap();
        assert_eq!(
            core,
            "SELECT gender, COUNT(*) AS share FROM cases GROUP BY gender"
        );
        let p = post.unwrap();
        assert_eq!(p.derived.len(), 1);
        // This row's count and the 4 rows of the total: 5 values.
        assert_eq!(p.alpha(4), Some(0.01));
        // Windows other than a plain OVER () are left to the planner to refuse.
        let (core, post) = split(
            "SELECT gender, SUM(COUNT(*)) OVER (PARTITION BY gender) FROM cases GROUP BY gender",
        )
        .unwrap();
        assert!(post.is_none() && core.contains("PARTITION BY"), "{core}");
    }

    /// A sum or an average of a column divided by a decimal (or times a
    /// fraction) is the aggregate scaled, computed here; integer division
    /// stays per row, for the nodes.
    #[test]
    fn exact_scalings_are_applied_to_the_aggregate() {
        let (core, post) = split(
            "SELECT AVG(traffickMonths / 12.0) AS years, SUM(0.5 * traffickMonths) FROM cases",
        )
        .unwrap();
        assert_eq!(
            core,
            "SELECT AVG(traffickMonths) AS years, SUM(traffickMonths) FROM cases"
        );
        let p = post.unwrap();
        assert_eq!(p.derived.len(), 2);
        assert_eq!(p.alpha(1), None, "one aggregate each: no wider intervals");
        let (core, post) = split("SELECT AVG(traffickMonths * 1.0 / 12) FROM cases").unwrap();
        assert_eq!(core, "SELECT AVG(traffickMonths * 1.0) FROM cases");
        assert!(post.is_some());
        let sql = "SELECT AVG(traffickMonths / 12) FROM cases";
        assert_eq!(split(sql).unwrap(), (sql.to_string(), None));
    }

    #[test]
    fn what_cannot_be_post_processed_is_refused_saying_why() {
        for (sql, says) in [
            (
                "SELECT gender, COUNT(*) FROM cases GROUP BY gender HAVING SUM(traffickMonths) > 3",
                "not in the SELECT list",
            ),
            (
                "SELECT gender, COUNT(*) FROM cases GROUP BY gender ORDER BY 3",
                "has 2 items",
            ),
            (
                "SELECT gender, COUNT(*) FROM cases GROUP BY gender LIMIT 5 OFFSET 5",
                "no OFFSET",
            ),
            (
                "SELECT ROUND(traffickMonths, 1) FROM cases",
                "applies to an aggregate",
            ),
        ] {
            let e = split(sql).unwrap_err();
            assert!(e.contains(says), "{sql}: {e}");
        }
    }
}
