//! The aggregates of the SELECT list, one module per aggregate.
//!
//! Each module maps its SQL spellings to the measurements it needs, with
//! the bounds their sensitivities follow from (declared metadata only,
//! DESIGN invariant 4), and names the engine kernel and the PostgreSQL
//! push-down fragment that compute its exact values. Registering an
//! aggregate is one line of [`AGGREGATES`]; the help text's list of
//! aggregates ([`supported`]) and the refusal of unknown functions follow
//! from the registry.
//!
//! - [`count`]: `COUNT(*)`, `COUNT(col)`.
//! - [`count_where`]: counts and shares of the rows meeting a condition
//!   (`COUNT(*) FILTER (WHERE c)`, `SUM(CASE WHEN c THEN 1 ELSE 0 END)`,
//!   `AVG(CASE ...)`).
//! - [`sum`]: `SUM` and `AVG` of a column, a flag or a per-row expression.
//! - [`variance`]: `VARIANCE` and `STDDEV` (count, sum and centred squares).
//! - [`quantile`]: `MEDIAN`, `QUANTILE` and the `PERCENTILE_CONT` and
//!   `QUANTILE_CONT` spellings (a histogram over the declared bins).
//! - [`histogram`]: `HISTOGRAM(col, k)`.

use sqlparser::ast::{Expr, Function, FunctionArg, FunctionArgExpr, FunctionArguments};

use super::error::{unsupported, PlanError};
use super::measurement::{MeasurementSpec, Output, OutputKind};
use super::parse::number_literal;
use crate::schema::Schema;

pub(crate) mod count;
pub(crate) mod count_where;
pub(crate) mod histogram;
pub(crate) mod quantile;
pub(crate) mod sum;
pub(crate) mod variance;

/// One aggregate function of the SQL subset.
pub(crate) struct Aggregate {
    /// The names it is called by, upper case; the first is the one
    /// messages use.
    pub(crate) names: &'static [&'static str],
    /// How it is written, for the help text and messages, e.g. `SUM(col)`.
    pub(crate) usage: &'static str,
    /// For an aggregate taking a number after the column, an example
    /// (`QUANTILE(traffickMonths, 0.9)`); `None` for one argument.
    pub(crate) second: Option<&'static str>,
    /// Plans one call: the measurements it needs and how its output is
    /// read off them.
    pub(crate) plan: fn(&Call<'_>, &mut Measurements) -> Result<Output, PlanError>,
}

/// The aggregates the planner knows, in the order the help text lists them.
pub(crate) const AGGREGATES: &[Aggregate] = &[
    count::COUNT,
    sum::SUM,
    sum::AVG,
    variance::VARIANCE,
    variance::STDDEV,
    quantile::MEDIAN,
    quantile::QUANTILE,
    histogram::HISTOGRAM,
];

/// The aggregate called `name` (upper case), under any of its names.
fn aggregate(name: &str) -> Option<&'static Aggregate> {
    AGGREGATES.iter().find(|a| a.names.contains(&name))
}

/// The aggregates fedq knows, for the help text and error messages:
/// `COUNT(*), COUNT(col), SUM(col), ...`.
pub(crate) fn supported() -> String {
    AGGREGATES
        .iter()
        .map(|a| a.usage)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One call of an aggregate, its arguments checked for number and form.
pub(crate) struct Call<'a> {
    /// The whole call as written (for labels and messages).
    pub(crate) expr: &'a Expr,
    /// The aggregate's name in messages (its first name).
    pub(crate) name: &'static str,
    /// The first argument: `*` or an expression.
    pub(crate) arg: &'a FunctionArgExpr,
    /// The number after the column, for aggregates that take one.
    pub(crate) second: Option<&'a Expr>,
    /// The dataset's declared schema.
    pub(crate) schema: &'a Schema,
}

impl Call<'_> {
    /// The first argument as an expression (not `*`), or the refusal
    /// "needs a column".
    pub(crate) fn column_arg(&self) -> Result<&Expr, PlanError> {
        match self.arg {
            FunctionArgExpr::Expr(e) => Ok(e),
            _ => unsupported(format!("{}: {} needs a column", self.expr, self.name)),
        }
    }

    /// An output of `kind` read off `measurement` alone.
    pub(crate) fn output(&self, kind: OutputKind, measurement: usize) -> Output {
        Output {
            label: self.expr.to_string(),
            kind,
            measurement,
            count_measurement: None,
            bounds: None,
            quantile: None,
            squares: None,
        }
    }
}

/// The distinct measurements of a plan, in first-use order: an aggregate
/// asking for one already there (AVG and COUNT of one column share the
/// count) gets its index, so it is released once.
#[derive(Default)]
pub(crate) struct Measurements(pub(crate) Vec<MeasurementSpec>);

impl Measurements {
    /// The index of `m`, added if new.
    pub(crate) fn add(&mut self, m: MeasurementSpec) -> usize {
        if let Some(i) = self.0.iter().position(|x| *x == m) {
            i
        } else {
            self.0.push(m);
            self.0.len() - 1
        }
    }
}

/// Plans one function call of the SELECT list (`f`, written as `expr`).
pub(crate) fn output(
    f: &Function,
    expr: &Expr,
    schema: &Schema,
    measurements: &mut Measurements,
) -> Result<Output, PlanError> {
    let written = f.name.to_string().to_ascii_uppercase();
    if f.over.is_some() || f.null_treatment.is_some() {
        return unsupported(format!(
            "{expr}: window functions are not released by a node; the one fedq query computes is a share of the result's total, agg * 1.0 / SUM(agg) OVER () (no PARTITION BY or ORDER BY), from the released values; or use AVG(CASE WHEN condition THEN 1 ELSE 0 END)"
        ));
    }
    if let Some(out) = count_where::output(&written, f, expr, schema, measurements)? {
        return Ok(out);
    }
    if f.filter.is_some() {
        return unsupported(format!(
            "{expr}: FILTER applies to COUNT(*) only (COUNT(*) FILTER (WHERE condition)); for other aggregates, filter in WHERE"
        ));
    }
    if let Some(why) = unsupported_function(&written, f) {
        return unsupported(format!("{expr}: {why}"));
    }
    let agg = aggregate(&written).expect("unsupported_function refuses unknown names");
    let name = agg.names[0];
    let percentile = matches!(written.as_str(), "PERCENTILE_CONT" | "PERCENTILE_DISC");
    if !f.within_group.is_empty() && !percentile {
        return unsupported(format!(
            "{expr}: WITHIN GROUP belongs to PERCENTILE_CONT and PERCENTILE_DISC only"
        ));
    }
    let args = match &f.args {
        FunctionArguments::List(list) => {
            if list.duplicate_treatment.is_some() {
                return unsupported(format!(
                    "{expr}: DISTINCT and ALL inside aggregates are not supported"
                ));
            }
            if !list.clauses.is_empty() {
                return unsupported(format!(
                    "{expr}: clauses inside aggregates are not supported"
                ));
            }
            &list.args
        }
        _ => {
            return unsupported(format!(
                "{expr}: expected an aggregate with arguments in parentheses"
            ))
        }
    };
    let mut args: Vec<&FunctionArgExpr> = args
        .iter()
        .map(|a| match a {
            FunctionArg::Unnamed(a) => Ok(a),
            _ => unsupported(format!("{expr}: named arguments are not supported")),
        })
        .collect::<Result<_, _>>()?;
    // PERCENTILE_CONT(q) WITHIN GROUP (ORDER BY col) is QUANTILE(col, q).
    let ordered;
    if percentile {
        let ([q], [o]) = (args.as_slice(), f.within_group.as_slice()) else {
            return unsupported(format!(
                "{expr}: write {written}(q) WITHIN GROUP (ORDER BY column), e.g. {written}(0.5) WITHIN GROUP (ORDER BY traffickMonths)"
            ));
        };
        ordered = FunctionArgExpr::Expr(o.expr.clone());
        args = vec![&ordered, *q];
    }
    let (arg, second) = match (args.as_slice(), agg.second) {
        ([a], None) => (*a, None),
        ([a, FunctionArgExpr::Expr(b)], Some(_)) => (*a, Some(b)),
        (_, Some(example)) => {
            return unsupported(format!(
                "{expr}: {name} takes a column and a number, e.g. {example}"
            ))
        }
        _ => return unsupported(format!("{expr}: {name} takes exactly one argument")),
    };
    let call = Call {
        expr,
        name,
        arg,
        second,
        schema,
    };
    (agg.plan)(&call, measurements)
}

/// Why the function `fname` (upper case) is refused, naming the construct
/// and what to write instead; `None` for the aggregates the planner knows.
fn unsupported_function(fname: &str, f: &Function) -> Option<String> {
    let distinct = matches!(
        &f.args,
        FunctionArguments::List(l) if l.duplicate_treatment == Some(sqlparser::ast::DuplicateTreatment::Distinct)
    );
    Some(match fname {
        "COUNT" if distinct => "COUNT(DISTINCT col) is not released: over a declared domain the possible values are public already, and which of them occur could only be estimated as the number of keys whose noisy count passes a threshold, a number with no interval that holds; ask SELECT col, COUNT(*) FROM ... GROUP BY col: every key of the domain with its noisy count and interval, from which the keys that clearly occur can be read".to_string(),
        _ if aggregate(fname).is_some() => return None,
        "MIN" | "MAX" => format!("{fname} is not released: a single record decides it, so no noise small enough to be useful can hide that record; use QUANTILE(col, {}) for a robust {} or the declared bounds", if fname == "MIN" { "0.05" } else { "0.95" }, if fname == "MIN" { "low end" } else { "high end" }),
        "ROUND" => "ROUND applies to an aggregate of the SELECT list, e.g. ROUND(AVG(traffickMonths), 1), and is applied by fedq query to the combined noisy value; per-row rounding is not supported".to_string(),
        "VAR_POP" | "STDDEV_POP" | "VARIANCE_POP" => format!("{fname} is not supported; use {}, the sample statistic (the difference is negligible at the counts fedq releases)", if fname.starts_with("STDDEV") { "STDDEV" } else { "VARIANCE" }),
        "MODE" => "MODE is not supported; ask SELECT col, COUNT(*) ... GROUP BY col ORDER BY COUNT(*) DESC LIMIT 1".to_string(),
        _ => format!("{fname} is not an aggregate fedq releases; use {}", supported()),
    })
}

/// The number after the column (a quantile, a number of bins), if it is
/// a plain number literal.
pub(crate) fn second_number(call: &Call<'_>) -> Option<f64> {
    call.second.and_then(number_literal)
}
