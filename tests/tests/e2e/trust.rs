//! The trust layer under attack: a stolen analyst certificate revoked while
//! the node runs, a node's certificate used to query another node, a log
//! re-signed with another key, a node whose audit key changed, and a node
//! configured under a name its certificate does not carry.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ed25519_dalek::{Signer, SigningKey};
use fedq::audit::{check, HeadsFile};
use fedq::client::Failure;
use fedq_engine::synth::Partner;
use fedq_pki::{serial_and_holder, RevocationList, Role};
use fedq_proto::v1::QueryRequest;
use fedq_tests::{connect, roomy_budget, TestFederation};
use tonic::Code;

fn q(id: &str) -> QueryRequest {
    QueryRequest {
        query_id: id.into(),
        sql: "SELECT COUNT(*) FROM cases".into(),
        epsilon: 0.1,
        dry_run: false,
        rho: 0.0,
    }
}

/// How one query with a certificate pair went.
#[derive(Debug, PartialEq)]
enum Attempt {
    Answered,
    /// Refused at the TLS handshake (the connection, or the first call on
    /// it, fails at the transport; the node never saw a request).
    RefusedAtHandshake(String),
    /// The node answered with an error status.
    Status(Code, String),
}

async fn attempt(fed: &TestFederation, cert: &Path, key: &Path, id: &str) -> Attempt {
    let ca = fed.dir.path().join("ca/ca.pem");
    match connect(&fed.nodes[0], &ca, cert, key).await {
        Err(e) => Attempt::RefusedAtHandshake(format!("connect: {e:?}")),
        Ok(mut c) => match c.query(q(id)).await {
            Ok(_) => Attempt::Answered,
            // In TLS 1.3 the client finishes first; the node's alert then
            // ends the connection under the first call.
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unknown | Code::Unavailable | Code::Cancelled
                ) =>
            {
                Attempt::RefusedAtHandshake(format!("{s:?}"))
            }
            Err(s) => Attempt::Status(s.code(), s.message().to_string()),
        },
    }
}

/// Replaces `to` with `from` in one rename, as an operator's deploy tool
/// would (a reader never sees half a file).
fn install(from: &Path, to: &Path) {
    let tmp = to.with_extension("incoming");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// A one-node federation whose node loads a revocation list (empty at
/// first) from `certs/crl.pem`. Returns it with the CA directory.
async fn with_crl() -> (TestFederation, PathBuf) {
    let mut fed = TestFederation::start(&[(Partner::Ngo, 300, 11)], roomy_budget()).await;
    fed.stop_node(0).await;
    let ca_dir = fed.dir.path().join("ca");
    let crl = RevocationList::default()
        .publish(&fed.ca, &ca_dir)
        .expect("an empty revocation list");
    let node = &mut fed.nodes[0];
    install(&crl, &node.config.base_dir.join("certs/crl.pem"));
    node.config.tls.crl = Some("certs/crl.pem".into());
    fed.start_node(0).await;
    (fed, ca_dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_analyst_is_refused_at_the_handshake_without_restarting_the_node() {
    let (fed, ca_dir) = with_crl().await;
    let (alice_cert, alice_key) = fed.client_cert(Role::Analyst, "alice");
    let (bob_cert, bob_key) = fed.client_cert(Role::Analyst, "bob");
    assert_eq!(
        attempt(&fed, &alice_cert, &alice_key, "a0").await,
        Attempt::Answered
    );
    assert_eq!(
        attempt(&fed, &bob_cert, &bob_key, "b0").await,
        Attempt::Answered
    );
    let addr = fed.nodes[0].config.node.listen;

    // The CA revokes alice's certificate (stolen, say) and the operator
    // installs the new list; the node is not touched.
    let pem = std::fs::read_to_string(&alice_cert).unwrap();
    let (serial, who) = serial_and_holder(&pem).unwrap();
    let mut list = RevocationList::load(&ca_dir).unwrap();
    assert!(list.add(&serial, &who.name, &who.role));
    let crl = list.publish(&fed.ca, &ca_dir).unwrap();
    let node_crl = fed.nodes[0].config.base_dir.join("certs/crl.pem");
    install(&crl, &node_crl);

    // Within a few seconds (the node looks at the file every 2 s), every
    // new connection with alice's certificate is refused at the handshake.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    let refusal = loop {
        n += 1;
        match attempt(&fed, &alice_cert, &alice_key, &format!("a{n}")).await {
            Attempt::Answered => {
                assert!(
                    Instant::now() < deadline,
                    "a revoked certificate was still answered 20 s after the new list"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Attempt::RefusedAtHandshake(why) => break why,
            other => panic!("revocation must act at the handshake, not as {other:?}"),
        }
    };
    // And keeps being refused; bob, not revoked, is still answered by the
    // same running node on the same address.
    for i in 0..3 {
        assert!(matches!(
            attempt(&fed, &alice_cert, &alice_key, &format!("again{i}")).await,
            Attempt::RefusedAtHandshake(_)
        ));
    }
    assert_eq!(
        attempt(&fed, &bob_cert, &bob_key, "b1").await,
        Attempt::Answered
    );
    assert_eq!(fed.nodes[0].config.node.listen, addr);
    assert!(fed.nodes[0].running.is_some(), "never restarted");
    eprintln!("alice refused: {refusal}");

    // A broken copy of the list keeps the previous one in force: alice
    // stays out, bob stays in.
    std::fs::write(&node_crl, "-----BEGIN X509 CRL-----\ngarbage\n").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for i in 0..2 {
        assert!(matches!(
            attempt(&fed, &alice_cert, &alice_key, &format!("bad{i}")).await,
            Attempt::RefusedAtHandshake(_)
        ));
        assert_eq!(
            attempt(&fed, &bob_cert, &bob_key, &format!("b-bad{i}")).await,
            Attempt::Answered
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_revocation_list_stops_the_node_from_starting_naming_tls_crl() {
    let (mut fed, _) = with_crl().await;
    fed.stop_node(0).await;
    let node = &fed.nodes[0];
    std::fs::write(node.config.base_dir.join("certs/crl.pem"), "not a list").unwrap();
    let e = fedq_node::server::start(node.config.clone())
        .await
        .unwrap()
        .stop()
        .await
        .expect_err("a garbage CRL must stop the start");
    let text = format!("{e:#}");
    assert!(text.contains("tls.crl"), "{text}");
    // A list signed by another CA is no list of ours either.
    let other = fedq_pki::Authority::generate("another CA").unwrap();
    let other_dir = fed.dir.path().join("other-ca");
    let crl = RevocationList::default()
        .publish(&other, {
            std::fs::create_dir_all(&other_dir).unwrap();
            &other_dir
        })
        .unwrap();
    install(&crl, &node.config.base_dir.join("certs/crl.pem"));
    let e = fedq_node::server::start(node.config.clone())
        .await
        .unwrap()
        .stop()
        .await
        .expect_err("a CRL from another CA must stop the start");
    let text = format!("{e:#}");
    assert!(text.contains("tls.crl"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_cannot_be_used_as_a_client_to_query() {
    let fed = TestFederation::start(&[(Partner::Hotline, 300, 12)], roomy_budget()).await;
    // Another partner's node certificate and key, as the CA issues them now
    // (a server certificate only).
    let (cert, key) = fed.client_cert(Role::Node, "node-1");
    assert!(matches!(
        attempt(&fed, &cert, &key, "n0").await,
        Attempt::RefusedAtHandshake(_)
    ));
    // The node's own certificate and key, used to call itself.
    let certs = fed.nodes[0].config.base_dir.join("certs");
    assert!(matches!(
        attempt(&fed, &certs.join("node.pem"), &certs.join("node.key"), "n1").await,
        Attempt::RefusedAtHandshake(_)
    ));
    // A node certificate from before this change, valid for client
    // authentication too: its role (OU "node") still keeps it out.
    let (old_cert, old_key) = old_style_node_certificate(&fed, "node-old");
    assert!(matches!(
        attempt(&fed, &old_cert, &old_key, "n2").await,
        Attempt::RefusedAtHandshake(_)
    ));
    // The control: an analyst is answered.
    let (a_cert, a_key) = fed.client_cert(Role::Analyst, "alice");
    assert_eq!(
        attempt(&fed, &a_cert, &a_key, "a0").await,
        Attempt::Answered
    );
}

/// A node certificate as the CA used to issue them: serverAuth and
/// clientAuth, and valid for localhost.
fn old_style_node_certificate(fed: &TestFederation, name: &str) -> (PathBuf, PathBuf) {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let issuer = Issuer::from_ca_cert_pem(
        &fed.ca.pem.cert,
        KeyPair::from_pem(&fed.ca.pem.key).unwrap(),
    )
    .unwrap();
    let mut params = CertificateParams::new(vec![name.to_string(), "localhost".into()]).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "fedq federation");
    dn.push(DnType::OrganizationalUnitName, "node");
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let pair = fedq_pki::PemPair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    };
    let dir = fed.dir.path().join("old-style");
    pair.write(&dir, name).unwrap();
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

/// Signs every entry of an export again with `key`, content and hashes
/// unchanged: what a node (or anyone holding another key) would hand an
/// auditor to pass off a log as its own.
fn resign(export: &str, key: &SigningKey) -> String {
    let mut out = String::new();
    for line in export.lines().filter(|l| !l.trim().is_empty()) {
        // Only the signature's text changes: every other byte of the line
        // (what is hashed) stays as the node wrote it.
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let hash = hex::decode(v["hash"].as_str().unwrap()).unwrap();
        let old = format!("\"sig\":\"{}\"", v["sig"].as_str().unwrap());
        let new = format!("\"sig\":\"{}\"", hex::encode(key.sign(&hash).to_bytes()));
        assert_eq!(line.matches(&old).count(), 1, "{line}");
        out.push_str(&line.replace(&old, &new));
        out.push('\n');
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_key_is_pinned_at_the_first_answer_and_a_resigned_log_diverges() {
    let mut fed = TestFederation::start(&[(Partner::Ngo, 300, 13)], roomy_budget()).await;
    fed.stop_node(0).await;
    fed.nodes[0].config.audit.auditors = vec!["auditor".into()];
    fed.start_node(0).await;
    let coordinator = fed.federation("alice");
    let heads_path = fed.dir.path().join("fedq-heads.json");
    assert!(!heads_path.exists());

    // Two answers: the key is pinned at the first, both heads recorded.
    for i in 0..2 {
        let mut outcomes = coordinator
            .query(q(&format!("p{i}")), Duration::from_secs(30))
            .await;
        let notes = fedq::audit::screen_answers(&coordinator, &mut outcomes)
            .await
            .unwrap();
        assert!(outcomes[0].result.is_ok(), "{:?}", outcomes[0].result);
        if i == 0 {
            assert!(
                notes
                    .iter()
                    .any(|n| n.contains("pinned at its first answer")),
                "{notes:?}"
            );
        }
    }
    let (export, _, node_key) = fed.pull_audit(0).await;
    let mut heads = HeadsFile::load(&heads_path).unwrap();
    let known = heads.nodes.get_mut("node-0").unwrap();
    assert_eq!(known.public_key.as_deref(), Some(node_key.trim()));
    assert_eq!(known.heads.len(), 2);

    // The honest log verifies with the pinned key.
    let honest = check("node-0", &export, &node_key, &mut known.clone());
    assert!(honest.consistent, "{}", honest.detail);

    // The same log, every entry signed again with another key: whether it
    // comes with the new key or with none (the pinned one is used), it is
    // DIVERGED, though every hash and every head seen is unchanged.
    let other = SigningKey::from_bytes(&[7u8; 32]);
    let other_hex = hex::encode(other.verifying_key().to_bytes());
    let resigned = resign(&export, &other);
    fedq_ledger::audit::verify(&resigned, &other.verifying_key(), 0, None)
        .expect("the re-signed log is consistent under its own key");
    let with_new_key = check("node-0", &resigned, &other_hex, &mut known.clone());
    assert!(!with_new_key.consistent, "{}", with_new_key.detail);
    assert!(
        with_new_key.detail.contains("key changed"),
        "{}",
        with_new_key.detail
    );
    let pinned = known.public_key.clone().unwrap();
    let with_pinned = check("node-0", &resigned, &pinned, &mut known.clone());
    assert!(!with_pinned.consistent, "{}", with_pinned.detail);
    assert!(
        with_pinned.detail.contains("pinned key"),
        "{}",
        with_pinned.detail
    );

    // A heads file from before keys were pinned: the handed key is pinned
    // now, and the verdict says so; the heads recorded then are checked
    // against it, so the re-signed log and its key still do not pass.
    let mut legacy = known.clone();
    legacy.public_key = None;
    let pinned_now = check("node-0", &export, &node_key, &mut legacy.clone());
    assert!(pinned_now.consistent, "{}", pinned_now.detail);
    assert!(
        pinned_now.detail.contains("pinned"),
        "{}",
        pinned_now.detail
    );
    let legacy_resigned = check("node-0", &resigned, &other_hex, &mut legacy);
    assert!(!legacy_resigned.consistent, "{}", legacy_resigned.detail);

    // The node's audit key changes (its key file replaced): its next answer
    // is left out, naming the node and the key.
    fed.stop_node(0).await;
    let cfg = &fed.nodes[0].config;
    std::fs::remove_file(cfg.resolve(&cfg.audit.key)).unwrap();
    let _ = std::fs::remove_file(cfg.resolve(&cfg.audit.public_key));
    fed.start_node(0).await;
    let coordinator = fed.federation("alice");
    let mut outcomes = coordinator.query(q("after"), Duration::from_secs(30)).await;
    assert!(outcomes[0].result.is_ok(), "the node itself answers");
    let notes = fedq::audit::screen_answers(&coordinator, &mut outcomes)
        .await
        .unwrap();
    match &outcomes[0].result {
        Err(Failure::LeftOut(why)) => {
            assert!(why.contains("node-0") && why.contains("pinned"), "{why}")
        }
        other => panic!("an answer under another audit key must be left out: {other:?}"),
    }
    assert!(notes.iter().any(|n| n.contains("left out")), "{notes:?}");
    // The head it carried is not recorded, and the pin is unchanged.
    let after = HeadsFile::load(&heads_path).unwrap();
    let after = &after.nodes["node-0"];
    assert_eq!(after.public_key.as_deref(), Some(pinned.as_str()));
    assert_eq!(after.heads.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_certificate_without_the_node_name() {
    let fed = TestFederation::start(&[(Partner::Ngo, 100, 14)], roomy_budget()).await;
    let mut config = fed.nodes[0].config.clone();
    config.node.listen = "127.0.0.1:0".parse().unwrap();
    // The certificate names node-0; node.toml now says another name.
    config.node.name = "ngo-elsewhere".into();
    let e = fedq_node::server::start(config.clone())
        .await
        .unwrap()
        .stop()
        .await
        .expect_err("serve must refuse a certificate without node.name");
    let text = format!("{e:#}");
    assert!(
        text.contains("\"ngo-elsewhere\"")
            && text.contains("\"node-0\"")
            && text.contains("node.name"),
        "{text}"
    );
    // The same check, as `fedq-node check` calls it.
    let e = fedq_node::tls::load(&config)
        .err()
        .expect("load refuses too");
    assert!(format!("{e:#}").contains("node.name"));
    // A certificate with the name passes.
    config.node.name = "node-0".into();
    fedq_node::tls::load(&config).expect("the right name loads");
}

/// The federation's revocation list reaches coordinators too: with `[tls]
/// crl` in the federation file, a node whose certificate the CA revoked
/// (a partner's server compromised, say) is refused at the handshake,
/// named, and left out, while the others answer; a new list is honoured
/// by the same `Federation` without reloading it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_with_the_revocation_list_leaves_out_a_revoked_node() {
    let fed = TestFederation::start(
        &[(Partner::Ngo, 300, 31), (Partner::Hotline, 300, 32)],
        roomy_budget(),
    )
    .await;
    let ca_dir = fed.dir.path().join("ca");
    let crl_path = fed.dir.path().join("federation-crl.pem");
    let revoked = &fed.nodes[1];
    let pem = std::fs::read_to_string(revoked.config.base_dir.join("certs/node.pem")).unwrap();
    let (serial, who) = serial_and_holder(&pem).unwrap();
    assert_eq!(who.name, revoked.name);
    let mut list = RevocationList::load(&ca_dir).unwrap();
    assert!(list.add(&serial, &who.name, &who.role));
    install(&list.publish(&fed.ca, &ca_dir).unwrap(), &crl_path);

    let mut config = fed.federation("alice").config.clone();
    config.tls.crl = Some(crl_path.clone());
    let coordinator = fedq::client::Federation::from_config(config).unwrap();
    let ask = |id: &str| {
        let mut r = q(id);
        r.query_id = fedq::client::new_query_id();
        r
    };
    let outcomes = coordinator
        .query(ask("crl1"), Duration::from_secs(20))
        .await;
    assert!(outcomes[0].result.is_ok(), "{:?}", outcomes[0].result);
    match &outcomes[1].result {
        Err(Failure::Unreachable(why)) => assert!(
            why.contains(&format!("{:?}", revoked.name))
                && why.contains("revoked")
                && why.contains("tls.crl"),
            "{why}"
        ),
        other => panic!("a revoked node must be refused at the handshake: {other:?}"),
    }
    // The node never saw the query: nothing spent there.
    let mut c = fed.raw_client(1, Role::Analyst, "alice").await;
    let b = c
        .budget(fedq_proto::v1::BudgetRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.budgets[0].spent_by_analyst, 0.0);
    // Without the list the same node is answered (the list is what left
    // it out) ...
    let plain = fed.federation("alice");
    let outcomes = plain.query(ask("crl2"), Duration::from_secs(20)).await;
    assert!(outcomes.iter().all(|o| o.result.is_ok()), "{outcomes:?}");
    // ... and an unreadable list is an error, never "trust every node".
    std::fs::write(&crl_path, "-----BEGIN X509 CRL-----\ngarbage\n").unwrap();
    let outcomes = coordinator
        .query(ask("crl3"), Duration::from_secs(20))
        .await;
    for o in &outcomes {
        match &o.result {
            Err(Failure::Unreachable(why)) => assert!(why.contains("tls.crl"), "{why}"),
            other => panic!("an unreadable list must stop the call: {other:?}"),
        }
    }
    // A new list without the revocation is honoured by the same
    // coordinator.
    std::fs::create_dir_all(fed.dir.path().join("ca-empty")).unwrap();
    install(
        &RevocationList::default()
            .publish(&fed.ca, &fed.dir.path().join("ca-empty"))
            .unwrap(),
        &crl_path,
    );
    let outcomes = coordinator
        .query(ask("crl4"), Duration::from_secs(20))
        .await;
    assert!(outcomes.iter().all(|o| o.result.is_ok()), "{outcomes:?}");
}

/// A connection opened before a revocation does not outlive it: the node
/// checks each open connection's certificate again when a new list is
/// loaded, and closes the revoked one at its next request; another
/// analyst's open connection is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_connection_is_closed_when_its_certificate_is_revoked() {
    let (fed, ca_dir) = with_crl().await;
    let ca = fed.dir.path().join("ca/ca.pem");
    let (alice_cert, alice_key) = fed.client_cert(Role::Analyst, "alice");
    let (bob_cert, bob_key) = fed.client_cert(Role::Analyst, "bob");
    // Both hold a connection open, and are answered over it.
    let mut alice = connect(&fed.nodes[0], &ca, &alice_cert, &alice_key)
        .await
        .unwrap();
    let mut bob = connect(&fed.nodes[0], &ca, &bob_cert, &bob_key)
        .await
        .unwrap();
    alice.query(q("held-a0")).await.unwrap();
    bob.query(q("held-b0")).await.unwrap();

    let pem = std::fs::read_to_string(&alice_cert).unwrap();
    let (serial, who) = serial_and_holder(&pem).unwrap();
    let mut list = RevocationList::load(&ca_dir).unwrap();
    assert!(list.add(&serial, &who.name, &who.role));
    let crl = list.publish(&fed.ca, &ca_dir).unwrap();
    install(&crl, &fed.nodes[0].config.base_dir.join("certs/crl.pem"));

    // Within a few seconds alice's requests on her open connection fail
    // (the connection is closed; a new one is refused at the handshake).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    loop {
        n += 1;
        match alice.query(q(&format!("held-a{n}"))).await {
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "a connection opened before the revocation was still answered 20 s after it"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(s) => {
                assert!(
                    matches!(
                        s.code(),
                        Code::Unknown | Code::Unavailable | Code::Cancelled
                    ),
                    "refused at the transport, not by the service: {s:?}"
                );
                break;
            }
        }
    }
    for i in 0..3 {
        assert!(alice.query(q(&format!("held-again{i}"))).await.is_err());
    }
    // Bob's open connection still answers.
    bob.query(q("held-b1")).await.unwrap();
}
