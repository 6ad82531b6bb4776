//! The SQL researchers write (issue 19), as written, through real nodes
//! over mutual TLS: top-k with ORDER BY ... DESC LIMIT, HAVING on noisy
//! counts and ROUND of an aggregate (applied by the coordinator to the
//! combined noisy answers, `fedq::post`), a flag's average as a
//! prevalence, and the other spellings of a quantile; and the refusals
//! that remain name the construct and the alternative.

use std::time::Duration;

use fedq::client::{new_query_id, Federation};
use fedq::combine::{combine, combine_at, Combined};
use fedq_engine::synth::Partner;
use fedq_proto::v1::QueryRequest;
use fedq_tests::{exact_counts, roomy_budget, TestFederation};

const PARTNERS: [(Partner, usize, u64); 2] =
    [(Partner::Ngo, 4000, 21), (Partner::Hotline, 5000, 22)];

/// As `fedq query` runs a query: post-processing split off, the rest sent
/// to every node, the answers combined, then post-processed.
async fn ask(fed: &Federation, written: &str, epsilon: f64) -> Combined {
    let (core, post) = fedq::post::split(written).unwrap_or_else(|e| panic!("{written}: {e}"));
    let req = QueryRequest {
        query_id: new_query_id(),
        sql: core.clone(),
        epsilon,
        ..Default::default()
    };
    let outcomes = fed.query(req.clone(), Duration::from_secs(60)).await;
    let mut c = combine(&core, &req.query_id, epsilon, &outcomes);
    assert!(
        c.nodes.iter().all(|n| n.failure.is_none()),
        "{written}: {:?}",
        c.nodes
    );
    if let Some(p) = &post {
        let components = p
            .alpha(c.rows.len())
            .map(|a| combine_at(&core, &req.query_id, epsilon, &outcomes, a));
        fedq::post::apply(&mut c, p, components.as_ref())
            .unwrap_or_else(|e| panic!("{written}: {e}"));
    }
    c
}

/// Rows with isForcedLabour = 1, and rows where it is known, over every
/// node's CSV (read here, independently of the node's code).
fn forced_labour(fed: &TestFederation) -> (i64, i64) {
    let (mut yes, mut known) = (0i64, 0i64);
    for n in &fed.nodes {
        let mut r = csv::Reader::from_path(&n.csv).unwrap();
        let h = r.headers().unwrap().clone();
        let i = h.iter().position(|x| x == "isForcedLabour").unwrap();
        for rec in r.records() {
            match rec.unwrap().get(i).unwrap() {
                "1" | "true" => {
                    yes += 1;
                    known += 1
                }
                "0" | "false" => known += 1,
                _ => {}
            }
        }
    }
    (yes, known)
}

fn value(c: &Combined, row: usize, output: usize) -> f64 {
    c.rows[row].estimates[output].as_ref().unwrap().value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_k_having_and_round_are_applied_to_the_combined_noisy_answers() {
    let fed = TestFederation::start(&PARTNERS, roomy_budget()).await;
    let f = fed.federation("alice");

    // The largest citizenships, as written.
    let c = ask(
        &f,
        "SELECT citizenship, COUNT(*) AS victims FROM cases GROUP BY citizenship ORDER BY victims DESC LIMIT 5",
        1.0,
    )
    .await;
    assert_eq!(c.rows.len(), 5, "LIMIT 5");
    for w in 0..4 {
        assert!(value(&c, w, 0) >= value(&c, w + 1, 0), "sorted descending");
    }
    let note = c.post_processing.as_deref().unwrap_or_default();
    assert!(note.contains("no privacy cost"), "{note}");
    // The nodes were sent the query without ORDER BY and LIMIT (the
    // combined result names what was sent).
    assert!(
        !c.sql.contains("ORDER BY") && !c.sql.contains("LIMIT"),
        "{}",
        c.sql
    );

    // HAVING on a noisy count, ORDER BY a position, ROUND of an average.
    let c = ask(
        &f,
        "SELECT gender, COUNT(*), ROUND(AVG(traffickMonths), 1) FROM cases GROUP BY gender HAVING COUNT(*) >= 500 ORDER BY 1",
        1.0,
    )
    .await;
    assert!(!c.rows.is_empty(), "some gender has 500 cases");
    for (i, r) in c.rows.iter().enumerate() {
        assert!(value(&c, i, 0) >= 500.0, "HAVING holds: {:?}", r);
        let avg = r.estimates[1].as_ref().unwrap();
        assert!(
            ((avg.value * 10.0).round() - avg.value * 10.0).abs() < 1e-9,
            "rounded to one digit: {}",
            avg.value
        );
        assert!(
            avg.ci_low <= avg.value && avg.value <= avg.ci_high,
            "{avg:?}"
        );
    }
    let keys: Vec<&String> = c.rows.iter().map(|r| &r.key[0]).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "ORDER BY 1 sorts by gender");

    // Duration of exploitation in bands, as researchers bucket it: a CASE
    // of literal labels, against the truth read from the CSVs.
    let c = ask(
        &f,
        "SELECT CASE WHEN traffickMonths < 6 THEN 'under 6 months' WHEN traffickMonths < 12 THEN '6 to 11 months' ELSE 'a year or more' END AS duration, COUNT(*) FROM cases GROUP BY duration",
        1.0,
    )
    .await;
    assert_eq!(c.group_by, vec!["duration"]);
    let mut bands = std::collections::HashMap::new();
    for n in &fed.nodes {
        for (k, v) in exact_counts(&n.csv, &["traffickMonths"], |_| true) {
            let band = match k[0].parse::<i64>() {
                Ok(m) if m < 6 => "under 6 months",
                Ok(m) if m < 12 => "6 to 11 months",
                // A missing duration matches no WHEN: it falls to ELSE.
                _ => "a year or more",
            };
            *bands.entry(band.to_string()).or_insert(0i64) += v;
        }
    }
    let keys: Vec<&str> = c.rows.iter().map(|r| r.key[0].as_str()).collect();
    assert_eq!(
        keys,
        [
            "under 6 months",
            "6 to 11 months",
            "a year or more",
            "(missing)"
        ]
    );
    for r in &c.rows {
        let e = r.estimates[0].as_ref().unwrap();
        let want = bands.get(&r.key[0]).copied().unwrap_or(0) as f64;
        assert!(
            (e.value - want).abs() <= (e.ci_high - e.ci_low).max(1.0) * 2.0,
            "{}: {} against {want}",
            r.key[0],
            e.value
        );
    }

    // Victims per year: an integer column grouped by one key per year of
    // its declared bounds, against the truth read from the CSVs.
    let c = ask(
        &f,
        "SELECT yearOfRegistration AS year, COUNT(*) FROM cases GROUP BY year ORDER BY year",
        1.0,
    )
    .await;
    let mut truth = std::collections::HashMap::new();
    for n in &fed.nodes {
        for (k, v) in exact_counts(&n.csv, &["yearOfRegistration"], |_| true) {
            *truth.entry(k[0].clone()).or_insert(0i64) += v;
        }
    }
    let years: Vec<i64> = c
        .rows
        .iter()
        .filter_map(|r| r.key[0].parse().ok())
        .collect();
    assert!(
        years.len() > 10,
        "one row per year of the bounds: {years:?}"
    );
    assert!(
        years.windows(2).all(|w| w[0] < w[1]),
        "ORDER BY year: {years:?}"
    );
    for r in &c.rows {
        let e = r.estimates[0].as_ref().unwrap();
        let want = truth.get(&r.key[0]).copied().unwrap_or(0) as f64;
        // The 95% interval, doubled: a miss is far rarer than one in a million.
        assert!(
            (e.value - want).abs() <= (e.ci_high - e.ci_low).max(1.0) * 2.0,
            "{}: {} against {want}",
            r.key[0],
            e.value
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_average_is_a_prevalence_and_quantiles_answer_in_every_spelling() {
    let fed = TestFederation::start(&PARTNERS, roomy_budget()).await;
    let f = fed.federation("alice");

    // The prevalence of forced labour, against the truth read from the CSVs.
    let (yes, known) = forced_labour(&fed);
    let truth = yes as f64 / known as f64;
    let c = ask(
        &f,
        "SELECT AVG(isForcedLabour), SUM(isForcedLabour) FROM cases",
        1.0,
    )
    .await;
    let avg = c.rows[0].estimates[0].as_ref().unwrap();
    assert!((0.0..=1.0).contains(&avg.value), "{avg:?}");
    assert!(
        avg.ci_low >= 0.0 && avg.ci_high <= 1.0,
        "cut to the flag's bounds: {avg:?}"
    );
    // The 95% interval, doubled: a miss is far rarer than one in a million.
    let half = (avg.ci_high - avg.ci_low).max(1e-3);
    assert!(
        (avg.value - truth).abs() <= half * 2.0,
        "prevalence {} far from the truth {truth}: {avg:?}",
        avg.value
    );
    let sum = c.rows[0].estimates[1].as_ref().unwrap();
    assert!(
        (sum.value - yes as f64).abs() <= (sum.ci_high - sum.ci_low).max(1.0) * 2.0,
        "{sum:?} against {yes}"
    );

    // One median, four spellings: every one is answered.
    for sql in [
        "SELECT MEDIAN(traffickMonths) FROM cases",
        "SELECT QUANTILE(traffickMonths, 0.5) FROM cases",
        "SELECT quantile_cont(traffickMonths, 0.5) FROM cases",
        "SELECT PERCENTILE_CONT(0.5) WITHIN GROUP (ORDER BY traffickMonths) FROM cases",
    ] {
        let c = ask(&f, sql, 0.5).await;
        let m = c.rows[0].estimates[0].as_ref().unwrap();
        assert!((0.0..=1000.0).contains(&m.value), "{sql}: {m:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refusals_that_remain_name_the_construct_and_the_alternative() {
    let fed = TestFederation::start(&PARTNERS[..1], roomy_budget()).await;
    let f = fed.federation("alice");
    for (sql, says) in [
        (
            "SELECT MAX(traffickMonths) FROM cases",
            "QUANTILE(col, 0.95)",
        ),
        (
            "SELECT COUNT(DISTINCT citizenship) FROM cases",
            "GROUP BY col",
        ),
        (
            "SELECT ROUND(traffickMonths) FROM cases",
            "applies to an aggregate",
        ),
    ] {
        let message = match fedq::post::split(sql) {
            Err(e) => e,
            Ok((core, _)) => {
                let req = QueryRequest {
                    query_id: new_query_id(),
                    sql: core,
                    epsilon: 0.1,
                    ..Default::default()
                };
                let outcomes = f.query(req, Duration::from_secs(30)).await;
                let e = outcomes[0].result.as_ref().expect_err(sql);
                format!("{e}")
            }
        };
        assert!(message.contains(says), "{sql}: {message}");
        assert!(
            !message.contains("exactly one argument"),
            "{sql}: {message}"
        );
    }
}

/// A ratio of two aggregates and a percentage, computed by the coordinator
/// from released aggregates: their intervals cover the truth (read from
/// the CSVs) at least as often as the 95% they claim, over repeated
/// queries (a ratio's is the range over its parts' 97.5% intervals).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratios_and_percentages_have_intervals_that_cover_the_truth() {
    let fed = TestFederation::start(&PARTNERS, roomy_budget()).await;
    let f = fed.federation("alice");
    let (yes, known) = forced_labour(&fed);
    let share = yes as f64 / known as f64;
    const RUNS: usize = 40;
    let mut covered = [0usize; 2];
    for _ in 0..RUNS {
        let c = ask(
            &f,
            "SELECT SUM(isForcedLabour) / COUNT(isForcedLabour) AS share, 100.0 * AVG(isForcedLabour) AS pct FROM cases",
            0.05,
        )
        .await;
        assert_eq!(
            c.outputs.len(),
            2,
            "only the two formulas are shown: {:?}",
            c.outputs
        );
        let ratio = c.rows[0].estimates[0].as_ref().expect("a ratio");
        let pct = c.rows[0].estimates[1].as_ref().expect("a percentage");
        assert!(ratio.ci_low < ratio.ci_high && pct.ci_low < pct.ci_high);
        covered[0] += usize::from(ratio.ci_low <= share && share <= ratio.ci_high);
        covered[1] += usize::from(pct.ci_low <= 100.0 * share && 100.0 * share <= pct.ci_high);
    }
    // At 95% or more each, fewer than 30 of 40 is a one-in-a-billion event;
    // intervals that ignored the noise would cover almost never.
    assert!(
        covered.iter().all(|&k| k >= 30),
        "covered {covered:?} of {RUNS}"
    );
}

/// A typo is said once, by the coordinator, before any node is asked: the
/// message names the closest column or value, and nothing reaches a node
/// (no budget spent, no audit entry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typo_is_said_once_before_any_node_is_asked() {
    use fedq::run::{run_query, QueryOptions, RunError};
    let fed = TestFederation::start(&PARTNERS, roomy_budget()).await;
    let f = fed.federation("alice");
    for (sql, says) in [
        (
            "SELECT gendr, COUNT(*) FROM cases GROUP BY gendr",
            "did you mean \"gender\"?",
        ),
        (
            "SELECT COUNT(*) FROM cases WHERE gender = 'female'",
            "did you mean \"Female\"?",
        ),
        ("SELECT COUNT(*) FROM case", "did you mean \"cases\"?"),
    ] {
        let opts = QueryOptions {
            secure: false,
            epsilon: 0.5,
            rho: 0.0,
            dry_run: false,
            calls: fedq::client::Calls {
                timeout: Duration::from_secs(20),
                retries: 1,
            },
            min_nodes: None,
            query_id: new_query_id(),
        };
        match run_query(&f, sql, &opts).await {
            Err(e @ RunError::Query(_)) => {
                let text = e.to_string();
                assert!(text.contains(says), "{sql}: {text}");
                assert!(text.contains("nothing was sent"), "{text}");
                assert_eq!(text.matches(says).count(), 1, "said once: {text}");
            }
            other => panic!("{sql}: expected a local refusal, got {other:?}"),
        }
    }
    // Nothing reached a node: no budget was spent anywhere.
    let budgets = f.budget(Duration::from_secs(10)).await;
    for b in budgets {
        let spent: f64 = b
            .result
            .expect("budget")
            .budgets
            .iter()
            .map(|x| x.spent_by_analyst)
            .sum();
        assert_eq!(spent, 0.0, "{}", b.node);
    }
}

/// The share of minors, as researchers write it (a CASE inside AVG, and
/// the same as a percentage of a conditional SUM over COUNT(*)), against
/// the truth read from the CSVs; and COUNT(*) FILTER (WHERE ...).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_and_conditional_counts_answer_as_written() {
    let fed = TestFederation::start(&PARTNERS, roomy_budget()).await;
    let f = fed.federation("alice");
    let (mut minors, mut rows) = (0i64, 0i64);
    for n in &fed.nodes {
        for (k, v) in exact_counts(&n.csv, &["ageBroad"], |_| true) {
            rows += v;
            if k[0] == "0--8" || k[0] == "9--17" {
                minors += v;
            }
        }
    }
    let truth = minors as f64 / rows as f64;
    let c = ask(
        &f,
        "SELECT AVG(CASE WHEN ageBroad IN ('0--8', '9--17') THEN 1 ELSE 0 END) AS share, \
         100.0 * SUM(CASE WHEN ageBroad IN ('0--8', '9--17') THEN 1 ELSE 0 END) / COUNT(*) AS pct, \
         COUNT(*) FILTER (WHERE ageBroad IN ('0--8', '9--17')) AS minors FROM cases",
        1.0,
    )
    .await;
    let share = c.rows[0].estimates[0].as_ref().expect("a share");
    let pct = c.rows[0].estimates[1].as_ref().expect("a percentage");
    let count = c.rows[0].estimates[2].as_ref().expect("a count");
    assert!((0.0..=1.0).contains(&share.value), "{share:?}");
    // Each interval, doubled: a miss is far rarer than one in a million.
    assert!(
        (share.value - truth).abs() <= (share.ci_high - share.ci_low).max(1e-3) * 2.0,
        "share {share:?} against {truth}"
    );
    assert!(
        (pct.value - 100.0 * truth).abs() <= (pct.ci_high - pct.ci_low).max(0.1) * 2.0,
        "percentage {pct:?} against {}",
        100.0 * truth
    );
    assert!(
        (count.value - minors as f64).abs() <= (count.ci_high - count.ci_low).max(1.0) * 2.0,
        "count {count:?} against {minors}"
    );
}

/// Comparisons between two columns of a row, as researchers write them:
/// the cross-border cases (citizenship differs from the country of
/// exploitation; unknown, so not counted, when either is missing), their
/// share as a percentage, a CASE bucket on the same comparison, and flags
/// compared with `<` (sexual exploitation without forced labour); each
/// against the truth read from the CSVs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_share_of_cross_border_cases_compares_two_columns() {
    let fed = TestFederation::start(&PARTNERS, roomy_budget()).await;
    let f = fed.federation("alice");
    let (mut cross, mut domestic, mut rows, mut sex_only) = (0i64, 0i64, 0i64, 0i64);
    for n in &fed.nodes {
        let keys = [
            "citizenship",
            "CountryOfExploitation",
            "isForcedLabour",
            "isSexualExploit",
        ];
        for (k, v) in exact_counts(&n.csv, &keys, |_| true) {
            rows += v;
            let missing = |s: &str| s == "(missing)";
            if !missing(&k[0]) && !missing(&k[1]) {
                if k[0] == k[1] {
                    domestic += v;
                } else {
                    cross += v;
                }
            }
            let flag = |s: &str| match s {
                "1" | "true" => Some(1),
                "0" | "false" => Some(0),
                _ => None,
            };
            if let (Some(a), Some(b)) = (flag(&k[2]), flag(&k[3])) {
                sex_only += v * i64::from(a < b);
            }
        }
    }
    assert!(
        cross > 100 && domestic > 100,
        "the data has both: {cross} {domestic}"
    );
    let c = ask(
        &f,
        "SELECT COUNT(*) FILTER (WHERE citizenship <> CountryOfExploitation) AS cross_border, \
         100.0 * SUM(CASE WHEN citizenship <> CountryOfExploitation THEN 1 ELSE 0 END) / COUNT(*) AS pct, \
         COUNT(*) FILTER (WHERE isForcedLabour < isSexualExploit) AS sexual_only FROM cases",
        1.0,
    )
    .await;
    let count = c.rows[0].estimates[0].as_ref().expect("a count");
    let pct = c.rows[0].estimates[1].as_ref().expect("a percentage");
    let only = c.rows[0].estimates[2].as_ref().expect("a count");
    let truth = 100.0 * cross as f64 / rows as f64;
    // Each interval, doubled: a miss is far rarer than one in a million.
    assert!(
        (count.value - cross as f64).abs() <= (count.ci_high - count.ci_low).max(1.0) * 2.0,
        "cross-border {count:?} against {cross}"
    );
    assert!(
        (pct.value - truth).abs() <= (pct.ci_high - pct.ci_low).max(0.1) * 2.0,
        "percentage {pct:?} against {truth}"
    );
    assert!(
        (only.value - sex_only as f64).abs() <= (only.ci_high - only.ci_low).max(1.0) * 2.0,
        "{only:?} against {sex_only}"
    );

    // The same comparison as a CASE bucket: a missing side matches no
    // WHEN (unknown), so those rows are the (missing) key.
    let c = ask(
        &f,
        "SELECT CASE WHEN citizenship = CountryOfExploitation THEN 'domestic' \
         WHEN citizenship <> CountryOfExploitation THEN 'cross-border' END AS corridor, \
         COUNT(*) FROM cases GROUP BY corridor",
        1.0,
    )
    .await;
    let keys: Vec<&str> = c.rows.iter().map(|r| r.key[0].as_str()).collect();
    assert_eq!(keys, ["domestic", "cross-border", "(missing)"]);
    for (r, want) in c
        .rows
        .iter()
        .zip([domestic, cross, rows - domestic - cross])
    {
        let e = r.estimates[0].as_ref().unwrap();
        assert!(
            (e.value - want as f64).abs() <= (e.ci_high - e.ci_low).max(1.0) * 2.0,
            "{}: {e:?} against {want}",
            r.key[0]
        );
    }
}

/// Per-row arithmetic and COALESCE, as researchers write them: an average
/// with missing durations counted as 0, a sum of two columns, durations in
/// whole years, and COALESCE as a GROUP BY key; each against the truth
/// read from the CSVs (NULL propagating as in SQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_row_arithmetic_and_coalesce_answer_as_written() {
    let fed = TestFederation::start(&PARTNERS, roomy_budget()).await;
    let f = fed.federation("alice");
    let (mut rows, mut months, mut both, mut present, mut years) = (0i64, 0i64, 0i64, 0i64, 0i64);
    let mut genders = std::collections::HashMap::new();
    for n in &fed.nodes {
        let keys = ["traffickMonths", "isForcedLabour", "gender"];
        for (k, v) in exact_counts(&n.csv, &keys, |_| true) {
            rows += v;
            let gender = if k[2] == "(missing)" {
                "Unknown"
            } else {
                &k[2]
            };
            *genders.entry(gender.to_string()).or_insert(0i64) += v;
            let Ok(m) = k[0].parse::<i64>() else { continue };
            months += v * m;
            present += v;
            years += v * (m / 12);
            let flag = match k[1].as_str() {
                "1" | "true" => Some(1),
                "0" | "false" => Some(0),
                _ => None,
            };
            if let Some(x) = flag {
                both += v * (m + x);
            }
        }
    }
    let c = ask(
        &f,
        "SELECT AVG(COALESCE(traffickMonths, 0)) AS avg0, SUM(traffickMonths + isForcedLabour) AS s, \
         AVG(traffickMonths / 12) AS years FROM cases",
        1.0,
    )
    .await;
    let truths = [
        months as f64 / rows as f64,
        both as f64,
        years as f64 / present as f64,
    ];
    for (i, want) in truths.into_iter().enumerate() {
        let e = c.rows[0].estimates[i].as_ref().expect("a value");
        // The 95% interval, doubled: a miss is far rarer than one in a million.
        assert!(
            (e.value - want).abs() <= (e.ci_high - e.ci_low).max(1e-3) * 2.0,
            "{}: {e:?} against {want}",
            c.outputs[i]
        );
    }

    let c = ask(
        &f,
        "SELECT COALESCE(gender, 'Unknown') AS g, COUNT(*) FROM cases GROUP BY g",
        1.0,
    )
    .await;
    assert_eq!(c.group_by, vec!["g"]);
    let keys: Vec<&str> = c.rows.iter().map(|r| r.key[0].as_str()).collect();
    assert!(
        keys.contains(&"Unknown") && keys.contains(&"Female"),
        "{keys:?}"
    );
    for r in &c.rows {
        let e = r.estimates[0].as_ref().unwrap();
        let want = genders.get(&r.key[0]).copied().unwrap_or(0) as f64;
        assert!(
            (e.value - want).abs() <= (e.ci_high - e.ci_low).max(1.0) * 2.0,
            "{}: {e:?} against {want}",
            r.key[0]
        );
    }
}

/// Epsilon spent by the analyst on each node, in federation order.
async fn spent(f: &Federation) -> Vec<f64> {
    f.budget(Duration::from_secs(10))
        .await
        .into_iter()
        .map(|b| {
            b.result
                .expect("budget")
                .budgets
                .iter()
                .map(|x| x.spent_by_analyst)
                .sum()
        })
        .collect()
}

/// As `fedq query` asks (`fedq::query::ask`: UNION ALL included).
async fn ask_written(f: &Federation, sql: &str, epsilon: f64) -> fedq::query::Answer {
    let opts = fedq::run::QueryOptions {
        secure: false,
        epsilon,
        rho: 0.0,
        dry_run: false,
        calls: fedq::client::Calls {
            timeout: Duration::from_secs(60),
            retries: 1,
        },
        min_nodes: None,
        query_id: new_query_id(),
    };
    fedq::query::ask(f, sql, &opts)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// UNION ALL of aggregate queries: parts over provably disjoint records
/// are asked as one grouped query, so each part gets the full epsilon and
/// each node debits it once (parallel composition); overlapping parts are
/// asked one by one with half each, and the debits add up to what was
/// asked (sequential composition). The result says which, and the values
/// match the truth read from the CSVs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn union_all_parts_are_costed_by_how_their_records_overlap() {
    let fed = TestFederation::start(&PARTNERS, roomy_budget()).await;
    let f = fed.federation("alice");
    let mut genders = std::collections::HashMap::new();
    for n in &fed.nodes {
        for (k, v) in exact_counts(&n.csv, &["gender"], |_| true) {
            *genders.entry(k[0].clone()).or_insert(0i64) += v;
        }
    }
    let (forced, _) = forced_labour(&fed);

    let before = spent(&f).await;
    let a = ask_written(
        &f,
        "SELECT 'women' AS who, COUNT(*) AS victims FROM cases WHERE gender = 'Female' \
         UNION ALL SELECT 'men', COUNT(*) FROM cases WHERE gender = 'Male'",
        0.5,
    )
    .await;
    let c = &a.combined;
    let note = c.post_processing.as_deref().unwrap_or_default();
    assert!(note.contains("parallel composition"), "{note}");
    assert_eq!(c.group_by, ["who"]);
    let keys: Vec<&str> = c.rows.iter().map(|r| r.key[0].as_str()).collect();
    assert_eq!(keys, ["women", "men"], "the rows of no part are not shown");
    for (r, g) in c.rows.iter().zip(["Female", "Male"]) {
        let e = r.estimates[0].as_ref().unwrap();
        let want = genders[g] as f64;
        assert!(
            (e.value - want).abs() <= (e.ci_high - e.ci_low).max(1.0) * 2.0,
            "{g}: {e:?} against {want}"
        );
    }
    let after = spent(&f).await;
    for (b, a) in before.iter().zip(&after) {
        assert!((a - b - 0.5).abs() < 1e-9, "debited once: {b} -> {a}");
    }

    let a = ask_written(
        &f,
        "SELECT 'forced labour' AS what, COUNT(*) FROM cases WHERE isForcedLabour = 1 \
         UNION ALL SELECT 'women', COUNT(*) FROM cases WHERE gender = 'Female'",
        0.5,
    )
    .await;
    let c = &a.combined;
    let note = c.post_processing.as_deref().unwrap_or_default();
    assert!(
        note.contains("sequential composition") && note.contains("0.25 each"),
        "{note}"
    );
    let keys: Vec<&str> = c.rows.iter().map(|r| r.key[0].as_str()).collect();
    assert_eq!(keys, ["forced labour", "women"]);
    for (r, want) in c.rows.iter().zip([forced, genders["Female"]]) {
        let e = r.estimates[0].as_ref().unwrap();
        assert!(
            (e.value - want as f64).abs() <= (e.ci_high - e.ci_low).max(1.0) * 2.0,
            "{}: {e:?} against {want}",
            r.key[0]
        );
    }
    let last = spent(&f).await;
    for (b, a) in after.iter().zip(&last) {
        assert!((a - b - 0.5).abs() < 1e-9, "0.25 twice: {b} -> {a}");
    }
}

/// A `--file` set whose queries select provably disjoint records is asked
/// as one grouped query: each query gets the whole epsilon (its interval
/// as narrow as asked alone) and each node debits it once; each query's
/// answer comes back as if asked alone, saying how the cost was split.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_of_disjoint_queries_gives_each_the_whole_epsilon() {
    let fed = TestFederation::start(&PARTNERS, roomy_budget()).await;
    let f = fed.federation("alice");
    let mut genders = std::collections::HashMap::new();
    for n in &fed.nodes {
        for (k, v) in exact_counts(&n.csv, &["gender"], |_| true) {
            *genders.entry(k[0].clone()).or_insert(0i64) += v;
        }
    }
    let queries = [
        "SELECT COUNT(*) FROM cases WHERE gender = 'Female'".to_string(),
        "SELECT COUNT(*) FROM cases WHERE gender = 'Male'".to_string(),
    ];
    let opts = fedq::run::QueryOptions {
        secure: false,
        epsilon: 0.5,
        rho: 0.0,
        dry_run: false,
        calls: fedq::client::Calls {
            timeout: Duration::from_secs(60),
            retries: 1,
        },
        min_nodes: None,
        query_id: new_query_id(),
    };
    let before = spent(&f).await;
    let answers = fedq::compose::ask_set(&f, &queries, &opts)
        .await
        .expect("disjoint: asked as one");
    let after = spent(&f).await;
    for (b, a) in before.iter().zip(&after) {
        assert!((a - b - 0.5).abs() < 1e-9, "debited once: {b} -> {a}");
    }
    // The width a lone query at epsilon 0.5 gets.
    let alone = ask_written(&f, &queries[0], 0.5).await;
    let width = |c: &fedq::combine::Combined| {
        let e = c.rows[0].estimates[0].as_ref().unwrap();
        e.ci_high - e.ci_low
    };
    for (a, g) in answers.iter().zip(["Female", "Male"]) {
        let c = &a.as_ref().unwrap().combined;
        assert!(c.group_by.is_empty(), "{:?}", c.group_by);
        assert_eq!(c.rows.len(), 1);
        let e = c.rows[0].estimates[0].as_ref().unwrap();
        let want = genders[g] as f64;
        assert!(
            (e.value - want).abs() <= (e.ci_high - e.ci_low).max(1.0) * 2.0,
            "{g}: {e:?} against {want}"
        );
        assert!(
            (width(c) - width(&alone.combined)).abs() < 1e-6,
            "the whole epsilon: {} against {}",
            width(c),
            width(&alone.combined)
        );
        let note = c.post_processing.as_deref().unwrap_or_default();
        assert!(note.contains("parallel composition"), "{note}");
    }
    // Overlapping queries are not merged.
    let overlapping = [
        queries[0].clone(),
        "SELECT COUNT(*) FROM cases WHERE isForcedLabour = 1".to_string(),
    ];
    assert!(fedq::compose::ask_set(&f, &overlapping, &opts)
        .await
        .is_none());
}

/// A share of the result's total, `COUNT(*) * 1.0 / SUM(COUNT(*)) OVER
/// ()`, computed by the coordinator from the released counts: the shares
/// sum to one, and their intervals (a union bound over every row's count)
/// cover the truth read from the CSVs at least as often as the 95% they
/// claim, over repeated queries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_of_the_total_over_all_rows_cover_the_truth() {
    let fed = TestFederation::start(&PARTNERS, roomy_budget()).await;
    let f = fed.federation("alice");
    let mut genders = std::collections::HashMap::new();
    let mut rows = 0i64;
    for n in &fed.nodes {
        for (k, v) in exact_counts(&n.csv, &["gender"], |_| true) {
            *genders.entry(k[0].clone()).or_insert(0i64) += v;
            rows += v;
        }
    }
    const RUNS: usize = 30;
    let (mut checked, mut covered) = (0usize, 0usize);
    for _ in 0..RUNS {
        let c = ask(
            &f,
            "SELECT gender, COUNT(*) * 1.0 / SUM(COUNT(*)) OVER () AS share FROM cases GROUP BY gender",
            0.05,
        )
        .await;
        assert_eq!(c.outputs.len(), 1, "{:?}", c.outputs);
        let total: f64 = c
            .rows
            .iter()
            .map(|r| r.estimates[0].as_ref().unwrap().value)
            .sum();
        assert!((total - 1.0).abs() < 1e-9, "shares sum to {total}");
        for r in &c.rows {
            let e = r.estimates[0].as_ref().expect("a share");
            let truth = genders.get(&r.key[0]).copied().unwrap_or(0) as f64 / rows as f64;
            assert!(e.ci_low <= e.value && e.value <= e.ci_high, "{e:?}");
            checked += 1;
            covered += usize::from(e.ci_low <= truth && truth <= e.ci_high);
        }
    }
    // At 95% or more each, 20 misses of 120 or more is far beyond 4
    // standard deviations (about 6 expected, sd 2.4); intervals that
    // ignored the noise would miss most of the time.
    assert!(
        checked - covered < checked / 6,
        "covered {covered} of {checked}"
    );
}

/// A public lookup table joined by key, as researchers write it: victims
/// by region of origin (a CASE bucket over citizenship, every region a key)
/// and the cross-border cases exploited in Europe; each against the truth
/// read from the CSVs, the regions looked up in the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_lookup_table_joins_by_key() {
    use fedq_plan::lookup::REGIONS;
    let fed = TestFederation::start(&PARTNERS, roomy_budget()).await;
    let f = fed.federation("alice");
    let (mut origins, mut europe) = (std::collections::HashMap::new(), 0i64);
    for n in &fed.nodes {
        for (k, v) in exact_counts(&n.csv, &["citizenship", "CountryOfExploitation"], |_| true) {
            if let Some(r) = REGIONS.value_of(&k[0]) {
                *origins.entry(r.to_string()).or_insert(0i64) += v;
            }
            let known = k[0] != "(missing)" && k[1] != "(missing)";
            if known && k[0] != k[1] && REGIONS.value_of(&k[1]) == Some("Europe") {
                europe += v;
            }
        }
    }
    let c = ask(
        &f,
        "SELECT o.region AS origin, COUNT(*) FROM cases c JOIN regions o ON o.country = c.citizenship GROUP BY origin",
        1.0,
    )
    .await;
    assert_eq!(c.group_by, ["origin"]);
    for r in &c.rows {
        let e = r.estimates[0].as_ref().unwrap();
        let want = origins.get(&r.key[0]).copied().unwrap_or(0) as f64;
        // The 95% interval, doubled: a miss is far rarer than one in a million.
        assert!(
            (e.value - want).abs() <= (e.ci_high - e.ci_low).max(1.0) * 2.0,
            "{}: {e:?} against {want}",
            r.key[0]
        );
    }
    assert!(
        c.rows.iter().any(|r| r.key[0] == "Asia"),
        "{:?}",
        c.rows.iter().map(|r| &r.key).collect::<Vec<_>>()
    );
    let c = ask(
        &f,
        "SELECT COUNT(*) FROM cases JOIN regions d ON d.country = CountryOfExploitation \
         WHERE d.region = 'Europe' AND citizenship <> CountryOfExploitation",
        1.0,
    )
    .await;
    let e = c.rows[0].estimates[0].as_ref().unwrap();
    assert!(
        (e.value - europe as f64).abs() <= (e.ci_high - e.ci_low).max(1.0) * 2.0,
        "{e:?} against {europe}"
    );
    // A private join is refused naming the alternative.
    let req = QueryRequest {
        query_id: new_query_id(),
        sql: "SELECT COUNT(*) FROM cases JOIN cases c2 ON cases.gender = c2.gender".into(),
        epsilon: 0.1,
        ..Default::default()
    };
    let outcomes = f.query(req, Duration::from_secs(30)).await;
    let e = format!("{}", outcomes[0].result.as_ref().expect_err("refused"));
    assert!(e.contains("public lookup table"), "{e}");
}

/// Sends `sql` (no post-processing) to every node and combines the
/// answers with `1 - 1e-6` intervals: a correct interval misses the truth
/// about once in a million, so a test checking a few dozen never flakes,
/// and a wrong key or a wrong count fails it.
async fn ask_wide(fed: &Federation, sql: &str, epsilon: f64) -> Combined {
    let req = QueryRequest {
        query_id: new_query_id(),
        sql: sql.into(),
        epsilon,
        ..Default::default()
    };
    let outcomes = fed.query(req.clone(), Duration::from_secs(60)).await;
    let c = combine_at(sql, &req.query_id, epsilon, &outcomes, 1e-6);
    assert!(
        c.nodes.iter().all(|n| n.failure.is_none()),
        "{sql}: {:?}",
        c.nodes
    );
    c
}

/// GROUP BY a per-row number (`traffickMonths / 12`, by alias and by
/// position) and `BIN(traffickMonths, k)`, as researchers write them:
/// every key of the domain derived from the declared bounds (0 to 120
/// months) comes back, (missing) included, each count's interval holding
/// the truth read from the CSVs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_by_arithmetic_and_bins_return_every_derived_key() {
    let fed = TestFederation::start(&PARTNERS, roomy_budget()).await;
    let f = fed.federation("alice");
    // Truth per month value (None: missing), from the CSVs.
    let mut months: std::collections::HashMap<Option<i64>, i64> = Default::default();
    for n in &fed.nodes {
        for (k, v) in exact_counts(&n.csv, &["traffickMonths"], |_| true) {
            *months.entry(k[0].parse::<i64>().ok()).or_insert(0) += v;
        }
    }
    let truth = |key: &dyn Fn(i64) -> String, label: &str| -> i64 {
        months
            .iter()
            .filter(|(m, _)| match m {
                Some(m) => key((*m).clamp(0, 120)) == label,
                None => label == "(missing)",
            })
            .map(|(_, v)| v)
            .sum()
    };
    let check = |c: &Combined, key: &dyn Fn(i64) -> String, labels: &[String]| {
        let keys: Vec<&str> = c.rows.iter().map(|r| r.key[0].as_str()).collect();
        assert_eq!(keys, labels, "every key, in order, then (missing)");
        for r in &c.rows {
            let e = r.estimates[0].as_ref().expect("a count");
            let want = truth(key, &r.key[0]) as f64;
            assert!(
                e.ci_low <= want && want <= e.ci_high,
                "{}: {e:?} against {want}",
                r.key[0]
            );
        }
    };

    let years = |m: i64| (m / 12).to_string();
    let mut labels: Vec<String> = (0..=10).map(|y| y.to_string()).collect();
    labels.push("(missing)".into());
    for sql in [
        "SELECT traffickMonths / 12 AS years, COUNT(*) FROM cases GROUP BY years",
        "SELECT traffickMonths / 12, COUNT(*) FROM cases GROUP BY 1",
    ] {
        let c = ask_wide(&f, sql, 1.0).await;
        check(&c, &years, &labels);
    }
    assert!(months.keys().any(|m| m.is_some_and(|m| m >= 24)));

    // Bins read off the edges here (not bin_of): [0, 11), ..., [110, 120].
    let edges: Vec<i64> = (0..=11).map(|i| (i * 121 + 10) / 11).collect();
    let bin = |m: i64| {
        let i = edges
            .windows(2)
            .position(|w| w[0] <= m && m < w[1])
            .unwrap();
        if i == 10 {
            format!("[{}, 120]", edges[i])
        } else {
            format!("[{}, {})", edges[i], edges[i + 1])
        }
    };
    let mut labels: Vec<String> = (0..=120).map(bin).collect();
    labels.dedup();
    assert_eq!(labels.len(), 11);
    assert_eq!(labels[0], "[0, 11)");
    labels.push("(missing)".into());
    let c = ask_wide(
        &f,
        "SELECT BIN(traffickMonths, 11) AS months, COUNT(*) FROM cases GROUP BY months",
        1.0,
    )
    .await;
    assert_eq!(c.group_by, ["months"]);
    check(&c, &bin, &labels);

    // Past the key limit: refused before anything is spent, saying what
    // to write.
    let req = QueryRequest {
        query_id: new_query_id(),
        sql: "SELECT COUNT(*) FROM cases GROUP BY traffickMonths * 100".into(),
        epsilon: 0.1,
        ..Default::default()
    };
    let outcomes = f.query(req, Duration::from_secs(30)).await;
    let e = format!("{}", outcomes[0].result.as_ref().expect_err("refused"));
    assert!(e.contains("BIN(traffickMonths * 100, k)"), "{e}");
}

/// A dry run of a `--file` set over provably disjoint records plans what
/// the real run does: one grouped query at the whole epsilon (not the
/// even split), nothing spent, and a note saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_of_a_disjoint_file_shows_the_whole_epsilon() {
    let fed = TestFederation::start(&PARTNERS, roomy_budget()).await;
    let f = fed.federation("alice");
    let queries = [
        "SELECT BIN(traffickMonths, 4), COUNT(*) FROM cases WHERE gender = 'Female' GROUP BY 1"
            .to_string(),
        "SELECT BIN(traffickMonths, 4), COUNT(*) FROM cases WHERE gender = 'Male' GROUP BY 1"
            .to_string(),
    ];
    let opts = fedq::run::QueryOptions {
        secure: false,
        epsilon: 0.5,
        rho: 0.0,
        dry_run: true,
        calls: fedq::client::Calls {
            timeout: Duration::from_secs(60),
            retries: 1,
        },
        min_nodes: None,
        query_id: new_query_id(),
    };
    let before = spent(&f).await;
    let answers = fedq::compose::ask_set(&f, &queries, &opts)
        .await
        .expect("disjoint: planned as one");
    assert_eq!(spent(&f).await, before, "a dry run spends nothing");
    assert_eq!(answers.len(), 2);
    for a in &answers {
        let a = a.as_ref().expect("planned");
        assert!(a.combined.dry_run);
        assert!(a.sent.contains("GROUP BY part"), "{}", a.sent);
        let note = a.combined.post_processing.as_deref().unwrap_or_default();
        assert!(
            note.starts_with("dry run") && note.contains("parallel composition"),
            "{note}"
        );
        for o in &a.outcomes {
            let r = o.result.as_ref().expect("accepted");
            assert!(!r.measurements.is_empty());
            for m in &r.measurements {
                assert!((m.epsilon - 0.5).abs() < 1e-12, "the whole epsilon: {m:?}");
            }
        }
    }
    // Overlapping queries are not merged: the dry run, like the real run,
    // asks each with an even share.
    let overlapping = [
        queries[0].clone(),
        "SELECT BIN(traffickMonths, 4), COUNT(*) FROM cases WHERE isForcedLabour = 1 GROUP BY 1"
            .to_string(),
    ];
    assert!(fedq::compose::ask_set(&f, &overlapping, &opts)
        .await
        .is_none());
}

/// A lookup table a partner declares for its dataset in node.toml
/// (`[[datasets.lookups]]`) is published in Describe, so the coordinator
/// plans the same join and checks the answers against it; it joins by key
/// like `regions`, each zone's count holding the truth read from the CSVs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_table_declared_in_node_toml_joins_by_key() {
    use fedq_plan::schema::Column;
    let mut fed = TestFederation::start(&PARTNERS, roomy_budget()).await;
    let schema =
        fedq_plan::schema::Schema::from_specs("cases", &fedq_engine::synth::ctdc_columns())
            .unwrap();
    let (_, Column::Categorical { domain, .. }) = schema.column("citizenship").unwrap() else {
        panic!("citizenship is categorical")
    };
    // Every third citizenship has no zone (an INNER join drops it).
    let zone_of = |i: usize| match i % 3 {
        0 => Some("north"),
        1 => Some("south"),
        _ => None,
    };
    let rows: std::collections::BTreeMap<String, String> = domain
        .iter()
        .enumerate()
        .filter_map(|(i, c)| zone_of(i).map(|z| (c.clone(), z.to_string())))
        .collect();
    for i in 0..fed.nodes.len() {
        fed.stop_node(i).await;
        fed.nodes[i].config.datasets[0].lookups = vec![fedq_node::config::LookupConfig {
            name: "zones".into(),
            key: "country".into(),
            value: "zone".into(),
            rows: rows.clone(),
        }];
        fed.start_node(i).await;
    }
    let f = fed.federation("alice");
    let mut truth = std::collections::HashMap::new();
    for n in &fed.nodes {
        for (k, v) in exact_counts(&n.csv, &["citizenship"], |_| true) {
            if let Some(z) = rows.get(&k[0]) {
                *truth.entry(z.clone()).or_insert(0i64) += v;
            }
        }
    }
    let c = ask_wide(
        &f,
        "SELECT z.zone, COUNT(*) FROM cases JOIN zones z ON z.country = citizenship GROUP BY z.zone",
        1.0,
    )
    .await;
    assert_eq!(c.group_by, ["zone"]);
    // Values in order of first appearance over the sorted keys, then
    // (missing).
    let mut order: Vec<&str> = Vec::new();
    for z in rows.values() {
        if !order.contains(&z.as_str()) {
            order.push(z);
        }
    }
    order.push("(missing)");
    let keys: Vec<&str> = c.rows.iter().map(|r| r.key[0].as_str()).collect();
    assert_eq!(keys, order);
    for r in &c.rows {
        let e = r.estimates[0].as_ref().unwrap();
        let want = truth.get(&r.key[0]).copied().unwrap_or(0) as f64;
        assert!(
            e.ci_low <= want && want <= e.ci_high,
            "{}: {e:?} against {want}",
            r.key[0]
        );
    }
    // Published with the schema.
    let described = f.describe(Duration::from_secs(10)).await;
    for d in &described {
        let ds = &d.result.as_ref().expect("described").datasets[0];
        assert_eq!(ds.lookups.len(), 1);
        assert_eq!(ds.lookups[0].name, "zones");
    }
}
