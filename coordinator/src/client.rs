//! Talking to the nodes: mutual-TLS channels and concurrent fan-out.
//!
//! Every call to every node runs concurrently under its own deadline. A
//! node that is down, slow or refuses never stops the others: its outcome
//! says what happened, and the caller decides what a partial answer means.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fedq_proto::v1::node_client::NodeClient;
use fedq_proto::v1::{
    BudgetRequest, BudgetResponse, DescribeRequest, DescribeResponse, QueryRequest, QueryResponse,
};
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

use crate::federation::{FederationConfig, NodeEntry};

/// What went wrong with one node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "message")]
pub enum Failure {
    /// No connection (down, wrong address, TLS refused).
    Unreachable(String),
    /// No answer within the deadline.
    TimedOut(String),
    /// The node answered with an error (invalid query, budget, permission).
    Refused(String),
    /// The node answered, but its answer disagrees with the coordinator's
    /// own plan (see [`crate::verify`]): left out of the combination.
    LeftOut(String),
}

impl Failure {
    /// Whether trying again later may succeed: no connection, no answer in
    /// time, or the same query id still being computed on the node.
    pub fn retryable(&self) -> bool {
        match self {
            Failure::Unreachable(m) => !m.contains("does not accept this client certificate"),
            Failure::TimedOut(_) => true,
            Failure::Refused(m) => m.starts_with("Aborted"),
            // The node answered; asking again gets the same (stored) answer.
            Failure::LeftOut(_) => false,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unreachable(m) => write!(f, "unreachable: {m}"),
            Failure::TimedOut(m) => write!(f, "timed out: {m}"),
            Failure::Refused(m) => write!(f, "refused: {m}"),
            // The message names the node and says "answer left out".
            Failure::LeftOut(m) => f.write_str(m),
        }
    }
}

/// One node's outcome of a call.
#[derive(Debug, Clone)]
pub struct Outcome<T> {
    /// Node name.
    pub node: String,
    /// The answer or what went wrong.
    pub result: Result<T, Failure>,
    /// Wall time of the call, connection included.
    pub elapsed: Duration,
}

/// How to call nodes: a per-node deadline and how many retries fit in it.
#[derive(Debug, Clone, Copy)]
pub struct Calls {
    /// Each node's deadline, retries included.
    pub timeout: Duration,
    /// Retries of a failed call that may succeed later.
    pub retries: u32,
}

/// Longest wait for a node's TCP connection (within the call's deadline).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An open channel to a node, and what it was opened under.
struct Cached {
    generation: u64,
    endpoint: String,
    channel: Channel,
}

/// A federation ready to be called: its file plus loaded TLS material.
#[derive(Clone)]
pub struct Federation {
    /// The federation file.
    pub config: FederationConfig,
    links: Links,
}

/// What calls to nodes share: the TLS material, the open channels and the
/// calls in flight. Cheap to clone (three pointers): each of a fan-out's
/// per-node tasks takes a copy, never the whole federation file.
#[derive(Clone)]
struct Links {
    tls: std::sync::Arc<crate::tls::ClientTls>,
    /// Open channels by node name (shared by clones), reused across calls
    /// and queries: a query's Describe and Query, and every later query,
    /// ride one HTTP/2 connection per node instead of a TLS handshake per
    /// call. Dropped when a call to the node fails at the transport, when
    /// its endpoint changes, or when the revocation list changes.
    channels: std::sync::Arc<std::sync::Mutex<HashMap<String, Cached>>>,
    /// Calls in flight per node (shared by clones), for progress displays.
    pending: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, Instant>>>,
    /// Each node's latest Describe and when it came, reused for
    /// [`DESCRIBE_TTL`] by [`Federation::described`]; dropped with the
    /// node's channel and when an answer of the node is left out.
    descriptions: std::sync::Arc<std::sync::Mutex<HashMap<String, (Instant, DescribeResponse)>>>,
    /// The latest round of calls (one [`Federation::call_nodes`]): how many
    /// nodes it asked and how they fared so far, for the progress line
    /// ([`crate::progress`]).
    round: std::sync::Arc<std::sync::Mutex<Round>>,
}

/// The latest round of calls to nodes, as [`crate::progress`] shows it.
#[derive(Debug, Default)]
struct Round {
    /// Counts the rounds, so that a call of an earlier round that ends late
    /// is not counted in the current one.
    id: u64,
    /// Nodes called, answered, failed; the slowest finished call.
    asked: usize,
    answered: usize,
    failed: usize,
    slowest: Option<(String, Duration)>,
}

/// How long a node's Describe (its public schemas, capabilities and API
/// version) is reused by later queries of the same `Federation` before it
/// is asked again. A node whose answers stop matching it is asked afresh
/// at the next query.
pub const DESCRIBE_TTL: Duration = Duration::from_secs(30);

impl Federation {
    /// Loads the file and the TLS material it names.
    pub fn load(path: &std::path::Path) -> Result<Federation, crate::error::SetupError> {
        Federation::from_config(FederationConfig::load(path)?)
    }

    /// Loads the TLS material named in `config`.
    pub fn from_config(config: FederationConfig) -> Result<Federation, crate::error::SetupError> {
        let read = |p: &std::path::Path, what: &'static str| {
            let path = config.resolve(p);
            std::fs::read(&path).map_err(|source| crate::error::SetupError::Read {
                what,
                path,
                source,
            })
        };
        let tls = crate::tls::ClientTls::load(
            &read(&config.tls.ca, "federation CA certificate")?,
            &read(&config.tls.cert, "client certificate")?,
            &read(&config.tls.key, "client private key")?,
            config.tls.crl.as_deref().map(|p| config.resolve(p)),
        )?;
        Ok(Federation {
            config,
            links: Links {
                tls: std::sync::Arc::new(tls),
                channels: Default::default(),
                pending: Default::default(),
                descriptions: Default::default(),
                round: Default::default(),
            },
        })
    }

    /// The default per-node deadline.
    pub fn default_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.config.defaults.timeout_secs)
    }

    /// A client for one node by name.
    pub async fn client(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<NodeClient<Channel>, Failure> {
        let node = self
            .config
            .nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| {
                Failure::Unreachable(format!(
                    "no node named {name:?} in the federation file; it lists: {}",
                    self.config
                        .nodes
                        .iter()
                        .map(|n| n.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        self.links.connect(node, timeout).await
    }

    /// Calls every node concurrently with `call`, each under `timeout`, once.
    /// Outcomes come back in the order of the federation file.
    pub async fn fan_out<T, F, Fut>(&self, timeout: Duration, call: F) -> Vec<Outcome<T>>
    where
        T: Send + 'static,
        F: Fn(NodeClient<Channel>) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>> + Send,
    {
        let nodes = self.config.nodes.clone();
        self.call_nodes(
            &nodes,
            Calls {
                timeout,
                retries: 0,
            },
            call,
        )
        .await
    }

    /// Calls `nodes` concurrently with `call`. Each node has `calls.timeout`
    /// in all (its deadline); a failed call that may succeed later (no
    /// connection, no answer yet, the same query still running) is retried
    /// up to `calls.retries` times within that deadline, with backoff.
    /// Callers retry only idempotent calls (the same query id replays on the
    /// node, so a retry never spends twice). Outcomes follow `nodes`' order.
    pub async fn call_nodes<T, F, Fut>(
        &self,
        nodes: &[NodeEntry],
        calls: Calls,
        call: F,
    ) -> Vec<Outcome<T>>
    where
        T: Send + 'static,
        F: Fn(NodeClient<Channel>) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>> + Send,
    {
        let mut set = JoinSet::new();
        let round = self.links.round_start(nodes.len());
        for (i, node) in nodes.iter().enumerate() {
            let fed = self.links.clone();
            let node = node.clone();
            let call = call.clone();
            set.spawn(async move {
                let start = Instant::now();
                fed.pending_insert(&node.name);
                let deadline = start + calls.timeout;
                let mut attempt = 0u32;
                let result = loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let work = async {
                        let client = fed.connect(&node, left).await?;
                        call(client)
                            .await
                            .map(tonic::Response::into_inner)
                            .map_err(status_failure)
                    };
                    let result = match tokio::time::timeout(left, work).await {
                        Ok(r) => r,
                        Err(_) => Err(Failure::TimedOut(format!(
                            "no answer within {:.1} s",
                            calls.timeout.as_secs_f64()
                        ))),
                    };
                    if matches!(result, Err(Failure::Unreachable(_) | Failure::TimedOut(_))) {
                        fed.forget(&node.name);
                    }
                    match result {
                        Err(f) if f.retryable() && attempt < calls.retries => {
                            let backoff = Duration::from_millis(250 << attempt.min(4));
                            if Instant::now() + backoff >= deadline {
                                break Err(f);
                            }
                            tracing::info!(node = %node.name, attempt, failure = %f, "retrying");
                            tokio::time::sleep(backoff).await;
                            attempt += 1;
                        }
                        other => break other,
                    }
                };
                fed.pending_remove(&node.name);
                fed.round_done(round, &node.name, start.elapsed(), result.is_ok());
                (
                    i,
                    Outcome {
                        node: node.name.clone(),
                        result,
                        elapsed: start.elapsed(),
                    },
                )
            });
        }
        let mut outcomes: Vec<Option<Outcome<T>>> = (0..nodes.len()).map(|_| None).collect();
        while let Some(joined) = set.join_next().await {
            if let Ok((i, outcome)) = joined {
                outcomes[i] = Some(outcome);
            }
        }
        outcomes
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                o.unwrap_or_else(|| Outcome {
                    node: nodes[i].name.clone(),
                    result: Err(Failure::Unreachable("the call task failed".into())),
                    elapsed: Duration::ZERO,
                })
            })
            .collect()
    }

    /// The latest round of calls as the progress line shows it: nodes
    /// asked, answered and failed, and the slowest so far (a call still
    /// running counts when it has taken longer than every finished one).
    pub fn progress(&self) -> crate::progress::Snapshot {
        let r = self.links.round.lock().unwrap_or_else(|p| p.into_inner());
        let waiting = self.pending().into_iter().max_by_key(|(_, t)| *t);
        let (slowest, slowest_waiting) = match (&r.slowest, waiting) {
            (Some(done), Some(w)) if w.1 <= done.1 => (Some(done.clone()), false),
            (_, Some(w)) => (Some(w), true),
            (done, None) => (done.clone(), false),
        };
        crate::progress::Snapshot {
            asked: r.asked,
            answered: r.answered,
            failed: r.failed,
            slowest,
            slowest_waiting,
        }
    }

    /// Nodes whose call is still running, with when it started (for a
    /// progress display).
    pub fn pending(&self) -> Vec<(String, Duration)> {
        self.links
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, t)| (n.clone(), t.elapsed()))
            .collect()
    }

    /// Sends one query (same id to every node) to all nodes, and checks
    /// every answer against the coordinator's own plan from the nodes'
    /// declared schemas, asked for first ([`crate::verify::check_outcomes`]):
    /// an answer that disagrees comes back as [`Failure::LeftOut`]. No
    /// capability checks or retries: see [`crate::run::run_query`].
    pub async fn query(
        &self,
        request: QueryRequest,
        timeout: Duration,
    ) -> Vec<Outcome<QueryResponse>> {
        let described = self.describe(timeout).await;
        let sent = request.clone();
        let answers = self
            .fan_out(timeout, move |mut c| {
                let r = sent.clone();
                async move { c.query(r).await }
            })
            .await;
        crate::verify::check_outcomes(&request, answers, |node| {
            described
                .iter()
                .find(|d| d.node == node)
                .and_then(|d| d.result.as_ref().ok())
        })
    }

    /// Asks every node for its public description.
    pub async fn describe(&self, timeout: Duration) -> Vec<Outcome<DescribeResponse>> {
        self.fan_out(timeout, |mut c| async move {
            c.describe(DescribeRequest {}).await
        })
        .await
    }

    /// Every node's Describe, in federation order: a fresh one (younger
    /// than [`DESCRIBE_TTL`]) kept from an earlier query, else asked now
    /// (and kept if it answered). Half the calls of a query to nodes
    /// described a moment ago.
    pub async fn described(&self, calls: Calls) -> Vec<Outcome<DescribeResponse>> {
        let kept: HashMap<String, DescribeResponse> = {
            let d = self
                .links
                .descriptions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            self.config
                .nodes
                .iter()
                .filter_map(|n| {
                    d.get(&n.name)
                        .filter(|(at, _)| at.elapsed() < DESCRIBE_TTL)
                        .map(|(_, r)| (n.name.clone(), r.clone()))
                })
                .collect()
        };
        let ask: Vec<NodeEntry> = self
            .config
            .nodes
            .iter()
            .filter(|n| !kept.contains_key(&n.name))
            .cloned()
            .collect();
        let mut asked: HashMap<String, Outcome<DescribeResponse>> = self
            .call_nodes(&ask, calls, |mut c| async move {
                c.describe(DescribeRequest {}).await
            })
            .await
            .into_iter()
            .map(|o| (o.node.clone(), o))
            .collect();
        {
            let mut d = self
                .links
                .descriptions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for o in asked.values() {
                if let Ok(r) = &o.result {
                    d.insert(o.node.clone(), (Instant::now(), r.clone()));
                }
            }
        }
        let mut kept = kept;
        self.config
            .nodes
            .iter()
            .map(|n| match kept.remove(&n.name) {
                Some(r) => Outcome {
                    node: n.name.clone(),
                    result: Ok(r),
                    elapsed: Duration::ZERO,
                },
                None => asked.remove(&n.name).unwrap_or_else(|| Outcome {
                    node: n.name.clone(),
                    result: Err(Failure::Unreachable("not described".into())),
                    elapsed: Duration::ZERO,
                }),
            })
            .collect()
    }

    /// Forgets `node`'s kept Describe: its answer disagreed with it (the
    /// node may have changed its schemas), so the next query asks again.
    pub fn forget_description(&self, node: &str) {
        self.links.forget_description(node);
    }

    /// Asks every node for the caller's budgets.
    pub async fn budget(&self, timeout: Duration) -> Vec<Outcome<BudgetResponse>> {
        self.fan_out(
            timeout,
            |mut c| async move { c.budget(BudgetRequest {}).await },
        )
        .await
    }
}

/// A fresh random query id (128 bits, hex).
pub fn new_query_id() -> String {
    let mut b = [0u8; 16];
    // The OS RNG failing is not recoverable in a meaningful way; fall back
    // to time-based uniqueness rather than aborting the researcher's query.
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = t.to_be_bytes();
    }
    hex::encode(b)
}

impl Links {
    /// A client for `node`: over its open channel if there is one (made
    /// under the current revocation list, to the same endpoint), else over
    /// a new connection, kept for the next call.
    async fn connect(
        &self,
        node: &NodeEntry,
        timeout: Duration,
    ) -> Result<NodeClient<Channel>, Failure> {
        let generation = self
            .tls
            .generation()
            .map_err(|e| Failure::Unreachable(e.to_string()))?;
        let cached = self
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node.name)
            .filter(|c| c.generation == generation && c.endpoint == node.endpoint)
            .map(|c| c.channel.clone());
        let channel = match cached {
            Some(channel) => channel,
            None => {
                let channel = self.open(node, timeout).await?;
                self.channels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(
                        node.name.clone(),
                        Cached {
                            generation,
                            endpoint: node.endpoint.clone(),
                            channel: channel.clone(),
                        },
                    );
                channel
            }
        };
        Ok(NodeClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
    }

    /// Forgets `node`'s open channel (a call over it failed at the
    /// transport): the next call connects afresh.
    fn forget(&self, node: &str) {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
        self.forget_description(node);
    }

    fn forget_description(&self, node: &str) {
        self.descriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
    }

    /// A new mutual-TLS connection to `node`, its TCP connection made
    /// within `timeout` (at most [`CONNECT_TIMEOUT`]).
    async fn open(&self, node: &NodeEntry, timeout: Duration) -> Result<Channel, Failure> {
        // TLS is ours (tonic's takes no revocation list): tonic is given
        // the node's address as plain http and connections already secured.
        let authority = node
            .endpoint
            .parse::<tonic::codegen::http::Uri>()
            .ok()
            .and_then(|u| u.authority().map(|a| a.to_string()))
            .ok_or_else(|| Failure::Unreachable(format!("invalid endpoint {:?}", node.endpoint)))?;
        let endpoint = Endpoint::from_shared(format!("http://{authority}"))
            .map_err(|e| {
                Failure::Unreachable(format!("invalid endpoint {:?}: {e}", node.endpoint))
            })?
            // A kept connection whose node went away is noticed within
            // about 40 s even while idle, and the next call reconnects.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let connect_timeout = timeout.min(CONNECT_TIMEOUT);
        let (tls, name) = (std::sync::Arc::clone(&self.tls), node.name.clone());
        let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let (tls, name, authority) = (tls.clone(), name.clone(), authority.clone());
            async move { tls.connect(&authority, &name, connect_timeout).await }
        });
        endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| {
                Failure::Unreachable(format!(
                    "cannot connect to {}: {}",
                    node.endpoint,
                    error_chain(&e)
                ))
            })
    }

    fn pending_insert(&self, node: &str) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_string(), Instant::now());
    }

    fn pending_remove(&self, node: &str) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
    }

    /// A new round of calls to `asked` nodes; its id.
    fn round_start(&self, asked: usize) -> u64 {
        let mut r = self.round.lock().unwrap_or_else(|p| p.into_inner());
        *r = Round {
            id: r.id + 1,
            asked,
            ..Round::default()
        };
        r.id
    }

    /// One call of round `id` ended after `took`.
    fn round_done(&self, id: u64, node: &str, took: Duration, answered: bool) {
        let mut r = self.round.lock().unwrap_or_else(|p| p.into_inner());
        if r.id != id {
            return;
        }
        if answered {
            r.answered += 1;
        } else {
            r.failed += 1;
        }
        if r.slowest.as_ref().is_none_or(|(_, t)| took > *t) {
            r.slowest = Some((node.to_string(), took));
        }
    }
}

/// What a gRPC status means for the researcher.
pub fn status_failure(s: tonic::Status) -> Failure {
    use tonic::Code;
    // Transport failures (a TLS alert, a reset) arrive as status errors
    // whose message says little; their cause says what happened.
    if std::error::Error::source(&s).is_some()
        && matches!(
            s.code(),
            Code::Unknown | Code::Unavailable | Code::Cancelled
        )
    {
        let chain = error_chain(&s);
        let hint = if chain.contains("UnknownCA")
            || chain.contains("BadCertificate")
            || chain.contains("CertificateRequired")
        {
            " (the node does not accept this client certificate: is it issued by the federation's CA?)"
        } else {
            ""
        };
        return Failure::Unreachable(format!("{chain}{hint}"));
    }
    match s.code() {
        Code::Unavailable => Failure::Unreachable(s.message().to_string()),
        Code::DeadlineExceeded => Failure::TimedOut(s.message().to_string()),
        _ => Failure::Refused(format!("{:?}: {}", s.code(), s.message())),
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    // tonic and hyper repeat a cause's text in its parent's; keep each once.
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = c.source();
    }
    parts.join(": ")
}
