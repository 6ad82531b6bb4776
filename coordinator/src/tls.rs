//! The coordinator's side of mutual TLS: the researcher's certificate, the
//! federation CA every node must chain to, the node's name as the server
//! name, and the federation's revocation list (`[tls] crl`).
//!
//! tonic's own TLS settings take a CA and an identity but no revocation
//! list, so the coordinator builds the rustls configuration itself and
//! hands tonic connections it has already secured ([`ClientTls::connect`]).
//! A node whose certificate the list revokes is refused at the handshake,
//! named, and left out; the list is read again when its file changes, so a
//! long-lived `Federation` (the Python package's) honours a new list
//! without being reloaded.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::error::SetupError;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The TLS material of a federation file, checked, and the client
/// configuration built from it (rebuilt when the revocation list changes).
pub(crate) struct ClientTls {
    ca_certs: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    crl: Option<PathBuf>,
    /// The configuration and the CRL file's stamp it was built with.
    built: Mutex<Option<Built>>,
    /// Bumped at every rebuild: connections made under an older
    /// configuration (an older revocation list) are not reused.
    generation: AtomicU64,
    /// Handshakes in progress at once: a fan-out to many nodes sets up its
    /// connections a bounded number at a time, not all at once.
    handshakes: tokio::sync::Semaphore,
}

/// Most TLS handshakes a coordinator runs at once.
pub(crate) const MAX_HANDSHAKES: usize = 64;

type Built = (Arc<ClientConfig>, Option<(SystemTime, u64)>);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ClientTls {
    /// Reads the PEM files (already resolved paths); each error names the
    /// `[tls]` key and the file.
    pub(crate) fn load(
        ca: &[u8],
        cert: &[u8],
        key: &[u8],
        crl: Option<PathBuf>,
    ) -> Result<ClientTls, SetupError> {
        let tls = |m: String| SetupError::Tls(m);
        let ca_certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(ca)
            .collect::<Result<_, _>>()
            .ok()
            .filter(|c: &Vec<_>| !c.is_empty())
            .ok_or_else(|| tls("tls.ca holds no PEM certificate".into()))?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<_, _>>()
            .ok()
            .filter(|c: &Vec<_>| !c.is_empty())
            .ok_or_else(|| tls("tls.cert holds no PEM certificate".into()))?;
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| tls(format!("tls.key holds no PEM private key: {e}")))?;
        let tls = ClientTls {
            ca_certs,
            chain,
            key,
            crl,
            built: Mutex::new(None),
            generation: AtomicU64::new(0),
            handshakes: tokio::sync::Semaphore::new(MAX_HANDSHAKES),
        };
        *tls.built.lock().unwrap_or_else(|p| p.into_inner()) = Some(tls.build()?);
        Ok(tls)
    }

    /// The configuration with the revocation list as it is now.
    fn build(&self) -> Result<Built, SetupError> {
        let tls = |m: String| SetupError::Tls(m);
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(self.ca_certs.iter().cloned());
        if added == 0 {
            return Err(tls("tls.ca: no usable CA certificate".into()));
        }
        let mut verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        );
        let mut crl_stamp = None;
        if let Some(path) = &self.crl {
            crl_stamp = fedq_pki::crl_stamp(path);
            let crls = fedq_pki::load_crls(path, &self.ca_certs).map_err(|e| tls(e.to_string()))?;
            verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
        }
        let verifier = verifier
            .build()
            .map_err(|e| tls(format!("tls.crl: the revocation list cannot be used: {e}")))?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls(format!("TLS protocol versions: {e}")))?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| {
                tls(format!(
                    "tls.cert and tls.key do not form a usable client identity: {e}"
                ))
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        // Nodes never resume sessions (a resumed session skips their
        // client-certificate check); do not offer to.
        config.resumption = rustls::client::Resumption::disabled();
        Ok((Arc::new(config), crl_stamp))
    }

    /// The configuration to connect with: rebuilt first if the revocation
    /// list's file changed. A list that no longer reads is an error (the
    /// coordinator does not fall back to trusting every node).
    fn config(&self) -> std::io::Result<Arc<ClientConfig>> {
        let current = self.crl.as_deref().and_then(fedq_pki::crl_stamp);
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        match &*built {
            Some((config, s)) if *s == current => Ok(Arc::clone(config)),
            _ => {
                let b = self
                    .build()
                    .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
                let config = Arc::clone(&b.0);
                *built = Some(b);
                self.generation.fetch_add(1, Ordering::SeqCst);
                Ok(config)
            }
        }
    }

    /// The configuration's generation, after rebuilding it if the
    /// revocation list changed; an error if the list no longer reads.
    pub(crate) fn generation(&self) -> std::io::Result<u64> {
        self.config()?;
        Ok(self.generation.load(Ordering::SeqCst))
    }

    /// A TCP connection to `addr` (made within `connect_timeout`) secured
    /// for the node `name`: its certificate must chain to the federation
    /// CA, carry `name`, and not be revoked. The handshake itself is bounded
    /// by the caller's deadline: a node that takes the connection and then
    /// says nothing has timed out, it is not unreachable.
    pub(crate) async fn connect(
        &self,
        addr: &str,
        name: &str,
        connect_timeout: std::time::Duration,
    ) -> std::io::Result<TokioIo<TlsStream<TcpStream>>> {
        let config = self.config()?;
        let _permit = self
            .handshakes
            .acquire()
            .await
            .map_err(|_| std::io::Error::other("the coordinator is shutting down"))?;
        let server = ServerName::try_from(name.to_string()).map_err(|_| {
            std::io::Error::other(format!(
                "the node name {name:?} is not a DNS name or an IP address, so no certificate can carry it"
            ))
        })?;
        let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no TCP connection to {addr} within {connect_timeout:?}"),
                )
            })??;
        tcp.set_nodelay(true)?;
        let tls = TlsConnector::from(config)
            .connect(server, tcp)
            .await
            .map_err(|e| self.explain(e, name))?;
        Ok(TokioIo::new(tls))
    }

    /// A handshake error in words, for the refusals a researcher can act on.
    fn explain(&self, e: std::io::Error, name: &str) -> std::io::Error {
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return e;
        };
        let why = match tls {
            rustls::Error::InvalidCertificate(CertificateError::Revoked) => format!(
                "node {name:?}'s certificate is revoked by the federation's revocation list (tls.crl {}); it is left out",
                self.crl.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
            ),
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
                "node {name:?}'s certificate was not issued by the federation CA in tls.ca"
            ),
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
            | rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                ..
            }) => format!(
                "the certificate served at this endpoint does not carry the node name {name:?}; check the endpoint in the federation file"
            ),
            other => format!("TLS handshake with node {name:?} failed: {other}"),
        };
        std::io::Error::other(why)
    }
}
