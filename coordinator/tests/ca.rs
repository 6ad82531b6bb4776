//! `fedq ca init` and `fedq ca issue`, as a federation's operator runs them.

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
    let issued = fedq_node::pki::Authority::load(&ca).unwrap();
    assert_eq!(
        std::fs::read_to_string(alice.join("ca.pem")).unwrap(),
        issued.pem.cert
    );
    let who = identity(&alice.join("analyst.pem"));
    assert_eq!(who, ("alice@uni".to_string(), "analyst".to_string()));

    // A node's request: the CA decides the name and role, the key stays home.
    let (key, csr) = fedq_node::pki::key_and_request("asked-for-another-name").unwrap();
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
    assert_eq!(code, 1);
    assert!(out.contains("unknown role"), "{out}");
}

fn identity(pem_path: &Path) -> (String, String) {
    let pem = std::fs::read_to_string(pem_path).unwrap();
    let der = fedq_node::pki::der_from_pem(&pem).expect("a PEM certificate");
    let c = fedq_node::pki::caller_from_der(&der).unwrap();
    (c.name, c.role)
}
