"""`fedq query --plot` and `--save result.html` on a real federation: the
chart has one bar per row, bar lengths follow the values, and the page's
SVG says the same as its table."""

from __future__ import annotations

import re
import subprocess

from conftest import fedq_bin

SQL = "SELECT ageBroad, COUNT(*) FROM cases GROUP BY ageBroad"
WIDTH = 40  # fedq::chart::PLOT_WIDTH


def run_query(demo, *extra):
    r = subprocess.run(
        [
            str(fedq_bin()),
            "query",
            "--federation",
            str(demo.federation),
            "--epsilon",
            "0.5",
            *extra,
            SQL,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_plot_draws_one_bar_per_row_proportional_to_its_value(demo, fed):
    keys = list(fed.schema().query("node == 'ngo-north' and column == 'ageBroad'")["domain"].iloc[0])
    keys.append("(missing)")
    out = run_query(demo, "--plot").stdout
    chart = out[out.index("COUNT(*)  (bars from 0 to ") :]
    header, *lines = chart.strip().splitlines()
    top = float(re.search(r"bars from 0 to (\d+)", header).group(1))
    assert len(lines) == len(keys), chart
    values = []
    for key, line in zip(keys, lines):
        label, bar, tail = line.split("│")
        assert label.strip() == key, line
        assert len(bar) == WIDTH, line
        value, low, high = map(float, re.match(r" (-?\d+) \[(-?\d+), (-?\d+)\]", tail).groups())
        assert low <= value <= high
        cells = sum(ch in "█▒" for ch in bar)
        assert cells == round(max(value, 0) / top * WIDTH), (line, top)
        assert "┤" in bar or "▒" in bar, line  # every bar has its whisker
        values.append(value)
    assert top >= max(values)


def test_save_html_writes_a_self_contained_page_with_the_chart(demo, tmp_path):
    page_path = tmp_path / "result.html"
    r = run_query(demo, "--save", str(page_path))
    assert "saved to" in r.stderr
    page = page_path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "src=" not in page and "href=" not in page
    assert page.count("<svg") == 1
    bars = re.findall(r'<rect class="bar"[^>]*>', page)
    rows = re.findall(r"<tr><td>([^<]*)</td><td class=\"n\">(-?\d+)</td>", page)
    assert len(bars) == len(rows) == 10, (len(bars), len(rows))
    widths = [float(re.search(r' width="([^"]+)"', b).group(1)) for b in bars]
    shown = [float(re.search(r'data-value="([^"]+)"', b).group(1)) for b in bars]
    highs = [float(re.search(r'data-ci-high="([^"]+)"', b).group(1)) for b in bars]
    # The table and the chart show the same values.
    assert [float(v) for _, v in rows] == shown
    top = max(highs)
    for w, v in zip(widths, shown):
        assert abs(w - max(v, 0) / top * 480.0) < 0.01, (w, v, top)
