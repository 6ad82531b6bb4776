"""A real demo federation for the Python tests: ``fedq demo --serve`` on a
temporary directory, three nodes on loopback over mutual TLS, started once
for the session and stopped (Ctrl-C, as a researcher would) at its end.

The ``fedq`` binary is ``$FEDQ_BIN`` (set by the Rust test that runs this
suite from ``cargo test --workspace``), or ``target/debug/fedq`` of this
checkout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# What `fedq demo --serve` prints once its nodes are up and the example
# queries have run.
READY = "the three nodes keep running until Ctrl-C"


def fedq_bin() -> Path:
    path = Path(os.environ.get("FEDQ_BIN", REPO / "target" / "debug" / "fedq"))
    if not path.exists():
        pytest.exit(
            f"no fedq binary at {path}: build it (cargo build -p fedq-cli) or set FEDQ_BIN",
            returncode=2,
        )
    return path


class Demo:
    """A running `fedq demo --serve` and what it printed."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.federation = directory / "federation.toml"
        self.output: list[str] = []
        self.proc = subprocess.Popen(
            [str(fedq_bin()), "demo", "--dir", str(directory), "--serve"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout=300):
            self.stop()
            raise RuntimeError(
                "fedq demo --serve did not get ready within 300 s:\n" + self.text()
            )
        if READY not in self.text():
            self.stop()
            raise RuntimeError(
                f"fedq demo --serve stopped before serving (exit {self.proc.returncode}):\n"
                + self.text()
            )

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if READY in line:
                self._ready.set()
        self._ready.set()

    def text(self) -> str:
        return "".join(self.output)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory):
    started = time.monotonic()
    d = Demo(tmp_path_factory.mktemp("fedq") / "demo-federation")
    print(f"fedq demo --serve ready in {time.monotonic() - started:.1f} s")
    yield d
    d.stop()


@pytest.fixture(scope="session")
def fed(demo: Demo):
    import fedq

    return fedq.Federation(demo.federation)
