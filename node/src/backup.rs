//! Backing up and restoring a stopped node's store without ever handing back
//! spent privacy budget.
//!
//! The budget ledger lives in the store, so restoring an old copy of the store
//! would forget every debit made since the copy was taken: analysts would get
//! spent budget back (DESIGN invariant 3 forbids exactly that gain). Every
//! ledger change is written in the same transaction as the audit entry that
//! records it, so the audit log's head is a faithful clock of the ledger: a
//! store whose log reaches entry N holds every debit made up to N.
//!
//! The **high-water mark** is the highest audit head (sequence number and
//! hash) this node is known to have reached. It lives in a small file next
//! to the store, `<store>.highwater` (outside the store directory, so that
//! replacing the store directory does not roll it back), and is raised by
//! [`backup`], [`restore`] and [`raise_high_water`] (called when the node
//! starts and stops).
//!
//! **Guarantee.** [`restore`] only installs a backup whose signed audit log
//! *contains* both the high-water mark and the current store's head (same
//! sequence number, same hash), verifies the whole chain with the node's
//! audit public key first, and refuses a backup made by another node (a
//! different audit key). A refused restore changes nothing; an accepted one
//! keeps the replaced store directory beside the new one.
//!
//! A backup directory holds `manifest.json` (written last, so an interrupted
//! backup is never restorable), `store/` (a byte copy of the sled directory,
//! taken while this process holds sled's exclusive lock, after a flush) and
//! `keys/` (the audit signing key and its public key: protect the backup like
//! the key itself).

use std::io::Read as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::NodeConfig;
use fedq_ledger::audit::{self, AuditKey, AuditLog, Head};
use fedq_ledger::store::{Store, StoreError, FORMAT_VERSION};

crate::error::stage_error! {
    /// Why a backup, a restore or a high-water check did not happen; the
    /// message says what is wrong and what to do (nothing was changed unless
    /// it says otherwise).
    BackupError {}
}

impl From<std::io::Error> for BackupError {
    fn from(e: std::io::Error) -> Self {
        BackupError::io("file operation", e)
    }
}

impl From<serde_json::Error> for BackupError {
    fn from(e: serde_json::Error) -> Self {
        BackupError::io("JSON", e)
    }
}

impl From<fedq_audit::AuditError> for BackupError {
    fn from(e: fedq_audit::AuditError) -> Self {
        BackupError::Refused(e.to_string())
    }
}

impl From<fedq_ledger::store::StoreError> for BackupError {
    fn from(e: fedq_ledger::store::StoreError) -> Self {
        BackupError::Refused(e.to_string())
    }
}

/// Name of the manifest inside a backup directory.
pub const MANIFEST: &str = "manifest.json";

/// Version of the backup directory layout described in the module docs.
pub const BACKUP_VERSION: u32 = 1;

/// A position in the audit log: the sequence number of an entry and its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// Sequence number of the entry.
    pub seq: u64,
    /// Its hash (hex).
    pub hash: String,
}

impl From<&Head> for Mark {
    fn from(h: &Head) -> Mark {
        Mark {
            seq: h.seq,
            hash: h.hash.clone(),
        }
    }
}

impl std::fmt::Display for Mark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

/// What one analyst spent and was granted on a dataset, at backup time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalystBudget {
    /// Analyst identity (certificate CN).
    pub analyst: String,
    /// Epsilon spent.
    pub spent_epsilon: f64,
    /// Epsilon granted on top of the dataset's per-analyst limit.
    pub granted_epsilon: f64,
}

/// The ledger of one declared dataset, at backup time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetBudget {
    /// Dataset name.
    pub dataset: String,
    /// Epsilon spent by all analysts together.
    pub spent_epsilon: f64,
    /// Per analyst.
    pub analysts: Vec<AnalystBudget>,
}

/// One copied file and its digest, so a damaged backup is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Path relative to the backup directory, with `/` separators.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the contents (hex).
    pub sha256: String,
}

/// `manifest.json`: what a backup holds and how far its ledger had got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`BACKUP_VERSION`] of the layout.
    pub backup_version: u32,
    /// The node's name from node.toml.
    pub node: String,
    /// Version of the fedq-node that wrote the backup.
    pub fedq_node_version: String,
    /// The store's format version ([`FORMAT_VERSION`] of that build).
    pub store_format: u64,
    /// When the backup was taken (UTC).
    pub created_utc: String,
    /// The node's audit public key (hex): a backup only restores onto the
    /// node that made it.
    pub audit_public_key: String,
    /// The audit log's head in the backup (none if the log was empty): the
    /// position the backup's ledger corresponds to.
    pub audit_head: Option<Mark>,
    /// Budget spent per declared dataset, for the operator's information.
    pub ledger: Vec<DatasetBudget>,
    /// Every file of `store/` and `keys/`, with its digest.
    pub files: Vec<FileDigest>,
}

/// What [`backup`] wrote.
#[derive(Debug, Clone)]
pub struct BackupReport {
    /// The backup directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

/// What [`restore`] did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// The restored backup's manifest.
    pub manifest: Manifest,
    /// Where the store that was replaced now lives, if there was one.
    pub replaced: Option<PathBuf>,
    /// Whether the backup's audit key was installed (the node had none).
    pub installed_audit_key: bool,
}

/// The high-water mark file of a node: `<store>.highwater`, beside the store
/// directory.
pub fn high_water_path(config: &NodeConfig) -> PathBuf {
    sibling(&store_dir(config), "highwater")
}

/// Reads the node's high-water mark (none if it was never recorded).
pub fn read_high_water(config: &NodeConfig) -> Result<Option<Mark>, BackupError> {
    let path = high_water_path(config);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
            BackupError::Refused(format!(
                "the high-water mark {} is unreadable ({e}); it must hold {{\"seq\":N,\"hash\":\"...\"}}. \
                 Restore it from a copy, or see deploy/README.md (\"High-water mark\")",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(BackupError::Refused(format!("cannot read the high-water mark {}: {e}", path.display()))),
    }
}

/// Checks that `audit` (the node's log) has not fallen behind the node's
/// high-water mark, then raises the mark to its head.
///
/// Call it when the node starts (after opening the store) and when it stops:
/// an error at start means the store was rolled back or replaced behind the
/// node's back (an old copy would hand back spent budget), and the node must
/// not serve from it. The log must contain the mark's entry with the mark's
/// hash; a longer log raises the mark. An empty log with no mark is fine.
pub fn raise_high_water(config: &NodeConfig, audit: &AuditLog) -> Result<(), BackupError> {
    let head = audit.head()?.as_ref().map(Mark::from);
    let mark = read_high_water(config)?;
    if let Some(mark) = &mark {
        check_contains(audit, head.as_ref(), mark).map_err(|why| {
            BackupError::Refused(format!(
                "store {}: {why}. The node has reached audit entry {} before (high-water mark in {}), \
                 so this store was rolled back or replaced, and serving from it would hand back spent \
                 privacy budget. Restore the latest backup with `fedq-node restore`; see deploy/README.md",
                store_dir(config).display(),
                mark.seq,
                high_water_path(config).display()
            ))
        })?;
    }
    match (head, mark) {
        (Some(h), Some(m)) if h.seq <= m.seq => Ok(()),
        (Some(h), _) => write_high_water(config, &h),
        (None, _) => Ok(()),
    }
}

/// Copies a stopped node's store, audit key and a manifest into `out`, which
/// must not exist or be empty. Raises the high-water mark to the store's head.
pub fn backup(config: &NodeConfig, out: &Path) -> Result<BackupReport, BackupError> {
    if out.exists() {
        let mut entries = std::fs::read_dir(out)
            .map_err(|e| BackupError::io(format!("cannot read {}", out.display()), e))?;
        if entries.next().is_some() {
            return Err(BackupError::Refused(format!(
                "{} is not empty; give a new directory for each backup (e.g. one named by date)",
                out.display()
            )));
        }
    }
    let dir = store_dir(config);
    if !dir.exists() {
        return Err(BackupError::Refused(format!(
            "store {} does not exist: nothing to back up (check node.store in node.toml)",
            dir.display()
        )));
    }
    let store = open_stopped(&dir)?;
    let audit = crate::service::open_audit(config, &store)
        .map_err(|e| BackupError::io("opening the audit log", e))?;
    let head = audit.head()?.as_ref().map(Mark::from);
    let audit_public_key = audit.key.public_hex();
    let ledger = fedq_ledger::ledger::Ledger::new(store.clone(), std::sync::Arc::new(audit));
    let mut budgets = Vec::new();
    for d in &config.datasets {
        let analysts: Vec<AnalystBudget> = ledger
            .analysts(&d.name)?
            .into_iter()
            .map(|(analyst, spent, granted)| AnalystBudget {
                analyst,
                spent_epsilon: spent,
                granted_epsilon: granted,
            })
            .collect();
        budgets.push(DatasetBudget {
            dataset: d.name.clone(),
            spent_epsilon: analysts.iter().map(|a| a.spent_epsilon).sum(),
            analysts,
        });
    }
    store
        .flush()
        .map_err(|e| BackupError::io("flushing the store before copying it", e))?;
    std::fs::create_dir_all(out)
        .map_err(|e| BackupError::io(format!("cannot create {}", out.display()), e))?;
    // The store stays open (and so locked) while it is copied: no node can
    // start on it and write half-way through the copy.
    let mut files = Vec::new();
    copy_tree(&dir, &out.join("store"), "store", &mut files)?;
    let keys = out.join("keys");
    std::fs::create_dir_all(&keys)
        .map_err(|e| BackupError::io(format!("cannot create {}", keys.display()), e))?;
    for (from, name) in [
        (config.resolve(&config.audit.key), "audit.key"),
        (config.resolve(&config.audit.public_key), "audit.pub"),
    ] {
        if name == "audit.key" {
            // The secret is owner-only from its first byte, whatever the
            // mode of the file it comes from.
            copy_secret(&from, &keys.join(name), &format!("keys/{name}"), &mut files)?;
        } else {
            copy_file(&from, &keys.join(name), &format!("keys/{name}"), &mut files)?;
        }
    }
    drop(ledger);
    drop(store);
    let manifest = Manifest {
        backup_version: BACKUP_VERSION,
        node: config.node.name.clone(),
        fedq_node_version: env!("CARGO_PKG_VERSION").into(),
        store_format: FORMAT_VERSION,
        created_utc: fedq_audit::report::utc(now_ms()),
        audit_public_key,
        audit_head: head.clone(),
        ledger: budgets,
        files,
    };
    write_durably(
        &out.join(MANIFEST),
        (serde_json::to_string_pretty(&manifest)? + "\n").as_bytes(),
    )?;
    if let Some(h) = &head {
        if read_high_water(config)?.is_none_or(|m| m.seq < h.seq) {
            write_high_water(config, h)?;
        }
    }
    Ok(BackupReport {
        dir: out.to_path_buf(),
        manifest,
    })
}

/// Replaces a stopped node's store with the backup in `from`, or refuses
/// (changing nothing) when the backup is damaged, was made by another node,
/// by an incompatible build, or is older than what the node has reached.
pub fn restore(config: &NodeConfig, from: &Path) -> Result<RestoreReport, BackupError> {
    let manifest = read_manifest(from)?;
    if manifest.backup_version != BACKUP_VERSION {
        return Err(BackupError::Refused(format!(
            "{}: backup layout version {} is not {BACKUP_VERSION}, the one this fedq-node reads; \
             restore it with the fedq-node version that wrote it ({}); nothing was changed",
            from.display(),
            manifest.backup_version,
            manifest.fedq_node_version
        )));
    }
    if manifest.store_format != FORMAT_VERSION {
        return Err(BackupError::Refused(format!(
            "{}: the backed-up store has format version {}, this build reads version {FORMAT_VERSION}; \
             restore it with fedq-node {} (which wrote it), then upgrade as deploy/README.md describes; \
             nothing was changed",
            from.display(),
            manifest.store_format,
            manifest.fedq_node_version
        )));
    }
    check_files(from, &manifest)?;
    let backup_key =
        AuditKey::load_or_create(&from.join("keys/audit.key"), &from.join("keys/audit.pub"))?;
    if backup_key.public_hex() != manifest.audit_public_key {
        return Err(BackupError::Refused(format!(
            "{}: keys/audit.key does not match the manifest's audit public key; the backup is damaged; \
             nothing was changed",
            from.display()
        )));
    }
    let node_key = node_public_key(config)?;
    if let Some(node_key) = &node_key {
        if *node_key != manifest.audit_public_key {
            return Err(BackupError::Refused(format!(
                "{}: this backup was made by a node with audit public key {}, but this node's key ({}) is {node_key}: \
                 it is another node's backup (manifest node name {:?}). Restore a backup of this node; \
                 nothing was changed",
                from.display(),
                manifest.audit_public_key,
                config.resolve(&config.audit.public_key).display(),
                manifest.node
            )));
        }
    }

    let dir = store_dir(config);
    let mut marks: Vec<(Mark, String)> = Vec::new();
    if let Some(m) = read_high_water(config)? {
        marks.push((
            m,
            format!(
                "the high-water mark in {}",
                high_water_path(config).display()
            ),
        ));
    }
    if dir.exists() {
        let current = open_stopped(&dir).map_err(|e| {
            BackupError::Refused(format!(
                "{e:#}\nIf the store is damaged, move it aside (e.g. `mv {0} {0}.damaged`) and run restore again; \
                 the high-water mark still protects the ledger. Nothing was changed",
                dir.display()
            ))
        })?;
        let log = AuditLog::new(
            current.audit.clone(),
            AuditKey::load_or_create(&from.join("keys/audit.key"), &from.join("keys/audit.pub"))?,
        );
        if let Some(h) = log.head()? {
            marks.push((
                Mark::from(&h),
                format!("the current store {}", dir.display()),
            ));
        }
    }
    let backup_seq = manifest.audit_head.as_ref().map(|h| h.seq);
    for (mark, source) in &marks {
        if backup_seq.is_none_or(|s| s < mark.seq) {
            return Err(BackupError::Refused(format!(
                "refused: this backup ({}) ends at audit entry {}, but the node has already reached entry {} \
                 ({source}). Restoring it would hand back the privacy budget spent since. \
                 Use a backup taken at or after entry {}; nothing was changed",
                from.display(),
                backup_seq.map_or("(empty log)".to_string(), |s| s.to_string()),
                mark.seq,
                mark.seq
            )));
        }
    }

    let staging = sibling(&dir, "restoring");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| {
            BackupError::io(
                format!(
                    "cannot remove {}, left by an interrupted restore",
                    staging.display()
                ),
                e,
            )
        })?;
    }
    let staged = stage(from, &manifest, &staging, backup_key, &marks);
    if let Err(e) = staged {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }

    let replaced = if dir.exists() {
        let aside = sibling(&dir, &format!("before-restore-{}", now_ms()));
        std::fs::rename(&dir, &aside).map_err(|e| {
            BackupError::io(
                format!("cannot move the current store {} aside", dir.display()),
                e,
            )
        })?;
        Some(aside)
    } else {
        None
    };
    std::fs::rename(&staging, &dir).map_err(|e| {
        BackupError::io(
            format!("cannot move the restored store into {}", dir.display()),
            e,
        )
    })?;
    sync_parent(&dir)?;
    let key_path = config.resolve(&config.audit.key);
    let installed_audit_key = !key_path.exists();
    if installed_audit_key {
        install_secret(&from.join("keys/audit.key"), &key_path)?;
        install(
            &from.join("keys/audit.pub"),
            &config.resolve(&config.audit.public_key),
        )?;
    }
    if let Some(h) = &manifest.audit_head {
        if read_high_water(config)?.is_none_or(|m| m.seq < h.seq) {
            write_high_water(config, h)?;
        }
    }
    Ok(RestoreReport {
        manifest,
        replaced,
        installed_audit_key,
    })
}

/// Copies the backup's store into `staging`, opens it, and checks that its
/// log verifies with the backup's key, ends at the manifest's head and
/// contains every mark.
fn stage(
    from: &Path,
    manifest: &Manifest,
    staging: &Path,
    key: AuditKey,
    marks: &[(Mark, String)],
) -> Result<(), BackupError> {
    for f in manifest
        .files
        .iter()
        .filter(|f| f.path.starts_with("store/"))
    {
        let target = staging.join(&f.path["store/".len()..]);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| BackupError::io(format!("cannot create {}", parent.display()), e))?;
        }
        std::fs::copy(from.join(&f.path), &target).map_err(|e| {
            BackupError::io(format!("cannot copy {} to {}", f.path, target.display()), e)
        })?;
    }
    let store = Store::open(staging)?;
    let public = audit::parse_public_key(&key.public_hex())?;
    let log = AuditLog::new(store.audit.clone(), key);
    let head = log.head()?.as_ref().map(Mark::from);
    if head != manifest.audit_head {
        return Err(BackupError::Refused(format!(
            "{}: the backed-up store's audit head differs from the manifest's; the backup is damaged; nothing was changed",
            from.display()
        )));
    }
    let mut export = String::new();
    for e in log.entries(0) {
        export.push_str(&serde_json::to_string(&e?)?);
        export.push('\n');
    }
    audit::verify(&export, &public, 0, None).map_err(|e| {
        BackupError::Refused(format!(
            "{}: the backed-up audit log does not verify ({e}); the backup is damaged; nothing was changed",
            from.display()
        ))
    })?;
    for (mark, source) in marks {
        check_contains(&log, head.as_ref(), mark).map_err(|why| {
            BackupError::Refused(format!(
                "refused: {}: {why}, which {source} recorded: the backup is not part of this node's history \
                 (a copy from before a rollback, or another store); nothing was changed",
                from.display()
            ))
        })?;
    }
    drop(log);
    store.flush()?;
    Ok(())
}

/// Whether `log` (whose head is `head`) contains the entry `mark`.
fn check_contains(log: &AuditLog, head: Option<&Mark>, mark: &Mark) -> Result<(), String> {
    match head {
        None => {
            return Err(format!(
                "its audit log is empty, but it should contain entry {}",
                mark.seq
            ))
        }
        Some(h) if h.seq < mark.seq => {
            return Err(format!(
                "its audit log ends at entry {}, before entry {}",
                h.seq, mark.seq
            ))
        }
        Some(_) => {}
    }
    match log.entries(mark.seq).next() {
        Some(Ok(e)) if e.seq == mark.seq && e.hash == mark.hash => Ok(()),
        Some(Ok(e)) if e.seq == mark.seq => Err(format!(
            "its audit entry {} has hash {}, not {}",
            mark.seq, e.hash, mark.hash
        )),
        Some(Err(e)) => Err(format!("its audit entry {} is unreadable: {e}", mark.seq)),
        _ => Err(format!("its audit log has no entry {}", mark.seq)),
    }
}

/// The node's audit public key (hex), if it has one yet.
fn node_public_key(config: &NodeConfig) -> Result<Option<String>, BackupError> {
    let key_path = config.resolve(&config.audit.key);
    let pub_path = config.resolve(&config.audit.public_key);
    if key_path.exists() {
        return Ok(Some(
            AuditKey::load_or_create(&key_path, &pub_path)?.public_hex(),
        ));
    }
    match std::fs::read_to_string(&pub_path) {
        Ok(text) => Ok(Some(text.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(BackupError::Refused(format!(
            "cannot read {}: {e}",
            pub_path.display()
        ))),
    }
}

/// Reads and parses `manifest.json`.
fn read_manifest(from: &Path) -> Result<Manifest, BackupError> {
    let path = from.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        BackupError::Refused(format!(
            "{} is not a complete fedq-node backup: cannot read {} ({e}); an interrupted backup has no manifest. \
             Use another backup; nothing was changed",
            from.display(),
            path.display()
        ))
    })?;
    serde_json::from_str(&text).map_err(|e| {
        BackupError::Refused(format!(
            "{}: not a fedq-node backup manifest ({e}); nothing was changed",
            path.display()
        ))
    })
}

/// Checks every file the manifest lists against its size and digest.
fn check_files(from: &Path, manifest: &Manifest) -> Result<(), BackupError> {
    for f in &manifest.files {
        let safe = Path::new(&f.path)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !safe {
            return Err(BackupError::Refused(format!(
                "{}: the manifest lists {:?}, which is outside the backup; refused, nothing was changed",
                from.display(),
                f.path
            )));
        }
        let (bytes, sha256) = digest(&from.join(&f.path)).map_err(|e| {
            BackupError::Refused(format!(
                "{}: {e:#}; the backup is incomplete; nothing was changed",
                from.display()
            ))
        })?;
        if bytes != f.bytes || sha256 != f.sha256 {
            return Err(BackupError::Refused(format!(
                "{}: {} differs from the manifest (size or SHA-256); the backup is damaged; nothing was changed",
                from.display(),
                f.path
            )));
        }
    }
    for needed in ["keys/audit.key", "keys/audit.pub"] {
        if !manifest.files.iter().any(|f| f.path == needed) {
            return Err(BackupError::Refused(format!(
                "{}: the manifest does not list {needed}; the backup is incomplete; nothing was changed",
                from.display()
            )));
        }
    }
    Ok(())
}

/// Opens the store of a stopped node, saying so clearly when it is running.
fn open_stopped(dir: &Path) -> Result<Store, BackupError> {
    Store::open(dir).map_err(|e| match e {
        StoreError::Locked { .. } => BackupError::Refused(format!(
            "store {} is in use: stop the node first (e.g. `systemctl stop fedq-node`), then run this again; \
             nothing was changed",
            dir.display()
        )),
        e => e.into(),
    })
}

/// The store directory, without a trailing separator.
fn store_dir(config: &NodeConfig) -> PathBuf {
    config
        .resolve(&config.node.store)
        .components()
        .collect::<PathBuf>()
}

/// `<path>.<suffix>`, beside `path`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

fn write_high_water(config: &NodeConfig, mark: &Mark) -> Result<(), BackupError> {
    write_durably(
        &high_water_path(config),
        (serde_json::to_string(mark)? + "\n").as_bytes(),
    )
}

/// Writes `path` through a temporary file, an fsync and a rename, so a crash
/// leaves the old contents or the new, never a torn file.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    use std::io::Write as _;
    let tmp = sibling(path, "tmp");
    let mut f = std::fs::File::create(&tmp)
        .map_err(|e| BackupError::io(format!("cannot write {}", tmp.display()), e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| BackupError::io(format!("cannot write {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| BackupError::io(format!("cannot write {}", path.display()), e))?;
    sync_parent(path)
}

/// Makes a rename in `path`'s directory durable.
fn sync_parent(path: &Path) -> Result<(), BackupError> {
    #[cfg(unix)]
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| BackupError::io(format!("cannot sync {}", parent.display()), e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Copies a directory of regular files and directories, recording digests.
fn copy_tree(
    from: &Path,
    to: &Path,
    rel: &str,
    files: &mut Vec<FileDigest>,
) -> Result<(), BackupError> {
    std::fs::create_dir_all(to)
        .map_err(|e| BackupError::io(format!("cannot create {}", to.display()), e))?;
    let mut entries = std::fs::read_dir(from)
        .map_err(|e| BackupError::io(format!("cannot read {}", from.display()), e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BackupError::io(format!("cannot read {}", from.display()), e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let name_str = name.to_str().ok_or_else(|| {
            BackupError::Refused(format!(
                "{}: file name {name:?} is not UTF-8; the store directory holds a foreign file",
                from.display()
            ))
        })?;
        let kind = entry.file_type()?;
        let child_rel = format!("{rel}/{name_str}");
        if kind.is_dir() {
            copy_tree(&entry.path(), &to.join(&name), &child_rel, files)?;
        } else if kind.is_file() {
            copy_file(&entry.path(), &to.join(&name), &child_rel, files)?;
        } else {
            return Err(BackupError::Refused(format!(
                "{}: neither a file nor a directory; the store directory must hold only sled's files",
                entry.path().display()
            )));
        }
    }
    Ok(())
}

fn copy_file(
    from: &Path,
    to: &Path,
    rel: &str,
    files: &mut Vec<FileDigest>,
) -> Result<(), BackupError> {
    std::fs::copy(from, to).map_err(|e| {
        BackupError::io(
            format!("cannot copy {} to {}", from.display(), to.display()),
            e,
        )
    })?;
    std::fs::File::open(to)
        .and_then(|f| f.sync_all())
        .map_err(|e| BackupError::io(format!("cannot sync {}", to.display()), e))?;
    let (bytes, sha256) = digest(to)?;
    files.push(FileDigest {
        path: rel.to_string(),
        bytes,
        sha256,
    });
    Ok(())
}

/// Copies a key file into place durably.
fn install(from: &Path, to: &Path) -> Result<(), BackupError> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| BackupError::io(format!("cannot create {}", dir.display()), e))?;
    }
    let bytes = std::fs::read(from)
        .map_err(|e| BackupError::io(format!("cannot read {}", from.display()), e))?;
    write_durably(to, &bytes)
}

/// Copies a secret (the audit key) into a backup, owner-only from its
/// first byte ([`fedq_pki::write_secret`]), recording its digest.
fn copy_secret(
    from: &Path,
    to: &Path,
    rel: &str,
    files: &mut Vec<FileDigest>,
) -> Result<(), BackupError> {
    let bytes = std::fs::read(from)
        .map_err(|e| BackupError::io(format!("cannot read {}", from.display()), e))?;
    fedq_pki::write_secret(to, &bytes)
        .map_err(|e| BackupError::io(format!("cannot write {}", to.display()), e))?;
    let (bytes, sha256) = digest(to)?;
    files.push(FileDigest {
        path: rel.to_string(),
        bytes,
        sha256,
    });
    Ok(())
}

/// Copies a secret into place durably (a temporary file created
/// owner-only, an fsync, a rename): never readable by others, not even
/// between the write and a `chmod`.
fn install_secret(from: &Path, to: &Path) -> Result<(), BackupError> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| BackupError::io(format!("cannot create {}", dir.display()), e))?;
    }
    let bytes = std::fs::read(from)
        .map_err(|e| BackupError::io(format!("cannot read {}", from.display()), e))?;
    let tmp = sibling(to, "tmp");
    fedq_pki::write_secret(&tmp, &bytes)
        .map_err(|e| BackupError::io(format!("cannot write {}", tmp.display()), e))?;
    std::fs::rename(&tmp, to)
        .map_err(|e| BackupError::io(format!("cannot write {}", to.display()), e))?;
    sync_parent(to)
}

/// Size and SHA-256 of a file.
fn digest(path: &Path) -> Result<(u64, String), BackupError> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| BackupError::io(format!("cannot read {}", path.display()), e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| BackupError::io(format!("cannot read {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((bytes, hex::encode(h.finalize())))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
