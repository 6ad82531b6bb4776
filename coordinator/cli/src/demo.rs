//! `fedq demo`: a whole federation on this machine, in one command.
//!
//! Creates a throw-away CA and certificates, three partners with their own
//! synthetic CTDC-shaped datasets (different marginals per partner kind),
//! all following the shipped data standard (`deploy/standards/`), one of
//! them exporting its records in its own coding (F/M/T, ages in years,
//! country names) and mapping it onto the standard at ingest,
//! their own sled stores and `node.toml` files, starts the three nodes on
//! loopback over mutual TLS, and runs example queries through the same
//! coordinator code `fedq query` uses.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use fedq_engine::synth::{self, Partner};
use fedq_node::config::{BudgetLimits, DatasetConfig, Limits, NodeConfig, NodeSection, TlsSection};
use fedq_pki::{Authority, Role};

use fedq::client::{new_query_id, Calls, Federation};
use fedq::federation::{ClientTls, Defaults, FederationConfig, NodeEntry};
use fedq::output::{render, render_budgets, Format};
use fedq::run::QueryOptions;

/// The federation's data standard every demo node follows (the shipped one).
const STANDARD: &str = include_str!("../../../deploy/standards/ctdc-cases-1.0.toml");

/// Where the demo writes the standard, relative to its directory.
const STANDARD_FILE: &str = "standards/ctdc-cases-1.0.toml";

/// The partner that exports its records in its own coding and maps them
/// onto the standard ([`fedq_engine::partner_coding`]).
const MAPPING_PARTNER: &str = "hotline-central";

/// The demo's partners: name, kind, rows and seed.
const PARTNERS: [(&str, Partner, usize, u64); 3] = [
    ("ngo-north", Partner::Ngo, 24_000, 11),
    ("hotline-central", Partner::Hotline, 30_000, 22),
    ("casework-south", Partner::CaseManagement, 40_000, 33),
];

/// The example queries and the epsilon each spends per node.
pub const QUERIES: [(&str, f64); 5] = [
    ("SELECT gender, COUNT(*) FROM cases WHERE isForcedLabour = 1 GROUP BY gender", 0.5),
    ("SELECT ageBroad, COUNT(*) FROM cases WHERE isSexualExploit = 1 GROUP BY ageBroad", 0.5),
    (
        "SELECT COUNT(*), AVG(traffickMonths) FROM cases WHERE yearOfRegistration BETWEEN 2015 AND 2020",
        1.0,
    ),
    (
        "SELECT majorityStatus, COUNT(*) FROM cases WHERE isForcedLabour = 1 OR meansOfControlDebtBondage = 1 GROUP BY majorityStatus",
        0.5,
    ),
    (
        "SELECT gender, MEDIAN(traffickMonths), QUANTILE(traffickMonths, 0.9), STDDEV(traffickMonths) FROM cases WHERE isForcedLabour = 1 GROUP BY gender",
        1.0,
    ),
];

/// Writes a complete federation under `dir`: CA, certificates, data,
/// ingested stores, `<node>/node.toml` and `federation.toml`. Returns the
/// paths of the node configs.
pub fn build_federation(dir: &Path, out: &mut impl std::io::Write) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca = Authority::generate("fedq demo federation CA")?;
    ca.pem.write(&dir.join("ca"), "ca")?;
    ca.issue(Role::Analyst, "demo-analyst")?
        .write(&dir.join("analyst"), "analyst")?;
    std::fs::create_dir_all(dir.join("standards"))?;
    std::fs::write(dir.join(STANDARD_FILE), STANDARD)?;
    let mut configs = Vec::new();
    let mut entries = Vec::new();
    for (name, partner, rows, seed) in PARTNERS {
        let node_dir = dir.join(name);
        let certs = node_dir.join("certs");
        ca.issue(Role::Node, name)?.write(&certs, "node")?;
        std::fs::write(certs.join("ca.pem"), &ca.pem.cert)?;
        let csv_path = node_dir.join("cases.csv");
        let mapping = if name == MAPPING_PARTNER {
            // This partner's case system exports its own coding.
            let mut standard_coded = Vec::new();
            synth::write_csv(partner, rows, seed, &mut standard_coded)?;
            let file = std::fs::File::create(&csv_path)?;
            fedq_engine::partner_coding::recode(
                standard_coded.as_slice(),
                std::io::BufWriter::new(file),
            )?;
            let file: toml::Table = toml::from_str(fedq_engine::partner_coding::MAPPING_TOML)?;
            file["datasets"]["mapping"].clone().try_into()?
        } else {
            let file = std::fs::File::create(&csv_path)?;
            synth::write_csv(partner, rows, seed, std::io::BufWriter::new(file))?;
            Default::default()
        };
        let port = free_port()?;
        let config = NodeConfig {
            node: NodeSection {
                name: name.to_string(),
                listen: format!("127.0.0.1:{port}").parse()?,
                store: "store".into(),
            },
            tls: TlsSection {
                ca: "certs/ca.pem".into(),
                cert: "certs/node.pem".into(),
                key: "certs/node.key".into(),
                crl: None,
            },
            limits: Limits::default(),
            audit: fedq_node::config::AuditSection {
                auditors: vec!["demo-auditor".into()],
                ..Default::default()
            },
            source_sha256: String::new(),
            access: fedq_node::config::AccessSection {
                analysts: vec![fedq_node::config::AnalystAccess {
                    name: "demo-analyst".into(),
                    datasets: vec!["*".into()],
                }],
            },
            datasets: vec![DatasetConfig {
                name: "cases".into(),
                description: format!(
                    "synthetic CTDC-shaped victim case records ({} profile)",
                    partner.as_str()
                ),
                budget: BudgetLimits {
                    keys_delta: None,
                    keys_delta_per_analyst: None,
                    keys_delta_total: None,
                    per_analyst: 10.0,
                    total: 50.0,
                    per_query_max: 2.0,
                    measure: Default::default(),
                    delta: None,
                },
                columns: Vec::new(),
                privacy_unit: None,
                source: None,
                secure_aggregation: None,
                standard: Some(fedq_node::config::StandardRef {
                    file: Path::new("..").join(STANDARD_FILE),
                    name: Some("ctdc-cases".into()),
                    version: Some("1.0".into()),
                    dataset: None,
                    followed: None,
                }),
                mapping,
                lookups: Vec::new(),
            }],
            base_dir: node_dir.clone(),
        };
        let path = node_dir.join("node.toml");
        std::fs::write(&path, toml::to_string_pretty(&config)?)?;
        let config = NodeConfig::load(&path)?;
        let ds = &config.datasets[0];
        let schema = ds.schema().map_err(anyhow::Error::msg)?;
        {
            let store = fedq_ledger::store::Store::open(&config.resolve(&config.node.store))?;
            let audit = fedq_node::service::open_audit(&config, &store)?;
            let r = fedq_node::ingest::ingest_mapped_audited(
                &store,
                &audit,
                "cases",
                &schema,
                &ds.mapping,
                &csv_path,
                false,
            )?;
            store.flush()?;
            writeln!(
                out,
                "  {name:<16} {:<16} {} synthetic rows ingested, listening on 127.0.0.1:{port}",
                partner.as_str(),
                r.rows_added
            )?;
            if !ds.mapping.is_empty() {
                writeln!(
                    out,
                    "  {:<16} exports its own coding, mapped onto the standard at ingest ([datasets.mapping] in {name}/node.toml); coverage, for its operator only:",
                    ""
                )?;
                for c in r.coverage.iter().filter(|c| c.mapped) {
                    writeln!(out, "  {:<18} {c}", "")?;
                }
            }
        }
        entries.push(NodeEntry {
            name: name.to_string(),
            endpoint: format!("https://127.0.0.1:{port}"),
        });
        configs.push(path);
    }
    let fed = FederationConfig {
        tls: ClientTls {
            ca: "ca/ca.pem".into(),
            cert: "analyst/analyst.pem".into(),
            key: "analyst/analyst.key".into(),
            crl: None,
        },
        defaults: Defaults::default(),
        nodes: entries,
        base_dir: dir.to_path_buf(),
    };
    std::fs::write(dir.join("federation.toml"), toml::to_string_pretty(&fed)?)?;
    // The same federation seen by an auditor (for `fedq audit pull` and
    // `fedq audit check-heads`), sharing the researcher's heads file.
    ca.issue(Role::Auditor, "demo-auditor")?
        .write(&dir.join("auditor"), "auditor")?;
    let auditor = FederationConfig {
        tls: ClientTls {
            ca: "ca/ca.pem".into(),
            cert: "auditor/auditor.pem".into(),
            key: "auditor/auditor.key".into(),
            crl: None,
        },
        ..fed
    };
    std::fs::write(dir.join("auditor.toml"), toml::to_string_pretty(&auditor)?)?;
    Ok(configs)
}

/// A port free on loopback right now.
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// One example query, through the path `fedq query` takes
/// ([`fedq::query::ask`]: planned locally, checked, combined).
async fn ask_demo(
    fed: &Federation,
    sql: &str,
    epsilon: f64,
    timeout: Duration,
) -> anyhow::Result<fedq::query::Answer> {
    let opts = QueryOptions {
        secure: false,
        epsilon,
        rho: 0.0,
        dry_run: false,
        calls: Calls {
            timeout,
            retries: 1,
        },
        min_nodes: None,
        query_id: new_query_id(),
    };
    let answer = fedq::query::ask(fed, sql, &opts)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    if let Some(w) = &answer.audit_warning {
        eprintln!("warning: {w}");
    }
    Ok(answer)
}

/// Runs the demo. With `serve`, leaves the nodes running until Ctrl-C.
pub async fn run(dir: Option<PathBuf>, serve: bool) -> anyhow::Result<()> {
    let temp;
    let dir = match dir {
        Some(d) => d,
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let mut stdout = std::io::stdout();
    let reused = dir.join("federation.toml").exists();
    let configs = if reused {
        // A federation built by an earlier `fedq demo --dir`: serve it again
        // as it is (same CA, certificates, ports, stores and spent budget)
        // rather than overwrite half of it.
        println!(
            "fedq demo: reusing the federation in {} (its budgets keep what was spent)",
            dir.display()
        );
        let configs: Vec<PathBuf> = PARTNERS
            .iter()
            .map(|(name, ..)| dir.join(name).join("node.toml"))
            .collect();
        if let Some(missing) = configs.iter().find(|p| !p.exists()) {
            return Err(anyhow!(
                "{} has a federation.toml but no {}; it is not a complete demo federation: choose another --dir",
                dir.display(),
                missing.display()
            ));
        }
        configs
    } else {
        if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
            return Err(anyhow!(
                "{} exists and is not empty; give a new or empty directory to --dir",
                dir.display()
            ));
        }
        println!(
            "fedq demo: building a three-partner federation in {}, every node following the data standard {STANDARD_FILE}",
            dir.display()
        );
        let dir_for_build = dir.clone();
        let (result, log) = tokio::task::spawn_blocking(move || {
            let mut buf = Vec::new();
            let r = build_federation(&dir_for_build, &mut buf);
            (r, buf)
        })
        .await?;
        std::io::Write::write_all(&mut stdout, &log)?;
        result?
    };
    let mut nodes = Vec::new();
    for path in &configs {
        nodes.push(fedq_node::server::start(NodeConfig::load(path)?).await?);
    }
    let fed = Federation::load(&dir.join("federation.toml"))?;
    let timeout = Duration::from_secs(30);
    println!();
    if reused {
        // The example queries ran when the federation was built; running
        // them again would spend the analyst's budget again for nothing.
        println!("the example queries ran when this federation was built; not running them again (they would spend budget again)\n");
    }
    for (sql, epsilon) in QUERIES.iter().copied().filter(|_| !reused) {
        let answer = ask_demo(&fed, sql, epsilon, timeout).await?;
        print!("{}", render(&answer.combined, Format::Table)?);
        println!();
    }
    println!("your remaining budget per node:");
    print!(
        "{}",
        render_budgets(&fed.budget(timeout).await, Format::Table)?
    );

    if serve {
        println!(
            "\nthe three nodes keep running until Ctrl-C. In another terminal, try:\n  \
             cargo run --release --bin fedq -- query --federation {}/federation.toml --epsilon 0.5 \\\n    \
             \"SELECT gender, COUNT(*) FROM cases WHERE isForcedLabour = 1 GROUP BY gender\"\n  \
             cargo run --release --bin fedq -- schema --federation {}/federation.toml",
            dir.display(),
            dir.display()
        );
        println!(
            "as an auditor: cargo run --release --bin fedq -- audit check-heads --federation {}/auditor.toml",
            dir.display()
        );
        println!(
            "from Python (pip install ./python): fedq.Federation(\"{}/federation.toml\").query(sql, epsilon=0.5) gives a DataFrame",
            dir.display()
        );
        println!("after Ctrl-C, each node can be served on its own: fedq-node serve --config {}/<node>/node.toml", dir.display());
        tokio::signal::ctrl_c()
            .await
            .map_err(|e| anyhow!("cannot wait for Ctrl-C: {e}"))?;
    } else if !reused {
        // Show what a researcher sees when a partner is offline.
        let down = nodes.remove(1);
        let name = down.name.clone();
        down.stop().await?;
        println!("\nstopping {name} to show a partial result:");
        let (sql, epsilon) = QUERIES[0];
        let answer = ask_demo(&fed, sql, epsilon, Duration::from_secs(5)).await?;
        print!("{}", render(&answer.combined, Format::Table)?);
    }
    for n in nodes {
        n.stop().await?;
    }
    println!("\nall nodes stopped.");
    Ok(())
}
