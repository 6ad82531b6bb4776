//! Keeping nodes honest about their history: the audit heads a coordinator
//! has seen, pulling a node's audit log, and checking one against the other.
//!
//! Every answer carries the node's latest signed log head. The coordinator
//! appends it to a small local file (the heads file). Later, anyone holding
//! that file and the node's log can check that every head seen is still in
//! the log with the same hash: a node that rewrote or truncated its history
//! after answering is caught. The node's audit public key is pinned in the
//! heads file the first time it is seen (trust on first use).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context};
use fedq_proto::v1::{DescribeRequest, ExportAuditRequest, QueryResponse};
use serde::{Deserialize, Serialize};

use crate::client::{status_failure, Federation, Outcome};

/// Heads kept per node (the oldest are dropped beyond this).
const KEEP: usize = 1000;

/// One head seen in an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenHead {
    /// Sequence number.
    pub seq: u64,
    /// Entry hash (hex).
    pub hash: String,
    /// The node's signature of the hash (hex).
    pub signature: String,
}

/// What the coordinator knows of one node's log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHeads {
    /// The node's audit public key, pinned when first seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// Heads seen, oldest first.
    pub heads: Vec<SeenHead>,
}

/// The heads file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadsFile {
    /// Per node name.
    pub nodes: BTreeMap<String, NodeHeads>,
}

impl HeadsFile {
    /// Reads the file, or an empty one if it does not exist yet.
    pub fn load(path: &Path) -> anyhow::Result<HeadsFile> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{} is not a valid heads file", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HeadsFile::default()),
            Err(e) => Err(anyhow!("cannot read {}: {e}", path.display())),
        }
    }

    /// Writes atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot replace {}", path.display()))?;
        Ok(())
    }

    /// Records the heads carried by query answers.
    pub fn record(&mut self, outcomes: &[Outcome<QueryResponse>]) {
        for o in outcomes {
            if let Ok(Some(h)) = o.result.as_ref().map(|r| r.audit_head.as_ref()) {
                let entry = self.nodes.entry(o.node.clone()).or_default();
                let seen = SeenHead {
                    seq: h.seq,
                    hash: h.hash.clone(),
                    signature: h.signature.clone(),
                };
                if !entry.heads.contains(&seen) {
                    entry.heads.push(seen);
                }
                if entry.heads.len() > KEEP {
                    let excess = entry.heads.len() - KEEP;
                    entry.heads.drain(..excess);
                }
            }
        }
    }
}

/// Records the heads of a query's answers in the federation's heads file.
/// Failing to record is reported, not fatal: the answer is still valid.
pub fn record_heads(fed: &Federation, outcomes: &[Outcome<QueryResponse>]) -> anyhow::Result<()> {
    let path = fed.config.resolve(&fed.config.defaults.heads_file);
    let mut file = HeadsFile::load(&path)?;
    file.record(outcomes);
    file.save(&path)
}

/// Pulls a node's whole audit log (from `since`) as JSON lines, with the
/// node's public key. Needs an auditor certificate the node accepts.
pub async fn pull(
    fed: &Federation,
    node: &str,
    since: u64,
    timeout: Duration,
) -> anyhow::Result<(String, String)> {
    let mut client = fed
        .client(node, timeout)
        .await
        .map_err(|f| anyhow!("{node}: {f}"))?;
    let public_key = client
        .describe(DescribeRequest {})
        .await
        .map_err(|s| anyhow!("{node}: {}", status_failure(s)))?
        .into_inner()
        .audit_public_key;
    let mut stream = client
        .export_audit(ExportAuditRequest { since_seq: since })
        .await
        .map_err(|s| anyhow!("{node}: {}", status_failure(s)))?
        .into_inner();
    let mut text = String::new();
    while let Some(line) = stream
        .message()
        .await
        .map_err(|s| anyhow!("{node}: {}", status_failure(s)))?
    {
        text.push_str(&line.json);
        text.push('\n');
    }
    Ok((text, public_key))
}

/// The verdict on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeadCheck {
    /// Node name.
    pub node: String,
    /// True when the log verifies and contains every head seen.
    pub consistent: bool,
    /// What was checked or what diverged.
    pub detail: String,
}

/// Checks a node's log (`export`, JSON lines) against the heads seen and
/// the pinned key (pinning `public_key` if none was pinned yet).
pub fn check(node: &str, export: &str, public_key: &str, known: &mut NodeHeads) -> HeadCheck {
    let verdict = |consistent: bool, detail: String| HeadCheck {
        node: node.to_string(),
        consistent,
        detail,
    };
    match &known.public_key {
        Some(pinned) if pinned.trim() != public_key.trim() => {
            return verdict(
                false,
                format!("the node's audit key changed: pinned {pinned}, now {public_key}; its history can no longer be trusted"),
            )
        }
        None => known.public_key = Some(public_key.trim().to_string()),
        _ => {}
    }
    let key = match fedq_node::audit::parse_public_key(public_key) {
        Ok(k) => k,
        Err(e) => return verdict(false, format!("unusable public key: {e}")),
    };
    let verified = match fedq_node::audit::verify(export, &key, 0, None) {
        Ok(v) => v,
        Err(e) => return verdict(false, format!("the log does not verify: {e}")),
    };
    // The log verified, so each line is a well-formed entry in order.
    let hashes: std::collections::HashMap<u64, String> = export
        .lines()
        .filter_map(|l| serde_json::from_str::<fedq_node::audit::Entry>(l).ok())
        .map(|e| (e.seq, e.hash))
        .collect();
    for h in &known.heads {
        match hashes.get(&h.seq) {
            Some(hash) if *hash == h.hash => {}
            Some(hash) => {
                return verdict(
                    false,
                    format!(
                    "history was rewritten: head {}:{} seen earlier, the log now has {hash} there",
                    h.seq, h.hash
                ),
                )
            }
            None => {
                return verdict(
                    false,
                    format!(
                        "the log was truncated: it ends before head {}:{} seen earlier",
                        h.seq, h.hash
                    ),
                )
            }
        }
    }
    verdict(
        true,
        format!(
            "{} entries verified; all {} head(s) seen are in the log{}",
            verified.entries,
            known.heads.len(),
            verified
                .last
                .map(|(s, h)| format!("; now at {s}:{}", &h[..16]))
                .unwrap_or_default()
        ),
    )
}
