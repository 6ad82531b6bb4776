//! Hostile input never panics the node and never costs budget.
//!
//! Property tests (proptest) over the four kinds of input a node takes from
//! outside: SQL (random text, token soups, deep nesting, and byte-level
//! mutations of valid queries), whole `Query` requests over real mutual-TLS
//! gRPC, `node.toml` text, and CSV files for ingest. Each property states
//! what must always hold: no panic, and either a clear error or a valid
//! answer; refusals spend nothing; a failed ingest stores nothing.
//!
//! Seeds are random on each run (proptest's default); a failure prints the
//! shrunk input. `PROPTEST_CASES` overrides the case counts.
//!
//! Four properties here first found real bugs (a stack overflow from an
//! 8 KiB query, GROUP BY cells undercounted against `max_cells`, epsilons
//! so small that the accuracy became infinite, and the coordinator
//! overflowing on such scales); they now guard the fixes.

use std::cell::{Cell, RefCell};
use std::time::Duration;

use fedq_engine::synth::{self, Partner};
use fedq_ledger::ledger::{from_nano, to_nano_ceil};
use fedq_node::config::NodeConfig;
use fedq_pki::Role;
use fedq_plan::plan::{plan, Plan};
use fedq_plan::schema::{ColumnSpec, ColumnType, Schema};
use fedq_proto::v1::{BudgetRequest, QueryRequest, QueryResponse};
use fedq_tests::{roomy_budget, TestFederation};
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{Config, TestRunner};
use tonic::Code;

/// The node's default `[limits]`, which the end-to-end node runs with.
fn limits() -> fedq_node::config::Limits {
    fedq_node::config::Limits::default()
}

/// The synthetic CTDC schema every test node serves as dataset `cases`.
fn schema() -> Schema {
    Schema::from_specs("cases", &synth::ctdc_columns()).expect("the CTDC schema is valid")
}

/// Proptest settings: `cases` cases, no regression files written into the
/// source tree (a failure prints its shrunk input instead).
fn config(cases: u32) -> Config {
    Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(cases),
        failure_persistence: None,
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------
// SQL generators
// ---------------------------------------------------------------------------

/// SQL keywords, in and out of the supported subset.
const KEYWORDS: &[&str] = &[
    "SELECT",
    "FROM",
    "WHERE",
    "GROUP",
    "BY",
    "AND",
    "OR",
    "NOT",
    "IN",
    "BETWEEN",
    "IS",
    "NULL",
    "COUNT",
    "SUM",
    "AVG",
    "MIN",
    "MAX",
    "DISTINCT",
    "ALL",
    "AS",
    "JOIN",
    "ON",
    "UNION",
    "LIMIT",
    "OFFSET",
    "ORDER",
    "HAVING",
    "WITH",
    "VALUES",
    "INSERT",
    "DELETE",
    "DROP",
    "TABLE",
    "CASE",
    "WHEN",
    "THEN",
    "ELSE",
    "END",
    "CAST",
    "EXISTS",
    "ANY",
    "OVER",
    "FILTER",
    "ROLLUP",
    "CUBE",
    "TRUE",
    "FALSE",
    "LIKE",
    "INTERVAL",
    "DATE",
    "PARTITION",
    "WINDOW",
    "QUALIFY",
    "TOP",
];

/// Operators and punctuation.
const OPERATORS: &[&str] = &[
    "=", "<>", "!=", "<", "<=", ">", ">=", "(", ")", ",", "*", "+", "-", "/", "%", "||", ";", ".",
    "::", "@", "?", "$1", "--", "/*", "*/", "'", "\"", "`", "[", "]", "{", "}", "=>", "->", "&",
    "|", "^", "~", "!", "#",
];

/// Literals: in and out of the declared domains, at and past the integer
/// limits, odd strings.
fn literals(schema: &Schema) -> Vec<String> {
    let mut out: Vec<String> = [
        "0",
        "1",
        "-1",
        "2015",
        "120",
        "121",
        "-99",
        "9223372036854775807",
        "-9223372036854775808",
        "9223372036854775808",
        "99999999999999999999999",
        "1e308",
        "1e309",
        "0.5",
        "-0",
        "0x10",
        "NaN",
        "''",
        "'x''y'",
        "'é'",
        "'\u{0}'",
        "'(missing)'",
        "'-99'",
        "N'x'",
        "X'ff'",
        "E'\\n'",
        "$$x$$",
        "true",
        "false",
    ]
    .into_iter()
    .map(str::to_string)
    .collect();
    for c in &schema.columns {
        if let fedq_plan::schema::Column::Categorical { domain, .. } = c {
            out.extend(domain.iter().take(3).map(|d| format!("'{d}'")));
        }
    }
    out
}

/// Column names: declared, misspelt, qualified, quoted and unknown.
fn column_tokens(schema: &Schema) -> Vec<String> {
    let mut out: Vec<String> = schema
        .columns
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    out.extend(
        [
            "cases",
            "victims",
            "cases.gender",
            "x.y.z",
            "\"gender\"",
            "GENDER",
            "nope",
            "_",
            "é",
        ]
        .into_iter()
        .map(str::to_string),
    );
    out
}

/// Random Unicode text.
fn random_text() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..200).prop_map(|c| c.into_iter().collect())
}

/// Random bytes read as (lossy) UTF-8, biased towards SQL punctuation.
fn random_bytes_text() -> impl Strategy<Value = String> {
    prop::collection::vec(interesting_byte(), 0..200)
        .prop_map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// A byte: any, or one that means something to SQL, CSV or TOML.
fn interesting_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        2 => any::<u8>(),
        3 => select(b"'\"(),;*=<>!-+.[]{}# \n\r\t0123456789aZ_\\\x00\xff".to_vec()),
    ]
}

/// A soup of SQL keywords, column names, literals and operators.
fn token_soup() -> impl Strategy<Value = String> {
    let s = schema();
    let mut tokens: Vec<String> = KEYWORDS.iter().map(|k| k.to_string()).collect();
    tokens.extend(OPERATORS.iter().map(|o| o.to_string()));
    tokens.extend(literals(&s));
    tokens.extend(column_tokens(&s));
    let lead = prop_oneof![
        Just(String::new()),
        Just("SELECT COUNT(*) FROM cases ".to_string()),
        Just("SELECT ".to_string()),
        Just("SELECT COUNT(*) FROM cases WHERE ".to_string()),
        Just("SELECT gender, COUNT(*) FROM cases GROUP BY ".to_string()),
    ];
    (
        lead,
        prop::collection::vec(
            (select(tokens), select(vec![" ", " ", " ", "", "\n", "\t"])),
            0..40,
        ),
    )
        .prop_map(|(lead, parts)| {
            let mut sql = lead;
            for (t, sep) in parts {
                sql.push_str(&t);
                sql.push_str(sep);
            }
            sql
        })
}

/// A predicate on one declared column, valid or nearly so.
fn leaf_predicate() -> impl Strategy<Value = String> {
    select(synth::ctdc_columns()).prop_flat_map(|c: ColumnSpec| {
        let name = c.name.clone();
        let null_test = prop_oneof![
            Just(format!("{name} IS NULL")),
            Just(format!("{name} IS NOT NULL")),
        ];
        match c.kind {
            ColumnType::Categorical => {
                let domain = c.domain.unwrap_or_default();
                let n2 = name.clone();
                let n3 = name.clone();
                prop_oneof![
                    (select(domain.clone()), select(vec!["=", "<>", "!=", "<"]))
                        .prop_map(move |(v, op)| format!("{name} {op} '{v}'")),
                    (prop::collection::vec(select(domain), 1..4), any::<bool>()).prop_map(
                        move |(vs, neg)| {
                            let list: Vec<String> = vs.iter().map(|v| format!("'{v}'")).collect();
                            let not = if neg { "NOT " } else { "" };
                            format!("{n2} {not}IN ({})", list.join(", "))
                        }
                    ),
                    Just(format!("{n3} = 'not-in-domain'")),
                    null_test,
                ]
                .boxed()
            }
            ColumnType::Integer => {
                let (min, max) = (c.min.unwrap_or(0), c.max.unwrap_or(0));
                let value = prop_oneof![
                    4 => (min - 3)..=(max + 3),
                    1 => Just(i64::MIN),
                    1 => Just(i64::MAX),
                    1 => Just(i64::MIN + 1),
                    1 => Just(0i64),
                ];
                let n2 = name.clone();
                let n3 = name.clone();
                prop_oneof![
                    (
                        value.clone(),
                        select(vec!["=", "<>", "<", "<=", ">", ">="]),
                        any::<bool>()
                    )
                        .prop_map(move |(v, op, flip)| if flip {
                            format!("{v} {op} {name}")
                        } else {
                            format!("{name} {op} {v}")
                        }),
                    (value.clone(), value, any::<bool>()).prop_map(move |(a, b, neg)| {
                        let not = if neg { "NOT " } else { "" };
                        format!("{n2} {not}BETWEEN {a} AND {b}")
                    }),
                    Just(format!("{n3} IN (1, 2, 3)")),
                    null_test,
                ]
                .boxed()
            }
            ColumnType::Boolean => {
                let n2 = name.clone();
                prop_oneof![
                    (
                        select(vec!["0", "1", "true", "FALSE", "2"]),
                        select(vec!["=", "<>"])
                    )
                        .prop_map(move |(v, op)| format!("{name} {op} {v}")),
                    Just(format!("{n2} IN (0, 1)")),
                    null_test,
                ]
                .boxed()
            }
        }
    })
}

/// A WHERE condition: leaves under AND/OR/NOT and parentheses.
fn predicate() -> impl Strategy<Value = String> {
    leaf_predicate().prop_recursive(4, 16, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("{a} AND {b}")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} OR {b})")),
            inner.clone().prop_map(|a| format!("NOT ({a})")),
            inner.prop_map(|a| format!("({a})")),
        ]
    })
}

/// A query of the supported subset (mostly valid: a few literals and
/// aggregates are deliberately off).
fn structured_sql() -> impl Strategy<Value = String> {
    let cols = synth::ctdc_columns();
    let groupable: Vec<String> = cols
        .iter()
        .filter(|c| c.kind != ColumnType::Integer)
        .map(|c| c.name.clone())
        .collect();
    let all: Vec<String> = cols.iter().map(|c| c.name.clone()).collect();
    let integers: Vec<String> = cols
        .iter()
        .filter(|c| c.kind == ColumnType::Integer)
        .map(|c| c.name.clone())
        .collect();
    let aggregate = prop_oneof![
        3 => Just("COUNT(*)".to_string()),
        1 => select(all).prop_map(|c| format!("COUNT({c})")),
        2 => select(integers.clone()).prop_map(|c| format!("SUM({c})")),
        2 => select(integers).prop_map(|c| format!("AVG({c})")),
        1 => Just("SUM(gender)".to_string()),
        1 => Just("MAX(traffickMonths)".to_string()),
    ];
    (
        prop::collection::vec(select(groupable), 0..3),
        prop::collection::vec(aggregate, 1..4),
        prop::option::of(predicate()),
        any::<bool>(),
    )
        .prop_map(|(groups, aggs, filter, select_groups)| {
            let mut items: Vec<String> = if select_groups {
                groups.clone()
            } else {
                Vec::new()
            };
            items.extend(aggs);
            let mut sql = format!("SELECT {} FROM cases", items.join(", "));
            if let Some(f) = filter {
                sql.push_str(&format!(" WHERE {f}"));
            }
            if !groups.is_empty() {
                sql.push_str(&format!(" GROUP BY {}", groups.join(", ")));
            }
            sql
        })
}

/// One edit of a byte string.
#[derive(Debug, Clone)]
enum Edit {
    Insert(Index, u8),
    Delete(Index, usize),
    Replace(Index, u8),
    /// Copies a slice (start, length) to another place.
    Duplicate(Index, usize, Index),
    Truncate(Index),
    InsertToken(Index, &'static str),
}

fn edit() -> impl Strategy<Value = Edit> {
    let token = select(
        KEYWORDS
            .iter()
            .chain(OPERATORS)
            .copied()
            .collect::<Vec<&'static str>>(),
    );
    prop_oneof![
        3 => (any::<Index>(), interesting_byte()).prop_map(|(i, b)| Edit::Insert(i, b)),
        3 => (any::<Index>(), 1usize..8).prop_map(|(i, n)| Edit::Delete(i, n)),
        3 => (any::<Index>(), interesting_byte()).prop_map(|(i, b)| Edit::Replace(i, b)),
        1 => (any::<Index>(), 1usize..40, any::<Index>())
            .prop_map(|(i, n, j)| Edit::Duplicate(i, n, j)),
        1 => any::<Index>().prop_map(Edit::Truncate),
        2 => (any::<Index>(), token).prop_map(|(i, t)| Edit::InsertToken(i, t)),
    ]
}

/// Applies `edits` to `bytes`, in order.
fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let len = bytes.len();
        let at = |i: &Index| if len == 0 { 0 } else { i.index(len + 1) };
        match e {
            Edit::Insert(i, b) => bytes.insert(at(i), *b),
            Edit::Delete(i, n) if len > 0 => {
                let s = i.index(len);
                bytes.drain(s..(s + n).min(len));
            }
            Edit::Replace(i, b) if len > 0 => bytes[i.index(len)] = *b,
            Edit::Duplicate(i, n, j) if len > 0 => {
                let s = i.index(len);
                let piece = bytes[s..(s + n).min(len)].to_vec();
                let to = at(j);
                bytes.splice(to..to, piece);
            }
            Edit::Truncate(i) => bytes.truncate(at(i)),
            Edit::InsertToken(i, t) => {
                let to = at(i);
                bytes.splice(to..to, format!(" {t} ").into_bytes());
            }
            _ => {}
        }
    }
    bytes
}

/// A valid query with a few random edits.
fn mutated_sql() -> impl Strategy<Value = String> {
    (structured_sql(), prop::collection::vec(edit(), 1..6))
        .prop_map(|(sql, edits)| String::from_utf8_lossy(&apply(sql.into_bytes(), &edits)).into())
}

/// Deep nesting and long operator chains that fit the node's SQL size
/// limit: the parser's recursion limit does not bound left-deep chains.
fn deep_sql() -> impl Strategy<Value = String> {
    let max = limits().max_sql_bytes;
    (
        select(vec![
            (
                "SELECT COUNT(*) FROM cases WHERE ",
                "NOT ",
                "isForcedLabour = 1",
            ),
            (
                "SELECT COUNT(*) FROM cases WHERE ",
                "(",
                "isForcedLabour = 1",
            ),
            (
                "SELECT COUNT(*) FROM cases WHERE ",
                "isForcedLabour = 1 AND ",
                "isForcedLabour = 1",
            ),
            (
                "SELECT COUNT(*) FROM cases WHERE ",
                "traffickMonths = 1 OR ",
                "traffickMonths = 2",
            ),
            (
                "SELECT COUNT(*) FROM cases WHERE traffickMonths = ",
                "- ",
                "1",
            ),
            ("SELECT ", "1+", "1 FROM cases"),
            ("SELECT COUNT(*) FROM cases GROUP BY ", "gender+", "gender"),
            (
                "SELECT SUM(",
                "traffickMonths+",
                "traffickMonths) FROM cases",
            ),
            (
                "SELECT COUNT(*) FROM cases WHERE traffickMonths IN (",
                "1, ",
                "2)",
            ),
            ("SELECT ", "COUNT(*), ", "COUNT(*) FROM cases"),
        ]),
        0.0f64..=1.0,
    )
        .prop_map(move |((head, piece, tail), fill)| {
            let room = max.saturating_sub(head.len() + tail.len());
            let n = ((room / piece.len()) as f64 * fill) as usize;
            format!("{head}{}{tail}", piece.repeat(n))
        })
}

/// Any of the SQL generators.
fn any_sql() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => random_text(),
        1 => random_bytes_text(),
        3 => token_soup(),
        3 => structured_sql(),
        3 => mutated_sql(),
        1 => deep_sql(),
    ]
}

/// What must hold of every plan the planner accepts.
fn check_plan(p: &Plan, s: &Schema, max_cells: usize) -> Result<(), TestCaseError> {
    // The planner takes the dataset name as written; the node picks the
    // schema by that name first (`plan::dataset_of`).
    prop_assert!(!p.dataset.is_empty());
    prop_assert!(!p.outputs.is_empty());
    prop_assert!(!p.measurements.is_empty());
    prop_assert_eq!(p.group_by.len(), p.group_sizes.len());
    for (&g, &size) in p.group_by.iter().zip(&p.group_sizes) {
        match p.bucket(g) {
            // A CASE bucket: its labels are its domain.
            Some(b) => prop_assert_eq!(size, b.labels.len()),
            None => {
                prop_assert!(g < s.columns.len());
                prop_assert_eq!(Some(size), s.columns[g].group_size());
            }
        }
    }
    let mut sorted = p.group_by.clone();
    sorted.sort_unstable();
    sorted.dedup();
    prop_assert_eq!(sorted.len(), p.group_by.len(), "a GROUP BY column twice");
    for o in &p.outputs {
        prop_assert!(o.measurement < p.measurements.len());
        if let Some(c) = o.count_measurement {
            prop_assert!(c < p.measurements.len());
        }
        if let Some((lo, hi)) = o.bounds {
            prop_assert!(lo <= hi);
        }
    }
    for m in &p.measurements {
        prop_assert!(m.sensitivity() >= 1, "sensitivity {}", m.sensitivity());
        prop_assert!(!m.label(s).is_empty());
    }
    prop_assert!(p.cell_count() <= max_cells);
    prop_assert_eq!(
        fedq_plan::plan::cell_keys(p, s).len(),
        fedq_plan::plan::cell_count(p),
        "one key per released cell"
    );
    Ok(())
}

/// Stack of a tokio blocking thread, where the node plans queries.
const NODE_STACK: usize = 2 << 20;

/// Plans `sql` on a fresh thread with `stack` bytes of stack.
fn plan_on_stack(
    sql: String,
    max_cells: usize,
    stack: usize,
) -> Result<Plan, fedq_plan::plan::PlanError> {
    std::thread::Builder::new()
        .stack_size(stack)
        .spawn(move || plan(&sql, &schema(), max_cells))
        .expect("spawn a planning thread")
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// The GROUP BY columns of a query: any set of declared columns.
fn group_columns() -> impl Strategy<Value = Vec<String>> {
    let names: Vec<String> = synth::ctdc_columns()
        .iter()
        .filter(|c| c.kind != ColumnType::Integer)
        .map(|c| c.name.clone())
        .collect();
    prop::sample::subsequence(names.clone(), 0..=names.len())
}

proptest! {
    #![proptest_config(config(512))]

    /// Random, soupy, deep and mutated SQL: the planner answers a plan
    /// whose facts are consistent with the schema, or a non-empty error.
    ///
    /// Planned on a large stack: a debug build of `sqlparser` overflows the
    /// node's 2 MiB on some inputs of a few hundred bytes (see
    /// `sql_within_the_size_limit_fits_the_node_stack`); this property
    /// looks for everything else.
    #[test]
    fn planner_never_panics_and_answers_a_valid_plan_or_an_error(
        sql in any_sql(),
        max_cells in prop_oneof![3 => Just(limits().max_cells), 1 => 0usize..200, 1 => Just(usize::MAX)],
    ) {
        let s = schema();
        match plan_on_stack(sql.clone(), max_cells, 64 << 20) {
            Ok(p) => check_plan(&p, &s, max_cells)?,
            Err(e) => prop_assert!(!e.message().trim().is_empty(), "empty error for {:?}", sql),
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// The node releases one value per cell of the GROUP BY cross product,
    /// each column with its declared domain plus a `(missing)` key
    /// (`fedq_plan::plan::cell_count`), and `[limits] max_cells` is "the most cells
    /// one query may release".
    #[test]
        fn released_cells_respect_max_cells(
        groups in group_columns(),
        max_cells in prop_oneof![Just(limits().max_cells), 1usize..5000],
    ) {
        let sql = if groups.is_empty() {
            "SELECT COUNT(*) FROM cases".to_string()
        } else {
            format!("SELECT COUNT(*) FROM cases GROUP BY {}", groups.join(", "))
        };
        if let Ok(p) = plan(&sql, &schema(), max_cells) {
            prop_assert!(
                fedq_plan::plan::cell_count(&p) <= max_cells,
                "{} releases {} cells, above max_cells = {}",
                sql,
                fedq_plan::plan::cell_count(&p),
                max_cells
            );
        }
    }
}

/// SQL within the node's default size limit (8 KiB) must not overflow the
/// 2 MiB stack of the tokio blocking thread that plans it: an overflow
/// aborts the whole node process, so any analyst could stop any node.
///
/// The overflows are in recursive code over `sqlparser` 0.59's AST. Its
/// recursion limit (50) bounds nested `NOT`s and parentheses, but not
/// left-deep operator chains (`1+1+...`), whose depth grows with the length
/// of the SQL. In a release build, parsing, printing and dropping a chain
/// of 4,086 terms (8 KiB) fit in 2 MiB, but `Statement::clone` does not,
/// from about 1,926 terms (3,871 bytes): `plan.rs` clones the parsed
/// statement in `parse_select` (and the GROUP BY expressions in `plan`).
/// In a debug build (`cargo test`'s in-process nodes) parsing itself
/// overflows from 24 nested `NOT`s (147 bytes) or a 375-term chain.
#[test]
fn sql_within_the_size_limit_fits_the_node_stack() {
    let inputs = [
        // Release builds: 3,871 bytes, a left-deep chain of 1,926 additions.
        format!("SELECT {}1 FROM cases", "1+".repeat(1926)),
        // Debug builds: 147 bytes, 24 nested NOTs.
        format!(
            "SELECT COUNT(*) FROM cases WHERE {}isForcedLabour = 1",
            "NOT ".repeat(24)
        ),
    ];
    for sql in inputs {
        assert!(sql.len() <= limits().max_sql_bytes);
        let result = plan_on_stack(sql, limits().max_cells, NODE_STACK);
        assert!(result.is_err(), "not a valid query, so an error");
    }
}

// ---------------------------------------------------------------------------
// Whole query requests, end to end over mutual-TLS gRPC
// ---------------------------------------------------------------------------

/// Query ids: fresh ones, a small pool that repeats (replays and reuse),
/// and invalid ones (empty, too long, beyond the request size limit,
/// non-ASCII, spaces).
fn query_id() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => any::<u64>().prop_map(|n| format!("fuzz-{n:016x}")),
        2 => select(vec!["dup-a", "dup-b", "dup-c"]).prop_map(str::to_string),
        1 => Just(String::new()),
        1 => Just("q".repeat(128)),
        1 => Just("q".repeat(129)),
        1 => Just("q".repeat(70 * 1024)),
        1 => random_text(),
        1 => Just("id with spaces".to_string()),
        1 => Just("é-ü-中".to_string()),
    ]
}

/// Epsilons: the usual range, the per-query maximum and just past it, and
/// every awkward float.
fn epsilon() -> impl Strategy<Value = f64> {
    prop_oneof![
        8 => 0.001f64..2.0,
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => Just(0.0),
        1 => Just(-0.0),
        1 => Just(-1.0),
        1 => Just(f64::MIN_POSITIVE),
        1 => Just(5e-324),
        1 => Just(1e-300),
        1 => Just(1e-12),
        1 => Just(1e-9),
        1 => Just(roomy_budget().per_query_max),
        1 => Just(roomy_budget().per_query_max * (1.0 + 1e-12)),
        1 => Just(1e300),
        1 => Just(f64::MAX),
        1 => any::<f64>(),
    ]
}

/// SQL for the end-to-end node: every generator but [`deep_sql`], which
/// overflows the stack of the in-process debug-built node (see
/// `sql_within_the_size_limit_fits_the_node_stack`).
fn node_sql() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => random_text(),
        1 => random_bytes_text(),
        3 => token_soup(),
        4 => structured_sql(),
        3 => mutated_sql(),
    ]
}

/// Requests: half hostile in every field, half well-formed (a usable id,
/// an ordinary epsilon, a structured query) so that releases, replays and
/// budget refusals happen often too.
fn query_request() -> impl Strategy<Value = QueryRequest> {
    let hostile = (query_id(), node_sql(), epsilon(), prop::bool::weighted(0.2));
    let ordinary_id = prop_oneof![
        3 => any::<u64>().prop_map(|n| format!("fuzz-{n:016x}")),
        1 => select(vec!["dup-a", "dup-b", "dup-c"]).prop_map(str::to_string),
    ];
    let ordinary = (
        ordinary_id,
        structured_sql(),
        0.01f64..2.0,
        prop::bool::weighted(0.2),
    );
    prop_oneof![hostile, ordinary].prop_map(|(query_id, sql, epsilon, dry_run)| QueryRequest {
        query_id,
        sql,
        epsilon,
        dry_run,
        rho: 0.0,
    })
}

/// Status codes a node may answer a hostile query with. Anything else
/// (INTERNAL, UNKNOWN, UNAVAILABLE, CANCELLED, ...) is a node fault or a
/// dropped connection.
const EXPECTED_REFUSALS: &[Code] = &[
    Code::InvalidArgument,
    Code::NotFound,
    Code::ResourceExhausted,
    Code::AlreadyExists,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::PermissionDenied,
];

/// Whether the node must refuse `q` before planning: its fields alone are
/// invalid.
fn invalid_fields(q: &QueryRequest) -> bool {
    q.query_id.is_empty()
        || q.query_id.len() > 128
        || !q.query_id.chars().all(|c| c.is_ascii_graphic())
        || q.sql.len() > limits().max_sql_bytes
        || !(q.epsilon.is_finite() && q.epsilon > 0.0)
        || q.epsilon > roomy_budget().per_query_max
}

/// What must hold of an answer the node gave.
fn check_answer(q: &QueryRequest, r: &QueryResponse) -> Result<(), TestCaseError> {
    prop_assert!(!invalid_fields(q), "the node answered invalid fields");
    let p = plan(&q.sql, &schema(), limits().max_cells);
    let p = match p {
        Ok(p) => p,
        Err(e) => {
            return Err(TestCaseError::fail(format!(
                "answered a query the planner refuses: {e}"
            )))
        }
    };
    prop_assert_eq!(&r.query_id, &q.query_id);
    prop_assert_eq!(r.cells.len(), fedq_plan::plan::cell_count(&p));
    prop_assert_eq!(r.measurements.len(), p.measurements.len());
    prop_assert_eq!(r.outputs.len(), p.outputs.len());
    prop_assert_eq!(r.dry_run, q.dry_run);
    prop_assert!(r.budget.is_some());
    let mut total = 0.0;
    for m in &r.measurements {
        prop_assert!(m.scale.is_finite() && m.scale > 0.0, "scale {}", m.scale);
        // Infinite for absurdly small epsilons: a known bug, kept visible by
        // `accepted_epsilons_have_a_finite_accuracy`.
        prop_assert!(m.ci95_half_width >= 0.0, "half-width {}", m.ci95_half_width);
        prop_assert!(m.epsilon > 0.0);
        total += m.epsilon;
        if q.dry_run {
            prop_assert!(m.values.is_empty(), "a dry run released values");
        } else {
            prop_assert_eq!(m.values.len(), r.cells.len());
        }
    }
    prop_assert!((total - q.epsilon).abs() <= 1e-9 * q.epsilon.max(1.0));
    Ok(())
}

/// Random and hostile `Query` requests against a real node: it answers
/// every one (OK or a status from [`EXPECTED_REFUSALS`]), answers only
/// valid queries, spends exactly the epsilons of the answers it released,
/// and still answers a valid query afterwards.
#[test]
fn hostile_query_requests_get_an_answer_or_a_clear_status_and_spend_only_on_releases() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let fed = rt.block_on(TestFederation::start(
        &[(Partner::Ngo, 300, 1)],
        roomy_budget(),
    ));
    let client = rt.block_on(fed.raw_client(0, Role::Analyst, "fuzz"));
    let spent_nano = Cell::new(0u64);
    let released = RefCell::new(Vec::<(String, QueryRequest)>::new());
    // What the node answered, for the summary printed at the end.
    let tally = RefCell::new(std::collections::BTreeMap::<String, u32>::new());
    let mut runner = TestRunner::new(config(128));
    let outcome = runner.run(&query_request(), |q| {
        let mut c = client.clone();
        let answer = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), c.query(q.clone())).await
        });
        let answer = match answer {
            Ok(a) => a,
            Err(_) => return Err(TestCaseError::fail("no answer within 60 s")),
        };
        match answer {
            Ok(r) => {
                let r = r.into_inner();
                check_answer(&q, &r)?;
                let earlier = released
                    .borrow()
                    .iter()
                    .any(|(id, e)| *id == q.query_id && e == &q);
                prop_assert_eq!(r.replayed, earlier, "replayed iff released before");
                let kind = if q.dry_run {
                    "dry run"
                } else if r.replayed {
                    "replayed"
                } else {
                    "released"
                };
                *tally.borrow_mut().entry(kind.into()).or_default() += 1;
                if !q.dry_run && !r.replayed {
                    spent_nano.set(spent_nano.get() + to_nano_ceil(q.epsilon));
                    released.borrow_mut().push((q.query_id.clone(), q.clone()));
                    // A retry replays the same release and spends nothing.
                    let again = rt.block_on(c.query(q.clone()));
                    let again = match again {
                        Ok(a) => a.into_inner(),
                        Err(s) => {
                            return Err(TestCaseError::fail(format!("a retry failed: {s:?}")))
                        }
                    };
                    prop_assert!(again.replayed, "a retry was not replayed");
                    prop_assert_eq!(&again.measurements, &r.measurements);
                }
            }
            Err(s) => {
                prop_assert!(
                    EXPECTED_REFUSALS.contains(&s.code()),
                    "unexpected status {:?}: {}",
                    s.code(),
                    s.message()
                );
                prop_assert!(!s.message().is_empty(), "a status without a message");
                *tally
                    .borrow_mut()
                    .entry(format!("{:?}", s.code()))
                    .or_default() += 1;
            }
        }
        Ok(())
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
    println!("answers: {:?}", tally.borrow());

    let budget = rt
        .block_on(client.clone().budget(BudgetRequest {}))
        .expect("the node answers Budget after the run")
        .into_inner();
    let cases = budget
        .budgets
        .iter()
        .find(|b| b.dataset == "cases")
        .expect("budget of cases");
    let expected = from_nano(spent_nano.get());
    assert!(
        (cases.spent_by_analyst - expected).abs() < 1e-9,
        "spent {} but released answers account for {expected}",
        cases.spent_by_analyst
    );

    // Still serving: a valid query from another analyst gets an answer.
    let mut other = rt.block_on(fed.raw_client(0, Role::Analyst, "after-fuzz"));
    let r = rt
        .block_on(
            other.query(QueryRequest {
                query_id: "after-fuzz-1".into(),
                sql: "SELECT gender, COUNT(*) FROM cases WHERE isForcedLabour = 1 GROUP BY gender"
                    .into(),
                epsilon: 0.5,
                dry_run: false,
                rho: 0.0,
            }),
        )
        .expect("the node still answers a valid query")
        .into_inner();
    assert_eq!(r.measurements[0].values.len(), r.cells.len());
    drop(fed);
}

/// Every epsilon the node accepts gives an answer whose reported accuracy
/// (noise variance, 95% half-width) is a finite number. The node fixes the
/// scale with `mechanism::discrete_laplace_scale` and answers when it
/// succeeds, so this checks the same functions on the same inputs.
#[test]
fn accepted_epsilons_have_a_finite_accuracy() {
    use fedq_dp::mechanism::{
        discrete_laplace_half_width, discrete_laplace_scale, discrete_laplace_variance, CI_ALPHA,
    };
    let mut runner = TestRunner::new(config(256));
    let sensitivity = prop_oneof![Just(1i64), Just(120), 1i64..=(1 << 40)];
    let outcome = runner.run(&(sensitivity, epsilon()), |(sensitivity, epsilon)| {
        // The node refuses epsilons above the per-query maximum, and below
        // its minimum, before it computes any scale.
        if epsilon > roomy_budget().per_query_max || epsilon < fedq_node::service::MIN_EPSILON {
            return Ok(());
        }
        if let Ok(scale) = discrete_laplace_scale(sensitivity, epsilon) {
            let variance = discrete_laplace_variance(scale);
            let half = discrete_laplace_half_width(scale, CI_ALPHA);
            prop_assert!(
                variance.is_finite(),
                "epsilon {epsilon}, sensitivity {sensitivity}: scale {scale}, variance {variance}"
            );
            prop_assert!(
                matches!(half, Ok(h) if h.is_finite()),
                "epsilon {epsilon}, sensitivity {sensitivity}: scale {scale}, half-width {half:?}"
            );
        }
        Ok(())
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

/// The coordinator combines the noise of several nodes from the scales
/// they report; it must not panic on any scale a node can report.
#[test]
fn coordinator_combines_every_scale_a_node_reports() {
    use fedq_dp::mechanism::discrete_laplace_scale;
    let mut runner = TestRunner::new(config(128));
    let outcome = runner.run(
        &(prop::collection::vec(epsilon(), 2..4), Just(1i64)),
        |(epsilons, sensitivity)| {
            let scales: Vec<f64> = epsilons
                .iter()
                .filter_map(|&e| discrete_laplace_scale(sensitivity, e).ok())
                .collect();
            let w = std::panic::catch_unwind(|| fedq::combine::sum_half_width(&scales, 0.05));
            prop_assert!(w.is_ok(), "sum_half_width panicked on scales {:?}", scales);
            Ok(())
        },
    );
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------
// node.toml
// ---------------------------------------------------------------------------

/// The fully commented example config.
const EXAMPLE_CONFIG: &str = include_str!("../../../deploy/node.example.toml");

/// Values that stress TOML types and the config's own checks.
const HOSTILE_VALUES: &[&str] = &[
    "-1",
    "0",
    "nan",
    "inf",
    "-inf",
    "1e309",
    "-0.0",
    "5e-324",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "1099511627776",
    "1099511627777",
    "\"\"",
    "\" \"",
    "\"../../etc/passwd\"",
    "\"0.0.0.0:99999\"",
    "\"[::1]:0\"",
    "\"-99\"",
    "[]",
    "[\"\"]",
    "[\"-99\", \"-99\"]",
    "{}",
    "true",
    "\"categorical\"",
    "\"integer\"",
    "\"boolean\"",
    "\"float\"",
    "1979-05-27T07:32:00Z",
    "\"\\u0000\"",
    "'''multi\nline'''",
];

/// One edit of a TOML file, by line or by byte.
#[derive(Debug, Clone)]
enum TomlEdit {
    /// Replaces the value of the `key = value` line at the index.
    Value(Index, &'static str),
    DeleteLine(Index),
    DuplicateLine(Index, Index),
    Bytes(Edit),
}

fn toml_edit() -> impl Strategy<Value = TomlEdit> {
    prop_oneof![
        4 => (any::<Index>(), select(HOSTILE_VALUES.to_vec())).prop_map(|(i, v)| TomlEdit::Value(i, v)),
        2 => any::<Index>().prop_map(TomlEdit::DeleteLine),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(i, j)| TomlEdit::DuplicateLine(i, j)),
        1 => edit().prop_map(TomlEdit::Bytes),
    ]
}

fn apply_toml(text: &str, edits: &[TomlEdit]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for e in edits {
        if lines.is_empty() {
            break;
        }
        match e {
            TomlEdit::Value(i, v) => {
                let assignments: Vec<usize> = (0..lines.len())
                    .filter(|&n| !lines[n].starts_with('#') && lines[n].contains(" = "))
                    .collect();
                if let Some(&n) = assignments.get(i.index(assignments.len().max(1))) {
                    let key = lines[n].split(" = ").next().unwrap_or("").to_string();
                    lines[n] = format!("{key} = {v}");
                }
            }
            TomlEdit::DeleteLine(i) => {
                lines.remove(i.index(lines.len()));
            }
            TomlEdit::DuplicateLine(i, j) => {
                let l = lines[i.index(lines.len())].clone();
                lines.insert(j.index(lines.len() + 1), l);
            }
            TomlEdit::Bytes(b) => {
                let joined = lines.join("\n");
                let bytes = apply(joined.into_bytes(), std::slice::from_ref(b));
                lines = String::from_utf8_lossy(&bytes)
                    .lines()
                    .map(str::to_string)
                    .collect();
            }
        }
    }
    lines.join("\n")
}

/// Parses and validates a config as `NodeConfig::load` does, and on
/// success checks that every dataset it accepts has a usable schema.
fn parse_config(text: &str) -> Result<(), TestCaseError> {
    if let Ok(cfg) = toml::from_str::<NodeConfig>(text) {
        if cfg.validate().is_ok() {
            for d in &cfg.datasets {
                prop_assert!(d.budget.per_query_max.is_finite() && d.budget.per_query_max > 0.0);
                match Schema::from_specs(&d.name, &d.columns) {
                    Ok(s) => {
                        // A name such as `select` does not parse: only no panic.
                        let sql = format!("SELECT COUNT(*) FROM {}", d.name);
                        let _ = plan(&sql, &s, cfg.limits.max_cells);
                    }
                    Err(e) => {
                        return Err(TestCaseError::fail(format!(
                            "validate() accepted a bad schema: {e}"
                        )))
                    }
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    /// Mutations of the example `node.toml` parse and validate without
    /// panicking; whatever validates has usable schemas and budgets.
    #[test]
    fn mutated_node_configs_never_panic(edits in prop::collection::vec(toml_edit(), 1..8)) {
        parse_config(&apply_toml(EXAMPLE_CONFIG, &edits))?;
    }

    /// Random text as `node.toml` never panics the parser or the checks.
    #[test]
    fn random_node_configs_never_panic(text in prop_oneof![random_text(), random_bytes_text()]) {
        parse_config(&text)?;
    }
}

// ---------------------------------------------------------------------------
// CSV ingest
// ---------------------------------------------------------------------------

/// Cell values that stress the encoders.
const HOSTILE_CELLS: &[&str] = &[
    "",
    "-99",
    "-0",
    "+5",
    " 5 ",
    "1e3",
    "0x10",
    "2015.0",
    "999999999999999",
    "9999999999999999",
    "9223372036854775807",
    "-9223372036854775808",
    "99999999999999999999",
    "-",
    "NaN",
    "true",
    "TRUE",
    "yes",
    "2",
    "Female ",
    " Female",
    "female",
    "é",
    "\"quoted, with comma\"",
    "(missing)",
    "\u{0}",
];

/// One edit of a CSV file: of a cell, a line, or its bytes.
#[derive(Debug, Clone)]
enum CsvEdit {
    /// Replaces field `field` of line `line` (header included) with a value.
    Cell(Index, Index, &'static str),
    DeleteLine(Index),
    DuplicateLine(Index, Index),
    /// Appends or drops a field on a line.
    ExtraField(Index),
    DropField(Index),
    Bytes(Edit),
}

fn csv_edit() -> impl Strategy<Value = CsvEdit> {
    prop_oneof![
        5 => (any::<Index>(), any::<Index>(), select(HOSTILE_CELLS.to_vec()))
            .prop_map(|(l, f, v)| CsvEdit::Cell(l, f, v)),
        1 => any::<Index>().prop_map(CsvEdit::DeleteLine),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(i, j)| CsvEdit::DuplicateLine(i, j)),
        1 => any::<Index>().prop_map(CsvEdit::ExtraField),
        1 => any::<Index>().prop_map(CsvEdit::DropField),
        3 => edit().prop_map(CsvEdit::Bytes),
    ]
}

/// Applies `edits` to CSV bytes. Cell and line edits treat the file as
/// simple comma-separated lines (the synthetic CSV quotes nothing).
fn apply_csv(bytes: Vec<u8>, edits: &[CsvEdit]) -> Vec<u8> {
    let mut bytes = bytes;
    for e in edits {
        if let CsvEdit::Bytes(b) = e {
            bytes = apply(bytes, std::slice::from_ref(b));
            continue;
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.is_empty() {
            continue;
        }
        let n = lines.len();
        match e {
            CsvEdit::Cell(l, f, v) => {
                let line = &mut lines[l.index(n)];
                let mut fields: Vec<String> = line.split(',').map(str::to_string).collect();
                let k = f.index(fields.len());
                fields[k] = (*v).to_string();
                *line = fields.join(",");
            }
            CsvEdit::DeleteLine(i) => {
                lines.remove(i.index(n));
            }
            CsvEdit::DuplicateLine(i, j) => {
                let l = lines[i.index(n)].clone();
                lines.insert(j.index(n + 1), l);
            }
            CsvEdit::ExtraField(i) => lines[i.index(n)].push_str(",1"),
            CsvEdit::DropField(i) => {
                let line = &mut lines[i.index(n)];
                if let Some(p) = line.rfind(',') {
                    line.truncate(p);
                }
            }
            CsvEdit::Bytes(_) => {}
        }
        bytes = (lines.join("\n") + "\n").into_bytes();
    }
    bytes
}

fn synthetic_csv() -> impl Strategy<Value = Vec<u8>> {
    (select(Partner::ALL.to_vec()), 0usize..25, any::<u64>()).prop_map(|(p, rows, seed)| {
        let mut out = Vec::new();
        synth::write_csv(p, rows, seed, &mut out).expect("write synthetic CSV");
        out
    })
}

proptest! {
    #![proptest_config(config(128))]

    /// Mutated CSV files: ingest never panics; it stores every row or, on
    /// an error, nothing at all; what it stores loads back.
    #[test]
    fn mutated_csv_ingest_is_all_or_nothing(
        csv in synthetic_csv(),
        edits in prop::collection::vec(csv_edit(), 0..6),
    ) {
        let bytes = apply_csv(csv, &edits);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cases.csv");
        std::fs::write(&path, &bytes).expect("write CSV");
        let store = fedq_ledger::store::Store::open(&dir.path().join("store")).expect("open store");
        let s = schema();
        match fedq_node::ingest::ingest_csv(&store, "cases", &s, &path, false) {
            Ok(report) => {
                prop_assert_eq!(report.rows_added, report.rows_total);
                let t = store.load_table("cases", &s);
                prop_assert!(t.is_ok(), "stored rows do not load: {:?}", t.err());
            }
            Err(e) => {
                prop_assert!(!e.to_string().is_empty());
                let digest = store.schema_digest("cases").expect("read the store");
                prop_assert!(digest.is_none(), "a failed ingest stored rows: {}", e);
            }
        }
    }
}
