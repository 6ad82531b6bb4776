//! Several aggregate queries asked together: a `UNION ALL` of SELECTs, or
//! the queries of `fedq query --file`, and how their privacy cost is split.
//!
//! **Parallel composition.** When the planner proves, from the queries and
//! the declared schema alone ([`fedq_plan::plan::provably_disjoint`]), that
//! the parts select disjoint records (`WHERE gender = 'Female'` and `WHERE
//! gender = 'Male'`), and they ask the same aggregates, they are sent as
//! *one* query grouped by which part a record meets (a CASE of their
//! WHERE clauses): each record falls in one cell, so each part gets the
//! full epsilon, and each node debits that epsilon once, which is exactly
//! what it releases. The cell of the records no part selects is released
//! too (it is part of the grouped query) and not shown.
//!
//! **Sequential composition.** Otherwise each part is its own query with
//! an even share of the budget; the shares add up to what was asked, and
//! each node debits each part as it answers it.
//!
//! Either way the result says how the cost was split
//! ([`Combined::post_processing`]).

use sqlparser::ast::{Expr, SelectItem, SetExpr, SetOperator, SetQuantifier, Statement, Value};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;

use fedq_plan::plan::{plan, provably_disjoint, MISSING_KEY};
use fedq_plan::schema::Schema;

use crate::client::Federation;
use crate::combine::Combined;
use crate::query::{ask, Answer, QueryError};
use crate::run::QueryOptions;

/// Most parts one UNION ALL may join.
pub const MAX_PARTS: usize = 16;

/// The SELECTs of `sql` if it is a `UNION ALL` of them, in order;
/// `Ok(None)` for any other statement (the planner explains those).
/// UNION (without ALL), INTERSECT and EXCEPT, and ORDER BY or LIMIT over
/// the whole union, are refused saying what to write.
pub fn union_parts(sql: &str) -> Result<Option<Vec<String>>, String> {
    let Ok(statements) = Parser::parse_sql(&GenericDialect {}, sql) else {
        return Ok(None);
    };
    let [Statement::Query(query)] = statements.as_slice() else {
        return Ok(None);
    };
    if !matches!(*query.body, SetExpr::SetOperation { .. }) {
        return Ok(None);
    }
    if query.order_by.is_some() || query.limit_clause.is_some() {
        return Err("ORDER BY and LIMIT over a whole UNION ALL are not supported; order or cut each part, or ask the parts as one query grouped by a CASE".into());
    }
    let mut parts = Vec::new();
    let mut stack = vec![query.body.as_ref()];
    while let Some(e) = stack.pop() {
        match e {
            SetExpr::SetOperation {
                op: SetOperator::Union,
                set_quantifier: SetQuantifier::All,
                left,
                right,
            } => {
                stack.push(right);
                stack.push(left);
            }
            SetExpr::SetOperation { op, .. } => {
                return Err(format!(
                    "{op} {}: only UNION ALL of aggregate queries is supported (a UNION without ALL would drop equal result rows, which noisy values make arbitrary); write UNION ALL",
                    if matches!(op, SetOperator::Union) { "(without ALL)" } else { "" }
                ))
            }
            SetExpr::Select(s) => parts.push(s.to_string()),
            SetExpr::Query(q) if q.order_by.is_none() && q.limit_clause.is_none() => {
                stack.push(q.body.as_ref())
            }
            other => {
                return Err(format!(
                    "{other}: a part of a UNION ALL must be a SELECT ... FROM dataset [WHERE ...] [GROUP BY ...]"
                ))
            }
        }
    }
    if parts.len() > MAX_PARTS {
        return Err(format!(
            "a UNION ALL may join at most {MAX_PARTS} parts; this one has {}",
            parts.len()
        ));
    }
    Ok(Some(parts))
}

/// One part of a set: its leading literal label (`SELECT 'female' AS
/// grp, COUNT(*) ...`), if written, and the query without it.
#[derive(Debug, Clone, PartialEq)]
struct Part {
    /// The label and its alias.
    label: Option<(String, Option<String>)>,
    /// The SELECT without the label.
    select: sqlparser::ast::Select,
}

fn part(sql: &str) -> Result<Part, String> {
    let statements =
        Parser::parse_sql(&GenericDialect {}, sql).map_err(|e| format!("SQL syntax error: {e}"))?;
    let [Statement::Query(query)] = statements.as_slice() else {
        return Err("expected one SELECT".into());
    };
    let SetExpr::Select(select) = query.body.as_ref() else {
        return Err("expected one SELECT".into());
    };
    let mut select = (**select).clone();
    let literal = |e: &Expr| match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(t) => Some(t.clone()),
            Value::Number(n, _) => Some(n.clone()),
            _ => None,
        },
        _ => None,
    };
    let label = match select.projection.first() {
        Some(SelectItem::UnnamedExpr(e)) => literal(e).map(|l| (l, None)),
        Some(SelectItem::ExprWithAlias { expr, alias }) => {
            literal(expr).map(|l| (l, Some(alias.value.clone())))
        }
        _ => None,
    };
    if label.is_some() {
        select.projection.remove(0);
    }
    Ok(Part { label, select })
}

/// How a set of queries is asked.
#[derive(Debug, Clone, PartialEq)]
pub enum Composition {
    /// One query answers every part (parallel composition: each part gets
    /// the full budget).
    Parallel {
        /// The query sent: the parts' aggregates grouped by a CASE of their
        /// WHERE clauses.
        sql: String,
        /// The name of that CASE column.
        column: String,
        /// Each part's key in it, in order.
        labels: Vec<String>,
    },
    /// Each part is its own query with an even share of the budget
    /// (sequential composition), for the reason given.
    Sequential {
        /// Why the parts could not be asked as one.
        why: String,
    },
}

/// Decides how `parts` (queries over one dataset, whose public `schema`
/// is given) are asked: as one query when they ask the same aggregates
/// and their WHERE clauses are provably disjoint, else one by one.
/// `labels` names the parts when they carry no literal label of their own.
pub fn compose(parts: &[String], schema: &Schema, labels: &[String]) -> Composition {
    let sequential = |why: &str| Composition::Sequential { why: why.into() };
    if parts.len() < 2 {
        return sequential("a single query");
    }
    let mut parsed = Vec::new();
    for p in parts {
        match part(p) {
            Ok(p) => parsed.push(p),
            Err(_) => return sequential("a part is not a plain SELECT"),
        }
    }
    // The same aggregates and groups, from the same dataset (the names
    // are the first part's, as in SQL).
    let shape = |p: &Part| {
        let mut s = p.select.clone();
        s.selection = None;
        for item in &mut s.projection {
            if let SelectItem::ExprWithAlias { expr, .. } = item {
                *item = SelectItem::UnnamedExpr(expr.clone());
            }
        }
        s.to_string()
    };
    if parsed.iter().any(|p| shape(p) != shape(&parsed[0])) {
        return sequential("the parts ask different aggregates or groups");
    }
    if parsed.iter().any(|p| p.select.having.is_some()) {
        return sequential("a part has HAVING");
    }
    for p in parts {
        match crate::post::split(p) {
            Ok((_, None)) => {}
            _ => return sequential(
                "a part has post-processing (ORDER BY, LIMIT, ROUND or arithmetic over aggregates)",
            ),
        }
    }
    let mut filters = Vec::new();
    for p in &parsed {
        let Some(w) = &p.select.selection else {
            return sequential("a part has no WHERE clause, so it overlaps the others");
        };
        let mut s = p.select.clone();
        s.selection = Some(w.clone());
        match plan(&s.to_string(), schema, usize::MAX) {
            Ok(planned) if planned.open_key.is_none() => filters.push(planned.filter),
            Ok(_) => return sequential("a part groups by an open-domain column"),
            Err(_) => return sequential("a part does not plan on its own"),
        }
    }
    for i in 0..filters.len() {
        for j in i + 1..filters.len() {
            if !provably_disjoint(filters[i].as_ref(), filters[j].as_ref(), schema) {
                return sequential(&format!(
                    "the WHERE clauses of parts {} and {} are not provably disjoint (a record could be in both)",
                    i + 1,
                    j + 1
                ));
            }
        }
    }
    let labels: Vec<String> = parsed
        .iter()
        .enumerate()
        .map(|(i, p)| match &p.label {
            Some((l, _)) => l.clone(),
            None => labels
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("part {}", i + 1)),
        })
        .collect();
    let mut distinct = labels.clone();
    distinct.sort();
    distinct.dedup();
    if distinct.len() != labels.len() || labels.iter().any(|l| l == MISSING_KEY) {
        return sequential("the parts' labels are not distinct");
    }
    let column = parsed[0]
        .label
        .as_ref()
        .and_then(|(_, a)| a.clone())
        .unwrap_or_else(|| "part".to_string());
    let mut case = String::from("CASE");
    for (p, l) in parsed.iter().zip(&labels) {
        if let Some(w) = &p.select.selection {
            case.push_str(&format!(" WHEN {w} THEN '{}'", l.replace('\'', "''")));
        }
    }
    case.push_str(" END");
    let mut merged = parsed[0].select.clone();
    merged.selection = None;
    let Ok(Some(Statement::Query(q))) =
        Parser::parse_sql(&GenericDialect {}, &format!("SELECT {case} AS {column}"))
            .map(|mut v| v.pop())
    else {
        return sequential("the parts' conditions do not form a CASE");
    };
    let SetExpr::Select(head) = *q.body else {
        return sequential("the parts' conditions do not form a CASE");
    };
    merged.projection.insert(0, head.projection[0].clone());
    let column_expr = Expr::Identifier(sqlparser::ast::Ident::new(column.clone()));
    match &mut merged.group_by {
        sqlparser::ast::GroupByExpr::Expressions(exprs, _) => {
            // A position counts the SELECT list, which now starts with the
            // part column: `GROUP BY 1` is `GROUP BY 2`.
            for e in exprs.iter_mut() {
                if let Expr::Value(v) = e {
                    if let Value::Number(n, _) = &mut v.value {
                        if let Ok(k) = n.parse::<u64>() {
                            *n = (k + 1).to_string();
                        }
                    }
                }
            }
            exprs.insert(0, column_expr)
        }
        sqlparser::ast::GroupByExpr::All(_) => return sequential("GROUP BY ALL"),
    }
    let sql = merged.to_string();
    if plan(&sql, schema, usize::MAX).is_err() {
        return sequential("the parts do not plan as one grouped query");
    }
    Composition::Parallel {
        sql,
        column,
        labels,
    }
}

/// The rows of part `label` of a result grouped by part, without the
/// part column (for `--file`, where each part is shown as asked).
pub fn part_of(c: &Combined, label: &str) -> Combined {
    let mut out = c.clone();
    out.rows
        .retain(|r| r.key.first().map(String::as_str) == Some(label));
    for r in &mut out.rows {
        r.key.remove(0);
    }
    if !out.group_by.is_empty() {
        out.group_by.remove(0);
    }
    out
}

/// A note on how the cost of `parts` parts was split, shown with the
/// result; for a dry run, how it would be split by the real run (which
/// composes the parts the same way).
pub fn cost_note(composition: &Composition, parts: usize, opts: &QueryOptions) -> String {
    let (unit, total) = if opts.rho > 0.0 {
        ("rho", opts.rho)
    } else {
        ("epsilon", opts.epsilon)
    };
    match (composition, opts.dry_run) {
        (Composition::Parallel { .. }, false) => format!(
            "{parts} parts over provably disjoint records, asked as one query grouped by part: each part got the full {unit} {total} and each node debited {unit} {total} once (parallel composition)"
        ),
        (Composition::Parallel { .. }, true) => format!(
            "dry run: {parts} parts over provably disjoint records would be asked as one query grouped by part (the query shown): each part would get the full {unit} {total} and each node would debit {unit} {total} once (parallel composition)"
        ),
        (Composition::Sequential { why }, false) => format!(
            "{parts} parts asked one by one with {unit} {} each, {total} in all (sequential composition: {why})",
            total / parts as f64
        ),
        (Composition::Sequential { why }, true) => format!(
            "dry run: {parts} parts would be asked one by one with {unit} {} each, {total} in all (sequential composition: {why})",
            total / parts as f64
        ),
    }
}

/// The public schema of `dataset` as each node serving it declares it
/// (nodes may declare different domains or bounds).
pub async fn schemas_of(fed: &Federation, dataset: &str, opts: &QueryOptions) -> Vec<Schema> {
    let described = crate::run::descriptions(fed, opts.calls).await;
    described
        .iter()
        .filter_map(|d| {
            d.datasets
                .iter()
                .find(|ds| ds.name == dataset)
                .and_then(|ds| crate::verify::schema_from_proto(ds).ok())
        })
        .collect()
}

/// [`compose`] under every node's schema: the parts are asked as one only
/// if they are provably disjoint under each (a proof under one node's
/// bounds need not hold under another's).
pub fn compose_all(parts: &[String], schemas: &[Schema], labels: &[String]) -> Composition {
    let Some(first) = schemas.first() else {
        return Composition::Sequential {
            why: "no node described the dataset".into(),
        };
    };
    let c = compose(parts, first, labels);
    if schemas[1..].iter().all(|s| compose(parts, s, labels) == c) {
        c
    } else {
        Composition::Sequential {
            why:
                "the nodes' schemas differ, and the parts are not provably disjoint under every one"
                    .into(),
        }
    }
}

/// Asks a UNION ALL (`parts` from [`union_parts`]) with the budget of
/// `opts`: as one grouped query when the parts are provably disjoint
/// (each gets the full budget), else part by part with an even share.
/// The rows of every part come back in one result, keyed by the part's
/// label.
pub async fn ask_union(
    fed: &Federation,
    parts: &[String],
    opts: &QueryOptions,
) -> Result<Answer, QueryError> {
    let mut datasets = Vec::new();
    for p in parts {
        datasets.push(fedq_plan::plan::dataset_of(p).map_err(|e| QueryError::Sql(e.to_string()))?);
    }
    if datasets.iter().any(|d| *d != datasets[0]) {
        return Err(QueryError::Sql(
            "the parts of a UNION ALL must query the same dataset; ask each dataset on its own; nothing was sent or spent"
                .into(),
        ));
    }
    // Checked before anything is spent: the parts line up as columns.
    let parsed = parts
        .iter()
        .map(|p| part(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(QueryError::Sql)?;
    let width = |p: &Part| {
        let groups = match &p.select.group_by {
            sqlparser::ast::GroupByExpr::Expressions(e, _) => e.len(),
            sqlparser::ast::GroupByExpr::All(_) => usize::MAX,
        };
        (p.label.is_some(), p.select.projection.len(), groups)
    };
    if parsed.iter().any(|p| width(p) != width(&parsed[0])) {
        return Err(QueryError::Sql(
            "the parts of a UNION ALL must select the same columns (the same number of group columns and aggregates, each with or without a leading label); nothing was sent or spent"
                .into(),
        ));
    }
    let schemas = schemas_of(fed, &datasets[0], opts).await;
    let composition = compose_all(parts, &schemas, &[]);
    let note = cost_note(&composition, parts.len(), opts);
    let mut answer = match &composition {
        Composition::Parallel { sql, .. } => {
            let mut a = ask(fed, sql, opts).await?;
            a.combined
                .rows
                .retain(|r| r.key.first().map(String::as_str) != Some(MISSING_KEY));
            a
        }
        Composition::Sequential { .. } => {
            let k = parts.len() as f64;
            let mut whole: Option<Answer> = None;
            for (i, Part { label, select }) in parsed.into_iter().enumerate() {
                let each = QueryOptions {
                    epsilon: opts.epsilon / k,
                    rho: opts.rho / k,
                    query_id: format!("{}/{}", opts.query_id, i + 1),
                    ..opts.clone()
                };
                let mut a = ask(fed, &select.to_string(), &each).await?;
                let (l, alias) = label.unwrap_or_else(|| (format!("part {}", i + 1), None));
                a.combined
                    .group_by
                    .insert(0, alias.unwrap_or_else(|| "part".into()));
                for r in &mut a.combined.rows {
                    r.key.insert(0, l.clone());
                }
                match &mut whole {
                    None => whole = Some(a),
                    Some(w) => {
                        w.combined.rows.extend(a.combined.rows);
                        w.outcomes.extend(a.outcomes);
                        w.audit_notes.extend(a.audit_notes);
                        w.audit_warning = w.audit_warning.take().or(a.audit_warning);
                        w.sent = format!("{}; {}", w.sent, a.sent);
                    }
                }
            }
            whole.ok_or_else(|| QueryError::Sql("an empty UNION ALL".into()))?
        }
    };
    answer.combined.epsilon = opts.epsilon;
    answer.combined.rho = opts.rho;
    answer.combined.post_processing = Some(match answer.combined.post_processing.take() {
        Some(p) => format!("{note}; {p}"),
        None => note,
    });
    Ok(answer)
}

/// For `fedq query --file`: when the queries of the set select provably
/// disjoint records and ask the same aggregates ([`compose`]), asks them as
/// one grouped query with the whole budget of `opts`, so each gets all of
/// it (parallel composition) and each node debits it once; returns each
/// query's answer, its rows as if asked alone, with a note on how the cost
/// was split. `None` when they cannot be asked as one: then each is asked
/// on its own with an even share of the budget (sequential composition).
/// A dry run (`opts.dry_run`) is composed the same way, so its plan (the
/// grouped query, at the whole budget) is what the real run will spend.
pub async fn ask_set(
    fed: &Federation,
    queries: &[String],
    opts: &QueryOptions,
) -> Option<Vec<Result<Answer, QueryError>>> {
    if queries.len() < 2 || queries.iter().any(|q| !matches!(union_parts(q), Ok(None))) {
        return None;
    }
    let datasets: Vec<String> = queries
        .iter()
        .map(|q| fedq_plan::plan::dataset_of(q).ok())
        .collect::<Option<_>>()?;
    if datasets.iter().any(|d| *d != datasets[0]) {
        return None;
    }
    let schemas = schemas_of(fed, &datasets[0], opts).await;
    let labels: Vec<String> = (1..=queries.len()).map(|i| i.to_string()).collect();
    let composition = compose_all(queries, &schemas, &labels);
    let Composition::Parallel { sql, labels, .. } = &composition else {
        return None;
    };
    let note = cost_note(&composition, queries.len(), opts);
    Some(match ask(fed, sql, opts).await {
        Err(e) => queries.iter().map(|_| Err(e.clone())).collect(),
        Ok(whole) => labels
            .iter()
            .zip(queries)
            .map(|(label, q)| {
                let mut a = whole.clone();
                a.combined = part_of(&whole.combined, label);
                a.combined.post_processing = Some(format!("{note}; this is the part {q}"));
                Ok(a)
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedq_plan::schema::{ColumnSpec, ColumnType};

    fn schema() -> Schema {
        let col = |name: &str, kind, domain: Option<&[&str]>, b: Option<(i64, i64)>| ColumnSpec {
            open: None,
            name: name.into(),
            kind,
            domain: domain.map(|d| d.iter().map(|s| s.to_string()).collect()),
            min: b.map(|b| b.0),
            max: b.map(|b| b.1),
            bins: None,
        };
        Schema::from_specs(
            "cases",
            &[
                col(
                    "gender",
                    ColumnType::Categorical,
                    Some(&["Female", "Male"]),
                    None,
                ),
                col("isForcedLabour", ColumnType::Boolean, None, None),
                col("traffickMonths", ColumnType::Integer, None, Some((0, 120))),
            ],
        )
        .unwrap()
    }

    #[test]
    fn union_all_is_split_into_its_selects() {
        let parts = union_parts(
            "SELECT 'f' AS g, COUNT(*) FROM cases WHERE gender = 'Female' UNION ALL SELECT 'm', COUNT(*) FROM cases WHERE gender = 'Male' UNION ALL (SELECT 'x', COUNT(*) FROM cases WHERE gender IS NULL)",
        )
        .unwrap()
        .unwrap();
        assert_eq!(parts.len(), 3);
        assert!(parts[2].contains("gender IS NULL"), "{parts:?}");
        assert_eq!(union_parts("SELECT COUNT(*) FROM cases").unwrap(), None);
        for (sql, says) in [
            (
                "SELECT COUNT(*) FROM cases UNION SELECT COUNT(*) FROM cases",
                "write UNION ALL",
            ),
            (
                "SELECT COUNT(*) FROM cases EXCEPT SELECT COUNT(*) FROM cases",
                "only UNION ALL",
            ),
            (
                "SELECT COUNT(*) FROM cases UNION ALL SELECT COUNT(*) FROM cases ORDER BY 1",
                "ORDER BY and LIMIT over a whole UNION ALL",
            ),
        ] {
            let e = union_parts(sql).unwrap_err();
            assert!(e.contains(says), "{sql}: {e}");
        }
    }

    /// Disjoint parts asking the same aggregates become one grouped query;
    /// anything else is asked part by part, saying why.
    #[test]
    fn disjoint_parts_are_one_query_and_others_are_split() {
        let s = schema();
        let parts = [
            "SELECT 'women' AS who, COUNT(*), AVG(traffickMonths) FROM cases WHERE gender = 'Female'".to_string(),
            "SELECT 'men', COUNT(*), AVG(traffickMonths) FROM cases WHERE gender = 'Male' AND isForcedLabour = 1".to_string(),
        ];
        match compose(&parts, &s, &[]) {
            Composition::Parallel {
                sql,
                column,
                labels,
            } => {
                assert_eq!(column, "who");
                assert_eq!(labels, ["women", "men"]);
                assert!(sql.contains("GROUP BY who"), "{sql}");
                let p = plan(&sql, &s, usize::MAX).unwrap();
                assert_eq!(p.buckets[0].labels, ["women", "men"]);
            }
            other => panic!("{other:?}"),
        }
        let why = |parts: &[&str]| match compose(
            &parts.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            &s,
            &["a".into(), "b".into()],
        ) {
            Composition::Sequential { why } => why,
            other => panic!("{parts:?}: {other:?}"),
        };
        assert!(why(&[
            "SELECT COUNT(*) FROM cases WHERE gender = 'Female'",
            "SELECT COUNT(*) FROM cases WHERE isForcedLabour = 1",
        ])
        .contains("not provably disjoint"));
        assert!(why(&[
            "SELECT COUNT(*) FROM cases WHERE gender = 'Female'",
            "SELECT SUM(traffickMonths) FROM cases WHERE gender = 'Male'",
        ])
        .contains("different aggregates"));
        assert!(why(&[
            "SELECT COUNT(*) FROM cases",
            "SELECT COUNT(*) FROM cases WHERE gender = 'Male'",
        ])
        .contains("no WHERE"));
        // A proof must hold under every node's schema: with months bounded
        // by 99, `>= 100` selects nothing; with 120, it meets `<= 100`.
        let narrow = {
            let col = |name: &str, kind, b: Option<(i64, i64)>| ColumnSpec {
                open: None,
                name: name.into(),
                kind,
                domain: None,
                min: b.map(|b| b.0),
                max: b.map(|b| b.1),
                bins: None,
            };
            Schema::from_specs(
                "cases",
                &[col("traffickMonths", ColumnType::Integer, Some((0, 99)))],
            )
            .unwrap()
        };
        let parts = [
            "SELECT COUNT(*) FROM cases WHERE traffickMonths >= 100".to_string(),
            "SELECT COUNT(*) FROM cases WHERE traffickMonths <= 100".to_string(),
        ];
        assert!(matches!(
            compose(&parts, &narrow, &[]),
            Composition::Parallel { .. }
        ));
        assert!(matches!(
            compose_all(&parts, &[narrow, s.clone()], &[]),
            Composition::Sequential { .. }
        ));
        // Unlabelled parts (a --file set) take the labels given.
        match compose(
            &[
                "SELECT COUNT(*) FROM cases WHERE traffickMonths < 12".to_string(),
                "SELECT COUNT(*) FROM cases WHERE traffickMonths >= 12".to_string(),
            ],
            &s,
            &["a".into(), "b".into()],
        ) {
            Composition::Parallel { labels, column, .. } => {
                assert_eq!(labels, ["a", "b"]);
                assert_eq!(column, "part");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A dry run's note says how the real run would split the cost: the
    /// whole budget for each of disjoint parts, an even share otherwise.
    #[test]
    fn a_dry_run_notes_the_split_the_real_run_will_make() {
        let opts = |dry_run| QueryOptions {
            secure: false,
            epsilon: 1.0,
            rho: 0.0,
            dry_run,
            calls: crate::client::Calls {
                timeout: std::time::Duration::from_secs(1),
                retries: 0,
            },
            min_nodes: None,
            query_id: "q".into(),
        };
        let parts = [
            "SELECT BIN(traffickMonths, 4), COUNT(*) FROM cases WHERE gender = 'Female' GROUP BY 1"
                .to_string(),
            "SELECT BIN(traffickMonths, 4), COUNT(*) FROM cases WHERE gender = 'Male' GROUP BY 1"
                .to_string(),
        ];
        let parallel = compose(&parts, &schema(), &["1".into(), "2".into()]);
        assert!(
            matches!(&parallel, Composition::Parallel { sql, .. } if sql.contains("BIN(traffickMonths, 4)")),
            "{parallel:?}"
        );
        let dry = cost_note(&parallel, 2, &opts(true));
        assert!(
            dry.starts_with("dry run")
                && dry.contains("would get the full epsilon 1")
                && dry.contains("parallel composition"),
            "{dry}"
        );
        let real = cost_note(&parallel, 2, &opts(false));
        assert!(real.contains("each part got the full epsilon 1"), "{real}");
        let sequential = Composition::Sequential {
            why: "overlap".into(),
        };
        let dry = cost_note(&sequential, 2, &opts(true));
        assert!(
            dry.starts_with("dry run")
                && dry.contains("would be asked one by one with epsilon 0.5 each"),
            "{dry}"
        );
    }
}
