//! The node's side of mutual TLS: its identity, the federation CA it trusts,
//! the revocation list it honours, and who is refused at the handshake.
//!
//! tonic's own acceptor takes only a CA certificate, so the node builds the
//! rustls configuration itself and accepts connections with tokio-rustls
//! ([`incoming`]); tonic still reads the verified client certificate off
//! each connection for [`crate::service`] (DESIGN invariant 8).
//!
//! - [`load`] reads and checks every TLS file before anything is served:
//!   each error names the `[tls]` key at fault, and the node refuses to
//!   start with a certificate that does not carry `node.name` (coordinators
//!   verify the node by that name). `fedq-node check` and `serve` both call
//!   it, so `check` cannot say OK where `serve` fails.
//! - The client-certificate verifier ([`ClientVerifier`]) checks the chain
//!   to the federation CA and the revocation list (`[tls] crl`), and
//!   refuses a node certificate used as a client certificate. It looks at
//!   the CRL file every [`CRL_CHECK_EVERY`] and rebuilds itself when the
//!   file changed, so a revocation takes effect without a restart; a file
//!   that does not parse keeps the previous list and logs an error.
//! - Sessions are never resumed: a resumed TLS session skips the client
//!   certificate check, which would let a revoked certificate back in.
//! - Every refusal is logged (tracing) in bounded form: the first refusal
//!   of a certificate for a reason in a minute is logged at once, the rest
//!   are counted and summarised. A hook ([`ServerTls::on_refusal`]) sees
//!   every refusal, for the audit log's refusal summaries.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;

use crate::config::NodeConfig;
use fedq_pki::{caller_from_der, check_node_name, load_crls, serial_hex};

crate::error::stage_error! {
    /// Why the node's TLS set-up cannot be used: the message names the
    /// `[tls]` key and the file at fault, and what to do.
    TlsError {}
}

impl From<fedq_pki::PkiError> for TlsError {
    fn from(e: fedq_pki::PkiError) -> Self {
        TlsError::Refused(e.to_string())
    }
}

/// How often the verifier looks at the CRL file (its modification time and
/// size) for a new list.
pub const CRL_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Longest a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; beyond it new connections are dropped
/// (a flood of half-open handshakes cannot take all the node's memory).
const MAX_HANDSHAKES: usize = 1024;

/// Certificate names longer than this are cut in log lines and refusals
/// (a refused certificate's name is the caller's input).
const MAX_NAME: usize = 128;

/// Called on every refused client certificate, from the handshake (keep it
/// cheap: count, do not write).
pub type RefusalHook = Arc<dyn Fn(&HandshakeRefusal) + Send + Sync>;

/// A client certificate refused at the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeRefusal {
    /// Subject CN as the certificate states it (cut to 128 characters);
    /// for a certificate the federation CA did not issue, that is only a
    /// claim. Empty if it has none.
    pub name: String,
    /// Subject OU (the role), as stated.
    pub role: String,
    /// Serial number, hex.
    pub serial: String,
    /// Why, one of a few fixed words: `revoked`, `node_certificate_as_client`,
    /// `unknown_issuer`, `expired`, `not_yet_valid`, `wrong_purpose`,
    /// `invalid`.
    pub reason: &'static str,
}

/// The node's TLS set-up, checked and ready to accept connections.
pub struct ServerTls {
    config: Arc<ServerConfig>,
    verifier: Arc<ClientVerifier>,
    secagg: Option<Arc<SecAggIdentity>>,
}

/// What a node needs to take part in secure aggregation: its certificate
/// key (signing its round keys), its certificate, and the federation CA
/// and revocation list (checking the other participants' certificates).
pub struct SecAggIdentity {
    /// The node certificate's key.
    pub signer: fedq_secagg::Signer,
    /// The node certificate, DER.
    pub certificate: Vec<u8>,
    verifier: Arc<ClientVerifier>,
    /// The last verifier built, with the revocation list's file stamp it
    /// was built from: rebuilt only when the file changes.
    built: Mutex<Option<(CrlStamp, NodeVerifier)>>,
}

/// A revocation list file's stamp (`fedq_pki::crl_stamp`).
type CrlStamp = Option<(std::time::SystemTime, u64)>;
/// A verifier of node certificates.
type NodeVerifier = Arc<dyn rustls::client::danger::ServerCertVerifier>;

impl SecAggIdentity {
    /// A verifier of node certificates (serverAuth, for their name)
    /// against the federation CA and the revocation list as it is on disk
    /// now: what a round checks its participants with. Kept while the
    /// list's file is unchanged.
    pub fn node_verifier(&self) -> Result<NodeVerifier, TlsError> {
        let stamp = self
            .verifier
            .crl
            .as_ref()
            .and_then(|c| fedq_pki::crl_stamp(&c.path));
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, v)) = &*built {
            if *s == stamp {
                return Ok(Arc::clone(v));
            }
        }
        let v = self.build_node_verifier()?;
        *built = Some((stamp, Arc::clone(&v)));
        Ok(v)
    }

    fn build_node_verifier(&self) -> Result<NodeVerifier, TlsError> {
        let v = &self.verifier;
        let mut b = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::clone(&v.roots),
            provider(),
        );
        if let Some(crl) = &v.crl {
            let crls = load_crls(&crl.path, &v.ca_certs)
                .map_err(|e| TlsError::Refused(format!("tls.crl {}: {e}", crl.path.display())))?;
            b = b.with_crls(crls).only_check_end_entity_revocation();
        }
        let v: Arc<dyn rustls::client::danger::ServerCertVerifier> = b
            .build()
            .map_err(|e| TlsError::Refused(format!("tls.ca: {e}")))?;
        Ok(v)
    }
}

impl ServerTls {
    /// Sets the function told of every refused client certificate (once;
    /// later calls are ignored). The server calls it once its state is
    /// open, before the first connection is accepted.
    pub fn on_refusal(&self, hook: RefusalHook) {
        let _ = self.verifier.hook.set(hook);
    }

    /// The verifier (tests and `check` look at it).
    pub fn verifier(&self) -> &Arc<ClientVerifier> {
        &self.verifier
    }

    /// The node's secure-aggregation identity; `None` when its
    /// certificate key cannot sign round keys (not PKCS#8 ECDSA or
    /// Ed25519: the start says so).
    pub fn secagg(&self) -> Option<Arc<SecAggIdentity>> {
        self.secagg.clone()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks the node's TLS files (`[tls]`) and builds the server
/// configuration. Errors name the `[tls]` key and the file at fault.
pub fn load(cfg: &NodeConfig) -> Result<ServerTls, TlsError> {
    let read = |key: &str, p: &Path| -> Result<(PathBuf, Vec<u8>), TlsError> {
        let path = cfg.resolve(p);
        let bytes = std::fs::read(&path)
            .map_err(|e| TlsError::io(format!("tls.{key}: cannot read {}", path.display()), e))?;
        Ok((path, bytes))
    };
    let (cert_path, cert_pem) = read("cert", &cfg.tls.cert)?;
    let (key_path, key_pem) = read("key", &cfg.tls.key)?;
    let (ca_path, ca_pem) = read("ca", &cfg.tls.ca)?;

    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .ok()
        .filter(|c: &Vec<_>| !c.is_empty())
        .ok_or_else(|| {
            TlsError::Refused(format!(
                "tls.cert: {} holds no PEM certificate",
                cert_path.display()
            ))
        })?;
    let key: PrivateKeyDer<'static> = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        TlsError::Refused(format!(
            "tls.key: {} holds no PEM private key (PKCS#8, SEC1 or PKCS#1)",
            key_path.display()
        ))
    })?;
    let ca_certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&ca_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::Refused(format!("tls.ca: {} is not PEM", ca_path.display())))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(ca_certs.iter().cloned());
    if added == 0 {
        return Err(TlsError::Refused(format!(
            "tls.ca: {} holds no usable CA certificate (the federation CA, PEM)",
            ca_path.display()
        )));
    }
    let roots = Arc::new(roots);

    check_node_name(&cert_pem, &cfg.node.name)
        .map_err(|e| TlsError::io(format!("tls.cert {}", cert_path.display()), e))?;

    // The certificate alone first, so that its own faults are not blamed
    // on the revocation list.
    check_own_certificate(&chain, &roots, &cfg.node.name, None)
        .map_err(|e| e.into_error(None))
        .map_err(|e| TlsError::io(format!("tls.cert {}", cert_path.display()), e))?;
    let crl = match &cfg.tls.crl {
        Some(p) => {
            let path = cfg.resolve(p);
            let crls = load_crls(&path, &ca_certs)?;
            check_own_certificate(&chain, &roots, &cfg.node.name, Some(&crls))
                .map_err(|e| e.into_error(Some(&path)))?;
            Some((path, crls))
        }
        None => None,
    };

    let own = OwnCertificate {
        chain: chain.clone(),
        name: cfg.node.name.clone(),
    };
    let verifier = Arc::new(ClientVerifier::new(
        Arc::clone(&roots),
        ca_certs,
        crl,
        Some(own),
    )?);
    let secagg = match fedq_secagg::Signer::from_pkcs8(key.secret_der()) {
        Ok(signer) => Some(Arc::new(SecAggIdentity {
            signer,
            certificate: chain[0].to_vec(),
            verifier: Arc::clone(&verifier),
            built: Mutex::new(None),
        })),
        Err(e) => {
            tracing::warn!(key = %key_path.display(), error = %e, "secure aggregation unavailable: the node key cannot sign round keys");
            None
        }
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::io("TLS protocol versions", e))?
        .with_client_cert_verifier(Arc::clone(&verifier) as Arc<dyn ClientCertVerifier>)
        .with_single_cert(chain, key)
        .map_err(|e| {
            TlsError::Refused(format!(
                "tls.key {} does not go with tls.cert {}: {e}",
                key_path.display(),
                cert_path.display()
            ))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No resumption: a resumed session is not re-verified, so a client
    // whose certificate was revoked since could resume its way back in.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(ServerTls {
        config: Arc::new(config),
        verifier,
        secagg,
    })
}

/// Why the node's own certificate would be refused.
enum OwnCertProblem {
    /// It is on the revocation list.
    Revoked,
    /// The revocation list does not verify with the federation CA.
    BadCrl(String),
    /// Anything else (another CA, expired, not for `node.name`).
    Other(String),
}

impl OwnCertProblem {
    fn into_error(self, crl: Option<&Path>) -> TlsError {
        let crl = crl.map(|p| p.display().to_string()).unwrap_or_default();
        match self {
            OwnCertProblem::Revoked => TlsError::Refused(format!("the node's own certificate is revoked by the revocation list tls.crl {crl}; the CA must issue it a new one")),
            OwnCertProblem::BadCrl(e) => TlsError::Refused(format!("tls.crl {crl}: the revocation list does not verify with the federation CA in tls.ca ({e}); is it signed by that CA?")),
            OwnCertProblem::Other(e) => TlsError::Refused(e.to_string()),
        }
    }
}

/// Checks the node's own certificate as a coordinator will: issued by the
/// federation CA, valid now, for `node.name`; and, with `crls`, not on the
/// revocation list, which also checks the list's signature against the CA
/// (a list that does not verify would make every handshake fail).
fn check_own_certificate(
    chain: &[CertificateDer<'static>],
    roots: &Arc<RootCertStore>,
    name: &str,
    crls: Option<&[CertificateRevocationListDer<'static>]>,
) -> Result<(), OwnCertProblem> {
    let server_name = ServerName::try_from(name.to_string()).map_err(|_| {
        OwnCertProblem::Other(format!(
            "node.name {name:?} is not a DNS name or an IP address"
        ))
    })?;
    let mut builder =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::clone(roots), provider());
    if let Some(crls) = crls {
        builder = builder
            .with_crls(crls.iter().cloned())
            .only_check_end_entity_revocation();
    }
    let verifier = builder
        .build()
        .map_err(|e| OwnCertProblem::BadCrl(e.to_string()))?;
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| OwnCertProblem::Other("no certificate".into()))?;
    match verifier.verify_server_cert(leaf, intermediates, &server_name, &[], UnixTime::now()) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InvalidCertificate(CertificateError::Revoked)) => {
            Err(OwnCertProblem::Revoked)
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            Err(OwnCertProblem::Other("the node's certificate was not issued by the federation CA in tls.ca; coordinators would refuse it".into()))
        }
        Err(rustls::Error::InvalidCertRevocationList(e)) => {
            Err(OwnCertProblem::BadCrl(format!("{e:?}")))
        }
        Err(e) => Err(OwnCertProblem::Other(format!(
            "the node's certificate would be refused by coordinators: {e}"
        ))),
    }
}

struct CrlFile {
    path: PathBuf,
    state: Mutex<CrlState>,
}

struct CrlState {
    checked: Instant,
    stamp: Option<(SystemTime, u64)>,
}

/// The node's own certificate, to check each new revocation list against.
struct OwnCertificate {
    chain: Vec<CertificateDer<'static>>,
    name: String,
}

/// The node's client-certificate verifier: the federation CA and the
/// current revocation list, rebuilt when the list's file changes.
pub struct ClientVerifier {
    roots: Arc<RootCertStore>,
    ca_certs: Vec<CertificateDer<'static>>,
    own: Option<OwnCertificate>,
    hints: Vec<DistinguishedName>,
    current: RwLock<Arc<dyn ClientCertVerifier>>,
    /// Bumped at every revocation list loaded: open connections check
    /// their certificate again when it moves ([`Revocable`]).
    generation: AtomicU64,
    crl: Option<CrlFile>,
    refusals: RefusalLog,
    hook: OnceLock<RefusalHook>,
}

impl std::fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientVerifier")
            .field("crl", &self.crl.as_ref().map(|c| &c.path))
            .finish_non_exhaustive()
    }
}

fn webpki_verifier(
    roots: &Arc<RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    WebPkiClientVerifier::builder_with_provider(Arc::clone(roots), provider())
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .build()
        .map_err(|e| TlsError::Refused(format!("{e}")))
}

impl ClientVerifier {
    fn new(
        roots: Arc<RootCertStore>,
        ca_certs: Vec<CertificateDer<'static>>,
        crl: Option<(PathBuf, Vec<CertificateRevocationListDer<'static>>)>,
        own: Option<OwnCertificate>,
    ) -> Result<ClientVerifier, TlsError> {
        let (crl_file, crls) = match crl {
            Some((path, crls)) => (
                Some(CrlFile {
                    state: Mutex::new(CrlState {
                        checked: Instant::now(),
                        stamp: fedq_pki::crl_stamp(&path),
                    }),
                    path,
                }),
                crls,
            ),
            None => (None, Vec::new()),
        };
        let inner = webpki_verifier(&roots, crls).map_err(|e| match &crl_file {
            Some(c) => TlsError::Refused(format!("tls.crl {}: {e}", c.path.display())),
            None => TlsError::Refused(format!("tls.ca: {e}")),
        })?;
        Ok(ClientVerifier {
            hints: inner.root_hint_subjects().to_vec(),
            roots,
            ca_certs,
            own,
            current: RwLock::new(inner),
            generation: AtomicU64::new(0),
            crl: crl_file,
            refusals: RefusalLog::default(),
            hook: OnceLock::new(),
        })
    }

    fn inner(&self) -> Arc<dyn ClientCertVerifier> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Looks at the CRL file if [`CRL_CHECK_EVERY`] has passed, and loads
    /// it if it changed. A list that does not load is logged and the
    /// previous one kept: a bad copy must not let revoked certificates in,
    /// nor lock everyone out.
    pub fn reload_if_changed(&self) {
        let Some(crl) = &self.crl else { return };
        // Another handshake is already looking: use the current list.
        let Ok(mut st) = crl.state.try_lock() else {
            return;
        };
        if st.checked.elapsed() < CRL_CHECK_EVERY {
            return;
        }
        st.checked = Instant::now();
        let now = fedq_pki::crl_stamp(&crl.path);
        if now == st.stamp {
            return;
        }
        st.stamp = now;
        match load_crls(&crl.path, &self.ca_certs)
            .map_err(TlsError::from)
            .and_then(|crls| {
            if let Some(own) = &self.own {
                match check_own_certificate(&own.chain, &self.roots, &own.name, Some(&crls)) {
                    Err(OwnCertProblem::BadCrl(e)) => {
                        return Err(OwnCertProblem::BadCrl(e).into_error(Some(&crl.path)))
                    }
                    // Still a valid list: it revokes others too. The node
                    // goes on serving; say loudly that it is itself revoked.
                    Err(OwnCertProblem::Revoked) => tracing::error!(
                        crl = %crl.path.display(),
                        "the new revocation list revokes this node's own certificate; the CA must issue it a new one"
                    ),
                    Err(OwnCertProblem::Other(_)) | Ok(()) => {}
                }
            }
            let n = crls.len();
            webpki_verifier(&self.roots, crls).map(|v| (v, n))
        }) {
            Ok((v, n)) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = v;
                self.generation.fetch_add(1, Ordering::SeqCst);
                tracing::info!(crl = %crl.path.display(), lists = n, "loaded the new certificate revocation list (tls.crl)");
            }
            Err(e) => tracing::error!(
                crl = %crl.path.display(),
                error = %format!("{e:#}"),
                "tls.crl: the new revocation list cannot be used; keeping the previous one"
            ),
        }
    }

    fn refuse(&self, end_entity: &CertificateDer<'_>, reason: &'static str, detail: &str) {
        let caller = caller_from_der(end_entity.as_ref());
        let serial = {
            use x509_parser::prelude::FromDer;
            x509_parser::certificate::X509Certificate::from_der(end_entity.as_ref())
                .map(|(_, c)| serial_hex(c.raw_serial()))
                .unwrap_or_default()
        };
        let cut = |s: String| s.chars().take(MAX_NAME).collect::<String>();
        let refusal = HandshakeRefusal {
            name: cut(caller.as_ref().map(|c| c.name.clone()).unwrap_or_default()),
            role: cut(caller.map(|c| c.role).unwrap_or_default()),
            serial,
            reason,
        };
        self.refusals.note(&refusal, detail);
        if let Some(hook) = self.hook.get() {
            hook(&refusal);
        }
    }
}

/// The short, fixed reason for a rustls verification error.
fn reason_of(e: &rustls::Error) -> &'static str {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Revoked => "revoked",
            CertificateError::UnknownIssuer => "unknown_issuer",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "wrong_purpose"
            }
            _ => "invalid",
        },
        _ => "invalid",
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.reload_if_changed();
        match self
            .inner()
            .verify_client_cert(end_entity, intermediates, now)
        {
            Ok(v) => {
                // A node's certificate identifies a server. Older ones carry
                // clientAuth too; whatever their EKU, a node key never
                // queries another node.
                if caller_from_der(end_entity.as_ref()).is_some_and(|c| c.role == "node") {
                    self.refuse(
                        end_entity,
                        "node_certificate_as_client",
                        "a node certificate may not be used as a client certificate",
                    );
                    return Err(rustls::Error::InvalidCertificate(
                        CertificateError::InvalidPurpose,
                    ));
                }
                Ok(v)
            }
            Err(e) => {
                let reason = match reason_of(&e) {
                    // A node certificate (serverAuth only) used as a client.
                    "wrong_purpose"
                        if caller_from_der(end_entity.as_ref())
                            .is_some_and(|c| c.role == "node") =>
                    {
                        "node_certificate_as_client"
                    }
                    r => r,
                };
                self.refuse(end_entity, reason, &e.to_string());
                Err(e)
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner().supported_verify_schemes()
    }
}

/// Refusals in bounded form: the first of each (certificate, reason) in a
/// minute is logged at once; the others are counted and logged as one
/// line when the minute is over (at the next refusal after it). At most
/// [`RefusalLog::KEYS`] distinct keys a minute; beyond them, one line counts
/// the rest.
#[derive(Default)]
struct RefusalLog {
    window: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    started: Option<Instant>,
    counts: HashMap<(String, String, &'static str), u64>,
    overflow: u64,
}

impl RefusalLog {
    const KEYS: usize = 1024;
    const MINUTE: Duration = Duration::from_secs(60);

    fn note(&self, r: &HandshakeRefusal, detail: &str) {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if w.started.is_none_or(|s| s.elapsed() >= Self::MINUTE) {
            for ((name, serial, reason), n) in w.counts.drain() {
                if n > 1 {
                    tracing::warn!(certificate = ?name, serial = %serial, reason, more = n - 1, "more client certificates refused at the TLS handshake in the last minute");
                }
            }
            if w.overflow > 0 {
                tracing::warn!(
                    refused = w.overflow,
                    "more client certificates refused in the last minute (not itemised)"
                );
            }
            w.overflow = 0;
            w.started = Some(Instant::now());
        }
        let key = (r.name.clone(), r.serial.clone(), r.reason);
        if let Some(n) = w.counts.get_mut(&key) {
            *n += 1;
            return;
        }
        if w.counts.len() >= Self::KEYS {
            w.overflow += 1;
            return;
        }
        w.counts.insert(key, 1);
        drop(w);
        tracing::warn!(
            certificate = ?r.name,
            role = ?r.role,
            serial = %r.serial,
            reason = r.reason,
            detail,
            "refused a client certificate at the TLS handshake"
        );
    }
}

/// An accepted connection whose client certificate is checked again
/// whenever a new revocation list is loaded: a certificate revoked after
/// its handshake loses its connection at the next read (logged as a
/// `revoked` refusal), so holding a connection open does not outlive a
/// revocation. Between lists it costs one atomic load per read.
pub struct Revocable {
    inner: TlsStream<TcpStream>,
    verifier: Arc<ClientVerifier>,
    leaf: Option<CertificateDer<'static>>,
    checked: u64,
}

impl Revocable {
    fn new(inner: TlsStream<TcpStream>, verifier: Arc<ClientVerifier>) -> Revocable {
        let leaf = inner
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned());
        let checked = verifier.generation.load(Ordering::SeqCst);
        Revocable {
            inner,
            verifier,
            leaf,
            checked,
        }
    }

    /// Refused now (revoked since the handshake)?
    fn revoked(&mut self) -> bool {
        self.verifier.reload_if_changed();
        let now = self.verifier.generation.load(Ordering::SeqCst);
        if now == self.checked {
            return false;
        }
        self.checked = now;
        let Some(leaf) = &self.leaf else { return false };
        match self
            .verifier
            .inner()
            .verify_client_cert(leaf, &[], UnixTime::now())
        {
            Err(rustls::Error::InvalidCertificate(CertificateError::Revoked)) => {
                self.verifier.refuse(
                    leaf,
                    "revoked",
                    "an open connection was closed: its certificate was revoked after the handshake",
                );
                true
            }
            _ => false,
        }
    }
}

impl tokio::io::AsyncRead for Revocable {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.revoked() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the client certificate was revoked",
            )));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Revocable {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Revocable {
    type ConnectInfo = <TlsStream<TcpStream> as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Accepts TCP connections on `listener` and completes their TLS
/// handshakes concurrently (each under a deadline), yielding the
/// established streams for tonic's `serve_with_incoming*`. Returns the
/// stream and the accepting task: abort and await the task after the
/// server stops, so the listening socket is closed when `serve` returns.
pub fn incoming(
    listener: TcpListener,
    tls: &ServerTls,
) -> (
    tokio_stream::wrappers::ReceiverStream<Result<Revocable, std::io::Error>>,
    JoinHandle<()>,
) {
    let verifier = Arc::clone(&tls.verifier);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.config));
    let task = tokio::spawn(async move {
        let mut handshakes = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = tx.closed() => break,
                Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        if handshakes.len() >= MAX_HANDSHAKES {
                            tracing::warn!(%peer, "too many TLS handshakes in progress; connection dropped");
                            continue;
                        }
                        let _ = tcp.set_nodelay(true);
                        let acceptor = acceptor.clone();
                        let tx = tx.clone();
                        let verifier = Arc::clone(&verifier);
                        handshakes.spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                                Ok(Ok(stream)) => {
                                    let _ = tx.send(Ok(Revocable::new(stream, verifier))).await;
                                }
                                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                            }
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: pause, do
                        // not spin.
                        tracing::warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedq_pki::{Authority, RevocationList, Role};

    fn verify(v: &ClientVerifier, pem: &str) -> Result<(), rustls::Error> {
        let der = fedq_pki::der_from_pem(pem).unwrap();
        v.verify_client_cert(&CertificateDer::from(der), &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn a_new_crl_file_is_picked_up_and_a_bad_one_keeps_the_previous() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::generate("ca").unwrap();
        let ca_certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(ca.pem.cert.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(ca_certs.iter().cloned());
        let alice = ca.issue(Role::Analyst, "alice").unwrap();
        let bob = ca.issue(Role::Analyst, "bob").unwrap();
        let node = ca.issue(Role::Node, "n1").unwrap();
        let mut list = RevocationList::default();
        let crl_path = list.publish(&ca, dir.path()).unwrap();
        let crls = load_crls(&crl_path, &ca_certs).unwrap();
        let v = ClientVerifier::new(
            Arc::new(roots),
            ca_certs,
            Some((crl_path.clone(), crls)),
            None,
        )
        .unwrap();
        verify(&v, &alice.cert).unwrap();
        verify(&v, &bob.cert).unwrap();
        // A node certificate is never a client certificate.
        assert!(verify(&v, &node.cert).is_err());

        let (serial, _) = fedq_pki::serial_and_holder(&alice.cert).unwrap();
        assert!(list.add(&serial, "alice", "analyst"));
        list.publish(&ca, dir.path()).unwrap();
        // Not looked at again before CRL_CHECK_EVERY: force the clock.
        v.crl.as_ref().unwrap().state.lock().unwrap().checked = Instant::now() - CRL_CHECK_EVERY;
        assert_eq!(
            verify(&v, &alice.cert),
            Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
        );
        verify(&v, &bob.cert).unwrap();

        // Garbage: the previous list (alice revoked) stays in force.
        std::fs::write(&crl_path, "not a CRL at all, and longer than before").unwrap();
        v.crl.as_ref().unwrap().state.lock().unwrap().checked = Instant::now() - CRL_CHECK_EVERY;
        assert!(verify(&v, &alice.cert).is_err());
        verify(&v, &bob.cert).unwrap();
        assert!(load_crls(&crl_path, &[])
            .unwrap_err()
            .to_string()
            .contains("tls.crl"));
    }

    #[test]
    fn a_crl_from_another_ca_is_refused_naming_tls_crl() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::generate("ca").unwrap();
        let other = Authority::generate("other").unwrap();
        let path = RevocationList::default()
            .publish(&other, dir.path())
            .unwrap();
        let ca_certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(ca.pem.cert.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let e = load_crls(&path, &ca_certs).unwrap_err().to_string();
        assert!(
            e.contains("tls.crl") && e.contains("not by the federation CA"),
            "{e}"
        );
    }
}
