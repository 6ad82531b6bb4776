//! A partner's own coding read straight from its database: the columns of a
//! dataset with a `[datasets.mapping]` (value maps, conversions) are read
//! through the very [`Mapper`] CSV ingest uses, in the node, so a database
//! source and an ingested file of the same rows give the same answers.
//!
//! The database cannot run the mapping (it is the node's code: trimming,
//! case folding, country names, age bands), so a query touching a mapped
//! column is answered in two steps:
//!
//! 1. The database groups the rows by what the node needs per row and
//!    nothing more: the plan's keys (as the fast path writes them), the raw
//!    text of each mapped column the query reads, the raw value of an
//!    unmapped column the node needs the code of (the other side of a
//!    comparison of two columns, a column in a per-row expression beside a
//!    mapped one), and, for each part of a condition that does not touch a
//!    mapped column, whether it is TRUE (written by the fast path's
//!    condition writer, [`Cx::predicate`]). It returns each group's row
//!    count and the measurements that touch no mapped column, summed over
//!    the group. A condition on a mapped column of whole numbers whose
//!    codes the known spellings tell (ages in years: [`Known::integers`])
//!    is written exactly in SQL like an unmapped one ([`Builder::exact`]).
//!    The WHERE keeps its conjuncts written exactly, and drops the rows
//!    whose known spellings fail the others
//!    ([`Builder::prefilter`]). A mapped column that only the WHERE reads
//!    is not grouped on its own: one residue column holds the raw text of
//!    all such columns, or NULL where the database can tell from known
//!    spellings that the WHERE is TRUE ([`Builder::sure`]), so most rows
//!    group by their keys alone.
//! 2. The node maps each group's raw text to codes, evaluates the rest of
//!    the conditions over them (in negation normal form, as TRUE or not,
//!    like the fast path), computes the keys and the measurements of mapped
//!    columns from the codes and the row count, and adds the groups up in
//!    the engine's cell order ([`statement::assemble`]).
//!
//! A group is a set of rows equal in every value the node looks at, so the
//! node's answer per group is the engine's per row, times the count. The
//! number of groups is the number of distinct combinations of those values
//! (a partner's own spellings, usually a handful per column); past
//! [`MAPPED_GROUPS_MAX`] the query fails, and the operator's log says to
//! map in a view instead.

use std::collections::HashMap;

use fedq_plan::plan::{CmpOp, KeyRule, MeasurementSpec, NumberKey, Plan, Predicate};
use fedq_plan::schema::{Column, Schema, MISSING};

use super::statement::{
    self, code, key_sql, measurement_sql, predicate_columns, raw, src_stage, used_columns, Cx,
    DbType, KeyRead, Param, Params, Relation, ResultRow,
};
use crate::mapping::{Mapped, Mapper};

/// The most groups a statement over mapped columns may return.
pub const MAPPED_GROUPS_MAX: usize = 200_000;

/// A WHERE atom on a mapped text column first keeps the rows with this
/// many of its likeliest passing spellings ([`Mapper::spellings`]).
const ACCEPT_FIRST: usize = 2;

/// What one GROUP BY column of a mapped statement holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Group {
    /// A key of the plan, read as the fast path reads it.
    Key(KeyRead),
    /// The raw text of declared column `i`, which has a mapping.
    Mapped(usize),
    /// The raw value of declared column `i` (no mapping), as `bigint`, or
    /// as text for a category.
    Value(usize),
    /// Whether a condition written in SQL is TRUE for the group's rows.
    Truth,
    /// The raw text of mapped columns read by the node's WHERE alone
    /// (`text[]`, in this order), or NULL when the database found the
    /// WHERE TRUE from known spellings ([`Builder::sure`]): such rows need
    /// no more than their keys, so they group by the keys alone.
    Residue(Vec<usize>),
}

/// What the node knows in advance of one column's raw values (empty when
/// it has no mapping).
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// Its known spellings and their codes, likeliest first
    /// ([`Mapper::spellings`]).
    pub spellings: Vec<(String, Option<i64>)>,
    /// Whether every whole number not among them is missing
    /// ([`Mapper::integers_known`]): a database column of whole numbers is
    /// then tested exactly in SQL ([`Builder::exact`]).
    pub integers: bool,
}

/// One group's column as read from the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupValue {
    /// A text (`None`: NULL).
    Text(Option<String>),
    /// A `bigint` (`None`: NULL).
    Int(Option<i64>),
    /// A `boolean`.
    Bool(bool),
    /// A [`Group::Residue`]: `None` when the WHERE is known TRUE.
    Residue(Option<Vec<Option<String>>>),
}

/// One result row: the group columns, the group's row count, and the
/// values of the measurements summed in the database.
pub type MappedRow = (Vec<GroupValue>, i128, Vec<i128>);

/// A test on a code, owned.
#[derive(Debug, Clone)]
enum CodeTest {
    Cmp(CmpOp, i64),
    In(Vec<i64>),
    Between(i64, i64),
}

impl CodeTest {
    fn holds(&self, code: i64) -> bool {
        match self {
            CodeTest::Cmp(op, v) => op.holds(code, *v),
            CodeTest::In(values) => values.contains(&code),
            CodeTest::Between(lo, hi) => *lo <= code && code <= *hi,
        }
    }
}

/// One atom on a column's code, as TRUE or not.
enum Atom {
    /// Present and passing the test (failing it, when negated).
    Test(CodeTest, bool),
    /// Present (missing, when false).
    Present(bool),
}

impl Atom {
    fn passes(&self, code: Option<i64>) -> bool {
        match self {
            Atom::Test(t, negate) => code.is_some_and(|c| t.holds(c) != *negate),
            Atom::Present(present) => code.is_some() == *present,
        }
    }
}

/// A condition the node evaluates per group, in negation normal form: TRUE
/// exactly when the engine's condition is TRUE for the group's rows.
#[derive(Debug, Clone)]
enum Cond {
    All(Vec<Cond>),
    Any(Vec<Cond>),
    /// Group column `g` (a [`Group::Truth`]).
    Sql(usize),
    /// Column `column`'s code is present and passes the test (fails it,
    /// when `negate`).
    Atom {
        column: usize,
        test: CodeTest,
        negate: bool,
    },
    /// Column `column`'s code is present (missing, when not `present`).
    Present {
        column: usize,
        present: bool,
    },
    /// Two columns' codes compared, both present, as the engine compares
    /// them (categories through `relabel`).
    Columns {
        left: usize,
        op: CmpOp,
        right: usize,
        relabel: Option<Vec<i64>>,
        negate: bool,
    },
}

impl Cond {
    fn holds(&self, codes: &[Option<i64>], truths: &[bool]) -> bool {
        match self {
            Cond::All(c) => c.iter().all(|c| c.holds(codes, truths)),
            Cond::Any(c) => c.iter().any(|c| c.holds(codes, truths)),
            Cond::Sql(g) => truths[*g],
            Cond::Atom {
                column,
                test,
                negate,
            } => codes[*column].is_some_and(|c| test.holds(c) != *negate),
            Cond::Present { column, present } => codes[*column].is_some() == *present,
            Cond::Columns {
                left,
                op,
                right,
                relabel,
                negate,
            } => match (codes[*left], codes[*right]) {
                (Some(x), Some(y)) => {
                    let x = relabel.as_ref().map_or(x, |m| m[x as usize]);
                    op.holds(x, y) != *negate
                }
                _ => false,
            },
        }
    }
}

/// How the node computes one GROUP BY key.
#[derive(Debug, Clone)]
enum NodeKey {
    /// Read from group column `g` (a [`Group::Key`]).
    Read(usize),
    /// Column `i`'s code (a plain key on a mapped column).
    Code(usize),
    /// A CASE bucket: the first branch TRUE, else the ELSE label.
    Case {
        branches: Vec<(Cond, i64)>,
        otherwise: Option<i64>,
    },
    /// A per-row number's key.
    Number(NumberKey),
}

/// Where one measurement's values come from.
#[derive(Debug, Clone)]
enum Measure {
    /// Summed in the database: the next values of the row.
    Sql(usize),
    /// Computed in the node from the group's codes and row count (with the
    /// condition of a `COUNT(*) FILTER`).
    Node(MeasurementSpec, Option<Cond>),
}

/// A statement over mapped columns and what the node does with its rows.
#[derive(Debug, Clone)]
pub struct MappedStatement {
    /// The SQL text.
    pub sql: String,
    /// Its bound values.
    pub params: Vec<Param>,
    /// What each GROUP BY column holds, in order; then come the row count
    /// and the database's values, as text.
    pub groups: Vec<Group>,
    keys: Vec<NodeKey>,
    filter: Option<Cond>,
    measures: Vec<Measure>,
}

/// Whether `plan` reads a column with a mapping.
pub fn touches(plan: &Plan, schema: &Schema, mapped: &[bool]) -> bool {
    used_columns(plan, schema)
        .iter()
        .any(|&i| mapped.get(i).copied().unwrap_or(false))
}

struct Builder<'a> {
    cx: Cx<'a>,
    mapped: &'a [bool],
    known: &'a [Known],
    p: Params,
    groups: Vec<Group>,
    items: Vec<String>,
    /// Column -> its group column, for columns decoded in the node.
    decoded: HashMap<usize, usize>,
    /// Mapped columns read by the node's WHERE alone: decoded from the
    /// [`Group::Residue`], not grouped one by one.
    residue: Vec<usize>,
}

impl Builder<'_> {
    fn is_mapped(&self, i: usize) -> bool {
        self.mapped.get(i).copied().unwrap_or(false)
    }

    fn touches(&self, columns: &[usize]) -> bool {
        columns.iter().any(|&c| self.is_mapped(c))
    }

    /// Whether mapped column `i` holds whole numbers whose codes the
    /// database can tell exactly from the known spellings
    /// ([`Known::integers`]).
    fn integers_known(&self, i: usize) -> bool {
        self.cx.db[i] == DbType::Integer && self.known.get(i).is_some_and(|k| k.integers)
    }

    fn push(&mut self, item: String, group: Group) -> usize {
        self.items.push(item);
        self.groups.push(group);
        self.groups.len() - 1
    }

    /// Makes column `i`'s code available to the node: its raw text when
    /// mapped, else its raw value.
    fn decode(&mut self, i: usize) {
        if self.decoded.contains_key(&i) || self.residue.contains(&i) {
            return;
        }
        let r = raw(i);
        let g = if self.is_mapped(i) {
            self.push(r, Group::Mapped(i))
        } else {
            let item = match (&self.cx.schema.columns[i], self.cx.db[i]) {
                (Column::Categorical { .. }, DbType::Text) => r,
                (Column::Boolean { .. }, DbType::Boolean) => format!("{r}::integer::bigint"),
                (Column::Integer { .. } | Column::Boolean { .. }, _) => format!("{r}::bigint"),
                // Not expected: the code as the database computes it.
                _ => code(i),
            };
            self.push(item, Group::Value(i))
        };
        self.decoded.insert(i, g);
    }

    /// A condition for the database's WHERE that drops only rows for
    /// which `f` (negated when `negate`; a conjunct the node evaluates) is
    /// not TRUE; `None`: no such condition (keep every row). Parts that
    /// touch no mapped column are written exactly ([`Cx::predicate`]); an
    /// atom on a mapped column drops the rows whose raw value is one of the
    /// column's known spellings ([`Mapper::spellings`]) whose code fails
    /// it; AND keeps what it can, OR needs all its parts (in negation
    /// normal form, like [`Builder::cond`]). Rows with other spellings
    /// stay, for the node to map; the node evaluates `f` on every group
    /// all the same.
    fn prefilter(&mut self, f: &Predicate, negate: bool) -> Option<String> {
        if let Some(sql) = self.exact(f, negate) {
            return Some(sql);
        }
        match f {
            Predicate::And(a, b) | Predicate::Or(a, b) => {
                let and = matches!(f, Predicate::And(..)) != negate;
                let mark = self.p.0.len();
                let (a, b) = (self.prefilter(a, negate), self.prefilter(b, negate));
                match (a, b, and) {
                    (Some(a), Some(b), true) => Some(format!("({a} AND {b})")),
                    (Some(a), Some(b), false) => Some(format!("({a} OR {b})")),
                    (a, b, true) => a.or(b),
                    (_, _, false) => {
                        // The part written is dropped: so are its
                        // parameters (an unused one has no type).
                        self.p.0.truncate(mark);
                        None
                    }
                }
            }
            Predicate::Not(a) => self.prefilter(a, !negate),
            _ => self.spelling_filter(f, negate),
        }
    }

    /// [`Builder::prefilter`] of one atom on a mapped column: keeps every
    /// row but those with a known spelling that fails it. A text column
    /// first keeps the rows with its likeliest passing spellings, so that
    /// most rows are decided after a comparison or two.
    fn spelling_filter(&mut self, f: &Predicate, negate: bool) -> Option<String> {
        let (column, atom) = atom_of(f, negate)?;
        if !self.is_mapped(column) {
            return None;
        }
        let fails = self.spelled(column, |c| !atom.passes(c), usize::MAX)?;
        let r = raw(column);
        let mut kept = Vec::new();
        if atom.passes(None) {
            kept.push(format!("{r} IS NULL"));
        }
        if self.cx.db[column] != DbType::Integer {
            kept.extend(self.spelled(column, |c| atom.passes(c), ACCEPT_FIRST));
        }
        kept.push(format!("NOT {fails}"));
        Some(format!("({})", kept.join(" OR ")))
    }

    /// A condition TRUE exactly when mapped column `column`'s raw value is
    /// one of its known spellings ([`Mapper::spellings`], likeliest first;
    /// at most `most` of them for text) whose code satisfies `wanted`, and
    /// never for NULL; `None` if no known spelling does. Text is compared
    /// with each in turn (past [`statement::CHAIN_MAX`], one `= ANY`); an
    /// integer column (ages in years) is tested against the ranges of the
    /// numbers spelt as PostgreSQL prints them.
    fn spelled(
        &mut self,
        column: usize,
        wanted: impl Fn(Option<i64>) -> bool,
        most: usize,
    ) -> Option<String> {
        let known = &self.known.get(column)?.spellings;
        let hits = known
            .iter()
            .filter(|(_, code)| wanted(*code))
            .map(|(s, _)| s);
        let r = raw(column);
        if self.cx.db[column] == DbType::Integer {
            let mut v: Vec<i64> = hits
                .filter_map(|s| s.parse::<i64>().ok().filter(|v| v.to_string() == **s))
                .collect();
            v.sort_unstable();
            let mut ranges: Vec<(i64, i64)> = Vec::new();
            for x in v {
                match ranges.last_mut() {
                    Some(last) if x == last.1 + 1 => last.1 = x,
                    _ => ranges.push((x, x)),
                }
            }
            if ranges.is_empty() {
                return None;
            }
            let parts: Vec<String> = ranges
                .into_iter()
                .map(|(a, b)| {
                    if a == b {
                        format!("{r} = {}", self.p.int(a))
                    } else {
                        format!("{r} BETWEEN {} AND {}", self.p.int(a), self.p.int(b))
                    }
                })
                .collect();
            return Some(format!("({})", parts.join(" OR ")));
        }
        let hits: Vec<String> = hits.take(most).cloned().collect();
        (!hits.is_empty()).then(|| self.p.text_in(&r, hits))
    }

    /// A condition TRUE only when `f` (negated when `negate`) is TRUE for
    /// the row, as far as the database can tell without the mapping: the
    /// parts touching no mapped column exactly ([`Cx::predicate`]); an atom
    /// on a mapped column TRUE for the known spellings that pass it (and
    /// NULL, when missing passes), not TRUE for any other spelling, which
    /// the node maps; AND and OR in negation normal form, which keep
    /// "TRUE only when TRUE". `FALSE` when the database cannot tell.
    fn sure(&mut self, f: &Predicate, negate: bool) -> String {
        if let Some(sql) = self.exact(f, negate) {
            return sql;
        }
        match f {
            Predicate::And(a, b) | Predicate::Or(a, b) => {
                let (a, b) = (self.sure(a, negate), self.sure(b, negate));
                format!("({a} {} {b})", junction(f, negate))
            }
            Predicate::Not(a) => self.sure(a, !negate),
            _ => {
                let Some((column, atom)) = atom_of(f, negate) else {
                    return "FALSE".to_string();
                };
                let mut parts = Vec::new();
                if atom.passes(None) {
                    parts.push(format!("{} IS NULL", raw(column)));
                }
                parts.extend(self.spelled(column, |c| atom.passes(c), usize::MAX));
                if parts.is_empty() {
                    "FALSE".to_string()
                } else {
                    format!("({})", parts.join(" OR "))
                }
            }
        }
    }

    /// Condition `f` (negated when `negate`) written exactly in SQL, TRUE
    /// exactly when the engine's is: the parts touching no mapped column
    /// by [`Cx::predicate`], an atom on a mapped column of whole numbers
    /// whose codes the known spellings tell ([`Builder::integers_known`],
    /// ages in years) as the ranges of numbers that pass, AND and OR in
    /// negation normal form; `None` when some part needs the node (its
    /// parameters are dropped with it).
    fn exact(&mut self, f: &Predicate, negate: bool) -> Option<String> {
        let mark = self.p.0.len();
        let sql = self.exact_parts(f, negate);
        if sql.is_none() {
            self.p.0.truncate(mark);
        }
        sql
    }

    fn exact_parts(&mut self, f: &Predicate, negate: bool) -> Option<String> {
        let mut columns = Vec::new();
        predicate_columns(f, &mut columns);
        if !self.touches(&columns) {
            let mut sql = String::new();
            self.cx.predicate(f, negate, &mut self.p, &mut sql);
            return Some(sql);
        }
        match f {
            Predicate::And(a, b) | Predicate::Or(a, b) => {
                let a = self.exact_parts(a, negate)?;
                let b = self.exact_parts(b, negate)?;
                Some(format!("({a} {} {b})", junction(f, negate)))
            }
            Predicate::Not(a) => self.exact_parts(a, !negate),
            _ => {
                let (column, atom) = atom_of(f, negate)?;
                if !self.integers_known(column) {
                    return None;
                }
                // A number not among the known spellings, and NULL, are
                // missing.
                Some(if atom.passes(None) {
                    match self.spelled(column, |c| c.is_some() && !atom.passes(c), usize::MAX) {
                        Some(fails) => format!("({} IS NULL OR NOT {fails})", raw(column)),
                        None => "TRUE".to_string(),
                    }
                } else {
                    self.spelled(column, |c| atom.passes(c), usize::MAX)
                        .unwrap_or_else(|| "FALSE".to_string())
                })
            }
        }
    }

    /// A group column saying whether `sql` is TRUE.
    fn truth(&mut self, sql: String) -> usize {
        self.push(format!("(({sql}) IS TRUE)"), Group::Truth)
    }

    /// Condition `f` (negated when `negate`) as the node evaluates it; the
    /// parts touching no mapped column are evaluated by the database.
    fn cond(&mut self, f: &Predicate, negate: bool) -> Cond {
        if let Some(sql) = self.exact(f, negate) {
            return Cond::Sql(self.truth(sql));
        }
        let atom = |b: &mut Self, column: usize, test: CodeTest, negate: bool| {
            b.decode(column);
            Cond::Atom {
                column,
                test,
                negate,
            }
        };
        match f {
            Predicate::And(a, b) | Predicate::Or(a, b) => {
                let and = matches!(f, Predicate::And(..)) != negate;
                let parts = vec![self.cond(a, negate), self.cond(b, negate)];
                if and {
                    Cond::All(parts)
                } else {
                    Cond::Any(parts)
                }
            }
            Predicate::Not(a) => self.cond(a, !negate),
            Predicate::Cmp { column, op, value } => {
                atom(self, *column, CodeTest::Cmp(*op, *value), negate)
            }
            Predicate::In {
                column,
                values,
                negated,
            } => atom(
                self,
                *column,
                CodeTest::In(values.clone()),
                negate != *negated,
            ),
            Predicate::Between {
                column,
                low,
                high,
                negated,
            } => atom(
                self,
                *column,
                CodeTest::Between(*low, *high),
                negate != *negated,
            ),
            Predicate::IsMissing { column, negated } => {
                self.decode(*column);
                Cond::Present {
                    column: *column,
                    present: negate != *negated,
                }
            }
            Predicate::Columns {
                left,
                op,
                right,
                relabel,
            } => {
                self.decode(*left);
                self.decode(*right);
                Cond::Columns {
                    left: *left,
                    op: *op,
                    right: *right,
                    relabel: relabel.clone(),
                    negate,
                }
            }
        }
    }
}

/// Builds the statement for `plan` over `relation` when it reads a column
/// with a mapping (`mapped[i]`; see [`touches`]). `schema` names the
/// database's columns (the partner's own names).
pub fn build(
    plan: &Plan,
    schema: &Schema,
    db: &[DbType],
    mapped: &[bool],
    known: &[Known],
    relation: &Relation,
) -> MappedStatement {
    let mut p = Params::default();
    let used = used_columns(plan, schema);
    let (mut sql, from) = src_stage(schema, db, &used, mapped, relation, &mut p);
    let mut b = Builder {
        cx: Cx { schema, db },
        mapped,
        known,
        p,
        groups: Vec::new(),
        items: Vec::new(),
        decoded: HashMap::new(),
        residue: Vec::new(),
    };

    // The keys.
    let mut keys = Vec::with_capacity(plan.group_by.len());
    for &g in &plan.group_by {
        let key = match plan.bucket(g).map(|k| &k.rule) {
            Some(KeyRule::Case {
                branches,
                otherwise,
            }) => {
                let mut columns = Vec::new();
                branches
                    .iter()
                    .for_each(|(c, _)| predicate_columns(c, &mut columns));
                if b.touches(&columns) {
                    let branches = branches
                        .iter()
                        .map(|(c, label)| (b.cond(c, false), *label as i64))
                        .collect();
                    Some(NodeKey::Case {
                        branches,
                        otherwise: otherwise.map(|o| o as i64),
                    })
                } else {
                    None
                }
            }
            Some(KeyRule::Number(k)) if b.touches(&k.expr.columns()) => {
                k.expr.columns().into_iter().for_each(|c| b.decode(c));
                Some(NodeKey::Number(k.clone()))
            }
            None if b.is_mapped(g) => {
                b.decode(g);
                Some(NodeKey::Code(g))
            }
            _ => None,
        };
        keys.push(match key {
            Some(k) => k,
            None => {
                let (item, read) = key_sql(plan, g, &b.cx, true, &mut b.p);
                NodeKey::Read(b.push(item, Group::Key(read)))
            }
        });
    }

    // The measurements.
    let mut values = Vec::new();
    let mut measures = Vec::with_capacity(plan.measurements.len());
    for m in &plan.measurements {
        let node = match m {
            // The group's row count, already selected.
            MeasurementSpec::CountRows => true,
            MeasurementSpec::CountWhere { condition, .. } => {
                let mut columns = Vec::new();
                predicate_columns(condition, &mut columns);
                if b.touches(&columns) {
                    let cond = b.cond(condition, false);
                    measures.push(Measure::Node(m.clone(), Some(cond)));
                    continue;
                }
                false
            }
            MeasurementSpec::CountPresent { column }
            | MeasurementSpec::Sum { column, .. }
            | MeasurementSpec::Histogram { column, .. }
            | MeasurementSpec::SumSquares { column, .. } => b.is_mapped(*column),
            MeasurementSpec::SumOf { expr, .. } | MeasurementSpec::CountOf { expr, .. } => {
                b.touches(&expr.columns())
            }
        };
        if node {
            let columns = match m {
                MeasurementSpec::SumOf { expr, .. } | MeasurementSpec::CountOf { expr, .. } => {
                    expr.columns()
                }
                MeasurementSpec::CountPresent { column }
                | MeasurementSpec::Sum { column, .. }
                | MeasurementSpec::Histogram { column, .. }
                | MeasurementSpec::SumSquares { column, .. } => vec![*column],
                _ => Vec::new(),
            };
            columns.into_iter().for_each(|c| b.decode(c));
            measures.push(Measure::Node(m.clone(), None));
        } else {
            let before = values.len();
            measurement_sql(m, &b.cx, &mut b.p, &mut values);
            measures.push(Measure::Sql(values.len() - before));
        }
    }

    // The WHERE, after the keys and measurements have decoded what they
    // read: its conjuncts the database can tell exactly in SQL
    // ([`Builder::exact`]), the rest in the node, with the database
    // dropping the rows of known failing spellings first
    // ([`Builder::prefilter`]).
    let mut conjuncts = Vec::new();
    if let Some(f) = &plan.filter {
        flatten_and(f, &mut conjuncts);
    }
    let mut sql_where = Vec::new();
    let mut node_conjuncts = Vec::new();
    for c in conjuncts {
        match b.exact(c, false) {
            Some(s) => sql_where.push(s),
            None => node_conjuncts.push(c),
        }
    }
    // Mapped columns the node's WHERE alone reads go in one residue
    // column, NULL where the database can tell the WHERE is TRUE: most
    // rows then group by their keys alone.
    let mut only_where = Vec::new();
    node_conjuncts
        .iter()
        .for_each(|c| predicate_columns(c, &mut only_where));
    only_where.sort_unstable();
    only_where.dedup();
    only_where.retain(|&i| b.is_mapped(i) && !b.decoded.contains_key(&i));
    let mut residue = None;
    if !only_where.is_empty() {
        let mark = b.p.0.len();
        let parts: Vec<String> = node_conjuncts.iter().map(|c| b.sure(c, false)).collect();
        if parts.iter().any(|s| s == "FALSE") {
            // Nothing to tell: its parameters go with it.
            b.p.0.truncate(mark);
        } else {
            b.residue = only_where;
            residue = Some(parts.join(" AND "));
        }
    }
    let mut node_where = Vec::new();
    for c in node_conjuncts {
        if let Some(pre) = b.prefilter(c, false) {
            sql_where.push(pre);
        }
        node_where.push(b.cond(c, false));
    }
    if let Some(sure) = residue {
        let raws: Vec<String> = b
            .residue
            .iter()
            .map(|&i| match b.cx.db[i] {
                DbType::Integer => format!("{}::text COLLATE \"C\"", raw(i)),
                DbType::Text | DbType::Boolean => raw(i),
            })
            .collect();
        let item = format!(
            "CASE WHEN {sure} THEN NULL ELSE ARRAY[{}] END",
            raws.join(", ")
        );
        let columns = b.residue.clone();
        b.push(item, Group::Residue(columns));
    }
    let filter = (!node_where.is_empty()).then_some(Cond::All(node_where));

    sql.push_str(" SELECT ");
    let mut items = b.items.clone();
    items.push("COUNT(*)::text".to_string());
    items.extend(values);
    sql.push_str(&items.join(", "));
    sql.push_str(&format!(" FROM {from}"));
    if !sql_where.is_empty() {
        sql.push_str(&format!(" WHERE {}", sql_where.join(" AND ")));
    }
    if !b.groups.is_empty() {
        let positions: Vec<String> = (1..=b.groups.len()).map(|k| k.to_string()).collect();
        sql.push_str(&format!(" GROUP BY {}", positions.join(", ")));
        let limit = b.p.int(MAPPED_GROUPS_MAX as i64 + 1);
        sql.push_str(&format!(" LIMIT {limit}"));
    }
    MappedStatement {
        sql,
        params: b.p.0,
        groups: b.groups,
        keys,
        filter,
        measures,
    }
}

/// Predicate `f` (negated when `negate`) as an atom on one column's code;
/// `None` for anything else (two columns compared, AND, OR, NOT).
fn atom_of(f: &Predicate, negate: bool) -> Option<(usize, Atom)> {
    Some(match f {
        Predicate::Cmp { column, op, value } => {
            (*column, Atom::Test(CodeTest::Cmp(*op, *value), negate))
        }
        Predicate::In {
            column,
            values,
            negated,
        } => (
            *column,
            Atom::Test(CodeTest::In(values.clone()), negate != *negated),
        ),
        Predicate::Between {
            column,
            low,
            high,
            negated,
        } => (
            *column,
            Atom::Test(CodeTest::Between(*low, *high), negate != *negated),
        ),
        Predicate::IsMissing { column, negated } => (*column, Atom::Present(negate != *negated)),
        _ => return None,
    })
}

/// The SQL junction of AND or OR `f` (negated when `negate`) in negation
/// normal form: `NOT (a AND b)` is `NOT a OR NOT b`.
fn junction(f: &Predicate, negate: bool) -> &'static str {
    if matches!(f, Predicate::And(..)) != negate {
        "AND"
    } else {
        "OR"
    }
}

/// The conjuncts of a top-level AND chain.
fn flatten_and<'a>(f: &'a Predicate, out: &mut Vec<&'a Predicate>) {
    match f {
        Predicate::And(a, b) => {
            flatten_and(a, out);
            flatten_and(b, out);
        }
        other => out.push(other),
    }
}

/// The code of a raw value of column `i`, as the node reads it: through the
/// mapping for a mapped column (a value the mapping cannot place is
/// missing: a database source has no ingest to fail), else as the fast
/// path reads a raw key.
fn code_of(
    i: usize,
    column: &Column,
    mapper: &Mapper,
    value: &GroupValue,
) -> Result<Option<i64>, String> {
    Ok(match (column, value) {
        (_, GroupValue::Text(None) | GroupValue::Int(None)) => None,
        (_, GroupValue::Text(Some(t))) if mapper.is_mapped(i) => match mapper.map(i, column, t) {
            Some(Mapped::Code(c)) if c != MISSING => Some(c),
            _ => None,
        },
        (Column::Categorical { domain, .. }, GroupValue::Text(Some(t))) => {
            domain.iter().position(|d| d == t).map(|c| c as i64)
        }
        (Column::Boolean { .. }, GroupValue::Int(Some(v))) => (0..=1).contains(v).then_some(*v),
        (Column::Integer { min, max, .. }, GroupValue::Int(Some(v))) => {
            (*v != -99).then(|| (*v).clamp(*min, *max))
        }
        _ => return Err("the database returned a value of an unexpected type".into()),
    })
}

/// The node's step: each group's codes, conditions, keys and measurements,
/// added up in the engine's cell order. `schema` is the declared one.
pub fn assemble(
    st: &MappedStatement,
    plan: &Plan,
    schema: &Schema,
    mapper: &Mapper,
    rows: Vec<MappedRow>,
) -> Result<Vec<Vec<i64>>, String> {
    if rows.len() > MAPPED_GROUPS_MAX {
        return Err(format!(
            "the mapped columns read by this query have more than {MAPPED_GROUPS_MAX} distinct combinations of raw values; map them in a view over the table instead (deploy/README.md)"
        ));
    }
    let mut out: Vec<ResultRow> = Vec::with_capacity(rows.len());
    let mut codes: Vec<Option<i64>> = vec![None; schema.columns.len()];
    let mut truths: Vec<bool> = vec![false; st.groups.len()];
    for (groups, n, values) in rows {
        if groups.len() != st.groups.len() {
            return Err("the database returned a row of the wrong shape".into());
        }
        let mut read: Vec<Option<i64>> = vec![None; st.groups.len()];
        let mut sure = false;
        for (g, (kind, value)) in st.groups.iter().zip(&groups).enumerate() {
            match (kind, value) {
                (Group::Residue(columns), GroupValue::Residue(None)) => {
                    sure = true;
                    columns.iter().for_each(|&i| codes[i] = None);
                }
                (Group::Residue(columns), GroupValue::Residue(Some(raws))) => {
                    if raws.len() != columns.len() {
                        return Err("the database returned a row of the wrong shape".into());
                    }
                    for (&i, t) in columns.iter().zip(raws) {
                        codes[i] =
                            code_of(i, &schema.columns[i], mapper, &GroupValue::Text(t.clone()))?;
                    }
                }
                (Group::Key(k), GroupValue::Text(t)) => read[g] = k.label(t.as_deref()),
                (Group::Key(k), GroupValue::Int(v)) => read[g] = k.number(*v),
                (Group::Mapped(i) | Group::Value(i), v) => {
                    codes[*i] = code_of(*i, &schema.columns[*i], mapper, v)?
                }
                (Group::Truth, GroupValue::Bool(t)) => truths[g] = *t,
                _ => return Err("the database returned a value of an unexpected type".into()),
            }
        }
        if let Some(f) = &st.filter {
            if !sure && !f.holds(&codes, &truths) {
                continue;
            }
        }
        let keys = st
            .keys
            .iter()
            .map(|k| match k {
                NodeKey::Read(g) => read[*g],
                NodeKey::Code(i) => codes[*i],
                NodeKey::Case {
                    branches,
                    otherwise,
                } => branches
                    .iter()
                    .find(|(c, _)| c.holds(&codes, &truths))
                    .map(|(_, label)| *label)
                    .or(*otherwise),
                NodeKey::Number(k) => k.expr.eval(&|c| codes[c]).map(|v| k.key(v) as i64),
            })
            .collect();
        let mut sql_values = values.into_iter();
        let mut vals = Vec::new();
        for m in &st.measures {
            match m {
                Measure::Sql(w) => vals.extend(sql_values.by_ref().take(*w)),
                Measure::Node(spec, cond) => {
                    node_values(spec, cond.as_ref(), &codes, &truths, n, &mut vals)
                }
            }
        }
        out.push((keys, vals));
    }
    statement::assemble(plan, out)
}

/// Measurement `m` over a group of `n` rows equal in every code it reads.
fn node_values(
    m: &MeasurementSpec,
    cond: Option<&Cond>,
    codes: &[Option<i64>],
    truths: &[bool],
    n: i128,
    out: &mut Vec<i128>,
) {
    let clamp = |v: i128, min: i64, max: i64| v.clamp(i128::from(min), i128::from(max));
    match m {
        MeasurementSpec::CountRows => out.push(n),
        MeasurementSpec::CountWhere { .. } => {
            out.push(if cond.is_some_and(|c| c.holds(codes, truths)) {
                n
            } else {
                0
            })
        }
        MeasurementSpec::CountPresent { column } => {
            out.push(if codes[*column].is_some() { n } else { 0 })
        }
        MeasurementSpec::Sum { column, min, max } => out
            .push(codes[*column].map_or(0, |v| clamp(i128::from(v), *min, *max).saturating_mul(n))),
        MeasurementSpec::SumSquares {
            column,
            center,
            min,
            max,
        } => out.push(codes[*column].map_or(0, |v| {
            let d = clamp(i128::from(v), *min, *max) - i128::from(*center);
            d.saturating_mul(d).saturating_mul(n)
        })),
        MeasurementSpec::Histogram {
            column,
            min,
            max,
            bins,
        } => {
            let start = out.len();
            out.extend(std::iter::repeat_n(0, *bins as usize));
            if let Some(v) = codes[*column] {
                out[start + fedq_dp::distribution::bin_of(v, *min, *max, *bins)] = n;
            }
        }
        MeasurementSpec::SumOf { expr, min, max, .. } => out.push(
            expr.eval(&|c| codes[c])
                .map_or(0, |v| clamp(v, *min, *max).saturating_mul(n)),
        ),
        MeasurementSpec::CountOf { expr, .. } => out.push(if expr.eval(&|c| codes[c]).is_some() {
            n
        } else {
            0
        }),
    }
}
