//! `fedq-pushdown-bench`: what the PostgreSQL push-down of a fedq node
//! costs against the same query written by hand in SQL (issue 22's
//! measurement, repeatable).
//!
//! The bench loads `--rows` synthetic case-management rows
//! (`fedq_engine::synth::write_csv`, `--seed`) into `public.bench22_<rows>`
//! (`text` for the categorical columns, `smallint` for the flags, `integer`
//! for the numbers; each cell stored as the CSV has it: `-99` stays `-99`,
//! an empty number is `NULL`), by binary `COPY`, then `VACUUM ANALYZE`, no
//! index. The load is skipped when the table already holds exactly
//! `--rows` rows (`--reload` forces it). It then times five query shapes,
//! each twice: the node's push-down (`PgSource::exact` of the planned
//! query: one parameterised statement built from the plan, its result
//! assembled into cells) and a hand-written PostgreSQL query asking for the
//! same groups and aggregates on the raw columns (`Client::query`, rows
//! collected):
//!
//! | shape | fedq SQL |
//! |---|---|
//! | A | `SELECT gender, ageBroad, COUNT(*) FROM cases WHERE isForcedLabour = 1 GROUP BY gender, ageBroad` |
//! | B | `SELECT citizenship, COUNT(*) FROM cases GROUP BY citizenship` |
//! | C | `SELECT COUNT(*) FROM cases WHERE ageBroad IN ('0--8', '9--17') AND yearOfRegistration BETWEEN 2010 AND 2020` |
//! | D | `SELECT gender, COUNT(*), AVG(traffickMonths) FROM cases WHERE isSexualExploit = 1 GROUP BY gender` (hand: `COUNT(*), SUM("traffickMonths"), COUNT("traffickMonths")`) |
//! | E | `SELECT CountryOfExploitation, isForcedLabour, COUNT(*) FROM cases WHERE gender = 'Female' OR NOT isSexualExploit = 1 GROUP BY 1, 2` |
//!
//! (all five plan as written.) The hand-written queries group by the raw
//! values (so `-99` is a group of its own), as an analyst with the table
//! would; the push-down maps anything outside the declared domain to
//! missing. Both ask the database for a few hundred rows at most.
//!
//! After one warm-up run of each, `--rounds` rounds run every shape's two
//! versions back to back, alternating which goes first (by round and by
//! shape), each timed with `Instant` around the await (wall time of the
//! client: statement preparation, execution and the rows' transfer; the
//! push-down also builds its statement and assembles the cells). Printed
//! per shape: the p50 and min–max of each, the ratio of the p50s
//! (push-down / hand) and the median of the per-round ratios, with the
//! load average at start and end, the server's version and
//! `max_parallel_workers_per_gather`. Progress goes to stderr, the
//! Markdown to stdout. `--explain` also prints `EXPLAIN (ANALYZE, BUFFERS)`
//! of every hand-written query and of every push-down statement (built
//! with `statement::build`, its parameters bound as the node binds them).
//!
//! `--partner-coded` measures a partner's database in its OWN coding,
//! read through a `[datasets.mapping]` (`fedq_engine::postgres::mapped`).
//! The same synthetic rows, rewritten by `fedq_engine::partner_coding::recode`
//! on their way in (generator, recoder and parser are threads joined by
//! pipes: nothing is held whole), are loaded into `public.bench22p_<rows>`:
//! the partner's columns (`sex` F/M/T, `age` in years, `nationality` and
//! `country_of_exploitation` as English country names, `forced_labour` and
//! `sexual_exploitation` yes/no, the rest under their standard names), all
//! `text` except `age` and the declared integer and boolean columns, which
//! are `integer` (a missing number stored as the standard load stores it).
//! The push-down is `PgSource::with_mapping` of the shipped mapping
//! (`partner_coding::MAPPING_TOML`), asked the same fedq SQL (it is in the
//! standard's terms); the database groups by the raw values and the node
//! maps them. The hand-written side is what the partner's analyst would
//! write against their own table for the same answer, the mapping spelt out
//! in SQL (`{sex}` and `{age}` below are built from the mapping's `gender`
//! values and from the `ageBroad` domain of `ctdc_columns()`):
//!
//! | shape | hand-written, partner-coded |
//! |---|---|
//! | A | `SELECT {sex}, {age}, COUNT(*) FROM {t} WHERE forced_labour = 'yes' GROUP BY 1, 2` |
//! | B | `SELECT nationality, COUNT(*) FROM {t} GROUP BY nationality` |
//! | C | `SELECT COUNT(*) FROM {t} WHERE age BETWEEN 0 AND 17 AND "yearOfRegistration" BETWEEN 2010 AND 2020` |
//! | D | `SELECT {sex}, COUNT(*), SUM("traffickMonths"), COUNT("traffickMonths") FROM {t} WHERE sexual_exploitation = 'yes' GROUP BY 1` |
//! | E | `SELECT country_of_exploitation, CASE forced_labour WHEN 'yes' THEN 1 WHEN 'no' THEN 0 END, COUNT(*) FROM {t} WHERE sex = 'F' OR sexual_exploitation = 'no' GROUP BY 1, 2` |
//!
//! with `{sex}` = `CASE sex WHEN 'F' THEN 'Female' WHEN 'M' THEN 'Male'
//! WHEN 'T' THEN 'Trans/Transgender/NonConforming' END` and `{age}` =
//! `CASE WHEN age BETWEEN 0 AND 8 THEN '0--8' ... WHEN age >= 48 THEN
//! '48+' END`. Where they differ from the mapping (none of it occurs in
//! the synthetic rows, so the groups and counts are the push-down's):
//! the mapping matches values after trimming and ignoring case (`' f'`
//! is Female to it, NULL to the CASE); it reads an age over 150 as
//! missing (`age >= 48` takes it); the countries are grouped and compared
//! by the partner's names, as an analyst would, not converted (one name
//! per country here, so the same number of groups; a table spelling one
//! country two ways would split it); the missing countries (`-99`) are a
//! group of their own, as in the standard-coded hand queries, where the
//! push-down maps them to missing; and D's sums take `-99` months as the
//! standard-coded hand query does. E's `NOT isSexualExploit = 1` is
//! `sexual_exploitation = 'no'` (and `"isSexualExploit" = 0` in the
//! standard-coded hand query): the engine's NOT keeps no missing rows. `--explain` prints the mapped statement of the push-down
//! (`postgres::mapped::build` over the renamed schema).
//!
//! A server: `scripts/pg-test-server.sh start DIR` (its last line is the
//! URL). Example (release build; run it on a quiet machine):
//!
//! ```text
//! export FEDQ_TEST_POSTGRES=$(bash scripts/pg-test-server.sh start /tmp/pgbench/pg | tail -1)
//! cargo run --release -p fedq-tests --bin fedq-pushdown-bench -- --rows 1000000 --rounds 11
//! cargo run --release -p fedq-tests --bin fedq-pushdown-bench -- --rows 1000000 --rounds 11 --partner-coded
//! ```

use std::io::{BufReader, BufWriter};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use fedq_engine::mapping::Mapping;
use fedq_engine::partner_coding::recode;
use fedq_engine::postgres::statement;
use fedq_engine::postgres::PgSource;
use fedq_engine::source::{SourceConfig, SourceKind};
use fedq_engine::synth::{ctdc_columns, write_csv, Partner};
use fedq_plan::plan::{plan, Plan};
use fedq_plan::schema::{Column, Schema, MISSING};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls};

/// Rows per batch handed from the CSV parser to the `COPY`.
const BATCH: usize = 20_000;

/// The most cells a plan may have (the node's default).
const MAX_CELLS: usize = 100_000;

#[derive(Parser, Debug)]
#[command(
    about = "PostgreSQL push-down against hand-written SQL, per query shape",
    after_help = "Example:\n  cargo run --release -p fedq-tests --bin fedq-pushdown-bench -- --rows 1000000 --rounds 11"
)]
struct Args {
    /// PostgreSQL URL (default: the FEDQ_TEST_POSTGRES environment
    /// variable).
    #[arg(long)]
    url: Option<String>,
    /// Rows of synthetic case-management data in the table.
    #[arg(long, default_value_t = 1_000_000)]
    rows: usize,
    /// Timed rounds (after one warm-up run of each query).
    #[arg(long, default_value_t = 11)]
    rounds: usize,
    /// Seed of the synthetic rows.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Load the table again even if it holds `--rows` rows.
    #[arg(long)]
    reload: bool,
    /// Also print EXPLAIN (ANALYZE, BUFFERS) of every query, both versions.
    #[arg(long)]
    explain: bool,
    /// Measure a table in the partner's own coding (`bench22p_<rows>`,
    /// loaded through `partner_coding::recode`), read through the shipped
    /// mapping, against hand-written SQL on the partner's columns.
    #[arg(long)]
    partner_coded: bool,
}

/// One query shape: the analyst's SQL and its hand-written equivalents
/// over the standard-coded and the partner-coded table (`{t}` stands for
/// the table; `{sex}` and `{age}` for the partner's gender and age band,
/// [`partner_hand`]).
struct Shape {
    name: &'static str,
    fedq: &'static str,
    hand: &'static str,
    partner: &'static str,
}

const SHAPES: [Shape; 5] = [
    Shape {
        name: "A",
        fedq: "SELECT gender, ageBroad, COUNT(*) FROM cases WHERE isForcedLabour = 1 GROUP BY gender, ageBroad",
        hand: r#"SELECT gender, "ageBroad", COUNT(*) FROM {t} WHERE "isForcedLabour" = 1 GROUP BY 1, 2"#,
        partner: r#"SELECT {sex}, {age}, COUNT(*) FROM {t} WHERE forced_labour = 'yes' GROUP BY 1, 2"#,
    },
    Shape {
        name: "B",
        fedq: "SELECT citizenship, COUNT(*) FROM cases GROUP BY citizenship",
        hand: "SELECT citizenship, COUNT(*) FROM {t} GROUP BY citizenship",
        partner: "SELECT nationality, COUNT(*) FROM {t} GROUP BY nationality",
    },
    Shape {
        name: "C",
        fedq: "SELECT COUNT(*) FROM cases WHERE ageBroad IN ('0--8', '9--17') AND yearOfRegistration BETWEEN 2010 AND 2020",
        hand: r#"SELECT COUNT(*) FROM {t} WHERE "ageBroad" IN ('0--8', '9--17') AND "yearOfRegistration" BETWEEN 2010 AND 2020"#,
        partner: r#"SELECT COUNT(*) FROM {t} WHERE age BETWEEN 0 AND 17 AND "yearOfRegistration" BETWEEN 2010 AND 2020"#,
    },
    Shape {
        name: "D",
        fedq: "SELECT gender, COUNT(*), AVG(traffickMonths) FROM cases WHERE isSexualExploit = 1 GROUP BY gender",
        hand: r#"SELECT gender, COUNT(*), SUM("traffickMonths"), COUNT("traffickMonths") FROM {t} WHERE "isSexualExploit" = 1 GROUP BY gender"#,
        partner: r#"SELECT {sex}, COUNT(*), SUM("traffickMonths"), COUNT("traffickMonths") FROM {t} WHERE sexual_exploitation = 'yes' GROUP BY 1"#,
    },
    Shape {
        name: "E",
        fedq: "SELECT CountryOfExploitation, isForcedLabour, COUNT(*) FROM cases WHERE gender = 'Female' OR NOT isSexualExploit = 1 GROUP BY 1, 2",
        hand: r#"SELECT "CountryOfExploitation", "isForcedLabour", COUNT(*) FROM {t} WHERE gender = 'Female' OR "isSexualExploit" = 0 GROUP BY 1, 2"#,
        partner: r#"SELECT country_of_exploitation, CASE forced_labour WHEN 'yes' THEN 1 WHEN 'no' THEN 0 END, COUNT(*) FROM {t} WHERE sex = 'F' OR sexual_exploitation = 'no' GROUP BY 1, 2"#,
    },
];

/// How one CSV column is stored in the bench table.
#[derive(Clone)]
enum Store {
    /// `text`, as the CSV has it.
    Text,
    /// `smallint`: a declared flag (the standard-coded table).
    Small(Column),
    /// `integer`: a declared column read by its own parsing, or (`None`) a
    /// number the schema does not declare (the partner's `age`).
    Int(Option<Column>),
}

impl Store {
    /// How the standard-coded table stores declared column `c`.
    fn standard(c: &Column) -> anyhow::Result<Store> {
        Ok(match c {
            Column::Categorical { .. } => Store::Text,
            Column::Boolean { .. } => Store::Small(c.clone()),
            Column::Integer { .. } => Store::Int(Some(c.clone())),
            _ => bail!("column {} has no database type in this bench", c.name()),
        })
    }

    /// How the partner-coded table stores the partner's column `name`:
    /// `age` and the declared integer and boolean columns kept under their
    /// standard names as `integer`, every other column as `text`.
    fn partner(name: &str, schema: &Schema) -> Store {
        if name == "age" {
            return Store::Int(None);
        }
        match schema.index_of(name).map(|i| &schema.columns[i]) {
            Some(c @ (Column::Integer { .. } | Column::Boolean { .. })) => {
                Store::Int(Some(c.clone()))
            }
            _ => Store::Text,
        }
    }

    fn db_type(&self) -> (&'static str, Type) {
        match self {
            Store::Text => ("text", Type::TEXT),
            Store::Small(_) => ("smallint", Type::INT2),
            Store::Int(_) => ("integer", Type::INT4),
        }
    }

    /// A CSV cell as stored: text as it is; a number by the column's own
    /// parsing (if declared), a missing one as its raw number (`-99`) or
    /// else `NULL`.
    fn parse(&self, raw: &str) -> Cell {
        let number = |c: Option<&Column>| match c.map(|c| c.encode(raw)) {
            Some(Ok(v)) if v != MISSING => Some(v),
            _ => raw.trim().parse::<i64>().ok(),
        };
        match self {
            Store::Text => Cell::Text(raw.to_string()),
            Store::Small(c) => Cell::Small(number(Some(c)).and_then(|v| i16::try_from(v).ok())),
            Store::Int(c) => Cell::Int(number(c.as_ref()).and_then(|v| i32::try_from(v).ok())),
        }
    }
}

/// One database cell.
enum Cell {
    Text(String),
    Small(Option<i16>),
    Int(Option<i32>),
}

impl Cell {
    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Cell::Text(v) => v,
            Cell::Small(v) => v,
            Cell::Int(v) => v,
        }
    }
}

/// The header `recode` writes for the synthetic CSV (the partner's column
/// names, in the CSV's order).
fn partner_header() -> anyhow::Result<Vec<String>> {
    let mut standard = Vec::new();
    write_csv(Partner::CaseManagement, 0, 0, &mut standard)?;
    let mut partner = Vec::new();
    recode(standard.as_slice(), &mut partner)?;
    Ok(csv::Reader::from_reader(partner.as_slice())
        .headers()?
        .iter()
        .map(str::to_string)
        .collect())
}

/// An SQL identifier: bare when lower case, else quoted.
fn ident(name: &str) -> String {
    let bare = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if bare {
        name.to_string()
    } else {
        statement::quote(name)
    }
}

/// An SQL string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The partner's analyst's query for `template`: `{t}` the table, `{sex}`
/// the mapping's gender values spelt out as a CASE over the partner's
/// column, `{age}` the bands of the declared `ageBroad` domain as a CASE
/// over the partner's ages.
fn partner_hand(
    template: &str,
    schema: &Schema,
    mapping: &Mapping,
    relation: &str,
) -> anyhow::Result<String> {
    let gender = mapping
        .get("gender")
        .ok_or_else(|| anyhow!("the shipped mapping has no gender"))?;
    let sex = ident(gender.from.as_deref().unwrap_or("gender"));
    let whens: Vec<String> = gender
        .values
        .iter()
        .map(|(from, to)| format!("WHEN {} THEN {}", literal(from), literal(to)))
        .collect();
    let sex_case = format!("CASE {sex} {} END", whens.join(" "));

    let age_from = mapping
        .get("ageBroad")
        .and_then(|m| m.from.as_deref())
        .ok_or_else(|| anyhow!("the shipped mapping does not rename ageBroad"))?;
    let age = ident(age_from);
    let Some(Column::Categorical { domain, .. }) =
        schema.index_of("ageBroad").map(|i| &schema.columns[i])
    else {
        bail!("the schema has no categorical ageBroad");
    };
    let mut whens = Vec::new();
    for band in domain {
        let test = if let Some(lo) = band.strip_suffix('+') {
            format!("{age} >= {}", lo.trim().parse::<i64>()?)
        } else {
            let (lo, hi) = band
                .split_once("--")
                .ok_or_else(|| anyhow!("age band {band:?} is neither a--b nor a+"))?;
            format!(
                "{age} BETWEEN {} AND {}",
                lo.trim().parse::<i64>()?,
                hi.trim().parse::<i64>()?
            )
        };
        whens.push(format!("WHEN {test} THEN {}", literal(band)));
    }
    let age_case = format!("CASE {} END", whens.join(" "));
    Ok(template
        .replace("{t}", relation)
        .replace("{sex}", &sex_case)
        .replace("{age}", &age_case))
}

/// Rows in `public.<table>`, or `None` if there is no such table.
async fn existing_rows(client: &Client, table: &str) -> anyhow::Result<Option<i64>> {
    let row = client
        .query_one(
            "SELECT to_regclass($1::text) IS NOT NULL",
            &[&format!("public.{table}")],
        )
        .await?;
    if !row.get::<_, bool>(0) {
        return Ok(None);
    }
    let row = client
        .query_one(&format!("SELECT COUNT(*) FROM public.{table}"), &[])
        .await?;
    Ok(Some(row.get(0)))
}

/// (Re)creates `public.<table>` with `columns` (the CSV's header, in order,
/// and how each is stored) and loads the synthetic rows into it,
/// streaming: a thread writes the CSV into a pipe, with `partner` another
/// recodes it into a second pipe (`partner_coding::recode`), another parses
/// it into batches, and the batches go out by binary `COPY`.
async fn load(
    client: &Client,
    columns: &[(String, Store)],
    table: &str,
    args: &Args,
    partner: bool,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut defs = Vec::new();
    let mut types = Vec::new();
    for (name, store) in columns {
        let (db, ty) = store.db_type();
        defs.push(format!("{} {db}", statement::quote(name)));
        types.push(ty);
    }
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS public.{table}; CREATE TABLE public.{table} ({})",
            defs.join(", ")
        ))
        .await?;

    let (pipe_in, pipe_out) = std::io::pipe()?;
    let (rows, seed) = (args.rows, args.seed);
    let generator = std::thread::spawn(move || {
        write_csv(Partner::CaseManagement, rows, seed, pipe_out).map_err(anyhow::Error::from)
    });
    let (csv_in, recoder) = if partner {
        let (recoded_in, recoded_out) = std::io::pipe()?;
        let recoder = std::thread::spawn(move || {
            recode(
                BufReader::with_capacity(1 << 16, pipe_in),
                BufWriter::with_capacity(1 << 16, recoded_out),
            )
            .map_err(anyhow::Error::from)
        });
        (recoded_in, Some(recoder))
    } else {
        (pipe_in, None)
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Vec<Cell>>>(4);
    let columns = columns.to_vec();
    let parser = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut reader = csv::Reader::from_reader(BufReader::with_capacity(1 << 16, csv_in));
        let header: Vec<String> = reader.headers()?.iter().map(str::to_string).collect();
        let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
        if header != names {
            bail!("the synthetic CSV's columns {header:?} are not the table's {names:?}");
        }
        let mut batch = Vec::with_capacity(BATCH);
        for record in reader.records() {
            let record = record?;
            batch.push(
                columns
                    .iter()
                    .zip(record.iter())
                    .map(|((_, store), raw)| store.parse(raw))
                    .collect(),
            );
            if batch.len() == BATCH {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                tx.blocking_send(full)
                    .map_err(|_| anyhow!("the COPY stopped"))?;
            }
        }
        if !batch.is_empty() {
            tx.blocking_send(batch)
                .map_err(|_| anyhow!("the COPY stopped"))?;
        }
        Ok(())
    });

    let sink = client
        .copy_in(&format!("COPY public.{table} FROM STDIN (FORMAT binary)"))
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &types);
    let mut writer = std::pin::pin!(writer);
    let mut sent = 0usize;
    let copied: anyhow::Result<u64> = async {
        while let Some(batch) = rx.recv().await {
            for row in &batch {
                let refs: Vec<&(dyn ToSql + Sync)> = row.iter().map(Cell::as_sql).collect();
                writer.as_mut().write(&refs).await?;
            }
            sent += batch.len();
            if sent.is_multiple_of(BATCH * 25) {
                eprintln!("  {sent} rows in {:.1} s", t0.elapsed().as_secs_f64());
            }
        }
        // Parsing failed or ended: check before committing the COPY.
        if sent != args.rows {
            bail!("{sent} rows parsed, {} expected", args.rows);
        }
        Ok(writer.as_mut().finish().await?)
    }
    .await;
    drop(rx);
    // One stage failing makes the others fail too (a closed pipe or
    // channel): every failure is reported, the cause among them.
    let mut failed = Vec::new();
    let mut check = |what: &str, r: std::thread::Result<anyhow::Result<()>>| match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => failed.push(format!("{what}: {e:#}")),
        Err(_) => failed.push(format!("{what}: panicked")),
    };
    check("parsing the synthetic CSV", parser.join());
    if let Some(recoder) = recoder {
        check(
            "recoding the synthetic CSV (partner_coding::recode)",
            recoder.join(),
        );
    }
    check("generating the synthetic CSV", generator.join());
    let copied = match copied {
        Ok(n) => n,
        Err(e) => {
            failed.push(format!("COPY into the bench table: {e:#}"));
            0
        }
    };
    if !failed.is_empty() {
        bail!("loading public.{table} failed: {}", failed.join("; "));
    }
    if copied != args.rows as u64 {
        bail!("COPY wrote {copied} rows, {} expected", args.rows);
    }
    eprintln!(
        "loaded {copied} rows in {:.1} s; VACUUM ANALYZE",
        t0.elapsed().as_secs_f64()
    );
    client
        .batch_execute(&format!("VACUUM ANALYZE public.{table}"))
        .await?;
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("(unreadable: {e})"))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// Runs the hand-written query; returns its wall time in ms and its rows.
async fn time_hand(client: &Client, sql: &str) -> anyhow::Result<(f64, usize)> {
    let t0 = Instant::now();
    let rows = client.query(sql, &[]).await?;
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    Ok((ms, rows.len()))
}

/// Runs the push-down; returns its wall time in ms and (measurements,
/// cells of each).
async fn time_pushdown(source: &PgSource, plan: &Plan) -> anyhow::Result<(f64, (usize, usize))> {
    let t0 = Instant::now();
    let exact = source.exact(plan).await?;
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    Ok((ms, (exact.len(), exact.first().map_or(0, |e| e.len()))))
}

/// EXPLAIN (ANALYZE, BUFFERS) of `sql` with `params`, as text.
async fn explain(
    client: &Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> anyhow::Result<String> {
    let rows = client
        .query(&format!("EXPLAIN (ANALYZE, BUFFERS) {sql}"), params)
        .await?;
    Ok(rows
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n"))
}

async fn show(client: &Client, setting: &str) -> anyhow::Result<String> {
    Ok(client
        .query_one(&format!("SHOW {setting}"), &[])
        .await?
        .get(0))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let url = match args
        .url
        .clone()
        .or_else(|| std::env::var("FEDQ_TEST_POSTGRES").ok())
    {
        Some(u) => u,
        None => bail!(
            "no PostgreSQL: pass --url or set FEDQ_TEST_POSTGRES; start a server with \
             `scripts/pg-test-server.sh start DIR`, which prints its URL on its last line"
        ),
    };
    let load_start = loadavg();
    let (client, conn) = tokio_postgres::connect(&url, NoTls)
        .await
        .context("connecting to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("PostgreSQL connection: {e}");
        }
    });

    let schema = Schema::from_specs("cases", &ctdc_columns()).map_err(|e| anyhow!("{e}"))?;
    let mapping = fedq_tests::partner_mapping();
    let (table, columns) = if args.partner_coded {
        let columns: Vec<(String, Store)> = partner_header()?
            .into_iter()
            .map(|h| {
                let store = Store::partner(&h, &schema);
                (h, store)
            })
            .collect();
        (format!("bench22p_{}", args.rows), columns)
    } else {
        let columns = schema
            .columns
            .iter()
            .map(|c| Ok((c.name().to_string(), Store::standard(c)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        (format!("bench22_{}", args.rows), columns)
    };
    match existing_rows(&client, &table).await? {
        Some(n) if n == args.rows as i64 && !args.reload => {
            eprintln!("public.{table} holds {n} rows: not reloaded");
        }
        found => {
            eprintln!(
                "loading {} rows into public.{table} ({})",
                args.rows,
                match found {
                    Some(n) => format!("it held {n}"),
                    None => "new".to_string(),
                }
            );
            load(&client, &columns, &table, &args, args.partner_coded).await?;
        }
    }

    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("db.url"), &url)?;
    let src = SourceConfig {
        kind: SourceKind::Postgres,
        table: format!("public.{table}"),
        url_file: Some("db.url".into()),
        url_env: None,
        ca: None,
        statement_timeout_ms: 120_000,
    };
    let mut source = PgSource::new("cases", schema.clone(), &src, dir.path())?;
    if args.partner_coded {
        source = source.with_mapping(&mapping)?;
    }
    source.connect().await?;

    let relation_sql = format!("public.{table}");
    let mut plans = Vec::new();
    let mut hands = Vec::new();
    for s in &SHAPES {
        plans.push(
            plan(s.fedq, &schema, MAX_CELLS)
                .map_err(|e| anyhow!("shape {} does not plan: {e}", s.name))?,
        );
        hands.push(if args.partner_coded {
            partner_hand(s.partner, &schema, &mapping, &relation_sql)?
        } else {
            s.hand.replace("{t}", &relation_sql)
        });
    }

    // Warm-up: one run of each; also shows what each returns.
    for (i, s) in SHAPES.iter().enumerate() {
        let (hm, rows) = time_hand(&client, &hands[i]).await?;
        let (pm, (measurements, cells)) = time_pushdown(&source, &plans[i]).await?;
        eprintln!(
            "warm-up {}: hand {hm:.1} ms ({rows} rows), push-down {pm:.1} ms \
             ({measurements} measurements of {cells} cells)",
            s.name
        );
    }

    let n = SHAPES.len();
    let mut hand_ms = vec![Vec::new(); n];
    let mut push_ms = vec![Vec::new(); n];
    for r in 0..args.rounds {
        for i in 0..n {
            let hand_first = (r + i) % 2 == 0;
            for turn in 0..2 {
                if (turn == 0) == hand_first {
                    hand_ms[i].push(time_hand(&client, &hands[i]).await?.0);
                } else {
                    push_ms[i].push(time_pushdown(&source, &plans[i]).await?.0);
                }
            }
        }
        eprintln!("round {} of {} done", r + 1, args.rounds);
    }
    let load_end = loadavg();

    let version = show(&client, "server_version").await?;
    let workers = show(&client, "max_parallel_workers_per_gather").await?;
    let coding = if args.partner_coded {
        "partner-coded table, read through the shipped mapping"
    } else {
        "standard-coded table"
    };
    println!(
        "\nPush-down against hand-written SQL, {coding}, {} rows (`public.{table}`, seed {}), \
         PostgreSQL {version}, max_parallel_workers_per_gather {workers}, \
         {} rounds after a warm-up; load average {load_start} at start, {load_end} at end\n",
        args.rows, args.seed, args.rounds
    );
    if args.rounds > 0 {
        println!("| shape | hand p50 ms | hand min–max | push-down p50 ms | push-down min–max | × hand (p50s) | × hand (median per round) |");
        println!("|---|---|---|---|---|---|---|");
        for (i, s) in SHAPES.iter().enumerate() {
            let (h, p) = (median(&hand_ms[i]), median(&push_ms[i]));
            let ((hl, hh), (pl, ph)) = (min_max(&hand_ms[i]), min_max(&push_ms[i]));
            let ratios: Vec<f64> = hand_ms[i]
                .iter()
                .zip(&push_ms[i])
                .map(|(h, p)| p / h)
                .collect();
            println!(
                "| {} | {h:.1} | {hl:.1}–{hh:.1} | {p:.1} | {pl:.1}–{ph:.1} | {:.2} | {:.2} |",
                s.name,
                p / h,
                median(&ratios)
            );
        }
    }
    println!();
    for (i, s) in SHAPES.iter().enumerate() {
        println!("- {}: `{}`", s.name, s.fedq);
        if args.partner_coded {
            println!("  - hand: `{}`", hands[i]);
        }
    }

    if args.explain {
        for (i, s) in SHAPES.iter().enumerate() {
            println!(
                "\n#### {}: hand-written\n\n```sql\n{}\n```\n",
                s.name, hands[i]
            );
            println!("```text\n{}\n```", explain(&client, &hands[i], &[]).await?);
            // What `exact` sends: the mapped statement when the plan reads
            // a mapped column, else the fast path's.
            let (sql, st_params) = source.statement(&plans[i]).await?;
            let kind = if args.partner_coded {
                "push-down (partner-coded table)"
            } else {
                "push-down"
            };
            let params: Vec<&(dyn ToSql + Sync)> = st_params.iter().map(|p| p.as_sql()).collect();
            println!(
                "\n#### {}: {kind}\n\n```sql\n{sql}\n```\n\nparameters: {st_params:?}\n",
                s.name
            );
            println!("```text\n{}\n```", explain(&client, &sql, &params).await?);
        }
    }
    Ok(())
}
