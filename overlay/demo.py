"""The single-host demo: plan a tree, run it as real processes, and report its fairness."""

from __future__ import annotations

import contextlib
import glob
import json
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from overlay.common import write_json
from overlay.launch import Cluster, free_port_base

DEMO_LINK_MODEL: dict[str, Any] = {
    "seed": 1,
    "median_ns": 40_000,
    "p99_ns": 120_000,
    "spike_prob": 0.001,
    "spike_min_ns": 300_000,
    "spike_max_ns": 1_500_000,
    "loss": 0.0,
    "lemon_fraction": 0.05,
    "lemon_factor": 2.0,
}
"""An in-region cloud link: ~40 µs median one way, a long tail, rare stalls, a few lemons."""


@dataclass(frozen=True)
class DemoConfig:
    """What `jasper demo` runs."""

    receivers: int = 100
    """Endpoints N (leaves of the tree)."""
    fanout: int = 10
    """Fan-out F."""
    hedge: int = 2
    """Sibling hedging H."""
    rate: float = 100.0
    """Offered messages per second."""
    duration_s: float = 10.0
    """Publishing time in seconds."""
    hold_ns: int = 5_000_000
    """deadline − send time, in nanoseconds."""
    tau_ns: int = 50_000
    """DWS threshold of P(F), in nanoseconds."""
    warmup_messages: int = 0
    """Messages left out of the statistics at the start."""
    link_model: Mapping[str, Any] | None = None
    """Link model document (None = off)."""
    endpoints_per_receiver: int = 20
    """Endpoints hosted by one receiver process."""
    relays_per_process: int = 6
    """Relay nodes hosted by one relay process (the root runs alone)."""
    addr: str = "127.0.0.1"
    """Loopback address every node binds."""
    drain_s: float = 10.0
    """After the last message, stop once no endpoint has accepted anything for this long, in
    seconds; normally the run stops as soon as every pair is accepted."""
    fast_path: str = "auto"
    """--fast-path for relays and receivers."""
    realtime: bool = True
    """Run relays' and receivers' event loops (and release threads) in SCHED_FIFO."""
    deliver: str = "memory"
    """memory: hand messages over in process; udp: send each to a local UDP port per endpoint."""


TAU_LADDER_NS = (100_000, 500_000, 1_000_000)
"""Further DWS thresholds the report gives P(F) at (ns)."""


class _Interrupted(Exception):
    pass


def _progress_bar(done: int, total: int, elapsed: float, duration: float) -> str:
    width = 30
    frac = 0.0 if total <= 0 else min(1.0, done / total)
    fill = int(frac * width)
    return (
        f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} msgs  "
        f"{min(elapsed, duration):5.1f}/{duration:.1f} s"
    )


def run_demo(cfg: DemoConfig, out: Path, *, stream: Any = sys.stderr) -> dict[str, Any]:
    """Run the demo, write records and summary.json into `out`, return the summary."""
    from jasper.layout import ports_needed, relay_groups, topology_from_plan
    from jasper.tree import tree_shape

    out.mkdir(parents=True, exist_ok=True)
    plan = tree_shape(cfg.receivers, fanout=cfg.fanout, hedge=cfg.hedge)
    n_ports = ports_needed(plan)
    deliver_ports = cfg.receivers if cfg.deliver == "udp" else 0
    base = free_port_base(cfg.addr, n_ports + deliver_ports)
    topo = topology_from_plan(
        plan,
        addr=cfg.addr,
        port_base=base,
        endpoints_per_receiver=cfg.endpoints_per_receiver,
        hold_ns=cfg.hold_ns,
        link_model=cfg.link_model,
        deliver_port_base=base + n_ports if cfg.deliver == "udp" else None,
    )
    topo_path = out / "topology.json"
    write_json(topo_path, topo.to_dict())
    groups = relay_groups(plan, cfg.relays_per_process)
    print(
        f"jasper demo: N={cfg.receivers} endpoints, F={cfg.fanout}, H={cfg.hedge}, "
        f"depth {plan.depth}, {len(plan.relays())} relays in {len(groups)} processes, "
        f"{len(topo.receivers)} receiver processes; rate {cfg.rate:g} msg/s for "
        f"{cfg.duration_s:g} s, hold {cfg.hold_ns / 1000:g} µs, link model "
        f"{'on' if cfg.link_model else 'off'}; output {out}",
        file=stream,
    )

    interrupted = False

    def on_signal(signum: int, _frame: Any) -> None:
        raise _Interrupted(signum)

    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    cluster = Cluster(topo_path, out)
    started = time.monotonic()
    try:
        fp = ("--fast-path", cfg.fast_path, "--status-interval", "1.0")
        for g in groups:
            cluster.add_relay(g, *fp, *(("--realtime",) if cfg.realtime else ()))
        rx_extra: tuple[str, ...] = ("--deliver", "topology" if cfg.deliver == "udp" else "memory")
        if not cfg.realtime:
            rx_extra += ("--no-realtime",)
        sinks: list[Any] = []
        if cfg.deliver == "udp":
            sinks = _open_sinks(cfg.addr, base + n_ports, cfg.receivers)
        for h in topo.receivers:
            cluster.add_receiver(h.name, *fp, *rx_extra)
        cluster.wait_ready()
        startup_s = time.monotonic() - started
        total = int(cfg.rate * cfg.duration_s)
        pub = cluster.add_publisher(
            "--rate",
            str(cfg.rate),
            "--duration",
            str(cfg.duration_s),
            *(("--realtime",) if cfg.realtime else ()),
        )
        progress_file = out / "progress"
        t0 = time.monotonic()
        assert pub.proc is not None
        while pub.proc.poll() is None:
            done = 0
            with contextlib.suppress(OSError, ValueError):
                done = int(progress_file.read_text() or 0)
            stream.write(_progress_bar(done, total, time.monotonic() - t0, cfg.duration_s))
            stream.flush()
            time.sleep(0.2)
        stream.write(_progress_bar(total, total, cfg.duration_s, cfg.duration_s) + "\n")
        _drain(out, cfg, len(topo.endpoints()), stream)
    except _Interrupted:
        interrupted = True
        stream.write("\ninterrupted: stopping every process\n")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            cluster.stop()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
    summary = summarize(out, topo_subscriptions(topo), cfg)
    summary["startup_s"] = locals().get("startup_s")
    summary["interrupted"] = interrupted
    summary["exit_codes"] = {
        c.name: (c.proc.returncode if c.proc is not None else None) for c in cluster.children
    }
    write_json(out / "summary.json", summary)
    (out / "report.txt").write_text(summary["text"] + "\n")
    for s in locals().get("sinks", []):
        s.close()
    return summary


def _accepted_pairs(out: Path) -> int:
    n = 0
    for p in glob.glob(str(out / "status-receiver-*.json")):
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(Path(p).read_text())
            n += sum(int(c.get("accepted", 0)) for c in doc.get("endpoints", {}).values())
    return n


def _drain(out: Path, cfg: DemoConfig, endpoints: int, stream: Any) -> None:
    """Wait until every endpoint has accepted every message sent, or progress stops.

    On a busy host the tree can fall behind the publisher; stopping at a fixed time would cut
    off messages still in flight and count them lost.
    """
    try:
        sent = int(json.loads((out / "status-publisher.json").read_text())["messages"])
    except (OSError, ValueError, KeyError):
        sent = int(cfg.rate * cfg.duration_s)
    expected = sent * endpoints
    last, last_change = -1, time.monotonic()
    give_up = time.monotonic() + max(60.0, 3 * cfg.duration_s)
    while time.monotonic() < give_up:
        got = _accepted_pairs(out)
        if got >= expected:
            break
        if got != last:
            last, last_change = got, time.monotonic()
        elif time.monotonic() - last_change > max(10.0, cfg.drain_s):
            # A shared host can stall a process for seconds; only a long silence ends it.
            break
        stream.write(f"\rdraining: {got}/{expected} (message, endpoint) pairs accepted")
        stream.flush()
        time.sleep(0.25)
    if last >= 0:
        stream.write("\n")
    # The last accepted messages are held until their deadline; the stop releases the rest.
    time.sleep(cfg.hold_ns / 1e9 + 0.2)


def _open_sinks(addr: str, base: int, n: int) -> list[Any]:
    """UDP sockets standing in for the MPs' applications (deliver=udp)."""
    import socket

    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((addr, base + i))
        socks.append(s)
    return socks


def topo_subscriptions(topo: Any) -> dict[int, list[str]]:
    return {topo.stream.id: [e.name for _, e in topo.endpoints()]}


def summarize(out: Path, subscriptions: Mapping[int, list[str]], cfg: DemoConfig) -> dict[str, Any]:
    """Fairness report and counters of a finished run, from the files in `out`."""
    from jasper.metrics import fairness_report
    from jasper.records import empty_deliveries, empty_sent

    sent_path = out / "sent.npy"
    sent = np.load(sent_path) if sent_path.exists() else empty_sent()
    parts = [np.load(p) for p in sorted(glob.glob(str(out / "deliveries-*.npy")))]
    deliveries = np.concatenate(parts) if parts else empty_deliveries()
    report = fairness_report(
        sent,
        deliveries,
        subscriptions,
        tau_ns=cfg.tau_ns,
        warmup_messages=min(cfg.warmup_messages, max(0, len(sent) - 1)),
    )
    ladder = {}
    for tau in TAU_LADDER_NS:
        r = fairness_report(
            sent,
            deliveries,
            subscriptions,
            tau_ns=tau,
            warmup_messages=min(cfg.warmup_messages, max(0, len(sent) - 1)),
        )
        ladder[str(tau)] = {"p_fair": r.p_fair, "ci": list(r.p_fair_ci), "n": r.messages}
    statuses = {}
    for p in sorted(glob.glob(str(out / "status-*.json"))):
        statuses[Path(p).stem.removeprefix("status-")] = json.loads(Path(p).read_text())

    hedge_target = cfg.hedge + 1
    endpoint_counters = {
        name: c
        for s in statuses.values()
        if s.get("kind") == "receiver"
        for name, c in s["endpoints"].items()
    }
    relay_counters = {
        name: c
        for s in statuses.values()
        if s.get("kind") == "relay"
        for name, c in s["nodes"].items()
    }
    parents = [c["distinct_parents"] for c in endpoint_counters.values()]
    missing_endpoints = sorted(
        set(subscriptions[next(iter(subscriptions))]) - set(endpoint_counters)
    )

    def total(counters: Mapping[str, Mapping[str, Any]], key: str) -> int:
        return int(sum(int(c.get(key, 0)) for c in counters.values()))

    pub = statuses.get("publisher", {})
    processes = {
        name: {
            "cpu_s": round(s["process"]["cpu_s"], 3),
            "peak_rss_mb": round(s["process"]["peak_rss_kb"] / 1024, 1),
        }
        for name, s in statuses.items()
    }
    cpu_total = sum(p["cpu_s"] for p in processes.values())
    counters = {
        "duplicates_dropped_endpoints": total(endpoint_counters, "duplicates"),
        "duplicates_dropped_relays": total(relay_counters, "duplicates"),
        "stale_dropped": total(endpoint_counters, "stale") + total(relay_counters, "stale"),
        "malformed": total(endpoint_counters, "malformed_total")
        + total(relay_counters, "malformed_total"),
        "kernel_drops": total(endpoint_counters, "kernel_drops")
        + total(relay_counters, "kernel_drops"),
        "late_deliveries": total(endpoint_counters, "late"),
        "hold_overflow": total(endpoint_counters, "hold_overflow"),
        "relay_copies_sent": total(relay_counters, "sent"),
        "relay_hedge_copies_sent": total(relay_counters, "sent_hedge"),
        "endpoints_reporting": len(endpoint_counters),
        "endpoints_missing": missing_endpoints,
        "endpoints_with_h_plus_1_parents": sum(1 for p in parents if p >= hedge_target),
        "distinct_parents_min": min(parents) if parents else 0,
        "distinct_parents_max": max(parents) if parents else 0,
        "receive_lag_mean_us": _lag_mean_us(statuses),
        "receive_lag_max_us": max(
            (s.get("receive_lag", {}).get("max_ns", 0) / 1000 for s in statuses.values()),
            default=0.0,
        ),
        "link_model_lost": sum(
            int(s.get("delay_line", {}).get("lost", 0)) for s in statuses.values()
        ),
    }
    summary: dict[str, Any] = {
        "config": {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in vars(cfg).items()},
        "fairness": report.to_dict(),
        "p_fair_by_tau_ns": ladder,
        "offered_rate": pub.get("offered_rate", cfg.rate),
        "achieved_rate": pub.get("achieved_rate"),
        "messages_sent": len(sent),
        "counters": counters,
        "cpu_s_total": round(cpu_total, 2),
        "processes": processes,
    }
    summary["text"] = format_summary(summary, report.format_text(), cfg)
    return summary


def _lag_mean_us(statuses: Mapping[str, Mapping[str, Any]]) -> float:
    lags = [s["receive_lag"] for s in statuses.values() if "receive_lag" in s]
    count = sum(int(x["count"]) for x in lags)
    return sum(float(x["mean_ns"]) * int(x["count"]) for x in lags) / count / 1000 if count else 0.0


def format_summary(summary: Mapping[str, Any], fairness_text: str, cfg: DemoConfig) -> str:
    c = summary["counters"]
    procs: Mapping[str, Mapping[str, float]] = summary["processes"]
    achieved = summary["achieved_rate"]
    lines = [
        "== Jasper demo: fairness report",
        fairness_text,
        "P(F) at other tau: "
        + ", ".join(
            f"{int(t) / 1000:g} µs {100 * v['p_fair']:.1f}%"
            if v["p_fair"] is not None
            else f"{int(t) / 1000:g} µs -"
            for t, v in summary["p_fair_by_tau_ns"].items()
        ),
        f"offered {summary['offered_rate']:g} msg/s, achieved "
        + ("-" if achieved is None else f"{achieved:.1f}")
        + f" msg/s ({summary['messages_sent']} messages)",
        f"duplicates dropped: {c['duplicates_dropped_endpoints']} at endpoints, "
        f"{c['duplicates_dropped_relays']} at relays; malformed {c['malformed']}; "
        f"kernel drops {c['kernel_drops']}; link-model losses {c['link_model_lost']}",
        f"released at once, past their deadline when processed: {c['late_deliveries']} pairs "
        "(late arrivals plus receive-path backlog)",
        f"receive-path lag (processing − kernel arrival) mean {c['receive_lag_mean_us']:.0f} µs, "
        f"max {c['receive_lag_max_us']:.0f} µs",
        f"endpoints with H+1={cfg.hedge + 1} distinct parents: "
        f"{c['endpoints_with_h_plus_1_parents']}/{c['endpoints_reporting']} "
        f"(min {c['distinct_parents_min']}, max {c['distinct_parents_max']})",
        f"CPU used: {summary['cpu_s_total']:.2f} s over {len(procs)} processes",
    ]
    by_kind: dict[str, list[tuple[str, Mapping[str, float]]]] = {}
    for name, p in procs.items():
        by_kind.setdefault(name.split("-")[0], []).append((name, p))
    if len(procs) <= 16:
        lines.append("per process: name  cpu_s  peak_rss_MB")
        for name, p in procs.items():
            lines.append(f"  {name:<18} {p['cpu_s']:7.2f} {p['peak_rss_mb']:7.1f}")
    else:
        lines.append("per process kind: count  cpu_s min/median/max  peak_rss_MB min/median/max")
        for kind, items in by_kind.items():
            cpu = np.array([p["cpu_s"] for _, p in items])
            rss = np.array([p["peak_rss_mb"] for _, p in items])
            lines.append(
                f"  {kind:<10} {len(items):4d}  {cpu.min():.2f}/{np.median(cpu):.2f}/"
                f"{cpu.max():.2f}  {rss.min():.1f}/{np.median(rss):.1f}/{rss.max():.1f}"
            )
    if c["endpoints_missing"]:
        lines.append(f"endpoints with no status (process died?): {c['endpoints_missing'][:10]}")
    return "\n".join(lines)
