//! `fedq ca init`, `fedq ca issue` and `fedq ca revoke`, as a federation's
//! operator runs them.

use std::path::Path;
use std::process::Command;

fn fedq(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fedq"))
        .args(args)
        .output()
        .expect("run fedq");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn a_ca_is_created_once_and_issues_certificates_and_signs_requests() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let ca_s = ca.to_str().unwrap();
    let (code, out) = fedq(&["ca", "init", "--dir", ca_s]);
    assert_eq!(code, 0, "{out}");
    assert!(ca.join("ca.pem").exists() && ca.join("ca.key").exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(ca.join("ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "the CA key is owner-only");
    }
    let (code, out) = fedq(&["ca", "init", "--dir", ca_s]);
    assert_eq!(code, 1, "never overwrite a CA: {out}");
    assert!(out.contains("refusing to overwrite"), "{out}");

    let alice = dir.path().join("alice");
    let (code, out) = fedq(&[
        "ca",
        "issue",
        "--ca",
        ca_s,
        "--role",
        "analyst",
        "--name",
        "alice@uni",
        "--out",
        alice.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    let issued = fedq_pki::Authority::load(&ca).unwrap();
    assert_eq!(
        std::fs::read_to_string(alice.join("ca.pem")).unwrap(),
        issued.pem.cert
    );
    let who = identity(&alice.join("analyst.pem"));
    assert_eq!(who, ("alice@uni".to_string(), "analyst".to_string()));

    // A node's request: the CA decides the name and role, the key stays home.
    let (key, csr) = fedq_pki::key_and_request("asked-for-another-name").unwrap();
    let csr_path = dir.path().join("node.csr");
    std::fs::write(&csr_path, csr).unwrap();
    let node = dir.path().join("node");
    let (code, out) = fedq(&[
        "ca",
        "issue",
        "--ca",
        ca_s,
        "--role",
        "node",
        "--name",
        "ngo-north",
        "--csr",
        csr_path.to_str().unwrap(),
        "--out",
        node.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        !node.join("node.key").exists(),
        "no key is made for a request"
    );
    assert_eq!(
        identity(&node.join("node.pem")),
        ("ngo-north".to_string(), "node".to_string())
    );
    assert!(!key.is_empty());

    let (code, out) = fedq(&[
        "ca",
        "issue",
        "--ca",
        ca_s,
        "--role",
        "admin",
        "--name",
        "x",
        "--out",
        node.to_str().unwrap(),
    ]);
    // A bad command line (exit 2), naming the roles there are.
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("possible values: node, analyst, auditor"),
        "{out}"
    );
}

fn identity(pem_path: &Path) -> (String, String) {
    let pem = std::fs::read_to_string(pem_path).unwrap();
    let der = fedq_pki::der_from_pem(&pem).expect("a PEM certificate");
    let c = fedq_pki::caller_from_der(&der).unwrap();
    (c.name, c.role)
}

#[test]
fn revoke_adds_to_the_list_and_signs_a_crl_the_ca_can_be_held_to() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let ca_s = ca.to_str().unwrap();
    assert_eq!(fedq(&["ca", "init", "--dir", ca_s]).0, 0);
    let issue = |role: &str, name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec![
            "ca",
            "issue",
            "--ca",
            ca_s,
            "--role",
            role,
            "--name",
            name,
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (code, text) = fedq(&args);
        (code, text, out.join(format!("{role}.pem")))
    };
    let (code, out, alice) = issue("analyst", "alice", &[]);
    assert_eq!(code, 0, "{out}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = alice.with_extension("key");
        let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "an issued key is owner-only");
    }
    let (_, _, bob) = issue("auditor", "bob", &[]);

    // By certificate file.
    let (code, out) = fedq(&["ca", "revoke", "--ca", ca_s, alice.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("revoked serial") && out.contains("alice"),
        "{out}"
    );
    let list = fedq_pki::RevocationList::load(&ca).unwrap();
    assert_eq!(list.revoked.len(), 1);
    assert_eq!(list.revoked[0].name, "alice");
    // By serial, as openssl prints it (colons, upper case): adds to the list.
    let (bob_serial, _) =
        fedq_pki::serial_and_holder(&std::fs::read_to_string(&bob).unwrap()).unwrap();
    let colons: Vec<String> = bob_serial.iter().map(|b| format!("{b:02X}")).collect();
    let (code, out) = fedq(&["ca", "revoke", "--ca", ca_s, &colons.join(":")]);
    assert_eq!(code, 0, "{out}");
    let list = fedq_pki::RevocationList::load(&ca).unwrap();
    assert_eq!(list.revoked.len(), 2, "each revoke adds to the list");
    assert_eq!(list.crl_number, 2);
    // The same again changes nothing but says so.
    let (code, out) = fedq(&["ca", "revoke", "--ca", ca_s, alice.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("already revoked"), "{out}");
    assert_eq!(
        fedq_pki::RevocationList::load(&ca).unwrap().revoked.len(),
        2
    );
    // The signed list is a PEM X509 CRL (its contents: node/src/pki.rs).
    let crl = std::fs::read_to_string(ca.join("crl.pem")).unwrap();
    assert!(crl.starts_with("-----BEGIN X509 CRL-----"), "{crl}");

    // A certificate from another CA, or garbage, is refused.
    let other = dir.path().join("other");
    assert_eq!(fedq(&["ca", "init", "--dir", other.to_str().unwrap()]).0, 0);
    let (code, out) = fedq(&[
        "ca",
        "revoke",
        "--ca",
        ca_s,
        other.join("ca.pem").to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not issued by"), "{out}");
    let (code, out) = fedq(&["ca", "revoke", "--ca", ca_s, "not-a-serial"]);
    assert_eq!(code, 1, "{out}");

    // Node certificates name the node only, unless more is asked for.
    let (code, out, node) = issue("node", "ngo-north", &[]);
    assert_eq!(code, 0, "{out}");
    let der = fedq_pki::der_from_pem(&std::fs::read_to_string(&node).unwrap()).unwrap();
    assert_eq!(fedq_pki::server_names(&der), vec!["ngo-north"]);
    let (code, out, node) = issue("node", "ngo-south", &["--also-name", "localhost"]);
    assert_eq!(code, 0, "{out}");
    let der = fedq_pki::der_from_pem(&std::fs::read_to_string(&node).unwrap()).unwrap();
    assert_eq!(fedq_pki::server_names(&der), vec!["ngo-south", "localhost"]);
    let (code, out, _) = issue("analyst", "carol", &["--also-name", "localhost"]);
    assert_eq!(code, 1, "{out}");
}
