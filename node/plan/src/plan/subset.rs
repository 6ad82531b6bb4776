//! The SQL this planner accepts, as `fedq query --help` and the README
//! state it, with one example query per construct (a test plans each).

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
    values in their declared bounds (one key per value), CASE WHEN condition
    THEN 'label' ... [ELSE 'label'] END buckets (conditions as in WHERE),
    COALESCE(category, 'label') (missing values take the label), per-row numbers
    as above (traffickMonths / 12, yearOfRegistration - 2000: one key per value of
    their bounds from the declared ones, at most 1000), or BIN(col, k): k
    equal-width ranges over the declared bounds (1 <= k <= values, at most 10000),
    keys [low, high) and the last [low, max]; by expression, name, alias or
    position (BIN and numbers are selectable); every key of the declared or derived
    domain is returned, plus (missing); an open-domain column releases only the
    keys whose noisy count passes a threshold
  JOIN a public lookup table by key: [INNER | LEFT] JOIN regions r ON r.country =
    CountryOfExploitation (ISO alpha-2 to UN M49 region), or a table the dataset
    declares in node.toml ([[datasets.lookups]], published with its schema), then
    r.region in GROUP BY (a key per region) and in WHERE (=, <>, IN with an INNER
    JOIN; IS [NOT] NULL); joins between private datasets are refused
  applied by fedq query to the combined noisy answers (post-processing, no privacy
    cost): HAVING aggregate <op> number [AND ...]; ORDER BY group columns, aggregates,
    aliases or positions [DESC]; LIMIT n; ROUND(aggregate, digits); arithmetic over
    aggregates and numbers (+ - * /: ratios and percentages such as
    100.0 * SUM(flag) / COUNT(*)), shares of the result's total
    (COUNT(*) * 1.0 / SUM(COUNT(*)) OVER ()), with intervals that hold with at
    least 95% (a union bound over every released value they read)
  UNION ALL of such queries over one dataset, and the queries of fedq query --file,
    by fedq query: one query grouped by part, each part the full epsilon (parallel
    composition), when their WHERE clauses provably select disjoint records and
    they ask the same aggregates; else one query per part, the epsilon split
    evenly; the result says which, and a dry run plans the same split
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
    "SELECT traffickMonths / 12 AS years, COUNT(*) FROM cases GROUP BY years",
    "SELECT yearOfRegistration - 2000, COUNT(*) FROM cases GROUP BY 1",
    "SELECT BIN(traffickMonths, 10) AS months, COUNT(*) FROM cases GROUP BY months",
];
