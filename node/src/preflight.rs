//! Everything `fedq-node serve` needs before it serves, checked in one
//! place: `fedq-node check` and `serve` both call [`preflight`], so `check`
//! fails exactly where `serve` would (issue 16, item 6: a garbage key or CA
//! file, a corrupt audit key, a store path that is a file or a schema
//! changed after ingest passed `check` and then stopped `serve`).
//!
//! Every error names the `node.toml` key at fault (`tls.ca`, `audit.key`,
//! `node.store`, a dataset) and the file, and changes nothing. What it
//! does write is what `serve` writes first anyway: the audit public key
//! beside an existing audit key, the high-water mark raised to the log's
//! head ([`crate::backup::raise_high_water`]), and an interrupted ledger
//! write completed ([`fedq_ledger::journal`]). It creates no store and no key:
//! where those are missing it checks that `serve` could create them.
//! Database sources are checked by the caller (`check` and `serve` treat
//! an unreachable database differently: see `NodeState::check_sources`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::NodeConfig;

crate::error::stage_error! {
    /// Why the node cannot start (or `check` fails): the message names the config field at fault.
    PreflightError {
    }
}

impl From<crate::backup::BackupError> for PreflightError {
    fn from(e: crate::backup::BackupError) -> Self {
        PreflightError::Refused(e.to_string())
    }
}

impl From<fedq_ledger::ledger::MeasureError> for PreflightError {
    fn from(e: fedq_ledger::ledger::MeasureError) -> Self {
        PreflightError::Refused(e.to_string())
    }
}

impl From<std::io::Error> for PreflightError {
    fn from(e: std::io::Error) -> Self {
        PreflightError::io("file operation", e)
    }
}

impl From<fedq_ledger::store::StoreError> for PreflightError {
    fn from(e: fedq_ledger::store::StoreError) -> Self {
        PreflightError::Refused(e.to_string())
    }
}

impl From<fedq_audit::AuditError> for PreflightError {
    fn from(e: fedq_audit::AuditError) -> Self {
        PreflightError::Refused(e.to_string())
    }
}

impl From<crate::tls::TlsError> for PreflightError {
    fn from(e: crate::tls::TlsError) -> Self {
        PreflightError::Refused(e.to_string())
    }
}

impl From<crate::config::ConfigError> for PreflightError {
    fn from(e: crate::config::ConfigError) -> Self {
        PreflightError::Refused(e.to_string())
    }
}

/// What [`preflight`] found, for `serve` to use and `check` to print.
pub struct Preflight {
    /// The server's TLS configuration, built and checked
    /// ([`crate::tls::load`]).
    pub tls: crate::tls::ServerTls,
    /// One line per thing checked, for `fedq-node check`.
    pub checked: Vec<String>,
}

/// How much of each embedded dataset [`preflight`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// Compare the schema the rows were ingested under with the declared
    /// one (`serve`, which loads the rows itself right after).
    SchemaOnly,
    /// Also load every row, as `serve` does, so that a damaged store fails
    /// `check` too.
    Load,
}

/// Checks everything `serve` needs before serving; see the module's doc.
pub fn preflight(cfg: &NodeConfig, rows: Rows) -> Result<Preflight, PreflightError> {
    let mut checked = Vec::new();
    let tls = crate::tls::load(cfg)?;
    checked.push(format!(
        "tls: certificate {} for {:?}, its key, and the federation CA {} read and checked",
        cfg.resolve(&cfg.tls.cert).display(),
        cfg.node.name,
        cfg.resolve(&cfg.tls.ca).display()
    ));
    let key = audit_key(cfg, &mut checked)?;
    for d in &cfg.datasets {
        d.schema()
            .map_err(|e| PreflightError::Refused(format!("dataset {:?}: {e}", d.name)))?;
    }
    let dir = cfg.resolve(&cfg.node.store);
    match std::fs::metadata(&dir) {
        Ok(m) if !m.is_dir() => return Err(PreflightError::Refused(format!(
            "node.store: {} is a file, not a directory; point node.store at the store directory (or at a new path, where one is created)",
            dir.display()
        ))),
        Ok(_) => check_store(cfg, &dir, key, rows, &mut checked)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = creatable(&dir).map_err(|e| PreflightError::io(format!("node.store {}", dir.display()), e))?;
            checked.push(format!(
                "node.store: {} does not exist yet; it will be created in {} (nothing ingested)",
                dir.display(),
                parent.display()
            ));
        }
        Err(e) => return Err(PreflightError::Refused(format!("node.store: cannot read {}: {e}", dir.display()))),
    }
    Ok(Preflight { tls, checked })
}

/// Reads the audit key if it exists (the node signs with it); otherwise
/// checks that `serve` can create it.
fn audit_key(
    cfg: &NodeConfig,
    checked: &mut Vec<String>,
) -> Result<Option<fedq_ledger::audit::AuditKey>, PreflightError> {
    let path = cfg.resolve(&cfg.audit.key);
    match std::fs::metadata(&path) {
        Ok(m) if m.is_dir() => Err(PreflightError::Refused(format!(
            "audit.key: {} is a directory, not a key file",
            path.display()
        ))),
        Ok(_) => {
            let key = fedq_ledger::audit::AuditKey::load_or_create(
                &path,
                &cfg.resolve(&cfg.audit.public_key),
            )
            .map_err(|e| PreflightError::io("audit.key", e))?;
            checked.push(format!(
                "audit.key: {} read (public key {})",
                path.display(),
                key.public_hex()
            ));
            Ok(Some(key))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = creatable(&path)
                .map_err(|e| PreflightError::io(format!("audit.key {}", path.display()), e))?;
            checked.push(format!(
                "audit.key: {} does not exist yet; serve creates it in {}",
                path.display(),
                parent.display()
            ));
            Ok(None)
        }
        Err(e) => Err(PreflightError::Refused(format!(
            "audit.key: cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// Opens the existing store as `serve` does and checks what `serve` checks
/// of it before serving, then closes it.
fn check_store(
    cfg: &NodeConfig,
    dir: &Path,
    key: Option<fedq_ledger::audit::AuditKey>,
    rows: Rows,
    checked: &mut Vec<String>,
) -> Result<(), PreflightError> {
    if std::fs::read_dir(dir)
        .map_err(|e| PreflightError::io(format!("node.store: cannot read {}", dir.display()), e))?
        .next()
        .is_none()
    {
        checked.push(format!(
            "node.store: {} is empty; serve creates the store there",
            dir.display()
        ));
        return Ok(());
    }
    let store =
        fedq_ledger::store::Store::open(dir).map_err(|e| PreflightError::io("node.store", e))?;
    for d in cfg.datasets.iter().filter(|d| d.source.is_none()) {
        let schema = d
            .schema()
            .map_err(|e| PreflightError::Refused(format!("dataset {:?}: {e}", d.name)))?;
        if let Some(stored) = store.schema_digest(&d.name)? {
            if stored != schema.digest() {
                return Err(PreflightError::Refused(format!(
                    "dataset {:?}: its columns in node.toml differ from the schema its rows were ingested under (store {}); \
                     restore the previous columns, or translate the stored rows with `fedq-node migrate --config <this file> --previous <the node.toml they were stored under>`",
                    d.name,
                    dir.display()
                )));
            }
        }
        if rows == Rows::Load {
            store.load_table(&d.name, &schema)?;
            checked.push(format!(
                "dataset {:?}: its stored rows load under the declared schema",
                d.name
            ));
        }
    }
    if let Some(key) = key {
        let audit = Arc::new(fedq_ledger::audit::AuditLog::new(store.audit.clone(), key));
        // The audit log's last start entry is readable (serve reads it to
        // log what changed)...
        audit
            .last_limits()
            .map_err(|e| PreflightError::io("the store's audit log", e))?;
        // ... the store was not rolled back below what the node reached ...
        crate::backup::raise_high_water(cfg, &audit)?;
        // ... and no dataset changed its privacy measure.
        let ledger = fedq_ledger::ledger::Ledger::new(store.clone(), audit);
        ledger.check_measures(
            cfg.datasets
                .iter()
                .map(|d| (d.name.as_str(), d.budget.measure)),
        )?;
    }
    checked.push(format!(
        "node.store: {} opened; ledger, audit log and high-water mark checked",
        dir.display()
    ));
    Ok(())
}

/// The nearest existing ancestor of `path`, if it is a directory (so that
/// `serve` can create `path` in it).
fn creatable(path: &Path) -> Result<PathBuf, PreflightError> {
    let mut at = path.parent();
    while let Some(p) = at {
        let p = if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        };
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => return Ok(p.to_path_buf()),
            Ok(_) => {
                return Err(PreflightError::Refused(format!(
                    "cannot be created: {} is a file, not a directory",
                    p.display()
                )))
            }
            Err(_) => at = p.parent(),
        }
    }
    Err(PreflightError::Refused(
        "cannot be created: no parent directory exists".to_string(),
    ))
}
