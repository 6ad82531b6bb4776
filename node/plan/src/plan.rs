//! From SQL text to a typed, validated query plan.
//!
//! The SQL subset is parsed with `sqlparser` and then validated against the
//! dataset's declared schema. Everything the privacy analysis needs is fixed
//! here, before any data is touched: which measurements are released, their
//! sensitivities (from declared bounds only), and the cells (the declared
//! domain cross product of the GROUP BY columns).
//!
//! Errors name the unsupported or invalid part and depend only on the query
//! and the schema, never on the data (DESIGN invariant 2).

use sqlparser::ast::{
    BinaryOperator, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr,
    ObjectNamePart, SelectItem, SetExpr, Statement, TableFactor, UnaryOperator, Value,
};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;

use crate::lookup::{public_table, LookupTable, PUBLIC_TABLES};
use crate::schema::{parse_bool, Column, Schema, MAX_BINS, MAX_INTEGER_GROUP_KEYS};

/// A query that failed validation, with a message meant for the analyst.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, PlanError> {
    Err(PlanError(msg.into()))
}

/// What one item of the SELECT list asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// `COUNT(*)` or `COUNT(col)`.
    Count,
    /// `SUM(col)` of values clamped to the declared bounds.
    Sum,
    /// `AVG(col)`: a noisy sum divided by a noisy count of non-missing values.
    Avg,
    /// `QUANTILE(col, q)` / `MEDIAN(col)`: read off the noisy histogram over
    /// the column's declared bins (a noisy CDF).
    Quantile,
    /// `HISTOGRAM(col, k)`: noisy counts of `k` equal-width bins.
    Histogram,
    /// `VARIANCE(col)`: sample variance from a noisy count, sum and centred
    /// sum of squares.
    Variance,
    /// `STDDEV(col)`: the square root of [`OutputKind::Variance`].
    Stddev,
}

/// One aggregate of the SELECT list, mapped to the measurements it needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// As the analyst wrote it (normalised), e.g. `AVG(traffickMonths)`.
    pub label: String,
    /// What is computed from the measurements.
    pub kind: OutputKind,
    /// The count (COUNT) or the sum (SUM, AVG) measurement.
    pub measurement: usize,
    /// AVG only: the count of non-missing values.
    pub count_measurement: Option<usize>,
    /// SUM, AVG, QUANTILE, HISTOGRAM, VARIANCE, STDDEV: the declared
    /// bounds values are clamped to.
    pub bounds: Option<(i64, i64)>,
    /// QUANTILE: which quantile, in `[0, 1]`.
    pub quantile: Option<f64>,
    /// VARIANCE and STDDEV: the centred sum of squares measurement and its
    /// centre.
    pub squares: Option<(usize, i64)>,
}

/// One vector of values released with noise: one value per cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeasurementSpec {
    /// Number of records in the cell.
    CountRows,
    /// Number of records in the cell for which a condition is TRUE:
    /// `COUNT(*) FILTER (WHERE c)`, `SUM(CASE WHEN c THEN 1 ELSE 0 END)`.
    CountWhere {
        /// The condition, as in WHERE.
        condition: Predicate,
        /// The condition as written (for labels).
        text: String,
    },
    /// Number of records in the cell whose column is not missing.
    CountPresent {
        /// Column index.
        column: usize,
    },
    /// Sum of the column clamped to `[min, max]`; missing values add nothing.
    Sum {
        /// Column index.
        column: usize,
        /// Declared lower bound.
        min: i64,
        /// Declared upper bound.
        max: i64,
    },
    /// Sum of a per-row expression (`SUM(a + b)`, `SUM(COALESCE(x, 0))`),
    /// each value clamped to `[min, max]`, the bounds derived from the
    /// declared bounds by interval arithmetic ([`RowExpr::bounds`]); rows
    /// where the expression is NULL add nothing.
    SumOf {
        /// The expression.
        expr: RowExpr,
        /// The expression as written (for labels).
        text: String,
        /// Derived lower bound.
        min: i64,
        /// Derived upper bound.
        max: i64,
    },
    /// Number of records in the cell where a per-row expression is not
    /// NULL (the count AVG of an expression divides by).
    CountOf {
        /// The expression.
        expr: RowExpr,
        /// The expression as written (for labels).
        text: String,
    },
    /// Per cell, the number of non-missing values in each of `bins`
    /// equal-width bins over `[min, max]` (see [`fedq_dp::distribution`]):
    /// `bins` values per cell, cell-major.
    Histogram {
        /// Column index.
        column: usize,
        /// Declared lower bound.
        min: i64,
        /// Declared upper bound.
        max: i64,
        /// Number of bins.
        bins: u64,
    },
    /// Sum of `(x - center)^2` over non-missing values, `x` clamped to
    /// `[min, max]`; `center` is the middle of the bounds, which makes the
    /// sensitivity a quarter of that of the raw squares.
    SumSquares {
        /// Column index.
        column: usize,
        /// Centre the squares are taken around.
        center: i64,
        /// Declared lower bound.
        min: i64,
        /// Declared upper bound.
        max: i64,
    },
}

impl MeasurementSpec {
    /// Values released per cell (the number of bins for histograms).
    pub fn values_per_cell(&self) -> usize {
        match self {
            MeasurementSpec::Histogram { bins, .. } => *bins as usize,
            _ => 1,
        }
    }

    /// L1 sensitivity of the whole vector of cell values under adding or
    /// removing one record (the privacy unit). Each record falls in exactly
    /// one cell, so the vector's sensitivity equals one cell's:
    /// 1 for counts and histograms (a record falls in one bin of one cell),
    /// `max(|min|, |max|)` for clamped sums, `max((min-c)^2, (max-c)^2)` for
    /// centred squares. Computed from declared bounds only (DESIGN invariant
    /// 4). Per record: [`Plan::sensitivity`] scales it to the privacy unit.
    pub fn sensitivity(&self) -> i64 {
        self.one_record_change()
    }

    /// L2 sensitivity of the vector of cell values under adding or removing
    /// one record, for the discrete Gaussian. One record changes one cell
    /// by at most [`Self::one_record_change`], so L2 equals L1 here. When a
    /// privacy unit may contribute K records (person-level privacy), both
    /// sensitivities become K times this; K records can spread over K
    /// cells, whose exact L2 (`sqrt(K)` times the change) needs that
    /// structure, so `K * L1 >= L2` is the conservative choice.
    pub fn l2_sensitivity(&self) -> i64 {
        self.one_record_change()
    }

    /// The most one record can change the one cell it falls in: 1 for a
    /// count, `max(|min|, |max|)` for a clamped sum (declared bounds only).
    fn one_record_change(&self) -> i64 {
        match self {
            MeasurementSpec::CountRows
            | MeasurementSpec::CountWhere { .. }
            | MeasurementSpec::CountPresent { .. }
            | MeasurementSpec::CountOf { .. }
            | MeasurementSpec::Histogram { .. } => 1,
            MeasurementSpec::Sum { min, max, .. } | MeasurementSpec::SumOf { min, max, .. } => {
                min.unsigned_abs().max(max.unsigned_abs()).max(1) as i64
            }
            MeasurementSpec::SumSquares {
                center, min, max, ..
            } => {
                let d = (min - center)
                    .unsigned_abs()
                    .max((max - center).unsigned_abs());
                d.saturating_mul(d).clamp(1, i64::MAX as u64) as i64
            }
        }
    }

    /// Label shown to the analyst, e.g. `SUM(traffickMonths)`.
    pub fn label(&self, schema: &Schema) -> String {
        match self {
            MeasurementSpec::CountRows => "COUNT(*)".into(),
            MeasurementSpec::CountWhere { text, .. } => format!("COUNT(*) FILTER (WHERE {text})"),
            MeasurementSpec::CountPresent { column } => {
                format!("COUNT({})", schema.columns[*column].name())
            }
            MeasurementSpec::Sum { column, .. } => {
                format!("SUM({})", schema.columns[*column].name())
            }
            MeasurementSpec::Histogram { column, bins, .. } => {
                format!("HISTOGRAM({}, {bins})", schema.columns[*column].name())
            }
            MeasurementSpec::SumOf { text, .. } => format!("SUM({text})"),
            MeasurementSpec::CountOf { text, .. } => format!("COUNT({text})"),
            MeasurementSpec::SumSquares { column, center, .. } => {
                format!("SUM(({} - {center})^2)", schema.columns[*column].name())
            }
        }
    }
}

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
    /// Whether `a op b` holds.
    pub fn holds(self, a: i64, b: i64) -> bool {
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
fn div(x: i128, k: i64) -> i128 {
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

/// A validated query.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Dataset of the FROM clause.
    pub dataset: String,
    /// GROUP BY column indices, in order.
    pub group_by: Vec<usize>,
    /// Domain size of each GROUP BY column.
    pub group_sizes: Vec<usize>,
    /// Aggregates of the SELECT list, in order.
    pub outputs: Vec<Output>,
    /// Distinct measurements, in first-use order; the epsilon is split
    /// evenly across them.
    pub measurements: Vec<MeasurementSpec>,
    /// The WHERE clause.
    pub filter: Option<Predicate>,
    /// Records one privacy unit may contribute (1, or the dataset's
    /// per-person bound); every sensitivity is multiplied by it.
    pub contribution_bound: i64,
    /// The open-domain column grouped by, if any: then it is the only
    /// GROUP BY column, `COUNT(*)` the only measurement, and the released
    /// keys are those passing a threshold (not the declared domain).
    pub open_key: Option<usize>,
    /// GROUP BY keys computed per row (CASE buckets). A `group_by` entry
    /// `schema_columns + i` is `buckets[i]` ([`Plan::bucket`]).
    pub buckets: Vec<Bucket>,
    /// How many columns the schema declares (where bucket indices start).
    pub schema_columns: usize,
}

/// A GROUP BY key computed per row from declared columns alone:
/// `CASE WHEN c1 THEN 'a' WHEN c2 THEN 'b' ... [ELSE 'z'] END`. Its domain
/// is its literal labels (public: they are in the query), so every record
/// still lands in exactly one cell and the sensitivities are those of any
/// GROUP BY.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// Its name in answers: the alias, or the expression as written.
    pub name: String,
    /// The expression as written (matched against the SELECT list).
    pub text: String,
    /// In order: a row takes the label of the first condition that is
    /// TRUE for it (SQL's CASE; an unknown condition does not match).
    pub branches: Vec<(Predicate, usize)>,
    /// The labels (THEN and ELSE literals), each once, in order of first
    /// appearance; a cell's key code is the label's index.
    pub labels: Vec<String>,
    /// The ELSE label; without ELSE a row no condition matches is (missing).
    pub otherwise: Option<usize>,
}

impl Plan {
    /// The CASE bucket a `group_by` entry stands for, if it is one.
    pub fn bucket(&self, g: usize) -> Option<&Bucket> {
        g.checked_sub(self.schema_columns)
            .and_then(|i| self.buckets.get(i))
    }

    /// The name of GROUP BY entry `g` in answers.
    pub fn group_name<'a>(&'a self, schema: &'a Schema, g: usize) -> &'a str {
        match self.bucket(g) {
            Some(b) => &b.name,
            None => schema.columns[g].name(),
        }
    }

    /// The SELECT list's outputs as answers state them: the node builds its
    /// answer with this, the coordinator the answer it expects.
    pub fn output_columns(&self) -> Vec<fedq_proto::v1::OutputColumn> {
        use fedq_proto::v1::OutputKind as Wire;
        self.outputs
            .iter()
            .map(|o| fedq_proto::v1::OutputColumn {
                label: o.label.clone(),
                kind: match o.kind {
                    OutputKind::Count => Wire::Count,
                    OutputKind::Sum => Wire::Sum,
                    OutputKind::Avg => Wire::Avg,
                    OutputKind::Quantile => Wire::Quantile,
                    OutputKind::Histogram => Wire::Histogram,
                    OutputKind::Variance => Wire::Variance,
                    OutputKind::Stddev => Wire::Stddev,
                } as i32,
                measurement: o.measurement as u32,
                count_measurement: o.count_measurement.map(|c| c as u32),
                lower: o.bounds.map(|b| b.0),
                upper: o.bounds.map(|b| b.1),
                quantile: o.quantile.unwrap_or(0.0),
                square_measurement: o.squares.map(|s| s.0 as u32),
                center: o.squares.map_or(0, |s| s.1),
            })
            .collect()
    }

    /// The names of the GROUP BY entries in answers, in order.
    pub fn group_names(&self, schema: &Schema) -> Vec<String> {
        self.group_by
            .iter()
            .map(|&g| self.group_name(schema, g).to_string())
            .collect()
    }

    /// Number of released cells: the product of the GROUP BY domain sizes.
    pub fn cell_count(&self) -> usize {
        self.group_sizes.iter().product()
    }

    /// L1 sensitivity of measurement `i` under adding or removing one
    /// privacy unit: the per-record sensitivity times the records a unit
    /// may contribute (truncation enforces the bound).
    pub fn sensitivity(&self, i: usize) -> i64 {
        self.measurements[i]
            .sensitivity()
            .saturating_mul(self.contribution_bound)
    }
}

/// A query parsed once and checked to be within the supported SELECT
/// subset, not yet validated against a schema.
pub struct Parsed {
    select: Box<sqlparser::ast::Select>,
    /// Joins to public lookup tables (their JOIN clauses taken out of
    /// `select`), resolved against the schema by [`plan_parsed`].
    joins: Vec<PublicJoin>,
}

/// A join of the dataset to a public lookup table ([`crate::lookup`]).
#[derive(Debug, Clone)]
struct PublicJoin {
    table: &'static LookupTable,
    /// The names the query calls it by: its alias, else its name.
    name: String,
    /// The dataset column joined to the table's key (ON).
    column: String,
    /// INNER: records whose value has no key in the table are dropped;
    /// LEFT: kept, the table's value missing for them.
    inner: bool,
}

impl Parsed {
    /// The dataset named in FROM, so the caller can fetch its schema.
    pub fn dataset(&self) -> Result<String, PlanError> {
        table_name(&self.select.from)
    }
}

/// Parses `sql` (see [`Parsed`]).
pub fn parse(sql: &str) -> Result<Parsed, PlanError> {
    let mut select = parse_select(sql)?;
    let joins = public_joins(&mut select)?;
    Ok(Parsed { select, joins })
}

/// Extracts the dataset named in FROM, so the caller can fetch its schema.
pub fn dataset_of(sql: &str) -> Result<String, PlanError> {
    parse(sql)?.dataset()
}

/// Parses and validates `sql` against `schema`. `max_cells` bounds the GROUP
/// BY cross product.
pub fn plan(sql: &str, schema: &Schema, max_cells: usize) -> Result<Plan, PlanError> {
    plan_parsed(&parse(sql)?, schema, max_cells)
}

/// Validates a parsed query against `schema` (see [`plan`]).
pub fn plan_parsed(parsed: &Parsed, schema: &Schema, max_cells: usize) -> Result<Plan, PlanError> {
    // A query joining a public table is planned as its rewrite over the
    // dataset's own column (CASE buckets, IN lists); others as written.
    let rewritten;
    let select: &sqlparser::ast::Select = if parsed.joins.is_empty() {
        &parsed.select
    } else {
        rewritten = resolve_joins(&parsed.select, &parsed.joins, schema)?;
        &rewritten
    };
    let dataset = table_name(&select.from)?;

    let group_exprs = match &select.group_by {
        GroupByExpr::Expressions(exprs, modifiers) => {
            if !modifiers.is_empty() {
                return err("GROUP BY modifiers (ROLLUP, CUBE, ...) are not supported");
            }
            exprs.as_slice()
        }
        GroupByExpr::All(_) => return err("GROUP BY ALL is not supported; list the columns"),
    };
    let mut group_by = Vec::new();
    let mut open_key = None;
    let mut buckets: Vec<Bucket> = Vec::new();
    for e in group_exprs {
        if let Some((case, name)) = group_case(&select.projection, e) {
            let b = bucket(schema, case, name)?;
            if buckets.iter().any(|x| x.text == b.text) {
                return err(format!("GROUP BY lists {} twice", b.name));
            }
            group_by.push(schema.columns.len() + buckets.len());
            buckets.push(b);
            continue;
        }
        let name = group_column(&select.projection, e).ok_or_else(|| {
            PlanError(format!(
                "GROUP BY {e}: group by a column, its alias or its position in the SELECT list; per-row expressions (CASE, arithmetic) are not supported yet"
            ))
        })?;
        let (idx, col) = schema.column(&name).map_err(PlanError)?;
        if let Column::Open { .. } = col {
            if group_exprs.len() != 1 {
                return err(format!(
                    "GROUP BY {name}: {name} has an open domain and can only be grouped by alone; drop the other GROUP BY columns (filter on them in WHERE instead)"
                ));
            }
            open_key = Some(idx);
            group_by.push(idx);
            continue;
        }
        if col.group_size().is_none() {
            return err(match col {
                Column::Integer { min, max, .. } => format!(
                    "GROUP BY {name}: {name} has {} possible values ({min} to {max}), more than the {MAX_INTEGER_GROUP_KEYS} keys a GROUP BY of an integer column may have; use HISTOGRAM({name}, k) for its distribution, or ranges in WHERE",
                    (max - min) as u64 + 1
                ),
                _ => format!("GROUP BY {name}: {name} cannot be grouped by"),
            });
        }
        if group_by.contains(&idx) {
            return err(format!("GROUP BY lists {name} twice"));
        }
        group_by.push(idx);
    }
    if open_key.is_some() && !buckets.is_empty() {
        return err(
            "an open-domain column is grouped by alone; drop the CASE (filter in WHERE instead)",
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
        return err(format!(
            "GROUP BY would release {cells} cells (the product of the declared domain sizes, each plus a (missing) key), more than this node's limit of {max_cells}; group by fewer or smaller columns"
        ));
    }

    let mut outputs = Vec::new();
    let mut measurements: Vec<MeasurementSpec> = Vec::new();
    let mut intern = |m: MeasurementSpec| -> usize {
        if let Some(i) = measurements.iter().position(|x| *x == m) {
            i
        } else {
            measurements.push(m);
            measurements.len() - 1
        }
    };
    for item in &select.projection {
        let expr = match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => {
                return err(format!("SELECT * is not supported: fedq releases aggregates only ({SUPPORTED}) and the GROUP BY columns"))
            }
        };
        if is_bucket_expr(expr) {
            let text = expr.to_string();
            if !buckets.iter().any(|b| b.text == text) {
                return err(format!(
                    "SELECT {expr}: a per-row key (CASE or COALESCE) is selected but not grouped by; add it (or its alias, or its position) to GROUP BY"
                ));
            }
            continue;
        }
        if let Some(name) = column_name(expr) {
            let (idx, _) = schema.column(&name).map_err(PlanError)?;
            if !group_by.contains(&idx) {
                return err(format!(
                    "column {name} is selected but not aggregated; select it only if it is in GROUP BY, or wrap it in an aggregate"
                ));
            }
            continue;
        }
        let Expr::Function(f) = expr else {
            return err(format!(
                "SELECT {expr}: only aggregates ({SUPPORTED}) and GROUP BY columns can be selected"
            ));
        };
        let written = f.name.to_string().to_ascii_uppercase();
        if f.over.is_some() || f.null_treatment.is_some() {
            return err(format!(
                "{expr}: window functions are not released by a node; the one fedq query computes is a share of the result's total, agg * 1.0 / SUM(agg) OVER () (no PARTITION BY or ORDER BY), from the released values; or use AVG(CASE WHEN condition THEN 1 ELSE 0 END)"
            ));
        }
        // Counts of rows meeting a condition, in the spellings researchers
        // use: COUNT(*) FILTER (WHERE c), SUM(CASE WHEN c THEN 1 ELSE 0 END),
        // COUNT(CASE WHEN c THEN 1 END); and AVG(CASE WHEN c THEN 1 ELSE 0
        // END), the share of rows meeting it.
        if let Some((kind, condition)) = conditional_count(&written, f, expr)? {
            let text = condition.to_string();
            let condition = predicate(schema, &condition)
                .map_err(|why| PlanError(format!("{expr}: {}", why.0)))?;
            let measurement = intern(MeasurementSpec::CountWhere { condition, text });
            let (count_measurement, bounds) = match kind {
                OutputKind::Avg => (Some(intern(MeasurementSpec::CountRows)), Some((0, 1))),
                _ => (None, None),
            };
            outputs.push(Output {
                label: expr.to_string(),
                kind,
                measurement,
                count_measurement,
                bounds,
                quantile: None,
                squares: None,
            });
            continue;
        }
        if f.filter.is_some() {
            return err(format!(
                "{expr}: FILTER applies to COUNT(*) only (COUNT(*) FILTER (WHERE condition)); for other aggregates, filter in WHERE"
            ));
        }
        // Other spellings of a quantile: the same histogram estimate.
        let percentile = matches!(written.as_str(), "PERCENTILE_CONT" | "PERCENTILE_DISC");
        let fname = match written.as_str() {
            "QUANTILE_CONT" | "QUANTILE_DISC" | "PERCENTILE_CONT" | "PERCENTILE_DISC" => {
                "QUANTILE".to_string()
            }
            _ => written.clone(),
        };
        if let Some(why) = unsupported_function(&fname, f) {
            return err(format!("{expr}: {why}"));
        }
        if !f.within_group.is_empty() && !percentile {
            return err(format!(
                "{expr}: WITHIN GROUP belongs to PERCENTILE_CONT and PERCENTILE_DISC only"
            ));
        }
        let args = match &f.args {
            FunctionArguments::List(list) => {
                if list.duplicate_treatment.is_some() {
                    return err(format!(
                        "{expr}: DISTINCT and ALL inside aggregates are not supported"
                    ));
                }
                if !list.clauses.is_empty() {
                    return err(format!(
                        "{expr}: clauses inside aggregates are not supported"
                    ));
                }
                &list.args
            }
            _ => {
                return err(format!(
                    "{expr}: expected an aggregate with arguments in parentheses"
                ))
            }
        };
        let mut args: Vec<&FunctionArgExpr> = args
            .iter()
            .map(|a| match a {
                FunctionArg::Unnamed(a) => Ok(a),
                _ => err(format!("{expr}: named arguments are not supported")),
            })
            .collect::<Result<_, _>>()?;
        // PERCENTILE_CONT(q) WITHIN GROUP (ORDER BY col) is QUANTILE(col, q).
        let ordered;
        if percentile {
            let ([q], [o]) = (args.as_slice(), f.within_group.as_slice()) else {
                return err(format!(
                    "{expr}: write {written}(q) WITHIN GROUP (ORDER BY column), e.g. {written}(0.5) WITHIN GROUP (ORDER BY traffickMonths)"
                ));
            };
            ordered = FunctionArgExpr::Expr(o.expr.clone());
            args = vec![&ordered, *q];
        }
        let two_args = matches!(fname.as_str(), "QUANTILE" | "HISTOGRAM");
        let (arg, extra) = match (args.as_slice(), two_args) {
            ([a], false) => (*a, None),
            ([a, FunctionArgExpr::Expr(b)], true) => (*a, Some(b)),
            (_, true) => {
                return err(format!(
                    "{expr}: {fname} takes a column and a number, e.g. {}",
                    if fname == "QUANTILE" {
                        "QUANTILE(traffickMonths, 0.9)"
                    } else {
                        "HISTOGRAM(traffickMonths, 12)"
                    }
                ))
            }
            _ => return err(format!("{expr}: {fname} takes exactly one argument")),
        };
        let mut quantile = None;
        let mut squares = None;
        let (kind, measurement, count_measurement, bounds) = match (fname.as_str(), arg) {
            ("COUNT", FunctionArgExpr::Wildcard) => (
                OutputKind::Count,
                intern(MeasurementSpec::CountRows),
                None,
                None,
            ),
            ("COUNT", FunctionArgExpr::Expr(e)) => {
                let (column, _) = aggregate_column(schema, e, &fname, false)?;
                (
                    OutputKind::Count,
                    intern(MeasurementSpec::CountPresent { column }),
                    None,
                    None,
                )
            }
            ("SUM" | "AVG", FunctionArgExpr::Expr(e)) if column_name(e).is_none() => {
                let (row, (min, max)) = row_expression(schema, e, &fname)?;
                let text = e.to_string();
                let sum = intern(MeasurementSpec::SumOf {
                    expr: row.clone(),
                    text: text.clone(),
                    min,
                    max,
                });
                if fname == "SUM" {
                    (OutputKind::Sum, sum, None, Some((min, max)))
                } else {
                    let count = intern(MeasurementSpec::CountOf { expr: row, text });
                    (OutputKind::Avg, sum, Some(count), Some((min, max)))
                }
            }
            ("SUM" | "AVG", FunctionArgExpr::Expr(e)) => {
                let (column, (min, max)) = aggregate_column(schema, e, &fname, true)?;
                let sum = intern(MeasurementSpec::Sum { column, min, max });
                if fname == "SUM" {
                    (OutputKind::Sum, sum, None, Some((min, max)))
                } else {
                    let count = intern(MeasurementSpec::CountPresent { column });
                    (OutputKind::Avg, sum, Some(count), Some((min, max)))
                }
            }
            ("VARIANCE" | "VAR_SAMP" | "STDDEV" | "STDDEV_SAMP", FunctionArgExpr::Expr(e)) => {
                let (column, (min, max)) = aggregate_column(schema, e, &fname, true)?;
                let count = intern(MeasurementSpec::CountPresent { column });
                let sum = intern(MeasurementSpec::Sum { column, min, max });
                let center = min + (max - min) / 2;
                let sq = intern(MeasurementSpec::SumSquares {
                    column,
                    center,
                    min,
                    max,
                });
                squares = Some((sq, center));
                let kind = if fname.starts_with("VAR") {
                    OutputKind::Variance
                } else {
                    OutputKind::Stddev
                };
                (kind, sum, Some(count), Some((min, max)))
            }
            ("MEDIAN" | "QUANTILE", FunctionArgExpr::Expr(e)) => {
                let (column, (min, max)) = aggregate_column(schema, e, &fname, true)?;
                let q = match extra {
                    None => 0.5,
                    Some(lit) => number_literal(lit)
                        .filter(|q| (0.0..=1.0).contains(q))
                        .ok_or_else(|| PlanError(format!(
                            "{expr}: the quantile must be a number from 0 to 1, e.g. 0.5 for the median"
                        )))?,
                };
                let Column::Integer { bins, .. } = &schema.columns[column] else {
                    return err(format!("{expr}: {fname} needs an integer column"));
                };
                quantile = Some(q);
                let h = intern(MeasurementSpec::Histogram {
                    column,
                    min,
                    max,
                    bins: *bins,
                });
                (OutputKind::Quantile, h, None, Some((min, max)))
            }
            ("HISTOGRAM", FunctionArgExpr::Expr(e)) => {
                let (column, (min, max)) = aggregate_column(schema, e, &fname, true)?;
                if !matches!(schema.columns[column], Column::Integer { .. }) {
                    return err(format!(
                        "{expr}: HISTOGRAM needs an integer column; for a flag or a category, GROUP BY it and COUNT(*)"
                    ));
                }
                let values = (max - min) as u64 + 1;
                let limit = values.min(MAX_BINS);
                let bins = extra
                    .and_then(number_literal)
                    .filter(|k| k.fract() == 0.0 && *k >= 1.0 && *k <= limit as f64)
                    .ok_or_else(|| PlanError(format!(
                        "{expr}: the number of bins must be a whole number from 1 to {limit} (the column has {values} possible values)"
                    )))? as u64;
                let h = intern(MeasurementSpec::Histogram {
                    column,
                    min,
                    max,
                    bins,
                });
                (OutputKind::Histogram, h, None, Some((min, max)))
            }
            (
                "SUM" | "AVG" | "VARIANCE" | "VAR_SAMP" | "STDDEV" | "STDDEV_SAMP" | "MEDIAN"
                | "QUANTILE" | "HISTOGRAM",
                _,
            ) => return err(format!("{expr}: {fname} needs a column")),
            _ => {
                return err(format!(
                    "{expr}: aggregate {fname} is not supported; use {SUPPORTED}"
                ))
            }
        };
        outputs.push(Output {
            label: expr.to_string(),
            kind,
            measurement,
            count_measurement,
            bounds,
            quantile,
            squares,
        });
    }
    if outputs.is_empty() {
        return err(format!(
            "the SELECT list has no aggregate; add one of {SUPPORTED}"
        ));
    }
    if outputs.len() > 1 && outputs.iter().any(|o| o.kind == OutputKind::Histogram) {
        return err("HISTOGRAM(col, k) releases one row per bin: query it on its own, without other aggregates");
    }
    let values: usize = cells.saturating_mul(
        measurements
            .iter()
            .map(MeasurementSpec::values_per_cell)
            .max()
            .unwrap_or(1),
    );
    if values > max_cells {
        return err(format!(
            "the query would release {values} values per measurement (cells x bins), more than this node's limit of {max_cells}; use fewer bins or group by fewer columns"
        ));
    }

    let filter = match &select.selection {
        Some(e) => {
            let depth = nesting_depth(e);
            if depth > MAX_WHERE_DEPTH {
                return err(format!(
                    "the WHERE clause nests {depth} levels of AND/OR/NOT, more than {MAX_WHERE_DEPTH}; use col IN (...) for long lists of alternatives"
                ));
            }
            Some(predicate(schema, e)?)
        }
        None => None,
    };

    if let Some(idx) = open_key {
        if measurements != [MeasurementSpec::CountRows] {
            return err(format!(
                "GROUP BY {name}: {name} has an open domain, so only COUNT(*) can be released per key (its keys are chosen by a threshold on that count); select {name}, COUNT(*) only",
                name = schema.columns[idx].name()
            ));
        }
    }

    Ok(Plan {
        dataset,
        group_by,
        group_sizes,
        outputs,
        measurements,
        filter,
        contribution_bound: schema.contribution_bound(),
        open_key,
        buckets,
        schema_columns: schema.columns.len(),
    })
}

/// The aggregates fedq knows, for error messages.
const SUPPORTED: &str = "COUNT(*), COUNT(col), SUM(col), AVG(col), VARIANCE(col), STDDEV(col), MEDIAN(col), QUANTILE(col, q), HISTOGRAM(col, k)";

/// Why the function `fname` (upper case) is refused, naming the construct
/// and what to write instead; `None` for the aggregates the planner knows.
fn unsupported_function(fname: &str, f: &sqlparser::ast::Function) -> Option<String> {
    let distinct = matches!(
        &f.args,
        FunctionArguments::List(l) if l.duplicate_treatment == Some(sqlparser::ast::DuplicateTreatment::Distinct)
    );
    Some(match fname {
        "COUNT" if distinct => "COUNT(DISTINCT col) is not released: over a declared domain the possible values are public already, and which of them occur could only be estimated as the number of keys whose noisy count passes a threshold, a number with no interval that holds; ask SELECT col, COUNT(*) FROM ... GROUP BY col: every key of the domain with its noisy count and interval, from which the keys that clearly occur can be read".to_string(),
        "COUNT" | "SUM" | "AVG" | "VARIANCE" | "VAR_SAMP" | "STDDEV" | "STDDEV_SAMP" | "MEDIAN"
        | "QUANTILE" | "HISTOGRAM" => return None,
        "MIN" | "MAX" => format!("{fname} is not released: a single record decides it, so no noise small enough to be useful can hide that record; use QUANTILE(col, {}) for a robust {} or the declared bounds", if fname == "MIN" { "0.05" } else { "0.95" }, if fname == "MIN" { "low end" } else { "high end" }),
        "ROUND" => "ROUND applies to an aggregate of the SELECT list, e.g. ROUND(AVG(traffickMonths), 1), and is applied by fedq query to the combined noisy value; per-row rounding is not supported".to_string(),
        "VAR_POP" | "STDDEV_POP" | "VARIANCE_POP" => format!("{fname} is not supported; use {}, the sample statistic (the difference is negligible at the counts fedq releases)", if fname.starts_with("STDDEV") { "STDDEV" } else { "VARIANCE" }),
        "MODE" => "MODE is not supported; ask SELECT col, COUNT(*) ... GROUP BY col ORDER BY COUNT(*) DESC LIMIT 1".to_string(),
        _ => format!("{fname} is not an aggregate fedq releases; use {SUPPORTED}"),
    })
}

/// A plain (possibly negative) number literal.
fn number_literal(e: &Expr) -> Option<f64> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.parse::<f64>().ok().filter(|x| x.is_finite()),
            _ => None,
        },
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => number_literal(expr).map(|x| -x),
        Expr::Nested(inner) => number_literal(inner),
        _ => None,
    }
}

/// Deepest AND/OR/NOT nesting accepted in WHERE: keeps evaluation (which
/// recurses) far from any stack limit, whatever a hostile query sends.
pub const MAX_WHERE_DEPTH: usize = 64;

/// Nesting depth of an expression tree, computed without recursion.
fn nesting_depth(root: &Expr) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(root, 1usize)];
    while let Some((e, d)) = stack.pop() {
        deepest = deepest.max(d);
        match e {
            Expr::BinaryOp { left, right, .. } => {
                stack.push((left, d + 1));
                stack.push((right, d + 1));
            }
            Expr::UnaryOp { expr, .. } | Expr::Nested(expr) => stack.push((expr, d + 1)),
            _ => {}
        }
    }
    deepest
}

/// Most operators (comparisons, arithmetic, AND/OR/NOT) and parentheses one
/// query may hold. Counted on tokens before parsing, so that no query can
/// make the parser or anything walking its tree recurse deeply enough to
/// exhaust a thread's stack, whatever its shape (`1+1+...`, `NOT NOT ...`).
pub const MAX_OPERATORS: usize = 256;

/// Deepest nesting (parentheses, NOT, subexpressions) the parser follows;
/// sqlparser's own default (50) can exhaust a 2 MiB stack in debug builds.
pub const MAX_NESTING: usize = 16;

fn parse_select(sql: &str) -> Result<Box<sqlparser::ast::Select>, PlanError> {
    use sqlparser::tokenizer::{Token, Tokenizer};
    let dialect = GenericDialect {};
    // Tokenized once: the tokens are counted, then parsed.
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize_with_location()
        .map_err(|e| PlanError(format!("SQL syntax error: {e}")))?;
    let operators = tokens
        .iter()
        .filter(|t| match &t.token {
            Token::Word(w) => matches!(w.value.to_ascii_uppercase().as_str(), "AND" | "OR" | "NOT"),
            Token::Whitespace(_)
            | Token::Comma
            | Token::Number(..)
            | Token::SingleQuotedString(_)
            | Token::EOF => false,
            Token::Mul | Token::Period | Token::SemiColon => false,
            _ => true,
        })
        .count();
    if operators > MAX_OPERATORS {
        return err(format!(
            "the query has {operators} operators and parentheses, more than {MAX_OPERATORS}; use col IN (...) for long lists of alternatives"
        ));
    }
    let mut statements = Parser::new(&dialect)
        .with_recursion_limit(MAX_NESTING)
        .with_tokens_with_locations(tokens)
        .parse_statements()
        .map_err(|e| PlanError(format!("SQL syntax error: {e}")))?;
    let statement = match statements.len() {
        1 => statements.remove(0),
        0 => return err("the query is empty; expected SELECT ... FROM dataset"),
        _ => return err("send one SELECT statement per query"),
    };
    let Statement::Query(query) = statement else {
        return err("only SELECT queries are supported");
    };
    if query.with.is_some() {
        return err("WITH (common table expressions) is not supported");
    }
    if query.order_by.is_some() {
        return err("ORDER BY is applied by fedq query to the combined answers, not by a node: every cell of the declared domain is released; send the query through fedq query (or the coordinator library's fedq::post)");
    }
    if query.limit_clause.is_some() || query.fetch.is_some() {
        return err("LIMIT is applied by fedq query to the combined answers, not by a node: every cell of the declared domain is released; send the query through fedq query (or the coordinator library's fedq::post)");
    }
    if !query.locks.is_empty()
        || query.for_clause.is_some()
        || query.settings.is_some()
        || query.format_clause.is_some()
        || !query.pipe_operators.is_empty()
    {
        return err("only a plain SELECT ... FROM ... [WHERE ...] [GROUP BY ...] is supported");
    }
    let SetExpr::Select(select) = *query.body else {
        return err("UNION, INTERSECT, EXCEPT, VALUES and subqueries are not released by a node; a UNION ALL of aggregate queries over one dataset is asked by fedq query (or the coordinator library's fedq::compose), part by part or as one query grouped by part");
    };
    if select.distinct.is_some() {
        return err("SELECT DISTINCT is not supported");
    }
    if select.top.is_some() || select.into.is_some() {
        return err("TOP and INTO are not supported");
    }
    if select.having.is_some() {
        return err(
            "HAVING is applied by fedq query to the combined noisy answers, not by a node; send the query through fedq query (or the coordinator library's fedq::post)",
        );
    }
    if select.prewhere.is_some()
        || select.qualify.is_some()
        || !select.lateral_views.is_empty()
        || !select.named_window.is_empty()
        || !select.cluster_by.is_empty()
        || !select.distribute_by.is_empty()
        || !select.sort_by.is_empty()
        || select.connect_by.is_some()
        || select.exclude.is_some()
    {
        return err("only a plain SELECT ... FROM ... [WHERE ...] [GROUP BY ...] is supported");
    }
    Ok(select)
}

/// Takes the JOINs to public lookup tables out of `select`, checking each:
/// `[INNER | LEFT] JOIN table [alias] ON table.key = dataset_column`. A
/// join to anything else (another dataset, a subquery) is refused saying
/// why: no sensitivity follows from the schemas for a private join.
fn public_joins(select: &mut sqlparser::ast::Select) -> Result<Vec<PublicJoin>, PlanError> {
    use sqlparser::ast::{JoinConstraint, JoinOperator};
    let [from] = select.from.as_mut_slice() else {
        return Ok(Vec::new());
    };
    let tables: Vec<&str> = PUBLIC_TABLES.iter().map(|t| t.name).collect();
    let mut joins = Vec::new();
    for j in &from.joins {
        let TableFactor::Table {
            name,
            alias,
            args: None,
            ..
        } = &j.relation
        else {
            return err(format!(
                "JOIN {}: only a public lookup table ({}) can be joined",
                j.relation,
                tables.join(", ")
            ));
        };
        let table = match name.0.as_slice() {
            [ObjectNamePart::Identifier(id)] => public_table(&id.value),
            _ => None,
        }
        .ok_or_else(|| {
            PlanError(format!(
                "JOIN {name}: joins between private datasets are not supported (a record could pair with any number of records of the other, so no sensitivity follows from the schemas); join a public lookup table ({}), or query each dataset on its own",
                tables.join(", ")
            ))
        })?;
        let (constraint, inner) = match &j.join_operator {
            JoinOperator::Join(c) | JoinOperator::Inner(c) => (c, true),
            JoinOperator::Left(c) | JoinOperator::LeftOuter(c) => (c, false),
            _ => {
                return err(format!(
                    "JOIN {name}: only [INNER] JOIN and LEFT JOIN to a public lookup table are supported"
                ))
            }
        };
        let name = alias
            .as_ref()
            .map_or_else(|| table.name.to_string(), |a| a.name.value.clone());
        let on = || {
            PlanError(format!(
                "JOIN {}: join on {name}.{} = a column of the dataset",
                table.name, table.key
            ))
        };
        let JoinConstraint::On(Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        }) = constraint
        else {
            return Err(on());
        };
        let is_key = |e: &Expr| {
            matches!(e, Expr::CompoundIdentifier(p) if p.len() == 2
                && p[0].value.eq_ignore_ascii_case(&name)
                && p[1].value.eq_ignore_ascii_case(table.key))
        };
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
            inner,
        });
    }
    from.joins.clear();
    Ok(joins)
}

/// `col IN (keys of the table whose value passes)` for a join.
type KeysWhere<'a> = dyn Fn(&PublicJoin, &dyn Fn(&str) -> bool) -> Result<Expr, PlanError> + 'a;

/// What a name refers to in a query joining public tables.
enum LookupRef<'a> {
    /// The table's value column (`r.region`).
    Value(&'a PublicJoin),
    /// The table's key column (`r.country`): the dataset's column.
    Key(&'a PublicJoin),
}

fn lookup_ref<'a>(joins: &'a [PublicJoin], e: &Expr) -> Option<LookupRef<'a>> {
    match e {
        Expr::Nested(inner) => lookup_ref(joins, inner),
        Expr::CompoundIdentifier(p) if p.len() == 2 => {
            let j = joins
                .iter()
                .find(|j| j.name.eq_ignore_ascii_case(&p[0].value))?;
            if p[1].value.eq_ignore_ascii_case(j.table.value) {
                Some(LookupRef::Value(j))
            } else if p[1].value.eq_ignore_ascii_case(j.table.key) {
                Some(LookupRef::Key(j))
            } else {
                None
            }
        }
        // Unqualified: the value column of the one joined table that has it.
        Expr::Identifier(id) => {
            let mut found = joins
                .iter()
                .filter(|j| id.value.eq_ignore_ascii_case(j.table.value));
            match (found.next(), found.next()) {
                (Some(j), None) => Some(LookupRef::Value(j)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// An expression the planner writes itself (never the analyst's text).
fn generated(sql: &str) -> Result<Expr, PlanError> {
    Parser::new(&GenericDialect {})
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| {
            PlanError(format!(
                "internal: a generated expression does not parse: {e}"
            ))
        })
}

fn quoted_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quoted_text(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The query over the dataset alone that a query joining public tables
/// means: the table's value in SELECT and GROUP BY becomes a CASE bucket
/// over the joined column (`CASE WHEN country IN ('DE', 'FR') THEN
/// 'Europe' ... END`, unmatched and missing values the (missing) key), a
/// condition on it an IN list of the keys with those values, its key the
/// column itself; an INNER join also keeps only the records whose value
/// has a key. Only keys within the column's declared domain are listed.
fn resolve_joins(
    select: &sqlparser::ast::Select,
    joins: &[PublicJoin],
    schema: &Schema,
) -> Result<sqlparser::ast::Select, PlanError> {
    // Keys of the table present in each join's column, with their values.
    let mut keyed: Vec<Vec<(&'static str, &'static str)>> = Vec::new();
    for j in joins {
        let (_, col) = schema.column(&j.column).map_err(PlanError)?;
        let declared = |k: &str| match col {
            Column::Categorical { domain, .. } => domain.iter().any(|d| d == k),
            Column::Open { .. } => true,
            _ => false,
        };
        if !matches!(col, Column::Categorical { .. } | Column::Open { .. }) {
            return err(format!(
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
                .flat_map(|(v, keys)| keys.iter().map(move |k| (*k, *v)))
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
        for (value, _) in j.table.rows {
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
            return err(format!(
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
            Some(LookupRef::Value(j)) => (bucket_of(j)?, j.table.value),
            Some(LookupRef::Key(j)) => (column_of(j)?, j.table.key),
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
        err(format!(
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
            PlanError(format!(
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

fn table_name(from: &[sqlparser::ast::TableWithJoins]) -> Result<String, PlanError> {
    let [table] = from else {
        return if from.is_empty() {
            err("the query needs FROM <dataset>")
        } else {
            err("joins and several tables are not supported: query one dataset")
        };
    };
    if !table.joins.is_empty() {
        return err("JOIN is not supported: query one dataset");
    }
    match &table.relation {
        TableFactor::Table {
            name, args: None, ..
        } => match name.0.as_slice() {
            [ObjectNamePart::Identifier(id)] => Ok(id.value.clone()),
            _ => err(format!(
                "FROM {name}: name the dataset without a schema prefix"
            )),
        },
        TableFactor::Derived { .. } => err("subqueries are not supported: query one dataset"),
        other => err(format!("FROM {other}: only a dataset name is supported")),
    }
}

fn column_name(e: &Expr) -> Option<String> {
    match e {
        Expr::Identifier(id) => Some(id.value.clone()),
        Expr::CompoundIdentifier(parts) if parts.len() == 2 => Some(parts[1].value.clone()),
        Expr::Nested(inner) => column_name(inner),
        _ => None,
    }
}

/// `COUNT(*) FILTER (WHERE c)`, `SUM(CASE WHEN c THEN 1 ELSE 0 END)` (or
/// without the ELSE), `COUNT(CASE WHEN c THEN 1 END)`: a count of the rows
/// where `c` is TRUE; `AVG(CASE WHEN c THEN 1 ELSE 0 END)`: their share.
/// `None` for any other aggregate; an error for a CASE inside an aggregate
/// in any other form, saying which forms are supported.
fn conditional_count(
    fname: &str,
    f: &sqlparser::ast::Function,
    expr: &Expr,
) -> Result<Option<(OutputKind, Expr)>, PlanError> {
    let args: Vec<&FunctionArgExpr> = match &f.args {
        FunctionArguments::List(list) if list.duplicate_treatment.is_none() => list
            .args
            .iter()
            .filter_map(|a| match a {
                FunctionArg::Unnamed(a) => Some(a),
                _ => None,
            })
            .collect(),
        _ => return Ok(None),
    };
    if let Some(filter) = &f.filter {
        return Ok(match (fname, args.as_slice()) {
            ("COUNT", [FunctionArgExpr::Wildcard]) => Some((OutputKind::Count, (**filter).clone())),
            _ => None,
        });
    }
    let [FunctionArgExpr::Expr(Expr::Case {
        operand: None,
        conditions,
        else_result,
        ..
    })] = args.as_slice()
    else {
        return Ok(None);
    };
    let one = |e: &Expr| number_literal(e) == Some(1.0);
    let zero = |e: Option<&Expr>| e.is_some_and(|e| number_literal(e) == Some(0.0));
    let null = |e: Option<&Expr>| {
        e.is_none_or(|e| matches!(e, Expr::Value(v) if matches!(v.value, Value::Null)))
    };
    let form = match (fname, conditions.as_slice()) {
        ("SUM", [w])
            if one(&w.result) && (zero(else_result.as_deref()) || null(else_result.as_deref())) =>
        {
            Some((OutputKind::Count, w.condition.clone()))
        }
        ("COUNT", [w]) if null(else_result.as_deref()) => {
            Some((OutputKind::Count, w.condition.clone()))
        }
        ("AVG", [w]) if one(&w.result) && zero(else_result.as_deref()) => {
            Some((OutputKind::Avg, w.condition.clone()))
        }
        _ => None,
    };
    match form {
        Some(f) => Ok(Some(f)),
        None => err(format!(
            "{expr}: a CASE inside an aggregate is supported as a count or a share of the rows meeting one condition: SUM(CASE WHEN c THEN 1 ELSE 0 END), COUNT(CASE WHEN c THEN 1 END), AVG(CASE WHEN c THEN 1 ELSE 0 END), or COUNT(*) FILTER (WHERE c); to break a count down by several labels, GROUP BY the CASE"
        )),
    }
}

/// `'-99'`, `-99` or `''`: the source files' spelling of a missing value.
fn is_missing_marker(e: &Expr) -> bool {
    match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(t) => t.trim() == "-99" || t.trim().is_empty(),
            _ => false,
        },
        _ => number_literal(e) == Some(-99.0),
    }
}

/// Most branches a CASE bucket may have.
const MAX_CASE_BRANCHES: usize = 64;

/// The CASE expression a GROUP BY item stands for (itself, or the
/// selected CASE its alias or position names), with its name in answers.
fn group_case<'a>(projection: &'a [SelectItem], e: &'a Expr) -> Option<(&'a Expr, String)> {
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

/// Whether a GROUP BY key is computed per row: a CASE, or a COALESCE.
fn is_bucket_expr(e: &Expr) -> bool {
    coalesce_args(e).is_some() || matches!(e, Expr::Case { .. })
}

/// The arguments of `COALESCE(...)`, if `e` is one.
fn coalesce_args(e: &Expr) -> Option<Vec<&Expr>> {
    let Expr::Function(f) = e else { return None };
    if !f.name.to_string().eq_ignore_ascii_case("COALESCE") {
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
fn literal_text(e: &Expr) -> Option<String> {
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
fn coalesce_bucket(schema: &Schema, e: &Expr, name: String) -> Result<Bucket, PlanError> {
    let (column, col, default) = match coalesce_args(e).as_deref() {
        Some([c, d]) => {
            let (column, col) = where_column(schema, c)?;
            let default = literal_text(d).filter(|t| !is_missing_marker(d) && t != MISSING_KEY);
            (column, col, default)
        }
        _ => None.ok_or_else(|| {
            PlanError(format!(
                "GROUP BY {e}: a COALESCE key is COALESCE(column, 'label') over a categorical column or a flag"
            ))
        })?,
    };
    let Some(default) = default else {
        return err(format!(
            "GROUP BY {e}: the second argument must be a literal label other than the missing value"
        ));
    };
    let mut labels: Vec<String> = (0..col.group_size().unwrap_or(0))
        .map(|code| col.key_label(code))
        .collect();
    if !matches!(col, Column::Categorical { .. } | Column::Boolean { .. }) {
        return err(format!(
            "GROUP BY {e}: COALESCE as a key applies to a categorical column or a flag; {} is {} (for a number, GROUP BY it: missing values are their own key)",
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
        branches,
        labels,
        otherwise: Some(otherwise),
    })
}

/// A CASE bucket: every condition a WHERE condition over declared columns,
/// every result a literal label.
fn bucket(schema: &Schema, e: &Expr, name: String) -> Result<Bucket, PlanError> {
    if coalesce_args(e).is_some() {
        return coalesce_bucket(schema, e, name);
    }
    let Expr::Case {
        operand,
        conditions,
        else_result,
        ..
    } = e
    else {
        return err(format!("GROUP BY {e}: expected a CASE expression"));
    };
    if conditions.len() > MAX_CASE_BRANCHES {
        return err(format!(
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
            return err(format!(
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
            .map_err(|why| PlanError(format!("{e}: in WHEN {}: {}", w.condition, why.0)))?;
        branches.push((p, label_of(&w.result)?));
    }
    let otherwise = match else_result {
        Some(r) => Some(label_of(r)?),
        None => None,
    };
    Ok(Bucket {
        name,
        text: e.to_string(),
        branches,
        labels,
        otherwise,
    })
}

fn bad_label(case: &Expr, r: &Expr) -> PlanError {
    PlanError(format!(
        "{case}: THEN {r}: a CASE's results must be literal labels (e.g. THEN '6-11 months'), so the keys it releases are known from the query alone"
    ))
}

/// The column a GROUP BY item names: a column, an alias of a selected
/// column (`SELECT citizenship AS c ... GROUP BY c`), or the position of a
/// selected column (`GROUP BY 1`).
fn group_column(projection: &[SelectItem], e: &Expr) -> Option<String> {
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

/// Most operators and COALESCE arguments one per-row expression may hold.
const MAX_EXPR_NODES: usize = 32;

/// The per-row expression an aggregate sums (see [`RowExpr`]), with its
/// bounds: integer columns and flags, integer literals, `+ - *`, division
/// by a non-zero integer literal, COALESCE; `* 1.0` (a cast to a decimal)
/// changes nothing. Anything else is refused saying why and what to write.
fn row_expression(
    schema: &Schema,
    e: &Expr,
    fname: &str,
) -> Result<(RowExpr, (i64, i64)), PlanError> {
    let mut nodes = 0usize;
    let row = row_expr(schema, e, fname, &mut nodes)?;
    let (lo, hi) = row.bounds(schema).ok_or_else(|| {
        PlanError(format!(
            "{fname}({e}): the expression has no declared bounds (it needs integer columns or flags)"
        ))
    })?;
    if lo < -MAX_EXPR_BOUND || hi > MAX_EXPR_BOUND {
        return err(format!(
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

fn row_expr(
    schema: &Schema,
    e: &Expr,
    fname: &str,
    nodes: &mut usize,
) -> Result<RowExpr, PlanError> {
    *nodes += 1;
    if *nodes > MAX_EXPR_NODES {
        return err(format!(
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
            let (idx, col) = schema.column(&name).map_err(PlanError)?;
            match col {
                Column::Integer { .. } | Column::Boolean { .. } => Ok(RowExpr::Column(idx)),
                _ => err(format!(
                    "{fname}(... {name} ...): {name} is {}; per-row arithmetic takes integer columns with declared bounds and flags (for a category, count its rows: SUM(CASE WHEN {name} = '...' THEN 1 ELSE 0 END))",
                    col.kind_name()
                )),
            }
        }
        Expr::Value(_) | Expr::UnaryOp { op: UnaryOperator::Minus, .. } if number_literal(e).is_some() => {
            match whole(e) {
                Some(v) => Ok(RowExpr::Const(v as i64)),
                None => err(format!(
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
                    _ => err(format!(
                        "{fname}({e}): per-row division is by a non-zero integer literal only (integer division, as SQL divides integers); for a ratio or a fraction, divide the aggregates (e.g. {fname}(traffickMonths) / 12.0 or SUM(a) / SUM(b)), which fedq query computes from the released values"
                    )),
                },
                other => err(format!(
                    "{fname}({e}): operator {other} is not supported in a per-row expression; use + - * and / by an integer literal"
                )),
            }
        }
        Expr::Function(f) if f.name.to_string().eq_ignore_ascii_case("COALESCE") => {
            let FunctionArguments::List(list) = &f.args else {
                return err(format!("{e}: COALESCE takes two or more arguments"));
            };
            let args = list
                .args
                .iter()
                .map(|a| match a {
                    FunctionArg::Unnamed(FunctionArgExpr::Expr(x)) => row_expr(schema, x, fname, nodes),
                    _ => err(format!("{e}: COALESCE takes expressions")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            if args.len() < 2 {
                return err(format!("{e}: COALESCE takes two or more arguments"));
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
        Expr::Case { .. } => err(format!(
            "{fname}({e}): a CASE inside an aggregate is supported as a count or a share of the rows meeting one condition: SUM(CASE WHEN c THEN 1 ELSE 0 END), AVG(CASE WHEN c THEN 1 ELSE 0 END)"
        )),
        other => err(format!(
            "{fname}({other}): per-row expressions are integer columns, flags and integer literals with + - *, / by an integer literal, and COALESCE; this one cannot be bounded from the declared metadata"
        )),
    }
}

fn aggregate_column(
    schema: &Schema,
    e: &Expr,
    fname: &str,
    numeric: bool,
) -> Result<(usize, (i64, i64)), PlanError> {
    let name = column_name(e).ok_or_else(|| {
        PlanError(format!(
            "{fname}({e}): only a plain column can be aggregated"
        ))
    })?;
    let (idx, col) = schema.column(&name).map_err(PlanError)?;
    match col {
        Column::Integer { min, max, .. } => Ok((idx, (*min, *max))),
        // A flag as a number: 0 or 1 (AVG is its prevalence).
        Column::Boolean { .. } => Ok((idx, (0, 1))),
        _ if !numeric => Ok((idx, (0, 0))),
        _ => err(format!(
            "{fname}({name}): {name} is not an integer or boolean column; {fname} needs an integer column with declared bounds, or a flag (0 or 1)"
        )),
    }
}

fn predicate(schema: &Schema, e: &Expr) -> Result<Predicate, PlanError> {
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
                    return err(format!(
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
                return err(format!("{e}: a comparison needs a column on one side and a literal or another column on the other"));
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
                return err(format!(
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
                    .and_then(|p| p.ok_or_else(|| PlanError(format!("{e}: expected COALESCE(column, literal)"))))
            });
            let first = alternatives
                .next()
                .ok_or_else(|| PlanError(format!("{e}: the IN list is empty")))??;
            let any = alternatives.try_fold(first, |acc, p| {
                p.map(|p| Predicate::Or(Box::new(acc), Box::new(p)))
            })?;
            Ok(if *negated { Predicate::Not(Box::new(any)) } else { any })
        }
        Expr::InList { expr, list, negated } => {
            let (column, col) = where_column(schema, expr)?;
            if list.is_empty() {
                return err(format!("{e}: the IN list is empty"));
            }
            let values = list.iter().map(|l| literal(col, l)).collect::<Result<_, _>>()?;
            Ok(Predicate::In { column, values, negated: *negated })
        }
        Expr::Between { expr, negated, low, high } => {
            let (column, col) = where_column(schema, expr)?;
            if !matches!(col, Column::Integer { .. }) {
                return err(format!("{e}: BETWEEN applies to integer columns only"));
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
            err("subqueries are not supported")
        }
        other => err(format!(
            "WHERE {other}: not supported; use comparisons of a column with a literal, IN, BETWEEN, IS [NOT] NULL, AND, OR, NOT"
        )),
    }
}

/// `COALESCE(col, d) op literal` (either side): for a present value the
/// comparison of the value, for a missing one the (constant) comparison of
/// `d`, so it is `col op literal OR col IS NULL` when `d op literal` holds
/// and `col op literal AND col IS NOT NULL` when it does not: exactly
/// SQL's value, never unknown. `None` when neither side is a COALESCE.
fn coalesce_condition(
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
        PlanError(format!(
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
                return err(format!(
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
fn columns_predicate(
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
        return err(format!(
            "{e}: {} is the person identifier of the privacy unit; it cannot be queried",
            c.name()
        ));
    }
    if l == r {
        return err(format!(
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
        return err(format!(
            "{e}: {} is {} and {} is {}: only numbers (integer columns, flags) compare with numbers, and categories with categories",
            lc.name(),
            lc.kind_name(),
            rc.name(),
            rc.kind_name()
        ));
    }
    if !matches!(op, CmpOp::Eq | CmpOp::Ne) {
        return err(format!(
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

fn where_column<'s>(schema: &'s Schema, e: &Expr) -> Result<(usize, &'s Column), PlanError> {
    let name = column_name(e).ok_or_else(|| {
        PlanError(format!(
            "{e}: expected a column name (expressions on columns are not supported)"
        ))
    })?;
    schema.column(&name).map_err(PlanError)
}

/// Turns a literal into the code it would have in `col`. Validation uses the
/// declared domain only.
fn literal(col: &Column, e: &Expr) -> Result<i64, PlanError> {
    let (text, quoted) = match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => (s.clone(), true),
            Value::Number(n, _) => (n.clone(), false),
            Value::Boolean(b) => (if *b { "1" } else { "0" }.to_string(), false),
            Value::Null => {
                return err(format!(
                    "comparison with NULL is never true; use {} IS NULL",
                    col.name()
                ))
            }
            other => return err(format!("literal {other} is not supported")),
        },
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match expr.as_ref() {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => (format!("-{n}"), false),
                _ => return err(format!("{e}: expected a number")),
            },
            _ => return err(format!("{e}: expected a literal")),
        },
        other => return err(format!("{other}: expected a literal value")),
    };
    match col {
        Column::Categorical { name, domain } => {
            if !quoted {
                return err(format!(
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
                    PlanError(format!(
                        "{text:?} is not in the declared domain of {name}{hint}: expected {}",
                        col.expectation()
                            .trim_end_matches(", or -99/empty for missing")
                    ))
                })
        }
        Column::Integer { name, .. } => {
            if quoted {
                return err(format!(
                    "{name} is an integer column: compare it with a number, not a string"
                ));
            }
            text.parse::<i64>().map_err(|_| {
                PlanError(format!(
                    "{text}: {name} is an integer column; expected an integer literal"
                ))
            })
        }
        Column::Boolean { name } => parse_bool(&text).map(i64::from).ok_or_else(|| {
            PlanError(format!(
                "{text:?}: {name} is boolean; compare it with 0, 1, true or false"
            ))
        }),
        // Any text: a value never seen matches nothing. Saying whether a
        // value occurs would reveal the data (DESIGN invariant 2).
        Column::Open { name } => {
            if !quoted {
                return err(format!(
                    "{name} is categorical: compare it with a quoted string, e.g. {name} = 'text'"
                ));
            }
            Ok(crate::schema::open_code(text.trim()))
        }
        Column::PersonId { name } => err(format!(
            "{name} is the person identifier of the privacy unit; it cannot be queried"
        )),
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
fn single_column_terms(p: &Predicate) -> Vec<(usize, &Predicate)> {
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
fn only_column(p: &Predicate) -> Option<usize> {
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
fn literals(p: &Predicate, out: &mut Vec<i64>) {
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
fn never_both(c: usize, x: &Predicate, y: &Predicate, schema: &Schema) -> bool {
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

const MISSING_CODE: i64 = crate::schema::MISSING;

/// The value of a one-column term when the column holds `v` (`None`:
/// unknown), in SQL's three-valued logic as the engines evaluate it.
fn truth_at(p: &Predicate, v: i64) -> Option<bool> {
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

/// Number of released cells: each GROUP BY column contributes its declared
/// domain plus a "missing" key.
pub fn cell_count(plan: &Plan) -> usize {
    plan.group_sizes.iter().map(|s| s + 1).product()
}

/// Label of the "missing" key of a GROUP BY column.
pub const MISSING_KEY: &str = "(missing)";

/// The printable key of every cell, in the order of the engine's exact values (`Table::exact`).
pub fn cell_keys(plan: &Plan, schema: &Schema) -> Vec<Vec<String>> {
    let mut keys: Vec<Vec<String>> = vec![Vec::new()];
    for (&col, &size) in plan.group_by.iter().zip(&plan.group_sizes) {
        let label = |code: usize| match plan.bucket(col) {
            Some(b) => b.labels[code].clone(),
            None => schema.columns[col].key_label(code),
        };
        let mut next = Vec::with_capacity(keys.len() * (size + 1));
        for k in &keys {
            for code in 0..=size {
                let mut key = k.clone();
                key.push(if code == size {
                    MISSING_KEY.to_string()
                } else {
                    label(code)
                });
                next.push(key);
            }
        }
        keys = next;
    }
    keys
}

/// The SQL this planner accepts, as `fedq query --help` states it. A test
/// plans an example of every construct listed, and checks that every
/// aggregate function the planner accepts is listed and no other.
pub const SQL_SUBSET: &str = "\
SQL subset: SELECT [group columns,] aggregates FROM dataset [WHERE ...] [GROUP BY ...]
  aggregates: COUNT(*), COUNT(col), SUM(col), AVG(col), VARIANCE(col) (or VAR_SAMP),
    STDDEV(col) (or STDDEV_SAMP), MEDIAN(col), QUANTILE(col, q) with 0 <= q <= 1
    (or QUANTILE_CONT, QUANTILE_DISC, PERCENTILE_CONT(q) WITHIN GROUP (ORDER BY col),
    PERCENTILE_DISC), HISTOGRAM(col, bins) (alone in its SELECT); numeric ones on
    integer columns with declared bounds (values clamped to them) or on boolean
    flags as 0 and 1 (AVG(flag) is a prevalence, SUM(flag) a count)
  WHERE: col = | <> | < | <= | > | >= literal, col [NOT] IN (...),
    col [NOT] BETWEEN a AND b, col IS [NOT] NULL ('-99', the files' missing
    value, also: col = '-99' is col IS NULL), AND, OR, NOT; two columns of a
    row compared (integers and flags by value with any operator, categories
    by label with = and <>, e.g. citizenship <> CountryOfExploitation; unknown,
    so not counted, when either is missing); conditions in FILTER and CASE alike;
    COALESCE(col, literal) compared with a literal (exact: a missing value takes it)
  per-row numbers: SUM and AVG of integer columns, flags and integer literals with
    + - *, / by an integer literal (truncating, as SQL divides integers) and
    COALESCE(a, b, ...), e.g. SUM(a + b), AVG(COALESCE(traffickMonths, 0)); their
    bounds, the sensitivity, come from the declared bounds by interval arithmetic;
    * 1.0 changes nothing; SUM or AVG of x / 12.0 (a decimal divides exactly) or
    of 0.5 * x is the aggregate of x scaled, computed by fedq query
  GROUP BY: categorical or boolean columns, integer columns with at most 1000
    values in their declared bounds (one key per value), or CASE WHEN condition
    THEN 'label' ... [ELSE 'label'] END buckets (conditions as in WHERE) or
    COALESCE(category, 'label') (missing values take the label), by name,
    alias or position; every key of the declared domain is returned, plus (missing); an
    open-domain column releases only the keys whose noisy count passes a threshold
  JOIN a public lookup table by key: [INNER | LEFT] JOIN regions r ON r.country =
    CountryOfExploitation (ISO alpha-2 to UN M49 region), then r.region in GROUP BY
    (a key per region) and in WHERE (=, <>, IN with an INNER JOIN; IS [NOT] NULL);
    joins between private datasets are refused
  applied by fedq query to the combined noisy answers (post-processing, no privacy
    cost): HAVING aggregate <op> number [AND ...]; ORDER BY group columns, aggregates,
    aliases or positions [DESC]; LIMIT n; ROUND(aggregate, digits); arithmetic over
    aggregates and numbers (+ - * /: ratios and percentages such as
    100.0 * SUM(flag) / COUNT(*)), shares of the result's total
    (COUNT(*) * 1.0 / SUM(COUNT(*)) OVER ()), with intervals that hold with at
    least 95% (a union bound over every released value they read)
  UNION ALL of such queries over one dataset, by fedq query: one query grouped by
    part, each part the full epsilon (parallel composition), when their WHERE
    clauses provably select disjoint records and they ask the same aggregates;
    else one query per part, the epsilon split evenly; the result says which
  refused, with the reason and the rewrite: COUNT(DISTINCT col) (ask SELECT col,
    COUNT(*) ... GROUP BY col: every declared key with its noisy count and its
    interval; a number of keys above a noise threshold has no interval that holds)";

/// One query per construct of [`SQL_SUBSET`], over the CTDC-shaped columns
/// (`gender`, `ageBroad`, `isForcedLabour`, `yearOfRegistration`,
/// `traffickMonths`); every one plans.
pub const SQL_SUBSET_EXAMPLES: &[&str] = &[
    "SELECT COUNT(*) FROM cases",
    "SELECT COUNT(traffickMonths) FROM cases",
    "SELECT SUM(traffickMonths) FROM cases",
    "SELECT AVG(traffickMonths) FROM cases",
    "SELECT VARIANCE(traffickMonths) FROM cases",
    "SELECT VAR_SAMP(traffickMonths) FROM cases",
    "SELECT STDDEV(traffickMonths) FROM cases",
    "SELECT STDDEV_SAMP(traffickMonths) FROM cases",
    "SELECT MEDIAN(traffickMonths) FROM cases",
    "SELECT QUANTILE(traffickMonths, 0.25) FROM cases",
    "SELECT HISTOGRAM(traffickMonths, 12) FROM cases",
    "SELECT COUNT(*) FROM cases WHERE gender = 'Female' AND ageBroad <> '18+'",
    "SELECT COUNT(*) FROM cases WHERE yearOfRegistration < 2010 OR yearOfRegistration >= 2020",
    "SELECT COUNT(*) FROM cases WHERE traffickMonths <= 6 AND traffickMonths > 1",
    "SELECT COUNT(*) FROM cases WHERE gender IN ('Female', 'Male') AND ageBroad NOT IN ('18+')",
    "SELECT COUNT(*) FROM cases WHERE yearOfRegistration BETWEEN 2015 AND 2020",
    "SELECT COUNT(*) FROM cases WHERE yearOfRegistration NOT BETWEEN 2015 AND 2020",
    "SELECT COUNT(*) FROM cases WHERE gender IS NULL OR gender IS NOT NULL",
    "SELECT COUNT(*) FROM cases WHERE NOT (isForcedLabour = 1)",
    "SELECT gender, isForcedLabour, COUNT(*) FROM cases GROUP BY gender, isForcedLabour",
    "SELECT QUANTILE_CONT(traffickMonths, 0.25) FROM cases",
    "SELECT QUANTILE_DISC(traffickMonths, 0.75) FROM cases",
    "SELECT PERCENTILE_CONT(0.5) WITHIN GROUP (ORDER BY traffickMonths) FROM cases",
    "SELECT PERCENTILE_DISC(0.9) WITHIN GROUP (ORDER BY traffickMonths) FROM cases",
    "SELECT AVG(isForcedLabour), SUM(isForcedLabour) FROM cases",
    "SELECT gender, AVG(isForcedLabour) FROM cases GROUP BY gender",
    "SELECT yearOfRegistration, COUNT(*) FROM cases GROUP BY yearOfRegistration",
    "SELECT gender AS g, ageBroad, COUNT(*) FROM cases GROUP BY g, 2",
    "SELECT CASE WHEN traffickMonths < 12 THEN 'under a year' ELSE 'a year or more' END AS d, COUNT(*) FROM cases GROUP BY d",
    "SELECT COUNT(*) FILTER (WHERE isForcedLabour = 1) FROM cases",
    "SELECT SUM(CASE WHEN ageBroad IN ('0--8', '9--17') THEN 1 ELSE 0 END) FROM cases",
    "SELECT gender, AVG(CASE WHEN ageBroad IN ('0--8', '9--17') THEN 1 ELSE 0 END) FROM cases GROUP BY gender",
    "SELECT COUNT(*) FROM cases WHERE citizenship <> CountryOfExploitation",
    "SELECT COUNT(*) FILTER (WHERE traffickMonths < yearOfRegistration) FROM cases",
    "SELECT COUNT(*) FROM cases WHERE COALESCE(traffickMonths, 0) < 6",
    "SELECT SUM(traffickMonths + isForcedLabour), AVG(COALESCE(traffickMonths, 0)) FROM cases",
    "SELECT AVG(traffickMonths / 12), AVG(traffickMonths * 1.0), SUM((traffickMonths - 1) * 2) FROM cases",
    "SELECT COALESCE(gender, 'Unknown') AS g, COUNT(*) FROM cases GROUP BY g",
    "SELECT r.region, COUNT(*) FROM cases JOIN regions r ON r.country = CountryOfExploitation WHERE r.region <> 'Europe' GROUP BY r.region",
    "SELECT COUNT(*) FROM cases LEFT JOIN regions r ON r.country = citizenship WHERE r.region IS NULL",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{ColumnSpec, ColumnType};

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
                    Some(&["Female", "Male", "Trans"]),
                    None,
                ),
                col(
                    "ageBroad",
                    ColumnType::Categorical,
                    Some(&["0--8", "9--17", "18+"]),
                    None,
                ),
                col("isForcedLabour", ColumnType::Boolean, None, None),
                col(
                    "yearOfRegistration",
                    ColumnType::Integer,
                    None,
                    Some((2002, 2025)),
                ),
                col("traffickMonths", ColumnType::Integer, None, Some((0, 120))),
                col(
                    "citizenship",
                    ColumnType::Categorical,
                    Some(&["PH", "UA", "US"]),
                    None,
                ),
                col(
                    "CountryOfExploitation",
                    ColumnType::Categorical,
                    Some(&["US", "RU", "PH"]),
                    None,
                ),
            ],
        )
        .unwrap()
    }

    fn fails(sql: &str, needle: &str) {
        let e = plan(sql, &schema(), 10_000).unwrap_err().0;
        assert!(
            e.contains(needle),
            "error for {sql:?} was {e:?}, expected it to mention {needle:?}"
        );
    }

    #[test]
    fn plans_the_design_example() {
        let p = plan(
            "SELECT gender, ageBroad, COUNT(*) FROM cases WHERE isForcedLabour = 1 AND yearOfRegistration BETWEEN 2015 AND 2020 GROUP BY gender, ageBroad",
            &schema(),
            10_000,
        )
        .unwrap();
        assert_eq!(p.dataset, "cases");
        assert_eq!(p.group_by, vec![0, 1]);
        assert_eq!(p.cell_count(), 9);
        assert_eq!(p.measurements, vec![MeasurementSpec::CountRows]);
        assert!(matches!(p.filter, Some(Predicate::And(..))));
    }

    #[test]
    fn avg_shares_the_sum_with_sum() {
        let p = plan(
            "SELECT SUM(traffickMonths), AVG(traffickMonths), COUNT(*) FROM cases",
            &schema(),
            10,
        )
        .unwrap();
        assert_eq!(p.measurements.len(), 3);
        assert_eq!(p.outputs[0].measurement, p.outputs[1].measurement);
        assert_eq!(p.measurements[0].sensitivity(), 120);
        assert_eq!(p.measurements[0].l2_sensitivity(), 120);
        assert_eq!(p.measurements[1].l2_sensitivity(), 1);
        assert_eq!(p.outputs[1].count_measurement, Some(1));
    }

    #[test]
    fn literal_flipped_and_negative() {
        let p = plan(
            "SELECT COUNT(*) FROM cases WHERE 2015 <= yearOfRegistration AND traffickMonths > -1",
            &schema(),
            10,
        )
        .unwrap();
        let Some(Predicate::And(a, b)) = p.filter else {
            panic!()
        };
        assert_eq!(
            *a,
            Predicate::Cmp {
                column: 3,
                op: CmpOp::Ge,
                value: 2015
            }
        );
        assert_eq!(
            *b,
            Predicate::Cmp {
                column: 4,
                op: CmpOp::Gt,
                value: -1
            }
        );
    }

    #[test]
    fn clear_errors_for_everything_outside_the_subset() {
        fails("SELEC COUNT(*) FROM cases", "syntax");
        fails("SELECT * FROM cases", "SELECT *");
        fails(
            "SELECT COUNT(*) FROM cases a JOIN other b ON a.x = b.x",
            "JOIN",
        );
        fails("SELECT COUNT(*) FROM (SELECT * FROM cases) t", "subqueries");
        fails(
            "SELECT COUNT(*) FROM cases WHERE nope = 1",
            "unknown column \"nope\"",
        );
        fails(
            "SELECT COUNT(*) FROM cases GROUP BY traffickMonths / 12",
            "per-row expressions",
        );
        fails(
            "SELECT SUM(gender) FROM cases",
            "not an integer or boolean column",
        );
        fails(
            "SELECT MAX(traffickMonths) FROM cases",
            "MAX is not released",
        );
        fails(
            "SELECT COUNT(*) FROM cases WHERE gender = 'Femal'",
            "not in the declared domain of gender",
        );
        fails(
            "SELECT COUNT(*) FROM cases WHERE gender = 1",
            "quoted string",
        );
        fails(
            "SELECT COUNT(*) FROM cases WHERE gender > 'Female'",
            "only =, <> and IN",
        );
        fails("SELECT COUNT(*) FROM cases ORDER BY 1", "ORDER BY");
        fails("SELECT COUNT(*) FROM cases LIMIT 3", "LIMIT");
        fails("SELECT gender, COUNT(*) FROM cases", "not aggregated");
        fails("SELECT gender FROM cases GROUP BY gender", "no aggregate");
        fails("SELECT COUNT(DISTINCT gender) FROM cases", "DISTINCT");
        fails(
            "SELECT COUNT(*) FROM cases; SELECT COUNT(*) FROM cases",
            "one SELECT",
        );
        fails("DELETE FROM cases", "only SELECT");
        fails(
            "SELECT COUNT(*) FROM cases WHERE traffickMonths = NULL",
            "IS NULL",
        );
        fails("SELECT COUNT(*) FROM cases HAVING COUNT(*) > 3", "HAVING");
        fails(
            "SELECT COUNT(*) FROM cases WHERE traffickMonths + 1 > 3",
            "column on one side",
        );
    }

    #[test]
    fn cell_limit_is_enforced() {
        let e = plan(
            "SELECT gender, ageBroad, COUNT(*) FROM cases GROUP BY gender, ageBroad",
            &schema(),
            15,
        )
        .unwrap_err();
        // 3 x 3 declared values, each column plus its (missing) key.
        assert!(e.0.contains("16 cells"), "{e}");
        assert!(plan(
            "SELECT gender, ageBroad, COUNT(*) FROM cases GROUP BY gender, ageBroad",
            &schema(),
            16
        )
        .is_ok());
    }

    /// `fedq query --help` states what the planner accepts: every example
    /// of [`SQL_SUBSET`] plans, and of the aggregate functions researchers
    /// commonly write, exactly those the planner accepts are listed.
    #[test]
    fn the_help_text_states_exactly_what_the_planner_accepts() {
        let s = schema();
        for sql in SQL_SUBSET_EXAMPLES {
            plan(sql, &s, 10_000).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        // ROUND is the coordinator's (post-processing, `fedq::post`), not
        // the planner's; its own tests cover it. COALESCE is per row.
        let functions = [
            "COUNT",
            "SUM",
            "AVG",
            "MIN",
            "MAX",
            "VARIANCE",
            "VAR_SAMP",
            "VAR_POP",
            "STDDEV",
            "STDDEV_SAMP",
            "STDDEV_POP",
            "MEDIAN",
            "QUANTILE",
            "HISTOGRAM",
            "MODE",
            "PERCENTILE_CONT",
            "PERCENTILE_DISC",
            "QUANTILE_CONT",
            "QUANTILE_DISC",
            "APPROX_COUNT_DISTINCT",
            "ABS",
            "COALESCE",
        ];
        let words: Vec<&str> = SQL_SUBSET
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .collect();
        for f in functions {
            let accepted = [
                format!("SELECT {f}(traffickMonths) FROM cases"),
                format!("SELECT {f}(traffickMonths, 0.5) FROM cases"),
                format!("SELECT {f}(traffickMonths, 12) FROM cases"),
                format!("SELECT {f}(0.5) WITHIN GROUP (ORDER BY traffickMonths) FROM cases"),
                // Per-row functions, inside an aggregate.
                format!("SELECT SUM({f}(traffickMonths, 0)) FROM cases"),
                format!("SELECT SUM({f}(traffickMonths)) FROM cases"),
            ]
            .iter()
            .any(|sql| plan(sql, &s, 10_000).is_ok());
            let listed = words.contains(&f);
            assert_eq!(
                accepted,
                listed,
                "{f}: the planner {} it, the help {} it",
                if accepted { "accepts" } else { "refuses" },
                if listed { "lists" } else { "does not list" }
            );
        }
    }

    /// What researchers write and the planner does not release is refused
    /// naming the construct and the alternative, never with a message that
    /// suggests the function exists ("takes exactly one argument").
    #[test]
    fn refusals_name_the_construct_and_the_alternative() {
        let s = schema();
        for (sql, says) in [
            (
                "SELECT MAX(traffickMonths) FROM cases",
                "QUANTILE(col, 0.95)",
            ),
            (
                "SELECT MIN(traffickMonths) FROM cases",
                "a single record decides it",
            ),
            ("SELECT COUNT(DISTINCT gender) FROM cases", "GROUP BY col"),
            (
                "SELECT ROUND(traffickMonths, 1) FROM cases",
                "per-row rounding is not supported",
            ),
            (
                "SELECT quantile_cont(traffickMonths) FROM cases",
                "takes a column and a number",
            ),
            (
                "SELECT foo(traffickMonths, 2) FROM cases",
                "not an aggregate fedq releases",
            ),
            (
                "SELECT MODE(gender) FROM cases",
                "ORDER BY COUNT(*) DESC LIMIT 1",
            ),
            (
                "SELECT HISTOGRAM(isForcedLabour, 2) FROM cases",
                "GROUP BY it",
            ),
            (
                "SELECT PERCENTILE_CONT(0.5) FROM cases",
                "WITHIN GROUP (ORDER BY column)",
            ),
            (
                "SELECT COUNT(*) FROM cases ORDER BY 1",
                "applied by fedq query",
            ),
        ] {
            let e = plan(sql, &s, 10_000).unwrap_err().0;
            assert!(e.contains(says), "{sql}: {e}");
            assert!(!e.contains("exactly one argument"), "{sql}: {e}");
        }
    }

    /// An integer column groups by one key per value of its declared
    /// bounds (labelled with the value), up to a limit; a GROUP BY item may
    /// be an alias or a position of the SELECT list.
    #[test]
    fn integer_columns_aliases_and_positions_group() {
        let s = schema();
        let p = plan(
            "SELECT yearOfRegistration, COUNT(*) FROM cases GROUP BY yearOfRegistration",
            &s,
            10_000,
        )
        .unwrap();
        assert_eq!(p.group_sizes, vec![24]);
        let keys = cell_keys(&p, &s);
        assert_eq!(keys.len(), 25);
        assert_eq!(keys[0], vec!["2002"]);
        assert_eq!(keys[23], vec!["2025"]);
        assert_eq!(keys[24], vec![MISSING_KEY]);
        let by_alias = plan(
            "SELECT yearOfRegistration AS y, gender AS g, COUNT(*) FROM cases GROUP BY y, 2",
            &s,
            10_000,
        )
        .unwrap();
        assert_eq!(by_alias.group_by, vec![3, 0]);
        let e = plan("SELECT COUNT(*) FROM cases GROUP BY 2", &s, 10_000).unwrap_err();
        assert!(e.0.contains("its position in the SELECT list"), "{e}");
        let wide = Schema::from_specs(
            "cases",
            &[ColumnSpec {
                open: None,
                name: "amount".into(),
                kind: ColumnType::Integer,
                domain: None,
                min: Some(0),
                max: Some(100_000),
                bins: None,
            }],
        )
        .unwrap();
        let e = plan(
            "SELECT amount, COUNT(*) FROM cases GROUP BY amount",
            &wide,
            1_000_000,
        )
        .unwrap_err();
        assert!(e.0.contains("HISTOGRAM(amount, k)"), "{e}");
    }

    /// A CASE of literal labels over declared columns is a GROUP BY key
    /// whose domain is its labels (first TRUE branch wins; without ELSE,
    /// unmatched rows are (missing)); named by its alias, grouped by the
    /// expression, its alias or its position.
    #[test]
    fn case_buckets_group_by_their_literal_labels() {
        let s = schema();
        let case = "CASE WHEN traffickMonths < 6 THEN '<6m' WHEN traffickMonths < 12 THEN '6-11m' WHEN traffickMonths >= 12 THEN '12m+' END";
        for group in [case, "d", "1"] {
            let p = plan(
                &format!("SELECT {case} AS d, COUNT(*) FROM cases GROUP BY {group}"),
                &s,
                10_000,
            )
            .unwrap();
            assert_eq!(p.group_sizes, vec![3]);
            assert_eq!(p.group_names(&s), vec!["d"]);
            assert_eq!(p.buckets[0].otherwise, None);
            assert_eq!(
                cell_keys(&p, &s),
                vec![vec!["<6m"], vec!["6-11m"], vec!["12m+"], vec![MISSING_KEY]]
            );
            assert!(p.measurements.iter().all(|m| m.sensitivity() == 1));
        }
        let p = plan(
            "SELECT gender, CASE isForcedLabour WHEN 1 THEN 'yes' ELSE 'no' END, COUNT(*) FROM cases GROUP BY 1, 2",
            &s,
            10_000,
        )
        .unwrap();
        assert_eq!(p.group_sizes, vec![3, 2]);
        assert_eq!(p.buckets[0].otherwise, Some(1));
        for (sql, says) in [
            (
                "SELECT CASE WHEN traffickMonths < 6 THEN traffickMonths END, COUNT(*) FROM cases GROUP BY 1",
                "literal labels",
            ),
            (
                "SELECT CASE WHEN nope < 6 THEN 'a' END AS x, COUNT(*) FROM cases GROUP BY x",
                "unknown column",
            ),
            (
                "SELECT CASE WHEN traffickMonths < 6 THEN 'a' END, COUNT(*) FROM cases",
                "not grouped by",
            ),
        ] {
            let e = plan(sql, &s, 10_000).unwrap_err().0;
            assert!(e.contains(says), "{sql}: {e}");
        }
    }

    /// `'-99'` (the files' missing value) compares as missing.
    #[test]
    fn minus_99_is_missing() {
        let s = schema();
        let p = plan(
            "SELECT COUNT(*) FROM cases WHERE gender <> '-99'",
            &s,
            10_000,
        )
        .unwrap();
        assert_eq!(
            p.filter,
            Some(Predicate::IsMissing {
                column: 0,
                negated: true
            })
        );
        let p = plan(
            "SELECT COUNT(*) FROM cases WHERE traffickMonths = -99",
            &s,
            10_000,
        )
        .unwrap();
        assert!(matches!(
            p.filter,
            Some(Predicate::IsMissing { negated: false, .. })
        ));
    }

    /// Two columns of a row compare: categories by label (through the
    /// declared domains, which differ), numbers by value; mixed kinds,
    /// orders on categories and the person column are refused saying why.
    /// The sensitivity is that of any filter: a record is counted at most
    /// once.
    #[test]
    fn two_columns_compare_by_label_or_by_value() {
        let s = schema();
        let p = plan(
            "SELECT COUNT(*) FROM cases WHERE citizenship <> CountryOfExploitation",
            &s,
            10_000,
        )
        .unwrap();
        // citizenship PH, UA, US are CountryOfExploitation's codes 2, none, 0.
        assert_eq!(
            p.filter,
            Some(Predicate::Columns {
                left: 5,
                op: CmpOp::Ne,
                right: 6,
                relabel: Some(vec![2, -1, 0]),
            })
        );
        assert!(p.measurements.iter().all(|m| m.sensitivity() == 1));
        // `a < b` with the literal-side rule: `b > a` is the same.
        let p = plan(
            "SELECT SUM(traffickMonths) FROM cases WHERE traffickMonths < yearOfRegistration",
            &s,
            10_000,
        )
        .unwrap();
        assert_eq!(
            p.filter,
            Some(Predicate::Columns {
                left: 4,
                op: CmpOp::Lt,
                right: 3,
                relabel: None,
            })
        );
        // In FILTER and in a CASE bucket too.
        plan(
            "SELECT COUNT(*) FILTER (WHERE citizenship = CountryOfExploitation), AVG(CASE WHEN citizenship <> CountryOfExploitation THEN 1 ELSE 0 END) FROM cases",
            &s,
            10_000,
        )
        .unwrap();
        let p = plan(
            "SELECT CASE WHEN citizenship = CountryOfExploitation THEN 'domestic' ELSE 'cross-border or unknown' END AS c, COUNT(*) FROM cases GROUP BY c",
            &s,
            10_000,
        )
        .unwrap();
        assert_eq!(p.buckets[0].labels.len(), 2);
        for (sql, says) in [
            (
                "SELECT COUNT(*) FROM cases WHERE gender = traffickMonths",
                "only numbers (integer columns, flags) compare with numbers",
            ),
            (
                "SELECT COUNT(*) FROM cases WHERE citizenship < CountryOfExploitation",
                "categories compare with = and <> only",
            ),
            (
                "SELECT COUNT(*) FROM cases WHERE gender = gender",
                "write gender IS NOT NULL",
            ),
            (
                "SELECT COUNT(*) FROM cases WHERE gender = nosuch",
                "unknown column",
            ),
        ] {
            let e = plan(sql, &s, 10_000).unwrap_err().0;
            assert!(e.contains(says), "{sql}: {e}");
        }
    }

    /// A typo in a column name or a value gets the closest declared one.
    #[test]
    fn typos_get_the_closest_declared_name() {
        let s = schema();
        for (sql, says) in [
            (
                "SELECT gendr, COUNT(*) FROM cases GROUP BY gendr",
                "did you mean \"gender\"?",
            ),
            (
                "SELECT COUNT(*) FROM cases WHERE gender = 'female'",
                "did you mean \"Female\"?",
            ),
            (
                "SELECT COUNT(*) FROM cases WHERE gender = 'Femal'",
                "did you mean \"Female\"?",
            ),
            (
                "SELECT AVG(trafickMonths) FROM cases",
                "did you mean \"traffickMonths\"?",
            ),
        ] {
            let e = plan(sql, &s, 10_000).unwrap_err().0;
            assert!(e.contains(says), "{sql}: {e}");
        }
        let e = plan("SELECT COUNT(*) FROM cases WHERE xyz = 1", &s, 10_000)
            .unwrap_err()
            .0;
        assert!(!e.contains("did you mean"), "{e}");
    }

    /// A count or a share of the rows meeting a condition, in the spellings
    /// researchers use, is one measurement of sensitivity 1 (shared by the
    /// spellings of the same condition); other CASEs inside aggregates are
    /// refused naming the supported forms.
    #[test]
    fn conditional_counts_and_shares() {
        let s = schema();
        let p = plan(
            "SELECT SUM(CASE WHEN ageBroad IN ('0--8', '9--17') THEN 1 ELSE 0 END), \
             COUNT(CASE WHEN ageBroad IN ('0--8', '9--17') THEN 1 END), \
             AVG(CASE WHEN ageBroad IN ('0--8', '9--17') THEN 1 ELSE 0 END), \
             COUNT(*) FILTER (WHERE isForcedLabour = 1) FROM cases",
            &s,
            10_000,
        )
        .unwrap();
        // The three spellings of one condition share a measurement; the
        // share adds COUNT(*); the FILTER is another condition.
        assert_eq!(p.measurements.len(), 3, "{:?}", p.measurements);
        assert!(matches!(
            p.measurements[0],
            MeasurementSpec::CountWhere { .. }
        ));
        assert_eq!(p.outputs[0].measurement, p.outputs[1].measurement);
        assert_eq!(p.outputs[2].kind, OutputKind::Avg);
        assert_eq!(p.outputs[2].bounds, Some((0, 1)));
        assert!(p.measurements.iter().all(|m| m.sensitivity() == 1));
        for sql in [
            "SELECT SUM(CASE WHEN isForcedLabour = 1 THEN 2 ELSE 0 END) FROM cases",
            "SELECT AVG(CASE WHEN isForcedLabour = 1 THEN 1 END) FROM cases",
            "SELECT SUM(CASE WHEN gender = 'Male' THEN 1 WHEN gender = 'Female' THEN 1 ELSE 0 END) FROM cases",
        ] {
            let e = plan(sql, &s, 10_000).unwrap_err().0;
            assert!(e.contains("count or a share of the rows"), "{sql}: {e}");
        }
        let e = plan(
            "SELECT SUM(traffickMonths) FILTER (WHERE isForcedLabour = 1) FROM cases",
            &s,
            10_000,
        )
        .unwrap_err()
        .0;
        assert!(e.contains("FILTER applies to COUNT(*) only"), "{e}");
    }

    /// Per-row arithmetic: bounds by interval arithmetic over the declared
    /// bounds only, the sum's sensitivity the larger end; `* 1.0` changes
    /// nothing; what cannot be bounded is refused saying why and what to
    /// write instead.
    #[test]
    fn per_row_arithmetic_has_bounds_from_the_declared_ones() {
        let s = schema();
        let p = plan(
            "SELECT SUM(traffickMonths + isForcedLabour), AVG(COALESCE(traffickMonths, 0) * 1.0), AVG(traffickMonths / 12), SUM((traffickMonths - 60) * -2) FROM cases",
            &s,
            10_000,
        )
        .unwrap();
        let bounds: Vec<Option<(i64, i64)>> = p.outputs.iter().map(|o| o.bounds).collect();
        assert_eq!(
            bounds,
            [
                Some((0, 121)),
                Some((0, 120)),
                Some((0, 10)),
                Some((-120, 120))
            ]
        );
        let sums: Vec<i64> = p
            .measurements
            .iter()
            .filter(|m| matches!(m, MeasurementSpec::SumOf { .. }))
            .map(MeasurementSpec::sensitivity)
            .collect();
        assert_eq!(sums, [121, 120, 10, 120]);
        // AVG divides by the rows where the expression is not NULL.
        assert!(matches!(
            p.measurements[p.outputs[1].count_measurement.unwrap()],
            MeasurementSpec::CountOf { .. }
        ));
        let e = |x: RowExpr| x.eval(&|c| [None, Some(7), Some(1)].get(c).copied().flatten());
        use RowExpr::*;
        assert_eq!(e(Add(Box::new(Column(0)), Box::new(Const(1)))), None);
        assert_eq!(e(Coalesce(vec![Column(0), Column(1)])), Some(7));
        assert_eq!(e(Div(Box::new(Const(-7)), 2)), Some(-3), "toward zero");
        for (sql, says) in [
            ("SELECT AVG(traffickMonths / 12.5) FROM cases", "AVG(traffickMonths) / 12.0"),
            // A decimal divides exactly, not as integers.
            ("SELECT AVG(traffickMonths / 12.0) FROM cases", "AVG(traffickMonths) / 12.0"),
            ("SELECT AVG(traffickMonths * 1.0 / 12) FROM cases", "AVG(traffickMonths) / 12.0"),
            ("SELECT SUM(traffickMonths / yearOfRegistration) FROM cases", "SUM(a) / SUM(b)"),
            ("SELECT SUM(gender + 1) FROM cases", "gender is a category"),
            ("SELECT SUM(traffickMonths % 2) FROM cases", "operator % is not supported"),
            (
                "SELECT SUM(yearOfRegistration * yearOfRegistration * yearOfRegistration * yearOfRegistration) FROM cases",
                "exceed ±2^40",
            ),
            ("SELECT SUM(ABS(traffickMonths)) FROM cases", "cannot be bounded"),
            // Bounds that saturate i128 on the way (2025^12 > 2^127), then
            // the division that would overflow it: refused, no panic.
            (
                "SELECT SUM(-(yearOfRegistration * yearOfRegistration * yearOfRegistration * yearOfRegistration * yearOfRegistration * yearOfRegistration * yearOfRegistration * yearOfRegistration * yearOfRegistration * yearOfRegistration * yearOfRegistration * yearOfRegistration) * -1 / -1) FROM cases",
                "exceed ±2^40",
            ),
            (
                "SELECT SUM(traffickMonths + traffickMonths + traffickMonths + traffickMonths + traffickMonths + traffickMonths + traffickMonths + traffickMonths + traffickMonths + traffickMonths + traffickMonths + traffickMonths + traffickMonths + traffickMonths + traffickMonths + traffickMonths + traffickMonths) FROM cases",
                "at most 32",
            ),
        ] {
            let e = plan(sql, &s, 10_000).unwrap_err().0;
            assert!(e.contains(says), "{sql}: {e}");
        }
    }

    /// COALESCE(col, literal) in a condition is exact (never unknown); as a
    /// GROUP BY key over a category, the declared labels plus the default.
    #[test]
    fn coalesce_in_conditions_and_keys() {
        let s = schema();
        let p = plan(
            "SELECT COUNT(*) FROM cases WHERE COALESCE(traffickMonths, 0) < 6",
            &s,
            10_000,
        )
        .unwrap();
        assert!(
            matches!(&p.filter, Some(Predicate::Or(_, b)) if **b == Predicate::IsMissing { column: 4, negated: false }),
            "{:?}",
            p.filter
        );
        let p = plan(
            "SELECT COUNT(*) FROM cases WHERE COALESCE(gender, 'Unknown') = 'Unknown'",
            &s,
            10_000,
        )
        .unwrap();
        assert_eq!(
            p.filter,
            Some(Predicate::IsMissing {
                column: 0,
                negated: false
            })
        );
        let p = plan(
            "SELECT COALESCE(gender, 'Unknown') AS g, COUNT(*) FROM cases GROUP BY g",
            &s,
            10_000,
        )
        .unwrap();
        assert_eq!(p.buckets[0].labels, ["Female", "Male", "Trans", "Unknown"]);
        assert_eq!(p.buckets[0].name, "g");
        let p = plan(
            "SELECT COALESCE(gender, 'Male'), COUNT(*) FROM cases GROUP BY 1",
            &s,
            10_000,
        )
        .unwrap();
        assert_eq!(p.buckets[0].labels, ["Female", "Male", "Trans"]);
        for (sql, says) in [
            (
                "SELECT COALESCE(traffickMonths, 0), COUNT(*) FROM cases GROUP BY 1",
                "applies to a categorical column or a flag",
            ),
            (
                "SELECT COUNT(*) FROM cases WHERE COALESCE(gender, 'Unknown') < 'M'",
                "only =, <> and IN",
            ),
            (
                "SELECT COALESCE(gender, 'Unknown'), COUNT(*) FROM cases",
                "selected but not grouped by",
            ),
        ] {
            let e = plan(sql, &s, 10_000).unwrap_err().0;
            assert!(e.contains(says), "{sql}: {e}");
        }
    }

    /// Disjoint WHERE clauses are proven so from the query and the schema;
    /// anything less certain is not.
    #[test]
    fn disjoint_filters_are_proven_from_the_query_alone() {
        let s = schema();
        let filter = |w: &str| {
            plan(&format!("SELECT COUNT(*) FROM cases WHERE {w}"), &s, 10_000)
                .unwrap()
                .filter
        };
        for (a, b, disjoint) in [
            ("gender = 'Female'", "gender = 'Male'", true),
            (
                "gender = 'Female' AND isForcedLabour = 1",
                "gender <> 'Female'",
                true,
            ),
            (
                "yearOfRegistration < 2015",
                "yearOfRegistration >= 2015",
                true,
            ),
            (
                "yearOfRegistration <= 2015",
                "yearOfRegistration >= 2015",
                false,
            ),
            (
                "yearOfRegistration BETWEEN 2002 AND 2010",
                "2011 <= yearOfRegistration",
                true,
            ),
            ("gender IS NULL", "gender = 'Female'", true),
            ("gender IS NULL", "NOT gender = 'Female'", true),
            ("gender = 'Female'", "ageBroad = '18+'", false),
            ("NOT gender = 'Female'", "gender = 'Female'", true),
            (
                "gender IN ('Female', 'Male')",
                "gender = 'Trans' AND traffickMonths > 3",
                true,
            ),
            (
                "gender IN ('Female', 'Male')",
                "gender = 'Male' OR isForcedLabour = 1",
                false,
            ),
            (
                "gender = 'Female' OR ageBroad = '18+'",
                "gender = 'Male'",
                false,
            ),
            (
                "citizenship = CountryOfExploitation",
                "citizenship <> CountryOfExploitation",
                false,
            ),
        ] {
            assert_eq!(
                provably_disjoint(filter(a).as_ref(), filter(b).as_ref(), &s),
                disjoint,
                "{a} / {b}"
            );
            assert_eq!(
                provably_disjoint(filter(b).as_ref(), filter(a).as_ref(), &s),
                disjoint,
                "{b} / {a}"
            );
        }
        assert!(!provably_disjoint(
            None,
            filter("gender = 'Male'").as_ref(),
            &s
        ));
    }

    /// A join to a public lookup table is a CASE bucket over the joined
    /// column (GROUP BY) or an IN list (WHERE), over the keys in its
    /// declared domain; private joins are refused saying why.
    #[test]
    fn public_lookup_tables_join_by_key() {
        let s = schema();
        let p = plan(
            "SELECT r.region, COUNT(*) FROM cases c JOIN regions r ON c.CountryOfExploitation = r.country GROUP BY r.region",
            &s,
            10_000,
        )
        .unwrap();
        // US: Americas, RU: Europe, PH: Asia, in the table's order.
        assert_eq!(p.buckets[0].labels, ["Americas", "Asia", "Europe"]);
        assert_eq!(p.buckets[0].name, "region");
        // An inner join keeps the records whose country has a region.
        assert!(p.filter.is_some());
        let p = plan(
            "SELECT COUNT(*) FROM cases LEFT JOIN regions AS o ON o.country = citizenship WHERE o.region IS NULL",
            &s,
            10_000,
        )
        .unwrap();
        assert!(p.buckets.is_empty());
        let europe = plan(
            "SELECT COUNT(*) FROM cases JOIN regions r ON citizenship = r.country WHERE r.region = 'Europe'",
            &s,
            10_000,
        )
        .unwrap();
        let ua = plan(
            "SELECT COUNT(*) FROM cases WHERE citizenship IN ('UA') AND citizenship IN ('US', 'PH', 'UA')",
            &s,
            10_000,
        )
        .unwrap();
        assert_eq!(europe.filter, ua.filter);
        // Two joins of one table: origin and destination regions.
        let p = plan(
            "SELECT o.region AS origin, d.region AS destination, COUNT(*) FROM cases JOIN regions o ON citizenship = o.country JOIN regions d ON CountryOfExploitation = d.country GROUP BY 1, 2",
            &s,
            10_000,
        )
        .unwrap();
        assert_eq!(p.group_names(&s), ["origin", "destination"]);
        for (sql, says) in [
            (
                "SELECT COUNT(*) FROM cases JOIN cases c2 ON cases.gender = c2.gender",
                "joins between private datasets are not supported",
            ),
            (
                "SELECT COUNT(*) FROM cases LEFT JOIN regions r ON citizenship = r.country WHERE r.region = 'Asia'",
                "use an INNER JOIN",
            ),
            (
                "SELECT COUNT(*) FROM cases JOIN regions r ON traffickMonths = r.country",
                "joins a categorical column",
            ),
            (
                "SELECT COUNT(*) FROM cases JOIN regions r ON r.region = citizenship",
                "join on r.country = a column of the dataset",
            ),
            (
                "SELECT COUNT(*) FROM cases CROSS JOIN regions",
                "only [INNER] JOIN and LEFT JOIN",
            ),
        ] {
            let e = plan(sql, &s, 10_000).unwrap_err().0;
            assert!(e.contains(says), "{sql}: {e}");
        }
    }

    /// The README's section on the SQL fedq answers states the same list.
    #[test]
    fn the_readme_states_the_sql_subset() {
        let readme = include_str!("../../../README.md");
        assert!(
            readme.contains(SQL_SUBSET),
            "README.md's \"The SQL fedq answers\" must hold SQL_SUBSET verbatim"
        );
    }

    /// A flag is a number with bounds 0 and 1: its sum's sensitivity is 1.
    #[test]
    fn flags_are_numbers_from_zero_to_one() {
        let p = plan("SELECT AVG(isForcedLabour) FROM cases", &schema(), 10_000).unwrap();
        assert_eq!(p.outputs[0].bounds, Some((0, 1)));
        assert!(p
            .measurements
            .iter()
            .any(|m| matches!(m, MeasurementSpec::Sum { min: 0, max: 1, .. })));
        assert!(p.measurements.iter().all(|m| m.sensitivity() == 1));
    }
}
