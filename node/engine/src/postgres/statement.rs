//! The push-down: one parameterised SQL statement per query plan.
//!
//! The statement is built from the typed [`Plan`] and the validated
//! configuration only, never from the analyst's SQL text:
//!
//! - identifiers (table, columns) come from `node.toml`, were checked at load
//!   to be plain identifiers (see [`crate::source::is_plain_identifier`]) and
//!   are double-quoted here;
//! - every value (category strings, integer literals of the WHERE clause,
//!   declared bounds) is a bound parameter `$n` with an explicit type;
//! - the only other text is fixed SQL written below.
//!
//! The statement has stages, each a common table expression read by the
//! next:
//!
//! 1. `src`: one row per database row, each needed column turned into the
//!    engine's code (`NULL` = missing): a categorical value becomes its index
//!    in the declared domain (anything outside the domain, `''` and `'-99'`
//!    included, is missing); an integer is clamped to its declared bounds
//!    (`-99` and `NULL` are missing); a boolean is 0/1 (from a boolean column,
//!    or an integer column holding 0/1; anything else is missing).
//! 2. (reserved) per-person contribution bounding: see [`rows_stage`].
//! 3. The aggregation: the WHERE clause over codes with PostgreSQL's own
//!    three-valued logic (which is the engine's: a comparison on `NULL` is
//!    unknown, `NOT` keeps unknown, `IS NULL` is never unknown), GROUP BY
//!    the codes, one count or clamped sum per measurement. Only non-empty
//!    cells come back; [`assemble`] fills the rest with 0 in the engine's
//!    cell order.

use std::fmt::Write as _;

use tokio_postgres::types::ToSql;

use fedq_plan::plan::{KeyRule, MeasurementSpec, Plan, Predicate, RowExpr};
use fedq_plan::schema::{Column, Schema};

/// How a declared column is stored in the database, as found by the
/// start-up check. Decides how its codes are computed in the `src` stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbType {
    /// `text`, `character varying`, `character`.
    Text,
    /// `smallint`, `integer`, `bigint`.
    Integer,
    /// `boolean`.
    Boolean,
}

/// A bound parameter's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Param {
    /// `$n::bigint`.
    Int(i64),
    /// `$n::bigint[]`.
    Ints(Vec<i64>),
    /// `$n::text[]`.
    Texts(Vec<String>),
}

impl Param {
    /// The value as tokio-postgres binds it.
    pub fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Int(v) => v,
            Param::Ints(v) => v,
            Param::Texts(v) => v,
        }
    }
}

/// A statement and its parameters, `$1` first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// The SQL text: fixed SQL, quoted configured identifiers and `$n`.
    pub sql: String,
    /// The bound values.
    pub params: Vec<Param>,
}

/// Where a dataset's rows are in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Schema, if the configuration names one.
    pub schema: Option<String>,
    /// Table or view.
    pub table: String,
}

impl Relation {
    /// `"schema"."table"`, quoted.
    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(s) => format!("{}.{}", quote(s), quote(&self.table)),
            None => quote(&self.table),
        }
    }
}

/// Double-quotes an identifier. Names are checked to be plain identifiers
/// at config load; doubling quotes keeps even an unchecked name a single
/// identifier.
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Collects parameters and hands out their placeholders.
#[derive(Default)]
struct Params(Vec<Param>);

impl Params {
    fn int(&mut self, v: i64) -> String {
        self.0.push(Param::Int(v));
        format!("${}::bigint", self.0.len())
    }
    fn ints(&mut self, v: Vec<i64>) -> String {
        self.0.push(Param::Ints(v));
        format!("${}::bigint[]", self.0.len())
    }
    fn texts(&mut self, v: Vec<String>) -> String {
        self.0.push(Param::Texts(v));
        format!("${}::text[]", self.0.len())
    }
}

/// The code column of declared column `i` in the `src` stage.
fn code(i: usize) -> String {
    format!("c{i}")
}

/// The SQL computing column `i`'s code from its database value.
fn code_expr(column: &Column, db: DbType, p: &mut Params) -> String {
    let q = quote(column.name());
    match (column, db) {
        (Column::Categorical { domain, .. }, _) => {
            // array_position is 1-based and NULL when absent (or NULL).
            format!(
                "(array_position({}, {q}::text) - 1)::bigint",
                p.texts(domain.clone())
            )
        }
        (Column::Integer { min, max, .. }, _) => format!(
            "CASE WHEN {q} IS NULL OR {q} = -99 THEN NULL ELSE LEAST(GREATEST({q}::bigint, {}), {}) END",
            p.int(*min),
            p.int(*max)
        ),
        (Column::Boolean { .. }, DbType::Boolean) => format!("{q}::integer::bigint"),
        (Column::Boolean { .. }, _) => {
            format!("CASE WHEN {q} IN (0, 1) THEN {q}::bigint END")
        }
        // The identifier as text, trimmed like the CSV ingest trims it;
        // a missing one (NULL, '', '-99') is NULL, and such rows belong to
        // no person and never count (the embedded store refuses them).
        (Column::Open { .. }, _) => unreachable!("config refuses open columns on database sources"),
        (Column::PersonId { .. }, _) => format!(
            "NULLIF(NULLIF(btrim({q}::text), ''), '-99')"
        ),
    }
}

/// The stage the aggregation reads rows from: `src` itself when the privacy
/// unit is one record; with a person-level unit (DESIGN invariant 5), a
/// `bounded` stage keeping at most K rows per person:
///
/// ```sql
/// bounded AS (
///   SELECT * FROM (
///     SELECT src.*, ROW_NUMBER() OVER (PARTITION BY person
///       ORDER BY c0 NULLS LAST, c1 NULLS LAST, ...) AS fedq_rn
///     FROM src WHERE person IS NOT NULL) t
///   WHERE fedq_rn <= $K)
/// ```
///
/// ordered by every other declared column's code in declaration order,
/// missing last: the engine's rule (`Table::kept_rows`), so both keep the
/// same records (records equal on every column are interchangeable).
fn rows_stage(schema: &Schema, p: &mut Params) -> (Option<String>, &'static str) {
    let Some(unit) = schema.person else {
        return (None, "src");
    };
    let order: Vec<String> = (0..schema.columns.len())
        .filter(|&i| i != unit.column)
        .map(|i| format!("{} NULLS LAST", code(i)))
        .collect();
    let person = code(unit.column);
    let stage = format!(
        "bounded AS (SELECT * FROM (SELECT src.*, ROW_NUMBER() OVER (PARTITION BY {person} ORDER BY {}) AS fedq_rn FROM src WHERE {person} IS NOT NULL) t WHERE fedq_rn <= {})",
        order.join(", "),
        p.int(i64::from(unit.max_records))
    );
    (Some(stage), "bounded")
}

/// Builds the statement computing `plan`'s exact aggregates over
/// `relation`. `db` holds the database type of every declared column.
pub fn build(plan: &Plan, schema: &Schema, db: &[DbType], relation: &Relation) -> Statement {
    let mut p = Params::default();
    // The columns the query touches, each once, in declaration order.
    let mut used: Vec<usize> = Vec::new();
    for &g in &plan.group_by {
        match plan.bucket(g).map(|b| &b.rule) {
            Some(KeyRule::Case { branches, .. }) => branches
                .iter()
                .for_each(|(c, _)| predicate_columns(c, &mut used)),
            Some(KeyRule::Number(k)) => used.extend(k.expr.columns()),
            None => used.push(g),
        }
    }
    for m in &plan.measurements {
        match m {
            MeasurementSpec::CountRows => {}
            MeasurementSpec::CountWhere { condition, .. } => {
                predicate_columns(condition, &mut used)
            }
            MeasurementSpec::SumOf { expr, .. } | MeasurementSpec::CountOf { expr, .. } => {
                used.extend(expr.columns())
            }
            MeasurementSpec::CountPresent { column }
            | MeasurementSpec::Sum { column, .. }
            | MeasurementSpec::Histogram { column, .. }
            | MeasurementSpec::SumSquares { column, .. } => used.push(*column),
        }
    }
    if let Some(f) = &plan.filter {
        predicate_columns(f, &mut used);
    }
    if schema.person.is_some() {
        // Truncation orders each person's rows by every column.
        used.extend(0..schema.columns.len());
    }
    used.sort_unstable();
    used.dedup();

    let mut sql = String::from("WITH src AS (SELECT ");
    if used.is_empty() {
        sql.push_str("1 AS one");
    }
    for (k, &i) in used.iter().enumerate() {
        if k > 0 {
            sql.push_str(", ");
        }
        let _ = write!(
            sql,
            "{} AS {}",
            code_expr(&schema.columns[i], db[i], &mut p),
            code(i)
        );
    }
    let _ = write!(sql, " FROM {})", relation.quoted());
    let (stage, from) = rows_stage(schema, &mut p);
    if let Some(stage) = stage {
        let _ = write!(sql, ", {stage}");
    }

    sql.push_str(" SELECT ");
    // A key is its column's code; an integer column's code is its value,
    // whose key is its offset from the lower bound (as the engine's).
    let mut items: Vec<String> = plan
        .group_by
        .iter()
        .map(|&i| match plan.bucket(i).map(|b| &b.rule) {
            // A CASE bucket's key: the first TRUE branch's label index,
            // else the ELSE label's, else NULL (missing), as the engine.
            Some(KeyRule::Case {
                branches,
                otherwise,
            }) => {
                let mut k = String::from("(CASE");
                for (c, label) in branches {
                    k.push_str(" WHEN ");
                    predicate(c, &mut p, &mut k);
                    let _ = write!(k, " THEN {label}");
                }
                if let Some(o) = otherwise {
                    let _ = write!(k, " ELSE {o}");
                }
                k.push_str(" END)::bigint");
                k
            }
            // A number's key: its value clamped to the bounds, as an
            // offset from the lower bound, or its bin
            // `floor((v - min) k / (max - min + 1))`
            // (`fedq_dp::distribution::bin_of`, exact in numeric); NULL
            // (missing) when the value is, as the engine. (LEAST and
            // GREATEST skip NULLs, hence the CASE.)
            Some(KeyRule::Number(k)) => {
                let v = row_expr(&k.expr, &mut p);
                let (min, max) = (p.int(k.min), p.int(k.max));
                let range = i128::from(k.max) - i128::from(k.min) + 1;
                let bins = k.bins.map_or(range, i128::from);
                let (bins, range) = (p.int(bins as i64), p.int(range as i64));
                format!(
                    "(CASE WHEN {v} IS NULL THEN NULL ELSE div((LEAST(GREATEST({v}, {min}), {max}) - {min}) * {bins}, {range}) END)::bigint"
                )
            }
            None => match &schema.columns[i] {
                Column::Integer { min, .. } => format!("({} - {})", code(i), p.int(*min)),
                _ => code(i),
            },
        })
        .collect();
    // Values saturate to i64 like the engine's.
    let saturate = |x: String| {
        format!(
            "GREATEST(LEAST(COALESCE({x}, 0), 9223372036854775807), -9223372036854775808)::bigint"
        )
    };
    for m in &plan.measurements {
        match m {
            MeasurementSpec::CountRows => items.push("COUNT(*)".to_string()),
            MeasurementSpec::CountWhere { condition, .. } => {
                // COUNT skips the NULL of rows the condition is not TRUE for.
                let mut c = String::from("COUNT(CASE WHEN ");
                predicate(condition, &mut p, &mut c);
                c.push_str(" THEN 1 END)");
                items.push(c);
            }
            MeasurementSpec::CountPresent { column } => {
                items.push(format!("COUNT({})", code(*column)))
            }
            MeasurementSpec::Sum { column, min, max } => {
                let c = code(*column);
                // SUM(bigint) is numeric, NULL over no value (LEAST and GREATEST
                // skip NULLs, so COALESCE first): 0 and saturated to i64 like
                // the engine.
                items.push(saturate(format!(
                    "SUM(CASE WHEN {c} IS NOT NULL THEN LEAST(GREATEST({c}, {}), {}) END)",
                    p.int(*min),
                    p.int(*max)
                )))
            }
            MeasurementSpec::SumOf { expr, min, max, .. } => {
                // In numeric (no overflow); clamped to the derived bounds
                // like the engine. LEAST and GREATEST skip NULLs, so a NULL
                // expression is kept NULL by the CASE (it adds nothing).
                let x = row_expr(expr, &mut p);
                items.push(saturate(format!(
                    "SUM(CASE WHEN {x} IS NOT NULL THEN LEAST(GREATEST({x}, {}), {}) END)",
                    p.int(*min),
                    p.int(*max)
                )))
            }
            MeasurementSpec::CountOf { expr, .. } => {
                let x = row_expr(expr, &mut p);
                items.push(format!("COUNT({x})"))
            }
            MeasurementSpec::SumSquares {
                column,
                center,
                min,
                max,
            } => {
                // Squares in numeric: declared bounds reach 2^40.
                let c = code(*column);
                let d = format!(
                    "(LEAST(GREATEST({c}, {}), {}) - {})::numeric",
                    p.int(*min),
                    p.int(*max),
                    p.int(*center)
                );
                items.push(saturate(format!(
                    "SUM(CASE WHEN {c} IS NOT NULL THEN {d} * {d} END)"
                )))
            }
            MeasurementSpec::Histogram {
                column,
                min,
                max,
                bins,
            } => {
                // One count per bin, in bin order: value v (clamped in
                // `src`) falls in bin floor((v - min) bins / (max - min + 1)),
                // as `fedq_dp::distribution::bin_of`.
                let c = code(*column);
                let (lo, k, range) = (p.int(*min), p.int(*bins as i64), p.int(max - min + 1));
                for b in 0..*bins {
                    items.push(format!(
                        "COUNT(*) FILTER (WHERE {c} IS NOT NULL AND (({c} - {lo}) * {k}) / {range} = {})",
                        p.int(b as i64)
                    ));
                }
            }
        }
    }
    sql.push_str(&items.join(", "));
    let _ = write!(sql, " FROM {from}");
    if let Some(f) = &plan.filter {
        sql.push_str(" WHERE ");
        predicate(f, &mut p, &mut sql);
    }
    if !plan.group_by.is_empty() {
        let keys: Vec<String> = (1..=plan.group_by.len()).map(|k| k.to_string()).collect();
        let _ = write!(sql, " GROUP BY {}", keys.join(", "));
    }
    Statement { sql, params: p.0 }
}

/// A per-row expression over the codes of `src` (an integer's code is its
/// clamped value, a flag's 0 or 1, NULL when missing), in `numeric` so
/// that nothing overflows; NULL propagates as in the engine. Integer
/// division truncates toward zero, as the engine's.
fn row_expr(e: &RowExpr, p: &mut Params) -> String {
    match e {
        RowExpr::Column(c) => format!("{}::numeric", code(*c)),
        RowExpr::Const(k) => format!("{}::numeric", p.int(*k)),
        RowExpr::Coalesce(args) => {
            let args: Vec<String> = args.iter().map(|a| row_expr(a, p)).collect();
            format!("COALESCE({})", args.join(", "))
        }
        RowExpr::Add(a, b) => format!("({} + {})", row_expr(a, p), row_expr(b, p)),
        RowExpr::Sub(a, b) => format!("({} - {})", row_expr(a, p), row_expr(b, p)),
        RowExpr::Mul(a, b) => format!("({} * {})", row_expr(a, p), row_expr(b, p)),
        RowExpr::Div(a, k) => format!("trunc({} / {}::numeric)", row_expr(a, p), p.int(*k)),
    }
}

fn predicate_columns(f: &Predicate, out: &mut Vec<usize>) {
    match f {
        Predicate::And(a, b) | Predicate::Or(a, b) => {
            predicate_columns(a, out);
            predicate_columns(b, out);
        }
        Predicate::Not(a) => predicate_columns(a, out),
        Predicate::Cmp { column, .. }
        | Predicate::In { column, .. }
        | Predicate::Between { column, .. }
        | Predicate::IsMissing { column, .. } => out.push(*column),
        Predicate::Columns { left, right, .. } => out.extend([*left, *right]),
    }
}

/// Writes the WHERE condition over codes. Recursion is bounded by the
/// plan's nesting limit ([`fedq_plan::plan::MAX_WHERE_DEPTH`]).
fn predicate(f: &Predicate, p: &mut Params, sql: &mut String) {
    match f {
        Predicate::And(a, b) | Predicate::Or(a, b) => {
            sql.push('(');
            predicate(a, p, sql);
            sql.push_str(if matches!(f, Predicate::And(..)) {
                " AND "
            } else {
                " OR "
            });
            predicate(b, p, sql);
            sql.push(')');
        }
        Predicate::Not(a) => {
            sql.push_str("(NOT ");
            predicate(a, p, sql);
            sql.push(')');
        }
        Predicate::Cmp { column, op, value } => {
            let _ = write!(sql, "({} {} {})", code(*column), op.sql(), p.int(*value));
        }
        Predicate::Columns {
            left,
            op,
            right,
            relabel,
        } => {
            // Categories by label: the left code mapped to the right's
            // (arrays are 1-based; a NULL subscript gives NULL, so a
            // missing value leaves the comparison unknown, as in the
            // engine). Numbers compare their (clamped) values.
            let l = match relabel {
                Some(m) => format!("({})[({} + 1)::integer]", p.ints(m.clone()), code(*left)),
                None => code(*left),
            };
            let _ = write!(sql, "({l} {} {})", op.sql(), code(*right));
        }
        Predicate::In {
            column,
            values,
            negated,
        } => {
            // A non-empty array without NULLs: NULL = ANY(...) is unknown,
            // as the engine's IN on a missing value.
            let not = if *negated { "NOT " } else { "" };
            let _ = write!(
                sql,
                "({not}({} = ANY({})))",
                code(*column),
                p.ints(values.clone())
            );
        }
        Predicate::Between {
            column,
            low,
            high,
            negated,
        } => {
            let not = if *negated { "NOT " } else { "" };
            let _ = write!(
                sql,
                "({} {not}BETWEEN {} AND {})",
                code(*column),
                p.int(*low),
                p.int(*high)
            );
        }
        Predicate::IsMissing { column, negated } => {
            let not = if *negated { "NOT " } else { "" };
            let _ = write!(sql, "({} IS {not}NULL)", code(*column));
        }
    }
}

/// One result row: each GROUP BY column's code (`None`: missing), then one
/// value per measurement.
pub type ResultRow = (Vec<Option<i64>>, Vec<i64>);

/// Places the statement's rows in the engine's cell order (mixed radix over
/// the GROUP BY columns, first most significant, each column's missing key
/// last; see [`fedq_plan::plan::cell_keys`]), with 0 for cells no row fell in.
/// A key outside its declared domain means the statement is wrong: an
/// error, never a guess.
pub fn assemble(plan: &Plan, rows: Vec<ResultRow>) -> Result<Vec<Vec<i64>>, String> {
    let cells = fedq_plan::plan::cell_count(plan);
    let widths: Vec<usize> = plan
        .measurements
        .iter()
        .map(MeasurementSpec::values_per_cell)
        .collect();
    let mut out: Vec<Vec<i64>> = widths.iter().map(|w| vec![0i64; cells * w]).collect();
    for (keys, values) in rows {
        if keys.len() != plan.group_by.len() || values.len() != widths.iter().sum::<usize>() {
            return Err("the database returned a row of the wrong shape".into());
        }
        let mut cell = 0usize;
        for (key, &size) in keys.iter().zip(&plan.group_sizes) {
            let k = match key {
                None => size,
                Some(k) if (0..size as i64).contains(k) => *k as usize,
                Some(_) => return Err("the database returned a key outside its domain".into()),
            };
            cell = cell * (size + 1) + k;
        }
        // Each measurement's values for the cell (histograms: one per bin).
        let mut values = values.into_iter();
        for (m, &w) in out.iter_mut().zip(&widths) {
            for (slot, v) in m[cell * w..(cell + 1) * w].iter_mut().zip(values.by_ref()) {
                *slot = v;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedq_plan::plan::plan;
    use fedq_plan::schema::{ColumnSpec, ColumnType};

    fn schema() -> Schema {
        Schema::from_specs(
            "cases",
            &[
                ColumnSpec {
                    open: None,
                    name: "gender".into(),
                    kind: ColumnType::Categorical,
                    domain: Some(vec!["Female".into(), "Male".into()]),
                    min: None,
                    max: None,
                    bins: None,
                },
                ColumnSpec {
                    open: None,
                    name: "months".into(),
                    kind: ColumnType::Integer,
                    domain: None,
                    min: Some(0),
                    max: Some(120),
                    bins: None,
                },
                ColumnSpec {
                    open: None,
                    name: "flag".into(),
                    kind: ColumnType::Boolean,
                    domain: None,
                    min: None,
                    max: None,
                    bins: None,
                },
            ],
        )
        .unwrap()
    }

    fn relation() -> Relation {
        Relation {
            schema: Some("public".into()),
            table: "cases".into(),
        }
    }

    #[test]
    fn literals_are_parameters_and_never_in_the_text() {
        let s = schema();
        let p = plan(
            "SELECT gender, COUNT(*), AVG(months) FROM cases WHERE months BETWEEN 3 AND 41 AND NOT flag = 1 OR gender IN ('Male') GROUP BY gender",
            &s,
            100,
        )
        .unwrap();
        let st = build(
            &p,
            &s,
            &[DbType::Text, DbType::Integer, DbType::Integer],
            &relation(),
        );
        assert!(
            !st.sql.contains("Male") && !st.sql.contains("41"),
            "{}",
            st.sql
        );
        assert!(st.sql.contains(r#"FROM "public"."cases""#), "{}", st.sql);
        assert!(st.params.contains(&Param::Int(41)));
        assert!(st.params.contains(&Param::Ints(vec![1])));
        assert!(st
            .params
            .contains(&Param::Texts(vec!["Female".into(), "Male".into()])));
        // Every placeholder has its parameter and vice versa.
        for n in 1..=st.params.len() {
            assert!(st.sql.contains(&format!("${n}::")), "${n} in {}", st.sql);
        }
        assert!(!st.sql.contains(&format!("${}::", st.params.len() + 1)));
    }

    #[test]
    fn quoting_keeps_one_identifier() {
        assert_eq!(quote("ageBroad"), "\"ageBroad\"");
        assert_eq!(
            quote("a\"; DROP TABLE x; --"),
            "\"a\"\"; DROP TABLE x; --\""
        );
    }

    #[test]
    fn rows_land_in_engine_cell_order_with_zeros() {
        let s = schema();
        let p = plan(
            "SELECT gender, flag, COUNT(*) FROM cases GROUP BY gender, flag",
            &s,
            100,
        )
        .unwrap();
        let rows = vec![
            (vec![Some(1), None], vec![5]),
            (vec![None, Some(0)], vec![7]),
        ];
        // Cells: (F,0) (F,1) (F,-) (M,0) (M,1) (M,-) (-,0) (-,1) (-,-).
        assert_eq!(
            assemble(&p, rows).unwrap(),
            vec![vec![0, 0, 0, 0, 0, 5, 7, 0, 0]]
        );
        assert!(assemble(&p, vec![(vec![Some(2), None], vec![1])]).is_err());
    }
}
