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
    let e = plan(sql, &schema(), 10_000).unwrap_err().to_string();
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
        "SELECT COUNT(*) FROM cases GROUP BY traffickMonths > 12",
        "BIN(column, k)",
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
    assert!(e.message().contains("16 cells"), "{e}");
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
    // Every name of every registered aggregate is in the help text.
    for agg in super::aggregate::AGGREGATES {
        for name in agg.names {
            assert!(
                SQL_SUBSET.contains(name),
                "{name} is registered but not in SQL_SUBSET"
            );
        }
    }
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
        "BIN",
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
            // Per-row keys.
            format!("SELECT COUNT(*) FROM cases GROUP BY {f}(traffickMonths, 12)"),
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
        let e = plan(sql, &s, 10_000).unwrap_err().to_string();
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
    assert!(
        e.message().contains("its position in the SELECT list"),
        "{e}"
    );
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
    assert!(e.message().contains("BIN(amount, k)"), "{e}");
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
        assert!(matches!(
            p.buckets[0].rule,
            KeyRule::Case {
                otherwise: None,
                ..
            }
        ));
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
    assert!(matches!(
        p.buckets[0].rule,
        KeyRule::Case {
            otherwise: Some(1),
            ..
        }
    ));
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
        let e = plan(sql, &s, 10_000).unwrap_err().to_string();
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
        let e = plan(sql, &s, 10_000).unwrap_err().to_string();
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
        let e = plan(sql, &s, 10_000).unwrap_err().to_string();
        assert!(e.contains(says), "{sql}: {e}");
    }
    let e = plan("SELECT COUNT(*) FROM cases WHERE xyz = 1", &s, 10_000)
        .unwrap_err()
        .to_string();
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
        let e = plan(sql, &s, 10_000).unwrap_err().to_string();
        assert!(e.contains("count or a share of the rows"), "{sql}: {e}");
    }
    let e = plan(
        "SELECT SUM(traffickMonths) FILTER (WHERE isForcedLabour = 1) FROM cases",
        &s,
        10_000,
    )
    .unwrap_err()
    .to_string();
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
        let e = plan(sql, &s, 10_000).unwrap_err().to_string();
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
            "SELECT COALESCE(citizenship, 'XX', 'YY'), COUNT(*) FROM cases GROUP BY 1",
            "COALESCE(column, 'label')",
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
        let e = plan(sql, &s, 10_000).unwrap_err().to_string();
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
        let e = plan(sql, &s, 10_000).unwrap_err().to_string();
        assert!(e.contains(says), "{sql}: {e}");
    }
}

/// The README's section on the SQL fedq answers states the same list.
#[test]
fn the_readme_states_the_sql_subset() {
    let readme = include_str!("../../../../README.md");
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

#[test]
fn refusals_have_a_kind_callers_can_match() {
    let s = schema();
    let kind = |sql: &str| plan(sql, &s, 10_000).unwrap_err().kind();
    assert_eq!(kind("SELEC COUNT(*) FROM cases"), PlanErrorKind::Syntax);
    assert_eq!(
        kind("SELECT MIN(traffickMonths) FROM cases"),
        PlanErrorKind::Unsupported
    );
    assert_eq!(
        kind("SELECT COUNT(*) FROM cases WHERE nope = 1"),
        PlanErrorKind::UnknownName
    );
    assert_eq!(
        kind("SELECT QUANTILE(traffickMonths, 2) FROM cases"),
        PlanErrorKind::Invalid
    );
    assert_eq!(
        plan(
            "SELECT COUNT(*) FROM cases GROUP BY gender, ageBroad",
            &s,
            4
        )
        .unwrap_err()
        .kind(),
        PlanErrorKind::TooLarge
    );
    // The kind survives the context an aggregate adds to its condition's
    // refusal.
    let e = plan(
        "SELECT COUNT(*) FILTER (WHERE nope = 1) FROM cases",
        &s,
        10_000,
    )
    .unwrap_err();
    assert_eq!(e.kind(), PlanErrorKind::UnknownName);
    assert!(e.message().starts_with("COUNT(*) FILTER"), "{e}");
}

/// A per-row number is a GROUP BY key: one key per value of its bounds,
/// derived from the declared bounds by interval arithmetic, every key
/// returned (plus (missing)); grouped by the expression, its alias or its
/// position; refused past the key limit saying what to write instead.
#[test]
fn arithmetic_keys_have_one_key_per_value_of_their_derived_bounds() {
    let s = schema();
    let e = "traffickMonths / 12";
    for group in [e, "years", "1"] {
        let p = plan(
            &format!("SELECT {e} AS years, COUNT(*) FROM cases GROUP BY {group}"),
            &s,
            10_000,
        )
        .unwrap();
        assert_eq!(p.group_names(&s), ["years"]);
        // traffickMonths is declared 0 to 120: years 0 to 10.
        assert_eq!(p.group_sizes, [11]);
        let keys = cell_keys(&p, &s);
        let want: Vec<Vec<String>> = (0..=10)
            .map(|v| vec![v.to_string()])
            .chain([vec![MISSING_KEY.to_string()]])
            .collect();
        assert_eq!(keys, want);
        let KeyRule::Number(k) = &p.buckets[0].rule else {
            panic!("{:?}", p.buckets[0].rule)
        };
        assert_eq!((k.min, k.max, k.bins), (0, 10, None));
        assert_eq!(k.key(0), 0);
        assert_eq!(k.key(10), 10);
        assert!(p.measurements.iter().all(|m| m.sensitivity() == 1));
    }
    // Bounds by interval arithmetic: 2002..2025 minus 2000 is 2..25.
    let p = plan(
        "SELECT yearOfRegistration - 2000, gender, COUNT(*) FROM cases GROUP BY 1, gender",
        &s,
        10_000,
    )
    .unwrap();
    assert_eq!(p.group_sizes, [24, 3]);
    assert_eq!(p.buckets[0].labels.first().map(String::as_str), Some("2"));
    assert_eq!(p.buckets[0].labels.last().map(String::as_str), Some("25"));
    assert_eq!(p.buckets[0].name, "yearOfRegistration - 2000");
    // A negated, multiplied, coalesced number: -(0..120) * 2 is -240..0;
    // COALESCE(traffickMonths, -1) is -1..120.
    let p = plan(
        "SELECT -traffickMonths * 2 AS m, COUNT(*) FROM cases GROUP BY m",
        &s,
        10_000,
    )
    .unwrap();
    assert_eq!(p.group_sizes, [241]);
    assert_eq!(p.buckets[0].labels[0], "-240");
    let p = plan(
        "SELECT COALESCE(traffickMonths, -1) AS m, COUNT(*) FROM cases GROUP BY m",
        &s,
        10_000,
    )
    .unwrap();
    assert_eq!(p.group_sizes, [122]);
    assert_eq!(p.buckets[0].labels[0], "-1");
    // A flag sum: 0, 1 or 2.
    let p = plan(
        "SELECT COUNT(*) FROM cases GROUP BY isForcedLabour + isForcedLabour",
        &s,
        10_000,
    )
    .unwrap();
    assert_eq!(p.buckets[0].labels, ["0", "1", "2"]);

    let kind = |sql: &str| {
        let e = plan(sql, &s, 10_000).unwrap_err();
        (e.kind(), e.to_string())
    };
    // 0..120 times 10 is 1,201 keys: past the limit, with the way out.
    let (k, e) = kind("SELECT COUNT(*) FROM cases GROUP BY traffickMonths * 10");
    assert_eq!(k, PlanErrorKind::TooLarge, "{e}");
    assert!(
        e.contains("1201 values (0 to 1200") && e.contains("BIN(traffickMonths * 10, k)"),
        "{e}"
    );
    let (k, e) = kind("SELECT COUNT(*) FROM cases GROUP BY traffickMonths / 12.0");
    assert_eq!(k, PlanErrorKind::Unsupported, "{e}");
    assert!(e.contains("whole number"), "{e}");
    let (k, e) = kind("SELECT COUNT(*) FROM cases GROUP BY traffickMonths / 0");
    assert_eq!(k, PlanErrorKind::Unsupported, "{e}");
    let (k, e) = kind("SELECT COUNT(*) FROM cases GROUP BY gender + 1");
    assert_eq!(k, PlanErrorKind::Unbounded, "{e}");
    assert!(e.contains("gender"), "{e}");
    let (k, e) = kind("SELECT COUNT(*) FROM cases GROUP BY nope - 1");
    assert_eq!(k, PlanErrorKind::UnknownName, "{e}");
    let (k, e) = kind("SELECT traffickMonths / 12, COUNT(*) FROM cases");
    assert_eq!(k, PlanErrorKind::Unsupported, "{e}");
    assert!(e.contains("not grouped by"), "{e}");
    let (k, _) =
        kind("SELECT COUNT(*) FROM cases GROUP BY traffickMonths / 12, traffickMonths / 12");
    assert_eq!(k, PlanErrorKind::Unsupported);
    // Cells: (10 + 1 keys + missing) x (3 + missing) over a limit of 40.
    let e = plan(
        "SELECT COUNT(*) FROM cases GROUP BY traffickMonths / 12, gender",
        &s,
        40,
    )
    .unwrap_err();
    assert_eq!(e.kind(), PlanErrorKind::TooLarge);
    // Aggregates are not keys: arithmetic over them is the coordinator's.
    let (k, e) = kind("SELECT SUM(traffickMonths) / COUNT(*) FROM cases");
    assert_eq!(k, PlanErrorKind::Unsupported, "{e}");
    assert!(!e.contains("not grouped by"), "{e}");
}

/// `BIN(col, k)`: k equal-width ranges over the declared bounds, by the
/// bins of `fedq_dp::distribution` (which the engine and the coordinator
/// share), labelled `[low, high)` with the last closed at the upper bound;
/// selectable, and grouped by the call, its alias or its position.
#[test]
fn bin_keys_are_equal_width_ranges_over_the_declared_bounds() {
    let s = schema();
    let b = "BIN(traffickMonths, 10)";
    for group in [b, "m", "2"] {
        let p = plan(
            &format!("SELECT gender, {b} AS m, COUNT(*) FROM cases GROUP BY gender, {group}"),
            &s,
            10_000,
        )
        .unwrap();
        assert_eq!(p.group_names(&s), ["gender", "m"]);
        assert_eq!(p.group_sizes, [3, 10]);
        let KeyRule::Number(k) = &p.buckets[0].rule else {
            panic!("{:?}", p.buckets[0].rule)
        };
        assert_eq!((k.min, k.max, k.bins), (0, 120, Some(10)));
        // 121 values in 10 bins: edges 0, 13, 25, ... (ceil(i * 121 / 10)).
        let edges = fedq_dp::distribution::bin_edges(0, 120, 10);
        assert_eq!(p.buckets[0].labels[0], format!("[0, {})", edges[1]));
        assert_eq!(p.buckets[0].labels[0], "[0, 13)");
        assert_eq!(p.buckets[0].labels[9], format!("[{}, 120]", edges[9]));
        for v in 0..=120i64 {
            let bin = k.key(i128::from(v));
            assert!(edges[bin] <= v && v < edges[bin + 1], "{v} in bin {bin}");
            assert_eq!(bin, fedq_dp::distribution::bin_of(v, 0, 120, 10));
        }
        let keys = cell_keys(&p, &s);
        assert_eq!(keys.len(), 4 * 11);
        assert_eq!(keys[10], ["Female", MISSING_KEY]);
    }
    // One bin per value, and one bin.
    let p = plan(
        "SELECT BIN(isForcedLabour, 2), COUNT(*) FROM cases GROUP BY 1",
        &s,
        10_000,
    )
    .unwrap();
    assert_eq!(p.buckets[0].labels, ["[0, 1)", "[1, 1]"]);
    let p = plan(
        "SELECT COUNT(*) FROM cases GROUP BY BIN(yearOfRegistration, 1)",
        &s,
        10_000,
    )
    .unwrap();
    assert_eq!(p.buckets[0].labels, ["[2002, 2025]"]);
    // Over an expression's derived bounds: 2..25 in 4 ranges.
    let p = plan(
        "SELECT COUNT(*) FROM cases GROUP BY BIN(yearOfRegistration - 2000, 4)",
        &s,
        10_000,
    )
    .unwrap();
    assert_eq!(
        p.buckets[0].labels,
        ["[2, 8)", "[8, 14)", "[14, 20)", "[20, 25]"]
    );

    let kind = |sql: &str| {
        let e = plan(sql, &s, 1_000_000).unwrap_err();
        (e.kind(), e.to_string())
    };
    for bad in ["0", "122", "2.5", "-1", "'ten'"] {
        let (k, e) = kind(&format!(
            "SELECT COUNT(*) FROM cases GROUP BY BIN(traffickMonths, {bad})"
        ));
        assert_eq!(k, PlanErrorKind::Invalid, "{bad}: {e}");
        assert!(e.contains("from 1 to 121"), "{bad}: {e}");
    }
    let (k, e) = kind("SELECT COUNT(*) FROM cases GROUP BY BIN(traffickMonths)");
    assert_eq!(k, PlanErrorKind::Invalid, "{e}");
    assert!(e.contains("BIN(traffickMonths, 12)"), "{e}");
    let (k, e) = kind("SELECT COUNT(*) FROM cases GROUP BY BIN(gender, 2)");
    assert_eq!(k, PlanErrorKind::Unbounded, "{e}");
    assert!(e.contains("GROUP BY gender"), "{e}");
    let (k, _) = kind("SELECT COUNT(*) FROM cases GROUP BY BIN(nope, 2)");
    assert_eq!(k, PlanErrorKind::UnknownName);
    let (k, e) = kind("SELECT BIN(traffickMonths, 4), COUNT(*) FROM cases");
    assert_eq!(k, PlanErrorKind::Unsupported, "{e}");
    assert!(e.contains("not grouped by"), "{e}");
    // Past the declared bins limit: at most MAX_BINS.
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
        "SELECT COUNT(*) FROM cases GROUP BY BIN(amount, 20000)",
        &wide,
        1_000_000,
    )
    .unwrap_err();
    assert_eq!(e.kind(), PlanErrorKind::Invalid);
    assert!(e.message().contains("from 1 to 10000"), "{e}");
    let p = plan(
        "SELECT BIN(amount, 50) AS a, COUNT(*) FROM cases GROUP BY a",
        &wide,
        1_000_000,
    )
    .unwrap();
    assert_eq!(p.buckets[0].labels[0], "[0, 2001)");
    assert_eq!(p.buckets[0].labels[49], "[98001, 100000]");
}

/// A lookup table the dataset declares joins like a built-in one; the
/// same query on a dataset that does not declare it is a private join,
/// refused saying which tables can be joined.
#[test]
fn a_dataset_declared_lookup_table_joins_by_key() {
    use crate::lookup::Lookup;
    let zones = Lookup::new(
        "zones",
        "country",
        "zone",
        [
            ("UA", "East"),
            ("RU", "East"),
            ("PH", "Pacific"),
            ("DE", "West"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .unwrap();
    let s = schema().with_lookups(vec![zones.clone()]).unwrap();
    let sql = "SELECT z.zone, COUNT(*) FROM cases JOIN zones z ON z.country = citizenship GROUP BY z.zone";
    let p = plan(sql, &s, 10_000).unwrap();
    // citizenship declares PH, UA, US: DE has no record, US no zone.
    assert_eq!(p.buckets[0].labels, ["East", "Pacific"]);
    assert_eq!(p.buckets[0].name, "zone");
    let east = plan(
        "SELECT COUNT(*) FROM cases JOIN zones z ON citizenship = z.country WHERE z.zone = 'East'",
        &s,
        10_000,
    )
    .unwrap();
    let ua = plan(
        "SELECT COUNT(*) FROM cases WHERE citizenship IN ('UA') AND citizenship IN ('UA', 'PH')",
        &s,
        10_000,
    )
    .unwrap();
    assert_eq!(east.filter, ua.filter);
    // The built-in tables stay joinable next to it.
    plan(
        "SELECT r.region, COUNT(*) FROM cases JOIN regions r ON r.country = citizenship GROUP BY 1",
        &s,
        10_000,
    )
    .unwrap();
    let e = plan(sql, &schema(), 10_000).unwrap_err();
    assert_eq!(e.kind(), PlanErrorKind::Unsupported);
    assert!(
        e.message().contains("joins between private datasets") && e.message().contains("regions"),
        "{e}"
    );
    let e = plan(
        "SELECT COUNT(*) FROM cases JOIN cases2 c ON c.country = citizenship",
        &s,
        10_000,
    )
    .unwrap_err();
    assert!(e.message().contains("(zones, regions)"), "{e}");
    // Names are unique and never a built-in table's.
    assert!(schema()
        .with_lookups(vec![zones.clone(), zones])
        .unwrap_err()
        .contains("declared twice"));
}
