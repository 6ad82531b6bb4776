//! The `fedq-node` binary's own command line: help, and clear refusals of
//! bad configuration. (Building this test also builds the binary that the
//! end-to-end tests run as a real process.)

use std::process::Command;

fn node(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fedq-node"))
        .args(args)
        .output()
        .expect("run fedq-node");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn help_lists_the_commands_with_exit_codes() {
    let (code, out) = node(&["--help"]);
    assert_eq!(code, 0);
    for cmd in [
        "serve",
        "ingest",
        "init",
        "check",
        "audit",
        "budget",
        "synth",
        "Exit codes",
    ] {
        assert!(out.contains(cmd), "--help should mention {cmd}: {out}");
    }
}

#[test]
fn check_names_what_is_wrong_with_a_config() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("node.toml");
    std::fs::write(&bad, "[node]\nname = \"n\"\nlisten = \"127.0.0.1:1\"\nstore = \"s\"\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n[limits]\nmax_cells = 0\n").unwrap();
    let (code, out) = node(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("limits must be positive"), "{out}");
    std::fs::write(
        &bad,
        "[node]\nname = \"n\"\nlisten = \"127.0.0.1:1\"\nstore = \"s\"\nstroe = 1\n",
    )
    .unwrap();
    let (code, out) = node(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("stroe"), "a misspelt key is named: {out}");
    let (code, out) = node(&[
        "check",
        "--config",
        dir.path().join("missing.toml").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(out.contains("cannot read node config"), "{out}");
}
