//! The query text to one plain `SELECT ... FROM dataset [WHERE]
//! [GROUP BY]`, refusing anything else by name, with the limits that keep
//! parsing and every later walk of the tree shallow whatever a hostile
//! query sends.

use super::error::{invalid, too_large, unsupported, PlanError};
use super::joins::{public_joins, WrittenJoin};
use sqlparser::ast::{Expr, ObjectNamePart, SetExpr, Statement, TableFactor, UnaryOperator, Value};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;

/// A query parsed once and checked to be within the supported SELECT
/// subset, not yet validated against a schema.
pub struct Parsed {
    pub(crate) select: Box<sqlparser::ast::Select>,
    /// Joins (their JOIN clauses taken out of `select`), resolved against
    /// the schema's public lookup tables by [`plan_parsed`].
    pub(crate) joins: Vec<WrittenJoin>,
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

/// A plain (possibly negative) number literal.
pub(crate) fn number_literal(e: &Expr) -> Option<f64> {
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
pub(crate) fn nesting_depth(root: &Expr) -> usize {
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

pub(crate) fn parse_select(sql: &str) -> Result<Box<sqlparser::ast::Select>, PlanError> {
    use sqlparser::tokenizer::{Token, Tokenizer};
    let dialect = GenericDialect {};
    // Tokenized once: the tokens are counted, then parsed.
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize_with_location()
        .map_err(|e| PlanError::syntax(format!("SQL syntax error: {e}")))?;
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
        return too_large(format!(
            "the query has {operators} operators and parentheses, more than {MAX_OPERATORS}; use col IN (...) for long lists of alternatives"
        ));
    }
    let mut statements = Parser::new(&dialect)
        .with_recursion_limit(MAX_NESTING)
        .with_tokens_with_locations(tokens)
        .parse_statements()
        .map_err(|e| PlanError::syntax(format!("SQL syntax error: {e}")))?;
    let statement = match statements.len() {
        1 => statements.remove(0),
        0 => return invalid("the query is empty; expected SELECT ... FROM dataset"),
        _ => return unsupported("send one SELECT statement per query"),
    };
    let Statement::Query(query) = statement else {
        return unsupported("only SELECT queries are supported");
    };
    if query.with.is_some() {
        return unsupported("WITH (common table expressions) is not supported");
    }
    if query.order_by.is_some() {
        return unsupported("ORDER BY is applied by fedq query to the combined answers, not by a node: every cell of the declared domain is released; send the query through fedq query (or the coordinator library's fedq::post)");
    }
    if query.limit_clause.is_some() || query.fetch.is_some() {
        return unsupported("LIMIT is applied by fedq query to the combined answers, not by a node: every cell of the declared domain is released; send the query through fedq query (or the coordinator library's fedq::post)");
    }
    if !query.locks.is_empty()
        || query.for_clause.is_some()
        || query.settings.is_some()
        || query.format_clause.is_some()
        || !query.pipe_operators.is_empty()
    {
        return unsupported(
            "only a plain SELECT ... FROM ... [WHERE ...] [GROUP BY ...] is supported",
        );
    }
    let SetExpr::Select(select) = *query.body else {
        return unsupported("UNION, INTERSECT, EXCEPT, VALUES and subqueries are not released by a node; a UNION ALL of aggregate queries over one dataset is asked by fedq query (or the coordinator library's fedq::compose), part by part or as one query grouped by part");
    };
    if select.distinct.is_some() {
        return unsupported("SELECT DISTINCT is not supported");
    }
    if select.top.is_some() || select.into.is_some() {
        return unsupported("TOP and INTO are not supported");
    }
    if select.having.is_some() {
        return unsupported(
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
        return unsupported(
            "only a plain SELECT ... FROM ... [WHERE ...] [GROUP BY ...] is supported",
        );
    }
    Ok(select)
}

pub(crate) fn table_name(from: &[sqlparser::ast::TableWithJoins]) -> Result<String, PlanError> {
    let [table] = from else {
        return if from.is_empty() {
            unsupported("the query needs FROM <dataset>")
        } else {
            unsupported("joins and several tables are not supported: query one dataset")
        };
    };
    if !table.joins.is_empty() {
        return unsupported("JOIN is not supported: query one dataset");
    }
    match &table.relation {
        TableFactor::Table {
            name, args: None, ..
        } => match name.0.as_slice() {
            [ObjectNamePart::Identifier(id)] => Ok(id.value.clone()),
            _ => unsupported(format!(
                "FROM {name}: name the dataset without a schema prefix"
            )),
        },
        TableFactor::Derived { .. } => {
            unsupported("subqueries are not supported: query one dataset")
        }
        other => unsupported(format!("FROM {other}: only a dataset name is supported")),
    }
}

pub(crate) fn column_name(e: &Expr) -> Option<String> {
    match e {
        Expr::Identifier(id) => Some(id.value.clone()),
        Expr::CompoundIdentifier(parts) if parts.len() == 2 => Some(parts[1].value.clone()),
        Expr::Nested(inner) => column_name(inner),
        _ => None,
    }
}

/// `'-99'`, `-99` or `''`: the source files' spelling of a missing value.
pub(crate) fn is_missing_marker(e: &Expr) -> bool {
    match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(t) => t.trim() == "-99" || t.trim().is_empty(),
            _ => false,
        },
        _ => number_literal(e) == Some(-99.0),
    }
}
