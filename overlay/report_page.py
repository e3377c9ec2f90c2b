"""The HTML report pages of `jasper demo` and `jasper emulate`: one self-contained file each,
matplotlib figures inlined as base64 PNG, tables, and the figures drawn from jasper.metrics'
FairnessFigures (nothing here computes OML, DWS or lateness itself)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jasper.metrics import FIGURE_BINS, FIGURE_QUANTILES, FairnessFigures, Quantiles

STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:auto}"
    "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
    "padding:3px 6px;text-align:right}th{background:#eee}th.key{text-align:left}"
    ".bad{color:#b00}.note{color:#555;font-size:13px}"
    "pre{background:#f6f6f6;padding:8px;overflow:auto}"
)

READING_THE_REPORT = "docs/metrics.md#reading-the-report"
"""Where the README-level explanation of the page's figures lives (relative to the checkout)."""


def data_paths(statuses: Mapping[str, Any]) -> str:
    """Which path each kind of node ran, e.g. "receivers native x2; relays ebpf x3; link
    model emulated at receivers" (from the processes' status files)."""
    rx: Counter[str] = Counter()
    relays: Counter[str] = Counter()
    where: set[str] = set()
    for s in statuses.values():
        if s.get("kind") == "receiver":
            rx[str(s.get("datapath", "python"))] += 1
        elif s.get("kind") == "relay":
            relays[str(s.get("fast_path", "user"))] += 1
            if s.get("link_model_at"):
                where.add(str(s["link_model_at"]))
    parts = ["receivers " + ", ".join(f"{k} x{v}" for k, v in sorted(rx.items()))]
    if relays:
        parts.append("relays " + ", ".join(f"{k} x{v}" for k, v in sorted(relays.items())))
    if where:
        parts.append("link model emulated at " + "/".join(sorted(where)))
    return "; ".join(parts)


def data_path_per_node(statuses: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Per relay and receiver process: its kind and the data path it ran (receivers: native
    or python; relays: ebpf or user), from its status file."""
    out: dict[str, dict[str, str]] = {}
    for name, s in statuses.items():
        if s.get("kind") == "receiver":
            out[name] = {"kind": "receiver", "path": str(s.get("datapath", "python"))}
        elif s.get("kind") == "relay":
            out[name] = {"kind": "relay", "path": str(s.get("fast_path", "user"))}
    return out


def page(title: str, body: Sequence[str]) -> str:
    """A whole HTML document: no script, no stylesheet or image fetched from anywhere."""
    return "\n".join(
        [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
            *body,
            "</body></html>",
        ]
    )


def img(png_b64: str, alt: str) -> str:
    return f"<img alt='{html.escape(alt, quote=True)}' src='data:image/png;base64,{png_b64}'>"


def pre(text: str) -> str:
    return "<pre>" + html.escape(text) + "</pre>"


def table_html(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            if isinstance(v, float):
                v = f"{v:.4g}"
            elif isinstance(v, list | tuple):
                v = ", ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in v)
            cells.append(f"<td>{html.escape('-' if v is None else str(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


# --- figures --------------------------------------------------------------------------------


def new_figure(width: float = 6.4, height: float = 3.6) -> tuple[Any, Any]:
    """A matplotlib figure and axes on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def png(fig: Any) -> str:
    """The figure as base64 PNG; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def cdf_line(ax: Any, q: Quantiles, label: str, colour: str | None = None) -> None:
    """One CDF through the kept order statistics (nothing drawn when there are no values)."""
    if q.n == 0:
        return
    x = np.asarray(q.values_ns, dtype=np.float64) / 1e3
    y = np.linspace(0.0, 1.0, len(x)) if len(x) > 1 else np.ones(1)
    ax.plot(x, y, label=f"{label} (n={q.n})", color=colour, drawstyle="steps-post")


def plot_cdf(
    lines: Sequence[tuple[str, str | None, Quantiles]], xlabel: str, *, symlog: bool = False
) -> str:
    """CDFs of one quantity, a line per (label, colour, quantiles)."""
    fig, ax = new_figure()
    for label, colour, q in lines:
        cdf_line(ax, q, label, colour)
    if not any(q.n for _, _, q in lines):
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("CDF")
    if symlog:
        ax.set_xscale("symlog", linthresh=10)
    ax.grid(alpha=0.3)
    if any(q.n for _, _, q in lines):
        ax.legend(fontsize=8)
    return png(fig)


def _bin_starts_s(f: FairnessFigures) -> np.ndarray:
    return np.arange(len(f.over_time.messages)) * f.over_time.bin_ns / 1e9


def plot_lateness_over_time(f: FairnessFigures) -> str:
    """Late and lost (message, endpoint) pairs per time bin, and late pairs as a share."""
    b = f.over_time
    t = _bin_starts_s(f)
    width = b.bin_ns / 1e9
    fig, ax = new_figure(7.5, 3.4)
    late = np.asarray(b.late_pairs)
    lost = np.asarray(b.lost_pairs)
    ax.bar(t, late, width=width, align="edge", color="#d62728", label="late pairs")
    ax.bar(t, lost, width=width, align="edge", bottom=late, color="#7f7f7f", label="lost pairs")
    ax.set_xlabel(f"send time since the first scored message, s (bins of {width * 1e3:.3g} ms)")
    ax.set_ylabel("pairs per bin")
    expected = np.asarray(b.expected_pairs, dtype=np.float64)
    share = np.where(expected > 0, 100 * late / np.maximum(1.0, expected), np.nan)
    ax2 = ax.twinx()
    ax2.plot(t + width / 2, share, ".", ms=3, color="black", label="late % of the bin's pairs")
    ax2.set_ylabel("late, % of pairs")
    ax2.set_ylim(bottom=0)
    ax.set_ylim(bottom=0, top=None if (late.any() or lost.any()) else 1)
    if not late.any() and not lost.any():
        ax.text(0.5, 0.5, "no late or lost pair", ha="center", va="center", transform=ax.transAxes)
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return png(fig)


def plot_hold_over_time(
    f: FairnessFigures, windows: Sequence[Mapping[str, Any]] = ()
) -> str | None:
    """The stamped hold (deadline − send) per bin, min-max band and mean; the controller's
    windows (hold it decided, at the time it decided) as dots. None without any sent message."""
    b = f.over_time
    sent = np.asarray(b.messages) > 0
    if not sent.any():
        return None
    t = _bin_starts_s(f) + b.bin_ns / 2e9

    def us(x: Sequence[float | None]) -> np.ndarray:
        return np.array([np.nan if v is None else v / 1e3 for v in x])

    fig, ax = new_figure(7.5, 3.2)
    ax.fill_between(
        t, us(b.hold_min_ns), us(b.hold_max_ns), color="#2ca02c", alpha=0.25, label="min-max"
    )
    ax.plot(t, us(b.hold_mean_ns), color="#2ca02c", label="stamped hold, mean per bin")
    ws = [w for w in windows if w.get("count", 1)]
    if ws:
        ax.plot(
            [w["t_s"] for w in ws],
            [w["hold_us"] for w in ws],
            "o",
            ms=3,
            color="black",
            label="controller window's hold",
        )
    ax.set_xlabel("send time since the first scored message, s")
    ax.set_ylabel("hold = deadline − send (µs)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


# --- the demo's page ------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _us(ns: float | None) -> str:
    return "-" if ns is None else f"{ns / 1000:.1f}"


def headline_rows(summary: Mapping[str, Any]) -> list[tuple[str, str, Any, str]]:
    """(key, label, value as in summary.json, text shown) of the demo's headline table."""
    f = summary["fairness"]
    rows: list[tuple[str, str, Any, str]] = []
    lo, hi = f["p_fair_ci"]
    rows.append(
        (
            "p_fair",
            f"P(F) at τ = {f['tau_ns'] / 1000:g} µs (headline) [95% Wilson CI]",
            f["p_fair"],
            f"{_pct(f['p_fair'])} [{100 * lo:.1f}–{100 * hi:.1f}%]",
        )
    )
    for tau, v in sorted(summary["p_fair_by_tau_ns"].items(), key=lambda kv: int(kv[0])):
        lo, hi = v["ci"]
        rows.append(
            (
                f"p_fair@{tau}",
                f"P(F) at τ = {int(tau) / 1000:g} µs [95% Wilson CI]",
                v["p_fair"],
                f"{_pct(v['p_fair'])} [{100 * lo:.1f}–{100 * hi:.1f}%]",
            )
        )
    rows.append(("messages", "messages scored (n)", f["messages"], str(f["messages"])))
    rows.append(("endpoints", "endpoints", f["endpoints"], str(f["endpoints"])))
    rows.append(
        (
            "expected_pairs",
            "(message, endpoint) pairs",
            f["expected_pairs"],
            str(f["expected_pairs"]),
        )
    )
    late_frac = f["late_fraction"]
    rows.append(
        (
            "late_pairs",
            "late pairs (first copy after the deadline)",
            f["late_pairs"],
            f"{f['late_pairs']} ({'-' if late_frac is None else f'{100 * late_frac:.3f}%'})",
        )
    )
    lost_frac = f["lost_fraction"]
    rows.append(
        (
            "lost_pairs",
            "lost pairs (never delivered)",
            f["lost_pairs"],
            f"{f['lost_pairs']} ({'-' if lost_frac is None else f'{100 * lost_frac:.3f}%'})",
        )
    )
    rows.append(
        (
            "unsynced_pairs",
            "pairs released unsynchronized",
            f["unsynced_pairs"],
            str(f["unsynced_pairs"]),
        )
    )
    for key, label in (
        ("oml_ns", "OML µs"),
        ("dws_ns", "DWS µs"),
        ("release_error_ns", "release error µs (release − deadline, on-time pairs)"),
    ):
        d = f[key]
        rows.append(
            (
                f"{key}.p50",
                f"{label} p50 / p99 / p99.9 / max",
                d["p50"],
                f"{_us(d['p50'])} / {_us(d['p99'])} / {_us(d['p999'])} / {_us(d['max'])}",
            )
        )
    offered, achieved = summary["offered_rate"], summary["achieved_rate"]
    rows.append(("offered_rate", "rate offered, msg/s", offered, f"{offered:g}"))
    rows.append(
        (
            "achieved_rate",
            "rate achieved, msg/s",
            achieved,
            "-" if achieved is None else f"{achieved:.1f}",
        )
    )
    rows.append(
        ("messages_sent", "messages sent", summary["messages_sent"], str(summary["messages_sent"]))
    )
    paths = summary["counters"].get("data_paths") or "-"
    rows.append(("data_paths", "data paths (by kind of node)", paths, paths))
    return rows


def _key_table(rows: Sequence[tuple[str, str, Any, str]], table_id: str) -> str:
    out = [f"<table id='{table_id}'>"]
    for key, label, value, text in rows:
        out.append(
            f"<tr data-key='{html.escape(key, quote=True)}'><th class='key'>"
            f"{html.escape(label)}</th><td data-value='"
            f"{html.escape(json.dumps(value, default=json_default), quote=True)}'>"
            f"{html.escape(text)}</td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def _clock_rows(summary: Mapping[str, Any], limit: int = 50) -> list[dict[str, Any]]:
    per = summary["clocks"]["per_receiver"]
    owd = summary["one_way_delay_us"]["per_receiver"]
    rows = []
    for h, c in list(per.items())[:limit]:
        o = owd.get(h) or {}
        rows.append(
            {
                "receiver": h,
                "injected offset µs": c["injected_offset_us"],
                "injected drift ppm": c["injected_drift_ppm"],
                "reported bound µs": c["reported_bound_us"],
                "status": c["reported_status"],
                "true release error p50 µs": c["true_release_error_p50_us"],
                "synced": None
                if c["synced_fraction"] is None
                else f"{100 * c['synced_fraction']:.0f}%",
                "OWD p50/p99 µs": None if not o else f"{o['p50']}/{o['p99']}",
            }
        )
    return rows


def demo_images(summary: Mapping[str, Any], figures: FairnessFigures) -> dict[str, str]:
    """The demo page's plots as base64 PNG, keyed oml, dws, release_error, lateness, hold."""
    images = {
        "oml": plot_cdf([("all endpoints", "#1f77b4", figures.oml)], "OML per message (µs)"),
        "dws": plot_cdf(
            [("all endpoints", "#1f77b4", figures.dws)], "DWS per message (µs)", symlog=True
        ),
        "release_error": plot_cdf(
            [("on-time pairs", "#1f77b4", figures.release_error)],
            "release error = release time − deadline, on-time pairs (µs)",
        ),
        "lateness": plot_lateness_over_time(figures),
    }
    hold = plot_hold_over_time(figures, summary.get("hold_over_time", {}).get("windows", []))
    if hold is not None:
        images["hold"] = hold
    return images


PLOTS = (
    ("oml", "OML distribution (CDF)"),
    ("dws", "DWS distribution (CDF)"),
    ("release_error", "Release error distribution (CDF)"),
    ("lateness", "Lateness over time"),
    ("hold", "The hold over time"),
)


def demo_page(
    summary: Mapping[str, Any], figures: FairnessFigures, images: Mapping[str, str]
) -> str:
    cfg = summary["config"]
    text = str(summary.get("text", ""))
    first = text.splitlines()[0] if text else ""
    body = ["<h1>Jasper demo report</h1>"]
    if "WARNING" in first:
        body.append(f"<p class='bad'><b>{html.escape(first.split('(', 1)[-1].rstrip(')'))}</b></p>")
    body.append(
        "<p>"
        + html.escape(
            f"N={cfg['receivers']} endpoints, F={cfg['fanout']}, H={cfg['hedge']}, "
            f"offered {cfg['rate']:g} msg/s for {cfg['duration_s']:g} s, hold "
            f"{cfg['hold_ns'] / 1000:g} µs ({cfg.get('hold_policy', 'fixed')}), "
            f"{cfg['control']} control path, link model "
            f"{'on' if cfg.get('link_model') else 'off'}"
            + (" (interrupted)" if summary.get("interrupted") else "")
        )
        + f". How to read it: <code>{READING_THE_REPORT}</code>.</p>"
    )
    body.append("<h2>Headline</h2>")
    body.append(_key_table(headline_rows(summary), "headline"))
    per_node = summary.get("data_path_per_node") or {}
    if per_node:
        body.append("<h2>Data path per node</h2>")
        body.append(
            "<table id='data-paths'><tr><th>process</th><th>kind</th><th>data path</th></tr>"
            + "".join(
                f"<tr data-key='{html.escape(n, quote=True)}'><td>{html.escape(n)}</td>"
                f"<td>{html.escape(str(p['kind']))}</td><td>{html.escape(str(p['path']))}</td></tr>"
                for n, p in per_node.items()
            )
            + "</table>"
        )
    b = figures.over_time
    body.append(
        "<p class='note'>Every figure covers every scored message; none is subsampled. "
        f"The CDFs are drawn through {FIGURE_QUANTILES} exact order statistics of all n values "
        f"and the time plots sum per-message outcomes in {FIGURE_BINS} bins of "
        f"{b.bin_ns / 1e6:.3g} ms, so the page's size and the memory drawing it take do not "
        "grow with rate or duration (jasper.metrics.FairnessFigures, computed in the same pass "
        "as the table).</p>"
    )
    for key, title in PLOTS:
        body.append(f"<h2 id='plot-{key}'>{html.escape(title)}</h2>")
        if key in images:
            body.append(img(images[key], title))
        elif key == "hold":
            body.append("<p class='note'>No message was sent, so no hold was stamped.</p>")
        if key == "hold":
            note = (
                "The hold is read from the records: the deadline the root stamped minus its send "
                "time, per message."
            )
            if summary.get("control") == "controller":
                note += (
                    " Dots: the hold the controller's deadline policy set at each of its windows "
                    "(constant under the fixed policy)."
                )
            else:
                note += " Static path: no controller, so the hold is the fixed --hold-us."
            body.append(f"<p class='note'>{html.escape(note)}</p>")
    clocks = _clock_rows(summary)
    if clocks:
        body.append("<h2>Clocks per receiver process</h2>")
        body.append(
            "<p class='note'>reported bound: the clock error bound the receiver's clock "
            "reported (|offset| + root dispersion + root delay / 2); true release error: median "
            "release − deadline of its on-time releases, on the host's kernel clock (the truth "
            "on one machine).</p>"
        )
        body.append(table_html(clocks, list(clocks[0])))
    body.append("<h2>The text report</h2>")
    body.append(pre(text))
    return page("Jasper demo report", body)


def write_demo_report(out_dir: Path, summary: Mapping[str, Any], figures: FairnessFigures) -> Path:
    """Write report.html beside the demo's summary.json; returns its path."""
    path = out_dir / "report.html"
    path.write_text(demo_page(summary, figures, demo_images(summary, figures)))
    return path
