//! The `fedq` command: query a federation of fedq nodes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use fedq::client::{new_query_id, Federation};
use fedq::combine::combine;
use fedq::output::{render, render_budgets, render_schemas, Format};
use fedq_proto::v1::QueryRequest;

/// Exit code when every node answered.
const EXIT_OK: u8 = 0;
/// Exit code on an error: nothing usable came back.
const EXIT_ERROR: u8 = 1;
/// Exit code when some nodes answered and some did not.
const EXIT_PARTIAL: u8 = 3;

/// Query a federation of fedq nodes. Each node answers with differential
/// privacy and spends its own privacy budget; raw records never leave them.
#[derive(Parser)]
#[command(
    name = "fedq",
    version,
    after_help = "Exit codes: 0 every node answered; 3 partial result (some nodes did not answer: see the node list); \
1 error (no node answered, or bad input); 2 bad command line.\n\n\
Try it: fedq demo   (a three-node federation on this machine)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an aggregate SQL query on every node and combine the answers.
    #[command(after_help = "Examples:\n  \
fedq query --federation fed.toml --epsilon 0.5 \\\n    \"SELECT gender, COUNT(*) FROM cases WHERE isForcedLabour = 1 GROUP BY gender\"\n  \
fedq query --federation fed.toml --epsilon 1 --output json \\\n    \"SELECT COUNT(*), AVG(traffickMonths) FROM cases WHERE yearOfRegistration BETWEEN 2015 AND 2020\"\n\n\
SQL subset: SELECT [group columns,] COUNT(*) | COUNT(col) | SUM(col) | AVG(col) FROM dataset\n  \
[WHERE col = | <> | < | <= | > | >= literal, col [NOT] IN (...), col [NOT] BETWEEN a AND b, col IS [NOT] NULL, AND, OR, NOT]\n  \
[GROUP BY categorical or boolean columns]. Every key of the declared domain is returned, plus (missing).\n\n\
--epsilon is spent on every node that answers, split evenly across the measurements of the query.\n\
Retrying with the same --query-id returns the same release without spending again.")]
    Query {
        /// Path to federation.toml.
        #[arg(long)]
        federation: PathBuf,
        /// Privacy cost per node (pure epsilon-DP), e.g. 0.5.
        #[arg(long, allow_negative_numbers = true)]
        epsilon: f64,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
        /// Per-node deadline in seconds (default: the federation file's).
        #[arg(long)]
        timeout: Option<f64>,
        /// Report mechanisms, scales and the cost without spending anything.
        #[arg(long)]
        dry_run: bool,
        /// Query id; reuse one to retry a query without spending twice.
        #[arg(long)]
        query_id: Option<String>,
        /// The SQL query.
        sql: String,
    },
    /// List each node's datasets, columns, types and public bounds/domains.
    Schema {
        /// Path to federation.toml.
        #[arg(long)]
        federation: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Show your spent and remaining privacy budget on every node.
    Budget {
        /// Path to federation.toml.
        #[arg(long)]
        federation: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Audit: pull a node's signed log, check it against the heads seen in answers.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Start a three-partner demo federation on loopback and run example queries.
    #[command(
        after_help = "Examples:\n  fedq demo\n  fedq demo --dir ./demo-federation --serve   (keep the nodes running; query them by hand)"
    )]
    Demo {
        /// Keep everything under this directory (default: a temporary one).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Leave the nodes running until Ctrl-C.
        #[arg(long)]
        serve: bool,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Download a node's audit log (needs an auditor certificate the node lists).
    #[command(
        after_help = "Example:\n  fedq audit pull --federation auditor.toml --node ngo-north --out ngo-north.jsonl\n  \
fedq-node audit verify --log ngo-north.jsonl --pubkey ngo-north.jsonl.pub"
    )]
    Pull {
        /// Path to federation.toml (with your auditor certificate).
        #[arg(long)]
        federation: PathBuf,
        /// Node name.
        #[arg(long)]
        node: String,
        /// Output file (JSON lines); the node's public key goes to FILE.pub.
        #[arg(long)]
        out: PathBuf,
        /// First sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
    },
    /// Check that every audit head seen in answers is still in each node's log.
    #[command(
        after_help = "Pulls each node's log (auditor certificate), or checks one exported log:\n  \
fedq audit check-heads --federation fed.toml\n  fedq audit check-heads --federation fed.toml --node ngo-north --log ngo-north.jsonl --pubkey ngo-north.pub\n\n\
Exit codes: 0 every checked node is consistent; 1 a node diverged or could not be checked."
    )]
    CheckHeads {
        /// Path to federation.toml (its heads file holds the heads seen).
        #[arg(long)]
        federation: PathBuf,
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
        /// Use this exported log instead of pulling (needs --node).
        #[arg(long, requires = "node")]
        log: Option<PathBuf>,
        /// The node's public key file, with --log (default: the pinned key).
        #[arg(long, requires = "log")]
        pubkey: Option<PathBuf>,
        /// Heads file (default: the federation file's heads_file).
        #[arg(long)]
        heads: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Query {
            federation,
            epsilon,
            output,
            timeout,
            dry_run,
            query_id,
            sql,
        } => {
            if !(epsilon.is_finite() && epsilon > 0.0) {
                bail!("--epsilon must be a positive, finite number such as 0.5 (got {epsilon})");
            }
            let fed = Federation::load(&federation)?;
            let timeout = match timeout {
                Some(t) if t.is_finite() && t > 0.0 => Duration::from_secs_f64(t),
                Some(t) => bail!("--timeout must be a positive number of seconds (got {t})"),
                None => fed.default_timeout(),
            };
            let query_id = query_id.unwrap_or_else(new_query_id);
            let outcomes = fed
                .query(
                    QueryRequest {
                        query_id: query_id.clone(),
                        sql: sql.clone(),
                        epsilon,
                        dry_run,
                    },
                    timeout,
                )
                .await;
            let combined = combine(&sql, &query_id, epsilon, &outcomes);
            if let Err(e) = fedq::audit::record_heads(&fed, &outcomes) {
                eprintln!("warning: could not record the nodes' audit heads: {e:#}");
            }
            print!("{}", render(&combined, output)?);
            let answered = combined
                .nodes
                .iter()
                .filter(|n| n.failure.is_none())
                .count();
            if answered == 0 {
                // Every node refused for the same reason (a bad query, say):
                // say it once, plainly.
                let reasons: Vec<String> = combined
                    .nodes
                    .iter()
                    .filter_map(|n| n.failure.as_ref().map(|f| format!("{}: {f}", n.node)))
                    .collect();
                bail!("no node answered:\n  {}", reasons.join("\n  "));
            }
            Ok(if combined.partial {
                EXIT_PARTIAL
            } else {
                EXIT_OK
            })
        }
        Command::Schema { federation, output } => {
            let fed = Federation::load(&federation)?;
            let outcomes = fed.describe(fed.default_timeout()).await;
            print!("{}", render_schemas(&outcomes, output)?);
            Ok(exit_for(outcomes.iter().map(|o| o.result.is_ok())))
        }
        Command::Budget { federation, output } => {
            let fed = Federation::load(&federation)?;
            let outcomes = fed.budget(fed.default_timeout()).await;
            print!("{}", render_budgets(&outcomes, output)?);
            Ok(exit_for(outcomes.iter().map(|o| o.result.is_ok())))
        }
        Command::Audit(AuditCommand::Pull {
            federation,
            node,
            out,
            since,
        }) => {
            let fed = Federation::load(&federation)?;
            let (text, key) = fedq::audit::pull(&fed, &node, since, fed.default_timeout()).await?;
            std::fs::write(&out, &text)
                .with_context(|| format!("cannot write {}", out.display()))?;
            let key_path = PathBuf::from(format!("{}.pub", out.display()));
            std::fs::write(&key_path, format!("{key}\n"))?;
            println!(
                "wrote {} entries to {} and the node's public key to {}",
                text.lines().count(),
                out.display(),
                key_path.display()
            );
            Ok(EXIT_OK)
        }
        Command::Audit(AuditCommand::CheckHeads {
            federation,
            node,
            log,
            pubkey,
            heads,
        }) => {
            let fed = Federation::load(&federation)?;
            let heads_path =
                heads.unwrap_or_else(|| fed.config.resolve(&fed.config.defaults.heads_file));
            let mut file = fedq::audit::HeadsFile::load(&heads_path)?;
            let names: Vec<String> = match &node {
                Some(n) => vec![n.clone()],
                None => fed.config.nodes.iter().map(|n| n.name.clone()).collect(),
            };
            let mut all_ok = true;
            for name in names {
                let known = file.nodes.entry(name.clone()).or_default();
                let fetched = match &log {
                    Some(path) => {
                        let text = std::fs::read_to_string(path)
                            .with_context(|| format!("cannot read {}", path.display()))?;
                        let key = match &pubkey {
                            Some(p) => std::fs::read_to_string(p)
                                .with_context(|| format!("cannot read {}", p.display()))?,
                            None => known.public_key.clone().ok_or_else(|| {
                                anyhow::anyhow!("no public key pinned for {name}; pass --pubkey")
                            })?,
                        };
                        Ok((text, key))
                    }
                    None => fedq::audit::pull(&fed, &name, 0, fed.default_timeout()).await,
                };
                let verdict = match fetched {
                    Ok((text, key)) => fedq::audit::check(&name, &text, &key, known),
                    Err(e) => fedq::audit::HeadCheck {
                        node: name.clone(),
                        consistent: false,
                        detail: format!("could not check: {e:#}"),
                    },
                };
                all_ok &= verdict.consistent;
                println!(
                    "{:<18} {:<12} {}",
                    verdict.node,
                    if verdict.consistent {
                        "consistent"
                    } else {
                        "DIVERGED"
                    },
                    verdict.detail
                );
            }
            file.save(&heads_path)?;
            if all_ok {
                Ok(EXIT_OK)
            } else {
                Ok(EXIT_ERROR)
            }
        }
        Command::Demo { dir, serve } => {
            fedq::demo::run(dir, serve).await?;
            Ok(EXIT_OK)
        }
    }
}

fn exit_for(ok: impl Iterator<Item = bool>) -> u8 {
    let v: Vec<bool> = ok.collect();
    match (v.iter().all(|&b| b), v.iter().any(|&b| b)) {
        (true, _) => EXIT_OK,
        (false, true) => EXIT_PARTIAL,
        (false, false) => EXIT_ERROR,
    }
}
