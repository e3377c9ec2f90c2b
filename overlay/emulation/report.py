"""The emulation's report: per-message pair matrices, the side-by-side table, JSON, and an HTML
page with matplotlib plots embedded as PNG (page, table and CDF code shared with the demo in
overlay/report_page.py)."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jasper.metrics import FairnessFigures, FairnessReport, fairness_analysis, pair_matrices
from jasper.records import DELIVERY_DTYPE, Releases, releases_from_deliveries
from overlay.report_page import json_default as _json_default
from overlay.report_page import page, plot_cdf, png, table_html

NO_DEADLINE_NS = np.iinfo(np.int64).max
"""Deadline given to the metrics for schemes that have none: nothing is late, and their release
error is not reported (it would measure nothing)."""


@dataclass(frozen=True)
class PairMatrix:
    """Messages x endpoints of one configuration, from the records (the lead's definitions)."""

    endpoints: tuple[str, ...]
    send_ns: np.ndarray
    """(m,) root send time of each message."""
    deadline_ns: np.ndarray
    """(m,) deadline stamped in the header (0 = none)."""
    arrival_ns: np.ndarray
    """(m, e) first accepted arrival, -1 when lost."""
    release_ns: np.ndarray
    """(m, e) release time, -1 when lost."""

    @property
    def got(self) -> np.ndarray:
        return np.asarray(self.arrival_ns >= 0)

    def late(self, has_deadline: bool) -> np.ndarray:
        if not has_deadline:
            return np.zeros(self.arrival_ns.shape, dtype=bool)
        return np.asarray(self.got & (self.arrival_ns > self.deadline_ns[:, None]))

    def oml_ns(self) -> np.ndarray:
        """Slowest endpoint's first arrival − send time, messages delivered everywhere."""
        complete = self.got.all(axis=1)
        return np.asarray((self.arrival_ns[complete] - self.send_ns[complete, None]).max(axis=1))

    def dws_ns(self) -> np.ndarray:
        """Latest − earliest release, messages delivered everywhere."""
        complete = self.got.all(axis=1)
        r = self.release_ns[complete]
        return np.asarray(r.max(axis=1) - r.min(axis=1)) if len(r) else np.zeros(0, np.int64)

    def release_error_ns(self, has_deadline: bool) -> np.ndarray:
        if not has_deadline:
            return np.zeros(0, dtype=np.int64)
        on_time = self.got & ~self.late(True)
        return np.asarray((self.release_ns - self.deadline_ns[:, None])[on_time])


def pair_matrix(
    sent: np.ndarray, deliveries: np.ndarray | Releases, endpoints: Sequence[str]
) -> PairMatrix:
    """Build the matrix; `sent` rows in send order define the messages (session, seq).

    `deliveries` is Releases (one record per datagram and endpoint, standing for `count`
    messages) or per-message DELIVERY_DTYPE rows. When a pair has several records (there
    should be one), the earliest arrival wins."""
    sent = sent[np.argsort(sent["send_time_ns"], kind="stable")]
    names = tuple(endpoints)
    mats = pair_matrices(sent, names, as_releases(deliveries))
    return PairMatrix(
        endpoints=names,
        send_ns=sent["send_time_ns"].astype(np.int64),
        deadline_ns=sent["deadline_ns"].astype(np.int64),
        arrival_ns=mats.arrival_ns,
        release_ns=mats.release_ns,
    )


def as_releases(deliveries: np.ndarray | Releases) -> Releases:
    if isinstance(deliveries, Releases):
        return deliveries
    return releases_from_deliveries(deliveries.astype(DELIVERY_DTYPE))


def config_fairness(
    sent: np.ndarray,
    deliveries: np.ndarray | Releases,
    endpoints: Sequence[str],
    *,
    stream_id: int,
    has_deadline: bool,
    tau_ns: int,
) -> FairnessReport:
    """The lead's fairness report; schemes without a deadline get NO_DEADLINE_NS so that
    nothing counts as late (their release error is then meaningless and dropped)."""
    return config_analysis(
        sent,
        deliveries,
        endpoints,
        stream_id=stream_id,
        has_deadline=has_deadline,
        tau_ns=tau_ns,
    )[0]


def config_analysis(
    sent: np.ndarray,
    deliveries: np.ndarray | Releases,
    endpoints: Sequence[str],
    *,
    stream_id: int,
    has_deadline: bool,
    tau_ns: int,
) -> tuple[FairnessReport, FairnessFigures]:
    """`config_fairness` and its figures (jasper.metrics.fairness_analysis); without a
    deadline the release error and hold figures measure nothing and are not to be drawn."""
    releases = as_releases(deliveries)
    if not has_deadline:
        sent = sent.copy()
        sent["deadline_ns"] = NO_DEADLINE_NS
        recs = releases.records.copy()
        recs["deadline_ns"] = NO_DEADLINE_NS
        releases = Releases(recs, releases.endpoints, releases.parents)
    (report,), figures = fairness_analysis(
        sent, releases, {stream_id: list(endpoints)}, taus_ns=(tau_ns,)
    )
    return report, figures


@dataclass
class ConfigResult:
    """One configuration's blocks, merged."""

    name: str
    """unicast, tree-h0, tree-nohold, jasper (the simulator's names)."""
    description: str
    has_deadline: bool
    fairness: FairnessReport
    matrix: PairMatrix
    blocks: int
    offered_rate: float
    """Messages per second the publisher was asked for."""
    achieved_rate: float
    """Messages sent / time from first to last send, averaged over blocks."""
    cpu_fraction: float
    """Machine CPU busy fraction (all cores, softirq included) during the blocks."""
    per_endpoint_late: dict[str, int] = field(default_factory=dict)
    figures: FairnessFigures | None = None
    """The distributions to plot, from the same pass as `fairness` (None: not drawn)."""

    def row(self) -> dict[str, Any]:
        f = self.fairness
        rel = f.release_error_ns if self.has_deadline else None
        return {
            "config": self.name,
            "description": self.description,
            "blocks": self.blocks,
            "messages": f.messages,
            "tau_us": f.tau_ns / 1e3,
            "p_fair": f.p_fair,
            "p_fair_ci": list(f.p_fair_ci),
            "oml_p50_us": _us(f.oml_ns.p50),
            "oml_p99_us": _us(f.oml_ns.p99),
            "dws_p50_us": _us(f.dws_ns.p50),
            "dws_p99_us": _us(f.dws_ns.p99),
            "late_pairs": f.late_pairs if self.has_deadline else None,
            "late_fraction": f.late_fraction if self.has_deadline else None,
            "lost_pairs": f.lost_pairs,
            "expected_pairs": f.expected_pairs,
            "release_err_p50_us": _us(rel.p50) if rel else None,
            "release_err_p99_us": _us(rel.p99) if rel else None,
            "offered_rate": round(self.offered_rate, 2),
            "achieved_rate": round(self.achieved_rate, 2),
            "cpu_percent": round(100 * self.cpu_fraction, 1),
        }


def _us(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1e3, 1)


def table_taus_us(headline_us: float) -> list[float]:
    """Columns of the P(F) table: the headline tau and the ladder's taus within a factor of
    ten either side, so the reader sees where each configuration's P(F) rises."""
    near = [float(t) for t in TAU_LADDER_US if headline_us / 10 <= t <= headline_us * 10]
    return sorted({*near, float(headline_us)})


def p_fair_columns(c: ConfigResult, taus_us: Sequence[float]) -> list[dict[str, Any]]:
    """P(F) with n and its Wilson 95% interval at each of `taus_us`."""
    from jasper.metrics import wilson_interval

    n = len(c.matrix.send_ns)
    out = []
    for tau_us, p in zip(taus_us, p_fair_curve(c, [int(t * 1000) for t in taus_us]), strict=True):
        lo, hi = wilson_interval(round(p * n), n)
        out.append({"tau_us": tau_us, "n": n, "p_fair": p, "ci": [lo, hi]})
    return out


def format_pfair_table(rows: Sequence[Mapping[str, Any]], headline_us: float) -> str:
    """P(F) [95% Wilson CI] per configuration at several tau; the headline tau starred."""
    taus = [c["tau_us"] for c in rows[0]["p_fair_at"]] if rows else []
    head = f"{'config':<14} {'n':>6}" + "".join(
        f"{('*' if t == headline_us else '') + f'tau {t / 1000:g} ms':>23}" for t in taus
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for c in r["p_fair_at"]:
            lo, hi = c["ci"]
            text = f"{100 * c['p_fair']:.1f}% [{100 * lo:.1f}–{100 * hi:.1f}]"
            cells.append(f"{text:>23}")
        lines.append(f"{r['config']:<14} {r['messages']:>6}" + "".join(cells))
    return "\n".join(lines)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The side-by-side table as plain text."""
    head = (
        f"{'config':<14} {'n':>6} {'P(F)':>7} {'95% CI':>15} {'tau µs':>7} "
        f"{'OML p50/p99 µs':>16} {'DWS p50/p99 µs':>16} {'late':>8} {'lost':>6} "
        f"{'rel.err p50/p99 µs':>19} {'rate off/ach':>13} {'CPU%':>5} {'own%':>5} {'ctl%':>5}"
    )
    lines = [head, "-" * len(head)]

    def pair(a: Any, b: Any) -> str:
        def one(x: Any) -> str:
            return "-" if x is None else f"{x:.0f}"

        return f"{one(a)}/{one(b)}"

    for r in rows:
        pf = "-" if r["p_fair"] is None else f"{100 * r['p_fair']:.1f}%"
        lo, hi = r["p_fair_ci"]
        late = "-" if r["late_pairs"] is None else str(r["late_pairs"])
        rate = f"{r['offered_rate']:g}/{r['achieved_rate']:g}"
        lines.append(
            f"{r['config']:<14} {r['messages']:>6} {pf:>7} "
            f"{f'{100 * lo:.1f}–{100 * hi:.1f}%':>15} {r['tau_us']:>7g} "
            f"{pair(r['oml_p50_us'], r['oml_p99_us']):>16} "
            f"{pair(r['dws_p50_us'], r['dws_p99_us']):>16} {late:>8} {r['lost_pairs']:>6} "
            f"{pair(r['release_err_p50_us'], r['release_err_p99_us']):>19} "
            f"{rate:>13} {r['cpu_percent']:>5} {r.get('own_cpu_percent', '-')!s:>5} "
            f"{r.get('controller_cpu_percent', '-')!s:>5}"
        )
    return "\n".join(lines)


# --- plots ----------------------------------------------------------------------------------

_COLOURS = {
    "unicast": "#7f7f7f",
    "tree-h0": "#ff7f0e",
    "tree-nohold": "#1f77b4",
    "jasper": "#2ca02c",
    "jasper-file": "#9467bd",
    "jasper-agents": "#9467bd",
}


def _png(fig: Any) -> str:
    return png(fig)


def plot_cdfs(configs: Sequence[ConfigResult]) -> dict[str, str]:
    """CDFs of OML, DWS and release error per configuration, from each one's FairnessFigures
    (configurations without figures are left out; without a deadline, so is release error)."""
    with_figures = [(c, c.figures) for c in configs if c.figures is not None]
    return {
        "oml": plot_cdf(
            [(c.name, _COLOURS.get(c.name), f.oml) for c, f in with_figures],
            "OML per message (µs)",
        ),
        "dws": plot_cdf(
            [(c.name, _COLOURS.get(c.name), f.dws) for c, f in with_figures],
            "DWS per message (µs)",
            symlog=True,
        ),
        "release_error": plot_cdf(
            [
                (c.name, _COLOURS.get(c.name), f.release_error)
                for c, f in with_figures
                if c.has_deadline
            ],
            "release error, on-time pairs (µs)",
        ),
    }


def plot_pfair(configs: Sequence[ConfigResult]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    names = [c.name for c in configs]
    p = np.array([100 * (c.fairness.p_fair or 0.0) for c in configs])
    lo = np.array([100 * c.fairness.p_fair_ci[0] for c in configs])
    hi = np.array([100 * c.fairness.p_fair_ci[1] for c in configs])
    ax.bar(names, p, color=[_COLOURS.get(n, "#999") for n in names])
    # Wilson bounds can sit a rounding error inside p (p = 0 or 1): clamp to >= 0.
    yerr = [np.maximum(0.0, p - lo), np.maximum(0.0, hi - p)]
    ax.errorbar(names, p, yerr=yerr, fmt="none", ecolor="black", capsize=6)
    tau = configs[0].fairness.tau_ns / 1e3 if configs else 0
    ax.set_ylabel(f"P(F) %, tau = {tau:g} µs, 95% Wilson CI")
    ax.set_ylim(0, 100)
    for i, c in enumerate(configs):
        ax.text(i, p[i] + 1, f"{p[i]:.1f}%\nn={c.fairness.messages}", ha="center", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


TAU_LADDER_US = (10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)
"""Thresholds at which P(F) is also reported, so no single choice of tau hides anything."""


def p_fair_curve(c: ConfigResult, taus_ns: Sequence[int]) -> list[float]:
    """P(F) at each tau from the pair matrix (no lost, no late, DWS <= tau), all messages."""
    m = c.matrix
    n = len(m.send_ns)
    if n == 0:
        return [0.0 for _ in taus_ns]
    got = m.got
    ok = got.all(axis=1) & ~m.late(c.has_deadline).any(axis=1)
    rel = np.where(got, m.release_ns, 0)
    big = np.iinfo(np.int64).max
    lo = np.where(got, m.release_ns, big).min(axis=1)
    dws = rel.max(axis=1) - lo
    return [float((ok & (dws <= t)).sum()) / n for t in taus_ns]


def p_fair_ladder(configs: Sequence[ConfigResult]) -> list[dict[str, Any]]:
    """P(F) with n and its Wilson 95% interval at every tau of TAU_LADDER_US, per config."""
    from jasper.metrics import wilson_interval

    rows = []
    for c in configs:
        n = len(c.matrix.send_ns)
        for tau_us, p in zip(
            TAU_LADDER_US, p_fair_curve(c, [t * 1000 for t in TAU_LADDER_US]), strict=True
        ):
            lo, hi = wilson_interval(round(p * n), n)
            rows.append({"config": c.name, "tau_us": tau_us, "n": n, "p_fair": p, "ci": [lo, hi]})
    return rows


def format_ladder(rows: Sequence[Mapping[str, Any]], taus_us: Sequence[int]) -> str:
    """P(F) [95% CI] per configuration (rows) and tau (columns)."""
    configs = list(dict.fromkeys(r["config"] for r in rows))
    cell = {(r["config"], r["tau_us"]): r for r in rows}
    head = f"{'P(F) at tau':<14}" + "".join(f"{f'{t / 1000:g} ms':>22}" for t in taus_us)
    lines = [head]
    for c in configs:
        parts = []
        for t in taus_us:
            r = cell.get((c, t))
            if r is None:
                parts.append(f"{'-':>22}")
                continue
            lo, hi = r["ci"]
            pf = 100 * r["p_fair"]
            text = f"{pf:.1f}% [{100 * lo:.1f}–{100 * hi:.1f}]"
            parts.append(f"{text:>22}")
        lines.append(f"{c:<14}" + "".join(parts))
    return "\n".join(lines)


def plot_pfair_curve(configs: Sequence[ConfigResult], tau_ns: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jasper.metrics import wilson_interval

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    taus = np.logspace(1, 5.3, 60) * 1e3
    for c in configs:
        n = len(c.matrix.send_ns)
        p = np.array(p_fair_curve(c, [int(t) for t in taus]))
        lo = np.array([wilson_interval(round(x * n), n)[0] for x in p])
        hi = np.array([wilson_interval(round(x * n), n)[1] for x in p])
        colour = _COLOURS.get(c.name)
        ax.plot(taus / 1e3, 100 * p, label=c.name, color=colour)
        ax.fill_between(taus / 1e3, 100 * lo, 100 * hi, color=colour, alpha=0.2)
    ax.axvline(tau_ns / 1e3, color="black", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("tau (µs): a message is fair when no endpoint is late or lost and DWS <= tau")
    ax.set_ylabel("P(F) %, 95% CI band")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_hold(configs: Sequence[ConfigResult]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    for c in configs:
        if not c.has_deadline:
            continue
        m = c.matrix
        if not len(m.send_ns):
            continue
        t = (m.send_ns - m.send_ns[0]) / 1e9
        ax.plot(
            t,
            (m.deadline_ns - m.send_ns) / 1e3,
            ".",
            ms=2,
            label=c.name,
            color=_COLOURS.get(c.name),
        )
        oml = np.where(m.got.all(axis=1), (m.arrival_ns - m.send_ns[:, None]).max(axis=1), -1)
        sel = oml >= 0
        ax.plot(t[sel], oml[sel] / 1e3, ",", alpha=0.4, color=_COLOURS.get(c.name))
    ax.set_xlabel("time since the configuration's first message, s (blocks concatenated)")
    ax.set_ylabel("hold = deadline − send (µs); dots: OML")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_lateness(configs: Sequence[ConfigResult]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    for c in configs:
        if not c.has_deadline:
            continue
        late = c.matrix.late(True)
        frac = 100 * late.mean(axis=0) if late.size else np.zeros(0)
        ax.plot(np.arange(len(frac)), frac, ".", ms=3, label=c.name, color=_COLOURS.get(c.name))
    ax.set_xlabel("endpoint index (e0..)")
    ax.set_ylabel("late pairs, % of messages")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_tree(
    levels: Sequence[Sequence[str]],
    edges: Sequence[tuple[str, str, bool]],
    leaves: Sequence[str],
    host_of: Mapping[str, str],
    lemons: set[str],
    killed: set[str],
) -> str:
    """The relay tree by level; hedge edges faint; lemon VMs red; killed nodes crossed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = len(levels)
    pos: dict[str, tuple[float, float]] = {}
    for lvl, names in enumerate(levels):
        for i, n in enumerate(names):
            pos[n] = ((i + 0.5) / len(names), float(depth - lvl))
    for i, n in enumerate(leaves):
        pos[n] = ((i + 0.5) / max(1, len(leaves)), 0.0)
    fig, ax = plt.subplots(figsize=(12, 5))
    for hedge in (True, False):
        segs = [(pos[a], pos[b]) for a, b, h in edges if h == hedge and a in pos and b in pos]
        if not segs:
            continue
        from matplotlib.collections import LineCollection

        ax.add_collection(
            LineCollection(
                segs,
                colors="#bbbbbb" if hedge else "#444444",
                linewidths=0.2 if hedge else 0.5,
                alpha=0.35 if hedge else 0.8,
            )
        )
    relays = [n for lvl in levels for n in lvl]
    for group, colour, size in ((relays, "#1f77b4", 18), (list(leaves), "#2ca02c", 3)):
        xs = [pos[n][0] for n in group]
        ys = [pos[n][1] for n in group]
        cs = ["#d62728" if (n in lemons or host_of.get(n, "") in lemons) else colour for n in group]
        ax.scatter(xs, ys, s=size, c=cs, zorder=3)
    for n in killed:
        if n in pos:
            ax.scatter([pos[n][0]], [pos[n][1]], s=80, marker="x", c="black", zorder=4)
    ax.set_yticks(range(depth + 1))
    ax.set_yticklabels(["endpoints"] + [f"level {depth - 1 - i}" for i in range(depth)])
    ax.set_xticks([])
    ax.set_title(
        "relay tree (dark: own-child edges; light: hedge edges; red: lemon VMs; x: killed)"
    )
    return _png(fig)


# --- HTML -----------------------------------------------------------------------------------


def _table_html(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    return table_html(rows, columns)


def write_report(out_dir: Path, doc: Mapping[str, Any], images: Mapping[str, str]) -> Path:
    """Write report.json (doc) and report.html (doc's tables + the PNG images)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(doc, indent=2, default=_json_default))
    parts = ["<h1>Jasper emulation on network namespaces</h1>"]
    summary = doc.get("summary", {})
    parts.append("<pre>" + html.escape(json.dumps(summary, indent=2, default=_json_default)))
    parts.append("</pre>")
    if not doc.get("timing_valid", True):
        parts.append(
            "<p class='bad'><b>Not valid for timing figures:</b> machine CPU stayed above "
            f"{doc.get('cpu_limit_percent', 60)}% during the measured blocks.</p>"
        )
    cal = summary.get("calibration") or {}
    parts.append(
        f"<p>Headline tau {summary.get('tau_us')} µs, from {summary.get('tau_from', '?')}"
        + (
            f": the calibration block's DWS p90 (p50/p90/p99 {cal.get('dws_p50_us')}/"
            f"{cal.get('dws_p90_us')}/{cal.get('dws_p99_us')} µs, every copy early, one "
            "message at a time), rounded up to 1, 2 or 5 x 10^k µs"
            if cal
            else ""
        )
        + ". The first table gives P(F) at several tau (*: the headline).</p>"
    )
    parts.append("<h2>Configurations side by side</h2>")
    parts.append("<pre>" + html.escape(str(doc.get("table_text", ""))) + "</pre>")
    paths = summary.get("data_paths") or {}
    if paths:
        parts.append(
            "<p>Data paths (from every node's status): "
            + "; ".join(
                f"<b>{html.escape(str(c))}</b>: {html.escape(' | '.join(p) or '-')}"
                for c, p in paths.items()
            )
            + ".</p>"
        )
    parts.append("<h3>P(F) [95% Wilson CI] at other thresholds tau</h3>")
    parts.append("<pre>" + html.escape(str(doc.get("ladder_text", ""))) + "</pre>")
    for key, title in (
        ("pfair", "P(F) per configuration (95% Wilson CI)"),
        ("pfair_curve", "P(F) against tau (dotted: the table's tau)"),
        ("oml", "CDF of OML"),
        ("dws", "CDF of DWS"),
        ("release_error", "CDF of release error"),
        ("hold", "Hold over time"),
        ("lateness", "Lateness per endpoint"),
        ("tree", "The tree"),
    ):
        if key in images:
            parts.append(f"<h2>{html.escape(title)}</h2>")
            parts.append(f"<img src='data:image/png;base64,{images[key]}'>")
    faults = doc.get("faults", [])
    if faults:
        parts.append("<h2>Faults and what they cost</h2>")
        parts.append(
            _table_html(
                faults,
                [
                    "fault",
                    "config",
                    "messages",
                    "late_pairs",
                    "lost_pairs",
                    "victim_pairs",
                    "affected_messages",
                    "recovery_ms",
                    "corrected_after_ms",
                    "victim_mistimed_per_endpoint",
                    "others_mistimed_per_endpoint",
                    "victim_release_error_max_us",
                    "error",
                ],
            )
        )
    procs = doc.get("processes", [])
    if procs:
        parts.append("<h2>Processes (CPU and peak memory)</h2>")
        parts.append(
            _table_html(procs, ["role", "count", "cpu_s_total", "cpu_s_max", "maxrss_mb_max"])
        )
    parts.append("<h2>Settings</h2><pre>")
    parts.append(html.escape(json.dumps(doc.get("settings", {}), indent=2)) + "</pre>")
    path = out_dir / "report.html"
    path.write_text(page("Jasper emulation", parts))
    return path
