"""`fedq demo --serve` as a researcher meets it before any Python: it prints
each hint once, and serving the same directory again spends nothing."""

from __future__ import annotations

import fedq

from conftest import Demo


def test_serving_a_demo_directory_again_spends_no_budget(tmp_path):
    directory = tmp_path / "again"
    # What a demo printed is read once it stopped: the hints come after
    # the line that says it is ready.
    first = Demo(directory)
    try:
        budget = fedq.Federation(first.federation).budget()
    finally:
        first.stop()
    built = first.text()
    # The example queries spent budget once, when the federation was built.
    assert (budget["spent_by_you"] > 0).all(), budget
    assert built.count("audit check-heads") == 1, built

    second = Demo(directory)
    try:
        after = fedq.Federation(second.federation).budget()
    finally:
        second.stop()
    again = second.text()
    assert "reusing the federation" in again, again
    assert "not running them again" in again, again
    assert again.count("audit check-heads") == 1, again
    assert list(after["spent_by_you"]) == list(budget["spent_by_you"]), (budget, after)
