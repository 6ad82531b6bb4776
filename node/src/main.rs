//! The `fedq-node` command: what a partner organisation runs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand};
use fedq_node::config::NodeConfig;
use fedq_node::schema::Schema;
use fedq_node::synth::{self, Partner};

/// A partner's node in a fedq federation: holds your case records, answers
/// aggregate queries with differential privacy, spends a budget you control.
#[derive(Parser)]
#[command(
    name = "fedq-node",
    version,
    after_help = "Exit codes: 0 success, 1 error (the message says what and what to do), 2 bad command line.\n\n\
Typical set-up:\n  fedq-node synth --partner ngo --rows 20000 --seed 1 --out cases.csv\n  \
fedq-node check --config node.toml\n  fedq-node ingest --config node.toml --dataset cases --csv cases.csv\n  \
fedq-node serve --config node.toml"
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
Cells -99 or empty are missing. One bad row fails the whole ingest with file:line, column and what was expected; nothing is stored."
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
    /// Check node.toml (syntax, schema, budgets, TLS files) without starting.
    Check {
        /// Path to node.toml.
        #[arg(long)]
        config: PathBuf,
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

fn main() -> ExitCode {
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
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => {
            let cfg = NodeConfig::load(&config)?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(fedq_node::server::serve_until(cfg, shutdown_signal()))
        }
        Command::Ingest {
            config,
            dataset,
            csv,
            allow_duplicate,
        } => {
            let cfg = NodeConfig::load(&config)?;
            let ds = cfg.dataset(&dataset).ok_or_else(|| {
                anyhow!(
                    "dataset {dataset:?} is not declared in {}; declared: {}",
                    config.display(),
                    cfg.datasets
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
            let schema = Schema::from_specs(&ds.name, &ds.columns).map_err(anyhow::Error::msg)?;
            let store = fedq_node::store::Store::open(&cfg.resolve(&cfg.node.store))?;
            let r =
                fedq_node::ingest::ingest_csv(&store, &dataset, &schema, &csv, allow_duplicate)?;
            println!(
                "ingested {} rows into {dataset:?} ({} rows in total); file sha256 {}",
                r.rows_added, r.rows_total, r.file_sha256
            );
            if !r.ignored_columns.is_empty() {
                println!(
                    "ignored undeclared columns: {}",
                    r.ignored_columns.join(", ")
                );
            }
            Ok(())
        }
        Command::Check { config } => {
            let cfg = NodeConfig::load(&config)?;
            for (what, p) in [
                ("ca", &cfg.tls.ca),
                ("cert", &cfg.tls.cert),
                ("key", &cfg.tls.key),
            ] {
                let path = cfg.resolve(p);
                std::fs::metadata(&path)
                    .with_context(|| format!("tls.{what}: cannot read {}", path.display()))?;
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
