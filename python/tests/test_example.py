"""The example notebook (python/examples/notebook.py) runs, as a script,
against the demo federation, and shows what it says it shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "notebook.py"


def test_the_example_notebook_runs_against_the_demo(demo, tmp_path):
    r = subprocess.run(
        [sys.executable, str(EXAMPLE), str(demo.federation)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for shown in [
        "discrete_laplace",  # the dry run's plan
        "COUNT(*)",
        "MEDIAN(traffickMonths)",
        "remaining_for_you",
        'QueryError: unknown column "gendr" (did you mean "gender"?)',
    ]:
        assert shown in r.stdout, (shown, r.stdout)
