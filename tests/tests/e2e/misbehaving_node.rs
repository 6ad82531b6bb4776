//! A partner node that lies (DESIGN invariant 9): the coordinator checks
//! every answer against its own plan, leaves out and names a node whose
//! answer disagrees, and the honest nodes' combined result is unchanged.
//!
//! The liar is a test double: a real fedq.v1 server over real mutual TLS,
//! with a node certificate from the federation's CA (as a partner holding
//! a valid certificate would have), that forwards every call to a real
//! node and tampers with the answer on the way back. Without the checks,
//! each tamper below was accepted and changed everyone's result (issue 16,
//! item 8).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use fedq::client::{new_query_id, Calls, Failure, Federation};
use fedq::combine::{combine, Combined};
use fedq::federation::NodeEntry;
use fedq::output::{render, Format};
use fedq::run::{run_query, QueryOptions};
use fedq_engine::synth::Partner;
use fedq_pki::Role;
use fedq_proto::v1::node_client::NodeClient;
use fedq_proto::v1::node_server::{Node, NodeServer};
use fedq_proto::v1::{
    AuditLine, BudgetRequest, BudgetResponse, CancelRequest, CancelResponse, CellKey,
    CommitRequest, DescribeRequest, DescribeResponse, ExportAuditRequest, PrepareRequest,
    PrepareResponse, QueryRequest, QueryResponse,
};
use fedq_tests::{roomy_budget, TestFederation};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Channel, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

/// The double's name: its certificate's, and its federation entry's.
const LIAR: &str = "partner-x";

const GROUPED: &str = "SELECT gender, COUNT(*), AVG(traffickMonths), VARIANCE(traffickMonths) FROM cases GROUP BY gender";
const MEDIAN: &str = "SELECT MEDIAN(traffickMonths) FROM cases";

/// How the double falsifies the real node's answer.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Tamper {
    /// Forwards faithfully (only its own name in place of the real node's).
    Nothing,
    /// Half the stated scale of measurement 0 (narrower intervals for all).
    HalveScale,
    /// Moves bin edge 1 of measurement 0 by one.
    MoveBinEdge,
    /// One more cell, with values.
    AddCell,
    /// Says it was a dry run (this used to blank the whole result).
    DryRun,
    /// Another query id on the answer.
    OtherQueryId,
    /// Forwards another request (twice the epsilon) under the same id and
    /// relabels its answer as this one's.
    OtherRequest,
    /// A request digest that is not the request's.
    OtherDigest,
    /// A NaN scale.
    NanScale,
    /// Answers under the real node's name, not its own.
    OtherName,
}

/// A fedq.v1 node that forwards to a real one and tampers with answers.
#[derive(Clone)]
struct Liar {
    backend: NodeClient<Channel>,
    tamper: Arc<Mutex<Tamper>>,
}

impl Liar {
    fn tamper(&self) -> Tamper {
        *self.tamper.lock().unwrap()
    }

    fn falsify(&self, mut a: QueryResponse) -> QueryResponse {
        a.node_name = LIAR.into();
        match self.tamper() {
            Tamper::Nothing | Tamper::OtherRequest => {}
            Tamper::HalveScale => a.measurements[0].scale /= 2.0,
            Tamper::MoveBinEdge => a.measurements[0].bin_edges[1] += 1,
            Tamper::AddCell => {
                a.cells.push(CellKey {
                    values: vec!["Other".into()],
                });
                for m in &mut a.measurements {
                    let extra = m.bins.max(1) as usize;
                    m.values.extend(std::iter::repeat_n(1000, extra));
                }
            }
            Tamper::DryRun => {
                a.dry_run = true;
                for m in &mut a.measurements {
                    m.values.clear();
                }
            }
            Tamper::OtherQueryId => a.query_id = format!("{}-other", a.query_id),
            Tamper::OtherDigest => a.request_sha256 = "00".repeat(32),
            Tamper::NanScale => a.measurements[0].scale = f64::NAN,
            Tamper::OtherName => a.node_name = "node-2".into(),
        }
        a
    }
}

#[tonic::async_trait]
impl Node for Liar {
    async fn describe(
        &self,
        r: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        let mut d = self.backend.clone().describe(r.into_inner()).await?;
        d.get_mut().node_name = LIAR.into();
        Ok(d)
    }

    async fn query(&self, r: Request<QueryRequest>) -> Result<Response<QueryResponse>, Status> {
        let mut q = r.into_inner();
        if self.tamper() == Tamper::OtherRequest {
            q.epsilon *= 2.0;
        }
        let a = self.backend.clone().query(q).await?.into_inner();
        Ok(Response::new(self.falsify(a)))
    }

    async fn budget(&self, r: Request<BudgetRequest>) -> Result<Response<BudgetResponse>, Status> {
        self.backend.clone().budget(r.into_inner()).await
    }

    async fn prepare(
        &self,
        r: Request<PrepareRequest>,
    ) -> Result<Response<PrepareResponse>, Status> {
        self.backend.clone().prepare(r.into_inner()).await
    }

    async fn commit(&self, r: Request<CommitRequest>) -> Result<Response<QueryResponse>, Status> {
        let a = self
            .backend
            .clone()
            .commit(r.into_inner())
            .await?
            .into_inner();
        Ok(Response::new(self.falsify(a)))
    }

    async fn cancel(&self, r: Request<CancelRequest>) -> Result<Response<CancelResponse>, Status> {
        self.backend.clone().cancel(r.into_inner()).await
    }

    type ExportAuditStream = std::pin::Pin<
        Box<dyn tonic::codegen::tokio_stream::Stream<Item = Result<AuditLine, Status>> + Send>,
    >;

    async fn export_audit(
        &self,
        _r: Request<ExportAuditRequest>,
    ) -> Result<Response<Self::ExportAuditStream>, Status> {
        Err(Status::unimplemented("not in this double"))
    }
}

/// Starts the double in front of `fed`'s node `backend`, serving mutual TLS
/// with a node certificate for [`LIAR`] from the federation's CA.
async fn start_liar(
    fed: &TestFederation,
    backend: usize,
) -> (SocketAddr, Arc<Mutex<Tamper>>, tokio::task::JoinHandle<()>) {
    let client = fed.raw_client(backend, Role::Analyst, "alice").await;
    let tamper = Arc::new(Mutex::new(Tamper::Nothing));
    let liar = Liar {
        backend: client,
        tamper: Arc::clone(&tamper),
    };
    let cert = fed.ca.issue(Role::Node, LIAR).unwrap();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&cert.cert, &cert.key))
        .client_ca_root(Certificate::from_pem(&fed.ca.pem.cert))
        .client_auth_optional(false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(NodeServer::new(liar))
        .serve_with_incoming(TcpIncoming::from(listener));
    let task = tokio::spawn(async move {
        server.await.unwrap();
    });
    (addr, tamper, task)
}

fn opts(query_id: &str, epsilon: f64) -> QueryOptions {
    QueryOptions {
        secure: false,
        epsilon,
        rho: 0.0,
        dry_run: false,
        calls: Calls {
            timeout: std::time::Duration::from_secs(20),
            retries: 1,
        },
        min_nodes: None,
        query_id: query_id.into(),
    }
}

/// The rows as JSON (NaN, from a variance over too few records, compares
/// equal to itself there).
fn rows(c: &Combined) -> String {
    serde_json::to_string(&c.rows).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_node_is_left_out_and_named_and_the_honest_result_is_unchanged() {
    let fed = TestFederation::start(
        &[
            (Partner::Ngo, 300, 11),
            (Partner::Hotline, 300, 12),
            (Partner::Ngo, 300, 13),
        ],
        roomy_budget(),
    )
    .await;
    let (addr, tamper, task) = start_liar(&fed, 2).await;
    // The researcher's federation: two honest nodes and the liar (which
    // fronts node-2); and the same two honest nodes alone.
    let mut with_liar: Federation = fed.federation("alice");
    with_liar.config.nodes.truncate(2);
    let mut honest_only = with_liar.clone();
    with_liar.config.nodes.push(NodeEntry {
        name: LIAR.into(),
        endpoint: format!("https://{addr}"),
    });
    honest_only.config.nodes.truncate(2);

    // Forwarding faithfully, the double is an honest node: all three are
    // combined (so the checks below do not reject just anything).
    for sql in [GROUPED, MEDIAN] {
        let id = new_query_id();
        let outcomes = run_query(&with_liar, sql, &opts(&id, 1.0)).await.unwrap();
        let c = combine(sql, &id, 1.0, &outcomes);
        assert!(!c.partial, "{sql}: {:?}", c.nodes);
        assert_eq!(c.rows[0].nodes.len(), 3, "{sql}");
    }

    let cases: [(Tamper, &str, &[&str]); 9] = [
        (
            Tamper::HalveScale,
            GROUPED,
            &[
                "measurement 0 scale",
                "where the plan gives",
                "(epsilon 1 over 4 measurements, sensitivity 1)",
            ],
        ),
        (
            Tamper::MoveBinEdge,
            MEDIAN,
            &["measurement 0 bin edge 1 is"],
        ),
        (Tamper::AddCell, GROUPED, &["cells where the plan gives"]),
        (
            Tamper::DryRun,
            GROUPED,
            &["dry_run true where false was asked"],
        ),
        (Tamper::OtherQueryId, GROUPED, &["query id", "-other"]),
        (
            Tamper::OtherRequest,
            GROUPED,
            &["request_sha256", "another SQL text, cost"],
        ),
        (Tamper::OtherDigest, MEDIAN, &["request_sha256 \"0000"]),
        (
            Tamper::NanScale,
            GROUPED,
            &["measurement 0 scale is NaN, not a finite number"],
        ),
        (
            Tamper::OtherName,
            MEDIAN,
            &["node_name \"node-2\" where this endpoint is \"partner-x\""],
        ),
    ];
    for (how, sql, says) in cases {
        *tamper.lock().unwrap() = how;
        let id = new_query_id();
        let outcomes = run_query(&with_liar, sql, &opts(&id, 1.0)).await.unwrap();
        let c = combine(sql, &id, 1.0, &outcomes);

        // The liar is left out, named, with what disagreed.
        let liar = &c.nodes[2];
        assert_eq!(liar.node, LIAR);
        let Some(Failure::LeftOut(why)) = &liar.failure else {
            panic!("{how:?}: the liar was not left out: {liar:?}");
        };
        assert!(
            why.starts_with("node \"partner-x\": answer left out: "),
            "{how:?}: {why}"
        );
        for s in says {
            assert!(why.contains(s), "{how:?}: {why:?} does not say {s:?}");
        }
        assert_eq!(liar.status, "left out");
        assert!(c.partial, "{how:?}");
        let table = render(&c, Format::Table).unwrap();
        assert!(table.contains(why.as_str()), "{how:?}: {table}");
        assert!(table.contains("PARTIAL RESULT"), "{table}");

        // The honest nodes' result: as combined from their answers alone,
        // and as a run without the liar gets it (the nodes replay their
        // stored releases of this id, the same noisy values).
        assert!(!c.rows.is_empty(), "{how:?}");
        for r in &c.rows {
            assert_eq!(r.nodes, vec!["node-0", "node-1"], "{how:?}");
        }
        let alone = combine(sql, &id, 1.0, &outcomes[..2]);
        assert_eq!(rows(&c), rows(&alone), "{how:?}");
        let again = run_query(&honest_only, sql, &opts(&id, 1.0)).await.unwrap();
        assert!(
            again
                .iter()
                .all(|o| o.result.as_ref().is_ok_and(|r| r.replayed)),
            "{how:?}: {again:?}"
        );
        let without = combine(sql, &id, 1.0, &again);
        assert!(!without.partial);
        assert_eq!(rows(&c), rows(&without), "{how:?}");
        assert_eq!(
            (&c.group_by, &c.outputs, &c.dataset),
            (&without.group_by, &without.outputs, &without.dataset)
        );
    }

    // Two phases (a quorum): the committed answers are checked the same way.
    *tamper.lock().unwrap() = Tamper::HalveScale;
    let id = new_query_id();
    let mut quorum = opts(&id, 1.0);
    quorum.min_nodes = Some(2);
    let outcomes = run_query(&with_liar, GROUPED, &quorum).await.unwrap();
    let c = combine(GROUPED, &id, 1.0, &outcomes);
    assert!(
        matches!(&c.nodes[2].failure, Some(Failure::LeftOut(why)) if why.contains("measurement 0 scale")),
        "{:?}",
        c.nodes[2]
    );
    assert_eq!(rows(&c), rows(&combine(GROUPED, &id, 1.0, &outcomes[..2])));
    assert!(c.rows.iter().all(|r| r.nodes == ["node-0", "node-1"]));

    // The liar alone: no node answered. That is not a "partial result".
    *tamper.lock().unwrap() = Tamper::HalveScale;
    let mut liar_only = with_liar.clone();
    liar_only.config.nodes.drain(..2);
    let id = new_query_id();
    let outcomes = run_query(&liar_only, GROUPED, &opts(&id, 1.0))
        .await
        .unwrap();
    let c = combine(GROUPED, &id, 1.0, &outcomes);
    assert!(!c.partial && c.rows.is_empty(), "{c:?}");
    let table = render(&c, Format::Table).unwrap();
    assert!(!table.contains("PARTIAL"), "{table}");
    assert!(table.contains("NO NODE ANSWERED"), "{table}");
    assert!(table.contains("answer left out"), "{table}");
    task.abort();
}
