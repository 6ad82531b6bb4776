//! Starting and stopping a node's gRPC server over mutual TLS.
//!
//! [`start`] binds first (so a port of 0 picks a free one, as tests do),
//! then serves until [`RunningNode::stop`] or the future passed to
//! [`serve_until`] completes. Shutdown is graceful: in-flight requests
//! finish, and the store is released when the last request drops its state.
//!
//! Before serving, [`crate::preflight::preflight`] checks everything the
//! node needs (the same function `fedq-node check` runs). While serving,
//! a failed store write or flush ([`fedq_ledger::fault`]) turns the health
//! service NOT_SERVING and stops the node with [`StoreFailed`](fedq_ledger::fault::StoreFailed)
//! (`fedq-node serve` then exits with [`fedq_ledger::fault::EXIT_STORE_FAILED`]
//! for its supervisor to restart it).

use std::net::SocketAddr;
use std::sync::Arc;

use fedq_proto::v1::node_server::NodeServer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Server;

use crate::config::NodeConfig;
use crate::service::{NodeService, NodeState};

crate::error::stage_error! {
    /// Why a node could not start, or stopped: the message says what and what to do.
    ServeError {
        /// The store failed while serving: the node stopped so that a restart
        /// completes the interrupted write (exit code 75, [`exit_code`]).
        #[error(
            "node {node} stopped: restart it (the supervisor does) to complete the interrupted write"
        )]
        Stopped {
            /// The node.
            node: String,
            /// The store's fault.
            #[source]
            fault: fedq_ledger::fault::StoreFailed,
        },
    }
}

impl From<std::io::Error> for ServeError {
    fn from(e: std::io::Error) -> Self {
        ServeError::io("I/O", e)
    }
}

impl From<crate::preflight::PreflightError> for ServeError {
    fn from(e: crate::preflight::PreflightError) -> Self {
        ServeError::Refused(e.to_string())
    }
}

impl From<crate::service::StartError> for ServeError {
    fn from(e: crate::service::StartError) -> Self {
        ServeError::Refused(e.to_string())
    }
}

impl From<crate::backup::BackupError> for ServeError {
    fn from(e: crate::backup::BackupError) -> Self {
        ServeError::Refused(e.to_string())
    }
}

impl From<fedq_audit::AuditError> for ServeError {
    fn from(e: fedq_audit::AuditError) -> Self {
        ServeError::Refused(e.to_string())
    }
}

impl From<tonic::transport::Error> for ServeError {
    fn from(e: tonic::transport::Error) -> Self {
        ServeError::io("the gRPC server", e)
    }
}

impl From<tokio::task::JoinError> for ServeError {
    fn from(e: tokio::task::JoinError) -> Self {
        ServeError::io("the node's task", e)
    }
}

/// How long a node whose store failed keeps answering NOT_SERVING before
/// it stops: long enough for a health check or load balancer to see it,
/// short enough that the supervisor restarts it promptly. Every write is
/// refused meanwhile.
const FAILED_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// A node serving in the background of this process.
pub struct RunningNode {
    /// The address actually bound.
    pub addr: SocketAddr,
    /// The node's name.
    pub name: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl RunningNode {
    /// Stops accepting, lets in-flight requests finish and waits.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.task)
            .await
            .map_err(|e| ServeError::io("node task panicked", e))?
    }

    /// Waits until the node stops by itself (its store failed, say) and
    /// returns why, without asking it to stop.
    pub async fn wait(mut self) -> Result<(), ServeError> {
        (&mut self.task)
            .await
            .map_err(|e| ServeError::io("node task panicked", e))?
    }
}

/// The exit code of `fedq-node serve` for the error it stopped with:
/// [`fedq_ledger::fault::EXIT_STORE_FAILED`] after a failed store write or
/// flush, 1 for anything else.
pub fn exit_code(e: &(dyn std::error::Error + 'static)) -> u8 {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if fedq_ledger::fault::is_store_failure(c) {
            return fedq_ledger::fault::EXIT_STORE_FAILED;
        }
        cause = c.source();
    }
    1
}

/// Opens the store, loads the datasets, binds and serves in the background.
pub async fn start(config: NodeConfig) -> Result<RunningNode, ServeError> {
    let (tx, rx) = oneshot::channel();
    let listener = tokio::net::TcpListener::bind(config.node.listen)
        .await
        .map_err(|e| ServeError::io(format!("cannot listen on {}", config.node.listen), e))?;
    let addr = listener.local_addr()?;
    let name = config.node.name.clone();
    let task = tokio::spawn(serve_on(config, listener, async {
        let _ = rx.await;
    }));
    Ok(RunningNode {
        addr,
        name,
        shutdown: Some(tx),
        task,
    })
}

/// Serves on `config.node.listen` until `shutdown` completes.
pub async fn serve_until(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(config.node.listen)
        .await
        .map_err(|e| ServeError::io(format!("cannot listen on {}", config.node.listen), e))?;
    serve_on(config, listener, shutdown).await
}

async fn serve_on(
    config: NodeConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let max_request = config.limits.max_request_bytes;
    let name = config.node.name.clone();
    let addr = listener.local_addr()?;
    // The checks `fedq-node check` runs, and the TLS configuration.
    let (mut state, tls) = tokio::task::spawn_blocking(move || {
        let pre = crate::preflight::preflight(&config, crate::preflight::Rows::SchemaOnly)?;
        Ok::<_, ServeError>((NodeState::open(config)?, pre.tls))
    })
    .await
    .map_err(|e| ServeError::io("loading the store panicked", e))??;
    state.secagg = tls.secagg();
    // Refuse a store rolled back below the ledger's high-water mark (that
    // would hand back spent budget), then log the start and raise the mark.
    crate::backup::raise_high_water(&state.config, state.audit())?;
    state.check_sources().await?;
    state.log_start()?;
    crate::backup::raise_high_water(&state.config, state.audit())?;
    let datasets = state.datasets.len();
    let state = Arc::new(state);
    // Certificates refused at the handshake (revoked, a node's used as a
    // client...) are counted in the refusal summaries; the hook runs inside
    // the handshake, so it only counts (the sweeper writes).
    let counting = Arc::downgrade(&state);
    tls.on_refusal(Arc::new(move |r: &crate::tls::HandshakeRefusal| {
        if let Some(s) = counting.upgrade() {
            s.count_handshake_refusal(r);
        }
    }));
    let sweeper = tokio::spawn(sweep_reservations(Arc::clone(&state)));
    let final_state = Arc::clone(&state);
    let service = NodeServer::new(NodeService::new(state))
        .max_decoding_message_size(max_request)
        .max_encoding_message_size(64 * 1024 * 1024);
    tracing::info!(node = %name, %addr, datasets, "serving fedq.v1 over mutual TLS");
    // The standard gRPC health service, for orchestrators and load
    // balancers (over the same mutual TLS as everything else).
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<NodeServer<NodeService>>().await;
    // A failed store write or flush: NOT_SERVING, nothing more written in
    // the background, then stop (the restart replays the journal).
    let fault = final_state.ledger.fault().clone();
    let sweeper_abort = sweeper.abort_handle();
    let shutdown = async move {
        tokio::select! {
            () = shutdown => {}
            failed = fault.failed() => {
                sweeper_abort.abort();
                health.set_not_serving::<NodeServer<NodeService>>().await;
                tracing::error!(error = %failed, linger_ms = FAILED_LINGER.as_millis() as u64, "the store failed: health is NOT_SERVING; stopping so that the supervisor restarts the node");
                tokio::time::sleep(FAILED_LINGER).await;
            }
        }
    };
    // TLS is accepted by crate::tls (its client verifier honours the
    // revocation list and reloads it); tonic serves the established streams.
    let (incoming, acceptor) = crate::tls::incoming(listener, &tls);
    let served = Server::builder()
        .add_service(health_service)
        .add_service(DecodeStatus(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    // Closes the listening socket before `serve` returns.
    acceptor.abort();
    let _ = acceptor.await;
    // The sweeper holds the store open: stop it before reporting "stopped".
    sweeper.abort();
    let _ = sweeper.await;
    // After a store failure nothing more is written: the trees may hold
    // part of a write that only the restart completes, and the head in
    // memory may be ahead of what reached the disk (a mark raised to it
    // would make the restart refuse the store as rolled back).
    if let Err(failed) = final_state.ledger.fault().check() {
        drop(final_state);
        served.map_err(|e| ServeError::io("the gRPC server failed", e))?;
        return Err(ServeError::Stopped {
            node: name,
            fault: failed,
        });
    }
    // Refusals still being counted are logged before the store closes.
    final_state.flush_refusals(true);
    if let Err(e) = crate::backup::raise_high_water(&final_state.config, final_state.audit()) {
        tracing::error!(error = %e, "cannot raise the ledger's high-water mark at shutdown");
    }
    drop(final_state);
    served.map_err(|e| ServeError::io("the gRPC server failed", e))?;
    tracing::info!(node = %name, "stopped");
    Ok(())
}

/// Returns the budget of two-phase reservations that were never committed,
/// once a second (and right away, for those that expired while the node was
/// down). Each is logged as `reservation_returned`. Also logs the refusal
/// summaries whose window ended.
async fn sweep_reservations(state: Arc<NodeState>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let s = Arc::clone(&state);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        match tokio::task::spawn_blocking(move || {
            // Refusal summaries whose minute ended are logged here too.
            s.flush_refusals(false);
            let window = s.config.limits.replay_window_ms;
            match s.ledger.expire_releases(now.saturating_sub(window)) {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    removed = n,
                    window_ms = window,
                    "stored answers past the replay window removed; retries of their ids are refused"
                ),
                Err(e) => tracing::error!(error = %e, "cannot remove stored answers past the replay window"),
            }
            s.ledger.expire_due(now)
        })
        .await
        {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(returned = n, "expired reservations returned their budget"),
            Ok(Err(e)) => tracing::error!(error = %e, "cannot expire reservations"),
            Err(_) => return,
        }
    }
}

/// The `fedq.v1.Node` service, with the statuses of requests tonic cannot
/// decode given the codes gRPC's conventions give them: a request over
/// `limits.max_request_bytes` is RESOURCE_EXHAUSTED (tonic says
/// OUT_OF_RANGE), one that is not a valid message INVALID_ARGUMENT (tonic
/// says INTERNAL, which reads as a node fault and hides the caller's).
/// Tonic decides these before the service runs, so only its response can
/// be mapped; the status it built rides in the response's extensions, so
/// the mapping keys on tonic's own code and message, never on text the
/// service wrote.
#[derive(Clone)]
struct DecodeStatus<S>(S);

impl<S: tonic::server::NamedService> tonic::server::NamedService for DecodeStatus<S> {
    const NAME: &'static str = S::NAME;
}

type HttpResponse = tonic::codegen::http::Response<tonic::body::Body>;

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for DecodeStatus<S>
where
    S: tonic::codegen::Service<
        tonic::codegen::http::Request<B>,
        Response = HttpResponse,
        Error = std::convert::Infallible,
    >,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<HttpResponse, std::convert::Infallible>> + Send,
        >,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let answer = self.0.call(req);
        Box::pin(async move { Ok(decode_status(answer.await?)) })
    }
}

/// See [`DecodeStatus`].
fn decode_status(response: HttpResponse) -> HttpResponse {
    use tonic::{Code, Status};
    let Some(status) = response.extensions().get::<Status>() else {
        return response;
    };
    let message = status.message();
    let mapped = match status.code() {
        Code::OutOfRange if message.starts_with("Error, decoded message length too large") => {
            Status::resource_exhausted(format!(
                "the request is larger than this node accepts (limits.max_request_bytes): {message}"
            ))
        }
        Code::Internal
            if message.starts_with("failed to decode Protobuf message")
                || message == "Missing request message." =>
        {
            Status::invalid_argument(format!(
                "the request is not a valid fedq.v1 message: {message}"
            ))
        }
        _ => return response,
    };
    mapped.into_http()
}
