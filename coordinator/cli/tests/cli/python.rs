//! The Python package's own test suite (`python/tests`, pytest), run from
//! `cargo test` so that the README's one test command runs it too: builds
//! the package's wheel with maturin (the extension in the workspace's
//! target directory, debug profile, so only the small `fedq-python` crate
//! is compiled on top of what the other tests built), installs it into a
//! virtual environment kept at `target/python-venv`, and runs pytest, which
//! starts a real `fedq demo --serve` (this binary) and queries it from
//! Python over mutual TLS.
//!
//! Needs python3 (3.9 or newer, with `venv` and `pip`) and PyPI for the
//! first run (maturin, pandas, pytest, grpcio-tools:
//! `python/tests/requirements.txt`); fails saying so when they are missing.
//! `FEDQ_PYTHON` names another interpreter.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// The `fedq` binary under test.
fn fedq() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_fedq"))
}

/// The target directory the binary was built in (`<target>/debug/fedq`).
fn target_dir() -> PathBuf {
    fedq()
        .parent()
        .and_then(Path::parent)
        .expect("fedq sits in <target>/<profile>/")
        .to_path_buf()
}

/// Runs `cmd`, failing the test with `what` and its output if it fails.
fn check(mut cmd: Command, what: &str) {
    let started = Instant::now();
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    eprintln!("{what}: {:.1} s", started.elapsed().as_secs_f64());
}

/// The virtual environment with the test requirements, made (or remade,
/// when `requirements.txt` changed) on first use.
fn venv(python: &str) -> PathBuf {
    let probe = Command::new(python)
        .args([
            "-c",
            "import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 9) else 1)",
        ])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "{python} is not Python 3.9 or newer with venv and pip: the Python package's tests need one \
             (apt-get install python3 python3-venv python3-pip, or set FEDQ_PYTHON):\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!(
            "cannot run {python} ({e}): the Python package's tests need Python 3.9 or newer with venv and pip \
             (apt-get install python3 python3-venv python3-pip, or set FEDQ_PYTHON)"
        ),
    }
    let requirements = Path::new(WORKSPACE).join("python/tests/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", requirements.display()));
    let dir = target_dir().join("python-venv");
    let stamp = dir.join("fedq-requirements.txt");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        let _ = std::fs::remove_dir_all(&dir);
        let mut make = Command::new(python);
        make.args(["-m", "venv"]).arg(&dir);
        check(make, "creating the virtual environment target/python-venv");
        let mut install = Command::new(dir.join("bin/python"));
        install
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(&requirements);
        check(
            install,
            "installing python/tests/requirements.txt from PyPI (maturin, pandas, pytest, grpcio-tools)",
        );
        std::fs::write(&stamp, &wanted).expect("write the venv's requirements stamp");
    }
    dir
}

#[test]
fn python_package_suite_passes_against_a_demo_federation() {
    let started = Instant::now();
    let python = std::env::var("FEDQ_PYTHON").unwrap_or_else(|_| "python3".into());
    let venv = venv(&python);
    let target = target_dir();
    let wheels = target.join("python-wheels");
    let _ = std::fs::remove_dir_all(&wheels);

    // The wheel: maturin compiles fedq-python into this target directory.
    let mut build = Command::new(venv.join("bin/maturin"));
    build
        .args(["build", "--quiet", "--manifest-path"])
        .arg(Path::new(WORKSPACE).join("python/Cargo.toml"))
        .arg("--out")
        .arg(&wheels)
        .arg("--interpreter")
        .arg(venv.join("bin/python"))
        .env("CARGO_TARGET_DIR", &target);
    check(build, "maturin build (the fedq wheel)");
    let wheel = std::fs::read_dir(&wheels)
        .expect("maturin's output directory")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .expect("a wheel built by maturin");
    let mut install = Command::new(venv.join("bin/python"));
    install
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--force-reinstall",
        ])
        .arg(&wheel);
    check(install, "pip install the fedq wheel");

    let mut pytest = Command::new(venv.join("bin/python"));
    pytest
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "python/tests",
        ])
        .current_dir(WORKSPACE)
        .env("FEDQ_BIN", fedq());
    check(pytest, "pytest python/tests");
    eprintln!(
        "the Python package's suite took {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
}
