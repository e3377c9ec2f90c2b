"""`jasper demo`'s report.html: the figures jasper.metrics computes for it, and a real short run
whose page parses, carries a PNG with data for each plot and shows the JSON report's values."""

from __future__ import annotations

import base64
import io
import json
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jasper.metrics import FIGURE_BINS, FIGURE_QUANTILES, fairness_analysis
from jasper.records import DELIVERY_DTYPE, SENT_DTYPE
from tests.test_demo import demo_argv, processes_mentioning


def records(m: int, e: int, *, late_every: int = 0, lost_every: int = 0) -> tuple[Any, Any]:
    """m messages 1 ms apart to e endpoints; hold 100 µs; arrival 10 µs + 1 µs per endpoint;
    every `late_every`-th message late at endpoint 0, every `lost_every`-th lost there."""
    sent = np.zeros(m, dtype=SENT_DTYPE)
    sent["stream_id"] = 1
    sent["seq"] = np.arange(m)
    sent["send_time_ns"] = 1_000_000_000 + np.arange(m) * 1_000_000
    sent["deadline_ns"] = sent["send_time_ns"] + 100_000
    rows = []
    for i in range(m):
        for j in range(e):
            if lost_every and j == 0 and i % lost_every == 0:
                continue
            arrival = int(sent["send_time_ns"][i]) + 10_000 + 1_000 * j
            if late_every and j == 0 and i % late_every == 1:
                arrival += 200_000
            deadline = int(sent["deadline_ns"][i])
            release = max(arrival, deadline + j)
            rows.append((f"e{j}", 1, 0, i, arrival, release, deadline, "", True))
    deliv = np.array(rows, dtype=DELIVERY_DTYPE) if rows else np.zeros(0, DELIVERY_DTYPE)
    return sent, deliv


def test_figures_agree_with_the_report_and_stay_bounded() -> None:
    sent, deliv = records(1000, 4, late_every=10, lost_every=25)
    subs = {1: [f"e{j}" for j in range(4)]}
    (report,), figures = fairness_analysis(sent, deliv, subs, taus_ns=(5_000,))
    for q, d in (
        (figures.oml, report.oml_ns),
        (figures.dws, report.dws_ns),
        (figures.release_error, report.release_error_ns),
    ):
        assert q.n == d.n and len(q.values_ns) == FIGURE_QUANTILES
        assert q.values_ns[-1] == d.max
        assert list(q.values_ns) == sorted(q.values_ns)
        mid = q.values_ns[FIGURE_QUANTILES // 2]
        # The middle order statistic sits within one value's rank of numpy's p50.
        assert d.p50 is not None and abs(mid - d.p50) <= 1_000
    b = figures.over_time
    assert len(b.messages) == FIGURE_BINS
    assert sum(b.messages) == report.messages == 1000
    assert sum(b.expected_pairs) == report.expected_pairs
    assert sum(b.late_pairs) == report.late_pairs == 100
    assert sum(b.lost_pairs) == report.lost_pairs == 40
    assert {h for h in b.hold_mean_ns if h is not None} == {100_000.0}
    assert b.bin_ns * FIGURE_BINS > 999 * 1_000_000
    # Ten times the messages: the figures keep their size.
    sent10, deliv10 = records(10_000, 4)
    _, big = fairness_analysis(sent10, deliv10, subs, taus_ns=(5_000,))
    assert len(big.oml.values_ns) == FIGURE_QUANTILES and big.oml.n == 10_000
    assert len(big.over_time.late_pairs) == FIGURE_BINS


def test_figures_with_nothing_sent() -> None:
    (report,), figures = fairness_analysis(
        np.zeros(0, SENT_DTYPE), np.zeros(0, DELIVERY_DTYPE), {1: ["e0"]}, taus_ns=(0,)
    )
    assert report.messages == 0 and figures.oml.n == 0 and figures.oml.values_ns == ()
    assert sum(figures.over_time.messages) == 0


class Page(HTMLParser):
    """The parts of report.html a reader relies on."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, str] = {}
        self.cells: dict[str, tuple[Any, str]] = {}
        self.node_rows: dict[str, list[str]] = {}
        self.tags: set[str] = set()
        self.urls: list[str] = []
        self._key: str | None = None
        self._value: str | None = None
        self._text: list[str] | None = None
        self._node: str | None = None
        self._heading: str | None = None
        self._last_h2_id: str | None = None
        self._table: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        for k in ("src", "href"):
            if a.get(k):
                self.urls.append(str(a[k]))
        if tag == "h2":
            self._last_h2_id = a.get("id")
        if tag == "img" and self._last_h2_id:
            self.images[self._last_h2_id.removeprefix("plot-")] = str(a["src"])
        if tag == "table":
            self._table = a.get("id")
        if tag == "tr" and a.get("data-key"):
            self._key = str(a["data-key"])
            if self._table == "data-paths":
                self._node = self._key
                self.node_rows[self._node] = []
        if tag == "td":
            self._text = []
            self._value = a.get("data-value")

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._text is not None:
            text = "".join(self._text)
            if self._value is not None and self._key is not None:
                self.cells[self._key] = (json.loads(self._value), text)
            elif self._node is not None:
                self.node_rows[self._node].append(text)
            self._text = None
        if tag == "tr":
            self._key = self._node = None


@pytest.mark.slow
def test_demo_writes_a_self_contained_report_with_plots_and_the_json_values(
    tmp_path: Path,
) -> None:
    from PIL import Image

    out = tmp_path / "demo"
    done = subprocess.run(
        demo_argv(out, "--control", "static", "--rate", "50", "--duration", "2"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    path = out / "report.html"
    assert f"report with plots: {path}" in done.stdout.splitlines()[-1]
    assert processes_mentioning(str(out)) == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["report_html"] == str(path)
    page = Page()
    page.feed(path.read_text())
    page.close()
    # Self-contained: images inline, nothing fetched, no script.
    assert "script" not in page.tags and "link" not in page.tags
    assert all(u.startswith("data:image/png;base64,") for u in page.urls), page.urls
    # One decodable PNG per plot, with something drawn: a blank figure of that size is a
    # few kB, and every plot has more than a handful of colours.
    assert set(page.images) == {"oml", "dws", "release_error", "lateness", "hold"}
    for key, src in page.images.items():
        data = base64.b64decode(src.removeprefix("data:image/png;base64,"))
        assert len(data) > 10_000, key
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200, key
            assert len(im.convert("RGB").getcolors(1 << 20) or []) > 20, key
    # The headline table shows the JSON report's values.
    fair = summary["fairness"]
    expected = {
        "p_fair": fair["p_fair"],
        "messages": fair["messages"],
        "endpoints": fair["endpoints"],
        "expected_pairs": fair["expected_pairs"],
        "late_pairs": fair["late_pairs"],
        "lost_pairs": fair["lost_pairs"],
        "unsynced_pairs": fair["unsynced_pairs"],
        "oml_ns.p50": fair["oml_ns"]["p50"],
        "dws_ns.p50": fair["dws_ns"]["p50"],
        "release_error_ns.p50": fair["release_error_ns"]["p50"],
        "offered_rate": summary["offered_rate"],
        "achieved_rate": summary["achieved_rate"],
        "messages_sent": summary["messages_sent"],
        "data_paths": summary["counters"]["data_paths"],
        **{f"p_fair@{t}": v["p_fair"] for t, v in summary["p_fair_by_tau_ns"].items()},
    }
    assert {k: v for k, (v, _) in page.cells.items()} == expected
    texts = {k: t for k, (_, t) in page.cells.items()}
    assert fair["messages"] == 100 and fair["lost_pairs"] == 0
    assert texts["p_fair"].startswith(f"{100 * fair['p_fair']:.1f}%")
    assert texts["late_pairs"].startswith(f"{fair['late_pairs']} (")
    assert texts["lost_pairs"] == "0 (0.000%)"
    assert texts["offered_rate"] == "50"
    assert texts["achieved_rate"] == f"{summary['achieved_rate']:.1f}"
    assert texts["oml_ns.p50"].startswith(f"{fair['oml_ns']['p50'] / 1000:.1f} / ")
    # Data path per node: every relay and receiver process, as its status file says.
    per_node = summary["data_path_per_node"]
    assert {p["kind"] for p in per_node.values()} == {"relay", "receiver"}
    assert page.node_rows == {n: [n, p["kind"], p["path"]] for n, p in per_node.items()}
    text = path.read_text()
    assert "none is subsampled" in text and "Static path: no controller" in text
