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
//! 1. `src`: one row per database row, with each needed column twice: its
//!    raw value `r<i>` (text compared byte for byte, `COLLATE "C"`) and its
//!    engine code `c<i>` (`NULL` = missing): a categorical value becomes
//!    its index in the declared domain (anything outside the domain, `''`
//!    and `'-99'` included, is missing); an integer is clamped to its
//!    declared bounds (`-99` and `NULL` are missing); a boolean is 0/1
//!    (from a boolean column, or an integer column holding 0/1; anything
//!    else is missing). PostgreSQL inlines the stage, so only what the
//!    query reads is computed, row by row.
//! 2. (reserved) per-person contribution bounding: see [`rows_stage`].
//! 3. The aggregation, written so that the database does what it does
//!    fastest, on raw values (issue 22; measured in BENCHMARKS.md):
//!    - conditions (WHERE, `COUNT(*) FILTER`, CASE buckets) are written in
//!      negation normal form over raw values: each atom is TRUE exactly
//!      when the engine's atom over codes is TRUE ([`atom`]), and AND and
//!      OR over three-valued logic are TRUE exactly when the same formula
//!      over "is TRUE" is, so the rows kept are the engine's;
//!    - a categorical GROUP BY column is grouped by its raw text, and each
//!      returned label is coded in the node ([`KeyRead::Label`]): labels
//!      outside the domain land on the missing key, and the rows that
//!      land on one cell are added up ([`assemble`]). A table with more
//!      raw groups than [`Statement::cap`] is asked again with the keys
//!      coded in the database ([`build_with`]), so a column of free text
//!      costs one extra statement, never unbounded memory;
//!    - every value comes back as exact integer text (`numeric`, no
//!      overflow), is added in `i128` and saturated to `i64` like the
//!      engine's.
//!
//!    Only non-empty cells come back; [`assemble`] fills the rest with 0
//!    in the engine's cell order.

use std::collections::HashMap;
use std::fmt::Write as _;

use tokio_postgres::types::ToSql;

use fedq_plan::plan::{CmpOp, KeyRule, MeasurementSpec, Plan, Predicate, RowExpr};
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
    /// `$n::integer`.
    Int4(i32),
    /// `$n::bigint[]`.
    Ints(Vec<i64>),
    /// `$n::text`.
    Text(String),
    /// `$n::text[]`.
    Texts(Vec<String>),
}

impl Param {
    /// The value as tokio-postgres binds it.
    pub fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Int(v) => v,
            Param::Int4(v) => v,
            Param::Ints(v) => v,
            Param::Text(v) => v,
            Param::Texts(v) => v,
        }
    }
}

/// How one GROUP BY key of a result row is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRead {
    /// A `bigint` code computed by the database (`NULL`: missing).
    Code,
    /// The raw text of a categorical column: its code is its index in the
    /// declared domain (this map, byte for byte); `NULL` or any other text
    /// is missing.
    Label(HashMap<String, i64>),
    /// The raw value of a flag, as `bigint` (a `boolean` as 0 or 1): 0 and
    /// 1 are its codes, anything else is missing.
    Flag,
    /// The raw value of an integer column, as `bigint`: `NULL` and `-99`
    /// are missing; its key is the value clamped to the bounds, as an
    /// offset from the lower one.
    Integer {
        /// Declared lower bound.
        min: i64,
        /// Declared upper bound.
        max: i64,
    },
}

impl KeyRead {
    /// The code of a raw label (`None`: missing).
    pub fn label(&self, label: Option<&str>) -> Option<i64> {
        match self {
            KeyRead::Label(codes) => label.and_then(|l| codes.get(l).copied()),
            _ => None,
        }
    }

    /// The key of a `bigint` result (`None`: missing).
    pub fn number(&self, v: Option<i64>) -> Option<i64> {
        match (self, v) {
            (KeyRead::Code, v) => v,
            (KeyRead::Flag, Some(v @ (0 | 1))) => Some(v),
            (KeyRead::Integer { min, max }, Some(v)) if v != MISSING_INT => {
                Some(v.clamp(*min, *max) - min)
            }
            _ => None,
        }
    }
}

/// How a missing integer is spelt in a database column, as in CSV files.
const MISSING_INT: i64 = -99;

/// A value tested against up to this many texts is compared with each in
/// turn (`r = $1 OR r = $2 ...`); against more, by one `= ANY`, which
/// PostgreSQL hashes from nine elements on. A few comparisons cost less
/// per row than a hash probe (measured, BENCHMARKS.md).
pub(super) const CHAIN_MAX: usize = 8;

/// A statement and its parameters, `$1` first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// The SQL text: fixed SQL, quoted configured identifiers and `$n`.
    pub sql: String,
    /// The bound values.
    pub params: Vec<Param>,
    /// How each GROUP BY key of a result row is read, in order.
    pub keys: Vec<KeyRead>,
    /// With raw keys: the most rows the statement is expected to return.
    /// It asks for one more (`LIMIT`); a result that long means the raw
    /// values are too many, and the caller asks again with
    /// [`build_with`]`(.., None)`, whose rows are at most the plan's
    /// cells.
    pub cap: Option<usize>,
}

/// The fewest raw groups a statement with raw keys accepts before the
/// keys are coded in the database instead (see [`Statement::cap`]).
pub const RAW_GROUPS_MIN: usize = 20_000;

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
pub(super) struct Params(pub(super) Vec<Param>);

impl Params {
    pub(super) fn int(&mut self, v: i64) -> String {
        self.0.push(Param::Int(v));
        format!("${}::bigint", self.0.len())
    }
    pub(super) fn int4(&mut self, v: i32) -> String {
        self.0.push(Param::Int4(v));
        format!("${}::integer", self.0.len())
    }
    pub(super) fn ints(&mut self, v: Vec<i64>) -> String {
        self.0.push(Param::Ints(v));
        format!("${}::bigint[]", self.0.len())
    }
    pub(super) fn text(&mut self, v: String) -> String {
        self.0.push(Param::Text(v));
        format!("${}::text", self.0.len())
    }
    pub(super) fn texts(&mut self, v: Vec<String>) -> String {
        self.0.push(Param::Texts(v));
        format!("${}::text[]", self.0.len())
    }
    /// `r` equal to one of `v` (not empty): compared with each in turn up
    /// to [`CHAIN_MAX`] texts, else by one `= ANY`.
    pub(super) fn text_in(&mut self, r: &str, v: Vec<String>) -> String {
        if v.len() > CHAIN_MAX {
            return format!("({r} = ANY({}))", self.texts(v));
        }
        let parts: Vec<String> = v
            .into_iter()
            .map(|t| format!("{r} = {}", self.text(t)))
            .collect();
        format!("({})", parts.join(" OR "))
    }
}

/// The code column of declared column `i` in the `src` stage.
pub(super) fn code(i: usize) -> String {
    format!("c{i}")
}

/// The raw value column of declared column `i` in the `src` stage.
pub(super) fn raw(i: usize) -> String {
    format!("r{i}")
}

/// The SQL of column `i`'s raw value: text compared byte for byte (the
/// `C` collation: a case-insensitive collation must not merge labels the
/// engine tells apart), other types as stored.
fn raw_expr(column: &Column, db: DbType) -> String {
    let q = quote(column.name());
    match db {
        DbType::Text => format!("{q}::text COLLATE \"C\""),
        DbType::Integer | DbType::Boolean => q,
    }
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
/// `relation`, categorical keys grouped by their raw text. `db` holds the
/// database type of every declared column.
pub fn build(plan: &Plan, schema: &Schema, db: &[DbType], relation: &Relation) -> Statement {
    build_with(plan, schema, db, relation, Some(RAW_GROUPS_MIN))
}

/// As [`build`], with categorical keys grouped by raw text when
/// `raw_groups` is given (the cap is at least that, and at least four rows
/// per cell: [`Statement::cap`]); with `None`, every key is coded in the
/// database (one row per non-empty cell at most: the fallback for tables
/// with more raw values than the cap).
pub fn build_with(
    plan: &Plan,
    schema: &Schema,
    db: &[DbType],
    relation: &Relation,
    raw_groups: Option<usize>,
) -> Statement {
    let mut p = Params::default();
    let used = used_columns(plan, schema);
    let (mut sql, from) = src_stage(schema, db, &used, &[], relation, &mut p);
    let cx = Cx { schema, db };

    sql.push_str(" SELECT ");
    let mut keys = Vec::with_capacity(plan.group_by.len());
    // A key is its column's code; an integer column's code is its value,
    // whose key is its offset from the lower bound (as the engine's).
    let mut items: Vec<String> = Vec::with_capacity(plan.group_by.len());
    let mut groups: Vec<String> = Vec::with_capacity(plan.group_by.len());
    for &i in &plan.group_by {
        let (item, read) = key_sql(plan, i, &cx, raw_groups.is_some(), &mut p);
        // Raw keys are grouped by the raw column itself; coded ones by
        // their place in the SELECT list.
        groups.push(if matches!(read, KeyRead::Code) {
            (items.len() + 1).to_string()
        } else {
            raw(i)
        });
        items.push(item);
        keys.push(read);
    }
    for m in &plan.measurements {
        measurement_sql(m, &cx, &mut p, &mut items);
    }
    sql.push_str(&items.join(", "));
    let _ = write!(sql, " FROM {from}");
    if let Some(f) = &plan.filter {
        sql.push_str(" WHERE ");
        cx.predicate(f, false, &mut p, &mut sql);
    }
    if !groups.is_empty() {
        let _ = write!(sql, " GROUP BY {}", groups.join(", "));
    }
    let cap = raw_groups
        .filter(|_| keys.iter().any(|k| !matches!(k, KeyRead::Code)))
        .map(|min| min.max(fedq_plan::plan::cell_count(plan).saturating_mul(4)));
    if let Some(cap) = cap {
        let _ = write!(sql, " LIMIT {}", p.int(cap.saturating_add(1) as i64));
    }
    Statement {
        sql,
        params: p.0,
        keys,
        cap,
    }
}

/// The columns `plan` touches, each once, in declaration order (every
/// column with a person-level unit: truncation orders by all of them).
pub(super) fn used_columns(plan: &Plan, schema: &Schema) -> Vec<usize> {
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

    used
}

/// `WITH src AS (...)[, bounded AS (...)]` for the `used` columns, and the
/// stage the aggregation reads. A column with a partner mapping
/// (`mapped[i]`) gives only its raw text (the node maps it); its code is
/// never computed in the database.
pub(super) fn src_stage(
    schema: &Schema,
    db: &[DbType],
    used: &[usize],
    mapped: &[bool],
    relation: &Relation,
    p: &mut Params,
) -> (String, &'static str) {
    let mut sql = String::from("WITH src AS (SELECT ");
    if used.is_empty() {
        sql.push_str("1 AS one");
    }
    for (k, &i) in used.iter().enumerate() {
        if k > 0 {
            sql.push_str(", ");
        }
        let column = &schema.columns[i];
        if mapped.get(i).copied().unwrap_or(false) {
            // Text byte for byte; an integer column (ages in years) as a
            // number, printed in the node as PostgreSQL prints it.
            let cast = match db[i] {
                DbType::Integer => "bigint",
                DbType::Text | DbType::Boolean => "text COLLATE \"C\"",
            };
            let _ = write!(
                sql,
                "{}::{cast} AS {}, NULL::bigint AS {}",
                quote(column.name()),
                raw(i),
                code(i)
            );
            continue;
        }
        let _ = write!(
            sql,
            "{} AS {}, {} AS {}",
            raw_expr(column, db[i]),
            raw(i),
            code_expr(column, db[i], p),
            code(i)
        );
    }
    let _ = write!(sql, " FROM {})", relation.quoted());
    let (stage, from) = rows_stage(schema, p);
    if let Some(stage) = stage {
        let _ = write!(sql, ", {stage}");
    }
    (sql, from)
}

/// GROUP BY key `i` of `plan` as the fast path writes it: its SELECT item
/// and how the node reads it. With `raw_keys`, a declared column is grouped
/// by its raw value and coded in the node.
pub(super) fn key_sql(
    plan: &Plan,
    i: usize,
    cx: &Cx,
    raw_keys: bool,
    p: &mut Params,
) -> (String, KeyRead) {
    match plan.bucket(i).map(|b| &b.rule) {
        // A CASE bucket's key: the first TRUE branch's label index,
        // else the ELSE label's, else NULL (missing), as the engine.
        Some(KeyRule::Case {
            branches,
            otherwise,
        }) => {
            let mut k = String::from("(CASE");
            for (c, label) in branches {
                k.push_str(" WHEN ");
                cx.predicate(c, false, p, &mut k);
                let _ = write!(k, " THEN {label}");
            }
            if let Some(o) = otherwise {
                let _ = write!(k, " ELSE {o}");
            }
            k.push_str(" END)::bigint");
            (k, KeyRead::Code)
        }
        // A number's key: its value clamped to the bounds, as an
        // offset from the lower bound, or its bin
        // `floor((v - min) k / (max - min + 1))`
        // (`fedq_dp::distribution::bin_of`, exact in numeric); NULL
        // (missing) when the value is, as the engine. (LEAST and
        // GREATEST skip NULLs, hence the CASE.)
        Some(KeyRule::Number(k)) => {
            let v = row_expr(&k.expr, p);
            let (min, max) = (p.int(k.min), p.int(k.max));
            let range = i128::from(k.max) - i128::from(k.min) + 1;
            let bins = k.bins.map_or(range, i128::from);
            let (bins, range) = (p.int(bins as i64), p.int(range as i64));
            (
                format!(
                    "(CASE WHEN {v} IS NULL THEN NULL ELSE div((LEAST(GREATEST({v}, {min}), {max}) - {min}) * {bins}, {range}) END)::bigint"
                ),
                KeyRead::Code,
            )
        }
        // A declared column: grouped by its raw value and coded in the
        // node (cast to bigint after grouping, once per group), or,
        // without raw keys, coded in the database.
        None => match (&cx.schema.columns[i], cx.db[i], raw_keys) {
            (Column::Categorical { domain, .. }, DbType::Text, true) => (
                raw(i),
                KeyRead::Label(
                    domain
                        .iter()
                        .enumerate()
                        .map(|(k, l)| (l.clone(), k as i64))
                        .collect(),
                ),
            ),
            (Column::Integer { min, max, .. }, _, true) => (
                format!("{}::bigint", raw(i)),
                KeyRead::Integer {
                    min: *min,
                    max: *max,
                },
            ),
            (Column::Boolean { .. }, DbType::Boolean, true) => {
                (format!("{}::integer::bigint", raw(i)), KeyRead::Flag)
            }
            (Column::Boolean { .. }, _, true) => (format!("{}::bigint", raw(i)), KeyRead::Flag),
            (Column::Integer { min, .. }, _, false) => {
                (format!("({} - {})", code(i), p.int(*min)), KeyRead::Code)
            }
            _ => (code(i), KeyRead::Code),
        },
    }
}

/// Writes measurement `m`'s SELECT items (a histogram: one per bin) to
/// `items`.
pub(super) fn measurement_sql(
    m: &MeasurementSpec,
    cx: &Cx,
    p: &mut Params,
    items: &mut Vec<String>,
) {
    // Every value as the text of an exact integer (numeric: no overflow);
    // the node adds and saturates them (see `assemble`).
    let total = |x: String| format!("COALESCE({x}, 0)::text");
    match m {
        MeasurementSpec::CountRows => items.push("COUNT(*)::text".to_string()),
        MeasurementSpec::CountWhere { condition, .. } => {
            // COUNT skips the NULL of rows the condition is not TRUE for.
            let mut c = String::from("COUNT(CASE WHEN ");
            cx.predicate(condition, false, p, &mut c);
            c.push_str(" THEN 1 END)::text");
            items.push(c);
        }
        MeasurementSpec::CountPresent { column } => {
            let mut c = String::from("COUNT(*) FILTER (WHERE ");
            cx.present(*column, true, p, &mut c);
            c.push_str(")::text");
            items.push(c)
        }
        MeasurementSpec::Sum { column, min, max } => {
            items.push(total(cx.sum(*column, *min, *max, p)))
        }
        MeasurementSpec::SumOf { expr, min, max, .. } => {
            // In numeric (no overflow); clamped to the derived bounds
            // like the engine. LEAST and GREATEST skip NULLs, so a NULL
            // expression is kept NULL by the CASE (it adds nothing).
            let x = row_expr(expr, p);
            items.push(total(format!(
                "SUM(CASE WHEN {x} IS NOT NULL THEN LEAST(GREATEST({x}, {}), {}) END)",
                p.int(*min),
                p.int(*max)
            )))
        }
        MeasurementSpec::CountOf { expr, .. } => {
            let x = row_expr(expr, p);
            items.push(format!("COUNT({x})::text"))
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
            items.push(total(format!(
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
                    "COUNT(*) FILTER (WHERE {c} IS NOT NULL AND (({c} - {lo}) * {k}) / {range} = {})::text",
                    p.int(b as i64)
                ));
            }
        }
    }
}

/// A per-row expression over the codes of `src` (an integer's code is its
/// clamped value, a flag's 0 or 1, NULL when missing), in `numeric` so
/// that nothing overflows; NULL propagates as in the engine. Integer
/// division truncates toward zero, as the engine's.
pub(super) fn row_expr(e: &RowExpr, p: &mut Params) -> String {
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

pub(super) fn predicate_columns(f: &Predicate, out: &mut Vec<usize>) {
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

/// What the condition writer needs: the declared columns and how each is
/// stored.
pub(super) struct Cx<'a> {
    pub(super) schema: &'a Schema,
    pub(super) db: &'a [DbType],
}

/// An atom's test on one column's code, before negation.
pub(super) enum Test<'a> {
    Cmp(CmpOp, i64),
    In(&'a [i64]),
    Between(i64, i64),
}

impl Test<'_> {
    /// Whether a (present) code passes.
    pub(super) fn holds(&self, code: i64) -> bool {
        match *self {
            Test::Cmp(op, v) => op.holds(code, v),
            Test::In(values) => values.contains(&code),
            Test::Between(lo, hi) => lo <= code && code <= hi,
        }
    }

    /// The codes in `[lo, hi]` that pass, as sorted, disjoint, non-adjacent
    /// inclusive ranges (in `i128`: a literal can be `i64::MAX`).
    fn ranges(&self, lo: i64, hi: i64) -> Vec<(i128, i128)> {
        let (lo, hi) = (i128::from(lo), i128::from(hi));
        let mut r: Vec<(i128, i128)> = match *self {
            Test::Cmp(op, v) => {
                let v = i128::from(v);
                match op {
                    CmpOp::Eq => vec![(v, v)],
                    CmpOp::Ne => vec![(lo, v - 1), (v + 1, hi)],
                    CmpOp::Lt => vec![(lo, v - 1)],
                    CmpOp::Le => vec![(lo, v)],
                    CmpOp::Gt => vec![(v + 1, hi)],
                    CmpOp::Ge => vec![(v, hi)],
                }
            }
            Test::In(values) => values
                .iter()
                .map(|&v| (i128::from(v), i128::from(v)))
                .collect(),
            Test::Between(a, b) => vec![(i128::from(a), i128::from(b))],
        };
        for x in &mut r {
            *x = (x.0.max(lo), x.1.min(hi));
        }
        r.retain(|&(a, b)| a <= b);
        merge(r)
    }
}

/// Sorts ranges and joins the overlapping or adjacent ones.
fn merge(mut r: Vec<(i128, i128)>) -> Vec<(i128, i128)> {
    r.sort_unstable();
    let mut out: Vec<(i128, i128)> = Vec::with_capacity(r.len());
    for (a, b) in r {
        match out.last_mut() {
            Some(last) if a <= last.1 + 1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// The ranges of `[lo, hi]` outside `r` (sorted, disjoint).
fn complement(r: &[(i128, i128)], lo: i64, hi: i64) -> Vec<(i128, i128)> {
    let mut out = Vec::new();
    let mut next = i128::from(lo);
    for &(a, b) in r {
        if a > next {
            out.push((next, a - 1));
        }
        next = b + 1;
    }
    if next <= i128::from(hi) {
        out.push((next, i128::from(hi)));
    }
    out
}

impl Cx<'_> {
    /// Writes condition `f` (negated when `negate`) over the raw values,
    /// in negation normal form: the result is TRUE for exactly the rows
    /// the engine's condition over codes is TRUE for, which is all that
    /// WHERE, FILTER and CASE WHEN look at. Negation is pushed to the
    /// atoms (De Morgan holds in three-valued logic), and each atom is
    /// written by [`Cx::atom`]. Recursion is bounded by the plan's nesting
    /// limit ([`fedq_plan::plan::MAX_WHERE_DEPTH`]).
    pub(super) fn predicate(&self, f: &Predicate, negate: bool, p: &mut Params, sql: &mut String) {
        match f {
            Predicate::And(a, b) | Predicate::Or(a, b) => {
                let and = matches!(f, Predicate::And(..)) != negate;
                sql.push('(');
                self.predicate(a, negate, p, sql);
                sql.push_str(if and { " AND " } else { " OR " });
                self.predicate(b, negate, p, sql);
                sql.push(')');
            }
            Predicate::Not(a) => self.predicate(a, !negate, p, sql),
            Predicate::Cmp { column, op, value } => {
                self.atom(*column, &Test::Cmp(*op, *value), negate, p, sql)
            }
            Predicate::In {
                column,
                values,
                negated,
            } => self.atom(*column, &Test::In(values), negate != *negated, p, sql),
            Predicate::Between {
                column,
                low,
                high,
                negated,
            } => self.atom(
                *column,
                &Test::Between(*low, *high),
                negate != *negated,
                p,
                sql,
            ),
            Predicate::IsMissing { column, negated } => {
                self.present(*column, negate != *negated, p, sql)
            }
            Predicate::Columns {
                left,
                op,
                right,
                relabel,
            } => {
                // Over codes, with the database's three-valued NOT, which
                // is the engine's: categories by label (the left code
                // mapped to the right's; arrays are 1-based, and a NULL
                // subscript gives NULL, so a missing value leaves the
                // comparison unknown), numbers by (clamped) value.
                let l = match relabel {
                    Some(m) => format!("({})[({} + 1)::integer]", p.ints(m.clone()), code(*left)),
                    None => code(*left),
                };
                let not = if negate { "NOT " } else { "" };
                let _ = write!(sql, "({not}({l} {} {}))", op.sql(), code(*right));
            }
        }
    }

    /// The sum over rows of column `i`'s code clamped to `[min, max]`,
    /// missing values adding nothing (NULL over no value). On an integer
    /// column, straight from the raw value: its code is the value clamped
    /// to the declared bounds `[a, b]`, and clamping twice is clamping once
    /// to `[min(max(a, min), max), max(min(b, max), min)]`. When both ends
    /// fit in `integer`, so does every value, and PostgreSQL sums them in
    /// `bigint` (its `SUM(bigint)` adds in `numeric`, several times slower);
    /// `2^31` values each under `2^31` cannot overflow it.
    fn sum(&self, i: usize, min: i64, max: i64, p: &mut Params) -> String {
        let (x, a, b, filter) = match &self.schema.columns[i] {
            Column::Integer { min: a, max: b, .. } => {
                (raw(i), *a, *b, format!(" FILTER (WHERE {} <> -99)", raw(i)))
            }
            // A flag's code is 0 or 1 (NULL when missing).
            _ => (code(i), 0, 1, String::new()),
        };
        let lo = a.max(min).min(max);
        let hi = b.min(max).max(min);
        match (i32::try_from(lo), i32::try_from(hi)) {
            (Ok(lo), Ok(hi)) => format!(
                "SUM(LEAST(GREATEST({x}, {}), {})::integer){filter}",
                p.int4(lo),
                p.int4(hi)
            ),
            _ => format!(
                "SUM(LEAST(GREATEST({x}::bigint, {}), {})){filter}",
                p.int(lo),
                p.int(hi)
            ),
        }
    }

    /// Writes a condition TRUE exactly when column `i`'s value is present
    /// (`present`), or exactly when it is missing. Never unknown.
    pub(super) fn present(&self, i: usize, present: bool, p: &mut Params, sql: &mut String) {
        let r = raw(i);
        let test = match (&self.schema.columns[i], self.db[i]) {
            (Column::Categorical { domain, .. }, DbType::Text) => {
                format!("{r} = ANY({})", p.texts(domain.clone()))
            }
            (Column::Integer { .. }, _) => format!("{r} <> -99"),
            (Column::Boolean { .. }, DbType::Boolean) => format!("{r} IS NOT NULL"),
            (Column::Boolean { .. }, _) => format!("{r} IN (0, 1)"),
            _ => format!("{} IS NOT NULL", code(i)),
        };
        if present {
            let _ = write!(sql, "({test})");
        } else {
            let _ = write!(sql, "(({test}) IS NOT TRUE)");
        }
    }

    /// Writes a condition over column `i`'s raw value that is TRUE exactly
    /// when its code is present and passes `test` (fails it, when
    /// `negate`): the engine's atom is TRUE exactly then, since an atom on
    /// a missing value is unknown either way. The passing codes are found
    /// in the node from the declared domain or bounds, so the database
    /// compares raw values with parameters only:
    ///
    /// - a category: its text against the labels of the passing codes;
    /// - a flag: the stored boolean, or the integer 0 or 1;
    /// - an integer: raw ranges; an integer's code is its value clamped to
    ///   the bounds, so a passing range that reaches a bound reaches on
    ///   past it, and `-99` (missing) is excluded where a range covers it.
    pub(super) fn atom(
        &self,
        i: usize,
        test: &Test,
        negate: bool,
        p: &mut Params,
        sql: &mut String,
    ) {
        let r = raw(i);
        let passing = |n: usize| -> Vec<usize> {
            (0..n).filter(|&c| test.holds(c as i64) != negate).collect()
        };
        match (&self.schema.columns[i], self.db[i]) {
            (Column::Categorical { domain, .. }, DbType::Text) => {
                let labels: Vec<String> = passing(domain.len())
                    .into_iter()
                    .map(|c| domain[c].clone())
                    .collect();
                if labels.is_empty() {
                    sql.push_str("FALSE");
                } else {
                    sql.push_str(&p.text_in(&r, labels));
                }
            }
            (Column::Boolean { .. }, db) => {
                let text = match (passing(2).as_slice(), db) {
                    ([], _) => "FALSE".to_string(),
                    ([0, 1], _) => return self.present(i, true, p, sql),
                    ([c], DbType::Boolean) => format!("({r} = {})", *c == 1),
                    ([c], _) => format!("({r} = {c})"),
                    _ => unreachable!("two codes"),
                };
                sql.push_str(&text);
            }
            (Column::Integer { min, max, .. }, _) => {
                let mut ranges = test.ranges(*min, *max);
                if negate {
                    ranges = complement(&ranges, *min, *max);
                }
                if ranges.is_empty() {
                    sql.push_str("FALSE");
                    return;
                }
                let (lo, hi) = (i128::from(*min), i128::from(*max));
                let parts: Vec<String> = ranges
                    .iter()
                    .map(|&(a, b)| {
                        let mut c = Vec::new();
                        // Within i64: the ranges lie in the bounds.
                        if a > lo {
                            c.push(format!("{r} >= {}", p.int(a as i64)));
                        }
                        if b < hi {
                            c.push(format!("{r} <= {}", p.int(b as i64)));
                        }
                        // -99 is missing: keep it out where the raw range
                        // would take it in.
                        if (a == lo || a <= -99) && (b == hi || b >= -99) {
                            c.push(format!("{r} <> -99"));
                        }
                        format!("({})", c.join(" AND "))
                    })
                    .collect();
                let _ = write!(sql, "({})", parts.join(" OR "));
            }
            // Anything else (not expected in conditions): over codes.
            _ => {
                let mut coded = String::new();
                let _ = write!(coded, "{}", code(i));
                let not = if negate { "NOT " } else { "" };
                let cond = match test {
                    Test::Cmp(op, v) => format!("{coded} {} {}", op.sql(), p.int(*v)),
                    Test::In(values) => format!("{coded} = ANY({})", p.ints(values.to_vec())),
                    Test::Between(a, b) => {
                        format!("{coded} BETWEEN {} AND {}", p.int(*a), p.int(*b))
                    }
                };
                let _ = write!(sql, "({not}({cond}))");
            }
        }
    }
}

/// One result row: each GROUP BY column's code (`None`: missing), then one
/// value per measurement (histograms: one per bin).
pub type ResultRow = (Vec<Option<i64>>, Vec<i128>);

/// A value of the statement: the text of an exact integer (`numeric`
/// prints one with no fraction, or with a zero fraction). Beyond `i128`
/// it saturates (no sum of declared bounds comes near).
pub fn parse_value(text: &str) -> Result<i128, String> {
    let whole = match text.split_once('.') {
        Some((w, f)) if f.bytes().all(|b| b == b'0') => w,
        Some(_) => return Err("the database returned a value that is not a whole number".into()),
        None => text,
    };
    match whole.parse::<i128>() {
        Ok(v) => Ok(v),
        Err(_)
            if !whole.is_empty()
                && whole
                    .trim_start_matches('-')
                    .bytes()
                    .all(|b| b.is_ascii_digit()) =>
        {
            Ok(if whole.starts_with('-') {
                i128::MIN
            } else {
                i128::MAX
            })
        }
        Err(_) => Err("the database returned a value that is not a number".into()),
    }
}

/// Places the statement's rows in the engine's cell order (mixed radix over
/// the GROUP BY columns, first most significant, each column's missing key
/// last; see [`fedq_plan::plan::cell_keys`]), with 0 for cells no row fell
/// in. Several rows can land on one cell (raw labels outside the domain
/// all land on the missing key): their values are added, in `i128`, and
/// each total saturates to `i64` like the engine's. A key outside its
/// declared domain means the statement is wrong: an error, never a guess.
pub fn assemble(plan: &Plan, rows: Vec<ResultRow>) -> Result<Vec<Vec<i64>>, String> {
    let cells = fedq_plan::plan::cell_count(plan);
    let widths: Vec<usize> = plan
        .measurements
        .iter()
        .map(MeasurementSpec::values_per_cell)
        .collect();
    let mut sums: Vec<Vec<i128>> = widths.iter().map(|w| vec![0i128; cells * w]).collect();
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
        for (m, &w) in sums.iter_mut().zip(&widths) {
            for (slot, v) in m[cell * w..(cell + 1) * w].iter_mut().zip(values.by_ref()) {
                *slot = slot.saturating_add(v);
            }
        }
    }
    Ok(sums
        .into_iter()
        .map(|m| {
            m.into_iter()
                .map(|v| v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64)
                .collect()
        })
        .collect())
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
        assert!(st.params.contains(&Param::Text("Male".into())));
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
