//! The `fedq-node` command: what a partner organisation runs.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use fedq_engine::synth::{self, Partner};
use fedq_ledger::audit::{self, Entry};
use fedq_node::config::NodeConfig;

/// mimalloc rather than glibc's allocator: a node's request threads each
/// got their own glibc arena, which kept the memory of heavy load
/// resident, and allocation was a tenth of a query's CPU (BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mimalloc.h` (the sys crate
/// names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Returns freed memory to the system at once rather than after mimalloc's
/// default delay (a second, ten for whole arenas): after heavy load the
/// node's resident memory went from about 180 MB to about 140 MB, at no
/// measured cost in throughput (BENCHMARKS.md, Memory).
fn return_freed_memory_at_once() {
    // SAFETY: sets one of mimalloc's documented options to a documented
    // value (0: purge immediately); it takes no pointers and may be
    // called at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

/// A partner's node in a fedq federation: holds your case records, answers
/// aggregate queries with differential privacy, spends a budget you control.
#[derive(Parser)]
#[command(
    name = "fedq-node",
    version,
    after_help = "Exit codes: 0 success, 1 error (the message says what and what to do), 2 bad command line, \
75 serve stopped because its store failed a write (a full disk, say; restart it once fixed: deploy/README.md).\n\n\
Typical set-up:\n  fedq-node synth --partner ngo --rows 20000 --seed 1 --out cases.csv\n  \
fedq-node check --config node.toml\n  \
fedq-node check --config node.toml --dataset cases --csv cases.csv   (a dry run: coverage, nothing stored)\n  fedq-node ingest --config node.toml --dataset cases --csv cases.csv\n  \
fedq-node serve --config node.toml\n\n\
New version of the federation's standard: fedq-node migrate --config node.toml --previous node.toml.old (see migrate --help)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the fedq.v1 gRPC API over mutual TLS until Ctrl-C or SIGTERM.
    #[command(
        after_help = "Example:\n  fedq-node serve --config /etc/fedq/node.toml\n\nLog verbosity follows RUST_LOG (default: info)."
    )]
    Serve {
        /// Path to node.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a CSV against a dataset's declared schema and store it, all
    /// or nothing. Stop the node first: the store is opened exclusively.
    #[command(
        after_help = "Example:\n  fedq-node ingest --config node.toml --dataset cases --csv export-2026-11.csv\n\n\
Cells -99 or empty are missing. One bad row fails the whole ingest with file:line, column and what was expected; nothing is stored. \
A dataset with [datasets.mapping] reads your own columns and codes through it; the coverage per column (coded, missing, unmapped and the commonest unmapped values) is printed here, for you only."
    )]
    Ingest {
        /// Path to node.toml.
        #[arg(long)]
        config: PathBuf,
        /// Dataset to add the rows to, as declared in node.toml.
        #[arg(long)]
        dataset: String,
        /// The CSV file (header line with column names).
        #[arg(long)]
        csv: PathBuf,
        /// Ingest a file even though the very same file was ingested before.
        #[arg(long)]
        allow_duplicate: bool,
    },
    /// Translate a stopped node's stored rows, in place, to the columns
    /// node.toml now declares (a new minor version of the federation's
    /// standard: columns or categories added), keeping its budget ledger
    /// and audit log. All or nothing; logged in the audit log first.
    #[command(
        after_help = "Example (moving to standard 1.1):\n  systemctl stop fedq-node\n  cp node.toml node.toml.old\n  \
(install standards/ctdc-cases-1.1.toml beside 1.0; in node.toml set file and version = \"1.1\")\n  \
fedq-node migrate --config node.toml --previous node.toml.old\n  fedq-node check --config node.toml\n  systemctl start fedq-node\n\n\
--previous gives the columns the rows were stored under (the store keeps only their digest): it must match them exactly. \
Columns are matched by name: a column only node.toml declares is missing in every stored row, a category keeps its label \
(re-coded where its position moved), an integer must lie within the new bounds. A dropped or retyped column, a dropped category \
that stored rows use or a value outside new bounds would change what the rows mean (a major-version change): migrate refuses, \
naming the column, and changes nothing. Per dataset, a `migrated` audit entry is made durable before the rows are replaced in \
one atomic write; budgets spent are untouched. Running it again finishes an interrupted run."
    )]
    Migrate {
        /// Path to node.toml, with the new columns (or standard version).
        #[arg(long)]
        config: PathBuf,
        /// The node.toml as it was before the change (a copy kept for this).
        #[arg(long)]
        previous: PathBuf,
    },
    /// Create the node's keys where missing (TLS key and certificate signing
    /// request, audit key) and say what to send to the federation CA.
    #[command(after_help = "Example:\n  fedq-node init --config node.toml\n  \
(send the printed .csr file to the federation CA; put the certificate it returns at tls.cert and its ca.pem at tls.ca)")]
    Init {
        /// Path to node.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// Check everything `serve` needs, by the checks `serve` runs (node.toml,
    /// TLS key, certificate and CA, the audit key, the store and the schema
    /// its rows were ingested under, each database source: reachable, with
    /// the declared columns) without serving. With --dataset and --csv, also
    /// a dry run of `ingest`: the file read through the dataset's mapping,
    /// its coverage printed, nothing stored.
    #[command(after_help = "Examples:\n  fedq-node check --config node.toml\n  \
fedq-node check --config node.toml --dataset cases --csv export-2026-11.csv\n\n\
With --dataset and --csv, check reads the file exactly as `ingest` would (same parsing, [datasets.mapping] and validation) \
and prints the rows it would add and the coverage per column (coded, missing, unmapped and the commonest unmapped values), \
for you only; it stores nothing, writes nothing to the audit log and does not record the file as ingested. \
A bad row, or a value a mapping with unmapped = \"error\" lacks, fails it with ingest's message (file:line, column, value). \
Stop the node first: check opens the store.")]
    Check {
        /// Path to node.toml.
        #[arg(long)]
        config: PathBuf,
        /// With --csv: the dataset to dry-run an ingest into, as declared in node.toml.
        #[arg(long, requires = "csv")]
        dataset: Option<String>,
        /// With --dataset: the CSV file to read as `ingest` would, storing nothing.
        #[arg(long, requires = "dataset")]
        csv: Option<PathBuf>,
    },
    /// Audit log: export, verify offline, summarise, report.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Privacy budget: show what each analyst spent, grant more.
    #[command(subcommand)]
    Budget(BudgetCommand),
    /// Back up a stopped node: a consistent copy of the store, the audit key
    /// and a manifest (audit head, budget spent). Raises the high-water mark.
    #[command(
        after_help = "Example:\n  systemctl stop fedq-node\n  fedq-node backup --config /etc/fedq/node.toml --out /var/backups/fedq/2026-11-30\n  systemctl start fedq-node\n\n\
The backup holds the audit signing key: protect it like the key. See deploy/README.md."
    )]
    Backup {
        /// Path to node.toml.
        #[arg(long)]
        config: PathBuf,
        /// New (or empty) directory to write the backup into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a stopped node's store from a backup. Refused, changing
    /// nothing, if the backup is older than what the node has reached (it
    /// would hand back spent budget), damaged, or another node's.
    #[command(
        after_help = "Example:\n  systemctl stop fedq-node\n  fedq-node restore --config /etc/fedq/node.toml --from /var/backups/fedq/2026-11-30\n\n\
The replaced store is kept beside the new one as <store>.before-restore-<time>.\n\
A backup restores only if its signed audit log contains the node's high-water mark\n\
(<store>.highwater) and the current store's last audit entry."
    )]
    Restore {
        /// Path to node.toml.
        #[arg(long)]
        config: PathBuf,
        /// The backup directory (written by `fedq-node backup`).
        #[arg(long)]
        from: PathBuf,
    },
    /// Write a synthetic CTDC-shaped dataset (never real data) for demos and
    /// tests, and print the matching schema block for node.toml.
    #[command(
        after_help = "Example:\n  fedq-node synth --partner hotline --rows 50000 --seed 7 --out cases.csv > schema.toml"
    )]
    Synth {
        /// Profile of the data (only `ctdc` for now).
        #[arg(long, default_value = "ctdc")]
        profile: String,
        /// Kind of partner: case-management, hotline or ngo.
        #[arg(long)]
        partner: String,
        /// Number of rows.
        #[arg(long)]
        rows: usize,
        /// Seed; the same seed gives the same file.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output CSV path.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Export the log (stop the node first, or use `fedq audit pull`).
    #[command(
        after_help = "Example:\n  fedq-node audit export --config node.toml --format jsonl --out audit.jsonl\n\n\
jsonl is what `audit verify` checks; csv is for spreadsheets."
    )]
    Export {
        /// Path to node.toml.
        #[arg(long)]
        config: PathBuf,
        /// jsonl or csv.
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        /// First sequence number to export.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify an exported log offline with only the node's public key.
    #[command(
        after_help = "Example:\n  fedq-node audit verify --log audit.jsonl --pubkey audit.pub --head 41:9f86d081884c7d65...\n\n\
Exit codes: 0 intact; 1 tampered or unreadable (the message names the first bad entry)."
    )]
    Verify {
        /// The export (JSON lines).
        #[arg(long)]
        log: PathBuf,
        /// The node's audit public key file (hex).
        #[arg(long)]
        pubkey: PathBuf,
        /// A head seen earlier, SEQ:HASH: the log must contain it.
        #[arg(long)]
        head: Vec<String>,
        /// The export starts at this sequence number (for `export --since`).
        #[arg(long, default_value_t = 0)]
        since: u64,
    },
    /// Per analyst and dataset: queries answered and refused, epsilon spent, remaining.
    Summary {
        /// Read the node's own log (node stopped) ...
        #[arg(long, conflicts_with = "log", required_unless_present = "log")]
        config: Option<PathBuf>,
        /// ... or an exported log (JSON lines).
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// Write a self-contained HTML report with charts of budget spent over time.
    Report {
        /// Read the node's own log (node stopped) ...
        #[arg(long, conflicts_with = "log", required_unless_present = "log")]
        config: Option<PathBuf>,
        /// ... or an exported log (JSON lines).
        #[arg(long)]
        log: Option<PathBuf>,
        /// With --log: the public key to verify it with first.
        #[arg(long)]
        pubkey: Option<PathBuf>,
        /// Output HTML file.
        #[arg(long)]
        html: PathBuf,
    },
}

#[derive(Subcommand)]
enum BudgetCommand {
    /// Show each dataset's limits and every analyst's spending (node stopped).
    Show {
        /// Path to node.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// Raise one analyst's limit on a dataset (recorded in the audit log).
    #[command(
        after_help = "Examples:\n  fedq-node budget grant --config node.toml --analyst alice@uni --dataset cases --epsilon 2\n  fedq-node budget grant --config node.toml --analyst alice@uni --dataset hotline --rho 0.5   (a measure = \"zcdp\" dataset)"
    )]
    Grant {
        /// Path to node.toml.
        #[arg(long)]
        config: PathBuf,
        /// Analyst identity (certificate CN).
        #[arg(long)]
        analyst: String,
        /// Dataset.
        #[arg(long)]
        dataset: String,
        /// Epsilon to add to the analyst's limit (a pure-DP dataset).
        #[arg(long, required_unless_present = "rho", conflicts_with = "rho")]
        epsilon: Option<f64>,
        /// Rho to add to the analyst's limit (a measure = "zcdp" dataset).
        #[arg(long)]
        rho: Option<f64>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ExportFormat {
    Jsonl,
    Csv,
}

/// Opens the store and audit log of a stopped node.
fn open_node(
    config: &std::path::Path,
) -> anyhow::Result<(
    NodeConfig,
    fedq_ledger::store::Store,
    fedq_ledger::audit::AuditLog,
)> {
    let cfg = NodeConfig::load(config)?;
    let store = fedq_ledger::store::Store::open(&cfg.resolve(&cfg.node.store))?;
    let audit = fedq_node::service::open_audit(&cfg, &store)?;
    Ok((cfg, store, audit))
}

/// The dataset `name` of `cfg`, or an error listing the declared ones.
fn declared_dataset<'a>(
    cfg: &'a NodeConfig,
    config: &std::path::Path,
    name: &str,
) -> anyhow::Result<&'a fedq_node::config::DatasetConfig> {
    cfg.dataset(name).ok_or_else(|| {
        anyhow!(
            "dataset {name:?} is not declared in {}; declared: {}",
            config.display(),
            cfg.datasets
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// What `ingest` (and `check --csv`, its dry run) prints of a file, for
/// the operator only (never sent to analysts): per column, where it was
/// read from and how many cells were coded, missing in the file, or
/// unmapped (and so stored as missing); then the undeclared columns.
fn print_coverage(coverage: &[fedq_engine::mapping::ColumnCoverage], ignored_columns: &[String]) {
    println!("coverage per column:");
    for c in coverage {
        println!("  {c}");
    }
    if !ignored_columns.is_empty() {
        println!("ignored undeclared columns: {}", ignored_columns.join(", "));
    }
}

/// Reads entries from an export file or a stopped node's store.
fn load_entries(
    config: Option<&std::path::Path>,
    log: Option<&std::path::Path>,
) -> anyhow::Result<(String, Vec<Entry>)> {
    if let Some(path) = log {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut entries = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            entries.push(
                serde_json::from_str(line).map_err(|e| {
                    anyhow!("{}:{}: not an audit entry: {e}", path.display(), i + 1)
                })?,
            );
        }
        return Ok((path.display().to_string(), entries));
    }
    let config = config.ok_or_else(|| anyhow!("give --config or --log"))?;
    let (cfg, _store, audit) = open_node(config)?;
    let entries = audit.entries(0).collect::<Result<Vec<_>, _>>()?;
    Ok((cfg.node.name, entries))
}

fn audit_command(cmd: AuditCommand) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::Export {
            config,
            format,
            since,
            out,
        } => {
            let (_cfg, _store, audit) = open_node(&config)?;
            let mut w: Box<dyn std::io::Write> = match &out {
                Some(p) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("cannot create {}", p.display()))?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            let mut csv_out =
                (format == ExportFormat::Csv).then(|| csv::Writer::from_writer(Vec::new()));
            if let Some(c) = csv_out.as_mut() {
                c.write_record(["seq", "time_utc", "type", "event", "prev", "hash", "sig"])?;
            }
            let mut n = 0u64;
            // JSON lines are the stored bytes, so the export verifies bit
            // for bit; CSV carries each event's stored JSON text.
            for line in audit.lines(since) {
                let line = line?;
                let e: audit::Entry = serde_json::from_str(&line)?;
                match csv_out.as_mut() {
                    None => writeln!(w, "{line}")?,
                    Some(c) => c.write_record([
                        e.seq.to_string(),
                        fedq_audit::report::utc(e.time_ms),
                        e.event().map_or("unknown", |ev| ev.kind()).to_string(),
                        e.event.get().to_string(),
                        e.prev.clone(),
                        e.hash.clone(),
                        e.sig.clone(),
                    ])?,
                }
                n += 1;
            }
            if let Some(c) = csv_out {
                w.write_all(&c.into_inner()?)?;
            }
            w.flush()?;
            eprintln!("exported {n} entries");
            Ok(())
        }
        AuditCommand::Verify {
            log,
            pubkey,
            head,
            since,
        } => {
            let text = std::fs::read_to_string(&log)
                .with_context(|| format!("cannot read {}", log.display()))?;
            let key_text = std::fs::read_to_string(&pubkey)
                .with_context(|| format!("cannot read {}", pubkey.display()))?;
            let public = audit::parse_public_key(&key_text)?;
            let heads = head
                .iter()
                .map(|h| audit::parse_head(h))
                .collect::<Result<Vec<_>, _>>()?;
            let mut result = audit::verify(&text, &public, since, None);
            for (seq, hash) in &heads {
                if result.is_err() {
                    break;
                }
                result = audit::verify(&text, &public, since, Some((*seq, hash)));
            }
            match result {
                Ok(v) => {
                    match v.last {
                        Some((seq, hash)) => println!(
                            "OK: {} entries verified; chain intact; last entry {seq}:{hash}{}",
                            v.entries,
                            if heads.is_empty() {
                                String::new()
                            } else {
                                format!("; contains {} known head(s)", heads.len())
                            }
                        ),
                        None => println!("OK: the log is empty"),
                    }
                    Ok(())
                }
                Err(e) => Err(anyhow!("{}: TAMPERED OR DAMAGED at {e}", log.display())),
            }
        }
        AuditCommand::Summary { config, log } => {
            let (_, entries) = load_entries(config.as_deref(), log.as_deref())?;
            print!(
                "{}",
                fedq_audit::report::summary_table(&fedq_audit::report::summarize(&entries))
            );
            Ok(())
        }
        AuditCommand::Report {
            config,
            log,
            pubkey,
            html,
        } => {
            let (name, entries) = load_entries(config.as_deref(), log.as_deref())?;
            let note = match (&log, &pubkey) {
                (Some(l), Some(p)) => {
                    let public = audit::parse_public_key(&std::fs::read_to_string(p)?)?;
                    audit::verify(
                        &std::fs::read_to_string(l)?,
                        &public,
                        entries.first().map_or(0, |e| e.seq),
                        None,
                    )
                    .map_err(|e| {
                        anyhow!(
                            "{}: refusing to report on a log that does not verify: {e}",
                            l.display()
                        )
                    })?;
                    "The chain and every signature were verified with the given public key."
                        .to_string()
                }
                (Some(_), None) => {
                    "Not verified: pass --pubkey to verify the export first.".to_string()
                }
                _ => "Read from the node's own store.".to_string(),
            };
            std::fs::write(&html, fedq_audit::report::html(&name, &entries, &note))
                .with_context(|| format!("cannot write {}", html.display()))?;
            println!("wrote {} ({} entries)", html.display(), entries.len());
            Ok(())
        }
    }
}

fn budget_command(cmd: BudgetCommand) -> anyhow::Result<()> {
    match cmd {
        BudgetCommand::Show { config } => {
            let (cfg, store, audit) = open_node(&config)?;
            let ledger = fedq_ledger::ledger::Ledger::new(store, std::sync::Arc::new(audit));
            for d in &cfg.datasets {
                println!(
                    "dataset {}: per analyst {}, total {}, per query at most {} ({})",
                    d.name,
                    d.budget.per_analyst,
                    d.budget.total,
                    d.budget.per_query_max,
                    d.budget.measure.unit()
                );
                let analysts = ledger.analysts(&d.name)?;
                if analysts.is_empty() {
                    println!("  no analyst has spent anything");
                }
                for (name, spent, granted) in analysts {
                    let s = ledger.state(&name, &d.name, &d.budget)?;
                    println!(
                        "  {name:<24} spent {spent:>9.4}  granted {granted:>8.4}  remaining {:>9.4}",
                        s.remaining_for_analyst
                    );
                }
            }
            Ok(())
        }
        BudgetCommand::Grant {
            config,
            analyst,
            dataset,
            epsilon,
            rho,
        } => {
            let (cfg, store, audit) = open_node(&config)?;
            let Some(d) = cfg.dataset(&dataset) else {
                return Err(anyhow!(
                    "dataset {dataset:?} is not declared in {}",
                    config.display()
                ));
            };
            let measure = d.budget.measure;
            let (amount, asked) = match (epsilon, rho) {
                (Some(e), _) => (e, fedq_dp::accounting::Measure::Pure),
                (_, Some(r)) => (r, fedq_dp::accounting::Measure::Zcdp),
                _ => return Err(anyhow!("give --epsilon or --rho")),
            };
            if asked != measure {
                return Err(anyhow!(
                    "dataset {dataset:?} accounts in measure {:?}: give --{} instead",
                    measure.name(),
                    measure.unit()
                ));
            }
            let ledger = fedq_ledger::ledger::Ledger::new(store, std::sync::Arc::new(audit));
            ledger.check_measures([(dataset.as_str(), measure)])?;
            let total = ledger.grant(&analyst, &dataset, amount, measure)?;
            let unit = measure.unit();
            println!("granted {analyst} {amount} more {unit} on {dataset} ({total} granted in total); recorded in the audit log");
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    return_freed_memory_at_once();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(fedq_node::server::exit_code(e.as_ref()))
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => {
            let cfg = NodeConfig::load(&config)?;
            // Extra stack headroom on top of the planner's own nesting and
            // operator limits.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_stack_size(8 << 20)
                .build()?;
            Ok(rt.block_on(fedq_node::server::serve_until(cfg, shutdown_signal()))?)
        }
        Command::Ingest {
            config,
            dataset,
            csv,
            allow_duplicate,
        } => {
            let cfg = NodeConfig::load(&config)?;
            let ds = declared_dataset(&cfg, &config, &dataset)?;
            if let Some(src) = &ds.source {
                bail!(
                    "dataset {dataset:?} answers from the database table {} ([datasets.source] in {}); there is nothing to ingest",
                    src.table,
                    config.display()
                );
            }
            let schema = ds.schema().map_err(anyhow::Error::msg)?;
            let store = fedq_ledger::store::Store::open(&cfg.resolve(&cfg.node.store))?;
            // Every ingest is in the audit log (dataset and file digest).
            let audit = fedq_node::service::open_audit(&cfg, &store)?;
            let r = fedq_node::ingest::ingest_mapped_audited(
                &store,
                &audit,
                &dataset,
                &schema,
                &ds.mapping,
                &csv,
                allow_duplicate,
            )?;
            println!(
                "ingested {} rows into {dataset:?} ({} rows in total); file sha256 {}",
                r.rows_added, r.rows_total, r.file_sha256
            );
            if let Some(f) = ds.followed() {
                println!(
                    "following standard {} {} (digest {})",
                    f.name, f.version, f.digest
                );
            }
            print_coverage(&r.coverage, &r.ignored_columns);
            Ok(())
        }
        Command::Migrate { config, previous } => {
            let cfg = NodeConfig::load(&config)?;
            let old = NodeConfig::load(&previous).context("--previous")?;
            let report = fedq_node::migrate::migrate(&cfg, &config, &old, &previous)?;
            for d in &report {
                println!("{d}");
            }
            let migrated = report
                .iter()
                .filter(|d| matches!(d.outcome, fedq_node::migrate::Outcome::Migrated(_)))
                .count();
            if migrated == 0 {
                println!("nothing was changed");
            } else {
                println!(
                    "migrated {migrated} dataset(s) in place; budgets spent and the audit log carry over. \
                     Now run: fedq-node check --config {}",
                    config.display()
                );
            }
            Ok(())
        }
        Command::Init { config } => {
            let cfg = NodeConfig::load(&config)?;
            let key_path = cfg.resolve(&cfg.tls.key);
            let cert_path = cfg.resolve(&cfg.tls.cert);
            if key_path.exists() {
                println!("TLS key {} exists; kept", key_path.display());
            } else {
                let (key, csr) = fedq_pki::key_and_request(&cfg.node.name)?;
                if let Some(dir) = key_path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                // Owner-only from its first byte (no write-then-chmod window).
                fedq_pki::write_secret(&key_path, key.as_bytes())?;
                let csr_path = key_path.with_extension("csr");
                std::fs::write(&csr_path, csr)?;
                println!(
                    "created TLS key {} (keep it here, secret)",
                    key_path.display()
                );
                println!(
                    "send {} to the federation CA; it runs:\n  fedq ca issue --ca CA --role node --name {} --csr {} --out DIR\nthen put DIR/node.pem at {} and DIR/ca.pem at {}",
                    csr_path.display(),
                    cfg.node.name,
                    csr_path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
                    cert_path.display(),
                    cfg.resolve(&cfg.tls.ca).display()
                );
            }
            let audit_key = cfg.resolve(&cfg.audit.key);
            let existed = audit_key.exists();
            let key = fedq_ledger::audit::AuditKey::load_or_create(
                &audit_key,
                &cfg.resolve(&cfg.audit.public_key),
            )?;
            println!(
                "{} audit key {}; its public key ({}) is in {}: give it to your auditors",
                if existed { "kept" } else { "created" },
                audit_key.display(),
                key.public_hex(),
                cfg.resolve(&cfg.audit.public_key).display()
            );
            Ok(())
        }
        Command::Check {
            config,
            dataset,
            csv,
        } => {
            let cfg = NodeConfig::load(&config)?;
            // The dry run's dataset, refused before anything is checked if
            // it is not one a CSV is ingested into (clap makes --dataset
            // and --csv come together).
            let dry_run = match (&dataset, &csv) {
                (Some(name), Some(file)) => {
                    let ds = declared_dataset(&cfg, &config, name)?;
                    if let Some(src) = &ds.source {
                        bail!(
                            "dataset {name:?} answers from the database table {} ([datasets.source] in {}); it has no CSV ingest, so there is no file to check: \
                             drop --dataset and --csv (check then checks the table's columns), and map your coding in a view over the table",
                            src.table,
                            config.display()
                        );
                    }
                    Some((ds, file))
                }
                _ => None,
            };
            // What `serve` checks before serving, by the same function.
            let pre = fedq_node::preflight::preflight(&cfg, fedq_node::preflight::Rows::Load)?;
            for line in &pre.checked {
                println!("{line}");
            }
            // Each dataset's standard and how each column is read.
            for d in &cfg.datasets {
                if let Some(f) = d.followed() {
                    println!(
                        "dataset {:?}: follows standard {} {} (digest {})",
                        d.name, f.name, f.version, f.digest
                    );
                }
                if d.mapping.is_empty() {
                    continue;
                }
                let schema = d.schema().map_err(anyhow::Error::msg)?;
                let mapper = fedq_engine::mapping::Mapper::compile(&d.name, &schema, &d.mapping)
                    .map_err(anyhow::Error::msg)?;
                println!("dataset {:?}: mapping coverage per column:", d.name);
                for (i, c) in schema.columns.iter().enumerate() {
                    let from = if mapper.source(i) == c.name() {
                        String::new()
                    } else {
                        format!(" <- {}", mapper.source(i))
                    };
                    match mapper.summary(i) {
                        Some(how) => println!("  {}{from}: {how}", c.name()),
                        None => println!(
                            "  {}{from}: read as declared ({})",
                            c.name(),
                            c.expectation()
                        ),
                    }
                }
            }
            // Database sources: connect and check the table's columns.
            for d in &cfg.datasets {
                let Some(src) = &d.source else { continue };
                let schema = d.schema().map_err(anyhow::Error::msg)?;
                let pg = fedq_engine::postgres::PgSource::new(&d.name, schema, src, &cfg.base_dir)?
                    .with_mapping(&d.mapping)?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                match rt.block_on(pg.connect()) {
                    Ok(()) => println!(
                        "dataset {:?}: database table {} matches the declared columns",
                        d.name,
                        pg.relation()
                    ),
                    Err(fedq_engine::postgres::SourceError::Mismatch(why)) => bail!("{why}"),
                    Err(e) => bail!("dataset {:?}: {} ({})", d.name, e.public(), e.detail()),
                }
                if !d.mapping.is_empty() {
                    // The mapping over the table's own values, as ingest
                    // reports it over a file.
                    let (coverage, strict) = rt.block_on(pg.coverage()).map_err(|e| {
                        anyhow!("dataset {:?}: {} ({})", d.name, e.public(), e.detail())
                    })?;
                    println!(
                        "dataset {:?}: mapping over database table {}:",
                        d.name,
                        pg.relation()
                    );
                    print_coverage(&coverage, &[]);
                    if !strict.is_empty() {
                        bail!(
                            "dataset {:?}: {}; add them to the mapping's values, or set unmapped = \"missing\" (queries read them as missing meanwhile)",
                            d.name,
                            strict.join("; ")
                        );
                    }
                }
            }
            // The dry run: the file read, mapped and validated by ingest's
            // own code; nothing stored, logged or recorded as ingested.
            if let Some((ds, file)) = dry_run {
                let schema = ds.schema().map_err(anyhow::Error::msg)?;
                // Asked only whether the file was ingested before; an
                // absent or empty store is not created.
                let dir = cfg.resolve(&cfg.node.store);
                let exists = std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some());
                let store = if exists {
                    Some(fedq_ledger::store::Store::open(&dir)?)
                } else {
                    None
                };
                let r = fedq_node::ingest::dry_run(
                    store.as_ref(),
                    &ds.name,
                    &schema,
                    &ds.mapping,
                    file,
                )
                .map_err(|e| {
                    let e = e.to_string();
                    if e.contains("nothing was stored") {
                        anyhow!(e)
                    } else {
                        anyhow!("{e}; nothing was stored")
                    }
                })?;
                drop(store);
                println!(
                    "dry run: ingesting {} into {:?} would add {} rows; file sha256 {}; nothing was stored",
                    file.display(),
                    ds.name,
                    r.rows,
                    r.file_sha256
                );
                if r.already_ingested {
                    println!(
                        "note: this very file was already ingested into {:?}; ingest refuses it again unless you pass --allow-duplicate (its records would count twice)",
                        ds.name
                    );
                }
                print_coverage(&r.coverage, &r.ignored_columns);
            }
            println!(
                "{}: node {:?}, {} dataset(s), listening on {}: OK",
                config.display(),
                cfg.node.name,
                cfg.datasets.len(),
                cfg.node.listen
            );
            Ok(())
        }
        Command::Backup { config, out } => {
            let cfg = NodeConfig::load(&config)?;
            let r = fedq_node::backup::backup(&cfg, &out)?;
            let m = &r.manifest;
            println!(
                "backed up node {:?} to {} ({} files); audit head {}",
                m.node,
                r.dir.display(),
                m.files.len(),
                m.audit_head
                    .as_ref()
                    .map_or("(empty log)".to_string(), |h| h.to_string())
            );
            for d in &m.ledger {
                println!(
                    "  dataset {}: {:.4} epsilon spent by {} analyst(s)",
                    d.dataset,
                    d.spent_epsilon,
                    d.analysts.len()
                );
            }
            println!(
                "high-water mark: {}",
                fedq_node::backup::high_water_path(&cfg).display()
            );
            Ok(())
        }
        Command::Restore { config, from } => {
            let cfg = NodeConfig::load(&config)?;
            let r = fedq_node::backup::restore(&cfg, &from)?;
            let m = &r.manifest;
            println!(
                "restored node {:?} from {} (taken {}); audit head {}",
                m.node,
                from.display(),
                m.created_utc,
                m.audit_head
                    .as_ref()
                    .map_or("(empty log)".to_string(), |h| h.to_string())
            );
            if let Some(old) = &r.replaced {
                println!(
                    "the replaced store is kept at {} (delete it once the node serves)",
                    old.display()
                );
            }
            if r.installed_audit_key {
                println!("installed the backed-up audit key (the node had none)");
            }
            Ok(())
        }
        Command::Audit(cmd) => audit_command(cmd),
        Command::Budget(cmd) => budget_command(cmd),
        Command::Synth {
            profile,
            partner,
            rows,
            seed,
            out,
        } => {
            if profile != "ctdc" {
                return Err(anyhow!(
                    "unknown profile {profile:?}; the only profile is ctdc"
                ));
            }
            let partner = Partner::parse(&partner).ok_or_else(|| {
                anyhow!("unknown partner kind {partner:?}; use case-management, hotline or ngo")
            })?;
            let file = std::fs::File::create(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            synth::write_csv(partner, rows, seed, std::io::BufWriter::new(file))?;
            eprintln!(
                "wrote {rows} synthetic rows to {}; schema for node.toml follows",
                out.display()
            );
            print!("{}", synth::schema_toml());
            Ok(())
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
