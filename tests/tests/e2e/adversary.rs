//! A stateful, model-based adversary against one real node process (DESIGN
//! invariant 10; STYLE.md, "Testing like an adversary").
//!
//! A seeded generator drives a random sequence of operations against one
//! `fedq-node serve` process over real mutual TLS, serving two datasets
//! over the same synthetic CSV: `cases` (pure epsilon-DP) and `zcases`
//! (`measure = "zcdp"`). The operations: valid queries over every aggregate
//! (COUNT(*), COUNT(col), SUM, AVG, GROUP BY, MEDIAN/QUANTILE, HISTOGRAM,
//! VARIANCE, STDDEV) at awkward costs (0.1, 0.3, 1/3, 1.1, 1e-6, the
//! per-query maximum, rho equivalents, epsilon -0.0 beside a rho); dry runs;
//! retries of used ids with the same and with a different query; hostile
//! values in every field of every RPC (NaN, infinities, -0.0, negatives,
//! 1e308, subnormals, empty, oversized and malformed SQL, 8 kB unknown
//! dataset names, empty, overlong, non-ASCII and spaced query ids);
//! Prepare/Commit/Cancel, across analysts too; calls with the wrong
//! certificate (an auditor querying, an analyst or unlisted auditor
//! exporting, the node's own certificate); exports from random sequence
//! numbers; graceful restarts (with budget grants, hostile ones included,
//! while the node is stopped); SIGKILLs, idle and in the middle of a query.
//!
//! A model predicts each outcome (a dry run says whether the query plans and
//! what it costs; the Budget RPC says whether it fits; the model knows the
//! state of every id) and after EVERY step the node is checked from outside:
//! 1. it answers Describe with the audit key pinned at the start (and its
//!    `audit.pub` still holds that key); after a kill it restarts from its
//!    store;
//! 2. its exported log (ExportAudit as an auditor, written to a file)
//!    verifies with the separate `fedq-node audit verify` binary and the
//!    pinned key: the new entries every step (`--since`, linked by `prev`
//!    to the last entry seen), the whole log at the start, every 250 steps
//!    and at the end; and the whole export, read after every restart and
//!    every 10 steps, extends the previous one byte for byte (an entry once
//!    exported, signed, must survive a SIGKILL: an auditor holding the
//!    earlier export must never see a different entry at its place);
//! 3. for every analyst and dataset, the Budget RPC's spent equals the sum
//!    of `debited` + `reserved` - `reservation_returned` amounts in the log
//!    (a committed reservation logs no second debit: see `Ledger::commit`),
//!    and its remaining equals the limits plus the logged grants minus the
//!    logged spending;
//! 4. every answered id has exactly one net debit and one `released` entry,
//!    at the head its answer carried; no id is debited twice or released
//!    without a debit; nothing is debited that the model does not know of;
//! 5. no entry holds `null`, a row count, an exact statistic of the data
//!    (computed here from the CSV) or a released value; and released values
//!    are not the exact counts (weakly: not all of them over many cells,
//!    and never all of them when the noise scale is huge).
//!
//! And every call, hostile or not, gets an answer within 20 s, never
//! INTERNAL, UNKNOWN or UNAVAILABLE, with a message under 2 kB (no hostile
//! field echoed in full).
//!
//! Run it (the default, 120 steps, takes 10 to 15 s on two cores with a
//! debug build, plus building `fedq-node` if it is stale):
//!
//! ```text
//! cargo test -p fedq-tests --test e2e adversary -- --nocapture
//! ```
//!
//! The seed is random unless `FEDQ_ADVERSARY_SEED` is set; it is printed at
//! the start and in every failure, with the last operations. A long run
//! (budget limits grow with the number of steps, so that they run out near
//! the end of any run):
//!
//! ```text
//! FEDQ_ADVERSARY_STEPS=3000 FEDQ_ADVERSARY_SEED=42 \
//!   cargo test --release -p fedq-tests --test e2e adversary -- --nocapture
//! ```
//!
//! Figures (debug build, two shared cores): 120 steps, 10-15 s; 500 steps,
//! 50-70 s (about 650 log entries, 20-40 restarts and kills). The cost
//! grows faster than the steps: the verifier, a debug build, takes about
//! 10 ms per entry and checks the whole log every 250 steps; `--release`
//! makes that negligible.
//!
//! A seed reproduces the sequence of operations, not the timing: what a
//! SIGKILL interrupts and when an unused reservation expires vary, and the
//! model accepts every outcome those allow.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fedq_dp::accounting::Measure;
use fedq_engine::synth::Partner;
use fedq_node::config::BudgetLimits;
use fedq_pki::Role;
use fedq_plan::schema::parse_bool;
use fedq_proto::v1::node_client::NodeClient;
use fedq_proto::v1::{
    Budget, BudgetRequest, CancelRequest, CommitRequest, DescribeRequest, PrepareRequest,
    PrepareResponse, QueryRequest, QueryResponse,
};
use fedq_tests::{audit_verify, exact_counts, export_audit_text, ProcessNode};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use tonic::transport::Channel;
use tonic::{Code, Status};

type Client = NodeClient<Channel>;
type R<T> = Result<T, String>;

/// Returns the formatted error unless `$cond` holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        match $cond {
            true => {}
            false => return Err(format!($($fmt)+)),
        }
    };
}

/// The pure epsilon-DP dataset.
const PURE: &str = "cases";
/// The zCDP dataset (same data).
const ZCDP: &str = "zcases";
const PURE_MAX: f64 = 2.0;
const ZCDP_MAX: f64 = 0.5;
/// Analysts. `team` and `team/alice` are there because ledger keys joined
/// with `/` could confuse `team`'s id `alice/q1` with `team/alice`'s `q1`.
const ANALYSTS: [&str; 3] = ["alice", "team", "team/alice"];
/// In the node's `audit.auditors`.
const AUDITOR: &str = "auditor";
/// An auditor certificate the node does not list.
const STRANGER: &str = "eve";
/// Rows of the synthetic CSV: an odd number that nothing public equals.
const ROWS: usize = 1237;
const DEFAULT_STEPS: usize = 120;
const RPC_TIMEOUT: Duration = Duration::from_secs(20);
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How near its expiry a reservation's fate is left open (clock and
/// scheduling slack between this process and the node).
const EXPIRY_SLACK_MS: u64 = 700;
/// A node answering with these failed, whatever it was asked.
const FAILURES: [Code; 5] = [
    Code::Internal,
    Code::Unknown,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unimplemented,
];
/// The longest refusal message accepted: messages must not echo what a
/// hostile request sent (an 8 kB name, say) in full.
const MAX_MESSAGE: usize = 2048;

/// The budget limits of `dataset` for a run of `steps` steps: scaled with
/// the run's length, so that budgets run out near the end of a run of any
/// length (a run that exhausts them early only tests refusals after that).
/// Each scale is a whole number, so the limits stay round.
fn limits_of(dataset: &str, steps: usize) -> BudgetLimits {
    let scale = (steps as f64 / DEFAULT_STEPS as f64).ceil().max(1.0);
    let pure = BudgetLimits {
        keys_delta: None,
        keys_delta_per_analyst: None,
        keys_delta_total: None,
        per_analyst: 8.0 * scale,
        total: 12.0 * scale,
        per_query_max: PURE_MAX,
        measure: Measure::Pure,
        delta: None,
    };
    if dataset == ZCDP {
        BudgetLimits {
            per_analyst: 1.5 * scale,
            total: 2.5 * scale,
            per_query_max: ZCDP_MAX,
            measure: Measure::Zcdp,
            delta: Some(1e-7),
            ..pure
        }
    } else {
        pure
    }
}

type Filter = fn(&dyn Fn(&str) -> String) -> bool;

fn everything(_: &dyn Fn(&str) -> String) -> bool {
    true
}

fn forced_labour(get: &dyn Fn(&str) -> String) -> bool {
    parse_bool(&get("isForcedLabour")) == Some(true)
}

fn years_2015_2020(get: &dyn Fn(&str) -> String) -> bool {
    get("yearOfRegistration")
        .parse::<i64>()
        .is_ok_and(|y| (2015..=2020).contains(&y))
}

fn some_citizenships(get: &dyn Fn(&str) -> String) -> bool {
    ["UA", "MD", "PH"].contains(&get("citizenship").as_str())
}

/// Citizenship and country of exploitation both known and different
/// (a missing side makes the comparison unknown: not counted).
fn cross_border(get: &dyn Fn(&str) -> String) -> bool {
    let (a, b) = (get("citizenship"), get("CountryOfExploitation"));
    let known = |s: &str| !s.is_empty() && s != "-99";
    known(&a) && known(&b) && a != b
}

/// Valid queries (`{ds}` is the dataset) and, for COUNT(*)-only ones, how
/// to compute their exact counts from the CSV (grouping columns, filter).
#[allow(clippy::type_complexity)]
const TEMPLATES: &[(&str, Option<(&[&str], Filter)>)] = &[
    ("SELECT COUNT(*) FROM {ds}", Some((&[], everything))),
    (
        "SELECT gender, COUNT(*) FROM {ds} GROUP BY gender",
        Some((&["gender"], everything)),
    ),
    (
        "SELECT ageBroad, COUNT(*) FROM {ds} WHERE isForcedLabour = 1 GROUP BY ageBroad",
        Some((&["ageBroad"], forced_labour)),
    ),
    (
        "SELECT gender, ageBroad, COUNT(*) FROM {ds} WHERE yearOfRegistration BETWEEN 2015 AND 2020 GROUP BY gender, ageBroad",
        Some((&["gender", "ageBroad"], years_2015_2020)),
    ),
    (
        "SELECT Datasource, COUNT(*) FROM {ds} WHERE citizenship IN ('UA', 'MD', 'PH') GROUP BY Datasource",
        Some((&["Datasource"], some_citizenships)),
    ),
    (
        "SELECT CountryOfExploitation, citizenship, COUNT(*) FROM {ds} GROUP BY CountryOfExploitation, citizenship",
        Some((&["CountryOfExploitation", "citizenship"], everything)),
    ),
    ("SELECT COUNT(traffickMonths) FROM {ds}", None),
    ("SELECT SUM(traffickMonths) FROM {ds}", None),
    (
        "SELECT AVG(traffickMonths) FROM {ds} WHERE gender = 'Female'",
        None,
    ),
    (
        "SELECT gender, AVG(traffickMonths), COUNT(*) FROM {ds} GROUP BY gender",
        None,
    ),
    ("SELECT MEDIAN(traffickMonths) FROM {ds}", None),
    ("SELECT QUANTILE(traffickMonths, 0.9) FROM {ds}", None),
    (
        "SELECT QUANTILE(yearOfRegistration, 0.25) FROM {ds} WHERE isSexualExploit = 1",
        None,
    ),
    ("SELECT HISTOGRAM(traffickMonths, 12) FROM {ds}", None),
    ("SELECT VARIANCE(traffickMonths) FROM {ds}", None),
    (
        "SELECT STDDEV(traffickMonths) FROM {ds} WHERE NOT isForcedLabour = 1",
        None,
    ),
    (
        "SELECT ageBroad, VARIANCE(traffickMonths), STDDEV(traffickMonths) FROM {ds} GROUP BY ageBroad",
        None,
    ),
    (
        "select count(*), sum(traffickMonths) from {ds} where gender <> 'Male' or traffickMonths >= 12",
        None,
    ),
    (
        "SELECT gender, COUNT(*) FROM {ds} WHERE citizenship <> CountryOfExploitation GROUP BY gender",
        Some((&["gender"], cross_border)),
    ),
    (
        "SELECT CASE WHEN citizenship = CountryOfExploitation THEN 'domestic' ELSE 'other' END AS c, COUNT(*) FILTER (WHERE isForcedLabour < isSexualExploit), AVG(CASE WHEN traffickMonths >= yearOfRegistration THEN 1 ELSE 0 END) FROM {ds} GROUP BY c",
        None,
    ),
    (
        "SELECT COALESCE(gender, 'Unknown') AS g, SUM(traffickMonths + isForcedLabour), AVG(COALESCE(traffickMonths, 0) / 12) FROM {ds} WHERE COALESCE(yearOfRegistration, 0) >= 2010 GROUP BY g",
        None,
    ),
    (
        "SELECT r.region, COUNT(*) FROM {ds} JOIN regions r ON r.country = CountryOfExploitation WHERE r.region IN ('Asia', 'Europe') GROUP BY r.region",
        None,
    ),
];

/// What the test knows of the data, computed here from the CSV.
struct Truth {
    /// Exact COUNT(*) per cell, per template that has an exact form.
    counts: HashMap<usize, HashMap<Vec<String>, i64>>,
    /// Exact statistics that must appear in no log entry: the number of
    /// rows, the sum and count of `traffickMonths`, and every exact count
    /// of at least 100 (smaller integers collide with public numbers).
    secrets: HashSet<i64>,
}

impl Truth {
    fn of(csv: &std::path::Path) -> Truth {
        let mut counts = HashMap::new();
        let mut secrets = HashSet::from([ROWS as i64]);
        for (i, (_, exact)) in TEMPLATES.iter().enumerate() {
            if let Some((group, filter)) = exact {
                let c = exact_counts(csv, group, *filter);
                secrets.extend(c.values().copied().filter(|&v| v >= 100));
                counts.insert(i, c);
            }
        }
        let months = exact_counts(csv, &["traffickMonths"], |_| true);
        let (mut sum, mut present) = (0i64, 0i64);
        for (k, n) in &months {
            if let Ok(m) = k[0].parse::<i64>() {
                sum += m.clamp(0, 120) * n;
                present += n;
            }
        }
        secrets.extend([sum, present]);
        Truth { counts, secrets }
    }
}

/// One query as asked (the node's digest covers the SQL text, the
/// epsilon's and rho's bits and the dry-run flag).
#[derive(Clone, Debug)]
struct Req {
    dataset: &'static str,
    template: Option<usize>,
    sql: String,
    epsilon: f64,
    rho: f64,
}

impl Req {
    fn proto(&self, id: &str, dry_run: bool) -> QueryRequest {
        QueryRequest {
            query_id: id.into(),
            sql: self.sql.clone(),
            epsilon: self.epsilon,
            dry_run,
            rho: self.rho,
        }
    }

    fn same(&self, o: &Req) -> bool {
        self.sql == o.sql
            && self.epsilon.to_bits() == o.epsilon.to_bits()
            && self.rho.to_bits() == o.rho.to_bits()
    }

    fn text(&self) -> String {
        format!(
            "[{} eps {:?} rho {:?}] {}",
            self.dataset,
            self.epsilon,
            self.rho,
            short(&self.sql)
        )
    }
}

/// What the model knows of one (analyst, query id).
#[derive(Clone, Debug)]
enum IdState {
    /// Answered (by Query or Commit): the answer as first received.
    Released { req: Req, resp: QueryResponse },
    /// Reserved by Prepare: the dry run's plan, the expiry and the
    /// nano-units reserved.
    Reserved {
        req: Req,
        dry: QueryResponse,
        expires_ms: u64,
        nano: u64,
    },
    /// A reservation cancelled (or expired and swept).
    Returned { req: Req },
    /// The node was killed while the query ran: never debited, debited and
    /// pending, or released.
    Unknown { req: Req },
}

impl IdState {
    fn req(&self) -> &Req {
        match self {
            IdState::Released { req, .. }
            | IdState::Reserved { req, .. }
            | IdState::Returned { req }
            | IdState::Unknown { req } => req,
        }
    }
}

/// What the log says about one (analyst, query id).
#[derive(Default, Debug)]
struct IdLog {
    /// Debits and reservations minus reservations returned.
    net: i64,
    reserved: u32,
    /// `(seq, hash)` of its `released` entries.
    released: Vec<(u64, String)>,
}

/// The node's exported log as seen so far, and its sums.
#[derive(Default)]
struct LogView {
    text: String,
    lines: u64,
    last: Option<(u64, String)>,
    /// Net nano-units spent per (analyst, dataset).
    net: HashMap<(String, String), i128>,
    /// Net nano-units spent per dataset.
    dataset_net: HashMap<String, i128>,
    /// Nano-units granted per (analyst, dataset).
    granted: HashMap<(String, String), i128>,
    ids: HashMap<(String, String), IdLog>,
    kinds: BTreeMap<String, u64>,
}

impl LogView {
    /// Adds the JSON lines of `segment` (which must follow what was seen),
    /// checking every event against `forbidden` (exact statistics and
    /// released values).
    fn absorb(&mut self, segment: &str, forbidden: &HashSet<i64>) -> R<()> {
        for line in segment.lines() {
            let at = self.lines;
            let v: Value = serde_json::from_str(line).map_err(|e| {
                format!(
                    "exported line of seq {at} is not JSON ({e}): {}",
                    short(line)
                )
            })?;
            let seq = v["seq"].as_u64();
            ensure!(
                seq == Some(at),
                "exported line {} has seq {:?}; {at} was expected",
                at + 1,
                v["seq"]
            );
            let hash = v["hash"].as_str().unwrap_or_default().to_string();
            let prev = v["prev"].as_str().unwrap_or_default();
            if let Some((_, last)) = &self.last {
                ensure!(
                    prev == last,
                    "entry {at}'s prev does not link to entry {}'s hash",
                    at - 1
                );
            }
            let event = match &v["event"] {
                Value::String(s) => serde_json::from_str(s)
                    .map_err(|e| format!("entry {at}'s event is not JSON ({e})"))?,
                other => other.clone(),
            };
            scan(&event, "event", at, forbidden)?;
            let kind = event["type"].as_str().unwrap_or("?").to_string();
            let text = |k: &str| event[k].as_str().unwrap_or_default().to_string();
            let (analyst, dataset, id) = (text("analyst"), text("dataset"), text("query_id"));
            let amount =
                || -> R<i128> { Ok(nano(&event["epsilon"], at)? + nano(&event["rho"], at)?) };
            match kind.as_str() {
                "debited" | "reserved" => {
                    let a = amount()?;
                    *self
                        .net
                        .entry((analyst.clone(), dataset.clone()))
                        .or_default() += a;
                    *self.dataset_net.entry(dataset).or_default() += a;
                    let e = self.ids.entry((analyst, id)).or_default();
                    e.net += 1;
                    e.reserved += u32::from(kind == "reserved");
                }
                "reservation_returned" => {
                    let a = amount()?;
                    *self
                        .net
                        .entry((analyst.clone(), dataset.clone()))
                        .or_default() -= a;
                    *self.dataset_net.entry(dataset).or_default() -= a;
                    self.ids.entry((analyst, id)).or_default().net -= 1;
                }
                "released" => self
                    .ids
                    .entry((analyst, id))
                    .or_default()
                    .released
                    .push((at, hash.clone())),
                "budget_granted" => {
                    *self.granted.entry((analyst, dataset)).or_default() += amount()?;
                }
                _ => {}
            }
            *self.kinds.entry(kind).or_default() += 1;
            self.text.push_str(line);
            self.text.push('\n');
            self.last = Some((at, hash));
            self.lines += 1;
        }
        Ok(())
    }
}

/// Checks one event value: no `null` (a non-finite number that reached the
/// log), no row-count field, no number equal to a forbidden value. Keys
/// holding public structure (cell counts, refusal counts, times, noise
/// scales) are not compared.
fn scan(v: &Value, key: &str, seq: u64, forbidden: &HashSet<i64>) -> R<()> {
    const STRUCTURAL: [&str; 8] = [
        "values",
        "count",
        "expires_ms",
        "first_ms",
        "last_ms",
        "time_ms",
        "scale",
        "bins",
    ];
    match v {
        Value::Null if key != "before" => Err(format!(
            "entry {seq} holds null in {key:?}: a non-finite number reached the log (DESIGN invariant 7)"
        )),
        Value::Object(m) => {
            for (k, x) in m {
                ensure!(
                    !(k == "rows" || k.starts_with("rows_") || k == "row_count"),
                    "entry {seq} has a row count field {k:?} = {x}: an exact statistic in the log (DESIGN invariant 7)"
                );
                scan(x, k, seq, forbidden)?;
            }
            Ok(())
        }
        Value::Array(a) => a.iter().try_for_each(|x| scan(x, key, seq, forbidden)),
        _ if STRUCTURAL.contains(&key) => Ok(()),
        Value::Number(n) => check_number(n.as_f64(), key, seq, forbidden),
        Value::String(s) if s.bytes().any(|b| b.is_ascii_digit()) => {
            check_number(s.parse::<f64>().ok(), key, seq, forbidden)
        }
        _ => Ok(()),
    }
}

fn check_number(x: Option<f64>, key: &str, seq: u64, forbidden: &HashSet<i64>) -> R<()> {
    if let Some(x) = x {
        if x.fract() == 0.0 && x.abs() < 9.0e15 && forbidden.contains(&(x as i64)) {
            return Err(format!(
                "entry {seq} field {key:?} holds {x}, an exact statistic of the data or a released value (DESIGN invariants 2 and 7)"
            ));
        }
    }
    Ok(())
}

/// A logged amount in nano-units: a JSON number, or a decimal string (read
/// exactly when it has at most 9 decimals); absent is 0.
fn nano(v: &Value, seq: u64) -> R<i128> {
    match v {
        Value::Null => Ok(0),
        Value::Number(n) => {
            let x = n
                .as_f64()
                .ok_or_else(|| format!("entry {seq}: amount {n} is not a number"))?;
            Ok((x * 1e9).round() as i128)
        }
        Value::String(s) => {
            decimal_nano(s).ok_or_else(|| format!("entry {seq}: amount {s:?} is not a decimal"))
        }
        other => Err(format!("entry {seq}: amount {other} is not a number")),
    }
}

fn decimal_nano(s: &str) -> Option<i128> {
    let float = || {
        s.parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .map(|x| (x * 1e9).round() as i128)
    };
    if s.contains(['e', 'E']) {
        return float();
    }
    let (neg, body) = s.strip_prefix('-').map_or((false, s), |b| (true, b));
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if frac.len() > 9 && frac[9..].bytes().any(|b| b != b'0') {
        return float();
    }
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let n = int.parse::<i128>().ok()? * 1_000_000_000 + digits.parse::<i128>().ok()?;
    Some(if neg { -n } else { n })
}

/// What the node debits for a cost (the ledger rounds debits up).
fn nano_ceil(x: f64) -> u64 {
    (x * 1e9).ceil() as u64
}

/// An amount the node stated from whole nano-units, back in nano-units.
fn nano_round(x: f64) -> i128 {
    (x * 1e9).round() as i128
}

fn short(s: &str) -> String {
    if s.len() <= 60 {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(40).collect();
        format!("{head:?}...({} bytes)", s.len())
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn outcome<T>(r: &Result<T, Status>) -> String {
    match r {
        Ok(_) => "answered".into(),
        Err(s) => format!("{:?}: {}", s.code(), short(s.message())),
    }
}

/// Runs one RPC with a deadline; a node that fails (INTERNAL, UNAVAILABLE,
/// ...) or does not answer is an error, and so is a refusal message that
/// echoes a hostile request at length.
async fn rpc<T>(
    what: &str,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
) -> R<Result<T, Status>> {
    match tokio::time::timeout(RPC_TIMEOUT, call).await {
        Err(_) => Err(format!(
            "{what}: the node did not answer within {RPC_TIMEOUT:?}"
        )),
        Ok(r) => {
            if let Err(s) = &r {
                ensure!(
                    !FAILURES.contains(&s.code()),
                    "{what}: the node failed with {:?}: {}",
                    s.code(),
                    short(s.message())
                );
                ensure!(
                    s.message().len() <= MAX_MESSAGE,
                    "{what}: a {:?} message of {} bytes (more than {MAX_MESSAGE}): {}",
                    s.code(),
                    s.message().len(),
                    short(s.message())
                );
            }
            Ok(r.map(tonic::Response::into_inner))
        }
    }
}

fn expect_refused<T>(what: &str, got: &Result<T, Status>, allowed: &[Code]) -> R<()> {
    match got {
        Ok(_) => Err(format!(
            "{what}: answered; a refusal ({allowed:?}) was expected"
        )),
        Err(s) if allowed.contains(&s.code()) => Ok(()),
        Err(s) => Err(format!(
            "{what}: refused with {:?} ({}); {allowed:?} was expected",
            s.code(),
            short(s.message())
        )),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Query,
    DryRun,
    RetrySame,
    RetryDifferent,
    HostileQuery,
    HostilePrepare,
    Prepare,
    Commit,
    Cancel,
    WrongIdentity,
    Export,
    Restart,
    Kill,
    KillMidQuery,
}

const WEIGHTS: [(Op, u32); 14] = [
    (Op::Query, 28),
    (Op::DryRun, 5),
    (Op::RetrySame, 6),
    (Op::RetryDifferent, 3),
    (Op::HostileQuery, 20),
    (Op::HostilePrepare, 5),
    (Op::Prepare, 7),
    (Op::Commit, 7),
    (Op::Cancel, 4),
    (Op::WrongIdentity, 5),
    (Op::Export, 3),
    (Op::Restart, 3),
    (Op::Kill, 1),
    (Op::KillMidQuery, 2),
];

/// The node under test, the model and the checks.
struct World {
    seed: u64,
    steps: usize,
    rng: ChaCha8Rng,
    node: ProcessNode,
    clients: HashMap<&'static str, Client>,
    pinned_key: String,
    pinned_path: PathBuf,
    truth: Truth,
    ids: HashMap<(String, String), IdState>,
    next_id: u64,
    log: LogView,
    released_values: HashSet<i64>,
    noisy_equal: u64,
    noisy_total: u64,
    history: VecDeque<String>,
    ops: BTreeMap<Op, u64>,
    answered: u64,
    refused: u64,
    restarts: u64,
}

impl World {
    async fn set_up(seed: u64, steps: usize) -> World {
        let node = ProcessNode::create(
            (Partner::Ngo, ROWS, seed % 1000),
            &[
                (PURE, limits_of(PURE, steps)),
                (ZCDP, limits_of(ZCDP, steps)),
            ],
            |c| {
                // Rate limits are the flood test's subject; here they would
                // only make outcomes depend on timing.
                c.limits.queries_per_minute = 1_000_000;
            },
        );
        let truth = Truth::of(&node.node.csv);
        let pinned_path = node.dir.path().join("pinned-audit.pub");
        let mut w = World {
            seed,
            steps,
            rng: ChaCha8Rng::seed_from_u64(seed),
            node,
            clients: HashMap::new(),
            pinned_key: String::new(),
            pinned_path,
            truth,
            ids: HashMap::new(),
            next_id: 0,
            log: LogView::default(),
            released_values: HashSet::new(),
            noisy_equal: 0,
            noisy_total: 0,
            history: VecDeque::new(),
            ops: BTreeMap::new(),
            answered: 0,
            refused: 0,
            restarts: 0,
        };
        if let Err(e) = w.start().await {
            w.fail("set-up", e);
        }
        // Pin the key the node wrote at its first start: it must never change.
        let cfg = &w.node.node.config;
        let public = std::fs::read_to_string(cfg.resolve(&cfg.audit.public_key))
            .expect("the node wrote its audit public key");
        w.pinned_key = public.trim().to_string();
        std::fs::write(&w.pinned_path, &w.pinned_key).unwrap();
        // Every template plans on both datasets (else the generator, not
        // the node, is wrong).
        for (i, (sql, _)) in TEMPLATES.iter().enumerate() {
            for (ds, eps, rho) in [(PURE, 0.5, 0.0), (ZCDP, 0.0, 0.05)] {
                let req = Req {
                    dataset: ds,
                    template: Some(i),
                    sql: sql.replace("{ds}", ds),
                    epsilon: eps,
                    rho,
                };
                let mut c = w.client("alice");
                let r = rpc("template dry run", c.query(req.proto("setup", true))).await;
                if !matches!(r, Ok(Ok(_))) {
                    w.fail(
                        "set-up",
                        format!("template {} does not plan: {r:?}", req.text()),
                    );
                }
            }
        }
        if let Err(e) = w.check(true, true).await {
            w.fail("set-up", e);
        }
        w
    }

    /// Panics with the seed, the step, the last operations and the end of
    /// the node's stderr.
    fn fail(&self, at: &str, why: String) -> ! {
        let history: Vec<&str> = self.history.iter().map(String::as_str).collect();
        panic!(
            "adversary (seed {seed}) failed at {at}: {why}\n\nlast operations:\n  {}\n\nnode stderr ends:\n{}\n\nreproduce: FEDQ_ADVERSARY_SEED={seed} FEDQ_ADVERSARY_STEPS={steps} cargo test -p fedq-tests --test e2e adversary -- --nocapture",
            history.join("\n  "),
            self.node.stderr_tail(15),
            seed = self.seed,
            steps = self.steps,
        );
    }

    fn client(&self, who: &str) -> Client {
        self.clients
            .get(who)
            .unwrap_or_else(|| panic!("no client {who}"))
            .clone()
    }

    /// Starts the node from its store and connects every identity.
    async fn start(&mut self) -> R<()> {
        self.node.start(START_TIMEOUT).await?;
        self.clients.clear();
        let identities = ANALYSTS
            .iter()
            .map(|&a| (a, Role::Analyst))
            .chain([(AUDITOR, Role::Auditor), (STRANGER, Role::Auditor)]);
        for (name, role) in identities {
            let c = self
                .node
                .client(role, name)
                .await
                .map_err(|e| format!("cannot connect as {name}: {e}"))?;
            self.clients.insert(name, c);
        }
        Ok(())
    }

    fn pick_analyst(&mut self) -> &'static str {
        ANALYSTS.choose(&mut self.rng).unwrap()
    }

    /// A fresh query id, in one of the valid but awkward shapes; for
    /// `team`, often `alice/` + an id of `team/alice`.
    fn fresh_id(&mut self, who: &str) -> String {
        self.next_id += 1;
        let n = self.next_id;
        let base = format!("s{}-q{n}", self.seed % 10_000);
        match self.rng.random_range(0..10) {
            0 => format!("{base}/\"%\\'~{{}}"),
            1 => format!("{base}-{}", "x".repeat(128))[..128].to_string(),
            2 if who == "team" => {
                let theirs: Vec<&String> = self
                    .ids
                    .keys()
                    .filter(|(a, _)| a == "team/alice")
                    .map(|(_, id)| id)
                    .collect();
                match theirs.choose(&mut self.rng) {
                    Some(id) if id.len() <= 122 => format!("alice/{id}"),
                    _ => format!("alice/{base}"),
                }
            }
            _ => base,
        }
    }

    /// A valid query: any template, either dataset, an awkward cost.
    fn random_req(&mut self) -> Req {
        let dataset = if self.rng.random_bool(0.6) {
            PURE
        } else {
            ZCDP
        };
        let template = self.rng.random_range(0..TEMPLATES.len());
        let (epsilon, rho) = if dataset == PURE {
            let e = *[
                0.1,
                0.3,
                1.1,
                1.0 / 3.0,
                1e-6,
                PURE_MAX,
                0.5,
                1.0 / 7.0,
                0.05,
            ]
            .choose(&mut self.rng)
            .unwrap();
            (e, 0.0)
        } else if self.rng.random_bool(0.6) {
            let r = *[0.1, 0.3, 1.0 / 3.0, 1e-6, 1e-12, ZCDP_MAX, 0.05 / 3.0, 0.01]
                .choose(&mut self.rng)
                .unwrap();
            // -0.0 beside a rho: valid, and a different digest from 0.0.
            let e = if self.rng.random_bool(0.3) { -0.0 } else { 0.0 };
            (e, r)
        } else {
            // Epsilon on a zCDP ledger costs epsilon^2 / 2: 1.0 costs
            // exactly the maximum, 1.1 more than it.
            let e = *[0.1, 0.3, 1.0 / 3.0, 1.0, 1e-6, 1.1]
                .choose(&mut self.rng)
                .unwrap();
            (e, 0.0)
        };
        Req {
            dataset,
            template: Some(template),
            sql: TEMPLATES[template].0.replace("{ds}", dataset),
            epsilon,
            rho,
        }
    }

    async fn budget_of(&self, who: &str, dataset: &str) -> R<Budget> {
        let mut c = self.client(who);
        let b = rpc("Budget", c.budget(BudgetRequest {}))
            .await?
            .map_err(|s| format!("Budget as {who} refused: {s:?}"))?;
        b.budgets
            .into_iter()
            .find(|b| b.dataset == dataset)
            .ok_or_else(|| format!("Budget as {who} has no dataset {dataset}"))
    }

    /// Whether budget on `dataset` may come back by itself (a reservation
    /// that can expire), so that a refusal for budget cannot be predicted.
    fn budget_may_return(&self, dataset: &str) -> bool {
        self.ids.values().any(|s| {
            matches!(s, IdState::Reserved { req, .. } | IdState::Unknown { req } if req.dataset == dataset)
        })
    }

    async fn step(&mut self, op: Op) -> R<String> {
        *self.ops.entry(op).or_default() += 1;
        match op {
            Op::Query => {
                let who = self.pick_analyst();
                let id = self.fresh_id(who);
                let req = self.random_req();
                self.run_query(who, id, req).await
            }
            Op::RetrySame | Op::RetryDifferent => {
                // Prefer ids whose fate is unknown (killed mid-query).
                let unknown: Vec<(String, String)> = self
                    .ids
                    .iter()
                    .filter(|(_, s)| matches!(s, IdState::Unknown { .. }))
                    .map(|(k, _)| k.clone())
                    .collect();
                let mut all: Vec<(String, String)> = self.ids.keys().cloned().collect();
                all.sort();
                let pick = if !unknown.is_empty() && self.rng.random_bool(0.6) {
                    unknown.choose(&mut self.rng).cloned()
                } else {
                    all.choose(&mut self.rng).cloned()
                };
                let Some((who, id)) = pick else {
                    return Box::pin(self.step(Op::Query)).await;
                };
                let who = *ANALYSTS.iter().find(|a| **a == who).unwrap();
                let old = self.ids[&(who.to_string(), id.clone())].req().clone();
                let req = if op == Op::RetrySame {
                    old
                } else if self.rng.random_bool(0.3) {
                    // Only whitespace differs: still another query.
                    Req {
                        sql: format!("{} ", old.sql),
                        template: None,
                        ..old
                    }
                } else {
                    let mut r = self.random_req();
                    if r.same(&old) {
                        r.sql.push(' ');
                    }
                    r
                };
                self.run_query(who, id, req).await
            }
            Op::DryRun => self.op_dry_run().await,
            Op::HostileQuery => self.op_hostile(false).await,
            Op::HostilePrepare => self.op_hostile(true).await,
            Op::Prepare => self.op_prepare().await,
            Op::Commit => self.op_commit().await,
            Op::Cancel => self.op_cancel().await,
            Op::WrongIdentity => self.op_wrong_identity().await,
            Op::Export => self.op_export().await,
            Op::Restart => self.op_restart().await,
            Op::Kill => {
                self.node.kill();
                self.restarts += 1;
                self.start().await?;
                Ok("SIGKILL while idle, restarted".into())
            }
            Op::KillMidQuery => self.op_kill_mid_query().await,
        }
    }

    /// A dry run, then the query, each outcome checked against the model.
    async fn run_query(&mut self, who: &'static str, id: String, req: Req) -> R<String> {
        let before = self.budget_of(who, req.dataset).await?;
        let mut c = self.client(who);
        let dry = rpc("dry run", c.query(req.proto(&id, true))).await?;
        if let Ok(d) = &dry {
            check_dry(&id, d)?;
        }
        let real = rpc("Query", c.query(req.proto(&id, false))).await?;
        let key = (who.to_string(), id.clone());
        let what = format!("{who} Query {id:?} {}", req.text());
        let prior = self.ids.get(&key).cloned();
        let fits = dry
            .as_ref()
            .map(|d| i128::from(nano_ceil(d.cost)) <= nano_round(before.remaining_for_analyst))
            .unwrap_or(false);
        let may_return = self.budget_may_return(req.dataset);
        // A query that reaches the ledger afresh.
        let fresh = |got: &Result<QueryResponse, Status>| -> R<()> {
            match got {
                Ok(r) if !r.replayed && (fits || may_return) => Ok(()),
                Err(s) if s.code() == Code::ResourceExhausted && !fits => Ok(()),
                other => Err(format!(
                    "{what}: {} although it {} the remaining budget ({}, cost {:?})",
                    outcome(other),
                    if fits { "fits" } else { "exceeds" },
                    before.remaining_for_analyst,
                    dry.as_ref().map(|d| d.cost).ok()
                )),
            }
        };
        match (&dry, &prior) {
            (Err(d), _) => ensure!(
                matches!(&real, Err(s) if s.code() == d.code()),
                "{what}: the dry run was refused with {:?} but the query: {}",
                d.code(),
                outcome(&real)
            ),
            (Ok(_), Some(IdState::Unknown { req: old })) => {
                let same = old.same(&req);
                let ok = match &real {
                    Ok(_) => true,
                    Err(s) => {
                        (s.code() == Code::AlreadyExists && !same)
                            || s.code() == Code::ResourceExhausted
                    }
                };
                ensure!(ok, "{what}: {} after a kill mid-query", outcome(&real));
            }
            (Ok(_), Some(state)) if !state.req().same(&req) => ensure!(
                matches!(&real, Err(s) if s.code() == Code::AlreadyExists),
                "{what}: the id was used for {} and the query got: {}",
                state.req().text(),
                outcome(&real)
            ),
            (Ok(_), Some(IdState::Released { resp, .. })) => {
                let r = real
                    .as_ref()
                    .map_err(|s| format!("{what}: a retry was refused: {s:?}"))?;
                ensure!(r.replayed, "{what}: a retry was not marked replayed");
                same_release(&what, resp, r)?;
            }
            (Ok(_), Some(IdState::Reserved { expires_ms, .. })) => {
                if now_ms() + EXPIRY_SLACK_MS < *expires_ms {
                    ensure!(
                        matches!(&real, Err(s) if s.code() == Code::FailedPrecondition),
                        "{what}: the id holds a live reservation, and the query got: {}",
                        outcome(&real)
                    );
                } else if !matches!(&real, Err(s) if s.code() == Code::FailedPrecondition) {
                    fresh(&real)?;
                }
            }
            (Ok(_), Some(IdState::Returned { .. }) | None) => fresh(&real)?,
        }
        match &real {
            Ok(r) => {
                self.answered += 1;
                self.check_answer(who, &id, &req, dry.as_ref().ok(), r)?;
                if !matches!(prior, Some(IdState::Released { .. })) {
                    self.ids.insert(
                        key,
                        IdState::Released {
                            req: req.clone(),
                            resp: r.clone(),
                        },
                    );
                }
            }
            Err(s) => {
                self.refused += 1;
                // An unknown query refused for budget was never debited.
                if s.code() == Code::ResourceExhausted
                    && matches!(prior, Some(IdState::Unknown { .. }))
                {
                    self.ids.remove(&key);
                }
            }
        }
        Ok(format!("{what}: {}", outcome(&real)))
    }

    /// Checks an answer against its request and dry run; records its
    /// values, and compares COUNT(*) values with the exact counts.
    fn check_answer(
        &mut self,
        who: &str,
        id: &str,
        req: &Req,
        dry: Option<&QueryResponse>,
        r: &QueryResponse,
    ) -> R<()> {
        ensure!(
            r.query_id == id && r.dataset == req.dataset && !r.dry_run,
            "{who} {id:?}: the answer is for {:?} on {:?} (dry run {})",
            r.query_id,
            r.dataset,
            r.dry_run
        );
        ensure!(r.audit_head.is_some(), "{who} {id:?}: no audit head");
        if let Some(d) = dry {
            ensure!(
                d.cells == r.cells && d.measurements.len() == r.measurements.len(),
                "{who} {id:?}: the answer's cells or measurements differ from the dry run's"
            );
            for (a, b) in d.measurements.iter().zip(&r.measurements) {
                ensure!(
                    a.label == b.label
                        && a.mechanism == b.mechanism
                        && a.scale.to_bits() == b.scale.to_bits(),
                    "{who} {id:?}: measurement {} ({}, scale {}) differs from the dry run's ({}, scale {})",
                    b.label,
                    b.mechanism,
                    b.scale,
                    a.mechanism,
                    a.scale
                );
            }
            ensure!(
                d.cost.to_bits() == r.cost.to_bits(),
                "{who} {id:?}: cost {} where the dry run said {}",
                r.cost,
                d.cost
            );
        }
        for m in &r.measurements {
            let per_cell = m.bins.max(1) as usize;
            ensure!(
                m.values.len() == r.cells.len() * per_cell,
                "{who} {id:?}: {} has {} values for {} cells",
                m.label,
                m.values.len(),
                r.cells.len()
            );
            self.released_values
                .extend(m.values.iter().copied().filter(|v| v.abs() >= 100));
        }
        let exact = req.template.and_then(|t| self.truth.counts.get(&t));
        if let (Some(exact), false) = (exact, r.replayed) {
            for m in r.measurements.iter().filter(|m| m.label == "COUNT(*)") {
                let mut equal = 0;
                for (cell, v) in r.cells.iter().zip(&m.values) {
                    let truth = exact.get(&cell.values).copied().unwrap_or(0);
                    equal += usize::from(*v == truth);
                }
                self.noisy_equal += equal as u64;
                self.noisy_total += m.values.len() as u64;
                ensure!(
                    m.scale < 1e4 || equal < m.values.len(),
                    "{who} {id:?}: every COUNT(*) value is exact although the noise scale is {}",
                    m.scale
                );
            }
        }
        Ok(())
    }

    async fn op_dry_run(&mut self) -> R<String> {
        let who = self.pick_analyst();
        let req = self.random_req();
        let id = match self.rng.random_bool(0.3) {
            true => self
                .ids
                .keys()
                .find(|(a, _)| a == who)
                .map(|(_, id)| id.clone())
                .unwrap_or_else(|| "dry".into()),
            false => self.fresh_id(who),
        };
        let before = self.budget_of(who, req.dataset).await?;
        let mut c = self.client(who);
        let dry = rpc("dry run", c.query(req.proto(&id, true))).await?;
        if let Ok(d) = &dry {
            check_dry(&id, d)?;
        }
        let after = self.budget_of(who, req.dataset).await?;
        ensure!(
            after.spent_by_analyst <= before.spent_by_analyst,
            "a dry run spent: {} then {}",
            before.spent_by_analyst,
            after.spent_by_analyst
        );
        Ok(format!(
            "{who} dry run {id:?} {}: {}",
            req.text(),
            outcome(&dry)
        ))
    }

    /// A hostile Query (or Prepare): a valid request with one or more
    /// fields made hostile. It must be refused, spend nothing, and leave a
    /// node that passes every check.
    async fn op_hostile(&mut self, prepare: bool) -> R<String> {
        let who = self.pick_analyst();
        let mut req = self.random_req();
        let mut id = self.fresh_id(who);
        let nan = f64::NAN;
        let (inf, ninf) = (f64::INFINITY, f64::NEG_INFINITY);
        let mut allowed = vec![Code::InvalidArgument];
        let mut hold_ms = 60_000;
        let mut no_query = false;
        let kind = self.rng.random_range(0..14);
        match kind {
            0 => {
                let mut bad = vec![nan, inf, ninf, -0.0, -0.1, 0.0, 1e308, f64::MAX, -1e308];
                bad.extend([5e-324, f64::MIN_POSITIVE, 1e-7, -f64::MIN_POSITIVE]);
                if req.dataset == PURE {
                    bad.push(PURE_MAX.next_up());
                    bad.push(1000.0);
                }
                req.epsilon = *bad.choose(&mut self.rng).unwrap();
                req.rho = 0.0;
            }
            1 => {
                req.dataset = ZCDP;
                req.sql = TEMPLATES[0].0.replace("{ds}", ZCDP);
                req.epsilon = 0.0;
                req.rho = *[
                    nan,
                    inf,
                    ninf,
                    -0.0,
                    -0.05,
                    0.0,
                    1e308,
                    5e-324,
                    1e-13,
                    ZCDP_MAX.next_up(),
                ]
                .choose(&mut self.rng)
                .unwrap();
            }
            2 => {
                // A non-finite rho beside a valid epsilon, or the reverse.
                if self.rng.random_bool(0.5) {
                    req.rho = *[nan, inf, ninf].choose(&mut self.rng).unwrap();
                    req.epsilon = 0.3;
                } else {
                    req.epsilon = *[nan, inf, ninf].choose(&mut self.rng).unwrap();
                    req.rho = 0.1;
                }
            }
            3 => {
                // Both costs.
                req.epsilon = 0.1;
                req.rho = 0.1;
            }
            4 => {
                // A rho on the pure dataset: zCDP does not imply pure DP.
                req.dataset = PURE;
                req.sql = TEMPLATES[1].0.replace("{ds}", PURE);
                req.epsilon = 0.0;
                req.rho = 0.1;
                allowed.push(Code::FailedPrecondition);
            }
            5 => req.sql = String::new(),
            6 => {
                // Over the node's 8 kB SQL limit, under the request limit.
                req.sql = format!("{}{}", req.sql, " ".repeat(9000));
            }
            7 => {
                // Over the 64 kB request limit.
                req.sql = format!(
                    "SELECT COUNT(*) FROM {} -- {}",
                    req.dataset,
                    "z".repeat(70_000)
                );
                allowed.extend([Code::OutOfRange, Code::ResourceExhausted]);
            }
            8 => {
                let ds = req.dataset;
                let nested = format!("{}1{}", "(".repeat(3000), ")".repeat(3000));
                let ors = vec!["gender = 'Male'"; 300].join(" OR ");
                let bad = [
                    "SELEC COUNT(*) FRM {ds}".to_string(),
                    "SELECT COUNT(* FROM {ds}".into(),
                    "SELECT COUNT(*) FROM {ds}; DROP TABLE {ds}".into(),
                    "SELECT\0COUNT(*) FROM {ds}".into(),
                    "SELECT COUNT(*) FROM {ds} WHERE gender = 'Fe".into(),
                    ")))(((".into(),
                    "SELECT * FROM {ds}".into(),
                    "SELECT COUNT(*) FROM {ds} JOIN cases ON 1 = 1".into(),
                    "SELECT nosuchcolumn, COUNT(*) FROM {ds} GROUP BY nosuchcolumn".into(),
                    "SELECT QUANTILE(traffickMonths, 1.5) FROM {ds}".into(),
                    "SELECT HISTOGRAM(traffickMonths, 0) FROM {ds}".into(),
                    "SELECT HISTOGRAM(traffickMonths, 99999999999) FROM {ds}".into(),
                    "SELECT SUM(gender) FROM {ds}".into(),
                    "SELECT COUNT(*) FROM {ds} GROUP BY CountryOfExploitation, citizenship, ageBroad, gender, Datasource".into(),
                    format!("SELECT COUNT(*) FROM {{ds}} WHERE yearOfRegistration > {nested}"),
                    format!("SELECT COUNT(*) FROM {{ds}} WHERE {ors}"),
                    "SELECT COUNT(*) FROM {ds} WHERE gender = 'Female' \u{2028} OR ☃".into(),
                ];
                req.sql = bad.choose(&mut self.rng).unwrap().replace("{ds}", ds);
                allowed.push(Code::NotFound);
            }
            9 => {
                req.sql = format!("SELECT COUNT(*) FROM {}", "x".repeat(8000));
                allowed.push(Code::NotFound);
            }
            10 => {
                req.sql = "SELECT COUNT(*) FROM \"cäsés\"".into();
                allowed.push(Code::NotFound);
            }
            11 => {
                id = [
                    String::new(),
                    "a".repeat(129),
                    "q".repeat(8000),
                    "with space".into(),
                    "é".into(),
                    "日本".into(),
                    "tab\there".into(),
                    "nl\nx".into(),
                    "\0".into(),
                    "q\u{7f}".into(),
                ]
                .choose(&mut self.rng)
                .unwrap()
                .clone();
            }
            12 => {
                id = String::new();
                req.epsilon = nan;
                req.rho = inf;
                req.sql = "?".repeat(9000);
            }
            _ if prepare => {
                if self.rng.random_bool(0.5) {
                    no_query = true;
                } else {
                    // A dry run cannot be prepared; it is sent as one below.
                    hold_ms = u64::MAX;
                }
            }
            _ => {
                // A hostile dry run: refused like the real one.
                req.epsilon = *[nan, inf, -1.0].choose(&mut self.rng).unwrap();
            }
        }
        let dry_run = (kind >= 13 && !no_query) || self.rng.random_bool(0.15);
        let before = self.budget_of(who, req.dataset).await.ok();
        let mut c = self.client(who);
        let what = format!(
            "{who} hostile {} {} {} dry_run {dry_run}",
            if prepare { "Prepare" } else { "Query" },
            short(&id),
            req.text()
        );
        let got = if prepare {
            let query = (!no_query).then(|| req.proto(&id, dry_run));
            rpc(
                &what,
                c.prepare(PrepareRequest {
                    query,
                    hold_ms,
                    secure_aggregation: Default::default(),
                }),
            )
            .await?
            .map(|_| ())
        } else {
            rpc(&what, c.query(req.proto(&id, dry_run)))
                .await?
                .map(|_| ())
        };
        expect_refused(&what, &got, &allowed)?;
        self.refused += 1;
        if let Some(before) = before {
            let after = self.budget_of(who, req.dataset).await?;
            ensure!(
                after.spent_by_analyst <= before.spent_by_analyst,
                "{what}: refused, yet spent went from {} to {}",
                before.spent_by_analyst,
                after.spent_by_analyst
            );
        }
        Ok(format!("{what}: {}", outcome(&got)))
    }

    async fn op_prepare(&mut self) -> R<String> {
        let who = self.pick_analyst();
        let own: Vec<String> = self
            .ids
            .keys()
            .filter(|(a, _)| a == who)
            .map(|(_, id)| id.clone())
            .collect();
        let (id, req) = match own.choose(&mut self.rng) {
            Some(id) if self.rng.random_bool(0.25) => {
                let old = self.ids[&(who.to_string(), id.clone())].req().clone();
                let req = if self.rng.random_bool(0.7) {
                    old
                } else {
                    self.random_req()
                };
                (id.clone(), req)
            }
            _ => (self.fresh_id(who), self.random_req()),
        };
        let hold_ms = *[0, 1500, 4000, 60_000, u64::MAX]
            .choose(&mut self.rng)
            .unwrap();
        let before = self.budget_of(who, req.dataset).await?;
        let mut c = self.client(who);
        let dry = rpc("dry run", c.query(req.proto(&id, true))).await?;
        let sent = now_ms();
        let got = rpc(
            "Prepare",
            c.prepare(PrepareRequest {
                secure_aggregation: Default::default(),
                query: Some(req.proto(&id, false)),
                hold_ms,
            }),
        )
        .await?;
        let what = format!("{who} Prepare {id:?} hold {hold_ms} {}", req.text());
        let key = (who.to_string(), id.clone());
        let prior = self.ids.get(&key).cloned();
        let nano = dry.as_ref().map(|d| nano_ceil(d.cost)).unwrap_or(0);
        let fits = i128::from(nano) <= nano_round(before.remaining_for_analyst);
        let may_return = self.budget_may_return(req.dataset);
        let fresh_ok = |p: &PrepareResponse| -> R<()> {
            let hold = hold_ms.clamp(1000, 60_000);
            ensure!(
                p.expires_at_ms + 2000 >= sent + hold && p.expires_at_ms <= now_ms() + hold + 2000,
                "{what}: expires at {} for a hold of {hold} ms asked at {sent}",
                p.expires_at_ms
            );
            Ok(())
        };
        match (&dry, &prior) {
            (Err(d), _) => ensure!(
                matches!(&got, Err(s) if s.code() == d.code()),
                "{what}: the dry run was refused with {:?} but Prepare: {}",
                d.code(),
                outcome(&got)
            ),
            (Ok(_), Some(IdState::Unknown { .. })) => {}
            (Ok(_), Some(state)) if !state.req().same(&req) => ensure!(
                matches!(&got, Err(s) if s.code() == Code::AlreadyExists),
                "{what}: the id was used for {}, and Prepare: {}",
                state.req().text(),
                outcome(&got)
            ),
            (Ok(_), Some(IdState::Released { .. })) => ensure!(
                matches!(&got, Ok(p) if p.expires_at_ms == 0),
                "{what}: the id was released; Prepare should say so (expires 0): {got:?}"
            ),
            (Ok(_), Some(IdState::Reserved { expires_ms, .. })) => {
                if now_ms() + EXPIRY_SLACK_MS < *expires_ms {
                    ensure!(
                        matches!(&got, Ok(p) if p.expires_at_ms == *expires_ms),
                        "{what}: preparing again should return the same reservation: {got:?}"
                    );
                }
            }
            (Ok(_), Some(IdState::Returned { .. }) | None) => match &got {
                Ok(p) if fits || may_return => fresh_ok(p)?,
                Err(s) if s.code() == Code::ResourceExhausted && !fits => {}
                other => {
                    return Err(format!(
                        "{what}: {} although the cost {} the remaining budget {}",
                        outcome(other),
                        if fits { "fits" } else { "exceeds" },
                        before.remaining_for_analyst
                    ))
                }
            },
        }
        match (&got, &dry) {
            (Ok(p), Ok(d)) if p.expires_at_ms > 0 => {
                self.ids.insert(
                    key,
                    IdState::Reserved {
                        req: req.clone(),
                        dry: d.clone(),
                        expires_ms: p.expires_at_ms,
                        nano,
                    },
                );
            }
            (Ok(_), _) => {}
            (Err(_), _) => self.refused += 1,
        }
        Ok(format!("{what}: {}", outcome(&got)))
    }

    fn ids_where(&self, f: impl Fn(&str, &IdState) -> bool) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .ids
            .iter()
            .filter(|((a, _), s)| f(a, s))
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }

    fn hostile_id(&mut self) -> String {
        [
            String::new(),
            "q".repeat(8000),
            "日本".into(),
            "with space".into(),
            "never-prepared".into(),
            "\0".into(),
        ]
        .choose(&mut self.rng)
        .unwrap()
        .clone()
    }

    async fn op_commit(&mut self) -> R<String> {
        let reserved = self.ids_where(|_, s| matches!(s, IdState::Reserved { .. }));
        let released = self.ids_where(|_, s| matches!(s, IdState::Released { .. }));
        let returned = self.ids_where(|_, s| matches!(s, IdState::Returned { .. }));
        let roll = self.rng.random_range(0..100);
        let (who, id, target): (&'static str, String, Option<(String, String)>) =
            if roll < 55 && !reserved.is_empty() {
                let k = reserved.choose(&mut self.rng).unwrap().clone();
                (static_analyst(&k.0), k.1.clone(), Some(k))
            } else if roll < 65 && !reserved.is_empty() {
                // Someone else's reservation.
                let k = reserved.choose(&mut self.rng).unwrap().clone();
                let other = *ANALYSTS.iter().find(|a| **a != k.0).unwrap();
                if self.ids.contains_key(&(other.to_string(), k.1.clone())) {
                    return Box::pin(self.step(Op::Query)).await;
                }
                (other, k.1.clone(), None)
            } else if roll < 75 && !released.is_empty() {
                let k = released.choose(&mut self.rng).unwrap().clone();
                (static_analyst(&k.0), k.1.clone(), Some(k))
            } else if roll < 85 && !returned.is_empty() {
                let k = returned.choose(&mut self.rng).unwrap().clone();
                (static_analyst(&k.0), k.1.clone(), Some(k))
            } else {
                let who = self.pick_analyst();
                let id = self.hostile_id();
                if self.ids.contains_key(&(who.to_string(), id.clone())) {
                    return Box::pin(self.step(Op::Query)).await;
                }
                (who, id, None)
            };
        let what = format!("{who} Commit {}", short(&id));
        let mut c = self.client(who);
        let got = rpc(
            &what,
            c.commit(CommitRequest {
                participants: Default::default(),
                query_id: id.clone(),
            }),
        )
        .await?;
        let state = target.as_ref().and_then(|k| self.ids.get(k)).cloned();
        match state {
            Some(IdState::Reserved {
                req,
                dry,
                expires_ms,
                ..
            }) => {
                let now = now_ms();
                let live = now + EXPIRY_SLACK_MS < expires_ms;
                let dead = now > expires_ms + EXPIRY_SLACK_MS;
                match &got {
                    Ok(r) if !dead && !r.replayed => {
                        self.check_answer(who, &id, &req, Some(&dry), r)?;
                        self.answered += 1;
                        self.ids.insert(
                            target.clone().unwrap(),
                            IdState::Released {
                                req,
                                resp: r.clone(),
                            },
                        );
                    }
                    Err(s) if !live && s.code() == Code::FailedPrecondition => {}
                    other => {
                        return Err(format!(
                            "{what}: {} for a reservation expiring at {expires_ms} (now {now})",
                            outcome(other)
                        ))
                    }
                }
            }
            Some(IdState::Released { resp, .. }) => {
                let r = got
                    .as_ref()
                    .map_err(|s| format!("{what}: a Commit of a released id was refused: {s:?}"))?;
                ensure!(r.replayed, "{what}: not marked replayed");
                same_release(&what, &resp, r)?;
            }
            Some(_) | None => expect_refused(
                &what,
                &got,
                &[Code::FailedPrecondition, Code::InvalidArgument],
            )?,
        }
        if got.is_err() {
            self.refused += 1;
        }
        Ok(format!("{what}: {}", outcome(&got)))
    }

    async fn op_cancel(&mut self) -> R<String> {
        let reserved = self.ids_where(|_, s| matches!(s, IdState::Reserved { .. }));
        let other_ids = self.ids_where(|_, s| !matches!(s, IdState::Reserved { .. }));
        let roll = self.rng.random_range(0..100);
        let (who, id, mine) = if roll < 50 && !reserved.is_empty() {
            let k = reserved.choose(&mut self.rng).unwrap().clone();
            (static_analyst(&k.0), k.1.clone(), true)
        } else if roll < 65 && !reserved.is_empty() {
            let k = reserved.choose(&mut self.rng).unwrap().clone();
            let other = *ANALYSTS.iter().find(|a| **a != k.0).unwrap();
            if self.ids.contains_key(&(other.to_string(), k.1.clone())) {
                return Box::pin(self.step(Op::Query)).await;
            }
            (other, k.1, false)
        } else if roll < 80 && !other_ids.is_empty() {
            let k = other_ids.choose(&mut self.rng).unwrap().clone();
            (static_analyst(&k.0), k.1, false)
        } else {
            let who = self.pick_analyst();
            let id = self.hostile_id();
            if self.ids.contains_key(&(who.to_string(), id.clone())) {
                return Box::pin(self.step(Op::Query)).await;
            }
            (who, id, false)
        };
        let what = format!("{who} Cancel {}", short(&id));
        let mut c = self.client(who);
        let got = rpc(
            &what,
            c.cancel(CancelRequest {
                query_id: id.clone(),
            }),
        )
        .await?;
        let key = (who.to_string(), id.clone());
        match (mine, self.ids.get(&key).cloned()) {
            (
                true,
                Some(IdState::Reserved {
                    req,
                    expires_ms,
                    nano,
                    ..
                }),
            ) => {
                let r = got
                    .as_ref()
                    .map_err(|s| format!("{what}: refused: {s:?}"))?;
                let back = nano_round(r.epsilon_returned);
                let live = now_ms() + EXPIRY_SLACK_MS < expires_ms;
                ensure!(
                    back == i128::from(nano) || (!live && back == 0),
                    "{what}: returned {} ({back} nano) of a reservation of {nano} nano",
                    r.epsilon_returned
                );
                self.ids.insert(key, IdState::Returned { req });
            }
            (_, state) => match &got {
                Ok(r) => ensure!(
                    r.epsilon_returned == 0.0,
                    "{what}: returned {} although {who} holds no reservation under it ({state:?})",
                    r.epsilon_returned
                ),
                Err(_) => expect_refused(&what, &got, &[Code::InvalidArgument])?,
            },
        }
        Ok(format!("{what}: {}", outcome(&got)))
    }

    /// Calls by identities that may not make them.
    async fn op_wrong_identity(&mut self) -> R<String> {
        let req = self.random_req();
        let reserved = self.ids_where(|_, s| matches!(s, IdState::Reserved { .. }));
        let some_reserved = reserved
            .choose(&mut self.rng)
            .map(|k| k.1.clone())
            .unwrap_or_else(|| "x".into());
        let denied = [Code::PermissionDenied];
        let kind = self.rng.random_range(0..10);
        let (what, got): (String, Result<(), Status>) = match kind {
            0 => {
                let mut c = self.client(AUDITOR);
                let r = rpc("auditor Query", c.query(req.proto("aud-1", false))).await?;
                ("auditor Query".into(), r.map(|_| ()))
            }
            1 => {
                let mut c = self.client(AUDITOR);
                let p = PrepareRequest {
                    secure_aggregation: Default::default(),
                    query: Some(req.proto("aud-2", false)),
                    hold_ms: 60_000,
                };
                let r = rpc("auditor Prepare", c.prepare(p)).await?;
                ("auditor Prepare".into(), r.map(|_| ()))
            }
            2 => {
                let mut c = self.client(AUDITOR);
                let r = rpc(
                    "auditor Commit",
                    c.commit(CommitRequest {
                        participants: Default::default(),
                        query_id: some_reserved.clone(),
                    }),
                )
                .await?;
                (format!("auditor Commit {some_reserved}"), r.map(|_| ()))
            }
            3 => {
                let mut c = self.client(AUDITOR);
                let r = rpc(
                    "auditor Cancel",
                    c.cancel(CancelRequest {
                        query_id: some_reserved.clone(),
                    }),
                )
                .await?;
                let r = match r {
                    // Nothing of the auditor's own can be cancelled; a
                    // Cancel answered with nothing returned is no harm.
                    Ok(c) if c.epsilon_returned == 0.0 => Err(Status::permission_denied("")),
                    other => other.map(|_| ()),
                };
                (format!("auditor Cancel {some_reserved}"), r)
            }
            4 => {
                let mut c = self.client(AUDITOR);
                let r = rpc("auditor Budget", c.budget(BudgetRequest {})).await?;
                ("auditor Budget".into(), r.map(|_| ()))
            }
            5 => {
                let who = self.pick_analyst();
                let mut c = self.client(who);
                let r = tokio::time::timeout(RPC_TIMEOUT, export_audit_text(&mut c, 0))
                    .await
                    .map_err(|_| "analyst ExportAudit: no answer".to_string())?;
                (format!("{who} ExportAudit"), r.map(|_| ()))
            }
            6 => {
                let mut c = self.client(STRANGER);
                let r = tokio::time::timeout(RPC_TIMEOUT, export_audit_text(&mut c, 0))
                    .await
                    .map_err(|_| "unlisted auditor ExportAudit: no answer".to_string())?;
                ("unlisted auditor ExportAudit".into(), r.map(|_| ()))
            }
            7 => {
                let mut c = self.client(STRANGER);
                let r = rpc("unlisted auditor Query", c.query(req.proto("eve-1", false))).await?;
                ("unlisted auditor Query".into(), r.map(|_| ()))
            }
            _ => {
                // The node's own certificate as a client: refused at the
                // handshake or by role.
                let certs = self.node.node.config.base_dir.join("certs");
                let conn = self
                    .node
                    .connect_with(&certs.join("node.pem"), &certs.join("node.key"))
                    .await;
                let r = match conn {
                    Err(_) => Err(Status::permission_denied("refused at the handshake")),
                    Ok(mut c) => {
                        if kind == 8 {
                            rpc("node-cert Query", c.query(req.proto("node-1", false)))
                                .await
                                .unwrap_or_else(|e| Err(Status::permission_denied(e)))
                                .map(|_| ())
                        } else {
                            tokio::time::timeout(RPC_TIMEOUT, export_audit_text(&mut c, 0))
                                .await
                                .unwrap_or_else(|_| Err(Status::permission_denied("")))
                                .map(|_| ())
                        }
                    }
                };
                // Refused at the handshake (any status) or by role.
                let r = r.map_err(|_| Status::permission_denied(""));
                ("node certificate as a client".into(), r)
            }
        };
        if let Err(s) = &got {
            ensure!(
                !FAILURES.contains(&s.code()) || kind >= 8,
                "{what}: the node failed: {s:?}"
            );
        }
        expect_refused(&what, &got, &denied)?;
        self.refused += 1;
        Ok(format!("{what}: {}", outcome(&got)))
    }

    /// An export from a random sequence number: byte for byte the tail of
    /// the whole export, and it verifies on its own with `--since`.
    async fn op_export(&mut self) -> R<String> {
        let n = self.log.lines;
        let since = *[0, 1, n.saturating_sub(1), n, n + 100, u64::MAX, n / 2]
            .choose(&mut self.rng)
            .unwrap();
        let mut c = self.client(AUDITOR);
        let part = tokio::time::timeout(RPC_TIMEOUT, export_audit_text(&mut c, since))
            .await
            .map_err(|_| "ExportAudit: no answer".to_string())?
            .map_err(|s| format!("ExportAudit since {since} failed: {s:?}"))?;
        let whole = tokio::time::timeout(RPC_TIMEOUT, export_audit_text(&mut c, 0))
            .await
            .map_err(|_| "ExportAudit: no answer".to_string())?
            .map_err(|s| format!("ExportAudit failed: {s:?}"))?;
        let tail: String = whole
            .lines()
            .skip(usize::try_from(since).unwrap_or(usize::MAX))
            .map(|l| format!("{l}\n"))
            .collect();
        // Entries may be appended between the two calls (an expiry).
        ensure!(
            tail.starts_with(&part),
            "the export from {since} is not the tail of the whole export"
        );
        if !part.is_empty() {
            let file = self.node.dir.path().join("export-since.jsonl");
            std::fs::write(&file, &part).unwrap();
            audit_verify(&file, &self.pinned_path, since, &[])
                .map_err(|e| format!("the export from {since} does not verify: {e}"))?;
        }
        Ok(format!(
            "ExportAudit since {since}: {} lines",
            part.lines().count()
        ))
    }

    /// SIGTERM (the node must exit 0), maybe a budget grant with the CLI
    /// while it is stopped (hostile amounts included) and `fedq-node
    /// check`, then a start from the store.
    async fn op_restart(&mut self) -> R<String> {
        self.node.stop(Duration::from_secs(20)).await?;
        self.restarts += 1;
        let mut done = vec!["SIGTERM, exit 0".to_string()];
        if self.rng.random_bool(0.6) {
            let who = *["alice", "team/alice", "newcomer"]
                .choose(&mut self.rng)
                .unwrap();
            let ds = if self.rng.random_bool(0.5) {
                PURE
            } else {
                ZCDP
            };
            let amount = *[
                "0.1",
                "0.3",
                "0.3333333333333333",
                "1.1",
                "1e-6",
                "NaN",
                "inf",
                "-inf",
                "-0.0",
                "-1",
                "0",
                "1e308",
            ]
            .choose(&mut self.rng)
            .unwrap();
            let right_flag = self.rng.random_bool(0.85);
            let flag = match (ds == ZCDP, right_flag) {
                (true, true) | (false, false) => "rho",
                _ => "epsilon",
            };
            let value: f64 = amount.parse().unwrap();
            let valid = value.is_finite() && value > 0.0 && right_flag;
            let cfg = self.node.config_path.clone();
            let (code, out) = self.node.cli(&[
                "budget".as_ref(),
                "grant".as_ref(),
                "--config".as_ref(),
                cfg.as_os_str(),
                "--analyst".as_ref(),
                who.as_ref(),
                "--dataset".as_ref(),
                ds.as_ref(),
                format!("--{flag}={amount}").as_ref(),
            ]);
            ensure!(
                (code == Some(0)) == valid,
                "budget grant --{flag}={amount} to {who} on {ds}: exit {code:?} ({})",
                out.trim()
            );
            done.push(format!("grant --{flag}={amount} {who} {ds}: exit {code:?}"));
        }
        if self.rng.random_bool(0.3) {
            let cfg = self.node.config_path.clone();
            let (code, out) =
                self.node
                    .cli(&["check".as_ref(), "--config".as_ref(), cfg.as_os_str()]);
            ensure!(
                code == Some(0),
                "fedq-node check on the stopped node: exit {code:?}: {}",
                out.trim()
            );
            done.push("check OK".into());
        }
        self.start().await?;
        done.push("started".into());
        Ok(format!("restart: {}", done.join(", ")))
    }

    async fn op_kill_mid_query(&mut self) -> R<String> {
        let who = self.pick_analyst();
        let id = self.fresh_id(who);
        let req = self.random_req();
        let mut c = self.client(who);
        let proto = req.proto(&id, false);
        let task = tokio::spawn(async move { c.query(proto).await });
        let wait = self.rng.random_range(0..25);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        self.node.kill();
        self.restarts += 1;
        let got = tokio::time::timeout(RPC_TIMEOUT, task)
            .await
            .map_err(|_| "a query cut by SIGKILL never returned".to_string())?
            .map_err(|e| format!("query task: {e}"))?
            .map(tonic::Response::into_inner);
        let what = format!(
            "{who} Query {id:?} {} cut by SIGKILL after {wait} ms",
            req.text()
        );
        let key = (who.to_string(), id.clone());
        match &got {
            Ok(r) => {
                ensure!(!r.replayed, "{what}: a fresh id was answered as a replay");
                self.check_answer(who, &id, &req, None, r)?;
                self.answered += 1;
                self.ids.insert(
                    key,
                    IdState::Released {
                        req: req.clone(),
                        resp: r.clone(),
                    },
                );
            }
            Err(_) => {
                self.ids.insert(key, IdState::Unknown { req: req.clone() });
            }
        }
        self.start().await?;
        Ok(format!("{what}: {}, restarted", outcome(&got)))
    }

    /// Every analyst's Budget, per (analyst, dataset).
    async fn all_budgets(&self) -> R<BTreeMap<(String, String), Budget>> {
        let mut all = BTreeMap::new();
        for who in ANALYSTS {
            let mut c = self.client(who);
            let b = rpc("Budget", c.budget(BudgetRequest {}))
                .await?
                .map_err(|s| format!("Budget as {who} refused: {s:?}"))?;
            for x in b.budgets {
                all.insert((who.to_string(), x.dataset.clone()), x);
            }
        }
        Ok(all)
    }

    /// Exports the log and checks it: the new entries verify with the
    /// separate verifier and the pinned key (`--since`), link to the last
    /// entry seen, and hold no forbidden value. `whole`: the export starts
    /// at 0 and must extend the previous one byte for byte (what was
    /// verified before is unchanged); `deep`: the verifier also checks the
    /// whole log at once. (Deep checks are rare because the verifier, a
    /// debug build in tests, takes about 10 ms per entry.)
    async fn refresh_log(&mut self, whole: bool, deep: bool) -> R<()> {
        let mut c = self.client(AUDITOR);
        let seen = self.log.lines;
        let text = tokio::time::timeout(
            RPC_TIMEOUT,
            export_audit_text(&mut c, if whole { 0 } else { seen }),
        )
        .await
        .map_err(|_| "ExportAudit: no answer".to_string())?
        .map_err(|s| {
            format!(
                "ExportAudit as the auditor failed: {:?} {}",
                s.code(),
                short(s.message())
            )
        })?;
        let new = if whole {
            if !text.starts_with(&self.log.text) {
                let old: Vec<&str> = self.log.text.lines().collect();
                let new: Vec<&str> = text.lines().collect();
                let at = new
                    .iter()
                    .zip(&old)
                    .position(|(a, b)| a != b)
                    .unwrap_or(new.len().min(old.len()));
                let cut = |l: Option<&&str>| {
                    l.map_or("(none)".into(), |l| l.chars().take(400).collect::<String>())
                };
                return Err(format!(
                    "the log no longer extends the previous export byte for byte ({} entries before, {} now): entry {at} was\n  {}\nand is now\n  {}\n(after a crash, this means an entry was exported, signed, before it was durable: an auditor holding the earlier export sees history rewritten)",
                    old.len(),
                    new.len(),
                    cut(old.get(at)),
                    cut(new.get(at))
                ));
            }
            &text[self.log.text.len()..]
        } else {
            &text[..]
        };
        if !new.is_empty() {
            let file = self.node.dir.path().join("export-new.jsonl");
            std::fs::write(&file, new).unwrap();
            audit_verify(&file, &self.pinned_path, seen, &[]).map_err(|e| {
                format!("the new entries (from seq {seen}) do not verify with the pinned key: {e}")
            })?;
            let mut forbidden = self.truth.secrets.clone();
            forbidden.extend(&self.released_values);
            self.log.absorb(new, &forbidden)?;
        }
        if deep {
            let file = self.node.dir.path().join("export.jsonl");
            std::fs::write(&file, &self.log.text).unwrap();
            audit_verify(&file, &self.pinned_path, 0, &[]).map_err(|e| {
                format!("the exported log does not verify with the pinned key: {e}")
            })?;
        }
        Ok(())
    }

    /// The checks made after every step (see the module doc).
    async fn check(&mut self, whole: bool, deep: bool) -> R<()> {
        // 1. It answers, with the pinned key.
        let mut c = self.client("alice");
        let d = rpc("Describe", c.describe(DescribeRequest {}))
            .await?
            .map_err(|s| format!("Describe refused: {s:?}"))?;
        ensure!(
            d.audit_public_key == self.pinned_key,
            "Describe gives audit key {} where {} was pinned",
            d.audit_public_key,
            self.pinned_key
        );
        let cfg = &self.node.node.config;
        let on_disk = std::fs::read_to_string(cfg.resolve(&cfg.audit.public_key))
            .map_err(|e| format!("audit.pub: {e}"))?;
        ensure!(
            on_disk.trim() == self.pinned_key,
            "audit.pub changed to {}",
            on_disk.trim()
        );
        // 2 and 3. The log verifies, and the ledger equals it (read the
        // budgets on both sides of the export: a reservation that expires
        // meanwhile changes both).
        let mut settled = None;
        for attempt in 0..5 {
            let b1 = self.all_budgets().await?;
            self.refresh_log(whole && attempt == 0, deep && attempt == 0)
                .await?;
            let b2 = self.all_budgets().await?;
            if b1 == b2 {
                settled = Some(b2);
                break;
            }
        }
        let budgets = settled.ok_or("the budgets kept changing while idle")?;
        self.check_ledger(&budgets)?;
        // 4. Answers, debits and releases.
        self.check_ids()?;
        Ok(())
    }

    fn check_ledger(&self, budgets: &BTreeMap<(String, String), Budget>) -> R<()> {
        for ((who, ds), b) in budgets {
            let key = (who.clone(), ds.clone());
            let limits = limits_of(ds, self.steps);
            let spent = nano_round(b.spent_by_analyst);
            let logged = self.log.net.get(&key).copied().unwrap_or(0);
            ensure!(
                spent == logged,
                "the ledger says {who} spent {} on {ds}, the log's debits + reservations - returns sum to {} nano",
                b.spent_by_analyst,
                logged
            );
            let granted = self.log.granted.get(&key).copied().unwrap_or(0);
            let a_limit = i128::from(nano_floor(limits.per_analyst)) + granted;
            let d_limit = i128::from(nano_floor(limits.total));
            let d_spent = self.log.dataset_net.get(ds).copied().unwrap_or(0);
            let for_dataset = (d_limit - d_spent).max(0);
            let for_analyst = (a_limit - spent).min(d_limit - d_spent).max(0);
            ensure!(
                nano_round(b.remaining_for_dataset) == for_dataset,
                "the ledger says {} is left on {ds} for everyone; the limit minus the log's debits is {for_dataset} nano",
                b.remaining_for_dataset
            );
            ensure!(
                nano_round(b.remaining_for_analyst) == for_analyst,
                "the ledger says {who} has {} left on {ds}; the limits, the logged grants ({granted} nano) and debits give {for_analyst} nano",
                b.remaining_for_analyst
            );
        }
        Ok(())
    }

    fn check_ids(&mut self) -> R<()> {
        let now = now_ms();
        for ((who, id), l) in &self.log.ids {
            ensure!(
                (0..=1).contains(&l.net) && l.released.len() <= 1,
                "{who} {}: {} net debits and {} releases in the log",
                short(id),
                l.net,
                l.released.len()
            );
            ensure!(
                l.released.is_empty() || l.net == 1,
                "{who} {}: released without a standing debit",
                short(id)
            );
            if l.net != 0 || !l.released.is_empty() {
                ensure!(
                    self.ids.contains_key(&(who.clone(), id.clone())),
                    "the log debits {who} for {}, a query the test never saw answered, reserved or cut short",
                    short(id)
                );
            }
        }
        let mut swept = Vec::new();
        for (k, state) in &self.ids {
            let l = self.log.ids.get(k);
            let (net, released) = l.map_or((0, None), |l| (l.net, l.released.first()));
            let name = format!("{} {}", k.0, short(&k.1));
            match state {
                IdState::Released { resp, .. } => {
                    ensure!(
                        net == 1,
                        "{name} was answered; the log has {net} net debits"
                    );
                    let head = resp.audit_head.as_ref().unwrap();
                    ensure!(
                        released == Some(&(head.seq, head.hash.clone())),
                        "{name} was answered with head {}:{}; its released entry is {released:?}",
                        head.seq,
                        head.hash
                    );
                }
                IdState::Reserved { expires_ms, .. } => {
                    ensure!(released.is_none(), "{name} is reserved but released");
                    if now + EXPIRY_SLACK_MS < *expires_ms {
                        ensure!(
                            net == 1 && l.is_some_and(|l| l.reserved > 0),
                            "{name} holds a live reservation; the log has {net} net debits"
                        );
                    } else if net == 0 {
                        swept.push(k.clone());
                    }
                }
                IdState::Returned { .. } => ensure!(
                    net == 0 && released.is_none(),
                    "{name} was returned; the log has {net} net debits"
                ),
                IdState::Unknown { .. } => {}
            }
        }
        for k in swept {
            let req = self.ids[&k].req().clone();
            self.ids.insert(k, IdState::Returned { req });
        }
        Ok(())
    }
}

fn nano_floor(x: f64) -> u64 {
    (x * 1e9).floor() as u64
}

fn static_analyst(name: &str) -> &'static str {
    ANALYSTS
        .iter()
        .find(|a| **a == name)
        .copied()
        .unwrap_or_else(|| panic!("unknown analyst {name}"))
}

fn check_dry(id: &str, d: &QueryResponse) -> R<()> {
    ensure!(d.dry_run, "dry run {id:?}: not marked dry_run");
    ensure!(
        d.measurements.iter().all(|m| m.values.is_empty()),
        "dry run {id:?}: released values"
    );
    ensure!(
        d.cost.is_finite() && d.cost > 0.0,
        "dry run {id:?}: cost {}",
        d.cost
    );
    Ok(())
}

/// A replay is the release first answered, values and head included.
fn same_release(what: &str, first: &QueryResponse, again: &QueryResponse) -> R<()> {
    let values = |r: &QueryResponse| -> Vec<Vec<i64>> {
        r.measurements.iter().map(|m| m.values.clone()).collect()
    };
    ensure!(
        values(first) == values(again) && first.cells == again.cells,
        "{what}: the replay's values differ from the first answer's"
    );
    ensure!(
        first.audit_head == again.audit_head,
        "{what}: the replay carries head {:?}, the first answer {:?}",
        again.audit_head,
        first.audit_head
    );
    Ok(())
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_hostile_sequences_leave_a_node_that_serves_restarts_verifies_and_balances() {
    let seed = env_number("FEDQ_ADVERSARY_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        t.as_nanos() as u64 ^ u64::from(std::process::id())
    });
    let steps = env_number("FEDQ_ADVERSARY_STEPS").map_or(DEFAULT_STEPS, |s| s as usize);
    eprintln!(
        "adversary: seed {seed}, {steps} steps (reproduce with FEDQ_ADVERSARY_SEED={seed} FEDQ_ADVERSARY_STEPS={steps})"
    );
    let began = Instant::now();
    let mut w = World::set_up(seed, steps).await;
    let total: u32 = WEIGHTS.iter().map(|(_, w)| w).sum();
    for step in 0..steps {
        // Every run kills a node mid-query, kills one idle and restarts one
        // gracefully at least once.
        let forced = [
            (steps / 4, Op::KillMidQuery),
            (steps / 2, Op::Kill),
            (3 * steps / 4, Op::Restart),
        ]
        .into_iter()
        .find(|&(at, op)| at == step && !w.ops.contains_key(&op))
        .map(|(_, op)| op);
        let op = forced.unwrap_or_else(|| {
            let mut roll = w.rng.random_range(0..total);
            WEIGHTS
                .iter()
                .find(|(_, weight)| {
                    let hit = roll < *weight;
                    roll = roll.saturating_sub(*weight);
                    hit
                })
                .unwrap()
                .0
        });
        let restarts = w.restarts;
        let result = w.step(op).await;
        let line = match &result {
            Ok(s) | Err(s) => format!("{step:>4} {s}"),
        };
        w.history.push_back(line.chars().take(400).collect());
        if w.history.len() > 25 {
            w.history.pop_front();
        }
        if let Err(e) = result {
            w.fail(&format!("step {step} ({op:?})"), e);
        }
        // The whole export after every restart and every 10 steps; the
        // verifier over the whole log every 250 steps.
        let whole = step % 10 == 0 || w.restarts != restarts;
        let deep = step % 250 == 249;
        if let Err(e) = w.check(whole, deep).await {
            w.fail(&format!("the checks after step {step} ({op:?})"), e);
        }
    }
    // A last, whole check, then a graceful stop that must succeed.
    if let Err(e) = w.check(true, true).await {
        w.fail("the final checks", e);
    }
    if w.noisy_total >= 30 {
        let (eq, n) = (w.noisy_equal, w.noisy_total);
        if eq == n {
            w.fail(
                "the final checks",
                format!("all {n} released COUNT(*) values equal the exact counts"),
            );
        }
    }
    if let Err(e) = w.node.stop(Duration::from_secs(20)).await {
        w.fail("the final stop", e);
    }
    eprintln!(
        "adversary: seed {seed}, {steps} steps in {:.1} s: {} answered, {} refused, {} restarts or kills; {} log entries {:?}; COUNT(*) cells equal to the exact count {}/{}; operations {:?}",
        began.elapsed().as_secs_f64(),
        w.answered,
        w.refused,
        w.restarts,
        w.log.lines,
        w.log.kinds,
        w.noisy_equal,
        w.noisy_total,
        w.ops
    );
}
