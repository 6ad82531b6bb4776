//! `federation.toml`: which nodes a researcher queries and with which
//! certificate.
//!
//! Relative paths are resolved against the file's directory.

use std::path::{Path, PathBuf};

use crate::error::SetupError;
use serde::{Deserialize, Serialize};

/// The whole federation file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    /// The researcher's certificate and the CA that signed the nodes'.
    pub tls: ClientTls,
    /// Defaults for calls.
    #[serde(default)]
    pub defaults: Defaults,
    /// The nodes, by name.
    pub nodes: Vec<NodeEntry>,
    /// Directory of the file; relative paths resolve against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `[tls]`: PEM files.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// The federation CA: node certificates must chain to it.
    pub ca: PathBuf,
    /// The researcher's client certificate (its CN is the analyst identity).
    pub cert: PathBuf,
    /// The researcher's private key.
    pub key: PathBuf,
    /// The federation's certificate revocation list (PEM, from `fedq ca
    /// revoke`), if it publishes one: a node whose certificate it revokes
    /// is refused at the handshake and left out, named. Read again when
    /// the file changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
}

/// `[defaults]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Defaults {
    /// Per-node deadline for one call, in seconds.
    pub timeout_secs: f64,
    /// Where the audit heads seen in answers are kept (see `fedq audit check-heads`).
    pub heads_file: PathBuf,
    /// Ask with secure aggregation by default (`fedq query --secure`):
    /// for a federation whose zCDP datasets all allow it.
    pub secure: bool,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            timeout_secs: 30.0,
            heads_file: "fedq-heads.json".into(),
            secure: false,
        }
    }
}

/// `[[nodes]]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// The node's name: the DNS name its certificate must carry.
    pub name: String,
    /// `https://host:port`.
    pub endpoint: String,
}

impl FederationConfig {
    /// Reads and validates a federation file.
    pub fn load(path: &Path) -> Result<FederationConfig, SetupError> {
        let text = std::fs::read_to_string(path).map_err(|source| SetupError::Read {
            what: "federation file",
            path: path.to_path_buf(),
            source,
        })?;
        let bail = |why: String| -> Result<FederationConfig, SetupError> {
            Err(SetupError::Invalid {
                path: path.to_path_buf(),
                why,
            })
        };
        let mut cfg: FederationConfig = match toml::from_str(&text) {
            Ok(c) => c,
            Err(e) => return bail(format!("invalid federation file: {e}")),
        };
        cfg.base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        if cfg.nodes.is_empty() {
            return bail("no [[nodes]] listed".into());
        }
        for (i, n) in cfg.nodes.iter().enumerate() {
            if cfg.nodes[..i].iter().any(|o| o.name == n.name) {
                return bail(format!("node {:?} is listed twice", n.name));
            }
            if !n.endpoint.starts_with("https://") {
                return bail(format!(
                    "node {:?} endpoint {:?} must start with https:// (every connection is mutual TLS)",
                    n.name, n.endpoint
                ));
            }
        }
        if !(cfg.defaults.timeout_secs.is_finite() && cfg.defaults.timeout_secs > 0.0) {
            return bail("defaults.timeout_secs must be a positive number of seconds".into());
        }
        Ok(cfg)
    }

    /// Resolves a path from the file against its directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }
}
