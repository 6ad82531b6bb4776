//! The `fedq` command: query a federation of fedq nodes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::io::IsTerminal;

use fedq::client::{new_query_id, Calls, Federation, Outcome};
use fedq::output::{
    render_budgets, render_nodes, render_plan, render_schemas, render_with, Format,
};
use fedq::run::QueryOptions;

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

/// `fedq query --help`'s text after the options: examples, the SQL the
/// planner accepts (from the planner itself) and what a query spends.
fn query_help() -> String {
    format!(
        "Examples:\n  \
fedq query --federation fed.toml --epsilon 0.5 \\\n    \"SELECT gender, COUNT(*) FROM cases WHERE isForcedLabour = 1 GROUP BY gender\"\n  \
fedq query --federation fed.toml --epsilon 1 --output json \\\n    \"SELECT COUNT(*), AVG(traffickMonths) FROM cases WHERE yearOfRegistration BETWEEN 2015 AND 2020\"\n  \
fedq query --federation fed.toml --epsilon 0.5 --plot --save result.html \\\n    \"SELECT ageBroad, COUNT(*) FROM cases GROUP BY ageBroad\"\n\n\
{subset}\n\n\
--epsilon is spent on every node that answers, split evenly across the measurements of the query.\n\
--rho asks for zCDP instead (discrete Gaussian noise), on nodes whose dataset accounts in zCDP;\n\
  each answer states its cost in the node's measure and its (epsilon, delta) equivalent.\n\
Retrying with the same --query-id returns the same release without spending again.",
        subset = fedq_plan::plan::SQL_SUBSET
    )
}

/// `--federation`, shared by the commands that call the federation.
#[derive(clap::Args)]
struct FederationArg {
    /// Path to federation.toml.
    #[arg(long)]
    federation: PathBuf,
}

/// `--output`, shared by the commands that print results.
#[derive(clap::Args)]
struct OutputArg {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

/// The role a certificate is issued for.
#[derive(Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    /// A partner's node (server certificate).
    Node,
    /// A researcher who queries through the coordinator.
    Analyst,
    /// Someone who may export a node's audit log.
    Auditor,
}

impl RoleArg {
    fn pki(self) -> fedq_pki::Role {
        match self {
            RoleArg::Node => fedq_pki::Role::Node,
            RoleArg::Analyst => fedq_pki::Role::Analyst,
            RoleArg::Auditor => fedq_pki::Role::Auditor,
        }
    }
}

/// `fedq query`'s arguments.
#[derive(clap::Args)]
struct QueryArgs {
    #[command(flatten)]
    fed: FederationArg,
    /// Privacy cost per node (pure epsilon-DP, discrete Laplace noise),
    /// e.g. 0.5; with --file, the total, split evenly across the file's
    /// queries (or the whole of it to each, asked as one query, when their
    /// records are provably disjoint).
    #[arg(
        long,
        allow_negative_numbers = true,
        required_unless_present_any = ["target_ci", "rho"],
        conflicts_with = "rho"
    )]
    epsilon: Option<f64>,
    /// Privacy cost per node in zero-concentrated DP (rho-zCDP, discrete
    /// Gaussian noise), e.g. 0.05; only nodes whose dataset accounts in
    /// zCDP accept it. With --file, the total, split evenly.
    #[arg(long, allow_negative_numbers = true)]
    rho: Option<f64>,
    /// Pick the smallest epsilon whose expected combined 95% CI half-width
    /// is at most this (for every released count and sum); asks to confirm.
    #[arg(long, conflicts_with_all = ["epsilon", "file"])]
    target_ci: Option<f64>,
    /// Do not ask for confirmation (with --target-ci).
    #[arg(long)]
    yes: bool,
    #[command(flatten)]
    out: OutputArg,
    /// Per-node deadline in seconds, retries included (default: the federation file's).
    #[arg(long)]
    timeout: Option<f64>,
    /// Retries of a node that did not answer (same query id: never spends twice).
    #[arg(long, default_value_t = 2)]
    retries: u32,
    /// Release only if at least N nodes accept; otherwise nothing is spent anywhere.
    #[arg(long)]
    min_nodes: Option<usize>,
    /// Secure aggregation (with --rho): each node adds only a share of the
    /// noise, calibrated for the fewest honest participants its dataset
    /// relies on (min_honest), and masks its answer: the combined interval
    /// is up to sqrt(min_honest) times narrower, and only the sum is ever
    /// seen. Nodes whose datasets allow it only; two phases.
    #[arg(long)]
    secure: bool,
    /// Report mechanisms, scales and expected intervals without spending anything.
    #[arg(long)]
    dry_run: bool,
    /// A line on stderr while a query takes over a second (nodes answered
    /// of those asked, the slowest so far): auto (when stderr is a
    /// terminal; the default, or FEDQ_PROGRESS), always or never.
    #[arg(long, value_parser = fedq::progress::Mode::parse)]
    progress: Option<fedq::progress::Mode>,
    /// Query id; reuse one to retry a query without spending twice.
    #[arg(long, conflicts_with = "file")]
    query_id: Option<String>,
    /// Read queries from a file, separated by `;`.
    #[arg(long, conflicts_with = "sql")]
    file: Option<PathBuf>,
    /// Also write the result to FILE: .html a self-contained page with the
    /// table and a bar chart with the intervals, .json, .csv, anything
    /// else the table.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Also draw the result as horizontal bars with their 95% intervals as
    /// whiskers (GROUP BY results and histograms; one chart per aggregate).
    #[arg(long)]
    plot: bool,
    /// The SQL query.
    #[arg(required_unless_present = "file")]
    sql: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run an aggregate SQL query on every node and combine the answers.
    #[command(after_help = query_help())]
    Query(QueryArgs),
    /// Show each node's reachability, software and API version, capabilities and round-trip time.
    Nodes {
        #[command(flatten)]
        fed: FederationArg,
        #[command(flatten)]
        out: OutputArg,
    },
    /// List each node's datasets, columns, types and public bounds/domains,
    /// and the data standard each dataset follows.
    #[command(
        after_help = "Examples:\n  fedq schema --federation federation.toml\n  fedq schema --federation federation.toml --diff\n\n\
--diff shows only what differs between the nodes serving a dataset, column by column \
(the standard each follows, the privacy unit, each column's type, domain, bounds and bins; - where a node lacks the column). \
A query reading a column the nodes declare differently leaves out the nodes off the newest standard version, before anything is spent."
    )]
    Schema {
        #[command(flatten)]
        fed: FederationArg,
        #[command(flatten)]
        out: OutputArg,
        /// Show only the differences between nodes, column by column.
        #[arg(long)]
        diff: bool,
    },
    /// Show your spent and remaining privacy budget on every node.
    Budget {
        #[command(flatten)]
        fed: FederationArg,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Audit: pull a node's signed log, check it against the heads seen in answers.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// A federation CA: create it, issue certificates for nodes, analysts and auditors, revoke them.
    #[command(subcommand)]
    Ca(CaCommand),
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
enum CaCommand {
    /// Create a federation CA (ca.pem to share, ca.key to guard) in DIR.
    #[command(
        after_help = "Example:\n  fedq ca init --dir federation-ca\n\nKeep ca.key offline; give ca.pem to every node and researcher."
    )]
    Init {
        /// Directory to create the CA in (must not hold one already).
        #[arg(long)]
        dir: PathBuf,
        /// The CA's name.
        #[arg(long, default_value = "fedq federation CA")]
        name: String,
    },
    /// Issue a certificate (and a key, unless --csr is given) for a node, analyst or auditor.
    #[command(after_help = "Examples:\n  \
fedq ca issue --ca federation-ca --role analyst --name alice@uni.example --out alice/\n  \
fedq ca issue --ca federation-ca --role node --name ngo-north --csr node.csr --out ngo-north/   (the node keeps its key)\n\n\
The name becomes the certificate's CN (the identity nodes see) and the role its OU.")]
    Issue {
        /// The CA directory (ca.pem, ca.key).
        #[arg(long)]
        ca: PathBuf,
        /// Who the certificate is for.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// The holder's name (a node's DNS name; an analyst's or auditor's identity).
        #[arg(long)]
        name: String,
        /// Where to write <role>.pem (and <role>.key without --csr).
        #[arg(long)]
        out: PathBuf,
        /// Sign this certificate signing request instead of making a key.
        #[arg(long)]
        csr: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// A node certificate only: another DNS name or IP address it is
        /// valid for (repeatable), e.g. localhost. By default a node's
        /// certificate names only --name, which is what coordinators check.
        #[arg(long = "also-name", value_name = "NAME")]
        also_name: Vec<String>,
    },
    /// Revoke a certificate: add it to the CA's revocation list and write a new crl.pem.
    #[command(after_help = "Examples:\n  \
fedq ca revoke --ca federation-ca alice/analyst.pem\n  \
fedq ca revoke --ca federation-ca 3f:a2:09:...   (the serial, as `openssl x509 -serial` prints it)\n\n\
Every revocation is kept in CA/revoked.json and the whole list is signed again into CA/crl.pem.\n\
Copy crl.pem to the path of every node's [tls] crl: nodes pick a new list up within seconds,\n\
without a restart, and refuse the revoked certificate at the TLS handshake.")]
    Revoke {
        /// The CA directory (ca.pem, ca.key).
        #[arg(long)]
        ca: PathBuf,
        /// The certificate to revoke: its PEM file, or its serial number in hex.
        certificate: String,
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
Each log is verified with the node's audit key pinned in the heads file at its first answer, never with
the key the node (or --pubkey) hands over: a log signed with another key is DIVERGED, even with its
contents unchanged. A heads file from before keys were pinned has the key pinned now (and says so).

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
        /// The node's public key file, with --log (default: the pinned key; must equal it).
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

/// Dispatches to the command's function.
async fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Query(args) => query(args).await,
        Command::Nodes {
            fed: FederationArg { federation },
            out: OutputArg { output },
        } => nodes(&federation, output).await,
        Command::Schema {
            fed: FederationArg { federation },
            out: OutputArg { output },
            diff,
        } => schema(&federation, output, diff).await,
        Command::Budget {
            fed: FederationArg { federation },
            out: OutputArg { output },
        } => budget(&federation, output).await,
        Command::Audit(AuditCommand::Pull {
            federation,
            node,
            out,
            since,
        }) => audit_pull(&federation, &node, &out, since).await,
        Command::Audit(AuditCommand::CheckHeads {
            federation,
            node,
            log,
            pubkey,
            heads,
        }) => audit_check_heads(&federation, node, log, pubkey, heads).await,
        Command::Ca(CaCommand::Init { dir, name }) => ca_init(&dir, &name),
        Command::Ca(CaCommand::Issue {
            ca,
            role,
            name,
            out,
            csr,
            days,
            also_name,
        }) => ca_issue(&ca, role, &name, &out, csr, days, &also_name),
        Command::Ca(CaCommand::Revoke { ca, certificate }) => ca_revoke(&ca, &certificate),
        Command::Demo { dir, serve } => {
            fedq_cli::demo::run(dir, serve).await?;
            Ok(EXIT_OK)
        }
    }
}

/// The queries to run: `sql`, or those of `file` (separated by `;`).
fn queries_of(file: Option<&std::path::Path>, sql: Option<String>) -> anyhow::Result<Vec<String>> {
    match (file, sql) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let qs: Vec<String> = text
                .split(';')
                .map(str::trim)
                .filter(|q| !q.is_empty())
                .map(String::from)
                .collect();
            if qs.is_empty() {
                bail!("{} holds no query", path.display());
            }
            Ok(qs)
        }
        (None, Some(sql)) => Ok(vec![sql]),
        (None, None) => bail!("give a SQL query or --file"),
    }
}

/// `fedq query`: each query through [`fedq::query::ask`], printed, and
/// saved with `--save`.
async fn query(args: QueryArgs) -> anyhow::Result<u8> {
    let QueryArgs {
        fed: FederationArg { federation },
        epsilon,
        rho,
        target_ci,
        yes,
        out: OutputArg { output },
        timeout,
        retries,
        min_nodes,
        secure,
        dry_run,
        progress,
        query_id,
        file,
        save,
        plot,
        sql,
    } = args;
    let fed = Federation::load(&federation)?;
    let progress_mode = match progress {
        Some(mode) => mode,
        None => fedq::progress::Mode::from_env().map_err(anyhow::Error::msg)?,
    };
    let timeout = match timeout {
        Some(t) => match Duration::try_from_secs_f64(t) {
            Ok(d) if t > 0.0 => d,
            _ => bail!("--timeout must be a positive number of seconds (got {t})"),
        },
        None => fed.default_timeout(),
    };
    let calls = Calls { timeout, retries };
    if min_nodes == Some(0) || min_nodes.is_some_and(|n| n > fed.config.nodes.len()) {
        bail!(
            "--min-nodes must be between 1 and the {} nodes of the federation",
            fed.config.nodes.len()
        );
    }
    let queries = queries_of(file.as_deref(), sql)?;
    let (unit, total) = match (epsilon, rho, target_ci) {
        (Some(e), _, _) => ("epsilon", e),
        (None, Some(_), Some(_)) => bail!(
            "--target-ci picks an epsilon (discrete Laplace) only; with --rho, run the query with --dry-run to see the expected combined 95% intervals"
        ),
        (None, Some(r), None) => ("rho", r),
        (None, None, Some(w)) => {
            if !(w.is_finite() && w > 0.0) {
                bail!("--target-ci must be a positive number (got {w})");
            }
            let choice = fedq::query::epsilon_for_target(&fed, &queries[0], w, calls).await?;
            eprintln!(
                "epsilon {} per node gives an expected combined 95% CI of ± {:.1} (target ± {w}) over {} node(s)",
                choice.epsilon, choice.half_width, choice.nodes
            );
            // Side by side: what secure aggregation would need, when every
            // node offers it (zCDP datasets with the policy).
            if let Ok(Some(s)) =
                fedq::query::secure_rho_for_target(&fed, &queries[0], w, calls).await
            {
                eprintln!(
                    "with --secure, rho {} per node gives ± {:.1} (without --secure that rho gives ± {:.1}); ask with --secure --rho {} to use it",
                    s.rho, s.half_width, s.plain_half_width, s.rho
                );
            }
            if !yes {
                confirm(&format!("spend epsilon {} per node?", choice.epsilon))?;
            }
            ("epsilon", choice.epsilon)
        }
        (None, None, None) => bail!("give --epsilon, --rho or --target-ci"),
    };
    if !(total.is_finite() && total > 0.0) {
        let example = if unit == "rho" { "0.05" } else { "0.5" };
        bail!("--{unit} must be a positive, finite number such as {example} (got {total})");
    }
    let each = total / queries.len() as f64;
    // Queries over provably disjoint records are asked as one grouped
    // query, each with the whole budget (parallel composition; see
    // fedq::compose); otherwise each gets an even share. A dry run asks
    // the same way, so it shows what the real run will do.
    let mut set = None;
    if queries.len() > 1 {
        let whole = QueryOptions {
            secure: secure || fed.config.defaults.secure,
            epsilon: if unit == "rho" { 0.0 } else { total },
            rho: if unit == "rho" { total } else { 0.0 },
            dry_run,
            calls,
            min_nodes,
            query_id: query_id.clone().unwrap_or_else(new_query_id),
        };
        set = fedq::compose::ask_set(&fed, &queries, &whole)
            .await
            .map(Vec::into_iter);
    }
    if set.is_some() {
        eprintln!(
            "{} queries over provably disjoint records, {}: each gets the whole {unit} {total} (parallel composition)",
            queries.len(),
            if dry_run { "would be asked as one" } else { "asked as one" }
        );
    } else if queries.len() > 1 {
        eprintln!(
            "{} queries; {unit} {total} split evenly: {each} each (sequential composition)",
            queries.len()
        );
    }
    let (each_epsilon, each_rho) = if unit == "rho" {
        (0.0, each)
    } else {
        (each, 0.0)
    };
    let terminal = std::io::stdout().is_terminal();
    let mut saved = Vec::new();
    let mut code = EXIT_OK;
    for written in &queries {
        let opts = QueryOptions {
            secure: secure || fed.config.defaults.secure,
            epsilon: each_epsilon,
            rho: each_rho,
            dry_run,
            calls,
            min_nodes,
            query_id: query_id.clone().unwrap_or_else(new_query_id),
        };
        let progress = fedq::progress::Progress::start(&fed, progress_mode);
        let result = match set.as_mut().and_then(Iterator::next) {
            Some(answer) => answer,
            None => fedq::query::ask(&fed, written, &opts).await,
        };
        progress.stop().await;
        let answer = match result {
            Ok(a) => a,
            Err(e) => {
                eprintln!("error: {e}");
                code = EXIT_ERROR;
                continue;
            }
        };
        answer
            .audit_notes
            .iter()
            .for_each(|n| eprintln!("audit: {n}"));
        if let Some(w) = &answer.audit_warning {
            eprintln!("warning: {w}");
        }
        let combined = &answer.combined;
        let text = if dry_run {
            let mut text = render_plan(&answer.sent, &answer.outcomes, output)?;
            if let (Some(p), Format::Table) = (&combined.post_processing, output) {
                text.push_str(&format!("post-processing: {p}\n"));
            }
            text
        } else {
            render_with(combined, output, terminal && output == Format::Table)?
        };
        print!("{text}");
        if plot {
            print!("\n{}", fedq::chart::plot(combined));
        }
        if queries.len() > 1 && output == Format::Table {
            println!();
        }
        code = code.max(if answer.answered() == 0 {
            let reasons: Vec<String> = combined
                .nodes
                .iter()
                .filter_map(|n| n.failure.as_ref().map(|f| format!("{}: {f}", n.node)))
                .collect();
            eprintln!("error: no node answered:\n  {}", reasons.join("\n  "));
            EXIT_ERROR
        } else if combined.partial {
            EXIT_PARTIAL
        } else {
            EXIT_OK
        });
        saved.push((answer.combined, answer.outcomes));
    }
    if let Some(path) = save {
        save_results(&path, &saved, dry_run)?;
    }
    // An error outranks a partial result.
    Ok(if code == EXIT_ERROR { EXIT_ERROR } else { code })
}

/// `fedq nodes`.
async fn nodes(federation: &std::path::Path, output: Format) -> anyhow::Result<u8> {
    let fed = Federation::load(federation)?;
    let outcomes = fed.describe(fed.default_timeout()).await;
    print!("{}", render_nodes(&fed, &outcomes, output)?);
    Ok(exit_for(outcomes.iter().map(|o| o.result.is_ok())))
}

/// `fedq schema`.
async fn schema(federation: &std::path::Path, output: Format, diff: bool) -> anyhow::Result<u8> {
    let fed = Federation::load(federation)?;
    let outcomes = fed.describe(fed.default_timeout()).await;
    if diff {
        print!("{}", fedq::output::render_schema_diff(&outcomes, output)?);
    } else {
        print!("{}", render_schemas(&outcomes, output)?);
    }
    Ok(exit_for(outcomes.iter().map(|o| o.result.is_ok())))
}

/// `fedq budget`.
async fn budget(federation: &std::path::Path, output: Format) -> anyhow::Result<u8> {
    let fed = Federation::load(federation)?;
    let outcomes = fed.budget(fed.default_timeout()).await;
    print!("{}", render_budgets(&outcomes, output)?);
    Ok(exit_for(outcomes.iter().map(|o| o.result.is_ok())))
}

/// `fedq audit pull`.
async fn audit_pull(
    federation: &std::path::Path,
    node: &str,
    out: &std::path::Path,
    since: u64,
) -> anyhow::Result<u8> {
    let fed = Federation::load(federation)?;
    let (text, key) = fedq::audit::pull(&fed, node, since, fed.default_timeout()).await?;
    std::fs::write(out, &text).with_context(|| format!("cannot write {}", out.display()))?;
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

/// `fedq audit check-heads`.
async fn audit_check_heads(
    federation: &std::path::Path,
    node: Option<String>,
    log: Option<PathBuf>,
    pubkey: Option<PathBuf>,
    heads: Option<PathBuf>,
) -> anyhow::Result<u8> {
    let fed = Federation::load(federation)?;
    let heads_path = heads.unwrap_or_else(|| fed.config.resolve(&fed.config.defaults.heads_file));
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
    Ok(if all_ok { EXIT_OK } else { EXIT_ERROR })
}

/// `fedq ca init`.
fn ca_init(dir: &std::path::Path, name: &str) -> anyhow::Result<u8> {
    if dir.join("ca.key").exists() {
        bail!(
            "{} already holds a CA (ca.key); refusing to overwrite it",
            dir.display()
        );
    }
    let ca = fedq_pki::Authority::generate(name)?;
    ca.save(dir)?;
    println!(
        "created CA {name:?} in {}: share ca.pem with every node and researcher; keep ca.key secret (mode 0600)",
        dir.display()
    );
    Ok(EXIT_OK)
}

/// `fedq ca issue`.
fn ca_issue(
    ca: &std::path::Path,
    role: RoleArg,
    name: &str,
    out: &std::path::Path,
    csr: Option<PathBuf>,
    days: u32,
    also_name: &[String],
) -> anyhow::Result<u8> {
    let role = role.pki();
    if name.trim().is_empty() || name.contains('/') {
        bail!("--name must be a non-empty name without '/'");
    }
    if days == 0 || days > 3650 {
        bail!("--days must be between 1 and 3650");
    }
    if !also_name.is_empty() && role != fedq_pki::Role::Node {
        bail!("--also-name is for node certificates (the names a node serves under)");
    }
    let authority = fedq_pki::Authority::load(ca)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let stem = role.as_str();
    match csr {
        Some(path) => {
            let request = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let cert = authority.sign_request_with_names(role, name, also_name, &request, days)?;
            std::fs::write(out.join(format!("{stem}.pem")), cert)?;
            println!(
                "issued {stem} certificate for {name:?} from {}: {}",
                path.display(),
                out.join(format!("{stem}.pem")).display()
            );
        }
        None => {
            let now = std::time::SystemTime::now();
            let pair = authority.issue_with_names(
                role,
                name,
                also_name,
                now - Duration::from_secs(3600),
                now + Duration::from_secs(u64::from(days) * 86_400),
            )?;
            pair.write(out, stem)?;
            println!(
                "issued {stem} certificate and key for {name:?}: {} and {} (keep the key secret)",
                out.join(format!("{stem}.pem")).display(),
                out.join(format!("{stem}.key")).display()
            );
        }
    }
    std::fs::write(out.join("ca.pem"), &authority.pem.cert)?;
    Ok(EXIT_OK)
}

/// `fedq ca revoke`.
fn ca_revoke(ca: &std::path::Path, certificate: &str) -> anyhow::Result<u8> {
    let authority = fedq_pki::Authority::load(ca)?;
    let path = std::path::Path::new(certificate);
    let (serial, name, role) = if path.is_file() {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let (serial, who) = fedq_pki::serial_and_holder(&pem)
            .ok_or_else(|| anyhow::anyhow!("{} is not a PEM certificate", path.display()))?;
        if !authority.is_issuer_of(&pem) {
            bail!(
                "{} was not issued by the CA in {}; listing it in this CA's revocation list would have no effect",
                path.display(),
                ca.display()
            );
        }
        (serial, who.name, who.role)
    } else {
        let serial = fedq_pki::parse_serial(certificate)?;
        (serial, String::new(), String::new())
    };
    let mut list = fedq_pki::RevocationList::load(ca)?;
    let added = list.add(&serial, &name, &role);
    let crl = list.publish(&authority, ca)?;
    let who = if name.is_empty() {
        String::new()
    } else {
        format!(" ({role} {name:?})")
    };
    println!(
        "{} serial {}{who}; wrote {} ({} revoked in all, list number {})",
        if added { "revoked" } else { "already revoked:" },
        fedq_pki::serial_hex(&serial),
        crl.display(),
        list.revoked.len(),
        list.crl_number
    );
    println!(
        "copy it to every node's [tls] crl path: nodes load it within seconds, without a restart"
    );
    Ok(EXIT_OK)
}

/// Asks on the terminal; refuses to guess when there is no terminal.
fn confirm(question: &str) -> anyhow::Result<()> {
    if !std::io::stdin().is_terminal() {
        bail!("{question} needs a confirmation: run it on a terminal or add --yes");
    }
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if matches!(answer.trim(), "y" | "Y" | "yes" | "Yes") {
        Ok(())
    } else {
        bail!("not confirmed; nothing was spent")
    }
}

/// Writes results to `path` in the format its extension names.
fn save_results(
    path: &std::path::Path,
    results: &[(
        fedq::combine::Combined,
        Vec<Outcome<fedq_proto::v1::QueryResponse>>,
    )],
    dry_run: bool,
) -> anyhow::Result<()> {
    let extension = path.extension().and_then(|e| e.to_str());
    if matches!(extension, Some("html" | "htm")) {
        let all: Vec<&fedq::combine::Combined> = results.iter().map(|(c, _)| c).collect();
        std::fs::write(path, fedq::chart::html(&all))
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("saved to {} (open it in a browser)", path.display());
        return Ok(());
    }
    let format = match extension {
        Some("json") => Format::Json,
        Some("csv") => Format::Csv,
        _ => Format::Table,
    };
    let text = if format == Format::Json && !dry_run {
        let all: Vec<&fedq::combine::Combined> = results.iter().map(|(c, _)| c).collect();
        if all.len() == 1 {
            serde_json::to_string_pretty(all[0])? + "\n"
        } else {
            serde_json::to_string_pretty(&all)? + "\n"
        }
    } else {
        let mut text = String::new();
        for (c, outcomes) in results {
            text.push_str(&if dry_run {
                render_plan(&c.sql, outcomes, format)?
            } else {
                render_with(c, format, false)?
            });
        }
        text
    };
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("saved to {}", path.display());
    Ok(())
}

fn exit_for(ok: impl Iterator<Item = bool>) -> u8 {
    let v: Vec<bool> = ok.collect();
    match (v.iter().all(|&b| b), v.iter().any(|&b| b)) {
        (true, _) => EXIT_OK,
        (false, true) => EXIT_PARTIAL,
        (false, false) => EXIT_ERROR,
    }
}
