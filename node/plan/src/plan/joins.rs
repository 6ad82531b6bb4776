//! Joins to public lookup tables (`crate::lookup`): taken out of the
//! query at parse, then resolved against the schema into CASE buckets and
//! IN lists over the dataset's own column, so the engine and the push-down
//! never see a join.

use super::error::{unsupported, PlanError};
use super::parse::column_name;
use sqlparser::ast::{
    BinaryOperator, Expr, GroupByExpr, ObjectNamePart, SelectItem, TableFactor, UnaryOperator,
    Value,
};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;

use crate::lookup::Lookup;
use crate::schema::{Column, Schema};
/// A JOIN as written, taken out of the query at parse: resolved against
/// the schema's tables (the dataset's own lookup tables, then the
/// built-in ones) by [`resolve`].
#[derive(Debug, Clone)]
pub(crate) struct WrittenJoin {
    /// The table's name as written.
    table: String,
    /// Its alias, if any.
    alias: Option<String>,
    /// The two sides of `ON a = b`, or `None` for any other constraint.
    on: Option<(Expr, Expr)>,
    /// INNER (true) or LEFT.
    inner: bool,
}

/// A join of the dataset to a public lookup table ([`crate::lookup`]).
#[derive(Debug, Clone)]
pub(crate) struct PublicJoin {
    table: Lookup,
    /// The names the query calls it by: its alias, else its name.
    name: String,
    /// The dataset column joined to the table's key (ON).
    column: String,
    /// INNER: records whose value has no key in the table are dropped;
    /// LEFT: kept, the table's value missing for them.
    inner: bool,
}

/// Takes the JOINs out of `select`, checking their form: `[INNER | LEFT]
/// JOIN table [alias] ON a = b`. Which tables are public is known only
/// with the schema ([`resolve`]).
pub(crate) fn public_joins(
    select: &mut sqlparser::ast::Select,
) -> Result<Vec<WrittenJoin>, PlanError> {
    use sqlparser::ast::{JoinConstraint, JoinOperator};
    let [from] = select.from.as_mut_slice() else {
        return Ok(Vec::new());
    };
    let mut joins = Vec::new();
    for j in &from.joins {
        let TableFactor::Table {
            name,
            alias,
            args: None,
            ..
        } = &j.relation
        else {
            return unsupported(format!(
                "JOIN {}: only a public lookup table can be joined",
                j.relation
            ));
        };
        let table = match name.0.as_slice() {
            [ObjectNamePart::Identifier(id)] => id.value.clone(),
            _ => name.to_string(),
        };
        let (constraint, inner) = match &j.join_operator {
            JoinOperator::Join(c) | JoinOperator::Inner(c) => (c, true),
            JoinOperator::Left(c) | JoinOperator::LeftOuter(c) => (c, false),
            _ => {
                return unsupported(format!(
                    "JOIN {name}: only [INNER] JOIN and LEFT JOIN to a public lookup table are supported"
                ))
            }
        };
        let on = match constraint {
            JoinConstraint::On(Expr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            }) => Some(((**left).clone(), (**right).clone())),
            _ => None,
        };
        joins.push(WrittenJoin {
            table,
            alias: alias.as_ref().map(|a| a.name.value.clone()),
            on,
            inner,
        });
    }
    from.joins.clear();
    Ok(joins)
}

/// Each written join resolved against the schema's tables (its own
/// lookup tables, then the built-in ones): `ON table.key = column`. A join
/// to anything else (another dataset) is refused saying why: no
/// sensitivity follows from the schemas for a private join.
pub(crate) fn resolve(
    written: &[WrittenJoin],
    schema: &Schema,
) -> Result<Vec<PublicJoin>, PlanError> {
    let mut joins = Vec::new();
    for w in written {
        let table = schema.lookup(&w.table).ok_or_else(|| {
            PlanError::unsupported(format!(
                "JOIN {}: joins between private datasets are not supported (a record could pair with any number of records of the other, so no sensitivity follows from the schemas); join a public lookup table ({}), or query each dataset on its own",
                w.table,
                schema.lookup_names().join(", ")
            ))
        })?;
        let name = w.alias.clone().unwrap_or_else(|| table.name.clone());
        let on = || {
            PlanError::unsupported(format!(
                "JOIN {}: join on {name}.{} = a column of the dataset",
                table.name, table.key
            ))
        };
        let is_key = |e: &Expr| {
            matches!(e, Expr::CompoundIdentifier(p) if p.len() == 2
                && p[0].value.eq_ignore_ascii_case(&name)
                && p[1].value.eq_ignore_ascii_case(&table.key))
        };
        let (left, right) = w.on.as_ref().ok_or_else(on)?;
        let column = if is_key(left) {
            column_name(right)
        } else if is_key(right) {
            column_name(left)
        } else {
            None
        }
        .ok_or_else(on)?;
        joins.push(PublicJoin {
            table,
            name,
            column,
            inner: w.inner,
        });
    }
    Ok(joins)
}

/// `col IN (keys of the table whose value passes)` for a join.
pub(crate) type KeysWhere<'a> =
    dyn Fn(&PublicJoin, &dyn Fn(&str) -> bool) -> Result<Expr, PlanError> + 'a;

/// What a name refers to in a query joining public tables.
pub(crate) enum LookupRef<'a> {
    /// The table's value column (`r.region`).
    Value(&'a PublicJoin),
    /// The table's key column (`r.country`): the dataset's column.
    Key(&'a PublicJoin),
}

pub(crate) fn lookup_ref<'a>(joins: &'a [PublicJoin], e: &Expr) -> Option<LookupRef<'a>> {
    match e {
        Expr::Nested(inner) => lookup_ref(joins, inner),
        Expr::CompoundIdentifier(p) if p.len() == 2 => {
            let j = joins
                .iter()
                .find(|j| j.name.eq_ignore_ascii_case(&p[0].value))?;
            if p[1].value.eq_ignore_ascii_case(&j.table.value) {
                Some(LookupRef::Value(j))
            } else if p[1].value.eq_ignore_ascii_case(&j.table.key) {
                Some(LookupRef::Key(j))
            } else {
                None
            }
        }
        // Unqualified: the value column of the one joined table that has it.
        Expr::Identifier(id) => {
            let mut found = joins
                .iter()
                .filter(|j| id.value.eq_ignore_ascii_case(&j.table.value));
            match (found.next(), found.next()) {
                (Some(j), None) => Some(LookupRef::Value(j)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// An expression the planner writes itself (never the analyst's text).
pub(crate) fn generated(sql: &str) -> Result<Expr, PlanError> {
    Parser::new(&GenericDialect {})
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| {
            PlanError::unsupported(format!(
                "internal: a generated expression does not parse: {e}"
            ))
        })
}

pub(crate) fn quoted_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub(crate) fn quoted_text(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The query over the dataset alone that a query joining public tables
/// means: the table's value in SELECT and GROUP BY becomes a CASE bucket
/// over the joined column (`CASE WHEN country IN ('DE', 'FR') THEN
/// 'Europe' ... END`, unmatched and missing values the (missing) key), a
/// condition on it an IN list of the keys with those values, its key the
/// column itself; an INNER join also keeps only the records whose value
/// has a key. Only keys within the column's declared domain are listed.
pub(crate) fn resolve_joins(
    select: &sqlparser::ast::Select,
    written: &[WrittenJoin],
    schema: &Schema,
) -> Result<sqlparser::ast::Select, PlanError> {
    let joins = &resolve(written, schema)?;
    // Keys of the table present in each join's column, with their values.
    let mut keyed: Vec<Vec<(&str, &str)>> = Vec::new();
    for j in joins {
        let (_, col) = schema.column(&j.column).map_err(PlanError::unknown_name)?;
        let declared = |k: &str| match col {
            Column::Categorical { domain, .. } => domain.iter().any(|d| d == k),
            Column::Open { .. } => true,
            _ => false,
        };
        if !matches!(col, Column::Categorical { .. } | Column::Open { .. }) {
            return unsupported(format!(
                "JOIN {} ON ... {}: {} is {}; a lookup table joins a categorical column",
                j.table.name,
                j.column,
                j.column,
                col.kind_name()
            ));
        }
        keyed.push(
            j.table
                .rows
                .iter()
                .flat_map(|(v, keys)| keys.iter().map(move |k| (k.as_str(), v.as_str())))
                .filter(|(k, _)| declared(k))
                .collect(),
        );
    }
    let index = |j: &PublicJoin| joins.iter().position(|x| std::ptr::eq(x, j)).unwrap_or(0);
    // `col IN (keys whose value passes)`, or FALSE (never unknown) if none.
    let keys_where = |j: &PublicJoin, pass: &dyn Fn(&str) -> bool| -> Result<Expr, PlanError> {
        let keys: Vec<String> = keyed[index(j)]
            .iter()
            .filter(|(_, v)| pass(v))
            .map(|(k, _)| quoted_text(k))
            .collect();
        let c = quoted_ident(&j.column);
        generated(&if keys.is_empty() {
            format!("({c} IS NULL AND {c} IS NOT NULL)")
        } else {
            format!("{c} IN ({})", keys.join(", "))
        })
    };
    let bucket_of = |j: &PublicJoin| -> Result<Expr, PlanError> {
        let mut case = String::from("CASE");
        for (value, _) in &j.table.rows {
            let keys: Vec<String> = keyed[index(j)]
                .iter()
                .filter(|(_, v)| v == value)
                .map(|(k, _)| quoted_text(k))
                .collect();
            if !keys.is_empty() {
                case.push_str(&format!(
                    " WHEN {} IN ({}) THEN {}",
                    quoted_ident(&j.column),
                    keys.join(", "),
                    quoted_text(value)
                ));
            }
        }
        if case == "CASE" {
            return unsupported(format!(
                "JOIN {}: no value of {} is a key of the table",
                j.table.name, j.column
            ));
        }
        generated(&format!("{case} END"))
    };
    let column_of = |j: &PublicJoin| generated(&quoted_ident(&j.column));
    let mut out = select.clone();
    for item in &mut out.projection {
        let (e, alias) = match item {
            SelectItem::UnnamedExpr(e) => (e.clone(), None),
            SelectItem::ExprWithAlias { expr, alias } => (expr.clone(), Some(alias.clone())),
            _ => continue,
        };
        let (expr, name) = match lookup_ref(joins, &e) {
            Some(LookupRef::Value(j)) => (bucket_of(j)?, j.table.value.as_str()),
            Some(LookupRef::Key(j)) => (column_of(j)?, j.table.key.as_str()),
            None => continue,
        };
        *item = SelectItem::ExprWithAlias {
            expr,
            alias: alias.unwrap_or_else(|| sqlparser::ast::Ident::new(name)),
        };
    }
    if let GroupByExpr::Expressions(exprs, _) = &mut out.group_by {
        for e in exprs.iter_mut() {
            match lookup_ref(joins, e) {
                Some(LookupRef::Value(j)) => *e = bucket_of(j)?,
                Some(LookupRef::Key(j)) => *e = column_of(j)?,
                None => {}
            }
        }
    }
    // A condition on the value of a LEFT JOIN's table would be unknown
    // for a record whose value has no key, which an IN list cannot say.
    fn left_join_filter(j: &PublicJoin) -> Result<(), PlanError> {
        if j.inner {
            return Ok(());
        }
        unsupported(format!(
            "LEFT JOIN {}: to filter on {}.{}, use an INNER JOIN (a condition on it drops the records without a key anyway); with a LEFT JOIN, test it with IS [NOT] NULL",
            j.table.name, j.name, j.table.value
        ))
    }
    fn condition(
        e: &mut Expr,
        joins: &[PublicJoin],
        keys_where: &KeysWhere<'_>,
        column_of: &dyn Fn(&PublicJoin) -> Result<Expr, PlanError>,
    ) -> Result<(), PlanError> {
        let text = |x: &Expr| match x {
            Expr::Value(v) => match &v.value {
                Value::SingleQuotedString(t) => Some(t.clone()),
                _ => None,
            },
            _ => None,
        };
        let shown = e.to_string();
        let null = matches!(e, Expr::IsNull(_));
        let unsupported = || {
            PlanError::unsupported(format!(
                "{shown}: a lookup table's value compares with a quoted literal by =, <>, IN or IS [NOT] NULL"
            ))
        };
        let replacement = match e {
            Expr::Nested(x) | Expr::UnaryOp { expr: x, .. } => {
                return condition(x, joins, keys_where, column_of)
            }
            Expr::BinaryOp {
                left,
                op: BinaryOperator::And | BinaryOperator::Or,
                right,
            } => {
                condition(left, joins, keys_where, column_of)?;
                return condition(right, joins, keys_where, column_of);
            }
            Expr::BinaryOp { left, op, right } => {
                for side in [&mut *left, &mut *right] {
                    if let Some(LookupRef::Key(j)) = lookup_ref(joins, side) {
                        **side = column_of(j)?;
                    }
                }
                let (r, lit) = match (lookup_ref(joins, left), lookup_ref(joins, right)) {
                    (Some(LookupRef::Value(j)), None) => (j, text(right)),
                    (None, Some(LookupRef::Value(j))) => (j, text(left)),
                    (None, None) => return Ok(()),
                    _ => return Err(unsupported()),
                };
                let lit = lit.ok_or_else(unsupported)?;
                left_join_filter(r)?;
                match op {
                    BinaryOperator::Eq => keys_where(r, &|v| v == lit)?,
                    BinaryOperator::NotEq => keys_where(r, &|v| v != lit)?,
                    _ => return Err(unsupported()),
                }
            }
            Expr::InList {
                expr,
                list,
                negated,
            } => match lookup_ref(joins, expr) {
                Some(LookupRef::Key(j)) => {
                    **expr = column_of(j)?;
                    return Ok(());
                }
                Some(LookupRef::Value(j)) => {
                    left_join_filter(j)?;
                    let lits: Vec<String> = list
                        .iter()
                        .map(|l| text(l).ok_or_else(unsupported))
                        .collect::<Result<_, _>>()?;
                    let negated = *negated;
                    keys_where(j, &|v| lits.iter().any(|l| l == v) != negated)?
                }
                None => return Ok(()),
            },
            Expr::IsNull(x) | Expr::IsNotNull(x) => {
                match lookup_ref(joins, x) {
                    Some(LookupRef::Key(j)) => {
                        **x = column_of(j)?;
                        return Ok(());
                    }
                    Some(LookupRef::Value(j)) => {
                        // Never unknown: a missing column has no value.
                        let mapped = keys_where(j, &|_| true)?;
                        let c = column_of(j)?;
                        let present = Expr::IsNotNull(Box::new(c.clone()));
                        let has = Expr::BinaryOp {
                            left: Box::new(present),
                            op: BinaryOperator::And,
                            right: Box::new(Expr::Nested(Box::new(mapped))),
                        };
                        if null {
                            Expr::UnaryOp {
                                op: UnaryOperator::Not,
                                expr: Box::new(Expr::Nested(Box::new(has))),
                            }
                        } else {
                            has
                        }
                    }
                    None => return Ok(()),
                }
            }
            Expr::Between { expr, .. } => {
                if lookup_ref(joins, expr).is_some() {
                    return Err(unsupported());
                }
                return Ok(());
            }
            _ => return Ok(()),
        };
        *e = Expr::Nested(Box::new(replacement));
        Ok(())
    }
    if let Some(w) = &mut out.selection {
        condition(w, joins, &keys_where, &column_of)?;
    }
    // An inner join keeps the records whose value is a key of the table.
    for j in joins.iter().filter(|j| j.inner) {
        let kept = keys_where(j, &|_| true)?;
        out.selection = Some(match out.selection.take() {
            Some(w) => Expr::BinaryOp {
                left: Box::new(Expr::Nested(Box::new(w))),
                op: BinaryOperator::And,
                right: Box::new(kept),
            },
            None => kept,
        });
    }
    Ok(out)
}
