//! Simulated nodes for scale tests (issue 21): many fedq.v1 endpoints in
//! one process, each on its own loopback port with its own node
//! certificate from a test CA, over real mutual TLS, answering Describe,
//! Query, Prepare, Commit, Cancel and Budget with answers of the right
//! shape, after a configurable delay, jitter and failure rate. The real
//! coordinator code talks to them unchanged.
//!
//! The answers are real: one real `fedq-node` runs in this process over a
//! small synthetic dataset, and the first request for a query (its SQL and
//! cost) is asked of it under a fresh id; the answer is kept and served by
//! every simulated endpoint under the request's own id and the endpoint's
//! name. Each distinct query is released once, by the real node; the
//! simulated ones repeat that release. A test-support binary, not a
//! product feature: nothing here debits a budget per endpoint.
//!
//! ```sh
//! target/release/fedq-simnode --nodes 1000 --dir /tmp/sim &
//! target/release/fedq-loadgen fanout --federation /tmp/sim/federation.toml
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use fedq::federation::{ClientTls, Defaults, FederationConfig, NodeEntry};
use fedq_engine::synth::Partner;
use fedq_pki::Role;
use fedq_proto::v1::node_client::NodeClient;
use fedq_proto::v1::node_server::{Node, NodeServer};
use fedq_proto::v1::{
    AuditLine, BudgetRequest, BudgetResponse, CancelRequest, CancelResponse, CommitRequest,
    DescribeRequest, DescribeResponse, ExportAuditRequest, PrepareRequest, PrepareResponse,
    QueryRequest, QueryResponse,
};
use fedq_tests::{roomy_budget, TestFederation};
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex as AsyncMutex;
use tonic::transport::{Certificate, Channel, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

#[derive(Parser)]
#[command(about = "Many simulated fedq.v1 nodes in one process, over real mutual TLS")]
struct Cli {
    /// Number of simulated endpoints.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Where to write federation.toml, the CA and the analyst's certificate.
    #[arg(long)]
    dir: PathBuf,
    /// Rows of the real node's synthetic dataset.
    #[arg(long, default_value_t = 2000)]
    rows: usize,
    /// Delay before each answer, in milliseconds.
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Uniform jitter added to the delay, 0 to this many milliseconds.
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
    /// Fraction of Query/Prepare/Commit calls that fail with UNAVAILABLE.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Seed of the delays and failures.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// What every endpoint shares: the real node it asks once per query, and
/// the answers kept by query.
struct Shared {
    real: AsyncMutex<NodeClient<Channel>>,
    describe: DescribeResponse,
    /// Answers by (SQL, epsilon bits, rho bits, dry run).
    answers: AsyncMutex<HashMap<(String, u64, u64, bool), QueryResponse>>,
    /// Prepared requests by (endpoint, query id), for Commit.
    prepared: Mutex<HashMap<(String, String), QueryRequest>>,
    delay: Duration,
    jitter: Duration,
    fail_rate: f64,
    rng: Mutex<rand_chacha::ChaCha8Rng>,
}

struct SimNode {
    name: String,
    shared: Arc<Shared>,
}

impl SimNode {
    /// Waits the configured delay; fails at the configured rate.
    async fn pace(&self, may_fail: bool) -> Result<(), Status> {
        let s = &self.shared;
        let (extra, fail) = {
            let mut rng = s.rng.lock().unwrap();
            let extra = s.jitter.mul_f64(rng.random::<f64>());
            (extra, may_fail && rng.random::<f64>() < s.fail_rate)
        };
        let wait = s.delay + extra;
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        if fail {
            return Err(Status::unavailable(format!(
                "{}: simulated failure (--fail-rate)",
                self.name
            )));
        }
        Ok(())
    }

    /// The real node's answer to `q` (asked once per query), as this
    /// endpoint's, under `q`'s id.
    async fn answer(&self, q: &QueryRequest) -> Result<QueryResponse, Status> {
        let key = (
            q.sql.clone(),
            q.epsilon.to_bits(),
            q.rho.to_bits(),
            q.dry_run,
        );
        let s = &self.shared;
        let mut answers = s.answers.lock().await;
        let template = match answers.get(&key) {
            Some(a) => a.clone(),
            None => {
                let mut asked = q.clone();
                asked.query_id = fedq::client::new_query_id();
                let a = s.real.lock().await.query(asked).await?.into_inner();
                answers.insert(key, a.clone());
                a
            }
        };
        drop(answers);
        Ok(QueryResponse {
            query_id: q.query_id.clone(),
            node_name: self.name.clone(),
            ..template
        })
    }
}

#[tonic::async_trait]
impl Node for SimNode {
    async fn describe(
        &self,
        _: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        self.pace(false).await?;
        Ok(Response::new(DescribeResponse {
            node_name: self.name.clone(),
            ..self.shared.describe.clone()
        }))
    }

    async fn query(&self, req: Request<QueryRequest>) -> Result<Response<QueryResponse>, Status> {
        self.pace(true).await?;
        Ok(Response::new(self.answer(req.get_ref()).await?))
    }

    async fn budget(&self, _: Request<BudgetRequest>) -> Result<Response<BudgetResponse>, Status> {
        self.pace(false).await?;
        let b = self
            .shared
            .real
            .lock()
            .await
            .budget(BudgetRequest {})
            .await?;
        Ok(b)
    }

    async fn prepare(
        &self,
        req: Request<PrepareRequest>,
    ) -> Result<Response<PrepareResponse>, Status> {
        self.pace(true).await?;
        let p = req.into_inner();
        let q = p
            .query
            .ok_or_else(|| Status::invalid_argument("prepare without a query"))?;
        // Planned (and so checked) by the real node, as a dry run.
        let planned = self
            .answer(&QueryRequest {
                dry_run: true,
                ..q.clone()
            })
            .await?;
        self.shared
            .prepared
            .lock()
            .unwrap()
            .insert((self.name.clone(), q.query_id.clone()), q.clone());
        Ok(Response::new(PrepareResponse {
            round_key: Default::default(),
            query_id: q.query_id.clone(),
            epsilon_reserved: q.epsilon,
            rho_reserved: q.rho,
            expires_at_ms: 0,
            budget: planned.budget,
        }))
    }

    async fn commit(&self, req: Request<CommitRequest>) -> Result<Response<QueryResponse>, Status> {
        self.pace(true).await?;
        let id = req.into_inner().query_id;
        let q = self
            .shared
            .prepared
            .lock()
            .unwrap()
            .remove(&(self.name.clone(), id.clone()))
            .ok_or_else(|| Status::failed_precondition(format!("{id}: nothing prepared")))?;
        Ok(Response::new(self.answer(&q).await?))
    }

    async fn cancel(
        &self,
        req: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let id = req.into_inner().query_id;
        let had = self
            .shared
            .prepared
            .lock()
            .unwrap()
            .remove(&(self.name.clone(), id.clone()));
        Ok(Response::new(CancelResponse {
            query_id: id,
            epsilon_returned: had.map_or(0.0, |q| q.epsilon),
        }))
    }

    type ExportAuditStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<AuditLine, Status>> + Send>>;

    async fn export_audit(
        &self,
        _: Request<ExportAuditRequest>,
    ) -> Result<Response<Self::ExportAuditStream>, Status> {
        Err(Status::unimplemented(
            "a simulated node keeps no audit log of its own",
        ))
    }
}

fn copy_into(from: &Path, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let to = dir.join(name);
    std::fs::copy(from, &to)?;
    Ok(to)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cli.dir)?;
    let fed = TestFederation::start(&[(Partner::Ngo, cli.rows, cli.seed)], roomy_budget()).await;
    let mut real = fed.raw_client(0, Role::Analyst, "simulator").await;
    let describe = real.describe(DescribeRequest {}).await?.into_inner();
    let ca_pem = std::fs::read_to_string(fed.dir.path().join("ca/ca.pem"))?;
    let shared = Arc::new(Shared {
        real: AsyncMutex::new(real),
        describe,
        answers: Default::default(),
        prepared: Default::default(),
        delay: Duration::from_secs_f64(cli.delay_ms / 1000.0),
        jitter: Duration::from_secs_f64(cli.jitter_ms / 1000.0),
        fail_rate: cli.fail_rate,
        rng: Mutex::new(rand_chacha::ChaCha8Rng::seed_from_u64(cli.seed)),
    });
    let started = std::time::Instant::now();
    let mut nodes = Vec::with_capacity(cli.nodes);
    for i in 0..cli.nodes {
        let name = format!("sim-{i}");
        let pair = fed.ca.issue(Role::Node, &name)?;
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(&pair.cert, &pair.key))
            .client_ca_root(Certificate::from_pem(&ca_pem));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let service = NodeServer::new(SimNode {
            name: name.clone(),
            shared: Arc::clone(&shared),
        })
        .max_decoding_message_size(4 << 20);
        let server = Server::builder().tls_config(tls)?.add_service(service);
        tokio::spawn(async move {
            // As a real node does: no Nagle delay on answers.
            let incoming = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                |s| {
                    s.inspect(|t| {
                        let _ = t.set_nodelay(true);
                    })
                },
            );
            if let Err(e) = server.serve_with_incoming(incoming).await {
                eprintln!("{name}: {e}");
            }
        });
        nodes.push(NodeEntry {
            name: format!("sim-{i}"),
            endpoint: format!("https://{addr}"),
        });
    }
    let (cert, key) = fed.client_cert(Role::Analyst, "alice");
    let config = FederationConfig {
        tls: ClientTls {
            ca: copy_into(&fed.dir.path().join("ca/ca.pem"), &cli.dir, "ca.pem")?,
            cert: copy_into(&cert, &cli.dir, "alice.pem")?,
            key: copy_into(&key, &cli.dir, "alice.key")?,
            crl: None,
        },
        defaults: Defaults {
            timeout_secs: 60.0,
            heads_file: cli.dir.join("fedq-heads.json"),
            secure: false,
        },
        nodes,
        base_dir: cli.dir.clone(),
    };
    let path = cli.dir.join("federation.toml");
    std::fs::write(&path, toml::to_string(&config)?)?;
    println!(
        "{} simulated nodes serving (set up in {:.1} s); federation file: {}",
        cli.nodes,
        started.elapsed().as_secs_f64(),
        path.display()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
