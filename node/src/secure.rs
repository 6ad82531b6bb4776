//! Secure aggregation on the node's side: the round keys of prepared
//! queries, the checks a Commit's participant set must pass before
//! anything is spent, and the masked noise share a release becomes.
//!
//! The order (see `fedq_secagg` for the protocol):
//!
//! 1. Prepare: the query is validated and its budget reserved as for any
//!    two-phase query; the dataset's policy must allow secure aggregation
//!    and the query must be a rho (zCDP) query. The node makes a fresh
//!    round key, signs it with its certificate key and keeps it in memory
//!    until the reservation expires ([`Rounds`]).
//! 2. Commit with the participant set: before the reservation is debited,
//!    the set must hold at least the dataset's `min_honest` participants,
//!    this node with the key it announced, and every announcement must
//!    check against the federation CA ([`Rounds::check_commit`]). A
//!    release stored for the query id is replayed only to the same set.
//! 3. The release: each measurement's exact values plus a discrete
//!    Gaussian share (OpenDP) whose scale makes the sum of `min_honest`
//!    shares one release of the query's rho (`fedq_dp::distributed`),
//!    masked for the set ([`mask_release`]). The ledger debits the whole
//!    release and the audit log names the set.
//!
//! A node that restarts between Prepare and Commit has lost its round
//! key: its Commit is refused (nothing released), and the reservation is
//! given back by Cancel or when it expires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fedq_dp::mechanism::{Exact, Noise};
use fedq_proto::v1::{QueryResponse, RoundKey as WireKey};
use fedq_secagg::{Announcement, ParticipantSet, Round, RoundKey};
use tonic::Status;

use crate::config::SecureAggregationConfig;
use crate::tls::SecAggIdentity;

/// The mechanism name a masked share is released under.
pub const MECHANISM: &str = "distributed_discrete_gaussian";

/// One prepared secure-aggregation query.
struct OpenRound {
    analyst: String,
    digest: [u8; 32],
    key: Arc<RoundKey>,
    min_honest: u32,
    expires_ms: u64,
}

/// The round keys of this node's prepared secure queries, by query id.
#[derive(Default)]
pub struct Rounds {
    open: Mutex<HashMap<String, OpenRound>>,
}

/// A Commit's participant set, checked: what the release is masked for.
pub struct CheckedRound {
    /// The set.
    pub set: ParticipantSet,
    /// This node's round key.
    pub key: Arc<RoundKey>,
    /// The fewest honest participants the share is calibrated for.
    pub min_honest: u32,
    /// What the audit log records of the round.
    pub logged: fedq_audit::SecureRound,
}

/// A round to open at Prepare: whose, for which query, until when.
pub struct Opening<'a> {
    /// This node's name.
    pub node: &'a str,
    /// The analyst who prepared the query.
    pub analyst: &'a str,
    /// The query id.
    pub query_id: &'a str,
    /// The request's digest (`fedq_proto::query_digest`).
    pub digest: [u8; 32],
    /// The dataset's policy.
    pub policy: &'a SecureAggregationConfig,
    /// When the reservation (and the round key) expires, ms since the epoch.
    pub expires_ms: u64,
}

impl Rounds {
    /// Opens a round: a fresh key, announced under this node's name and
    /// signed with its certificate key; rounds expired by `now_ms` are
    /// forgotten.
    pub fn open(
        &self,
        identity: &SecAggIdentity,
        o: Opening<'_>,
        now_ms: u64,
    ) -> Result<WireKey, Status> {
        let Opening {
            node,
            analyst,
            query_id,
            digest,
            policy,
            expires_ms,
        } = o;
        let key = Arc::new(RoundKey::generate());
        let round = Round {
            query_id,
            request_digest: &digest,
        };
        let a = identity
            .signer
            .announce(round, node, &identity.certificate, &key)
            .map_err(|e| Status::internal(e.to_string()))?;
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|_, r| r.expires_ms > now_ms);
        open.insert(
            query_id.to_string(),
            OpenRound {
                analyst: analyst.to_string(),
                digest,
                key,
                min_honest: policy.min_honest,
                expires_ms,
            },
        );
        Ok(to_wire(&a, policy.min_honest))
    }

    /// Whether `analyst` prepared `query_id` for secure aggregation here
    /// (and the round key is still held).
    pub fn is_open(&self, analyst: &str, query_id: &str) -> bool {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(query_id).is_some_and(|r| r.analyst == analyst)
    }

    /// Checks a Commit's participant set for `query_id` before anything
    /// is spent: the round is open for `analyst`, the set has from
    /// `min_honest` to 64 members, this node (`node`) with the key it
    /// announced among them, and every announcement checks against the
    /// federation CA, the node role, the name and the round.
    pub fn check_commit(
        &self,
        identity: &SecAggIdentity,
        node: &str,
        analyst: &str,
        query_id: &str,
        participants: &[WireKey],
    ) -> Result<CheckedRound, Status> {
        let (digest, key, min_honest) = {
            let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            match open.get(query_id).filter(|r| r.analyst == analyst) {
                Some(r) => (r.digest, Arc::clone(&r.key), r.min_honest),
                None => {
                    return Err(Status::failed_precondition(format!(
                        "no secure-aggregation round is open on this node for query id {query_id:?}: it was not prepared with secure aggregation, its reservation expired, or the node restarted since and its round key is gone; cancel it and ask again (nothing was released)"
                    )))
                }
            }
        };
        if participants.len() < min_honest as usize {
            return Err(Status::failed_precondition(format!(
                "{} participants, fewer than the {min_honest} this node's dataset policy requires (secure_aggregation.min_honest); nothing was released, and the reservation stands until cancelled or expired",
                participants.len()
            )));
        }
        let round = Round {
            query_id,
            request_digest: &digest,
        };
        let members = participants
            .iter()
            .map(from_wire)
            .collect::<Result<Vec<_>, _>>()?;
        let set = ParticipantSet::new(round, members)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !set
            .members()
            .iter()
            .any(|m| m.node == node && m.key == key.public())
        {
            return Err(Status::invalid_argument(format!(
                "the participant set does not list this node ({node}) with the round key it announced; nothing was released"
            )));
        }
        let verifier = identity
            .node_verifier()
            .map_err(|e| Status::internal(e.to_string()))?;
        set.check_all(round, &verifier)
            .map_err(|e| Status::invalid_argument(format!("{e}; nothing was released")))?;
        let logged = fedq_audit::SecureRound {
            participant_set: set.hash_hex(),
            participants: set.members().iter().map(|m| m.node.clone()).collect(),
            min_honest,
        };
        Ok(CheckedRound {
            set,
            key,
            min_honest,
            logged,
        })
    }
}

/// The announcement as the wire carries it.
fn to_wire(a: &Announcement, min_honest: u32) -> WireKey {
    WireKey {
        node: a.node.clone(),
        certificate: a.certificate.clone(),
        key: a.key.to_vec(),
        signature: a.signature.clone(),
        min_honest,
    }
}

fn from_wire(k: &WireKey) -> Result<Announcement, Status> {
    let key: [u8; 32] = k.key.as_slice().try_into().map_err(|_| {
        Status::invalid_argument(format!(
            "participant {}: a round key is 32 bytes, not {}",
            k.node,
            k.key.len()
        ))
    })?;
    Ok(Announcement {
        node: k.node.clone(),
        certificate: k.certificate.clone(),
        key,
        signature: k.signature.clone(),
    })
}

/// Turns `response`'s measurements into masked shares for `round`: per
/// measurement, the exact values plus a discrete Gaussian share (OpenDP)
/// of the scale that makes `min_honest` shares one release of the
/// measurement's rho, then masked for the set. Only called once the debit
/// is durable (the caller holds the ledger's proof).
pub fn mask_release(
    node: &str,
    round: &CheckedRound,
    response: &mut QueryResponse,
    exact: Vec<Exact>,
) -> Result<(), String> {
    for (m, values) in response.measurements.iter_mut().zip(exact) {
        if !(m.rho > 0.0 && m.l2_sensitivity >= 1.0) {
            return Err(format!("{} is not a zCDP measurement", m.label));
        }
        let dim = values.len();
        let share = fedq_dp::distributed::share_scale(
            m.l2_sensitivity as i64,
            m.rho,
            round.min_honest,
            dim,
        )?;
        let noise = Noise::DiscreteGaussian { scale: share };
        let noisy = noise.release(&values)?;
        let clamped: Vec<i64> = noisy
            .iter()
            .map(|&v| {
                v.clamp(
                    -fedq_secagg::MAX_SHARE_MAGNITUDE,
                    fedq_secagg::MAX_SHARE_MAGNITUDE,
                )
            })
            .collect();
        m.masked = round
            .set
            .mask(node, &round.key, &clamped)
            .map_err(|e| e.to_string())?;
        m.values = Vec::new();
        m.mechanism = MECHANISM.into();
        m.scale = share;
        m.noise_variance = noise.variance();
        // One share's interval means nothing; the coordinator states the
        // sum's.
        m.ci95_half_width = 0.0;
    }
    response.participant_set = round.set.hash_hex();
    response.min_honest = round.min_honest;
    Ok(())
}
