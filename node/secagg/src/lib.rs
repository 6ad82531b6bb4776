//! `fedq-secagg`: secure aggregation of the nodes' noisy shares, so that
//! the coordinator learns only their sum.
//!
//! The protocol rides on the two phases of a query (Bonawitz et al.,
//! "Practical Secure Aggregation for Privacy-Preserving Machine
//! Learning", CCS 2017, the pairwise-mask part, without mask recovery):
//!
//! 1. **Prepare.** Each node makes a fresh X25519 key for the query
//!    ([`RoundKey`]) and announces it signed with its node certificate's
//!    key over the round (query id and request digest) and its own name
//!    ([`Signer::announce`]). The coordinator relays announcements; it
//!    cannot substitute a key of its own, because every node checks every
//!    announcement against the federation CA, the node role and the name
//!    ([`check`]).
//! 2. **Commit.** The coordinator sends the participant set (every
//!    announcement). Each node checks them all, derives one mask per peer
//!    from the X25519 secret it shares with that peer, salted with the
//!    hash of the participant set ([`ParticipantSet::hash`]), adds the
//!    masks of the peers after it in name order and subtracts those of
//!    the peers before it, modulo 2^64 ([`ParticipantSet::mask`]). Every
//!    mask is added by one node and subtracted by the other, so the sum
//!    of the masked vectors is the sum of the values ([`sum`]), and any
//!    proper subset of them is uniformly random to whoever lacks the
//!    secrets.
//!
//! A round is bound to one participant set: the masks depend on its hash,
//! and a node answers a query id once (a retry replays the same bytes; a
//! retry with another set is refused by the node). A node that drops
//! after masking leaves the round unrecoverable, never a second sum over
//! the same shares. Values are integers in `[-2^56, 2^56]`
//! ([`MAX_SHARE_MAGNITUDE`]) and a set has at most [`MAX_PARTICIPANTS`]
//! members, so the true sum lies within ±2^62 and the sum modulo 2^64
//! read as a signed integer is exact.

#![deny(missing_docs)]

use std::sync::Arc;

use rand_core::{RngCore, SeedableRng};
use ring::{digest, hkdf, signature};
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x25519_dalek::{PublicKey, ReusableSecret};

/// Most nodes one round may have.
pub const MAX_PARTICIPANTS: usize = 64;

/// Largest magnitude of a value a node masks: 64 of them sum within
/// ±2^62, inside `i64`, so the modular sum is the true sum.
pub const MAX_SHARE_MAGNITUDE: i64 = 1 << 56;

/// The version string every signed statement and every derived mask
/// starts from, so that nothing signed or derived here can be mistaken
/// for anything else.
const DOMAIN: &[u8] = b"fedq-secagg-v1";

/// What went wrong, naming the participant where there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecAggError {
    /// A participant's announcement does not hold: its certificate, its
    /// name, its signature or its key.
    #[error("participant {node}: {why}")]
    Participant {
        /// The name it claims.
        node: String,
        /// What is wrong.
        why: String,
    },
    /// The set as a whole is not acceptable (too small, too large, a name
    /// twice, this node missing).
    #[error("the participant set: {0}")]
    Set(String),
    /// This node's own key cannot sign.
    #[error("the node's certificate key cannot sign the round key: {0}")]
    Signing(String),
    /// A value outside `[-2^56, 2^56]`.
    #[error("value {index} ({value}) is outside ±2^56, the range secure aggregation sums exactly")]
    OutOfRange {
        /// Its position.
        index: usize,
        /// The value.
        value: i64,
    },
    /// Shares of different lengths.
    #[error("share {index} has {len} values where the first has {expected}")]
    Length {
        /// Which share.
        index: usize,
        /// Its length.
        len: usize,
        /// The first share's length.
        expected: usize,
    },
}

/// A node's key for one round: an X25519 secret used once per peer of
/// that round, then dropped (zeroised) with the value.
pub struct RoundKey {
    secret: ReusableSecret,
    public: PublicKey,
}

impl RoundKey {
    /// A fresh key from the operating system's randomness.
    pub fn generate() -> RoundKey {
        let secret = ReusableSecret::random();
        let public = PublicKey::from(&secret);
        RoundKey { secret, public }
    }

    /// The public half, as announced.
    pub fn public(&self) -> [u8; 32] {
        self.public.to_bytes()
    }
}

/// The round a key belongs to: the query id and the digest of the
/// request, so an announcement cannot be replayed into another query.
#[derive(Debug, Clone, Copy)]
pub struct Round<'a> {
    /// The query id.
    pub query_id: &'a str,
    /// `fedq_proto::query_digest` of the request.
    pub request_digest: &'a [u8],
}

impl Round<'_> {
    /// The bytes a node signs to announce `key` for this round under
    /// `node`: the domain, then each field length-prefixed.
    fn statement(&self, node: &str, key: &[u8; 32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        for field in [
            DOMAIN,
            b"announce".as_slice(),
            self.query_id.as_bytes(),
            self.request_digest,
            node.as_bytes(),
            key,
        ] {
            out.extend_from_slice(&(field.len() as u64).to_be_bytes());
            out.extend_from_slice(field);
        }
        out
    }
}

/// One participant's announcement, as relayed by the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The node's name (its certificate's DNS name).
    pub node: String,
    /// Its node certificate, DER.
    pub certificate: Vec<u8>,
    /// Its X25519 public key for the round.
    pub key: [u8; 32],
    /// Its certificate key's signature over the round, its name and key.
    pub signature: Vec<u8>,
}

enum SigningKey {
    Ecdsa(signature::EcdsaKeyPair),
    Ed25519(signature::Ed25519KeyPair),
}

/// A node's certificate key, signing its round keys.
pub struct Signer {
    key: SigningKey,
    rng: ring::rand::SystemRandom,
}

impl Signer {
    /// From the node's private key (PKCS#8 DER): ECDSA P-256 or P-384
    /// (what `fedq ca` issues) or Ed25519.
    pub fn from_pkcs8(der: &[u8]) -> Result<Signer, SecAggError> {
        let rng = ring::rand::SystemRandom::new();
        for alg in [
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
        ] {
            if let Ok(k) = signature::EcdsaKeyPair::from_pkcs8(alg, der, &rng) {
                return Ok(Signer {
                    key: SigningKey::Ecdsa(k),
                    rng,
                });
            }
        }
        match signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            Ok(k) => Ok(Signer {
                key: SigningKey::Ed25519(k),
                rng,
            }),
            Err(e) => Err(SecAggError::Signing(format!(
                "not an ECDSA P-256/P-384 or Ed25519 PKCS#8 key ({e})"
            ))),
        }
    }

    /// Announces `key` for `round` as `node`, with `certificate` (DER).
    pub fn announce(
        &self,
        round: Round<'_>,
        node: &str,
        certificate: &[u8],
        key: &RoundKey,
    ) -> Result<Announcement, SecAggError> {
        let public = key.public();
        let statement = round.statement(node, &public);
        let signature = match &self.key {
            SigningKey::Ecdsa(k) => k
                .sign(&self.rng, &statement)
                .map_err(|e| SecAggError::Signing(e.to_string()))?
                .as_ref()
                .to_vec(),
            SigningKey::Ed25519(k) => k.sign(&statement).as_ref().to_vec(),
        };
        Ok(Announcement {
            node: node.to_string(),
            certificate: certificate.to_vec(),
            key: public,
            signature,
        })
    }
}

/// Checks one announcement: its certificate chains to the federation's CA
/// as a node certificate for its name, unrevoked and valid now (by
/// `verifier`, the same rustls server-certificate verifier the
/// coordinator's TLS uses, CRLs included), and its signature over the
/// round, its name and its key verifies with that certificate's key.
pub fn check(
    a: &Announcement,
    round: Round<'_>,
    verifier: &Arc<dyn ServerCertVerifier>,
) -> Result<(), SecAggError> {
    let bad = |why: String| SecAggError::Participant {
        node: a.node.clone(),
        why,
    };
    let name =
        ServerName::try_from(a.node.clone()).map_err(|e| bad(format!("not a node name ({e})")))?;
    let cert = CertificateDer::from(a.certificate.clone());
    verifier
        .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
        .map_err(|e| bad(format!("its certificate is not a valid node certificate of the federation for this name: {e}")))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&a.certificate)
        .map_err(|e| bad(format!("its certificate cannot be read: {e}")))?;
    let spki = parsed.public_key();
    let alg = spki.algorithm.algorithm.to_id_string();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    let verification: &dyn signature::VerificationAlgorithm = match (alg.as_str(), curve.as_deref())
    {
        ("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")) => &signature::ECDSA_P256_SHA256_ASN1,
        ("1.2.840.10045.2.1", Some("1.3.132.0.34")) => &signature::ECDSA_P384_SHA384_ASN1,
        ("1.3.101.112", _) => &signature::ED25519,
        _ => {
            return Err(bad(format!(
                "its certificate key ({alg}) is not ECDSA P-256/P-384 or Ed25519"
            )))
        }
    };
    signature::UnparsedPublicKey::new(verification, &spki.subject_public_key.data)
        .verify(&round.statement(&a.node, &a.key), &a.signature)
        .map_err(|_| bad("its signature over the round key does not verify: the key was not announced by this node for this query".into()))
}

/// The participants of one round, in name order, with the hash that binds
/// every mask to exactly this set.
#[derive(Debug, Clone)]
pub struct ParticipantSet {
    members: Vec<Announcement>,
    hash: [u8; 32],
}

impl ParticipantSet {
    /// The set of `members` for `round`: 2 to [`MAX_PARTICIPANTS`] of
    /// them, each name once. Their announcements are not checked here
    /// (see [`ParticipantSet::check_all`]).
    pub fn new(
        round: Round<'_>,
        mut members: Vec<Announcement>,
    ) -> Result<ParticipantSet, SecAggError> {
        if members.len() < 2 {
            return Err(SecAggError::Set(format!(
                "{} participant(s): secure aggregation needs at least 2",
                members.len()
            )));
        }
        if members.len() > MAX_PARTICIPANTS {
            return Err(SecAggError::Set(format!(
                "{} participants, more than {MAX_PARTICIPANTS}",
                members.len()
            )));
        }
        members.sort_by(|a, b| a.node.cmp(&b.node));
        if let Some(w) = members.windows(2).find(|w| w[0].node == w[1].node) {
            return Err(SecAggError::Set(format!("{} is listed twice", w[0].node)));
        }
        let mut h = digest::Context::new(&digest::SHA256);
        for field in [
            DOMAIN,
            b"set",
            round.query_id.as_bytes(),
            round.request_digest,
        ] {
            h.update(&(field.len() as u64).to_be_bytes());
            h.update(field);
        }
        for m in &members {
            h.update(&(m.node.len() as u64).to_be_bytes());
            h.update(m.node.as_bytes());
            h.update(&m.key);
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(h.finish().as_ref());
        Ok(ParticipantSet { members, hash })
    }

    /// The members, in name order.
    pub fn members(&self) -> &[Announcement] {
        &self.members
    }

    /// SHA-256 over the round and every member's name and key: what the
    /// masks are salted with, what nodes log, and what a retry must match.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    /// The hash as lowercase hex.
    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }

    /// Checks every member's announcement ([`check`]).
    pub fn check_all(
        &self,
        round: Round<'_>,
        verifier: &Arc<dyn ServerCertVerifier>,
    ) -> Result<(), SecAggError> {
        self.members
            .iter()
            .try_for_each(|a| check(a, round, verifier))
    }

    /// `values` masked by the node `own_name` holding `own`: each value
    /// plus, modulo 2^64, the masks of the peers after it in name order,
    /// minus those of the peers before it. `own_name` must be a member
    /// announcing `own`'s public key. Every value must lie within
    /// ±[`MAX_SHARE_MAGNITUDE`].
    pub fn mask(
        &self,
        own_name: &str,
        own: &RoundKey,
        values: &[i64],
    ) -> Result<Vec<u64>, SecAggError> {
        let me = self
            .members
            .iter()
            .position(|m| m.node == own_name)
            .ok_or_else(|| SecAggError::Set(format!("this node ({own_name}) is not in it")))?;
        if self.members[me].key != own.public() {
            return Err(SecAggError::Set(format!(
                "it lists another key for this node ({own_name}) than the one it announced"
            )));
        }
        let mut out = Vec::with_capacity(values.len());
        for (index, &value) in values.iter().enumerate() {
            if value.unsigned_abs() > MAX_SHARE_MAGNITUDE as u64 {
                return Err(SecAggError::OutOfRange { index, value });
            }
            out.push(value as u64);
        }
        for (j, peer) in self.members.iter().enumerate() {
            if j == me {
                continue;
            }
            let shared = own.secret.diffie_hellman(&PublicKey::from(peer.key));
            if !shared.was_contributory() {
                return Err(SecAggError::Participant {
                    node: peer.node.clone(),
                    why: "its round key is a low-order point (no shared secret)".into(),
                });
            }
            let mut rng = rand_chacha::ChaCha20Rng::from_seed(self.seed(shared.as_bytes()));
            let add = j > me;
            for v in &mut out {
                let m = rng.next_u64();
                *v = if add {
                    v.wrapping_add(m)
                } else {
                    v.wrapping_sub(m)
                };
            }
        }
        Ok(out)
    }

    /// The pair's mask seed: HKDF-SHA256 of their shared secret, salted
    /// with the set's hash (the same on both sides).
    fn seed(&self, shared: &[u8; 32]) -> [u8; 32] {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &self.hash).extract(shared);
        let info: [&[u8]; 2] = [DOMAIN, b"mask"];
        let mut seed = [0u8; 32];
        prk.expand(&info, hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut seed))
            .expect("32 bytes is HKDF-SHA256's own length");
        seed
    }
}

/// The sum of every member's masked vector: the masks cancel, and the sum
/// modulo 2^64 read as a signed integer is the true sum (values within
/// ±2^56, at most 64 members).
pub fn sum(shares: &[Vec<u64>]) -> Result<Vec<i64>, SecAggError> {
    let Some(first) = shares.first() else {
        return Ok(Vec::new());
    };
    let mut total = vec![0u64; first.len()];
    for (index, s) in shares.iter().enumerate() {
        if s.len() != first.len() {
            return Err(SecAggError::Length {
                index,
                len: s.len(),
                expected: first.len(),
            });
        }
        for (t, v) in total.iter_mut().zip(s) {
            *t = t.wrapping_add(*v);
        }
    }
    Ok(total.into_iter().map(|t| t as i64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedq_pki::{der_from_pem, Authority, Role};
    use rustls::RootCertStore;

    struct Node {
        name: String,
        cert: Vec<u8>,
        signer: Signer,
    }

    fn node(ca: &Authority, name: &str) -> Node {
        let pair = ca.issue(Role::Node, name).unwrap();
        let key = pem_der(&pair.key);
        Node {
            name: name.into(),
            cert: der_from_pem(&pair.cert).unwrap(),
            signer: Signer::from_pkcs8(&key).unwrap(),
        }
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .secret_pkcs8_der()
            .to_vec()
    }

    fn verifier(ca: &Authority) -> Arc<dyn ServerCertVerifier> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(der_from_pem(&ca.pem.cert).unwrap()))
            .unwrap();
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap()
    }

    const DIGEST: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn round(id: &str) -> Round<'_> {
        Round {
            query_id: id,
            request_digest: DIGEST,
        }
    }

    /// `n` nodes announce keys for round `q-1`; returns their keys and the set.
    fn setup(ca: &Authority, n: usize) -> (Vec<Node>, Vec<RoundKey>, ParticipantSet) {
        let nodes: Vec<Node> = (0..n)
            .map(|i| node(ca, &format!("node-{i}.example")))
            .collect();
        let keys: Vec<RoundKey> = nodes.iter().map(|_| RoundKey::generate()).collect();
        let announced = nodes
            .iter()
            .zip(&keys)
            .map(|(n, k)| {
                n.signer
                    .announce(round("q-1"), &n.name, &n.cert, k)
                    .unwrap()
            })
            .collect();
        let set = ParticipantSet::new(round("q-1"), announced).unwrap();
        (nodes, keys, set)
    }

    #[test]
    fn masks_cancel_in_the_sum_and_hide_every_proper_subset() {
        let ca = Authority::generate("test CA").unwrap();
        let (nodes, keys, set) = setup(&ca, 4);
        set.check_all(round("q-1"), &verifier(&ca)).unwrap();
        let values: Vec<Vec<i64>> = (0..4)
            .map(|i| {
                vec![
                    i * 10 - 7,
                    1_000_000 * i,
                    -MAX_SHARE_MAGNITUDE,
                    MAX_SHARE_MAGNITUDE / 64,
                ]
            })
            .collect();
        let masked: Vec<Vec<u64>> = nodes
            .iter()
            .zip(&keys)
            .zip(&values)
            .map(|((n, k), v)| set.mask(&n.name, k, v).unwrap())
            .collect();
        let truth: Vec<i64> = (0..4).map(|c| values.iter().map(|v| v[c]).sum()).collect();
        assert_eq!(sum(&masked).unwrap(), truth);
        // No proper subset sums to its values: each misses a mask.
        for skip in 0..4 {
            let some: Vec<Vec<u64>> = masked
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, m)| m.clone())
                .collect();
            let part: Vec<i64> = (0..4)
                .map(|c| {
                    values
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i != skip)
                        .map(|(_, v)| v[c])
                        .sum()
                })
                .collect();
            assert_ne!(sum(&some).unwrap(), part);
        }
        for (m, v) in masked.iter().zip(&values) {
            assert_ne!(m.iter().map(|&x| x as i64).collect::<Vec<_>>(), *v);
        }
    }

    #[test]
    fn another_participant_set_gives_other_masks() {
        let ca = Authority::generate("test CA").unwrap();
        let (nodes, keys, set) = setup(&ca, 3);
        let two = ParticipantSet::new(round("q-1"), set.members()[..2].to_vec()).unwrap();
        assert_ne!(set.hash(), two.hash());
        let v = [5i64, 6, 7];
        assert_ne!(
            set.mask(&nodes[0].name, &keys[0], &v).unwrap(),
            two.mask(&nodes[0].name, &keys[0], &v).unwrap()
        );
    }

    #[test]
    fn a_substituted_or_replayed_key_is_refused_naming_the_node() {
        let ca = Authority::generate("test CA").unwrap();
        let v = verifier(&ca);
        let (nodes, _, set) = setup(&ca, 2);
        let good = set.members()[0].clone();
        check(&good, round("q-1"), &v).unwrap();

        // The coordinator swaps in a key of its own.
        let mut swapped = good.clone();
        swapped.key = RoundKey::generate().public();
        let e = check(&swapped, round("q-1"), &v).unwrap_err();
        assert!(e.to_string().contains("signature"), "{e}");
        assert!(e.to_string().contains(&good.node), "{e}");

        // The announcement of another query.
        let e = check(&good, round("q-2"), &v).unwrap_err();
        assert!(e.to_string().contains("signature"), "{e}");

        // A node's certificate announced under another node's name.
        let renamed = nodes[0]
            .signer
            .announce(
                round("q-1"),
                &nodes[1].name,
                &nodes[0].cert,
                &RoundKey::generate(),
            )
            .unwrap();
        let e = check(&renamed, round("q-1"), &v).unwrap_err();
        assert!(e.to_string().contains("certificate"), "{e}");

        // A signature altered in transit.
        let mut altered = good.clone();
        let last = altered.signature.len() - 1;
        altered.signature[last] ^= 1;
        assert!(check(&altered, round("q-1"), &v).is_err());

        // A certificate from another CA.
        let other = Authority::generate("other CA").unwrap();
        let stranger = node(&other, "node-0.example");
        let a = stranger
            .signer
            .announce(
                round("q-1"),
                &stranger.name,
                &stranger.cert,
                &RoundKey::generate(),
            )
            .unwrap();
        assert!(check(&a, round("q-1"), &v).is_err());

        // An analyst's (client) certificate is not a node's.
        let pair = ca.issue(Role::Analyst, "node-9.example").unwrap();
        let analyst = Signer::from_pkcs8(&pem_der(&pair.key)).unwrap();
        let a = analyst
            .announce(
                round("q-1"),
                "node-9.example",
                &der_from_pem(&pair.cert).unwrap(),
                &RoundKey::generate(),
            )
            .unwrap();
        assert!(check(&a, round("q-1"), &v).is_err());
    }

    #[test]
    fn sets_and_values_out_of_bounds_are_refused() {
        let ca = Authority::generate("test CA").unwrap();
        let (nodes, keys, set) = setup(&ca, 3);
        let one = set.members()[..1].to_vec();
        assert!(matches!(
            ParticipantSet::new(round("q-1"), one),
            Err(SecAggError::Set(_))
        ));
        let mut twice = set.members().to_vec();
        twice.push(twice[0].clone());
        let e = ParticipantSet::new(round("q-1"), twice).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        // This node is not in a set of the others.
        let others = ParticipantSet::new(round("q-1"), set.members()[1..].to_vec()).unwrap();
        assert!(others.mask(&nodes[0].name, &keys[0], &[1]).is_err());
        // A set listing another key for this node.
        assert!(set.mask(&nodes[0].name, &keys[1], &[1]).is_err());
        let e = set
            .mask(&nodes[0].name, &keys[0], &[0, MAX_SHARE_MAGNITUDE + 1])
            .unwrap_err();
        assert_eq!(
            e,
            SecAggError::OutOfRange {
                index: 1,
                value: MAX_SHARE_MAGNITUDE + 1
            }
        );
        assert!(sum(&[vec![1, 2], vec![3]]).is_err());
    }
}
