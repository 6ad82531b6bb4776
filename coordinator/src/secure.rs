//! Secure aggregation on the coordinator's side: relay the nodes' round
//! keys, add up their masked shares, and hand the combination the sum.
//!
//! The coordinator never sees a node's value: each answer carries the
//! node's values plus its noise share plus pairwise masks, modulo 2^64
//! (`fedq_secagg`); only the sum over the whole participant set is in the
//! clear. So the round is all or nothing: if one participant's share is
//! missing or fails the checks, no sum can be formed, and the others'
//! shares are discarded (their releases are spent on their ledgers; a
//! retry must use a new query id, since a node answers a query id for one
//! participant set only).
//!
//! The sum's noise is the sum of every participant's discrete Gaussian
//! share. The combination ([`crate::combine`]) adds per-node noises
//! already, so after the sum is formed each answer states its own share's
//! scale and the first carries the sum (the others zeros): the interval
//! is that of the sum of the shares, exactly.

use fedq_dp::mechanism::{Noise, CI_ALPHA};
use fedq_proto::v1::{Measurement, PrepareResponse, QueryRequest, QueryResponse, RoundKey};
use fedq_secagg::{Announcement, ParticipantSet, Round};

use crate::client::{Failure, Outcome};

/// The mechanism name of a masked share.
pub const MECHANISM: &str = "distributed_discrete_gaussian";

/// The round the coordinator relays: every participant's key, and the
/// hash of the set every answer must be masked for.
pub struct Relay {
    /// Every accepted node's round key (sent with each Commit).
    pub participants: Vec<RoundKey>,
    /// The set's hash, hex (`fedq_secagg::ParticipantSet::hash`).
    pub set_hash: String,
    /// The largest `min_honest` any participant relies on.
    pub min_honest: u32,
}

/// The relay of `request`'s round from the nodes' Prepare answers
/// (`(node, answer)`); an error names a node that sent no usable key.
pub fn relay(
    request: &QueryRequest,
    prepared: &[(String, PrepareResponse)],
) -> Result<Relay, String> {
    let mut participants = Vec::new();
    let mut members = Vec::new();
    for (node, p) in prepared {
        let k = p.round_key.clone().ok_or_else(|| {
            format!("node {node:?} accepted the query without a round key: it does not do secure aggregation")
        })?;
        let key: [u8; 32] = k.key.as_slice().try_into().map_err(|_| {
            format!(
                "node {node:?} sent a round key of {} bytes, not 32",
                k.key.len()
            )
        })?;
        members.push(Announcement {
            node: k.node.clone(),
            certificate: k.certificate.clone(),
            key,
            signature: k.signature.clone(),
        });
        participants.push(k);
    }
    let digest = fedq_proto::query_digest(request);
    let round = Round {
        query_id: &request.query_id,
        request_digest: &digest,
    };
    let set = ParticipantSet::new(round, members).map_err(|e| e.to_string())?;
    let min_honest = participants.iter().map(|k| k.min_honest).max().unwrap_or(0);
    Ok(Relay {
        participants,
        set_hash: set.hash_hex(),
        min_honest,
    })
}

/// What [`unmask`] keeps to restore the shares after the answers are
/// checked.
pub struct Unmasked {
    /// Per measurement, the sum of the values over every participant.
    sums: Vec<Vec<i64>>,
    /// Per answer (in outcome order, answered ones only), per measurement,
    /// the share scale it stated.
    shares: Vec<Vec<f64>>,
}

/// Adds up the masked shares of a committed round. Every participant must
/// have answered, masked for `relay`'s set, with share scales that follow
/// from its `min_honest` and each measurement's rho and L2 sensitivity;
/// otherwise every answer is left out, saying why. The answers are then
/// made to look like central discrete Gaussian releases of zero (the
/// layout [`crate::verify`] checks against the coordinator's plan); after
/// the checks, [`restore`] puts the sum and the shares back.
pub fn unmask(relay: &Relay, outcomes: &mut [Outcome<QueryResponse>]) -> Result<Unmasked, String> {
    if let Some(o) = outcomes.iter().find(|o| o.result.is_err()) {
        return Err(format!("node {:?} did not return its share", o.node));
    }
    let answers: Vec<&mut QueryResponse> = outcomes
        .iter_mut()
        .filter_map(|o| o.result.as_mut().ok())
        .collect();
    if answers.len() != relay.participants.len() {
        return Err(format!(
            "{} shares for {} participants",
            answers.len(),
            relay.participants.len()
        ));
    }
    let mut shares = Vec::with_capacity(answers.len());
    let mut masked: Vec<Vec<Vec<u64>>> = Vec::new();
    for a in &answers {
        if a.participant_set != relay.set_hash {
            return Err(format!(
                "node {:?} masked its share for another participant set",
                a.node_name
            ));
        }
        let mut scales = Vec::new();
        for (i, m) in a.measurements.iter().enumerate() {
            if m.mechanism != MECHANISM {
                return Err(format!(
                    "node {:?} measurement {i} is {:?}, not a masked share",
                    a.node_name, m.mechanism
                ));
            }
            let want = fedq_dp::distributed::share_scale(
                m.l2_sensitivity as i64,
                m.rho,
                a.min_honest,
                m.masked.len(),
            )?;
            if (m.scale - want).abs() > 1e-9 * want {
                return Err(format!(
                    "node {:?} measurement {i}: share scale {} where {} shares of rho {} need {want}",
                    a.node_name, m.scale, a.min_honest, m.rho
                ));
            }
            scales.push(m.scale);
        }
        shares.push(scales);
        masked.push(a.measurements.iter().map(|m| m.masked.clone()).collect());
    }
    let measurements = masked[0].len();
    if masked.iter().any(|m| m.len() != measurements) {
        return Err("the participants released different numbers of measurements".into());
    }
    let mut sums = Vec::with_capacity(measurements);
    for i in 0..measurements {
        let parts: Vec<Vec<u64>> = masked.iter().map(|m| m[i].clone()).collect();
        sums.push(fedq_secagg::sum(&parts).map_err(|e| e.to_string())?);
    }
    for a in answers {
        for m in &mut a.measurements {
            let len = m.masked.len();
            let central = Noise::for_rho(m.l2_sensitivity as i64, m.rho)?;
            *m = Measurement {
                mechanism: central.name().into(),
                scale: central.scale(),
                noise_variance: central.variance(),
                ci95_half_width: central.half_width(CI_ALPHA)?,
                values: vec![0; len],
                masked: Vec::new(),
                ..m.clone()
            };
        }
    }
    Ok(Unmasked { sums, shares })
}

/// After the answers were checked: the first carries the sum, every
/// answer its own share's scale, so the combination adds the right
/// values and noises. If the checks left any answer out, the sum cannot
/// be used and every answer is left out.
pub fn restore(u: Unmasked, outcomes: &mut [Outcome<QueryResponse>]) {
    if let Some(bad) = outcomes.iter().find(|o| o.result.is_err()) {
        let why = format!(
            "secure aggregation round abandoned: the answer of {:?} was left out, and the others' masked shares cannot be summed without it (their releases are spent; ask again with a new query id)",
            bad.node
        );
        abandon(outcomes, &why);
        return;
    }
    let mut first = true;
    for (o, scales) in outcomes.iter_mut().zip(u.shares) {
        let Ok(a) = &mut o.result else { continue };
        for ((m, sum), scale) in a.measurements.iter_mut().zip(&u.sums).zip(scales) {
            let share = Noise::DiscreteGaussian { scale };
            m.scale = scale;
            m.noise_variance = share.variance();
            m.ci95_half_width = share.half_width(CI_ALPHA).unwrap_or(0.0);
            m.values = if first {
                sum.clone()
            } else {
                vec![0; sum.len()]
            };
        }
        first = false;
    }
}

/// Leaves every answered outcome out with `why`.
pub fn abandon(outcomes: &mut [Outcome<QueryResponse>], why: &str) {
    for o in outcomes.iter_mut() {
        if o.result.is_ok() {
            o.result = Err(Failure::LeftOut(format!("node {:?}: {why}", o.node)));
        }
    }
}

/// The noise of one node's share of a release of `rho` (L2 sensitivity
/// `l2`, `values` values) calibrated for `min_honest` honest participants;
/// `None` if no scale fits.
pub fn share_noise(l2: i64, rho: f64, min_honest: u32, values: usize) -> Option<Noise> {
    fedq_dp::distributed::share_scale(l2, rho, min_honest, values)
        .ok()
        .map(|scale| Noise::DiscreteGaussian { scale })
}

/// The combined 95% half-width measurement `label` would have with secure
/// aggregation, from a dry run's answers: `None` unless every answer is a
/// rho (discrete Gaussian) plan from a node that offers secure aggregation
/// (`min_honest` > 0). Each node's share scale follows from its own
/// `min_honest`, the measurement's rho and L2 sensitivity, and the number
/// of values.
pub fn dry_run_half_width(answered: &[&QueryResponse], label: &str) -> Option<f64> {
    let mut shares = Vec::new();
    for r in answered {
        let m = r.measurements.iter().find(|m| m.label == label)?;
        if r.min_honest == 0 || m.rho.is_nan() || m.rho <= 0.0 || m.l2_sensitivity < 1.0 {
            return None;
        }
        let values = r.cells.len().max(1) * m.bins.max(1) as usize;
        let scale =
            fedq_dp::distributed::share_scale(m.l2_sensitivity as i64, m.rho, r.min_honest, values)
                .ok()?;
        shares.push(Noise::DiscreteGaussian { scale });
    }
    (!shares.is_empty())
        .then(|| crate::combine::noise_sum_half_width(&shares, crate::combine::ALPHA))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedq_proto::v1::CellKey;
    use fedq_secagg::RoundKey as Key;
    use std::time::Duration;

    const RHO: f64 = 0.05;

    fn request() -> QueryRequest {
        QueryRequest {
            query_id: "q-secure".into(),
            sql: "SELECT gender, COUNT(*) FROM cases GROUP BY gender".into(),
            epsilon: 0.0,
            dry_run: false,
            rho: RHO,
        }
    }

    /// Three nodes' keys and Prepare answers (certificates and signatures
    /// are the nodes' to check, not the relay's).
    fn prepared(n: usize) -> (Vec<Key>, Vec<(String, PrepareResponse)>) {
        let keys: Vec<Key> = (0..n).map(|_| Key::generate()).collect();
        let answers = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let node = format!("node-{i}");
                let p = PrepareResponse {
                    round_key: Some(RoundKey {
                        node: node.clone(),
                        certificate: vec![1, 2, 3],
                        key: k.public().to_vec(),
                        signature: vec![4, 5, 6],
                        min_honest: 2 + i as u32,
                    }),
                    ..Default::default()
                };
                (node, p)
            })
            .collect();
        (keys, answers)
    }

    /// Node `i`'s committed answer: `values` masked for the relay's set.
    fn share(relay: &Relay, keys: &[Key], i: usize, values: &[i64]) -> QueryResponse {
        let digest = fedq_proto::query_digest(&request());
        let round = Round {
            query_id: "q-secure",
            request_digest: &digest,
        };
        let members = relay
            .participants
            .iter()
            .map(|k| Announcement {
                node: k.node.clone(),
                certificate: k.certificate.clone(),
                key: k.key.as_slice().try_into().unwrap(),
                signature: k.signature.clone(),
            })
            .collect();
        let set = ParticipantSet::new(round, members).unwrap();
        let min_honest = relay.min_honest;
        let scale = fedq_dp::distributed::share_scale(1, RHO, min_honest, values.len()).unwrap();
        QueryResponse {
            node_name: format!("node-{i}"),
            participant_set: set.hash_hex(),
            min_honest,
            cells: (0..values.len()).map(|_| CellKey::default()).collect(),
            measurements: vec![Measurement {
                label: "COUNT(*)".into(),
                mechanism: MECHANISM.into(),
                scale,
                rho: RHO,
                l2_sensitivity: 1.0,
                masked: set.mask(&format!("node-{i}"), &keys[i], values).unwrap(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn outcome(i: usize, r: Result<QueryResponse, Failure>) -> Outcome<QueryResponse> {
        Outcome {
            node: format!("node-{i}"),
            result: r,
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn the_masked_shares_sum_to_the_values_and_restore_per_node_shares() {
        let (keys, answers) = prepared(3);
        let relay = relay(&request(), &answers).unwrap();
        assert_eq!(relay.min_honest, 4, "the most demanding node's");
        let values = [[10i64, -3, 7], [1, 2, 3], [100, 0, -50]];
        let mut outcomes: Vec<_> = (0..3)
            .map(|i| outcome(i, Ok(share(&relay, &keys, i, &values[i]))))
            .collect();
        let u = unmask(&relay, &mut outcomes).unwrap();
        // Before the checks: central discrete Gaussian plans of zeros.
        for o in &outcomes {
            let m = &o.result.as_ref().unwrap().measurements[0];
            assert_eq!(m.mechanism, "discrete_gaussian");
            assert_eq!(m.values, vec![0; 3]);
            assert!(m.masked.is_empty());
        }
        restore(u, &mut outcomes);
        let got: Vec<Vec<i64>> = outcomes
            .iter()
            .map(|o| o.result.as_ref().unwrap().measurements[0].values.clone())
            .collect();
        assert_eq!(got[0], vec![111, -1, -40]);
        assert_eq!(got[1], vec![0; 3]);
        let share = fedq_dp::distributed::share_scale(1, RHO, 4, 3).unwrap();
        assert!(outcomes
            .iter()
            .all(|o| o.result.as_ref().unwrap().measurements[0].scale == share));
    }

    #[test]
    fn a_missing_or_foreign_share_abandons_the_round() {
        let (keys, answers) = prepared(3);
        let relay = relay(&request(), &answers).unwrap();
        let mut missing: Vec<_> = (0..2)
            .map(|i| outcome(i, Ok(share(&relay, &keys, i, &[1]))))
            .collect();
        missing.push(outcome(2, Err(Failure::TimedOut("no answer".into()))));
        let e = unmask(&relay, &mut missing).err().unwrap();
        assert!(e.contains("node-2"), "{e}");

        let mut foreign: Vec<_> = (0..3)
            .map(|i| outcome(i, Ok(share(&relay, &keys, i, &[1]))))
            .collect();
        if let Ok(a) = &mut foreign[1].result {
            a.participant_set = "0".repeat(64);
        }
        let e = unmask(&relay, &mut foreign).err().unwrap();
        assert!(e.contains("another participant set"), "{e}");

        // A share stating a smaller scale than its min_honest needs.
        let mut thin: Vec<_> = (0..3)
            .map(|i| outcome(i, Ok(share(&relay, &keys, i, &[1]))))
            .collect();
        if let Ok(a) = &mut thin[0].result {
            a.measurements[0].scale /= 2.0;
        }
        let e = unmask(&relay, &mut thin).err().unwrap();
        assert!(e.contains("share scale"), "{e}");
    }

    #[test]
    fn a_dry_run_shows_what_secure_aggregation_would_give() {
        let plan = |min_honest| QueryResponse {
            min_honest,
            cells: (0..4).map(|_| CellKey::default()).collect(),
            measurements: vec![Measurement {
                label: "COUNT(*)".into(),
                mechanism: "discrete_gaussian".into(),
                scale: Noise::for_rho(1, RHO).unwrap().scale(),
                rho: RHO,
                l2_sensitivity: 1.0,
                bins: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        let ten: Vec<QueryResponse> = (0..10).map(|_| plan(10)).collect();
        let refs: Vec<&QueryResponse> = ten.iter().collect();
        let secure = dry_run_half_width(&refs, "COUNT(*)").unwrap();
        let central = Noise::for_rho(1, RHO).unwrap();
        let plain = crate::combine::noise_sum_half_width(&[central; 10], crate::combine::ALPHA);
        let ratio = secure / plain;
        assert!((0.28..0.36).contains(&ratio), "about 1/sqrt(10): {ratio}");
        // One node without the policy: no secure figure.
        let mut mixed = ten.clone();
        mixed[3].min_honest = 0;
        let refs: Vec<&QueryResponse> = mixed.iter().collect();
        assert_eq!(dry_run_half_width(&refs, "COUNT(*)"), None);
    }
}
