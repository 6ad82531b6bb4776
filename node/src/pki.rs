//! Certificates: creating a federation CA and issuing node and analyst
//! certificates (rcgen), and reading the caller's identity off a verified
//! client certificate (x509-parser).
//!
//! A certificate's subject common name (CN) is the holder's identity and its
//! organizational unit (OU) is its role (`node`, `analyst`, ...). Both come
//! from the CA's signature, never from a request field (DESIGN invariant 8).

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use x509_parser::prelude::{FromDer, X509Certificate};

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
    /// the owner only).
    pub fn write(&self, dir: &Path, stem: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join(format!("{stem}.pem")), &self.cert)?;
        let key_path = dir.join(format!("{stem}.key"));
        std::fs::write(&key_path, &self.key)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    }
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
    pub fn load(dir: &Path) -> anyhow::Result<Authority> {
        use anyhow::Context;
        let cert = std::fs::read_to_string(dir.join("ca.pem"))
            .with_context(|| format!("cannot read {}", dir.join("ca.pem").display()))?;
        let key_pem = std::fs::read_to_string(dir.join("ca.key"))
            .with_context(|| format!("cannot read {}", dir.join("ca.key").display()))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| {
            anyhow::anyhow!("{}: not a private key: {e}", dir.join("ca.key").display())
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert, key).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a CA certificate: {e}",
                dir.join("ca.pem").display()
            )
        })?;
        Ok(Authority {
            issuer,
            pem: PemPair { cert, key: key_pem },
        })
    }

    /// Writes `ca.pem` and `ca.key` (owner-only) into `dir`.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        self.pem.write(dir, "ca")
    }

    /// Issues a certificate for `name` in `role`, valid for a year. Node
    /// certificates carry `name`, `localhost` and the loopback addresses as
    /// subject alternative names, so coordinators can verify them by name.
    pub fn issue(&self, role: Role, name: &str) -> Result<PemPair, rcgen::Error> {
        let now = std::time::SystemTime::now();
        let hour = std::time::Duration::from_secs(3600);
        self.issue_between(role, name, now - hour, now + 365 * 24 * hour)
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
    ) -> anyhow::Result<String> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| anyhow::anyhow!("not a certificate signing request: {e}"))?;
        let now = std::time::SystemTime::now();
        let (nb, na) = (
            now - std::time::Duration::from_secs(3600),
            now + std::time::Duration::from_secs(u64::from(days) * 86_400),
        );
        csr.params = leaf_params(role, name, nb, na)?;
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
        let params = leaf_params(role, name, not_before, not_after)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(PemPair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

/// Parameters of a leaf certificate for `name` in `role`.
fn leaf_params(
    role: Role,
    name: &str,
    not_before: std::time::SystemTime,
    not_after: std::time::SystemTime,
) -> Result<CertificateParams, rcgen::Error> {
    let sans = match role {
        Role::Node => vec![
            name.to_string(),
            "localhost".into(),
            "127.0.0.1".into(),
            "::1".into(),
        ],
        Role::Analyst | Role::Auditor => vec![],
    };
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name = distinguished(name, role.as_str());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match role {
        Role::Node => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
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

/// The DER bytes of the first certificate in a PEM text.
pub fn der_from_pem(pem: &str) -> Option<Vec<u8>> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .ok()
        .map(|(_, p)| p.contents)
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
}
