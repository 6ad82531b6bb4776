//! Shared set-up for fedq's end-to-end tests: real `fedq-node` servers with
//! real sled stores in temporary directories, certificates from a real
//! (throw-away) CA, and the real coordinator library talking mutual-TLS gRPC
//! over loopback. Nothing of ours is mocked.

pub mod netns;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedq::client::Federation;
use fedq::federation::{ClientTls, Defaults, FederationConfig, NodeEntry};
use fedq_engine::synth::{self, Partner};
use fedq_node::config::{
    BudgetLimits, DatasetConfig, Limits, NodeConfig, NodeSection, SourceConfig, SourceKind,
    TlsSection,
};
use fedq_node::server::RunningNode;
use fedq_pki::{Authority, Role};
use fedq_plan::schema::Schema;
use fedq_proto::v1::node_client::NodeClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// One test node: its directory, config and (when running) server.
pub struct TestNode {
    /// The node's name (also its certificate's DNS name).
    pub name: String,
    /// The node's config (listen address fixed after the first start).
    pub config: NodeConfig,
    /// The synthetic CSV it ingested.
    pub csv: PathBuf,
    /// The running server, if started.
    pub running: Option<RunningNode>,
}

/// A federation of test nodes sharing one CA.
pub struct TestFederation {
    /// Everything lives here and is deleted at the end.
    pub dir: tempfile::TempDir,
    /// The federation CA.
    pub ca: Authority,
    /// The nodes.
    pub nodes: Vec<TestNode>,
}

/// Budget limits generous enough not to interfere.
pub fn roomy_budget() -> BudgetLimits {
    BudgetLimits {
        keys_delta: None,
        keys_delta_per_analyst: None,
        keys_delta_total: None,
        per_analyst: 1000.0,
        total: 10_000.0,
        per_query_max: 10.0,
        measure: Default::default(),
        delta: None,
    }
}

impl TestFederation {
    /// Creates `partners.len()` nodes with synthetic data (kind, rows,
    /// seed), each ingested into its own store, and starts them.
    pub async fn start(partners: &[(Partner, usize, u64)], budget: BudgetLimits) -> TestFederation {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = Authority::generate("test federation CA").expect("CA");
        ca.pem
            .write(&dir.path().join("ca"), "ca")
            .expect("write CA");
        let mut nodes = Vec::new();
        for (i, &(partner, rows, seed)) in partners.iter().enumerate() {
            let name = format!("node-{i}");
            let node_dir = dir.path().join(&name);
            let csv = node_dir.join("cases.csv");
            std::fs::create_dir_all(&node_dir).unwrap();
            synth::write_csv(partner, rows, seed, std::fs::File::create(&csv).unwrap()).unwrap();
            let config = node_config(&ca, &node_dir, &name, budget);
            let schema = Schema::from_specs("cases", &config.datasets[0].columns).unwrap();
            {
                let store =
                    fedq_ledger::store::Store::open(&config.resolve(&config.node.store)).unwrap();
                fedq_node::ingest::ingest_csv(&store, "cases", &schema, &csv, false).unwrap();
            }
            nodes.push(TestNode {
                name,
                config,
                csv,
                running: None,
            });
        }
        let mut fed = TestFederation { dir, ca, nodes };
        for i in 0..fed.nodes.len() {
            fed.start_node(i).await;
        }
        fed
    }

    /// One node whose dataset `cases` is a table of the PostgreSQL test
    /// database ([`test_database_url`]) holding `rows` synthetic rows of
    /// `partner` (also written to the node's CSV, which is not ingested).
    /// "auditor" may export the log. `adjust` may change the config (the
    /// source, say) before the node starts.
    pub async fn start_postgres(
        synth: (Partner, usize, u64),
        budget: BudgetLimits,
        adjust: impl FnOnce(&mut NodeConfig),
    ) -> TestFederation {
        Self::start_postgres_with(synth, false, budget, adjust).await
    }

    /// As [`TestFederation::start_postgres`]; with `partner_coded`, the
    /// table holds the partner's own coding of the same records
    /// ([`load_partner_coded_into_postgres`]) and the dataset reads it
    /// through the shipped mapping (`fedq_engine::partner_coding`). The
    /// node's `csv` stays the standard-coded original, for exact values.
    pub async fn start_postgres_with(
        (partner, rows, seed): (Partner, usize, u64),
        partner_coded: bool,
        budget: BudgetLimits,
        adjust: impl FnOnce(&mut NodeConfig),
    ) -> TestFederation {
        let url = test_database_url();
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = Authority::generate("test federation CA").expect("CA");
        ca.pem
            .write(&dir.path().join("ca"), "ca")
            .expect("write CA");
        let name = "node-0".to_string();
        let node_dir = dir.path().join(&name);
        let csv = node_dir.join("cases.csv");
        std::fs::create_dir_all(&node_dir).unwrap();
        synth::write_csv(partner, rows, seed, std::fs::File::create(&csv).unwrap()).unwrap();
        let table = if partner_coded {
            load_partner_coded_into_postgres(&url, &csv).await
        } else {
            load_csv_into_postgres(&url, &csv).await
        };
        std::fs::write(node_dir.join("db.url"), &url).unwrap();
        let mut config = node_config(&ca, &node_dir, &name, budget);
        config.datasets[0].source = Some(SourceConfig {
            kind: SourceKind::Postgres,
            table,
            url_file: Some("db.url".into()),
            url_env: None,
            ca: None,
            statement_timeout_ms: 10_000,
        });
        config.audit.auditors = vec!["auditor".into()];
        if partner_coded {
            config.datasets[0].mapping = partner_mapping();
        }
        adjust(&mut config);
        let node = TestNode {
            name,
            config,
            csv,
            running: None,
        };
        let mut fed = TestFederation {
            dir,
            ca,
            nodes: vec![node],
        };
        fed.start_node(0).await;
        fed
    }

    /// Starts node `i` (again), on the same address as before if it ran.
    pub async fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.running.is_none(), "node {i} is already running");
        let running = fedq_node::server::start(node.config.clone())
            .await
            .expect("start node");
        node.config.node.listen = running.addr;
        node.running = Some(running);
    }

    /// Stops node `i` gracefully.
    pub async fn stop_node(&mut self, i: usize) {
        if let Some(r) = self.nodes[i].running.take() {
            r.stop().await.expect("stop node");
        }
    }

    /// Writes a certificate for `name` with `role` and returns its paths.
    pub fn client_cert(&self, role: Role, name: &str) -> (PathBuf, PathBuf) {
        let d = self.dir.path().join("clients");
        self.ca.issue(role, name).unwrap().write(&d, name).unwrap();
        (d.join(format!("{name}.pem")), d.join(format!("{name}.key")))
    }

    /// A coordinator federation over the nodes `indices` only, as analyst
    /// `analyst` (two federations over one CA, say).
    pub fn federation_of(&self, analyst: &str, indices: &[usize]) -> Federation {
        let (cert, key) = self.client_cert(Role::Analyst, analyst);
        let config = FederationConfig {
            tls: ClientTls {
                ca: self.dir.path().join("ca/ca.pem"),
                cert,
                key,
                crl: None,
            },
            defaults: Defaults {
                timeout_secs: 30.0,
                ..Defaults::default()
            },
            nodes: indices
                .iter()
                .map(|&i| NodeEntry {
                    name: self.nodes[i].name.clone(),
                    endpoint: format!("https://{}", self.nodes[i].config.node.listen),
                })
                .collect(),
            base_dir: self.dir.path().to_path_buf(),
        };
        Federation::from_config(config).unwrap()
    }

    /// A coordinator federation over all nodes, as analyst `analyst`.
    pub fn federation(&self, analyst: &str) -> Federation {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        self.federation_of(analyst, &all)
    }

    /// Node `i`'s whole audit log, pulled over gRPC as auditor "auditor"
    /// (who must be in the node's `audit.auditors`): the JSON lines as
    /// sent, the entries with their events read, and the node's audit
    /// public key (hex).
    pub async fn pull_audit(&self, i: usize) -> (String, Vec<Logged>, String) {
        let mut c = self.raw_client(i, Role::Auditor, "auditor").await;
        let key = c
            .describe(fedq_proto::v1::DescribeRequest {})
            .await
            .unwrap()
            .into_inner()
            .audit_public_key;
        let mut stream = c
            .export_audit(fedq_proto::v1::ExportAuditRequest { since_seq: 0 })
            .await
            .unwrap()
            .into_inner();
        let mut text = String::new();
        while let Some(line) = stream.message().await.unwrap() {
            text.push_str(&line.json);
            text.push('\n');
        }
        let entries = text.lines().map(Logged::parse).collect();
        (text, entries, key)
    }

    /// A raw gRPC client to node `i` as `name` in `role`, for tests that
    /// need the node's own status codes.
    pub async fn raw_client(&self, i: usize, role: Role, name: &str) -> NodeClient<Channel> {
        let (cert, key) = self.client_cert(role, name);
        connect(
            &self.nodes[i],
            &self.dir.path().join("ca/ca.pem"),
            &cert,
            &key,
        )
        .await
        .expect("connect")
    }
}

/// Connects to a node with the given client certificate files.
pub async fn connect(
    node: &TestNode,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<NodeClient<Channel>, tonic::transport::Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ))
        .domain_name(node.name.clone());
    let ch = Endpoint::from_shared(format!("https://{}", node.config.node.listen))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await?;
    Ok(NodeClient::new(ch))
}

/// A node config under `dir` with a fresh node certificate, the synthetic
/// CTDC schema for dataset `cases`, and a free loopback port.
pub fn node_config(ca: &Authority, dir: &Path, name: &str, budget: BudgetLimits) -> NodeConfig {
    let certs = dir.join("certs");
    ca.issue(Role::Node, name)
        .unwrap()
        .write(&certs, "node")
        .unwrap();
    std::fs::write(certs.join("ca.pem"), &ca.pem.cert).unwrap();
    NodeConfig {
        node: NodeSection {
            name: name.into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            store: "store".into(),
        },
        tls: TlsSection {
            ca: "certs/ca.pem".into(),
            cert: "certs/node.pem".into(),
            key: "certs/node.key".into(),
            crl: None,
        },
        limits: Limits::default(),
        audit: Default::default(),
        source_sha256: String::new(),
        access: Default::default(),
        datasets: vec![DatasetConfig {
            name: "cases".into(),
            description: String::new(),
            budget,
            columns: synth::ctdc_columns(),
            privacy_unit: None,
            source: None,
            secure_aggregation: None,
            standard: None,
            mapping: Default::default(),
            lookups: Vec::new(),
        }],
        base_dir: dir.to_path_buf(),
    }
}

/// The PostgreSQL test server's URL: `FEDQ_TEST_POSTGRES` (`.ci/run` starts
/// a server and sets it), or else a shared server on this machine started
/// (or reused) by `scripts/pg-test-server.sh ensure` from the machine's
/// PostgreSQL packages. Without them this fails, saying how to install
/// them: database tests are never skipped silently.
pub fn test_database_url() -> String {
    if let Ok(url) = std::env::var("FEDQ_TEST_POSTGRES") {
        return url;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg-test-server.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg("ensure")
        .output()
        .expect("cannot run scripts/pg-test-server.sh");
    assert!(
        out.status.success(),
        "no PostgreSQL test server: set FEDQ_TEST_POSTGRES to a server's URL, or install PostgreSQL's server binaries (Debian/Ubuntu: apt-get install postgresql) so that scripts/pg-test-server.sh can start one.\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A client of the test database (the node under test has its own).
pub async fn database_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(conn);
    client
}

/// Loads a synthetic CSV into a new table `cases` in a fresh schema of the
/// test database and returns `schema.cases`. Columns are typed as a partner
/// would: categorical `text`, integer `integer`, boolean `boolean`; values
/// are as the CSV has them (`-99` kept, an empty cell is `NULL`).
pub async fn load_csv_into_postgres(url: &str, csv_path: &Path) -> String {
    use fedq_plan::schema::{parse_bool, Column};
    use tokio_postgres::types::ToSql;
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let client = database_client(url).await;
    let ns = format!(
        "e2e_{}_{}_{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let schema = Schema::from_specs("cases", &synth::ctdc_columns()).unwrap();
    let types: Vec<&str> = schema
        .columns
        .iter()
        .map(|c| match c {
            // A person identifier is loaded as text (database sources
            // refuse person-level units today; kept for completeness).
            Column::Categorical { .. } | Column::PersonId { .. } | Column::Open { .. } => "text",
            Column::Integer { .. } => "integer",
            Column::Boolean { .. } => "boolean",
        })
        .collect();
    let defs: Vec<String> = schema
        .columns
        .iter()
        .zip(&types)
        .map(|(c, t)| format!("\"{}\" {t}", c.name()))
        .collect();
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {ns}; CREATE TABLE {ns}.cases ({})",
            defs.join(", ")
        ))
        .await
        .unwrap();
    let mut reader = csv::Reader::from_path(csv_path).unwrap();
    let headers = reader.headers().unwrap().clone();
    let order: Vec<usize> = schema
        .columns
        .iter()
        .map(|c| headers.iter().position(|h| h == c.name()).unwrap())
        .collect();
    let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    let casts: Vec<String> = types
        .iter()
        .enumerate()
        .map(|(i, t)| format!("${}::{t}[]", i + 1))
        .collect();
    let insert = format!(
        "INSERT INTO {ns}.cases SELECT * FROM unnest({})",
        casts.join(", ")
    );
    for batch in records.chunks(5000) {
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        for (c, &at) in schema.columns.iter().zip(&order) {
            let raw = batch.iter().map(|r| r.get(at).unwrap_or("").trim());
            params.push(match c {
                Column::Categorical { .. } | Column::PersonId { .. } | Column::Open { .. } => {
                    Box::new(
                        raw.map(|v| (!v.is_empty()).then(|| v.to_string()))
                            .collect::<Vec<_>>(),
                    )
                }
                Column::Integer { .. } => {
                    Box::new(raw.map(|v| v.parse::<i32>().ok()).collect::<Vec<_>>())
                }
                Column::Boolean { .. } => Box::new(raw.map(parse_bool).collect::<Vec<_>>()),
            });
        }
        let refs: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect();
        client.execute(&insert, &refs).await.unwrap();
    }
    format!("{ns}.cases")
}

/// The shipped partner mapping (`fedq_engine::partner_coding::MAPPING_TOML`).
pub fn partner_mapping() -> fedq_engine::mapping::Mapping {
    fedq_engine::partner_coding::mapping()
}

/// Loads the partner's own coding of a standard-coded CSV
/// (`fedq_engine::partner_coding::recode`) into a fresh table
/// (`partner_coding::load_into_postgres`). Returns `"schema.table"`.
pub async fn load_partner_coded_into_postgres(url: &str, csv_path: &Path) -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut partner = Vec::new();
    fedq_engine::partner_coding::recode(std::fs::File::open(csv_path).unwrap(), &mut partner)
        .unwrap();
    let client = database_client(url).await;
    let ns = format!(
        "e2e_partner_{}_{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    fedq_engine::partner_coding::load_into_postgres(&client, &ns, &partner)
        .await
        .unwrap()
}

/// Exact counts per GROUP BY key straight from a CSV file, computed here
/// independently of the node's own code: `filter` picks rows (given a
/// header-to-cell lookup), `group` names the grouping columns; a missing
/// cell (`-99` or empty) is the key `(missing)`.
pub fn exact_counts(
    csv_path: &Path,
    group: &[&str],
    filter: impl Fn(&dyn Fn(&str) -> String) -> bool,
) -> HashMap<Vec<String>, i64> {
    let mut r = csv::Reader::from_path(csv_path).unwrap();
    let headers = r.headers().unwrap().clone();
    let idx: HashMap<String, usize> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| (h.to_string(), i))
        .collect();
    let mut out = HashMap::new();
    for rec in r.records() {
        let rec = rec.unwrap();
        let get = |c: &str| rec.get(idx[c]).unwrap_or("").to_string();
        if !filter(&get) {
            continue;
        }
        let key = group
            .iter()
            .map(|g| {
                let v = get(g);
                if v.is_empty() || v == "-99" {
                    "(missing)".to_string()
                } else {
                    v
                }
            })
            .collect();
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

/// OpenDP's bound: `|noise| < a` with probability at least `1 - alpha`.
pub fn opendp_accuracy(scale: f64, alpha: f64) -> f64 {
    opendp::accuracy::discrete_laplacian_scale_to_accuracy(scale, alpha).unwrap()
}

/// The `fedq-node` binary, for tests that need a real node process (to kill
/// it, say). `cargo test --workspace` builds it (the node package has its
/// own integration tests); when it is missing or older than the node's
/// sources, it is built here first.
pub fn node_binary() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        // This test binary lives in <target>/<profile>/deps/.
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target profile dir");
        let path = profile_dir.join(format!("fedq-node{}", std::env::consts::EXE_SUFFIX));
        let built = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        let sources = ["node", "proto", "Cargo.lock"]
            .iter()
            .map(|p| newest(&workspace.join(p)))
            .max()
            .unwrap_or(std::time::UNIX_EPOCH);
        if built.is_none_or(|b| b < sources) {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = std::process::Command::new(cargo)
                .args(["build", "-p", "fedq-node", "--bin", "fedq-node"])
                .current_dir(&workspace)
                .status()
                .expect("run cargo build for fedq-node");
            assert!(status.success(), "building fedq-node failed");
        }
        assert!(path.exists(), "no fedq-node binary at {}", path.display());
        path
    })
    .clone()
}

/// The newest modification time of a file or of anything under a directory.
fn newest(p: &Path) -> std::time::SystemTime {
    let own = std::fs::metadata(p)
        .and_then(|m| m.modified())
        .unwrap_or(std::time::UNIX_EPOCH);
    match std::fs::read_dir(p) {
        Ok(entries) => entries
            .flatten()
            .map(|e| newest(&e.path()))
            .fold(own, std::cmp::max),
        Err(_) => own,
    }
}

/// An integer with thousands separators, as the coordinator's tables show it.
pub fn thousands(v: i64) -> String {
    let digits = v.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// A loopback address with a port that was free a moment ago (for a node
/// process, whose address must be in its config before it starts).
pub fn free_loopback_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// One node served by a real `fedq-node serve` process ([`node_binary`]),
/// for tests that stop it gracefully, SIGKILL it and restart it from its
/// store, as a partner's supervisor would. Its directory (config, store,
/// keys, the CSV it ingested, the client certificates and the process's
/// stderr of each start) lives in [`ProcessNode::dir`]. Dropping it kills
/// the process.
pub struct ProcessNode {
    /// Everything lives here and is deleted at the end.
    pub dir: tempfile::TempDir,
    /// The federation CA.
    pub ca: Authority,
    /// The node: name, config (with its fixed address) and CSV.
    pub node: TestNode,
    /// The node.toml the process reads.
    pub config_path: PathBuf,
    child: Option<std::process::Child>,
    starts: u32,
}

impl ProcessNode {
    /// Writes a CSV of `rows` synthetic rows of `partner` (seed `seed`), a
    /// node.toml declaring `datasets` (each with the CTDC schema and its
    /// budget limits; "auditor" may export the log), lets `adjust` change
    /// the config, and ingests the CSV into every dataset with `fedq-node
    /// ingest`. The node is not started.
    pub fn create(
        (partner, rows, seed): (Partner, usize, u64),
        datasets: &[(&str, BudgetLimits)],
        adjust: impl FnOnce(&mut NodeConfig),
    ) -> ProcessNode {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = Authority::generate("test federation CA").expect("CA");
        ca.pem
            .write(&dir.path().join("ca"), "ca")
            .expect("write CA");
        let name = "node-0".to_string();
        let node_dir = dir.path().join(&name);
        std::fs::create_dir_all(&node_dir).unwrap();
        let csv = node_dir.join("cases.csv");
        synth::write_csv(partner, rows, seed, std::fs::File::create(&csv).unwrap()).unwrap();
        let mut config = node_config(&ca, &node_dir, &name, datasets[0].1);
        let template = config.datasets[0].clone();
        config.datasets = datasets
            .iter()
            .map(|&(n, budget)| DatasetConfig {
                name: n.to_string(),
                budget,
                ..template.clone()
            })
            .collect();
        config.node.listen = free_loopback_addr();
        config.audit.auditors = vec!["auditor".into()];
        adjust(&mut config);
        let config_path = node_dir.join("node.toml");
        std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
        let node = ProcessNode {
            dir,
            ca,
            node: TestNode {
                name,
                config,
                csv: csv.clone(),
                running: None,
            },
            config_path,
            child: None,
            starts: 0,
        };
        for &(n, _) in datasets {
            let (code, out) = node.cli(&[
                "ingest".as_ref(),
                "--config".as_ref(),
                node.config_path.as_os_str(),
                "--dataset".as_ref(),
                n.as_ref(),
                "--csv".as_ref(),
                csv.as_os_str(),
                "--allow-duplicate".as_ref(),
            ]);
            assert_eq!(code, Some(0), "ingest into {n} failed: {out}");
        }
        node
    }

    /// The federation CA certificate (PEM file).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca/ca.pem")
    }

    /// Writes a client certificate for `name` with `role` (any name: the
    /// files are named after a sanitised form) and returns its paths.
    pub fn client_cert(&self, role: Role, name: &str) -> (PathBuf, PathBuf) {
        let d = self.dir.path().join("clients");
        let stem: String = format!("{role:?}-{name}")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        if !d.join(format!("{stem}.pem")).exists() {
            self.ca.issue(role, name).unwrap().write(&d, &stem).unwrap();
        }
        (d.join(format!("{stem}.pem")), d.join(format!("{stem}.key")))
    }

    /// A gRPC client over mutual TLS with the certificate files given.
    pub async fn connect_with(
        &self,
        cert: &Path,
        key: &Path,
    ) -> Result<NodeClient<Channel>, tonic::transport::Error> {
        connect(&self.node, &self.ca_path(), cert, key).await
    }

    /// A gRPC client as `name` in `role`.
    pub async fn client(
        &self,
        role: Role,
        name: &str,
    ) -> Result<NodeClient<Channel>, tonic::transport::Error> {
        let (cert, key) = self.client_cert(role, name);
        self.connect_with(&cert, &key).await
    }

    /// Runs the `fedq-node` binary with `args`; its exit code and output.
    pub fn cli(&self, args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
        let out = std::process::Command::new(node_binary())
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run fedq-node");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// Whether a process was started and not yet stopped or killed.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts `fedq-node serve` and waits (up to `timeout`) until it
    /// answers Describe. An error names why, with the end of the process's
    /// stderr when it exited (a node that cannot read its own store says so
    /// there).
    pub async fn start(&mut self, timeout: Duration) -> Result<(), String> {
        assert!(self.child.is_none(), "the node is already running");
        self.starts += 1;
        let stderr = std::fs::File::create(self.stderr_path()).unwrap();
        let child = std::process::Command::new(node_binary())
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start fedq-node: {e}"))?;
        self.child = Some(child);
        let deadline = std::time::Instant::now() + timeout;
        let (cert, key) = self.client_cert(Role::Analyst, "readiness-probe");
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "fedq-node serve exited ({status}) instead of serving; its stderr ends:\n{}",
                    self.stderr_tail(20)
                ));
            }
            if let Ok(mut c) = self.connect_with(&cert, &key).await {
                let probe = tokio::time::timeout(
                    Duration::from_secs(2),
                    c.describe(fedq_proto::v1::DescribeRequest {}),
                );
                if let Ok(Ok(_)) = probe.await {
                    return Ok(());
                }
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "fedq-node serve did not answer Describe within {timeout:?}; its stderr ends:\n{}",
                    self.stderr_tail(20)
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Stops the node as a supervisor does (SIGTERM) and waits up to
    /// `timeout` for it to exit; a node that does not exit, or exits with a
    /// failure, is an error (and is then killed).
    pub async fn stop(&mut self, timeout: Duration) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        if !sent.is_ok_and(|s| s.success()) {
            let _ = child.kill();
            let _ = child.wait();
            return Err("cannot send SIGTERM to the node".into());
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(format!(
                        "fedq-node serve exited with {status} on SIGTERM; its stderr ends:\n{}",
                        self.stderr_tail(20)
                    ))
                }
                Ok(None) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "fedq-node serve did not exit within {timeout:?} of SIGTERM (killed); its stderr ends:\n{}",
                        self.stderr_tail(20)
                    ));
                }
            }
        }
    }

    /// SIGKILLs the node (nothing of it runs afterwards) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn stderr_path(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("node-stderr-{}.log", self.starts))
    }

    /// The last `n` lines the current (or last) process wrote to stderr.
    pub fn stderr_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.stderr_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for ProcessNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The node's audit log from `since_seq` on, as JSON lines exactly as
/// ExportAudit streamed them (one per line), or the status that ended
/// the call or the stream.
pub async fn export_audit_text(
    client: &mut NodeClient<Channel>,
    since_seq: u64,
) -> Result<String, tonic::Status> {
    let mut stream = client
        .export_audit(fedq_proto::v1::ExportAuditRequest { since_seq })
        .await?
        .into_inner();
    let mut text = String::new();
    while let Some(line) = stream.message().await? {
        text.push_str(&line.json);
        text.push('\n');
    }
    Ok(text)
}

/// Runs the auditors' verifier, the separate `fedq-node audit verify`
/// binary, on an export file with a public key file: `Ok(its report)` when
/// it exits 0, else `Err(exit code and output)`. `heads` are `SEQ:HASH`
/// heads seen earlier, which the log must still contain.
pub fn audit_verify(
    log: &Path,
    pubkey: &Path,
    since: u64,
    heads: &[String],
) -> Result<String, String> {
    let mut cmd = std::process::Command::new(node_binary());
    cmd.args(["audit", "verify", "--log"])
        .arg(log)
        .arg("--pubkey")
        .arg(pubkey)
        .args(["--since", &since.to_string()]);
    for h in heads {
        cmd.args(["--head", h]);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run the verifier: {e}"))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("exit {:?}: {}", out.status.code(), text.trim()))
    }
}

/// An exported audit entry with its event read (tests match on events).
#[derive(Debug, Clone)]
pub struct Logged {
    /// Position in the log.
    pub seq: u64,
    /// When it was written (ms since the epoch).
    pub time_ms: u64,
    /// Its hash (hex).
    pub hash: String,
    /// The event.
    pub event: fedq_ledger::audit::Event,
}

impl Logged {
    /// Reads one exported line (panics on a line that is not an entry).
    pub fn parse(line: &str) -> Logged {
        let e: fedq_ledger::audit::Entry = serde_json::from_str(line).unwrap();
        Logged {
            seq: e.seq,
            time_ms: e.time_ms,
            event: e.event().unwrap(),
            hash: e.hash,
        }
    }
}
