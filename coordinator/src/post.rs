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

use crate::combine::{Combined, Row};

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
    /// The clauses as written, for the note shown with the result.
    pub text: String,
}

/// A column or an aggregate of the SELECT list, by its normalised text
/// (upper case, no spaces), resolved against the result's columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target(String);

/// A comparison of HAVING.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    /// `=`
    Eq,
    /// `<>`
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

impl Cmp {
    fn holds(self, v: f64, x: f64) -> bool {
        match self {
            Cmp::Eq => v == x,
            Cmp::Ne => v != x,
            Cmp::Lt => v < x,
            Cmp::Le => v <= x,
            Cmp::Gt => v > x,
            Cmp::Ge => v >= x,
        }
    }
}

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
    // The SELECT list, for ORDER BY aliases and ordinals.
    let items: Vec<(Option<String>, String)> = select
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
    if !matches!(inner, Expr::Function(_)) {
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
            match (x.parse::<f64>(), y.parse::<f64>()) {
                (Ok(x), Ok(y)) => x.total_cmp(&y),
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

/// Applies `p` to `c`'s rows: HAVING, then ORDER BY (stable), then LIMIT,
/// then ROUND; and says so in `c.post_processing`. A dry run has no
/// values: only the note is set.
pub fn apply(c: &mut Combined, p: &PostProcess) -> Result<(), String> {
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
    c.post_processing = Some(format!(
        "{}: applied by the coordinator to the combined noisy values (post-processing: no privacy cost; orders and cuts are of noisy values, so a row near the cut may rank differently from its true value; rounded intervals are widened outwards)",
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
