//! `fedq-pki`: the federation's certificates: creating a federation CA and issuing node and analyst
//! certificates (rcgen), and reading the caller's identity off a verified
//! client certificate (x509-parser).
//!
//! A certificate's subject common name (CN) is the holder's identity and its
//! organizational unit (OU) is its role (`node`, `analyst`, ...). Both come
//! from the CA's signature, never from a request field (DESIGN invariant 8).
//!
//! A node certificate is a server certificate only (serverAuth, its name as
//! the one DNS name unless more are asked for): a stolen node key must not
//! be usable to query other nodes, nor to impersonate `localhost`. Client
//! certificates (analyst, auditor) carry clientAuth only. The CA withdraws a
//! certificate before it expires with a revocation list ([`RevocationList`],
//! `fedq ca revoke`), which nodes load from `[tls] crl`.

#![deny(missing_docs)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Why a certificate, key, request or revocation list could not be read,
/// made or accepted. Each message names the file (and the configuration
/// key, `tls.crl` or `tls.cert`, where there is one) and what to do.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read.
    #[error("{prefix}cannot read {}: {error}", path.display())]
    Read {
        /// The configuration key the file was named by, with `: ` (or
        /// empty).
        prefix: &'static str,
        /// The file.
        path: PathBuf,
        /// The system's error.
        error: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {}: {error}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The system's error.
        error: std::io::Error,
    },
    /// A file could not be replaced by its new version.
    #[error("cannot replace {}: {error}", path.display())]
    Replace {
        /// The file.
        path: PathBuf,
        /// The system's error.
        error: std::io::Error,
    },
    /// The CA's key file holds no private key.
    #[error("{}: not a private key: {error}", path.display())]
    NotAKey {
        /// The key file.
        path: PathBuf,
        /// rcgen's error.
        error: rcgen::Error,
    },
    /// The CA's certificate file holds no CA certificate.
    #[error("{}: not a CA certificate: {error}", path.display())]
    NotACa {
        /// The certificate file.
        path: PathBuf,
        /// rcgen's error.
        error: rcgen::Error,
    },
    /// A certificate signing request does not parse.
    #[error("not a certificate signing request: {0}")]
    NotARequest(rcgen::Error),
    /// Making or signing a certificate or a revocation list failed.
    #[error(transparent)]
    Rcgen(#[from] rcgen::Error),
    /// The CA's revocation record does not parse.
    #[error("{} is not a revocation record: {error}", path.display())]
    NotARecord {
        /// The record (`revoked.json`).
        path: PathBuf,
        /// The parser's error.
        error: serde_json::Error,
    },
    /// The CA's revocation record could not be written out.
    #[error("cannot encode the revocation record: {0}")]
    Encode(serde_json::Error),
    /// Text given as a serial number is not one.
    #[error(
        "{text:?} is neither a certificate file nor a serial number in hex (at most 20 bytes)"
    )]
    Serial {
        /// The text given.
        text: String,
    },
    /// A `tls.crl` file holds no PEM revocation list.
    #[error(
        "tls.crl: {} holds no PEM revocation list (-----BEGIN X509 CRL-----); make one with `fedq ca revoke`",
        path.display()
    )]
    NoCrl {
        /// The file.
        path: PathBuf,
    },
    /// A revocation list in a `tls.crl` file does not parse.
    #[error("tls.crl: {} holds a revocation list that does not parse: {why}", path.display())]
    BadCrl {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        why: String,
    },
    /// A revocation list was not issued by the federation CA.
    #[error("tls.crl: {} was issued by {issuer}, not by the federation CA in tls.ca", path.display())]
    CrlIssuer {
        /// The file.
        path: PathBuf,
        /// The list's issuer, as a distinguished name.
        issuer: String,
    },
    /// The node's certificate is not PEM.
    #[error("tls.cert is not a PEM certificate")]
    NotPem,
    /// The node's certificate is not valid for the node's name.
    #[error(
        "node.name in node.toml is {node_name:?}, but the node's certificate (tls.cert) is valid only for {} (CN {cn:?}); coordinators verify the node by node.name, so every connection would fail. Set node.name to a name the certificate carries, or have the CA issue a certificate for {node_name:?}",
        describe_names(.names)
    )]
    NodeName {
        /// `node.name` in node.toml.
        node_name: String,
        /// The certificate's subject CN.
        cn: String,
        /// The DNS and IP names the certificate is valid for.
        names: Vec<String>,
    },
}

/// The names of [`PkiError::NodeName`], as its message lists them.
fn describe_names(names: &[String]) -> String {
    if names.is_empty() {
        "no name at all (it has no DNS or IP subject alternative name)".to_string()
    } else {
        names
            .iter()
            .map(|n| format!("{n:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Role of a certificate holder, carried in the subject's OU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A partner's node (server certificate).
    Node,
    /// A researcher who queries through the coordinator.
    Analyst,
    /// Someone who may export a node's audit log (when the node lists them).
    Auditor,
}

impl Role {
    /// The OU spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Analyst => "analyst",
            Role::Auditor => "auditor",
        }
    }
}

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone)]
pub struct PemPair {
    /// Certificate, PEM.
    pub cert: String,
    /// Private key (PKCS#8), PEM.
    pub key: String,
}

impl PemPair {
    /// Writes `<stem>.pem` and `<stem>.key` into `dir` (the key readable by
    /// the owner only, from the moment it exists: see [`write_secret`]).
    pub fn write(&self, dir: &Path, stem: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join(format!("{stem}.pem")), &self.cert)?;
        write_secret(&dir.join(format!("{stem}.key")), self.key.as_bytes())
    }
}

/// Writes a secret (a private key) readable and writable by its owner only.
///
/// The file is created with mode 0600 and, if it already existed with a
/// wider mode, narrowed before a byte of the secret is written: writing
/// first and `chmod`ing after leaves a window in which any local user can
/// read the key (issue 16, item 10).
pub fn write_secret(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    #[cfg(unix)]
    {
        // An existing file keeps its old mode through `open`: narrow it on
        // the handle (still empty, truncated above) before writing.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(bytes)?;
    file.sync_all()
}

/// A federation certificate authority held in memory.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate and key, PEM.
    pub pem: PemPair,
}

impl Authority {
    /// Creates a new self-signed CA named `name`.
    pub fn generate(name: &str) -> Result<Authority, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = distinguished(name, "ca");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let pem = PemPair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        };
        Ok(Authority {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// Loads a CA written by [`Authority::save`] (`ca.pem`, `ca.key`).
    pub fn load(dir: &Path) -> Result<Authority, PkiError> {
        let read = |path: PathBuf| {
            std::fs::read_to_string(&path).map_err(|error| PkiError::Read {
                prefix: "",
                path,
                error,
            })
        };
        let cert = read(dir.join("ca.pem"))?;
        let key_pem = read(dir.join("ca.key"))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|error| PkiError::NotAKey {
            path: dir.join("ca.key"),
            error,
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert, key).map_err(|error| PkiError::NotACa {
            path: dir.join("ca.pem"),
            error,
        })?;
        Ok(Authority {
            issuer,
            pem: PemPair { cert, key: key_pem },
        })
    }

    /// Whether this CA signed `cert_pem` (so that listing its serial in
    /// this CA's revocation list means something). The issuer's name is not
    /// enough: every CA made with the default name shares it.
    pub fn is_issuer_of(&self, cert_pem: &str) -> bool {
        let (Some(der), Some(ca_der)) = (der_from_pem(cert_pem), der_from_pem(&self.pem.cert))
        else {
            return false;
        };
        let (Ok((_, cert)), Ok((_, ca))) = (
            X509Certificate::from_der(&der),
            X509Certificate::from_der(&ca_der),
        ) else {
            return false;
        };
        cert.issuer().as_raw() == ca.subject().as_raw()
            && cert.verify_signature(Some(ca.public_key())).is_ok()
    }

    /// Writes `ca.pem` and `ca.key` (owner-only) into `dir`.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        self.pem.write(dir, "ca")
    }

    /// Issues a certificate for `name` in `role`, valid for a year. A node
    /// certificate carries `name` as its only subject alternative name
    /// (coordinators verify the node by that name, whatever address they
    /// dial); see [`Authority::issue_with_names`] for more.
    pub fn issue(&self, role: Role, name: &str) -> Result<PemPair, rcgen::Error> {
        let now = std::time::SystemTime::now();
        let hour = std::time::Duration::from_secs(3600);
        self.issue_between(role, name, now - hour, now + 365 * 24 * hour)
    }

    /// Issues a node certificate valid for `name` and also for `also` (more
    /// DNS names or IP addresses, such as `localhost` when a coordinator
    /// really verifies the node under that name). Nothing but what is asked
    /// for goes in: a certificate valid for `localhost` would let whoever
    /// holds its key impersonate any service on a client's own machine.
    pub fn issue_with_names(
        &self,
        role: Role,
        name: &str,
        also: &[String],
        not_before: std::time::SystemTime,
        not_after: std::time::SystemTime,
    ) -> Result<PemPair, rcgen::Error> {
        let params = leaf_params(role, name, also, not_before, not_after)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(PemPair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// Signs a certificate signing request (the holder keeps its key). The
    /// CA decides the subject: `name` and `role` replace whatever the
    /// request asked for. Returns the certificate, PEM.
    pub fn sign_request(
        &self,
        role: Role,
        name: &str,
        csr_pem: &str,
        days: u32,
    ) -> Result<String, PkiError> {
        self.sign_request_with_names(role, name, &[], csr_pem, days)
    }

    /// [`Authority::sign_request`] for a node also valid for the names in
    /// `also` (see [`Authority::issue_with_names`]).
    pub fn sign_request_with_names(
        &self,
        role: Role,
        name: &str,
        also: &[String],
        csr_pem: &str,
        days: u32,
    ) -> Result<String, PkiError> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(PkiError::NotARequest)?;
        let now = std::time::SystemTime::now();
        let (nb, na) = (
            now - std::time::Duration::from_secs(3600),
            now + std::time::Duration::from_secs(u64::from(days) * 86_400),
        );
        csr.params = leaf_params(role, name, also, nb, na)?;
        Ok(csr.signed_by(&self.issuer)?.pem())
    }

    /// Issues a certificate valid from `not_before` to `not_after` (tests
    /// use it for expired and not-yet-valid certificates).
    pub fn issue_between(
        &self,
        role: Role,
        name: &str,
        not_before: std::time::SystemTime,
        not_after: std::time::SystemTime,
    ) -> Result<PemPair, rcgen::Error> {
        self.issue_with_names(role, name, &[], not_before, not_after)
    }

    /// Signs a revocation list naming every serial in `list`, valid (for
    /// tools that enforce it; nodes do not) for a year. PEM.
    pub fn revocation_list(&self, list: &RevocationList) -> Result<String, PkiError> {
        let now = std::time::SystemTime::now();
        let year = std::time::Duration::from_secs(365 * 86_400);
        let mut revoked_certs = Vec::with_capacity(list.revoked.len());
        for r in &list.revoked {
            let serial = parse_serial(&r.serial)?;
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(r.revoked_at);
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: at.into(),
                reason_code: None,
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: now.into(),
            next_update: (now + year).into(),
            crl_number: SerialNumber::from(list.crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

/// The CA's record of what it revoked (`revoked.json` in the CA directory),
/// from which every revocation list is made: each `fedq ca revoke` adds to
/// it, so a new list never forgets an earlier revocation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationList {
    /// The number of the last list signed (each new list has a larger one).
    pub crl_number: u64,
    /// Revoked certificates, in the order they were revoked.
    pub revoked: Vec<Revoked>,
}

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoked {
    /// Serial number, lowercase hex without leading zero bytes.
    pub serial: String,
    /// The holder's name (CN), when the certificate itself was given.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Its role (OU), when the certificate itself was given.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub role: String,
    /// When it was revoked, seconds since the Unix epoch.
    pub revoked_at: u64,
}

impl RevocationList {
    /// The file inside a CA directory.
    pub const FILE: &'static str = "revoked.json";
    /// The signed list written beside it, to copy to every node's `[tls] crl`.
    pub const CRL_FILE: &'static str = "crl.pem";

    /// Reads `dir/revoked.json`, or an empty list if there is none yet.
    pub fn load(dir: &Path) -> Result<RevocationList, PkiError> {
        let path = dir.join(Self::FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                serde_json::from_str(&text).map_err(|error| PkiError::NotARecord { path, error })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RevocationList::default()),
            Err(error) => Err(PkiError::Read {
                prefix: "",
                path,
                error,
            }),
        }
    }

    /// Adds `serial` (normalised) unless it is already there; returns
    /// whether it was added.
    pub fn add(&mut self, serial: &[u8], name: &str, role: &str) -> bool {
        let serial = serial_hex(serial);
        if self.revoked.iter().any(|r| r.serial == serial) {
            return false;
        }
        let revoked_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.revoked.push(Revoked {
            serial,
            name: name.to_string(),
            role: role.to_string(),
            revoked_at,
        });
        true
    }

    /// Signs a new list with `ca` (the next CRL number) and writes the
    /// record and `crl.pem` into `dir`, each replaced atomically. Returns
    /// the path of `crl.pem`.
    pub fn publish(&mut self, ca: &Authority, dir: &Path) -> Result<PathBuf, PkiError> {
        self.crl_number += 1;
        let pem = ca.revocation_list(self)?;
        let record = serde_json::to_string_pretty(self).map_err(PkiError::Encode)? + "\n";
        replace_file(&dir.join(Self::FILE), record.as_bytes())?;
        let crl = dir.join(Self::CRL_FILE);
        replace_file(&crl, pem.as_bytes())?;
        Ok(crl)
    }
}

/// Writes through a temporary file and a rename, so a node reading the
/// file meanwhile sees the old list or the new one, never half of one.
fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|error| PkiError::Write {
        path: tmp.clone(),
        error,
    })?;
    std::fs::rename(&tmp, path).map_err(|error| PkiError::Replace {
        path: path.to_path_buf(),
        error,
    })
}

/// A serial number as lowercase hex without leading zero bytes (how
/// `revoked.json` and log lines spell it).
pub fn serial_hex(serial: &[u8]) -> String {
    let first = serial.iter().position(|&b| b != 0).unwrap_or(serial.len());
    if first == serial.len() {
        return "00".into();
    }
    hex::encode(&serial[first..])
}

/// Parses a serial number written in hex, with or without `:` separators
/// (as `openssl x509 -serial` and browsers print it).
pub fn parse_serial(text: &str) -> Result<Vec<u8>, PkiError> {
    let digits: String = text
        .trim()
        .trim_start_matches("serial=")
        .chars()
        .filter(|c| *c != ':')
        .collect();
    let digits = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    let bytes = hex::decode(&digits)
        .ok()
        .filter(|b| !b.is_empty() && b.len() <= 20)
        .ok_or_else(|| PkiError::Serial {
            text: text.to_string(),
        })?;
    let first = bytes
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(bytes.len() - 1);
    Ok(bytes[first..].to_vec())
}

/// A random positive serial number (16 bytes). Without one, rcgen derives
/// the serial from the public key, so two certificates for one key (a
/// renewal from the same request) would share it, and revoking one would
/// revoke both.
fn random_serial() -> Result<SerialNumber, rcgen::Error> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|_| rcgen::Error::RingUnspecified)?;
    b[0] = (b[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&b))
}

/// Parameters of a leaf certificate for `name` in `role` (a node's also
/// valid for the names in `also`).
fn leaf_params(
    role: Role,
    name: &str,
    also: &[String],
    not_before: std::time::SystemTime,
    not_after: std::time::SystemTime,
) -> Result<CertificateParams, rcgen::Error> {
    let sans = match role {
        Role::Node => std::iter::once(name.to_string())
            .chain(also.iter().filter(|a| a.as_str() != name).cloned())
            .collect(),
        Role::Analyst | Role::Auditor => vec![],
    };
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name = distinguished(name, role.as_str());
    params.is_ca = IsCa::ExplicitNoCa;
    params.serial_number = Some(random_serial()?);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // One purpose each: a node's certificate only serves, so its key cannot
    // be used to call other nodes as a client.
    params.extended_key_usages = match role {
        Role::Node => vec![ExtendedKeyUsagePurpose::ServerAuth],
        Role::Analyst | Role::Auditor => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    Ok(params)
}

/// A new private key and a certificate signing request for `name`, for a
/// node that keeps its key and sends only the request to the CA.
pub fn key_and_request(name: &str) -> Result<(String, String), rcgen::Error> {
    let mut params = CertificateParams::new(vec![name.to_string()])?;
    params.distinguished_name = distinguished(name, Role::Node.as_str());
    let key = KeyPair::generate()?;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

impl Role {
    /// Parses `node`, `analyst` or `auditor`.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "node" => Some(Role::Node),
            "analyst" => Some(Role::Analyst),
            "auditor" => Some(Role::Auditor),
            _ => None,
        }
    }
}

fn distinguished(cn: &str, ou: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "fedq federation");
    dn.push(DnType::OrganizationalUnitName, ou);
    dn.push(DnType::CommonName, cn);
    dn
}

/// Who is calling, as read from the client certificate the TLS layer has
/// already verified against the federation CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Subject CN.
    pub name: String,
    /// Subject OU (`analyst`, `node`, ...).
    pub role: String,
}

/// A revocation list file's identity for change detection: its
/// modification time and size (node and coordinator read the list again
/// when it changes).
pub fn crl_stamp(path: &Path) -> Option<(std::time::SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Reads a PEM file of revocation lists (`[tls] crl`, in node.toml and
/// federation.toml), each issued by a certificate of `ca_certs` (the
/// federation CA, DER). Each error names `tls.crl` and what to do.
pub fn load_crls(
    path: &Path,
    ca_certs: &[CertificateDer<'static>],
) -> Result<Vec<CertificateRevocationListDer<'static>>, PkiError> {
    let bytes = std::fs::read(path).map_err(|error| PkiError::Read {
        prefix: "tls.crl: ",
        path: path.to_path_buf(),
        error,
    })?;
    let crls: Vec<CertificateRevocationListDer<'static>> =
        CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<_, _>>()
            .ok()
            .filter(|c: &Vec<_>| !c.is_empty())
            .ok_or_else(|| PkiError::NoCrl {
                path: path.to_path_buf(),
            })?;
    let subjects: Vec<Vec<u8>> = ca_certs
        .iter()
        .filter_map(|c| {
            X509Certificate::from_der(c.as_ref())
                .ok()
                .map(|(_, x)| x.subject().as_raw().to_vec())
        })
        .collect();
    for crl in &crls {
        let (_, parsed) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(crl.as_ref())
                .map_err(|e| PkiError::BadCrl {
                    path: path.to_path_buf(),
                    why: e.to_string(),
                })?;
        if !subjects.iter().any(|s| s == parsed.issuer().as_raw()) {
            return Err(PkiError::CrlIssuer {
                path: path.to_path_buf(),
                issuer: parsed.issuer().to_string(),
            });
        }
    }
    Ok(crls)
}

/// The DER bytes of the first certificate in a PEM text.
pub fn der_from_pem(pem: &str) -> Option<Vec<u8>> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .ok()
        .map(|(_, p)| p.contents)
}

/// A certificate's serial number (lowercase hex) and holder, read from PEM
/// text, for `fedq ca revoke`.
pub fn serial_and_holder(pem: &str) -> Option<(Vec<u8>, Caller)> {
    let der = der_from_pem(pem)?;
    let (_, cert) = X509Certificate::from_der(&der).ok()?;
    let caller = caller_from_der(&der)?;
    Some((cert.raw_serial().to_vec(), caller))
}

/// The names a certificate is valid for as a server: its DNS and IP
/// subject alternative names (clients check nothing else; the CN is not a
/// name to TLS).
pub fn server_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            GeneralName::IPAddress(ip) => match ip.len() {
                4 => <[u8; 4]>::try_from(*ip)
                    .ok()
                    .map(|b| std::net::Ipv4Addr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*ip)
                    .ok()
                    .map(|b| std::net::Ipv6Addr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Checks that a node's own certificate (PEM) names `node_name`, the name
/// coordinators verify it by. A node serving a certificate without its
/// name starts, and then every client fails on the name (issue 16, item 6);
/// this check makes `serve` (and `check`) refuse it first, saying what the
/// certificate names and what `node.toml` says.
pub fn check_node_name(cert_pem: &[u8], node_name: &str) -> Result<(), PkiError> {
    let der = std::str::from_utf8(cert_pem)
        .ok()
        .and_then(der_from_pem)
        .ok_or(PkiError::NotPem)?;
    let names = server_names(&der);
    let wanted = node_name.trim_end_matches('.');
    let wanted_ip = wanted.parse::<std::net::IpAddr>().ok();
    let matches = |n: &String| match wanted_ip {
        Some(ip) => n.parse::<std::net::IpAddr>().ok() == Some(ip),
        None => n.eq_ignore_ascii_case(wanted),
    };
    if names.iter().any(matches) {
        return Ok(());
    }
    let cn = caller_from_der(&der).map(|c| c.name).unwrap_or_default();
    Err(PkiError::NodeName {
        node_name: node_name.to_string(),
        cn,
        names,
    })
}

/// Reads CN and OU from a DER certificate.
pub fn caller_from_der(der: &[u8]) -> Option<Caller> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let role = subject
        .iter_organizational_unit()
        .next()
        .and_then(|ou| ou.as_str().ok())
        .unwrap_or("")
        .to_string();
    Some(Caller { name, role })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificate_carries_name_and_role() {
        let ca = Authority::generate("test ca").unwrap();
        let pair = ca.issue(Role::Analyst, "alice@uni").unwrap();
        let der = x509_parser::pem::parse_x509_pem(pair.cert.as_bytes())
            .unwrap()
            .1
            .contents;
        assert_eq!(
            caller_from_der(&der),
            Some(Caller {
                name: "alice@uni".into(),
                role: "analyst".into()
            })
        );
    }

    fn der(pem: &str) -> Vec<u8> {
        der_from_pem(pem).unwrap()
    }

    #[test]
    fn a_node_certificate_serves_only_and_only_under_its_name() {
        let ca = Authority::generate("test ca").unwrap();
        let node = ca.issue(Role::Node, "ngo-north").unwrap();
        let d = der(&node.cert);
        assert_eq!(server_names(&d), vec!["ngo-north".to_string()]);
        let (_, cert) = X509Certificate::from_der(&d).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth, "{eku:?}");
        let analyst = ca.issue(Role::Analyst, "alice").unwrap();
        let ad = der(&analyst.cert);
        let (_, cert) = X509Certificate::from_der(&ad).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth, "{eku:?}");
        assert!(server_names(&der(&analyst.cert)).is_empty());
        // Loopback names only when asked for.
        let now = std::time::SystemTime::now();
        let day = std::time::Duration::from_secs(86_400);
        let local = ca
            .issue_with_names(
                Role::Node,
                "n",
                &["localhost".into(), "127.0.0.1".into()],
                now - day,
                now + day,
            )
            .unwrap();
        assert_eq!(
            server_names(&der(&local.cert)),
            vec!["n".to_string(), "localhost".into(), "127.0.0.1".into()]
        );
        // Two certificates for the same name never share a serial.
        let again = ca.issue(Role::Node, "ngo-north").unwrap();
        assert_ne!(
            serial_and_holder(&node.cert).unwrap().0,
            serial_and_holder(&again.cert).unwrap().0
        );
    }

    #[test]
    fn node_name_must_be_in_the_certificate() {
        let ca = Authority::generate("test ca").unwrap();
        let node = ca.issue(Role::Node, "ngo-north").unwrap();
        check_node_name(node.cert.as_bytes(), "ngo-north").unwrap();
        check_node_name(node.cert.as_bytes(), "NGO-North").unwrap();
        let e = check_node_name(node.cert.as_bytes(), "ngo-south")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"ngo-south\"") && e.contains("\"ngo-north\"") && e.contains("node.name"),
            "{e}"
        );
        let analyst = ca.issue(Role::Analyst, "alice").unwrap();
        let e = check_node_name(analyst.cert.as_bytes(), "alice")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no name at all"), "{e}");
        assert!(check_node_name(b"garbage", "x").is_err());
    }

    #[cfg(unix)]
    #[test]
    fn secrets_are_owner_only_from_the_start_even_over_a_readable_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        write_secret(&path, b"secret").unwrap();
        assert_eq!(mode(&path), 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_secret(&path, b"new secret").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"new secret");
        let ca = Authority::generate("test ca").unwrap();
        ca.save(dir.path()).unwrap();
        assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
    }

    #[test]
    fn revocation_lists_accumulate_and_name_each_serial() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::generate("test ca").unwrap();
        let a = ca.issue(Role::Analyst, "a").unwrap();
        let b = ca.issue(Role::Auditor, "b").unwrap();
        let mut list = RevocationList::load(dir.path()).unwrap();
        for p in [&a, &b] {
            let (serial, who) = serial_and_holder(&p.cert).unwrap();
            assert!(list.add(&serial, &who.name, &who.role));
            assert!(!list.add(&serial, &who.name, &who.role), "once only");
            list.publish(&ca, dir.path()).unwrap();
        }
        let reread = RevocationList::load(dir.path()).unwrap();
        assert_eq!(reread, list);
        assert_eq!(reread.crl_number, 2);
        let pem = std::fs::read_to_string(dir.path().join(RevocationList::CRL_FILE)).unwrap();
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(&p.contents).unwrap();
        let listed: Vec<String> = crl
            .iter_revoked_certificates()
            .map(|r| serial_hex(r.raw_serial()))
            .collect();
        let want: Vec<String> = [&a, &b]
            .iter()
            .map(|p| serial_hex(&serial_and_holder(&p.cert).unwrap().0))
            .collect();
        assert_eq!(listed, want);
    }

    #[test]
    fn serials_parse_with_or_without_colons() {
        assert_eq!(parse_serial("0a:FF").unwrap(), vec![0x0a, 0xff]);
        assert_eq!(parse_serial("serial=00AF").unwrap(), vec![0xaf]);
        assert_eq!(parse_serial("abc").unwrap(), vec![0x0a, 0xbc]);
        assert!(parse_serial("not hex").is_err());
        assert!(parse_serial("").is_err());
        assert_eq!(serial_hex(&[0, 0, 0x8a]), "8a");
        assert_eq!(serial_hex(&[0]), "00");
    }
}
