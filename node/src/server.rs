//! Starting and stopping a node's gRPC server over mutual TLS.
//!
//! [`start`] binds first (so a port of 0 picks a free one, as tests do),
//! then serves until [`RunningNode::stop`] or the future passed to
//! [`serve_until`] completes. Shutdown is graceful: in-flight requests
//! finish, and the store is released when the last request drops its state.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use fedq_proto::v1::node_server::NodeServer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::config::NodeConfig;
use crate::service::{NodeService, NodeState};

/// A node serving in the background of this process.
pub struct RunningNode {
    /// The address actually bound.
    pub addr: SocketAddr,
    /// The node's name.
    pub name: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningNode {
    /// Stops accepting, lets in-flight requests finish and waits.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await.context("node task panicked")?
    }
}

/// Reads the TLS material named in the config.
fn tls_config(cfg: &NodeConfig) -> anyhow::Result<ServerTlsConfig> {
    let read = |p: &std::path::Path, what: &str| {
        let path = cfg.resolve(p);
        std::fs::read(&path)
            .with_context(|| format!("cannot read the node's {what} {}", path.display()))
    };
    let cert = read(&cfg.tls.cert, "certificate")?;
    let key = read(&cfg.tls.key, "private key")?;
    let ca = read(&cfg.tls.ca, "federation CA certificate")?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca))
        .client_auth_optional(false))
}

/// Opens the store, loads the datasets, binds and serves in the background.
pub async fn start(config: NodeConfig) -> anyhow::Result<RunningNode> {
    let (tx, rx) = oneshot::channel();
    let listener = tokio::net::TcpListener::bind(config.node.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.node.listen))?;
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
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.node.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.node.listen))?;
    serve_on(config, listener, shutdown).await
}

async fn serve_on(
    config: NodeConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tls = tls_config(&config)?;
    let max_request = config.limits.max_request_bytes;
    let name = config.node.name.clone();
    let addr = listener.local_addr()?;
    let state = tokio::task::spawn_blocking(move || NodeState::open(config))
        .await
        .context("loading the store panicked")??;
    // Refuse a store rolled back below the ledger's high-water mark (that
    // would hand back spent budget), then log the start and raise the mark.
    crate::backup::raise_high_water(&state.config, state.audit())?;
    state.check_sources().await?;
    state.log_start()?;
    crate::backup::raise_high_water(&state.config, state.audit())?;
    let datasets = state.datasets.len();
    let state = Arc::new(state);
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
    let served = Server::builder()
        .tls_config(tls)
        .context("invalid TLS configuration")?
        .add_service(health_service)
        .add_service(service)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await;
    // The sweeper holds the store open: stop it before reporting "stopped".
    sweeper.abort();
    let _ = sweeper.await;
    if let Err(e) = crate::backup::raise_high_water(&final_state.config, final_state.audit()) {
        tracing::error!(error = %e, "cannot raise the ledger's high-water mark at shutdown");
    }
    drop(final_state);
    served.context("the gRPC server failed")?;
    tracing::info!(node = %name, "stopped");
    Ok(())
}

/// Returns the budget of two-phase reservations that were never committed,
/// once a second (and right away, for those that expired while the node was
/// down). Each is logged as `reservation_returned`.
async fn sweep_reservations(state: Arc<NodeState>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let s = Arc::clone(&state);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        match tokio::task::spawn_blocking(move || s.ledger.expire_due(now)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(returned = n, "expired reservations returned their budget"),
            Ok(Err(e)) => tracing::error!(error = %e, "cannot expire reservations"),
            Err(_) => return,
        }
    }
}
