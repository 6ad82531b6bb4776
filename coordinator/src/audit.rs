//! Keeping nodes honest about their history: the audit heads a coordinator
//! has seen, pulling a node's audit log, and checking one against the other.
//!
//! Every answer carries the node's latest signed log head. The coordinator
//! appends it to a small local file (the heads file). Later, anyone holding
//! that file and the node's log can check that every head seen is still in
//! the log with the same hash: a node that rewrote or truncated its history
//! after answering is caught.
//!
//! The node's audit public key is pinned in the heads file at the node's
//! first answer (trust on first use; DESIGN invariant 9), and from then on
//! every head is checked against it: an answer whose head is not signed by
//! the pinned key is left out and the node named ([`screen_answers`]), and
//! `check-heads` verifies the log with the pinned key, never with the key
//! the node hands over with its log ([`check`]). A node that changed its key
//! (or a log re-signed with another key, content unchanged) is caught.
//! Heads files written before keys were pinned still load; their node's key
//! is pinned at its next answer (or check), and the heads recorded before
//! are checked against it then.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use crate::error::AuditError;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use fedq_proto::v1::{DescribeRequest, ExportAuditRequest, QueryResponse};
use serde::{Deserialize, Serialize};

use crate::client::{status_failure, Failure, Federation, Outcome};

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
    pub fn load(path: &Path) -> Result<HeadsFile, AuditError> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| AuditError::Format {
                path: path.to_path_buf(),
                why: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HeadsFile::default()),
            Err(source) => Err(AuditError::File {
                what: "cannot read",
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Writes atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<(), AuditError> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).expect("heads serialise") + "\n";
        std::fs::write(&tmp, text).map_err(|source| AuditError::File {
            what: "cannot write",
            path: tmp.clone(),
            source,
        })?;
        std::fs::rename(&tmp, path).map_err(|source| AuditError::File {
            what: "cannot replace",
            path: path.to_path_buf(),
            source,
        })
    }

    /// Nodes that answered with a head but have no key pinned yet: their
    /// key must be fetched (Describe) before [`HeadsFile::screen`].
    pub fn unpinned(&self, outcomes: &[Outcome<QueryResponse>]) -> Vec<String> {
        outcomes
            .iter()
            .filter(|o| matches!(&o.result, Ok(r) if r.audit_head.is_some()))
            .filter(|o| {
                self.nodes
                    .get(&o.node)
                    .is_none_or(|n| n.public_key.is_none())
            })
            .map(|o| o.node.clone())
            .collect()
    }

    /// Checks the head of every answer against its node's pinned audit key
    /// and records the heads that verify. A node with no key pinned yet has
    /// the key it presents (`presented`, from its Describe) pinned now,
    /// provided its head and every head recorded for it earlier verify
    /// with it. An answer whose head does not verify with the pinned key is
    /// turned into [`Failure::LeftOut`], naming the node and why: a node
    /// whose key changed cannot prove its history. Returns what to tell
    /// the researcher (keys pinned, answers left out).
    pub fn screen(
        &mut self,
        presented: &HashMap<String, String>,
        outcomes: &mut [Outcome<QueryResponse>],
    ) -> Vec<String> {
        let mut notes = Vec::new();
        for o in outcomes.iter_mut() {
            let Ok(answer) = &o.result else { continue };
            let Some(h) = answer.audit_head.as_ref() else {
                continue;
            };
            let seen = SeenHead {
                seq: h.seq,
                hash: h.hash.clone(),
                signature: h.signature.clone(),
            };
            let entry = self.nodes.entry(o.node.clone()).or_default();
            let problem = match entry.public_key.clone() {
                Some(pinned) => match parse_key(&pinned) {
                    Err(e) => Some(format!("the audit key pinned for it in the heads file is unusable ({e})")),
                    Ok(key) => head_problem(&key, &seen).map(|why| {
                        format!("its audit head {}:{} {why} pinned for it ({}); the node's audit key changed, so its history can no longer be checked", seen.seq, short(&seen.hash), short(&pinned))
                    }),
                },
                None => match presented.get(&o.node).map(|k| (k, parse_key(k))) {
                    None => {
                        notes.push(format!(
                            "{}: its audit key could not be fetched, so it is not pinned yet and this head is not recorded",
                            o.node
                        ));
                        continue;
                    }
                    Some((k, Err(e))) => Some(format!("it presents an unusable audit key {k:?} ({e})")),
                    Some((k, Ok(key))) => {
                        let earlier = entry.heads.iter().chain(std::iter::once(&seen)).find_map(|h| {
                            head_problem(&key, h).map(|why| format!("{}:{} {why}", h.seq, short(&h.hash)))
                        });
                        match earlier {
                            Some(bad) => Some(format!("its audit head {bad} it presents now ({}); its key changed since those heads were recorded", short(k))),
                            None => {
                                notes.push(if entry.heads.is_empty() {
                                    format!("{}: audit key {} pinned at its first answer", o.node, short(k))
                                } else {
                                    format!("{}: audit key {} pinned now (the heads file was written before keys were pinned; its {} earlier head(s) verify with it)", o.node, short(k), entry.heads.len())
                                });
                                entry.public_key = Some(k.trim().to_string());
                                None
                            }
                        }
                    }
                },
            };
            match problem {
                Some(why) => {
                    notes.push(format!("{}: answer left out: {why}", o.node));
                    o.result = Err(Failure::LeftOut(format!(
                        "node {:?}: answer left out: {why}",
                        o.node
                    )));
                }
                None => {
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
        notes
    }
}

/// The first 16 hex characters of a hash or key, for messages.
fn short(hex: &str) -> &str {
    hex.trim().get(..16).unwrap_or(hex.trim())
}

fn parse_key(hex: &str) -> Result<VerifyingKey, fedq_audit::AuditError> {
    fedq_audit::parse_public_key(hex)
}

/// Why `head`'s signature (ed25519 over the 32 hash bytes, as the node
/// signs its log entries) does not verify with `key`, if it does not.
fn head_problem(key: &VerifyingKey, head: &SeenHead) -> Option<&'static str> {
    let Some(hash) = hex::decode(&head.hash).ok().filter(|h| h.len() == 32) else {
        return Some("has a malformed hash, not the 32 bytes signed with the key");
    };
    let Some(sig) = hex::decode(&head.signature)
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .map(|b| Signature::from_bytes(&b))
    else {
        return Some("has a malformed signature, not one made with the key");
    };
    match key.verify(&hash, &sig) {
        Ok(()) => None,
        Err(_) => Some("is not signed with the key"),
    }
}

/// Checks the audit heads of a query's answers against each node's pinned
/// audit key, records them in the federation's heads file, and leaves out
/// (turns into [`Failure::LeftOut`]) every answer whose head is not signed
/// by its node's pinned key. A node without a pinned key (its first answer,
/// or a heads file from before keys were pinned) is asked for its key
/// (Describe) and pinned. This is what the query path calls once the
/// answers are in, before combining them. Returns notes for the
/// researcher; an `Err` means the heads file could not be read or written
/// (the answers are still screened against nothing then: none is left out).
pub async fn screen_answers(
    fed: &Federation,
    outcomes: &mut [Outcome<QueryResponse>],
) -> Result<Vec<String>, AuditError> {
    if !outcomes
        .iter()
        .any(|o| matches!(&o.result, Ok(r) if r.audit_head.is_some()))
    {
        return Ok(Vec::new());
    }
    let path = fed.config.resolve(&fed.config.defaults.heads_file);
    let mut file = HeadsFile::load(&path)?;
    let mut presented = HashMap::new();
    for node in file.unpinned(outcomes) {
        let key = async {
            let mut c = fed.client(&node, fed.default_timeout()).await.ok()?;
            c.describe(DescribeRequest {})
                .await
                .ok()
                .map(|d| d.into_inner().audit_public_key)
        }
        .await;
        if let Some(k) = key {
            presented.insert(node, k);
        }
    }
    let notes = file.screen(&presented, outcomes);
    file.save(&path)?;
    Ok(notes)
}

/// Pulls a node's whole audit log (from `since`) as JSON lines, with the
/// node's public key. Needs an auditor certificate the node accepts.
pub async fn pull(
    fed: &Federation,
    node: &str,
    since: u64,
    timeout: Duration,
) -> Result<(String, String), AuditError> {
    let at = |why: String| AuditError::Node {
        node: node.to_string(),
        why,
    };
    let mut client = fed
        .client(node, timeout)
        .await
        .map_err(|f| at(f.to_string()))?;
    let public_key = client
        .describe(DescribeRequest {})
        .await
        .map_err(|s| at(status_failure(s).to_string()))?
        .into_inner()
        .audit_public_key;
    let mut stream = client
        .export_audit(ExportAuditRequest { since_seq: since })
        .await
        .map_err(|s| at(status_failure(s).to_string()))?
        .into_inner();
    let mut text = String::new();
    while let Some(line) = stream
        .message()
        .await
        .map_err(|s| at(status_failure(s).to_string()))?
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
/// the key pinned for the node. The log is verified with the pinned key
/// only; `public_key` (what the node, or whoever passed the log, says the
/// key is) must equal it. With no key pinned yet (a heads file from before
/// keys were pinned, or a node never queried), `public_key` is pinned now,
/// and the verdict says so.
pub fn check(node: &str, export: &str, public_key: &str, known: &mut NodeHeads) -> HeadCheck {
    let verdict = |consistent: bool, detail: String| HeadCheck {
        node: node.to_string(),
        consistent,
        detail,
    };
    let mut pinned_now = false;
    let pinned = match &known.public_key {
        Some(pinned) if pinned.trim() != public_key.trim() => {
            return verdict(
                false,
                format!("the node's audit key changed: pinned {}, the log comes with {}; a log signed with another key does not prove the history seen", pinned.trim(), public_key.trim()),
            )
        }
        Some(pinned) => pinned.trim().to_string(),
        None => {
            pinned_now = true;
            public_key.trim().to_string()
        }
    };
    let key = match parse_key(&pinned) {
        Ok(k) => k,
        Err(e) => return verdict(false, format!("unusable public key: {e}")),
    };
    // Heads recorded before keys were pinned were never checked: they must
    // verify with the key being pinned, or the key changed since.
    if let Some((h, why)) = known
        .heads
        .iter()
        .find_map(|h| head_problem(&key, h).map(|why| (h, why)))
    {
        return verdict(
            false,
            format!(
                "head {}:{} seen earlier {why} pinned for the node ({}); its key changed",
                h.seq,
                short(&h.hash),
                short(&pinned)
            ),
        );
    }
    if pinned_now {
        known.public_key = Some(pinned.clone());
    }
    let verified = match fedq_audit::verify(export, &key, 0, None) {
        Ok(v) => v,
        Err(e) => {
            return verdict(
                false,
                format!("the log does not verify with the pinned key: {e}"),
            )
        }
    };
    // The log verified, so each line is a well-formed entry in order.
    let hashes: std::collections::HashMap<u64, String> = export
        .lines()
        .filter_map(|l| serde_json::from_str::<fedq_audit::Entry>(l).ok())
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
            "{} entries verified with the pinned key; all {} head(s) seen are in the log{}{}",
            verified.entries,
            known.heads.len(),
            verified
                .last
                .map(|(s, h)| format!("; now at {s}:{}", short(&h)))
                .unwrap_or_default(),
            if pinned_now {
                format!(
                    "; no key was pinned for it yet: pinned {} now",
                    short(&pinned)
                )
            } else {
                String::new()
            }
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};
    use fedq_proto::v1::AuditHead;

    fn head(key: &SigningKey, seq: u64) -> SeenHead {
        let hash = [seq as u8; 32];
        SeenHead {
            seq,
            hash: hex::encode(hash),
            signature: hex::encode(key.sign(&hash).to_bytes()),
        }
    }

    fn answer(node: &str, h: &SeenHead) -> Outcome<QueryResponse> {
        Outcome {
            node: node.into(),
            result: Ok(QueryResponse {
                audit_head: Some(AuditHead {
                    seq: h.seq,
                    hash: h.hash.clone(),
                    signature: h.signature.clone(),
                }),
                ..Default::default()
            }),
            elapsed: Duration::ZERO,
        }
    }

    fn public(key: &SigningKey) -> String {
        hex::encode(key.verifying_key().to_bytes())
    }

    #[test]
    fn the_key_is_pinned_at_the_first_answer_and_another_key_is_left_out() {
        let (a, b) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
        );
        let mut file = HeadsFile::default();
        let presented = HashMap::from([("n".to_string(), public(&a))]);
        let mut first = vec![answer("n", &head(&a, 1))];
        assert_eq!(file.unpinned(&first), vec!["n".to_string()]);
        let notes = file.screen(&presented, &mut first);
        assert!(first[0].result.is_ok());
        assert!(notes[0].contains("pinned at its first answer"), "{notes:?}");
        assert_eq!(
            file.nodes["n"].public_key.as_deref(),
            Some(public(&a).as_str())
        );
        // Later, whatever the node presents, heads are checked against the pin.
        let lying = HashMap::from([("n".to_string(), public(&b))]);
        let mut later = vec![answer("n", &head(&b, 2)), answer("n", &head(&a, 3))];
        assert!(file.unpinned(&later).is_empty());
        let notes = file.screen(&lying, &mut later);
        match &later[0].result {
            Err(Failure::LeftOut(why)) => assert!(why.contains("pinned"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(later[1].result.is_ok());
        assert_eq!(notes.len(), 1, "{notes:?}");
        let seqs: Vec<u64> = file.nodes["n"].heads.iter().map(|h| h.seq).collect();
        assert_eq!(seqs, vec![1, 3], "an unverified head is never recorded");
        // A malformed head is left out too, not recorded.
        let mut bad = vec![answer(
            "n",
            &SeenHead {
                seq: 4,
                hash: "zz".into(),
                signature: "00".into(),
            },
        )];
        file.screen(&lying, &mut bad);
        assert!(matches!(bad[0].result, Err(Failure::LeftOut(_))));
    }

    #[test]
    fn a_heads_file_from_before_pinning_loads_and_is_pinned_at_the_next_answer() {
        let (a, b) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
        );
        // As written before keys were pinned: no public_key field.
        let old = format!(
            r#"{{"nodes":{{"n":{{"heads":[{}]}},"m":{{"heads":[{}]}}}}}}"#,
            serde_json::to_string(&head(&a, 1)).unwrap(),
            serde_json::to_string(&head(&a, 1)).unwrap()
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("heads.json");
        std::fs::write(&path, old).unwrap();
        let mut file = HeadsFile::load(&path).unwrap();
        assert!(file.nodes["n"].public_key.is_none());
        // n presents the key its earlier heads were signed with: pinned, and
        // the note says why now. m presents another key: its earlier heads
        // do not verify with it, so nothing is pinned and its answer is out.
        let presented =
            HashMap::from([("n".to_string(), public(&a)), ("m".to_string(), public(&b))]);
        let mut answers = vec![answer("n", &head(&a, 2)), answer("m", &head(&b, 2))];
        let notes = file.screen(&presented, &mut answers);
        assert!(answers[0].result.is_ok());
        assert!(
            notes
                .iter()
                .any(|n| n.contains("written before keys were pinned")),
            "{notes:?}"
        );
        assert!(matches!(answers[1].result, Err(Failure::LeftOut(_))));
        assert!(file.nodes["m"].public_key.is_none());
        file.save(&path).unwrap();
        let again = HeadsFile::load(&path).unwrap();
        assert_eq!(
            again.nodes["n"].public_key.as_deref(),
            Some(public(&a).as_str())
        );
    }
}
